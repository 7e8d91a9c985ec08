"""The ViL block's pre-cell step in one Triton kernel: causal conv + SiLU, q/k/v and both gates from x_m.

    x_c = SiLU(bias + sum_s x_m[t - s] w[K-1-s])             (depthwise causal conv, s = 0..K-1)
    q = blockdiag(Wq) x_c + bq,  k = blockdiag(Wk) x_c + bk,  v = blockdiag(Wv) x_m + bv
    g = x_c w_c^T + x_m w_m^T + b                              (gates, precomposed by `reference.gate_weights`)

Same function as `reference.qkv_gates` (under torch.compile five kernels that write the conv's float32
pre-activation and a float32 copy of k: ~4x the HBM traffic). One program takes BLOCK_T tokens of one image and
walks its I channels in chunks of BLOCK_C: it reads x_m (and the K-1 tokens before the tile, from cache), writes
q, k, v once and accumulates the gates (BLOCK_T, G) on tensor cores. Arithmetic is float32; x_c is rounded to the
activations' dtype as the reference does, and the gate GEMM runs in that dtype with float32 accumulation, as
autocast's linear does. The block-diagonal maps are float32 multiply-adds (faster in the sweep than a tensor-core
form with the weight split into two bf16 halves).
"""
from __future__ import annotations

import torch

import triton  # imported by the ops' registry only for CUDA inputs; without triton the backend is unavailable
import triton.language as tl

