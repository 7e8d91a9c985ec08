"""Backward of the ViL block's pointwise regions in Triton: the post-cell tail and the pre-cell step; and the
post tail's forward up to the down-projection.

The block's forward (`mal.ops.qkv.reference.block_pre`, the mLSTM cell, `mal.ops.vil_block.post.block_post`), per
token t and channel c:

    y = cb + sum_s x_m[t-s] w[K-1-s],  x_c = SiLU(y)                         causal depthwise conv, s = 0..K-1
    q, k, v = blockdiag(Wq) x_c + bq, blockdiag(Wk) x_c + bk, blockdiag(Wv) x_m + bv;  g = x_c w_c^T + x_m w_m^T + b
    h = mLSTM(q, k, v, g);  hn = LayerNorm over each head's DH channels of h
    a = hn nw + nb + skip x_c,  u = a SiLU(z),  out = u W_down^T + b_down (+ residual)

Forward, `post_fwd`, a program per (token tile, image, head): u from h and xz (the norm's statistics in a first
pass over the head's channels, the conv recomputed from x_m), which the down-projection GEMM then reads.

Backward, from du = d(out) W_down (a GEMM):

* `post_grad`, one kernel, a program per (token tile, image, head):
      da = du SiLU(z),  dz = du a SiLU'(z),  dh = LayerNorm backward of da nw,  dx_c(post) = da skip,
      and the column sums (over tokens) d nw = sum da hn, d nb = sum da, d skip = sum da x_c.
  It writes dh, the packed (B, S, 2I) buffer [dx_c(post), dz] (which becomes dxz) and u (for W_down's gradient),
  and on request the cell's v = blockdiag(Wv) x_m + bv from the x_m it reads for the conv (so the forward need
  not keep v for the cell's backward, which runs next).
* `pre_grad`, two kernels, a program per (image, channel chunk) walking the sequence:
    1. dx_c = blockdiag(Wq)^T dq + blockdiag(Wk)^T dk + dg w_c + dx_c(post),  dy = dx_c SiLU'(y);
       writes dy and x_c (for the q/k weight gradients) in the activations' dtype (the plain path's conv
       backward rounds dy so too); column sums d bq, d bk, d cb and the conv taps sum_t dy[t] x_m[t-s].
    2. dx_m = blockdiag(Wv)^T dv + dg w_m + sum_s dy[t+s] w[K-1-s]; the transposed conv needs dy of the next
       K-1 tokens, which other programs of kernel 1 write, hence two kernels. dx_m goes into the packed
       buffer's left half, which is then dxz; column sums d bv and d b (the gates' bias: dg's).

So the conv's backward runs once for both regions (the post region's x_c gradient joins the pre region's before
SiLU'), and dxz is written once, with no add of two regions' (B, S, 2I) gradients. The LayerNorm statistics
are recomputed from h (one extra read of the head's tile). Arithmetic is float32; column sums are per-program
float32 partials that torch adds (deterministic, no atomics).
"""
from __future__ import annotations

import torch

import triton  # imported by the ops' registry only for CUDA inputs; without triton the backend is unavailable
import triton.language as tl

from ..qkv.kernel import MAX_GATES, _block_c, _blockdiag

MAX_CONV = 8                # taps of the causal conv
# (BLOCK_T tokens, BLOCK_C channels, warps) of each kernel. post_grad: a program per BLOCK_T tokens of one head,
# walking its DH channels in chunks of BLOCK_C (shrunk to divide DH). pre_grad's two kernels: a program per
# BLOCK_C channels of one image, walking the sequence in tiles of BLOCK_T tokens. The fastest at ViL-B's shape
# in `benchmarks/block_grad.py --sweep` on an H100 (benchmarks/results/block_grad_h100.json); `_pre_grad_kernel`
# takes PRE_CONFIG_NARROW up to I = 384 (ViL-T: the fastest at 128 and 144 tokens on an H200, and the faster
# training step, benchmarks/results/block_grad_pre16_h200.json and train_step_pre16_h200.json).
POST_CONFIG = (16, 32, 4)
POST_FWD_CONFIG = (16, 32, 4)  # `post_fwd`: post_grad's tiles (a program per BLOCK_T tokens of one head)
PRE_CONFIG = (32, 64, 4)
PRE_CONFIG_NARROW = (16, 128, 4)
DXM_CONFIG = (32, 64, 4)
CAST_CONFIG = (8192, 4, 16)  # `cast_colsum`: (elements per tile, warps, tiles per program)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _conv_silu(x_base, t, t_ok, c, CW, CB, stride_xs, KS: tl.constexpr):
    """x_m (BT, BC) of tokens t and channels c (x_base: the image's xz) and x_c = SiLU(causal conv of x_m), in
    float32 rounded to xz's dtype as the forward's conv rounds it."""
    y = tl.load(CB + c)[None, :]                                             # (1, BC) conv bias
    for s in tl.static_range(KS):
        ts = t - s
        xs = tl.load(x_base + ts[:, None] * stride_xs + c[None, :], mask=(t_ok & (ts >= 0))[:, None], other=0.0)
        if s == 0:
            x_m = xs
        y += xs.to(tl.float32) * tl.load(CW + c * KS + (KS - 1 - s))[None, :]
    return x_m, (y * tl.sigmoid(y)).to(x_base.dtype.element_ty).to(tl.float32)


