"""Fused causal mLSTM cell in Triton: forward and backward, flash-attention style (no S x S matrix in HBM).

Computes exactly the function of `reference.mlstm_parallel` (see its docstring); `mal.ops.mlstm` registers
it as the "triton" backend of the mlstm op.

Gate algebra (all O(S) per (batch, head), in float32: torch's cumsum for a, the rest one small Triton kernel
each way, a program per row):

    a_t = sum_{s<=t} logsigmoid(f_s)          (log-forget cumsum)
    logD[t, j] = (a_t - a_j) + i_j            (j <= t)
    j*_t = argmax_{j<=t} (i_j - a_j)          (a cummax), so m_t = logD[t, j*_t]

so the row stabilizer is known before the kernel runs and no online rescaling is needed. The kernels tile
queries x keys, recompute P = q k^T / sqrt(DH) and the decay exp((a_t - a_j) + i_j - m_t) per tile (in
torch's order of operations: a_t - a_j first, which stays exact for nearby j even when |a| is in the
thousands), and keep only O(S) per-row statistics (1 / N_t and the sign of the row sum s_t of C) for the
backward.

Backward, with N_t = max(|s_t|, exp(-m_t)) + eps, r_t = 1/N_t, delta_t = dh_t . h_t:

    dN_t = -delta_t r_t,  g_t = dN_t * sign(s_t) [if |s_t| > exp(-m_t), else 0]
    dP_tj = (r_t (dh_t . v_j) + g_t) exp(logD_tj - m_t)              (causal)
    dq = dP k / sqrt(DH),  dk = dP^T q / sqrt(DH),  dv = (C r)^T dh
    dlogD_tj = dP_tj P_tj      -> row sums R_t and column sums K_j from the kernels
    m_t itself carries dm_t = eps * dN_t (the output depends on the stabilizer only through eps); torch's
    amax sends it to the arg-max entry j*_t of row t (the cummax index).
    da = R - K + dm - scatter(dm at j*),  di = K + scatter(dm at j*),  df = revcumsum(da) * sigmoid(-f).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import triton  # imported by the ops' registry only for CUDA inputs; without triton the backend is unavailable
import triton.language as tl

from .reference import EPS

MIN_HEAD_DIM = 16          # tl.dot needs every dimension >= 16
MAX_HEAD_DIM = 512         # one padded head-dim tile of 512 still fits in registers/shared memory
MAX_SEQ_LEN = 16384        # the kernel has no hard limit; this keeps int32 row indices far from overflow
STATS_MAX_SEQ = 4096       # the O(S) gate kernels hold one (batch, head) row in registers; longer rows use torch
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Backward: recompute delta_t = dh_t . h_t from the fp32 tiles (one more q k^T, dh v^T pass in the dq kernel)
# instead of from the stored low-precision output. Costs ~2 of ~9 tile products; keeps di/df/dq/dk as accurate
# as torch's when one key dominates a row (large gates), where dlogD cancels.
EXACT_DELTA = True
# Cover a head dim of 3 * 2^n with two power-of-two column tiles instead of one padded tile (`_d_chunks`).
SPLIT_HEAD_DIM = True


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _decay(causal, a_row, a_col, i_col, m_row):
    """exp(logD - m) on the causal part, 0 elsewhere; logD - m in torch's order: (a_t - a_j) + i_j - m_t."""
    log_d = ((a_row - a_col) + i_col) - m_row
    return tl.where(causal, tl.exp(tl.where(causal, log_d, 0.0)), 0.0)


