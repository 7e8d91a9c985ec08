"""The ViL block's pre-LayerNorm for training in Triton: the token reorder in its loads, no output kept.

A block in training computes, on the reordered residual stream xr = x[:, order] (order: a permutation of the
tokens, (S,) shared or (B, S) per sample, or none),

    xn = LayerNorm(xr) w + b  (float32 math, rounded once to the activations' dtype),  xz = xn W_up^T + b_up
    out = xr + branch(xz)

* `layer_norm` writes xn and the row statistics (mean, rstd) (B*S,) float32, reading x's rows through `order`:
  no (B, S, D) copy of x[:, order] is made.
* `layer_norm_grad` takes dxn = dxz W_up and the residual's gradient dres = d out (both in the block's token
  order) and writes dx[:, order] = dres + LayerNorm backward(dxn) straight into x's rows (a permutation writes
  each row once), plus the normalized rows again as [xhat, 1, 0, ..., 0] of width D + 8 (16-byte aligned). The
  one GEMM m = dxz^T [xhat, 1] then holds every parameter gradient of LayerNorm + up-projection
  (`affine_grads`: weight-sized work), so the kernel is purely per row: no column sums over the tokens, no
  separate reduction of dxz for b_up.

So the block keeps x and two floats per token for its backward instead of x[:, order] and xn, and the gather,
its backward (an index_put into zeros) and the add of the residual's and the norm's gradients are gone.
"""
from __future__ import annotations

import torch

import triton  # imported by the ops' registry only for CUDA inputs; without triton the backend is unavailable
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)          # of xn (the activations)
MAX_DIM = 8192                                              # a row lives in registers
# (elements per row tile, warps) of each kernel, a program per tile of max(1, elements // BLOCK_D) rows: within
# 1 % (backward, ViL-B shapes) and 8 % (forward, ViL-T/S/B) of the fastest in `benchmarks/norm_kernel.py --sweep`
# on an H100 (benchmarks/results/norm_kernel_rowwise_h100.json; the forward ran at (2048, 8) there, 7-11 % slower).
FWD_CONFIG = (2048, 2)
BWD_CONFIG = (2048, 4)


@triton.jit
def _source_rows(IDX, r, r_ok, S, IDX_MODE: tl.constexpr):
    """Rows of x read for output rows r of the (B*S) token order: r itself (IDX_MODE 0), b*S + order[s] for a
    shared order (1), b*S + order[b, s] per sample (2). int64."""
    if IDX_MODE == 0:
        return r.to(tl.int64)
    b = r // S
    if IDX_MODE == 1:
        j = tl.load(IDX + (r - b * S), mask=r_ok, other=0)
    else:
        j = tl.load(IDX + r, mask=r_ok, other=0)
    return b.to(tl.int64) * S + j.to(tl.int64)