@triton.jit(do_not_specialize=["S"])
def _post_fwd_kernel(H, XZ, CW, CB, NW, NB, SK, U, S, I, HD, stride_hb, stride_hh, stride_hs, stride_xb,
                     stride_xs, ln_eps, KS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    pid_t, b, hd = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)                                        # (BT,) tokens
    t_ok = t < S
    m2 = t_ok[:, None]
    row = b.to(tl.int64) * S + t
    h_base = H + b.to(tl.int64) * stride_hb + hd.to(tl.int64) * stride_hh
    x_base = XZ + b.to(tl.int64) * stride_xb
    s_h = tl.zeros((BT,), dtype=tl.float32)                                  # pass 1: the per-head norm's statistics
    s_hh = tl.zeros((BT,), dtype=tl.float32)
    for d0 in range(0, HD, BC):
        h = tl.load(h_base + t[:, None] * stride_hs + (d0 + tl.arange(0, BC))[None, :], mask=m2,
                    other=0.0).to(tl.float32)                                # (BT, BC)
        s_h += tl.sum(h, 1)
        s_hh += tl.sum(h * h, 1)
    mean = s_h / HD
    rstd = 1.0 / tl.sqrt(tl.maximum(s_hh / HD - mean * mean, 0.0) + ln_eps)
    for d0 in range(0, HD, BC):                                              # pass 2: u
        c = hd * HD + d0 + tl.arange(0, BC)                                  # (BC,) channels
        h = tl.load(h_base + t[:, None] * stride_hs + (d0 + tl.arange(0, BC))[None, :], mask=m2,
                    other=0.0).to(tl.float32)
        z = tl.load(x_base + t[:, None] * stride_xs + (I + c)[None, :], mask=m2, other=0.0).to(tl.float32)
        x_m, x_c = _conv_silu(x_base, t, t_ok, c, CW, CB, stride_xs, KS)   # (BT, BC) each; x_m unused here
        hn = (h - mean[:, None]) * rstd[:, None]
        a = hn * tl.load(NW + c)[None, :] + tl.load(NB + c)[None, :] + tl.load(SK + c)[None, :] * x_c
        tl.store(U + row[:, None] * I + c[None, :], (a * z * tl.sigmoid(z)).to(U.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["S"])
def _post_grad_kernel(DU, H, XZ, CW, CB, NW, NB, SK, WV, BV, DH, PK, U, V, PART,
                      S, I, HD, stride_hb, stride_hh, stride_hs, stride_xb, stride_xs, ln_eps,
                      KS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr,
                      WITH_V: tl.constexpr):
    pid_t, b, hd = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)                                        # (BT,) tokens
    t_ok = t < S
    m2 = t_ok[:, None]
    row = b.to(tl.int64) * S + t                                             # (BT,) rows of the (B*S, .) buffers
    h_base = H + b.to(tl.int64) * stride_hb + hd.to(tl.int64) * stride_hh
    x_base = XZ + b.to(tl.int64) * stride_xb
    # pass 1: per-token sums over the head's channels for the LayerNorm statistics and its backward
    s_h = tl.zeros((BT,), dtype=tl.float32)
    s_hh = tl.zeros((BT,), dtype=tl.float32)
    s_g = tl.zeros((BT,), dtype=tl.float32)
    s_gh = tl.zeros((BT,), dtype=tl.float32)
    for d0 in range(0, HD, BC):
        c = hd * HD + d0 + tl.arange(0, BC)                                  # (BC,) channels
        h = tl.load(h_base + t[:, None] * stride_hs + (d0 + tl.arange(0, BC))[None, :], mask=m2,
                    other=0.0).to(tl.float32)                                # (BT, BC)
        du = tl.load(DU + row[:, None] * I + c[None, :], mask=m2, other=0.0).to(tl.float32)
        z = tl.load(x_base + t[:, None] * stride_xs + (I + c)[None, :], mask=m2, other=0.0).to(tl.float32)
        g = du * z * tl.sigmoid(z) * tl.load(NW + c)[None, :]                # (BT, BC) d hn
        s_h += tl.sum(h, 1)
        s_hh += tl.sum(h * h, 1)
        s_g += tl.sum(g, 1)
        s_gh += tl.sum(g * h, 1)
    mean = s_h / HD
    rstd = 1.0 / tl.sqrt(tl.maximum(s_hh / HD - mean * mean, 0.0) + ln_eps)
    g_mean = s_g / HD                                                        # mean of d hn
    gh_mean = rstd * (s_gh - mean * s_g) / HD                                # mean of d hn * hn
    prow = b * tl.num_programs(0) + pid_t
    # pass 2: gradients, u, and the column partial sums
    for d0 in range(0, HD, BC):
        c = hd * HD + d0 + tl.arange(0, BC)
        h = tl.load(h_base + t[:, None] * stride_hs + (d0 + tl.arange(0, BC))[None, :], mask=m2,
                    other=0.0).to(tl.float32)
        du = tl.load(DU + row[:, None] * I + c[None, :], mask=m2, other=0.0).to(tl.float32)
        z = tl.load(x_base + t[:, None] * stride_xs + (I + c)[None, :], mask=m2, other=0.0).to(tl.float32)
        x_m, x_c = _conv_silu(x_base, t, t_ok, c, CW, CB, stride_xs, KS)     # (BT, BC) each
        out = row[:, None] * I + c[None, :]
        if WITH_V:                                                           # the cell's v, as `qkv.kernel` makes it
            v = _blockdiag(x_m, WV, hd * HD + d0, BT, BC, BS) + tl.load(BV + c)[None, :]
            tl.store(V + out, v.to(V.dtype.element_ty), mask=m2)
        nw = tl.load(NW + c)[None, :]
        skip = tl.load(SK + c)[None, :]
        hn = (h - mean[:, None]) * rstd[:, None]
        sz = tl.sigmoid(z)
        a = hn * nw + tl.load(NB + c)[None, :] + skip * x_c
        da = du * z * sz                                                     # (BT, BC) d a
        dz = du * a * sz * (1.0 + z * (1.0 - sz))
        dh = rstd[:, None] * (da * nw - g_mean[:, None] - hn * gh_mean[:, None])
        pk = row[:, None] * (2 * I) + c[None, :]
        tl.store(DH + out, dh.to(DH.dtype.element_ty), mask=m2)
        tl.store(U + out, (a * z * sz).to(U.dtype.element_ty), mask=m2)
        tl.store(PK + pk, (da * skip).to(PK.dtype.element_ty), mask=m2)
        tl.store(PK + pk + I, dz.to(PK.dtype.element_ty), mask=m2)
        part = PART + prow.to(tl.int64) * I + c
        n_part = tl.num_programs(0) * tl.num_programs(1) * I
        tl.store(part, tl.sum(da * hn, 0))
        tl.store(part + n_part, tl.sum(da, 0))
        tl.store(part + 2 * n_part, tl.sum(da * x_c, 0))


