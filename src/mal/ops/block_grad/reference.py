"""The backward of the ViL block's pre-cell step written out in PyTorch (compiled into a few kernels, instead of
autograd's dozens of tiny ones): the input and weight gradients of `qkv.reference.block_pre` and of the gate
precomposition `qkv.reference.gate_weights`. `kernel.pre_grad` computes the same with the post tail's gradient
joined in."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..headwise import headwise_input_grad, headwise_wgrad
from ..qkv.reference import causal_conv


def gate_weights_grad(wg, wq, bq, wk, bk, wv, bv, d_wc, d_wm, d_b, qkv_grads):
    """Backward of `gate_weights`, added to the q/k/v maps' own gradients qkv_grads = (d wq, d bq, d wk, d bk,
    d wv, d bv): d_wc, d_wm (G, I), d_b (G,) -> gradients of wq, bq, wk, bk, wv, bv, wg, bg in the weights' dtypes.

    With w_c = comp(gq, wq) + comp(gk, wk), comp(g, w)[G, h, i] = sum_o g[G, h, o] w[h, o, i], and
    b = bg + gq bq + gk bk + gv bv: d g[G, h, o] = sum_i d[G, h, i] w[h, o, i] + d_b[G] bias[h, o],
    d w[h, o, i] = sum_G g[G, h, o] d[G, h, i], d bias = g^T d_b, d bg = d_b."""
    G, nb, bs = wg.shape[0], wq.shape[0], wq.shape[-1]
    acc = torch.promote_types(wg.dtype, d_wc.dtype)
    blocks = lambda t: t.to(acc).reshape(G, nb, bs)                         # (G, nb, bs)
    d_c, d_m, d_b = blocks(d_wc), blocks(d_wm), d_b.to(acc)
    d_g, out = [], []
    for g, w, bias, d, dw, db in zip(wg.split(nb * bs, dim=1), (wq, wk, wv), (bq, bk, bv), (d_c, d_c, d_m),
                                     qkv_grads[::2], qkv_grads[1::2]):
        g3 = blocks(g)                                                      # (G, nb, bs_out)
        dg3 = (d[:, :, None, :] * w.to(acc)).sum(-1) + d_b[:, None, None] * bias.to(acc).view(nb, bs)  # (G, nb, bs)
        d_g.append(dg3.reshape(G, nb * bs))
        dw_gate = (g3[..., None] * d[:, :, None, :]).sum(0)                 # (nb, bs_out, bs_in)
        out += [(dw + dw_gate).to(w.dtype), (db + (g3 * d_b[:, None, None]).sum(0).flatten()).to(bias.dtype)]
    return (*out, torch.cat(d_g, 1).to(wg.dtype), d_b.to(wg.dtype))


def pre_weight_grads(dq, dk, dv, dg, x_c, x_m, bs: int):
    """The pre-step's weight gradients from its incoming gradients and inputs, all (N, .) in the activations'
    dtype: dq, dk, dv, x_c, x_m (N, I), dg (N, G) -> d wq, d wk, d wv (nb, bs, bs), and in float32 (float64 in
    tests) d w_c, d w_m (G, I) of the precomposed gates (their bias's gradient is dg's column sums)."""
    acc = torch.promote_types(x_c.dtype, torch.float32)
    return (*headwise_wgrad(dq, x_c, dk, x_c, dv, x_m, bs).unbind(0), (dg.t() @ x_c).to(acc), (dg.t() @ x_m).to(acc))


def block_pre_vjp(xz, conv_w, conv_b, wq, wk, wv, w_c, w_m, dq, dk, dv, dg):
    """Backward of `block_pre` written out: gradients of xz (B, S, 2I), the conv weight and bias, the q/k/v
    weights and biases, and the precomposed gate weights w_c, w_m (G, I) and bias (G,). The gate GEMMs run
    in xz's dtype (as autocast's linear does); x_c and the conv's pre-activation are recomputed from xz."""
    B, S, two_i = xz.shape
    I, K, dt = two_i // 2, conv_w.shape[-1], xz.dtype
    acc = torch.promote_types(dt, torch.float32)                            # float32, or float64 in tests
    x_m = xz[..., :I]                                                       # (B, S, I)
    y, xp, w = causal_conv(x_m, conv_w, conv_b)                             # (B, S, I) float32, (B, S+K-1, I), (K, I)
    sig = torch.sigmoid(y)
    x_c = (y * sig).to(dt)                                                  # (B, S, I)
    dg = dg.to(dt)                                                          # (B, S, G)
    dx_c = headwise_input_grad(dq, wq) + headwise_input_grad(dk, wk) + (dg @ w_c.to(dt)).to(acc)  # (B, S, I)
    dx_m = headwise_input_grad(dv, wv) + (dg @ w_m.to(dt)).to(acc)          # (B, S, I)
    dy = dx_c * (sig * (1 + y * (1 - sig)))                                 # (B, S, I) through SiLU
    dyp = F.pad(dy, (0, 0, 0, K - 1))                                       # (B, S+K-1, I)
    dx_m = dx_m + sum(dyp[:, K - 1 - j:K - 1 - j + S] * w[j] for j in range(K))  # (B, S, I) through the conv
    d_conv_w = torch.stack([(dy * xp[:, j:j + S]).sum((0, 1)) for j in range(K)], -1).unsqueeze(1)  # (I, 1, K)
    flat = lambda t: t.reshape(-1, I).to(dt)                                # (N, I)
    dwq, dwk, dwv, d_wc, d_wm = pre_weight_grads(flat(dq), flat(dk), flat(dv), dg.reshape(-1, dg.shape[-1]),
                                                 flat(x_c), flat(x_m), wq.shape[-1])
    d_b = dg.sum((0, 1), dtype=acc)                                          # (G,)
    return (F.pad(dx_m, (0, I)).to(dt), d_conv_w, dy.sum((0, 1)), dwq, dq.to(acc).sum((0, 1)),
            dwk, dk.to(acc).sum((0, 1)), dwv, dv.to(acc).sum((0, 1)), d_wc, d_wm, d_b)


__all__ = ["gate_weights_grad", "pre_weight_grads", "block_pre_vjp"]