@triton.jit
def _load_rows(X, IDX, r, N, S, D, IDX_MODE: tl.constexpr, BD: tl.constexpr):
    """Rows r (ROWS,) of the token order, read through IDX -> x (ROWS, BD) float32 (0 past D), the rows of x
    they came from (ROWS,), the (ROWS, BD) mask and the (ROWS,) row mask."""
    r_ok = r < N
    src = _source_rows(IDX, r, r_ok, S, IDX_MODE)                           # (ROWS,)
    d = tl.arange(0, BD)
    m = r_ok[:, None] & (d < D)[None, :]                                    # (ROWS, BD)
    x = tl.load(X + src[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    return x, src, m, r_ok


@triton.jit(do_not_specialize=["N", "S"])
def _ln_fwd_kernel(X, IDX, W, Bias, Y, MEAN, RSTD, N, S, D, eps,
                   IDX_MODE: tl.constexpr, ROWS: tl.constexpr, BD: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)                        # (ROWS,) rows of the token order
    x, src, m, r_ok = _load_rows(X, IDX, r, N, S, D, IDX_MODE, BD)         # (ROWS, BD)
    d = tl.arange(0, BD)
    mean = tl.sum(x, 1) / D                                                 # (ROWS,)
    xc = tl.where(m, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
    w = tl.load(W + d, mask=d < D, other=0.0)[None, :]
    y = xc * rstd[:, None] * w + tl.load(Bias + d, mask=d < D, other=0.0)[None, :]
    tl.store(Y + r.to(tl.int64)[:, None] * D + d[None, :], y.to(Y.dtype.element_ty), mask=m)
    tl.store(MEAN + r, mean, mask=r_ok)
    tl.store(RSTD + r, rstd, mask=r_ok)


@triton.jit(do_not_specialize=["N", "S"])
def _ln_bwd_kernel(X, IDX, W, DY, DRES, MEAN, RSTD, DX, Y, N, S, D, YS,
                   IDX_MODE: tl.constexpr, HAS_RES: tl.constexpr, ROWS: tl.constexpr, BD: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)                        # (ROWS,) rows of the token order
    r_ok = r < N
    d = tl.arange(0, BD)
    m = r_ok[:, None] & (d < D)[None, :]                                    # (ROWS, BD)
    out = r.to(tl.int64)[:, None] * D + d[None, :]
    dy = tl.load(DY + out, mask=m, other=0.0).to(tl.float32)               # (ROWS, BD) d xn
    if HAS_RES:
        dres = tl.load(DRES + out, mask=m, other=0.0).to(tl.float32)
    x, src, m, r_ok = _load_rows(X, IDX, r, N, S, D, IDX_MODE, BD)         # (ROWS, BD)
    mean = tl.load(MEAN + r, mask=r_ok, other=0.0)
    rstd = tl.load(RSTD + r, mask=r_ok, other=0.0)
    xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
    y = xhat + tl.where(d == D, 1.0, 0.0)[None, :]                          # [xhat, 1, 0...] up to the row stride YS
    tl.store(Y + r.to(tl.int64)[:, None] * YS + d[None, :], y.to(Y.dtype.element_ty),
             mask=r_ok[:, None] & (d < YS)[None, :])
    wdy = dy * tl.load(W + d, mask=d < D, other=0.0)[None, :]
    c_1 = tl.sum(xhat * wdy, 1) / D                                         # (ROWS,)
    c_2 = tl.sum(wdy, 1) / D
    dx = (wdy - xhat * c_1[:, None] - c_2[:, None]) * rstd[:, None]
    if HAS_RES:
        dx += dres
    tl.store(DX + src[:, None] * D + d[None, :], dx.to(DX.dtype.element_ty), mask=m)


def supports(x: torch.Tensor, order: torch.Tensor | None, out_dtype: torch.dtype) -> bool:
    """CUDA x (B, S, D) contiguous, D <= `MAX_DIM`, xn in fp16/bf16, order None, (S,) or (B, S) on x's device."""
    if not (isinstance(x, torch.Tensor) and x.is_cuda and x.dim() == 3 and x.is_contiguous()
            and out_dtype in SUPPORTED_DTYPES and x.shape[-1] <= MAX_DIM and x.numel() < 2 ** 31):
        return False
    if order is None:
        return True
    return (order.device == x.device and not order.is_floating_point() and order.shape[-1] == x.shape[1]
            and (order.dim() == 1 or (order.dim() == 2 and order.shape[0] == x.shape[0])))


ONES_PAD = 8                # the ones column and zeros after it: rows of D + 8 bf16 stay 16-byte aligned


def _layout(x: torch.Tensor, order: torch.Tensor | None, width: int, elements: int):
    """(index tensor, IDX_MODE, row tile BLOCK_D >= width, rows per tile) for x (B, S, D): tiles of about
    `elements`."""
    bd = triton.next_power_of_2(width)
    rows = max(1, min(16, elements // bd))
    if order is None:
        return x, 0, bd, rows                                               # IDX unused
    return order.contiguous(), order.dim(), bd, rows


def layer_norm(x: torch.Tensor, order: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               out_dtype: torch.dtype, config: tuple | None = None):
    """x (B, S, D) -> LayerNorm(x[:, order]) (B, S, D) in out_dtype, mean and rstd (B*S,) float32.
    config: `FWD_CONFIG` by default."""
    B, S, D = x.shape
    elements, warps = config or FWD_CONFIG
    idx, mode, bd, rows = _layout(x, order, D, elements)
    y = torch.empty(B, S, D, device=x.device, dtype=out_dtype)
    mean = torch.empty(B * S, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    f32 = lambda t: t.detach().float().contiguous()
    _ln_fwd_kernel[(triton.cdiv(B * S, rows),)](x, idx, f32(weight), f32(bias), y, mean, rstd, B * S, S, D, eps,
                                                IDX_MODE=mode, ROWS=rows, BD=bd, num_warps=warps)
    return y, mean, rstd


def layer_norm_grad(x, order, weight, dy, dres, mean, rstd, out_dtype: torch.dtype, config: tuple | None = None):
    """Backward of `layer_norm` with the residual's gradient joined in (module docstring).

    x (B, S, D), dy = d xn (B, S, D) and dres (B, S, D) or None, both in the token order -> dx (B, S, D) in x's
    dtype and layout, and the normalized rows recomputed as [xhat, 1, 0, ...] (B*S, D + `ONES_PAD`) in
    out_dtype, from which `affine_grads` takes the parameters' gradients. config: `BWD_CONFIG` by default."""
    B, S, D = x.shape
    width = D + ONES_PAD
    elements, warps = config or BWD_CONFIG
    idx, mode, bd, rows = _layout(x, order, width, elements)
    dx = torch.empty_like(x)                                                # every row written once
    y = torch.empty(B * S, width, device=x.device, dtype=out_dtype)
    dy = dy.contiguous()
    has_res = dres is not None
    dres = dres.contiguous() if has_res else dy                             # DRES unused without it
    _ln_bwd_kernel[(triton.cdiv(B * S, rows),)](x, idx, weight.detach().float().contiguous(), dy, dres, mean, rstd,
                                                dx, y, B * S, S, D, width, IDX_MODE=mode, HAS_RES=has_res,
                                                ROWS=rows, BD=bd, num_warps=warps)
    return dx, y


def affine_grads(m: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, up_w: torch.Tensor):
    """Gradients of xz = (xhat w + b) W_up^T + b_up's parameters from m = dxz^T [xhat, 1] (2I, D + `ONES_PAD`)
    (one GEMM on `layer_norm_grad`'s rows), all float32: d W_up (2I, D), d b_up (2I,), d w, d b (D,).

    With cs = dxz's column sums (m's column D) and m_hat = dxz^T xhat: d W_up = m_hat w + cs b^T,
    d b_up = cs, d w = sum_j W_up[j] m_hat[j] (= sum over tokens of d xn xhat), d b = sum_j cs[j] W_up[j]
    (= sum of d xn). Weight-sized work instead of per-token column sums in the LayerNorm kernel."""
    D = up_w.shape[1]
    m_hat, cs, w_up = m[:, :D].float(), m[:, D].float(), up_w.float()      # (2I, D), (2I,), (2I, D)
    return (m_hat * weight.float() + cs[:, None] * bias.float(), cs, (m_hat * w_up).sum(0),
            (cs[:, None] * w_up).sum(0))


__all__ = ["layer_norm", "layer_norm_grad", "affine_grads", "supports", "SUPPORTED_DTYPES", "ONES_PAD",
           "FWD_CONFIG", "BWD_CONFIG"]