@triton.jit(do_not_specialize=["S"])
def _pre_grad_kernel(DQ, DK, DG, PK, XZ, CW, CB, WQT, WKT, WC, DY, XC, PART,
                     S, I, NG, stride_xb, stride_xs, stride_pb,
                     KS: tl.constexpr, KP: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                     GP: tl.constexpr, IEEE: tl.constexpr):
    b, pid_c = tl.program_id(0), tl.program_id(1)
    c0 = pid_c * BC
    c = c0 + tl.arange(0, BC)                                                # (BC,) channels
    gi = tl.arange(0, GP)                                                    # (GP,) gate rows, NG of them real
    g_ok = gi < NG
    wc = tl.load(WC + gi[:, None] * I + c[None, :], mask=g_ok[:, None], other=0.0)  # (GP, BC) in dg's dtype
    x_base = XZ + b.to(tl.int64) * stride_xb
    # column sums over the sequence, accumulated elementwise and reduced once at the end
    s_q = tl.zeros((BT, BC), dtype=tl.float32)
    s_k = tl.zeros((BT, BC), dtype=tl.float32)
    s_y = tl.zeros((BT, BC), dtype=tl.float32)
    s_w = tl.zeros((KP, BT, BC), dtype=tl.float32)                           # tap s: sum_t dy[t] x_m[t-s]
    taps = tl.arange(0, KP)[:, None, None]                                   # (KP, 1, 1)
    for t0 in range(0, S, BT):
        t = t0 + tl.arange(0, BT)                                            # (BT,) tokens
        t_ok = t < S
        row = b.to(tl.int64) * S + t
        out = row[:, None] * I + c[None, :]                                  # (BT, BC) offsets in (B*S, I)
        dq = tl.load(DQ + out, mask=t_ok[:, None], other=0.0)
        dk = tl.load(DK + out, mask=t_ok[:, None], other=0.0)
        dg = tl.load(DG + row[:, None] * NG + gi[None, :], mask=t_ok[:, None] & g_ok[None, :], other=0.0)
        if IEEE:
            dxc = tl.dot(dg, wc, input_precision="ieee")                     # (BT, BC)
        else:
            dxc = tl.dot(dg, wc)
        dxc += _blockdiag(dq, WQT, c0, BT, BC, BS) + _blockdiag(dk, WKT, c0, BT, BC, BS)
        dxc += tl.load(PK + row[:, None] * (2 * I) + c[None, :], mask=t_ok[:, None], other=0.0).to(tl.float32)
        y = tl.load(CB + c)[None, :]                                         # (1, BC) conv bias
        for s in tl.static_range(KS):
            ts = t - s
            xs = tl.load(x_base + ts[:, None] * stride_xs + c[None, :], mask=(t_ok & (ts >= 0))[:, None], other=0.0)
            y += xs.to(tl.float32) * tl.load(CW + c * KS + (KS - 1 - s))[None, :]
        sig = tl.sigmoid(y)
        tl.store(XC + out, (y * sig).to(XC.dtype.element_ty), mask=t_ok[:, None])
        dy = dxc * sig * (1.0 + y * (1.0 - sig))                             # (BT, BC) through SiLU; 0 past S
        tl.store(DY + out, dy.to(DY.dtype.element_ty), mask=t_ok[:, None])
        s_q += dq.to(tl.float32)
        s_k += dk.to(tl.float32)
        s_y += dy
        for s in tl.static_range(KS):
            ts = t - s
            xs = tl.load(x_base + ts[:, None] * stride_xs + c[None, :], mask=(t_ok & (ts >= 0))[:, None], other=0.0)
            s_w += tl.where(taps == s, (dy * xs.to(tl.float32))[None, :, :], 0.0)
    part = PART + b.to(tl.int64) * stride_pb
    tl.store(part + c, tl.sum(s_q, 0))
    tl.store(part + I + c, tl.sum(s_k, 0))
    tl.store(part + 2 * I + c, tl.sum(s_y, 0))
    tl.store(part + (3 + tl.arange(0, KP)[:, None]) * I + c[None, :], tl.sum(s_w, 1))


