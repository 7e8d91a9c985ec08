"""The ViL block's pre-cell step in plain PyTorch: causal conv + SiLU, the q/k/v maps and both gates from xz.

The gates are linear in [q, k, v] and q, k, v are affine in (x_c, x_m), so the gate Linear(3I -> G) is
precomposed with the q/k/v maps (`gate_weights`) into two thin GEMMs on x_c and x_m; the depthwise causal
conv is K shifted multiply-adds (fused with SiLU and q/k by the compiler).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..headwise import headwise


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Depthwise causal conv as K shifted multiply-adds: x (B, S, C), weight (C, 1, K), bias (C,) ->
    pre-activation y (B, S, C) in the weights' precision, the padded input (B, S+K-1, C) and the taps (K, C)."""
    S, K = x.shape[1], weight.shape[-1]
    xp = F.pad(x, (0, 0, K - 1, 0))                                         # (B, S+K-1, C)
    w = weight[:, 0, :].t()                                                 # (K, C)
    return bias + sum(xp[:, j:j + S] * w[j] for j in range(K)), xp, w       # (B, S, C), ...


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SiLU(depthwise causal conv): x (B, S, C), weight (C, 1, K), bias (C,) -> (B, S, C) in x's dtype."""
    return F.silu(causal_conv(x, weight, bias)[0]).to(x.dtype)


def gate_weights(wg: torch.Tensor, bg: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None,
                 wk: torch.Tensor, bk: torch.Tensor | None, wv: torch.Tensor, bv: torch.Tensor | None):
    """Precompose the gate Linear(3I -> G) with the q/k/v maps: -> (w_c (G, I), w_m (G, I), b (G,)), float32+.

    wg (G, 3I), bg (G,) are the stacked [igate; fgate] weights; wq/wk/wv (nb, bs, bs) the headwise weights.
    """
    G, I = wg.shape[0], wq.shape[0] * wq.shape[-1]
    with torch.autocast(wg.device.type, enabled=False):
        gq, gk, gv = wg.split(I, dim=1)                                     # (G, I) each
        comp = lambda g, w: (g.unflatten(1, w.shape[:2])[..., None] * w).sum(2).reshape(G, I)  # gho,hoi->ghi
        w_c = comp(gq, wq) + comp(gk, wk)                                   # (G, I) acts on x_c
        w_m = comp(gv, wv)                                                  # (G, I) acts on x_m
        b = bg
        for g, bias in ((gq, bq), (gk, bk), (gv, bv)):
            if bias is not None:
                b = b + g @ bias                                            # (G,)
    return w_c, w_m, b


def qkv_gates(xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, w_c, w_m, b_g, pointwise: bool = False):
    """xz (B, S, 2I) -> q, k, v (B, S, I) and gate pre-activations (B, S, G), with the gates precomposed
    (`gate_weights`: w_c, w_m (G, I), b_g (G,)); the reference of `kernel.qkv_gates`.
    pointwise: the q/k/v maps as the compiler fuses them (`headwise`), else einsums."""
    I = xz.shape[-1] // 2
    x_m = xz[..., :I]                                                       # (B, S, I)
    x_c = causal_conv_silu(x_m, conv_w, conv_b)                             # (B, S, I)
    q = headwise(x_c, wq, bq, pointwise).to(xz.dtype)                       # (B, S, I)
    k = headwise(x_c, wk, bk, pointwise).to(xz.dtype)                       # (B, S, I)
    v = headwise(x_m, wv, bv, pointwise).to(xz.dtype)                       # (B, S, I)
    g = F.linear(x_c, w_c) + F.linear(x_m, w_m, b_g)                        # (B, S, G)
    return q, k, v, g


def block_pre(xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, wg, bg, pointwise: bool = False):
    """xz (B, S, 2I) -> q, k, v (B, S, I) and gate pre-activations (B, S, 2NH), from the block's own weights
    (wg (2NH, 3I), bg (2NH,): the stacked [igate; fgate])."""
    w_c, w_m, b = gate_weights(wg, bg, wq, bq, wk, bk, wv, bv)
    return qkv_gates(xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, w_c, w_m, b, pointwise)


__all__ = ["causal_conv", "causal_conv_silu", "gate_weights", "qkv_gates", "block_pre"]