@triton.jit
def _head(X, pid_bh, NH, sb, sh):
    """Pointer to head pid_bh % NH of image pid_bh // NH of a (B, NH, ...) tensor with strides sb, sh."""
    return X + (pid_bh // NH).to(tl.int64) * sb + (pid_bh % NH).to(tl.int64) * sh


@triton.jit
def _qkv_heads(Q, K, V, pid_bh, NH, sqb, sqh, skb, skh, svb, svh):
    """Pointers to one (batch, head) of q, k and v."""
    return _head(Q, pid_bh, NH, sqb, sqh), _head(K, pid_bh, NH, skb, skh), _head(V, pid_bh, NH, svb, svh)


@triton.jit
def _load_cols(base, offs_r, r_ok, sr, sd, DH, D0: tl.constexpr, BD: tl.constexpr):
    """Rows offs_r, head-dim columns [D0, D0 + BD) of one head (columns past DH read as 0)."""
    offs_d = D0 + tl.arange(0, BD)                                            # (BD,)
    return tl.load(base + offs_r[:, None] * sr + offs_d[None, :] * sd,
                   mask=r_ok[:, None] & (offs_d < DH)[None, :], other=0.0)    # (R, BD)


@triton.jit
def _load_cols2(base, offs_r, r_ok, sr, sd, DH, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """Rows of the head dims [0, BLOCK_D) and, when BLOCK_D2 > 0, [BLOCK_D, BLOCK_D + BLOCK_D2) (else the first
    tile again, unused): (R, BLOCK_D), (R, BLOCK_D2)."""
    x = _load_cols(base, offs_r, r_ok, sr, sd, DH, 0, BLOCK_D)
    x2 = x
    if BLOCK_D2 > 0:
        x2 = _load_cols(base, offs_r, r_ok, sr, sd, DH, BLOCK_D, BLOCK_D2)
    return x, x2


@triton.jit
def _store_cols(base, x, offs_r, r_ok, sr, sd, DH, D0: tl.constexpr, BD: tl.constexpr):
    """Store x (R, BD) into rows offs_r, columns [D0, D0 + BD) of one head, in the pointer's dtype."""
    offs_d = D0 + tl.arange(0, BD)                                            # (BD,)
    tl.store(base + offs_r[:, None] * sr + offs_d[None, :] * sd, x.to(base.dtype.element_ty),
             mask=r_ok[:, None] & (offs_d < DH)[None, :])


@triton.jit
def _store_cols2(base, x, x2, offs_r, r_ok, sr, sd, DH, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """Store the head dims [0, BLOCK_D) from x and, when BLOCK_D2 > 0, [BLOCK_D, BLOCK_D + BLOCK_D2) from x2."""
    _store_cols(base, x, offs_r, r_ok, sr, sd, DH, 0, BLOCK_D)
    if BLOCK_D2 > 0:
        _store_cols(base, x2, offs_r, r_ok, sr, sd, DH, BLOCK_D, BLOCK_D2)


@triton.jit
def _store_out(o_base, Rinv, Sgn, vec, acc, acc2, row_sum, m_row, offs_m, row_ok, sos, sod, DH, eps,
               BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """The end of a forward kernel: h = acc / N_t with N_t = max(|s_t|, exp(-m_t)) + eps (acc2: the head dims past
    BLOCK_D); for the backward 1 / N_t, and sign(s_t) where |s_t| is the max (0 where the floor is)."""
    floor = tl.exp(-m_row)
    norm = tl.maximum(tl.abs(row_sum), floor) + eps                           # (BM,) N_t
    _store_cols2(o_base, acc / norm[:, None], acc2 / norm[:, None], offs_m, row_ok, sos, sod, DH, BLOCK_D, BLOCK_D2)
    sgn = tl.where(row_sum > 0, 1.0, tl.where(row_sum < 0, -1.0, 0.0))
    tl.store(Rinv + vec + offs_m, 1.0 / norm, mask=row_ok)
    tl.store(Sgn + vec + offs_m, tl.where(tl.abs(row_sum) > floor, sgn, 0.0), mask=row_ok)


@triton.jit
def _dot_acc2(c, x, x2, acc, acc2, BLOCK_D2: tl.constexpr, IEEE: tl.constexpr):
    """acc += c @ x and, for the head dims past BLOCK_D, acc2 += c @ x2."""
    acc = _dot_acc(c, x, acc, IEEE)
    if BLOCK_D2 > 0:
        acc2 = _dot_acc(c, x2, acc2, IEEE)
    return acc, acc2


@triton.jit
def _acc_dkdv(ct, dpt, q, q2, do, do2, dk, dv, dk2, dv2, BLOCK_D2: tl.constexpr, IEEE: tl.constexpr):
    """One tile's terms of a key block's gradients: dv += (C / N)^T dh, dk += dP^T q (both head-dim chunks)."""
    dv, dv2 = _dot_acc2(ct, do, do2, dv, dv2, BLOCK_D2, IEEE)
    dk, dk2 = _dot_acc2(dpt, q, q2, dk, dk2, BLOCK_D2, IEEE)
    return dk, dv, dk2, dv2


@triton.jit
def _store_dkdv(DK, DV, pid_bh, NH, skb, skh, sks, skd, svb, svh, svs, svd, DH, scale, dk, dv, dk2, dv2, offs_n,
                col_ok, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """The end of a dk / dv kernel: a key block's dk (times the key scale) and dv, in k's and v's strides; dk2 and
    dv2 hold the head dims past BLOCK_D when BLOCK_D2 > 0."""
    dk_base = _head(DK, pid_bh, NH, skb, skh)
    dv_base = _head(DV, pid_bh, NH, svb, svh)
    _store_cols2(dk_base, dk * scale, dk2 * scale, offs_n, col_ok, sks, skd, DH, BLOCK_D, BLOCK_D2)
    _store_cols2(dv_base, dv, dv2, offs_n, col_ok, svs, svd, DH, BLOCK_D, BLOCK_D2)


@triton.jit
def _dot_nt(a, b, acc, IEEE: tl.constexpr):
    """acc + a (M, D) @ b (N, D)^T -> (M, N) in float32 (acc may be None)."""
    if IEEE:
        return tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(b), acc)


@triton.jit
def _dot_acc(c, x, acc, IEEE: tl.constexpr):
    """acc + c (M, N) float32 @ x (N, D) -> (M, D) float32; c is rounded to x's dtype on the tensor-core path."""
    if IEEE:
        return tl.dot(c, x.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(c.to(x.dtype), x, acc)


@triton.jit
def _tile_products(a, a2, b, b2, c_base, d_base, offs, ok, scs, scd, sds, sdd, DH,
                   BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, IEEE: tl.constexpr):
    """Load rows `offs` of c and d in both column tiles and return them with a c^T and b d^T over the head dim:
    a, b (R, BD) [a2, b2 (R, BD2)] resident -> c, c2, d, d2, a c^T (R, T), b d^T (R, T) for T = len(offs)."""
    c = _load_cols(c_base, offs, ok, scs, scd, DH, 0, BLOCK_D)               # (T, BD)
    d = _load_cols(d_base, offs, ok, sds, sdd, DH, 0, BLOCK_D)               # (T, BD)
    ac = _dot_nt(a, c, None, IEEE)                                            # (R, T)
    bd = _dot_nt(b, d, None, IEEE)                                            # (R, T)
    c2, d2 = c, d
    if BLOCK_D2 > 0:
        c2 = _load_cols(c_base, offs, ok, scs, scd, DH, BLOCK_D, BLOCK_D2)  # (T, BD2)
        d2 = _load_cols(d_base, offs, ok, sds, sdd, DH, BLOCK_D, BLOCK_D2)  # (T, BD2)
        ac = _dot_nt(a2, c2, ac, IEEE)
        bd = _dot_nt(b2, d2, bd, IEEE)
    return c, c2, d, d2, ac, bd


@triton.jit
def _dq_tile(q, q2, do, do2, k_base, v_base, A, Ig, vec_base, offs_m, row_ok, a_row, m_row, start_n, S, DH,
             sks, skd, svs, svd, scale,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, IEEE: tl.constexpr):
    """For one key tile of a query block: k (BN, BD) [+ k2 (BN, BD2)], P = q k^T * scale, dh v^T, decay (BM, BN)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)                                  # (BN,)
    col_ok = offs_n < S
    k, k2, v, v2, p, dov = _tile_products(q, q2, do, do2, k_base, v_base, offs_n, col_ok, sks, skd, svs, svd, DH,
                                          BLOCK_D, BLOCK_D2, IEEE)           # p, dov (BM, BN)
    p = p * scale
    a_col = tl.load(A + vec_base + offs_n, mask=col_ok, other=0.0)            # (BN,)
    i_col = tl.load(Ig + vec_base + offs_n, mask=col_ok, other=0.0)           # (BN,)
    causal = (offs_n[None, :] <= offs_m[:, None]) & col_ok[None, :] & row_ok[:, None]  # (BM, BN)
    decay = _decay(causal, a_row[:, None], a_col[None, :], i_col[None, :], m_row[:, None])  # (BM, BN)
    return k, k2, p, dov, decay


@triton.jit
def _query_rows(pid_m, S, BLOCK_M: tl.constexpr):
    """Query block pid_m of a row, the blocks aligned to the row's end: the partial block is the first, whose
    queries see the fewest keys, so a length that is not a multiple of BLOCK_M costs a short block, not a long one.
    -> rows (BM,) (negative rows are padding), row_ok, and the causal end of the block's keys."""
    first = pid_m * BLOCK_M - (tl.cdiv(S, BLOCK_M) * BLOCK_M - S)             # the padding sits before row 0
    offs_m = first + tl.arange(0, BLOCK_M)                                    # (BM,)
    return offs_m, offs_m >= 0, first + BLOCK_M


@triton.jit(do_not_specialize=["S"])
def _mlstm_fwd_kernel(
    Q, K, V, A, Ig, Mlog, O, Rinv, Sgn,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
    NH, S, DH, scale, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One program = one query block of one (batch, head): h = (C @ V) / (max(|rowsum C|, exp(-m)) + eps)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    q_base, k_base, v_base = _qkv_heads(Q, K, V, pid_bh, NH, sqb, sqh, skb, skh, svb, svh)
    o_base = _head(O, pid_bh, NH, sob, soh)
    vec_base = pid_bh.to(tl.int64) * S                                      # (B, NH, S) vectors are contiguous

    offs_m, row_ok, hi = _query_rows(pid_m, S, BLOCK_M)                      # (BM,), (BM,), causal end
    q = _load_cols(q_base, offs_m, row_ok, sqs, sqd, DH, 0, BLOCK_D)         # (BM, BD)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)                      # (BM, BD) sum_j C v_j
    acc2 = acc                                                                # unused without a second chunk
    if BLOCK_D2 > 0:
        q2 = _load_cols(q_base, offs_m, row_ok, sqs, sqd, DH, BLOCK_D, BLOCK_D2)  # (BM, BD2)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)               # (BM, BD2)
    a_row = tl.load(A + vec_base + offs_m, mask=row_ok, other=0.0)            # (BM,) log-forget cumsum a_t
    m_row = tl.load(Mlog + vec_base + offs_m, mask=row_ok, other=0.0)         # (BM,) stabilizer m_t

    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)                           # (BM,) sum_j C
    for start_n in range(0, hi, BLOCK_N):                                     # causal: no key past the block
        offs_n = start_n + tl.arange(0, BLOCK_N)                              # (BN,)
        col_ok = offs_n < S
        k = _load_cols(k_base, offs_n, col_ok, sks, skd, DH, 0, BLOCK_D)     # (BN, BD)
        v = _load_cols(v_base, offs_n, col_ok, svs, svd, DH, 0, BLOCK_D)     # (BN, BD)
        p = _dot_nt(q, k, None, IEEE)                                         # (BM, BN)
        if BLOCK_D2 > 0:
            k2 = _load_cols(k_base, offs_n, col_ok, sks, skd, DH, BLOCK_D, BLOCK_D2)  # (BN, BD2)
            p = _dot_nt(q2, k2, p, IEEE)
        p = p * scale
        a_col = tl.load(A + vec_base + offs_n, mask=col_ok, other=0.0)        # (BN,)
        i_col = tl.load(Ig + vec_base + offs_n, mask=col_ok, other=0.0)       # (BN,)
        causal = (offs_n[None, :] <= offs_m[:, None]) & col_ok[None, :] & row_ok[:, None]  # (BM, BN)
        decay = _decay(causal, a_row[:, None], a_col[None, :], i_col[None, :], m_row[:, None])  # (BM, BN)
        c = p * decay                                                         # (BM, BN)
        row_sum += tl.sum(c, axis=1)
        acc = _dot_acc(c, v, acc, IEEE)
        if BLOCK_D2 > 0:
            v2 = _load_cols(v_base, offs_n, col_ok, svs, svd, DH, BLOCK_D, BLOCK_D2)  # (BN, BD2)
            acc2 = _dot_acc(c, v2, acc2, IEEE)

    _store_out(o_base, Rinv, Sgn, vec_base, acc, acc2, row_sum, m_row, offs_m, row_ok, sos, sod, DH, eps, BLOCK_D,
               BLOCK_D2)


@triton.jit(do_not_specialize=["S"])
def _mlstm_bwd_dq_kernel(
    Q, K, V, O, DO, A, Ig, Mlog, Rinv, Sgn, DQ, DN, RowG,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
    sdob, sdoh, sdos, sdod,
    NH, S, DH, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    IEEE: tl.constexpr, EXACT_DELTA: tl.constexpr,
):
    """One program = one query block: dq, the row sums of dlogD, and dN_t = -(dh_t . h_t) / N_t."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    q_base, k_base, v_base = _qkv_heads(Q, K, V, pid_bh, NH, sqb, sqh, skb, skh, svb, svh)
    o_base = _head(O, pid_bh, NH, sob, soh)
    do_base = _head(DO, pid_bh, NH, sdob, sdoh)
    vec_base = pid_bh.to(tl.int64) * S

    offs_m, row_ok, hi = _query_rows(pid_m, S, BLOCK_M)                      # (BM,), (BM,), causal end
    q, q2 = _load_cols2(q_base, offs_m, row_ok, sqs, sqd, DH, BLOCK_D, BLOCK_D2)      # (BM, BD), (BM, BD2)
    do, do2 = _load_cols2(do_base, offs_m, row_ok, sdos, sdod, DH, BLOCK_D, BLOCK_D2)
    a_row = tl.load(A + vec_base + offs_m, mask=row_ok, other=0.0)            # (BM,)
    m_row = tl.load(Mlog + vec_base + offs_m, mask=row_ok, other=0.0)         # (BM,)
    r = tl.load(Rinv + vec_base + offs_m, mask=row_ok, other=0.0)             # (BM,) 1 / N_t
    sgn = tl.load(Sgn + vec_base + offs_m, mask=row_ok, other=0.0)            # (BM,) d|s|/ds on the |s| branch
    if EXACT_DELTA:
        # delta_t = r_t sum_j (dh_t . v_j) C_tj from the same fp32 tiles the gradient uses, so that the
        # cancellation in dlogD (exact when one key dominates a row) is exact here too.
        u = tl.zeros([BLOCK_M], dtype=tl.float32)                             # (BM,)
        for start_n in range(0, hi, BLOCK_N):
            k, k2, p, dov, decay = _dq_tile(q, q2, do, do2, k_base, v_base, A, Ig, vec_base, offs_m, row_ok,
                                            a_row, m_row, start_n, S, DH, sks, skd, svs, svd, scale,
                                            BLOCK_N, BLOCK_D, BLOCK_D2, IEEE)
            u += tl.sum(dov * p * decay, axis=1)
        delta = u * r                                                         # (BM,)
    else:
        o = _load_cols(o_base, offs_m, row_ok, sos, sod, DH, 0, BLOCK_D)     # (BM, BD)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)         # (BM,) dh_t . h_t
        if BLOCK_D2 > 0:
            o2 = _load_cols(o_base, offs_m, row_ok, sos, sod, DH, BLOCK_D, BLOCK_D2)  # (BM, BD2)
            delta += tl.sum(do2.to(tl.float32) * o2.to(tl.float32), axis=1)
    dn = -delta * r                                                           # (BM,)
    g = dn * sgn                                                              # (BM,)
    tl.store(DN + vec_base + offs_m, dn, mask=row_ok)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)                       # (BM, BD)
    dq2 = dq                                                                  # unused without a second chunk
    if BLOCK_D2 > 0:
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)                 # (BM, BD2)
    row_g = tl.zeros([BLOCK_M], dtype=tl.float32)                             # (BM,) row sums of dP * P
    for start_n in range(0, hi, BLOCK_N):
        k, k2, p, dov, decay = _dq_tile(q, q2, do, do2, k_base, v_base, A, Ig, vec_base, offs_m, row_ok,
                                        a_row, m_row, start_n, S, DH, sks, skd, svs, svd, scale,
                                        BLOCK_N, BLOCK_D, BLOCK_D2, IEEE)
        dp = (r[:, None] * dov + g[:, None]) * decay                          # (BM, BN) dL/dP
        row_g += tl.sum(dp * p, axis=1)
        dq, dq2 = _dot_acc2(dp, k, k2, dq, dq2, BLOCK_D2, IEEE)
    _store_cols2(_head(DQ, pid_bh, NH, sqb, sqh), dq * scale, dq2 * scale, offs_m, row_ok, sqs, sqd, DH, BLOCK_D,
                 BLOCK_D2)                                                    # dq has q's strides
    tl.store(RowG + vec_base + offs_m, row_g, mask=row_ok)


@triton.jit(do_not_specialize=["S"])
def _mlstm_bwd_dkdv_kernel(
    Q, K, V, DO, A, Ig, Mlog, Rinv, Gn, DK, DV, ColG,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdob, sdoh, sdos, sdod,
    NH, S, DH, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One program = one key block: dk, dv and the column sums of dlogD, looping over later query blocks."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    q_base, k_base, v_base = _qkv_heads(Q, K, V, pid_bh, NH, sqb, sqh, skb, skh, svb, svh)
    do_base = _head(DO, pid_bh, NH, sdob, sdoh)
    vec_base = pid_bh.to(tl.int64) * S

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)                                  # (BN,)
    col_ok = offs_n < S
    k = _load_cols(k_base, offs_n, col_ok, sks, skd, DH, 0, BLOCK_D)         # (BN, BD)
    v = _load_cols(v_base, offs_n, col_ok, svs, svd, DH, 0, BLOCK_D)         # (BN, BD)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)                       # (BN, BD)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)                       # (BN, BD)
    k2, v2, dk2, dv2 = k, v, dk, dv                                           # unused without a second chunk
    if BLOCK_D2 > 0:
        k2 = _load_cols(k_base, offs_n, col_ok, sks, skd, DH, BLOCK_D, BLOCK_D2)  # (BN, BD2)
        v2 = _load_cols(v_base, offs_n, col_ok, svs, svd, DH, BLOCK_D, BLOCK_D2)  # (BN, BD2)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)                # (BN, BD2)
        dv2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)                # (BN, BD2)
    a_col = tl.load(A + vec_base + offs_n, mask=col_ok, other=0.0)            # (BN,)
    i_col = tl.load(Ig + vec_base + offs_n, mask=col_ok, other=0.0)           # (BN,)

    col_g = tl.zeros([BLOCK_N], dtype=tl.float32)                             # (BN,) column sums of dP * P
    for start_m in range(start_n, S, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)                              # (BM,)
        row_ok = offs_m < S
        q, q2, do, do2, pt, dovt = _tile_products(k, k2, v, v2, q_base, do_base, offs_m, row_ok, sqs, sqd,
                                                  sdos, sdod, DH, BLOCK_D, BLOCK_D2, IEEE)  # P^T/scale, (dh v^T)^T
        pt = pt * scale                                                       # (BN, BM)
        a_row = tl.load(A + vec_base + offs_m, mask=row_ok, other=0.0)        # (BM,)
        m_row = tl.load(Mlog + vec_base + offs_m, mask=row_ok, other=0.0)     # (BM,)
        r = tl.load(Rinv + vec_base + offs_m, mask=row_ok, other=0.0)         # (BM,)
        g = tl.load(Gn + vec_base + offs_m, mask=row_ok, other=0.0)           # (BM,)
        causal = (offs_n[:, None] <= offs_m[None, :]) & row_ok[None, :]       # (BN, BM)
        decay = _decay(causal, a_row[None, :], a_col[:, None], i_col[:, None], m_row[None, :])  # (BN, BM)
        ct = pt * decay * r[None, :]                                          # (BN, BM) (C / N)^T
        dpt = (r[None, :] * dovt + g[None, :]) * decay                        # (BN, BM) dL/dP^T
        col_g += tl.sum(dpt * pt, axis=1)
        dk, dv, dk2, dv2 = _acc_dkdv(ct, dpt, q, q2, do, do2, dk, dv, dk2, dv2, BLOCK_D2, IEEE)
    _store_dkdv(DK, DV, pid_bh, NH, skb, skh, sks, skd, svb, svh, svs, svd, DH, scale, dk, dv, dk2, dv2, offs_n,
                col_ok, BLOCK_D, BLOCK_D2)
    tl.store(ColG + vec_base + offs_n, col_g, mask=col_ok)


@triton.jit
def _later_max(k1, j1, a1, i1, k2, j2, a2, i2):
    """Scan step of a running arg-max carrying (a, i) at the arg-max; ties go to the later index (torch.cummax)."""
    right = k2 >= k1
    return tl.where(right, k2, k1), tl.where(right, j2, j1), tl.where(right, a2, a1), tl.where(right, i2, i1)


@triton.jit
def _minimum(x, y):
    return tl.minimum(x, y)


@triton.jit
def _sum2(s1, c1, s2, c2):
    """Scan step of a compensated float32 sum (value s, error c): TwoSum keeps each addition's rounding."""
    s = s1 + s2
    t = s - s1
    return s, c1 + c2 + ((s1 - (s - t)) + (s2 - t))


@triton.jit
def _segment_sum2(s1, c1, f1, s2, c2, f2):
    """Scan step of a compensated sum restarted where the flag f is set (a segment's first element)."""
    s, c = _sum2(s1, c1, s2, c2)
    return tl.where(f2 != 0, s2, s), tl.where(f2 != 0, c2, c), f1 | f2


@triton.jit
def _revcumsum2(x):
    """Compensated float32 reverse cumsum of a row (inclusive): close to the exactly rounded suffix sums, so
    no less accurate than torch's flip-cumsum-flip whatever the scan order."""
    s, c = tl.associative_scan((x, tl.zeros_like(x)), 0, _sum2, reverse=True)
    return s + c


@triton.jit
def _row_vec(X, pid_bh, NH, sb, sh, ss, t, ok):
    """Row pid_bh = b * NH + h of a (B, NH, S) tensor with strides (sb, sh, ss), as float32 (0 past S)."""
    return tl.load(_head(X, pid_bh, NH, sb, sh) + t * ss, mask=ok, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["S"])
def _gate_stats_kernel(Ig_in, A, Ig, Arg, Mlog, NH, S, sib, sih, sis, BLOCK: tl.constexpr):
    pid_bh = tl.program_id(0)                                                # one (image, head) row per program
    t = tl.arange(0, BLOCK)                                                  # (BLOCK,) tokens
    ok = t < S
    out = pid_bh.to(tl.int64) * S + t
    ig = _row_vec(Ig_in, pid_bh, NH, sib, sih, sis, t, ok)                   # (BLOCK,)
    a = tl.load(A + out, mask=ok, other=0.0)                                 # log-forget cumsum
    key = tl.where(ok, ig - a, -float("inf"))
    _, arg, a_j, i_j = tl.associative_scan((key, t, a, ig), 0, _later_max)  # running arg-max j*_t, a and i there
    tl.store(Ig + out, ig, mask=ok)
    tl.store(Arg + out, arg, mask=ok)
    tl.store(Mlog + out, (a - a_j) + i_j, mask=ok)                           # logD[t, j*_t], as the tiles form it


@triton.jit(do_not_specialize=["S"])
def _gate_grad_kernel(DN, RowG, ColG, Arg, F_in, DI, DF, NH, S, sfb, sfh, sfs, eps, BLOCK: tl.constexpr):
    pid_bh = tl.program_id(0)
    t = tl.arange(0, BLOCK)                                                  # (BLOCK,) tokens
    ok = t < S
    row = pid_bh.to(tl.int64) * S
    dm = eps * tl.load(DN + row + t, mask=ok, other=0.0)                     # dm_t = eps dN_t
    arg = tl.load(Arg + row + t, mask=ok, other=-1)
    # the rows t with j*_t = j are j and those up to the next running-max record (j*_t is non-decreasing and
    # j*_j = j for a record j): scatter(dm at j*)[j] = sum of dm over [j, next record)
    nxt = t + 1
    rec = tl.load(Arg + row + nxt, mask=nxt < S, other=-1) == nxt            # token t + 1 is a record
    nxt = tl.where(rec | (nxt >= S), nxt, BLOCK)
    nxt = tl.minimum(tl.associative_scan(nxt, 0, _minimum, reverse=True), S)  # first record after t (or S)
    is_rec = (arg == t).to(tl.int32)                                         # segments start at the records
    seg, seg_c, _ = tl.associative_scan((dm, tl.zeros_like(dm), is_rec), 0, _segment_sum2)
    to_argmax = tl.where(ok & (is_rec != 0), tl.gather(seg + seg_c, nxt - 1, 0), 0.0)  # segment totals
    col_g = tl.load(ColG + row + t, mask=ok, other=0.0)
    da = tl.load(RowG + row + t, mask=ok, other=0.0) - col_g + dm - to_argmax  # dL/da
    d_logf = _revcumsum2(da)
    f = _row_vec(F_in, pid_bh, NH, sfb, sfh, sfs, t, ok)
    tl.store(DI + row + t, (col_g + to_argmax).to(DI.dtype.element_ty), mask=ok)
    tl.store(DF + row + t, (d_logf * tl.sigmoid(-f)).to(DF.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------------------

def _block_d(dh: int) -> int:
    """Head dim padded to a power of two: the key of the launch-config tables."""
    return max(MIN_HEAD_DIM, triton.next_power_of_2(dh))


def _d_chunks(dh: int) -> tuple[int, int]:
    """Head-dim column tiles (BLOCK_D, BLOCK_D2): two powers of two covering dh, BLOCK_D2 = 0 for one tile.

    ViL's head dims are 3 * 2^n (96, 192, 384): 64 + 32, 128 + 64, 256 + 128 cover them exactly, where one
    power-of-two tile would spend a quarter of every tile product on zero padding."""
    whole = _block_d(dh)
    lead = max(MIN_HEAD_DIM, 1 << (dh.bit_length() - 1))                    # largest power of two <= dh
    rest = dh - lead
    tail = max(MIN_HEAD_DIM, triton.next_power_of_2(rest)) if rest > 0 else 0
    return (lead, tail) if SPLIT_HEAD_DIM and 0 < tail and lead + tail < whole else (whole, 0)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim, for 2-byte inputs; float32 halves the tiles.
# BLOCK_M tiles queries, BLOCK_N keys. Picked by `benchmarks/mlstm_kernel.py --sweep` (B=128, NH=4, S=197, bf16,
# GPU kernel time; H200 first, 128 and 256 re-swept on the H100 with DH 96 and 192 as two column tiles; at 512
# (DH 384) the H100 sweep's best were within 1 % of these; the forward's 128 entry re-swept on the H200 at B=256
# and S 128, 144, 196 with the query blocks aligned to the row's end: (64, 16) 0.061 / 0.085 / 0.134 ms against
# (64, 32) 0.060 / 0.096 / 0.148); 16..64 keep the earlier 128 entry.
_FWD_CFG = {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2), 128: (64, 16, 4, 2),
            256: (64, 32, 4, 2), 512: (32, 32, 4, 2)}
_BWD_DQ_CFG = {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2), 128: (64, 32, 4, 2),
               256: (64, 32, 4, 2), 512: (16, 32, 4, 2)}
_BWD_DKDV_CFG = {16: (32, 64, 4, 2), 32: (32, 64, 4, 2), 64: (32, 64, 4, 2), 128: (32, 64, 4, 2),
                 256: (64, 32, 4, 2), 512: (32, 16, 4, 2)}
# Register cap (ptx .maxnreg) of the dq kernel per padded head dim, 2-byte inputs. At 512 (DH 384) it uses 186
# registers, so 2 programs fit an SM; capped at 168, 3 do. H100, B=128 S=197, cell fwd+bwd GPU time: DH 384
# 1.115-1.122 vs 1.171-1.181 ms (ViL-B training +1 %), DH 96 (cap 128) 0.385 vs 0.405 ms; at DH 192 every cap
# was slower, and so were caps on the other kernels (docs/fast_path.md, "Launch configurations").
_DQ_MAXNREG = {128: 128, 512: 168}
_MIN_TILE = 16


def _cfg(table: dict, block_d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    bm, bn, warps, stages = table[block_d]
    if dtype == torch.float32 and block_d >= 128:   # 4-byte tiles: halve them to stay inside shared memory
        bm, bn, stages = max(_MIN_TILE, bm // 2), max(_MIN_TILE, bn // 2), 1
    return bm, bn, warps, stages


def _gate_stats(i: torch.Tensor, f: torch.Tensor):
    """O(S) gate algebra in float32: log-forget cumsum a, input gate, row arg-max j* and stabilizer m, each
    (B, NH, S). a is torch's cumsum (the torch backend's exact values: at large gates its rounding dominates
    both backends' error, so sharing it keeps them equal); the rest is one program per (image, head) row
    (`_gate_stats_kernel`) up to `STATS_MAX_SEQ`, else torch.

    m_t = logD[t, j*_t] is evaluated with the same operations as the tiles form logD, so exp(logD - m) <= 1
    exactly; ties of the arg-max go to the later index, as torch.cummax's."""
    B, NH, S = i.shape
    a = torch.cumsum(F.logsigmoid(f.float()), dim=-1).contiguous()          # (B, NH, S)
    if S > STATS_MAX_SEQ:
        ig = i.float().contiguous()                                         # (B, NH, S)
        arg = torch.cummax(ig - a, dim=-1).indices                          # (B, NH, S)
        m = (a - a.gather(-1, arg)) + ig.gather(-1, arg)                    # (B, NH, S)
        return a, ig, arg, m.contiguous()
    ig, m = torch.empty_like(a), torch.empty_like(a)
    arg = torch.empty(B, NH, S, device=i.device, dtype=torch.int32)
    block = triton.next_power_of_2(S)
    _gate_stats_kernel[(B * NH,)](i, a, ig, arg, m, NH, S, *i.stride(), BLOCK=block, num_warps=_row_warps(block))
    return a, ig, arg, m


def _gate_grads(dn, row_g, col_g, arg, f, eps: float, i_dtype: torch.dtype):
    """The cell's gate gradients from the kernels' row/column sums (module docstring): dm = eps dN sent to the
    arg-max entries, da = R - K + dm - scatter(dm at j*), di = K + scatter(dm at j*), df = revcumsum(da)
    sigmoid(-f). dn, row_g, col_g (B, NH, S) float32, arg from `_gate_stats` -> di (i_dtype), df (f's dtype)."""
    B, NH, S = dn.shape
    if S > STATS_MAX_SEQ:
        dm = eps * dn                                                       # (B, NH, S) through the stabilizer
        to_argmax = torch.zeros_like(dm).scatter_add_(-1, arg, dm)          # (B, NH, S)
        da = row_g - col_g + dm - to_argmax                                 # (B, NH, S) dL/da
        di = col_g + to_argmax                                              # (B, NH, S)
        d_logf = da.flip(-1).cumsum(-1).flip(-1)                            # (B, NH, S) reverse cumsum
        return di.to(i_dtype), (d_logf * torch.sigmoid(-f.float())).to(f.dtype)
    di = torch.empty(B, NH, S, device=dn.device, dtype=i_dtype)
    df = torch.empty(B, NH, S, device=dn.device, dtype=f.dtype)
    block = triton.next_power_of_2(S)
    _gate_grad_kernel[(B * NH,)](dn, row_g, col_g, arg, f, di, df, NH, S, *f.stride(), eps, BLOCK=block,
                                 num_warps=_row_warps(block))
    return di, df


def _row_warps(block: int) -> int:
    """Warps of the one-row-per-program O(S) kernels: 8 elements of a row per thread, 1 to 8 warps."""
    return min(8, max(1, block // 256))


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


class _MlstmTriton(torch.autograd.Function):
    """Autograd wrapper: forward keeps q, k, v, output and O(S) row statistics; backward recomputes tiles."""

    @staticmethod
    def forward(ctx, q, k, v, i, f, eps):
        B, NH, S, DH = q.shape
        a, ig, arg, m = _gate_stats(i, f)
        out = torch.empty((B, NH, S, DH), dtype=q.dtype, device=q.device)   # (B, NH, S, DH)
        r, sgn = (torch.empty((B, NH, S), dtype=torch.float32, device=q.device) for _ in range(2))  # 1 / N_t, sign
        block_d, block_d2 = _d_chunks(DH)
        bm, bn, warps, stages = _cfg(_FWD_CFG, _block_d(DH), q.dtype)
        scale = 1.0 / math.sqrt(DH)
        grid = (triton.cdiv(S, bm), B * NH)
        _mlstm_fwd_kernel[grid](
            q, k, v, a, ig, m, out, r, sgn,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            NH, S, DH, scale, eps,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_D2=block_d2, IEEE=q.dtype == torch.float32,
            num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, f, out, a, ig, arg, m, r, sgn)
        ctx.i_dtype = i.dtype
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, f, out, a, ig, arg, m, r, sgn = ctx.saved_tensors
        eps = ctx.eps
        B, NH, S, DH = q.shape
        if dout.dtype != q.dtype:
            dout = dout.to(q.dtype)
        block_d, block_d2 = _d_chunks(DH)
        scale = 1.0 / math.sqrt(DH)
        ieee = q.dtype == torch.float32
        # gradients in the inputs' layouts: for head views of (B, S, I) tensors, autograd then needs no copy
        dq, dk, dv = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in (q, k, v))
        dn = torch.empty((B, NH, S), dtype=torch.float32, device=q.device)  # (B, NH, S) dL/dN
        row_g = torch.empty_like(dn)                                        # (B, NH, S)
        col_g = torch.empty_like(dn)                                        # (B, NH, S)

        bm, bn, warps, stages = _cfg(_BWD_DQ_CFG, _block_d(DH), q.dtype)
        cap = _DQ_MAXNREG.get(_block_d(DH)) if q.dtype != torch.float32 else None
        dq_reg = {} if cap is None else {"maxnreg": cap}
        _mlstm_bwd_dq_kernel[(triton.cdiv(S, bm), B * NH)](
            q, k, v, out, dout, a, ig, m, r, sgn, dq, dn, row_g,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(dout),
            NH, S, DH, scale,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_D2=block_d2, IEEE=ieee, EXACT_DELTA=EXACT_DELTA,
            num_warps=warps, num_stages=stages, **dq_reg)
        g = (dn * sgn).contiguous()                                         # (B, NH, S)
        bm, bn, warps, stages = _cfg(_BWD_DKDV_CFG, _block_d(DH), q.dtype)
        _mlstm_bwd_dkdv_kernel[(triton.cdiv(S, bn), B * NH)](
            q, k, v, dout, a, ig, m, r, g, dk, dv, col_g,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
            NH, S, DH, scale,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_D2=block_d2, IEEE=ieee, num_warps=warps, num_stages=stages)

        di, df = _gate_grads(dn, row_g, col_g, arg, f, eps, ctx.i_dtype)    # (B, NH, S) each
        return dq, dk, dv, di, df, None


def mlstm_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                 eps: float = EPS) -> torch.Tensor:
    """Fused causal mLSTM. q, k, v: (B, NH, S, DH); i, f: (B, NH, S) -> (B, NH, S, DH) in q's dtype."""
    return _MlstmTriton.apply(q, k, v, i, f, eps)


def cuda_cell_inputs(q, k, v, i, f) -> bool:
    """True for CUDA tensors q, k, v (B, NH, S, DH) of one supported float dtype with 16 <= DH <= 512 and
    B * NH > 0, and floating i, f (B, NH, S): what every Triton mLSTM kernel needs."""
    if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in (q, k, v, i, f)):
        return False
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        return False
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    B, NH, S, DH = q.shape
    if i.shape != (B, NH, S) or f.shape != (B, NH, S) or not (i.is_floating_point() and f.is_floating_point()):
        return False
    return MIN_HEAD_DIM <= DH <= MAX_HEAD_DIM and B * NH > 0


def supports(q, k, v, i, f) -> bool:
    """True for CUDA tensors of one float dtype, 16 <= DH <= 512 and 1 <= S <= MAX_SEQ_LEN."""
    return cuda_cell_inputs(q, k, v, i, f) and 1 <= q.shape[2] <= MAX_SEQ_LEN


__all__ = ["mlstm_triton", "supports"]