@triton.jit(do_not_specialize=["S"])
def _pre_dxm_kernel(DV, DG, DY, CW, WVT, WM, DXZ, PART, S, I, NG, stride_db, stride_ds, stride_pb,
                    KS: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, GP: tl.constexpr,
                    IEEE: tl.constexpr):
    b, pid_c = tl.program_id(0), tl.program_id(1)
    c0 = pid_c * BC
    c = c0 + tl.arange(0, BC)
    gi = tl.arange(0, GP)
    g_ok = gi < NG
    wm = tl.load(WM + gi[:, None] * I + c[None, :], mask=g_ok[:, None], other=0.0)  # (GP, BC) in dg's dtype
    s_v = tl.zeros((BT, BC), dtype=tl.float32)
    s_g = tl.zeros((BT, GP), dtype=tl.float32)
    for t0 in range(0, S, BT):
        t = t0 + tl.arange(0, BT)
        t_ok = t < S
        row = b.to(tl.int64) * S + t
        dv = tl.load(DV + row[:, None] * I + c[None, :], mask=t_ok[:, None], other=0.0)
        dg = tl.load(DG + row[:, None] * NG + gi[None, :], mask=t_ok[:, None] & g_ok[None, :], other=0.0)
        if IEEE:
            dxm = tl.dot(dg, wm, input_precision="ieee")                     # (BT, BC)
        else:
            dxm = tl.dot(dg, wm)
        dxm += _blockdiag(dv, WVT, c0, BT, BC, BS)
        for s in tl.static_range(KS):                                        # transposed conv: dy of later tokens
            ts = t + s
            dys = tl.load(DY + (row + s)[:, None] * I + c[None, :], mask=(ts < S)[:, None], other=0.0)
            dxm += dys.to(tl.float32) * tl.load(CW + c * KS + (KS - 1 - s))[None, :]
        tl.store(DXZ + b.to(tl.int64) * stride_db + t[:, None] * stride_ds + c[None, :],
                 dxm.to(DXZ.dtype.element_ty), mask=t_ok[:, None])
        s_v += dv.to(tl.float32)
        s_g += dg.to(tl.float32)
    part = PART + b.to(tl.int64) * stride_pb
    tl.store(part + c, tl.sum(s_v, 0))
    # the next row: the gates' column sums in its first NG entries (chunk 0's program), zeros after them
    tl.store(part + I + gi, tl.sum(s_g, 0), mask=g_ok & (pid_c == 0))
    tl.store(part + I + c, tl.zeros((BC,), dtype=tl.float32), mask=c >= NG)