MAX_GATES = 16              # 2 * heads, padded to the tensor-core minimum
# (tokens per program BLOCK_T, channels per step BLOCK_C, warps) for 2-byte activations: the fastest at every
# ViL-T/S/B shape or within 23 % of it in `benchmarks/qkv_kernel.py --sweep` on an H100; BLOCK_C shrinks to divide I
CONFIG = (64, 32, 4)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _blockdiag(x, W, c0, BT: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr):
    """y[t, h*BS + o] = sum_i W[h, o, i] x[t, h*BS + i] for the BC channels from c0, in float32 multiply-adds:
    x (BT, BC), W (nb, BS, BS) float32 (out, in) -> (BT, BC) float32."""
    hb = (c0 // BS + tl.arange(0, BC // BS))[:, None, None] * (BS * BS)      # (nb, 1, 1) block offsets
    oi = tl.arange(0, BS)[None, :, None] * BS + tl.arange(0, BS)[None, None, :]  # (1, BS, BS) (out, in)
    x4 = tl.reshape(x.to(tl.float32), (BT, BC // BS, 1, BS))                 # (BT, nb, 1, BS)
    return tl.reshape(tl.sum(x4 * tl.load(W + hb + oi)[None, :, :, :], axis=3), (BT, BC))  # (BT, BC)


@triton.jit(do_not_specialize=["S"])
def _qkv_kernel(XZ, CW, CB, WQ, BQ, WK, BK, WV, BV, WC, WM, GB, Q, K, V, G,
                S, I, stride_b, stride_s, NG,
                KS: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, GP: tl.constexpr,
                IEEE: tl.constexpr):
    pid_t, b = tl.program_id(0), tl.program_id(1)
    t = pid_t * BT + tl.arange(0, BT)                                        # (BT,) tokens
    t_ok = t < S
    x_base = XZ + b.to(tl.int64) * stride_b
    o_base = b.to(tl.int64) * S * I                                          # q, k, v are (B, S, I) contiguous
    gi = tl.arange(0, GP)                                                    # (GP,) gate rows, NG of them real
    g_ok = gi < NG
    acc = tl.zeros((BT, GP), dtype=tl.float32)                               # (BT, GP) gates
    for c0 in range(0, I, BC):
        c = c0 + tl.arange(0, BC)                                            # (BC,) channels
        y = tl.load(CB + c)[None, :].to(tl.float32)                          # (1, BC) conv bias
        for s in tl.static_range(KS):                                        # tap s looks s tokens back
            ts = t - s
            xs = tl.load(x_base + ts[:, None] * stride_s + c[None, :], mask=(t_ok & (ts >= 0))[:, None],
                         other=0.0)                                          # (BT, BC)
            if s == 0:
                x_m = xs
            y += xs.to(tl.float32) * tl.load(CW + c * KS + (KS - 1 - s))[None, :]
        x_c = (y * tl.sigmoid(y)).to(x_m.dtype)                              # (BT, BC) SiLU, in x's dtype
        q = _blockdiag(x_c, WQ, c0, BT, BC, BS) + tl.load(BQ + c)[None, :]   # (BT, BC)
        k = _blockdiag(x_c, WK, c0, BT, BC, BS) + tl.load(BK + c)[None, :]
        v = _blockdiag(x_m, WV, c0, BT, BC, BS) + tl.load(BV + c)[None, :]
        out = o_base + t[:, None] * I + c[None, :]                           # (BT, BC)
        tl.store(Q + out, q.to(Q.dtype.element_ty), mask=t_ok[:, None])
        tl.store(K + out, k.to(K.dtype.element_ty), mask=t_ok[:, None])
        tl.store(V + out, v.to(V.dtype.element_ty), mask=t_ok[:, None])
        w_g = c[:, None] + gi[None, :] * I                                   # (BC, GP) of the (NG, I) gate weights
        wc = tl.load(WC + w_g, mask=g_ok[None, :], other=0.0).to(x_m.dtype)
        wm = tl.load(WM + w_g, mask=g_ok[None, :], other=0.0).to(x_m.dtype)
        if IEEE:
            acc += tl.dot(x_c, wc, input_precision="ieee") + tl.dot(x_m, wm, input_precision="ieee")
        else:
            acc += tl.dot(x_c, wc) + tl.dot(x_m, wm)
    g = acc + tl.load(GB + gi, mask=g_ok, other=0.0)[None, :]               # (BT, GP)
    tl.store(G + (b.to(tl.int64) * S + t[:, None]) * NG + gi[None, :], g.to(G.dtype.element_ty),
             mask=t_ok[:, None] & g_ok[None, :])


def _block_c(n: int, want: int) -> int:
    """Channel chunk: `want`, else the largest of 64, 32, 16 below it that divides n."""
    return next(bc for bc in (want, 64, 32, 16) if bc <= want and n % bc == 0)


def supports(xz: torch.Tensor, conv_w: torch.Tensor, wq: torch.Tensor, bq, bk, bv, n_gates: int) -> bool:
    """CUDA fp16/bf16 xz (B, S, 2I) with unit channel stride, 16 | I, block size dividing 16, biases present."""
    if not (isinstance(xz, torch.Tensor) and xz.is_cuda and xz.dtype in SUPPORTED_DTYPES and xz.dim() == 3):
        return False
    inner, bs = xz.shape[-1] // 2, wq.shape[-1]
    return (xz.stride(-1) == 1 and inner % 16 == 0 and 16 % bs == 0 and wq.shape[0] * bs == inner
            and conv_w.shape[-1] <= 8 and n_gates <= MAX_GATES and all(b is not None for b in (bq, bk, bv))
            and xz.numel() < 2 ** 31)


def qkv_gates(xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, w_c, w_m, b_g, config: tuple | None = None):
    """xz (B, S, 2I) -> q, k, v (B, S, I) and gates (B, S, G) in xz's dtype (see the module docstring).

    conv_w (I, 1, K), conv_b (I,), wq/wk/wv (nb, bs, bs), bq/bk/bv (I,), w_c/w_m (G, I), b_g (G,);
    config: (BLOCK_T, BLOCK_C, warps), default `CONFIG`."""
    bt, bc, warps = config or CONFIG
    B, S, two_i = xz.shape
    inner, G = two_i // 2, w_c.shape[0]
    q, k, v = (torch.empty(B, S, inner, device=xz.device, dtype=xz.dtype) for _ in range(3))
    g = torch.empty(B, S, G, device=xz.device, dtype=xz.dtype)
    f32 = lambda t: t.detach().float().contiguous()
    _qkv_kernel[(triton.cdiv(S, bt), B)](
        xz, f32(conv_w), f32(conv_b), f32(wq), f32(bq), f32(wk), f32(bk), f32(wv), f32(bv), f32(w_c), f32(w_m),
        f32(b_g), q, k, v, g, S, inner, xz.stride(0), xz.stride(1), G,
        KS=conv_w.shape[-1], BS=wq.shape[-1], BT=bt, BC=_block_c(inner, bc), GP=MAX_GATES,
        IEEE=xz.dtype == torch.float32, num_warps=warps)
    return q, k, v, g


__all__ = ["qkv_gates", "supports", "CONFIG"]