@triton.jit(do_not_specialize=["N", "ITERS", "GROUP"])
def _cast_colsum_kernel(X, SC, Y, PART, N, D, ITERS, GROUP, ROWS: tl.constexpr, BD: tl.constexpr,
                        SCALED: tl.constexpr):
    pid = tl.program_id(0)
    d = tl.arange(0, BD)
    acc = tl.zeros((ROWS, BD), dtype=tl.float32)                             # column sums, reduced at the end
    for it in range(ITERS):
        r = (pid * ITERS + it) * ROWS + tl.arange(0, ROWS)                   # (ROWS,)
        m = (r < N)[:, None] & (d < D)[None, :]
        offs = r.to(tl.int64)[:, None] * D + d[None, :]
        x = tl.load(X + offs, mask=m, other=0.0)                             # (ROWS, BD)
        if SCALED:                                                           # row r times its group's scale
            x = x.to(tl.float32) * tl.load(SC + r // GROUP, mask=r < N, other=0.0)[:, None]
        tl.store(Y + offs, x.to(Y.dtype.element_ty), mask=m)
        acc += x.to(tl.float32)
    tl.store(PART + pid.to(tl.int64) * D + d, tl.sum(acc, 0), mask=d < D)


def supports(xz: torch.Tensor, num_heads: int, conv_w: torch.Tensor, wq: torch.Tensor, n_gates: int) -> bool:
    """CUDA fp16/bf16 xz (B, S, 2I) with unit channel stride, head dim DH = I / num_heads with 16 | DH, block
    size dividing 16, at most `MAX_CONV` conv taps and `MAX_GATES` gates, offsets within int32."""
    if not (isinstance(xz, torch.Tensor) and xz.is_cuda and xz.dtype in SUPPORTED_DTYPES and xz.dim() == 3):
        return False
    inner = xz.shape[-1] // 2
    return (xz.stride(-1) == 1 and inner % num_heads == 0 and (inner // num_heads) % 16 == 0
            and 16 % wq.shape[-1] == 0 and conv_w.shape[-1] <= MAX_CONV and n_gates <= MAX_GATES
            and xz.numel() < 2 ** 31)


def post_fwd(h, xz, conv_w, conv_b, norm_w, norm_b, skip, ln_eps: float, config: tuple | None = None):
    """The post tail's forward up to the down-projection: h (B, NH, S, DH), xz (B, S, 2I), conv_w (I, 1, K),
    conv_b/norm_w/norm_b/skip (I,) -> u = (LayerNorm_head(h) norm_w + norm_b + skip x_c) SiLU(z) (B, S, I) in xz's
    dtype, the down-projection's input (module docstring; the same u as `post_grad` writes). config: (BLOCK_T,
    BLOCK_C, warps), default `POST_FWD_CONFIG`."""
    bt, bc, warps = config or POST_FWD_CONFIG
    B, NH, S, DH = h.shape
    h = h if h.stride(-1) == 1 else h.contiguous()
    u = torch.empty(B, S, NH * DH, device=xz.device, dtype=xz.dtype)
    f32 = lambda t: t.detach().float().contiguous()
    _post_fwd_kernel[(triton.cdiv(S, bt), B, NH)](
        h, xz, f32(conv_w), f32(conv_b), f32(norm_w), f32(norm_b), f32(skip), u, S, NH * DH, DH, h.stride(0),
        h.stride(1), h.stride(2), xz.stride(0), xz.stride(1), ln_eps, KS=conv_w.shape[-1], BT=bt,
        BC=_block_c(DH, bc), num_warps=warps)
    return u


def post_grad(du, h, xz, conv_w, conv_b, norm_w, norm_b, skip, ln_eps: float, v_weights: tuple | None = None,
              config: tuple | None = None):
    """Gradients of the block's post-cell tail from du = d(out) W_down (B, S, I) (module docstring).

    h (B, NH, S, DH), xz (B, S, 2I), conv_w (I, 1, K), conv_b/norm_w/norm_b/skip (I,) ->
    dh (B, NH, S, DH) (a head view of a (B, S, I) tensor), the packed (B, S, 2I) [dx_c, dz] in xz's dtype,
    u (B, S, I) (the down-projection's input), d norm_w, d norm_b, d skip (I,) in float32, and with
    v_weights = (wv (nb, bs, bs), bv (I,)) the cell's v = blockdiag(wv) x_m + bv (B, S, I) in xz's dtype, which
    the kernel forms from the x_m it reads anyway (else None)."""
    bt, bc, warps = config or POST_CONFIG
    B, NH, S, DH = h.shape
    h = h if h.stride(-1) == 1 else h.contiguous()
    inner = NH * DH
    n_t = triton.cdiv(S, bt)
    dh = torch.empty(B, S, inner, device=h.device, dtype=h.dtype)
    packed = torch.empty(B, S, 2 * inner, device=xz.device, dtype=xz.dtype)
    u = torch.empty(B, S, inner, device=xz.device, dtype=xz.dtype)
    part = torch.empty(3, B * n_t, inner, device=xz.device, dtype=torch.float32)
    f32 = lambda t: t.detach().float().contiguous()
    v = torch.empty(B, S, inner, device=xz.device, dtype=xz.dtype) if v_weights is not None else None
    wv, bv = (f32(w) for w in v_weights) if v_weights is not None else (norm_w, norm_w)   # unused without v
    bs = wv.shape[-1] if v_weights is not None else 1
    _post_grad_kernel[(n_t, B, NH)](
        du.contiguous(), h, xz, f32(conv_w), f32(conv_b), f32(norm_w), f32(norm_b), f32(skip), wv, bv, dh, packed,
        u, v if v is not None else u, part, S, inner, DH, h.stride(0), h.stride(1), h.stride(2), xz.stride(0),
        xz.stride(1), ln_eps, KS=conv_w.shape[-1], BT=bt, BC=_block_c(DH, bc), BS=bs, WITH_V=v is not None,
        num_warps=warps)
    d_nw, d_nb, d_skip = part.sum(1)                                         # (I,) each
    return dh.view(B, S, NH, DH).transpose(1, 2), packed, u, d_nw, d_nb, d_skip, v


def cast_colsum(x: torch.Tensor, dtype: torch.dtype, config: tuple | None = None,
                scale: torch.Tensor | None = None):
    """x (N, D) on CUDA -> (x in dtype, its column sums (D,) float32) in one read of x: the down-projection's
    output gradient for its GEMMs in the activations' dtype, and its bias gradient. scale (G,): row r is first
    multiplied in float32 by scale[r // (N / G)] (drop-path's per-sample scale: G samples of N / G tokens).
    config: (elements per tile, warps, tiles per program), default `CAST_CONFIG`."""
    N, D = x.shape
    elements, warps, iters = config or CAST_CONFIG
    bd = triton.next_power_of_2(D)
    rows = max(1, elements // bd)
    programs = triton.cdiv(N, rows * iters)
    x = x.contiguous()
    if scale is not None and (scale.numel() == 0 or N % scale.numel()):
        raise ValueError(f"cast_colsum: {N} rows do not split into {scale.numel()} equal groups of the scale")
    sc = x if scale is None else scale.reshape(-1).float().contiguous()     # unused without a scale
    group = 1 if scale is None else N // scale.numel()
    y = torch.empty(N, D, device=x.device, dtype=dtype)
    part = torch.empty(programs, D, device=x.device, dtype=torch.float32)
    _cast_colsum_kernel[(programs,)](x, sc, y, part, N, D, iters, group, ROWS=rows, BD=bd,
                                     SCALED=scale is not None, num_warps=warps)
    return y, part.sum(0)


def pre_config(inner: int) -> tuple:
    """`_pre_grad_kernel`'s (BLOCK_T, BLOCK_C, warps) for a block of inner width I."""
    return PRE_CONFIG_NARROW if inner <= 384 else PRE_CONFIG


def pre_grad(dq, dk, dv, dg, packed, xz, conv_w, conv_b, wq, wk, wv, w_c, w_m, config: tuple | None = None,
             dxm_config: tuple | None = None):
    """Gradients of the block's pre-cell step (module docstring), joined with the post tail's `packed` [dx_c, dz].

    dq, dk, dv (B, S, I), dg (B, S, G), packed and xz (B, S, 2I), conv_w (I, 1, K), wq/wk/wv (nb, bs, bs),
    w_c/w_m (G, I) -> dxz (B, S, 2I) (`packed`, its left half overwritten with dx_m), x_c (B, S, I) in xz's dtype,
    and in float32 d conv_w (I, 1, K), d conv_b, d bq, d bk, d bv (I,) and the gate bias's d b (G,) (dg's column
    sums). All column sums come from one float32 buffer of per-image partials (both kernels write into it), reduced
    by one sum. config/dxm_config: (BLOCK_T, BLOCK_C, warps) of the two kernels, default `pre_config(I)`/`DXM_CONFIG`."""
    B, S, two_i = xz.shape
    inner, K, G = two_i // 2, conv_w.shape[-1], dg.shape[-1]
    kp = triton.next_power_of_2(K)
    dq, dk, dv, dg, packed = (t.contiguous() for t in (dq, dk, dv, dg, packed))
    dy = torch.empty(B, S, inner, device=xz.device, dtype=xz.dtype)
    x_c = torch.empty(B, S, inner, device=xz.device, dtype=xz.dtype)
    part = torch.empty(B, 5 + kp, inner, device=xz.device, dtype=torch.float32)  # q, k, y, taps, v, gates (G <= I)
    f32 = lambda t: t.detach().float().contiguous()
    wt = lambda w: w.detach().transpose(1, 2).float().contiguous()           # (nb, in, out): the transposed map
    low = lambda w: w.detach().to(dg.dtype).contiguous()                     # gate GEMMs in the activations' dtype
    cw = f32(conv_w)
    meta = lambda cfg: dict(BS=wq.shape[-1], BT=cfg[0], BC=_block_c(inner, cfg[1]), GP=MAX_GATES,
                            IEEE=xz.dtype == torch.float32, num_warps=cfg[2])
    m1, m2 = meta(config or pre_config(inner)), meta(dxm_config or DXM_CONFIG)
    _pre_grad_kernel[(B, inner // m1["BC"])](
        dq, dk, dg, packed, xz, cw, f32(conv_b), wt(wq), wt(wk), low(w_c), dy, x_c, part,
        S, inner, G, xz.stride(0), xz.stride(1), part.stride(0), KS=K, KP=kp, **m1)
    _pre_dxm_kernel[(B, inner // m2["BC"])](
        dv, dg, dy, cw, wt(wv), low(w_m), packed, part[:, 3 + kp], S, inner, G, packed.stride(0),
        packed.stride(1), part.stride(0), KS=K, **m2)
    sums = part.sum(0)                                                       # (5 + kp, I)
    d_conv_w = sums[3:3 + K].flip(0).t().contiguous().unsqueeze(1)           # (I, 1, K): row s is tap K-1-s
    return packed, x_c, d_conv_w, sums[2], sums[0], sums[1], sums[3 + kp], sums[4 + kp, :G]


__all__ = ["cast_colsum", "post_fwd", "post_grad", "pre_config", "pre_grad", "supports", "POST_CONFIG",
           "POST_FWD_CONFIG", "PRE_CONFIG", "PRE_CONFIG_NARROW", "DXM_CONFIG", "CAST_CONFIG"]
