"""Chunkwise causal mLSTM cell in Triton: forward and exact backward, linear in the sequence length.

Computes the function of `reference.mlstm_parallel` in the chunkwise form derived in `chunkwise_reference`
(chunks of L tokens, a state (C, n, M) carried in float32 between chunks; per chunk g = the local
log-forget cumsum, m_t = g_t + max(M_c, cummax(i - g)), w_t = exp(g_t + M_c - m_t), the decay
D~[t, j] = exp((g_t - g_j) + i_j - m_t), key weights e_j = exp((G_c - g_j) + i_j - M_{c+1}) and the state's
decay rho_c = exp(G_c + M_c - M_{c+1}), all <= 1). Five kernels and an O(S) gate step:

    forward   _states_kernel    per (batch, head, C tile): the loop over the chunks carrying C, n, M in float32;
                                writes the state entering every chunk (C in the inputs' dtype, as the tensor cores
                                read it), the final one (float32), g, m and the rows' arg-max j*
              _out_kernel       per query block: h = (w q C_c + intra-chunk C @ V) / N, 1/N and sign(s)
    backward  _dq_kernel        per query block: delta, dN, dq, and the log-gradients of the row's weights
              _dstates_kernel   per (batch, head, dC tile): the reverse loop carrying dC, dn in float32; writes dC
                                in the inputs' dtype, and <dC_c, C_c> with C_c as stored
              _dkdv_kernel      per key block: dk, dv, and the log-gradients of the key's weights
              _gate_grads       torch, float64 (one torch.compile on CUDA): di, df from those log-gradients

The backward is the parallel form's (kernel.py's docstring), written chunkwise. With r_t = 1/N_t,
delta_t = r_t sum_j (dh_t . v_j) C[t, j] (from the float32 tiles, as kernel.EXACT_DELTA), dN_t = -delta_t r_t,
gN_t = dN_t sign(s_t) [0 where the floor exp(-m_t) wins] and dP[t, j] = (r_t dh_t . v_j + gN_t) D~[t, j]:

    dq_t  = w_t (r_t X_t + gN_t n_c) + sum_{j in chunk} dP[t, j] k~_j,     X_t = C_c dh_t
    dk_j  = e_j (dC_c v_j + dn_c) + sum_{t in chunk} dP[t, j] q~_t,         dv_j = e_j dC_c^T k_j + intra
    dC_{c-1} = rho_c dC_c + sum_{t in c} w_t q~_t (r_t dh_t)^T,   dn_{c-1} = rho_c dn_c + sum_{t in c} w_t gN_t q~_t

where dC_c, dn_c gather every query after chunk c (u_t = exp(a_t - a_c_end - m_t + M_{c+1}) <= 1 and e_j <= 1
split D~ across the chunk boundary).

The gates' gradient is reverse mode through the chunkwise gate algebra above, not the parallel kernel's
row-minus-column sums of dlogD: each weight x = exp(z) has the log-gradient x dL/dx (Omega_t = w_t dL/dw_t,
the intra entries dP P, eps_j = e_j dL/de_j = k_j . (dk_j, inter part), and rho_c dL/drho_c =
rho_c <dC_c, C_c> / scale); it flows into the gates through z, and the stabilizer m_t = g_t + max(M_c, cm_t)
sends its gradient (the floor's term and minus the row's log-gradients) to the arg-max: M_c or the key. A
weight that is identically 1 (the row's arg-max decay, w_t where the state holds the row's arg-max, e_j of
a chunk's closing arg-max, rho_c where the state keeps its arg-max) has no gate gradient: its log-gradient
cancels exactly, so it is left out instead of summed and cancelled in floating point. This matters where one
key dominates a row (large gates): the inter-chunk log-gradients are sums through the states, rounded to
the inputs' dtype on the tensor cores, and the dominant key's part of them would not cancel. Every exponent is
<= 0 and no exponent is a difference of whole-sequence cumsums, so the float32 error does not grow with S.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

import triton  # imported by the ops' registry only for CUDA inputs; without triton the backend is unavailable
import triton.language as tl

from .chunkwise_reference import State
from .kernel import (_acc_dkdv, _block_d, _d_chunks, _decay, _dot_acc, _dot_acc2, _dot_nt, _dq_tile, _head,
                     _load_cols, _load_cols2, _qkv_heads, _store_cols2, _store_dkdv, _store_out, _strides,
                     _tile_products, cuda_cell_inputs)
from .reference import EPS

# Keep the states of the forward for the backward (B * NH * (S / L) * DH^2 values in the inputs' dtype until the
# backward) instead of running the state loop again there (one k^T v pass: about a fifth of the forward's work).
SAVE_STATES = False
MAX_OFFSET = 2**31 - 1     # per-head element offsets are int32 in the kernels


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _later_max(k1, j1, k2, j2):
    """Scan step of a running arg-max; ties go to the later index (as torch.cummax)."""
    right = k2 >= k1
    return tl.where(right, k2, k1), tl.where(right, j2, j1)


@triton.jit
def _dot_state(a, s, acc, IEEE: tl.constexpr):
    """acc + a (M, K) @ s (K, N), s a float32 state tile (rounded to a's dtype on the tensor-core path)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), s, acc, input_precision="ieee")
    return tl.dot(a, s.to(a.dtype), acc)


@triton.jit
def _dot_state_t(a, s, acc, IEEE: tl.constexpr):
    """acc + a (M, N) @ s (K, N)^T, s a float32 state tile."""
    if IEEE:
        return tl.dot(a.to(tl.float32), tl.trans(s), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(s.to(a.dtype)), acc)


@triton.jit
def _dot_tn(a, b, acc, IEEE: tl.constexpr):
    """acc + a (T, M) float32 ^T @ b (T, N): a rounded to b's dtype on the tensor-core path."""
    if IEEE:
        return tl.dot(tl.trans(a), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(tl.trans(a.to(b.dtype)), b, acc)


@triton.jit
def _tile(base, offs_r, r_ok, sr, offs_c, c_ok, sc):
    """Rows offs_r, columns offs_c of a 2-D array (0 outside the masks)."""
    return tl.load(base + offs_r[:, None] * sr + offs_c[None, :] * sc, mask=r_ok[:, None] & c_ok[None, :], other=0.0)


@triton.jit
def _last(x, loc, last):
    """x[last] of a chunk vector (exact: a sum of one value and zeros)."""
    return tl.sum(tl.where(loc == last, x, tl.zeros_like(x)), axis=0)


@triton.jit
def _tile_of_state(pid_t, NVB, BK: tl.constexpr, BV: tl.constexpr, DH):
    """The rows (k) and columns (v) of program pid_t's (BK, BV) tile of a DH x DH state, their masks, and whether
    the tile is the first of its row of tiles."""
    offs_k = (pid_t // NVB) * BK + tl.arange(0, BK)                         # (BK,)
    offs_v = (pid_t % NVB) * BV + tl.arange(0, BV)                          # (BV,)
    return offs_k, offs_v, offs_k < DH, offs_v < DH, pid_t % NVB == 0


@triton.jit(do_not_specialize=["S", "NC"])
def _states_kernel(
    K, V, LF, IG, C0, N0, M0, CS, CF, NS, MS, Gout, Mout, Aout,
    skb, skh, sks, skd, svb, svh, svs, svd,
    NH, S, NC, DH, NVB, NT, scale,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr, WRITE_STATS: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One program = one (BK, BV) tile of C of one (batch, head), looping over the chunks. Writes the state
    entering chunk c at index c (c = 0..NC - 1; C in CS's dtype, n and M float32 with the final state at NC) and
    the final C in float32 to CF; program 0 of a head also writes the stabilizers M (per chunk), g, m and the
    arg-max (per token)."""
    pid_bh = tl.program_id(0) // NT                                         # a head's NT tiles run side by side,
    pid_t = tl.program_id(0) % NT                                           # sharing its k, v (q, dh) in L2
    bh = pid_bh.to(tl.int64)
    offs_k, offs_v, k_ok, v_ok, first_v = _tile_of_state(pid_t, NVB, BK, BV, DH)   # (BK,), (BV,)
    k_base = _head(K, pid_bh, NH, skb, skh)
    v_base = _head(V, pid_bh, NH, svb, svh)
    vec = bh * S
    cs_off = offs_k[:, None] * DH + offs_v[None, :]                         # (BK, BV)
    cs_ok = k_ok[:, None] & v_ok[None, :]
    if HAS_INIT:
        c_st = tl.load(C0 + bh * DH * DH + cs_off, mask=cs_ok, other=0.0)   # (BK, BV) float32
        n_st = tl.load(N0 + bh * DH + offs_k, mask=k_ok, other=0.0)         # (BK,)
        m_st = tl.load(M0 + bh)                                             # running stabilizer M_c
    else:
        c_st = tl.zeros([BK, BV], dtype=tl.float32)
        n_st = tl.zeros([BK], dtype=tl.float32)
        m_st = tl.full([], -float("inf"), tl.float32)
    arg_st = tl.full([], -1, tl.int32)                                      # arg-max of the state (-1: initial)
    loc = tl.arange(0, L)                                                   # (L,)
    for c in range(0, NC):
        st = bh * (NC + 1) + c
        tl.store(CS + st * DH * DH + cs_off, c_st.to(CS.dtype.element_ty), mask=cs_ok)
        tl.store(NS + st * DH + offs_k, n_st, mask=k_ok & first_v)
        if pid_t == 0:
            tl.store(MS + st, m_st)
        offs_t = c * L + loc                                                # (L,) tokens
        ok = offs_t < S
        lf = tl.load(LF + vec + offs_t, mask=ok, other=0.0)                 # (L,) logsigmoid(f)
        ig = tl.load(IG + vec + offs_t, mask=ok, other=0.0)                 # (L,)
        # the local log-forget cumsum, correctly rounded: a float32 scan's tree order (on the GPU) leaves errors of a
        # few ulp(|g|) (|g| reaches hundreds at large gates) that differ between neighbouring tokens; the decay's
        # exponents are differences g_t - g_j, and rows whose sum s_t cancels amplify them (kappa ~ 1e2)
        g = tl.cumsum(lf.to(tl.float64), 0).to(tl.float32)                  # (L,)
        key = tl.where(ok, ig - g, -float("inf"))
        cm, am = tl.associative_scan((key, offs_t), 0, _later_max)         # running max of i - g, its index
        last = tl.minimum(S - c * L, L) - 1
        g_last = _last(g, loc, last)
        m_next = g_last + tl.maximum(m_st, tl.max(key, axis=0))             # m at the chunk's last token
        if WRITE_STATS:
            if pid_t == 0:
                tl.store(Gout + vec + offs_t, g, mask=ok)
                tl.store(Mout + vec + offs_t, g + tl.maximum(m_st, cm), mask=ok)
                tl.store(Aout + vec + offs_t, tl.where(m_st > cm, arg_st, am), mask=ok)
        arg_st = tl.where(m_st > tl.max(key, axis=0), arg_st, _last(am, loc, last))
        rho = tl.exp((g_last + m_st) - m_next)
        e = tl.where(ok, tl.exp(((g_last - g) + ig) - m_next), 0.0)         # (L,) key weights
        k = _tile(k_base, offs_t, ok, sks, offs_k, k_ok, skd)              # (L, BK)
        v = _tile(v_base, offs_t, ok, svs, offs_v, v_ok, svd)              # (L, BV)
        ke = k.to(tl.float32) * (e * scale)[:, None]                        # (L, BK) k~ e
        c_st = _dot_tn(ke, v, c_st * rho, IEEE)                             # (BK, BV)
        n_st = n_st * rho + tl.sum(ke, axis=0)                              # (BK,)
        m_st = m_next
    st = bh * (NC + 1) + NC
    tl.store(CF + bh * DH * DH + cs_off, c_st, mask=cs_ok)
    tl.store(NS + st * DH + offs_k, n_st, mask=k_ok & first_v)
    if pid_t == 0:
        tl.store(MS + st, m_st)


@triton.jit(do_not_specialize=["S", "NC"])
def _out_kernel(
    Q, K, V, G, IG, Mrow, CS, NS, MS, O, Rinv, Sgn,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
    NH, S, NC, DH, scale, eps,
    L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    BLOCK_D2P: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """One program = one query block of one chunk: h = (w q C_c + sum_intra C v) / (max(|s|, exp(-m)) + eps)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bh = pid_bh.to(tl.int64)
    q_base, k_base, v_base = _qkv_heads(Q, K, V, pid_bh, NH, sqb, sqh, skb, skh, svb, svh)
    o_base = _head(O, pid_bh, NH, sob, soh)
    vec = bh * S
    c0 = (pid_m * BLOCK_M // L) * L                                         # the chunk's first token
    st = bh * (NC + 1) + c0 // L
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                        # (BM,)
    row_ok = offs_m < S
    g_row = tl.load(G + vec + offs_m, mask=row_ok, other=0.0)               # (BM,)
    m_row = tl.load(Mrow + vec + offs_m, mask=row_ok, other=0.0)            # (BM,)
    w = tl.exp((g_row + tl.load(MS + st)) - m_row)                          # (BM,) inter-chunk weight

    # inter-chunk: q C_c (BM, DH) in two column tiles, and q . n_c
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)                    # (BM, BD)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D2P], dtype=tl.float32)
    qn = tl.zeros([BLOCK_M], dtype=tl.float32)                              # (BM,)
    for kb in range(0, DH, BLOCK_K):
        offs_kb = kb + tl.arange(0, BLOCK_K)                                # (BK,)
        kb_ok = offs_kb < DH
        qb = _tile(q_base, offs_m, row_ok, sqs, offs_kb, kb_ok, sqd)        # (BM, BK)
        qn += tl.sum(qb.to(tl.float32) * tl.load(NS + st * DH + offs_kb, mask=kb_ok, other=0.0)[None, :], axis=1)
        acc = _dot_state(qb, _tile(CS + st * DH * DH, offs_kb, kb_ok, DH, offs_d, offs_d < DH, 1), acc, IEEE)
        if BLOCK_D2 > 0:
            offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
            acc2 = _dot_state(qb, _tile(CS + st * DH * DH, offs_kb, kb_ok, DH, offs_d2, offs_d2 < DH, 1), acc2,
                              IEEE)
    acc = acc * w[:, None]
    acc2 = acc2 * w[:, None]
    row_sum = w * qn                                                        # (BM,) s_t, inter part

    # intra-chunk: keys c0 .. the block's last row
    q = _load_cols(q_base, offs_m, row_ok, sqs, sqd, DH, 0, BLOCK_D)       # (BM, BD)
    q2 = q
    if BLOCK_D2 > 0:
        q2 = _load_cols(q_base, offs_m, row_ok, sqs, sqd, DH, BLOCK_D, BLOCK_D2)  # (BM, BD2)
    for start_n in range(c0, (pid_m + 1) * BLOCK_M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)                            # (BN,)
        col_ok = offs_n < S
        k = _load_cols(k_base, offs_n, col_ok, sks, skd, DH, 0, BLOCK_D)   # (BN, BD)
        p = _dot_nt(q, k, None, IEEE)                                       # (BM, BN)
        if BLOCK_D2 > 0:
            k2 = _load_cols(k_base, offs_n, col_ok, sks, skd, DH, BLOCK_D, BLOCK_D2)  # (BN, BD2)
            p = _dot_nt(q2, k2, p, IEEE)
        g_col = tl.load(G + vec + offs_n, mask=col_ok, other=0.0)           # (BN,)
        i_col = tl.load(IG + vec + offs_n, mask=col_ok, other=0.0)          # (BN,)
        causal = (offs_n[None, :] <= offs_m[:, None]) & col_ok[None, :] & row_ok[:, None]  # (BM, BN)
        c = p * scale * _decay(causal, g_row[:, None], g_col[None, :], i_col[None, :], m_row[:, None])
        row_sum += tl.sum(c, axis=1)
        acc = _dot_acc(c, _load_cols(v_base, offs_n, col_ok, svs, svd, DH, 0, BLOCK_D), acc, IEEE)
        if BLOCK_D2 > 0:
            acc2 = _dot_acc(c, _load_cols(v_base, offs_n, col_ok, svs, svd, DH, BLOCK_D, BLOCK_D2), acc2, IEEE)

    _store_out(o_base, Rinv, Sgn, vec, acc, acc2, row_sum, m_row, offs_m, row_ok, sos, sod, DH, eps, BLOCK_D,
               BLOCK_D2)


@triton.jit(do_not_specialize=["S", "NC"])
def _dq_kernel(
    Q, K, V, DO, G, IG, Mrow, Arg, Rinv, Sgn, CS, NS, MS, DQ, DN, GN, Omega, RowG,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdob, sdoh, sdos, sdod,
    NH, S, NC, DH, scale,
    L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    BLOCK_D2P: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """One program = one query block of one chunk: delta, dN, gN = dN sign(s), dq, and the log-gradients of
    the row's weights: Omega_t of w_t (the inter-chunk part) and the intra-chunk row sums of dP P without the
    row's arg-max entry (a weight identically 1)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bh = pid_bh.to(tl.int64)
    q_base, k_base, v_base = _qkv_heads(Q, K, V, pid_bh, NH, sqb, sqh, skb, skh, svb, svh)
    do_base = _head(DO, pid_bh, NH, sdob, sdoh)
    vec = bh * S
    c0 = (pid_m * BLOCK_M // L) * L
    st = bh * (NC + 1) + c0 // L
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                        # (BM,)
    row_ok = offs_m < S
    g_row = tl.load(G + vec + offs_m, mask=row_ok, other=0.0)               # (BM,)
    m_row = tl.load(Mrow + vec + offs_m, mask=row_ok, other=0.0)            # (BM,)
    r = tl.load(Rinv + vec + offs_m, mask=row_ok, other=0.0)                # (BM,) 1 / N_t
    sgn = tl.load(Sgn + vec + offs_m, mask=row_ok, other=0.0)               # (BM,)
    w = tl.exp((g_row + tl.load(MS + st)) - m_row)                          # (BM,)

    q, q2 = _load_cols2(q_base, offs_m, row_ok, sqs, sqd, DH, BLOCK_D, BLOCK_D2)      # (BM, BD), (BM, BD2)
    do, do2 = _load_cols2(do_base, offs_m, row_ok, sdos, sdod, DH, BLOCK_D, BLOCK_D2)

    # intra-chunk part of delta_t / r_t = sum_j (dh_t . v_j) C_tj, from the float32 tiles
    hi = (pid_m + 1) * BLOCK_M
    u = tl.zeros([BLOCK_M], dtype=tl.float32)                               # (BM,)
    for start_n in range(c0, hi, BLOCK_N):
        k, k2, p, dov, decay = _dq_tile(q, q2, do, do2, k_base, v_base, G, IG, vec, offs_m, row_ok, g_row, m_row,
                                        start_n, S, DH, sks, skd, svs, svd, scale, BLOCK_N, BLOCK_D, BLOCK_D2, IEEE)
        u += tl.sum(dov * p * decay, axis=1)

    # inter-chunk: X = dh C_c^T (BM, DH) in q's two column tiles; q . X and q . n_c
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)                      # (BM, BD)
    x2 = tl.zeros([BLOCK_M, BLOCK_D2P], dtype=tl.float32)
    for vb in range(0, DH, BLOCK_K):
        offs_vb = vb + tl.arange(0, BLOCK_K)                                # (BK,)
        vb_ok = offs_vb < DH
        dob = _tile(do_base, offs_m, row_ok, sdos, offs_vb, vb_ok, sdod)    # (BM, BK)
        x = _dot_state_t(dob, _tile(CS + st * DH * DH, offs_d, offs_d < DH, DH, offs_vb, vb_ok, 1), x, IEEE)
        if BLOCK_D2 > 0:
            offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
            x2 = _dot_state_t(dob, _tile(CS + st * DH * DH, offs_d2, offs_d2 < DH, DH, offs_vb, vb_ok, 1), x2,
                              IEEE)
    n_c = tl.load(NS + st * DH + offs_d, mask=offs_d < DH, other=0.0)      # (BD,)
    qx = tl.sum(q.to(tl.float32) * x, axis=1)                               # (BM,) q . X
    qn = tl.sum(q.to(tl.float32) * n_c[None, :], axis=1)                    # (BM,) q . n_c
    n_c2 = n_c
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        n_c2 = tl.load(NS + st * DH + offs_d2, mask=offs_d2 < DH, other=0.0)          # (BD2,)
        qx += tl.sum(q2.to(tl.float32) * x2, axis=1)
        qn += tl.sum(q2.to(tl.float32) * n_c2[None, :], axis=1)
    delta = r * (w * qx + u)                                                # (BM,)
    dn = -delta * r                                                         # (BM,) dL/dN
    gn = dn * sgn                                                           # (BM,)
    tl.store(DN + vec + offs_m, dn, mask=row_ok)
    tl.store(GN + vec + offs_m, gn, mask=row_ok)

    # dq = w (r X + gN n_c) + sum_intra dP k~, accumulated in units of 1 / scale
    dq = (x * (w * r)[:, None] + (w * gn)[:, None] * n_c[None, :]) / scale  # (BM, BD)
    dq2 = x2
    if BLOCK_D2 > 0:
        dq2 = (x2 * (w * r)[:, None] + (w * gn)[:, None] * n_c2[None, :]) / scale  # (BM, BD2)
    tl.store(Omega + vec + offs_m, w * (r * qx + gn * qn), mask=row_ok)    # (BM,) R_t, inter part
    arg = tl.load(Arg + vec + offs_m, mask=row_ok, other=-1)                # (BM,) the row's arg-max j*
    row_g = tl.zeros([BLOCK_M], dtype=tl.float32)                           # (BM,) R_t, intra part without j*
    for start_n in range(c0, hi, BLOCK_N):
        k, k2, p, dov, decay = _dq_tile(q, q2, do, do2, k_base, v_base, G, IG, vec, offs_m, row_ok, g_row, m_row,
                                        start_n, S, DH, sks, skd, svs, svd, scale, BLOCK_N, BLOCK_D, BLOCK_D2, IEEE)
        dp = (r[:, None] * dov + gn[:, None]) * decay                       # (BM, BN) dL/dP
        offs_n = start_n + tl.arange(0, BLOCK_N)                            # (BN,)
        row_g += tl.sum(tl.where(offs_n[None, :] == arg[:, None], 0.0, dp * p), axis=1)
        dq, dq2 = _dot_acc2(dp, k, k2, dq, dq2, BLOCK_D2, IEEE)
    _store_cols2(_head(DQ, pid_bh, NH, sqb, sqh), dq * scale, dq2 * scale, offs_m, row_ok, sqs, sqd, DH, BLOCK_D,
                 BLOCK_D2)                                                    # dq has q's strides
    tl.store(RowG + vec + offs_m, row_g, mask=row_ok)


@triton.jit(do_not_specialize=["S", "NC"])
def _dstates_kernel(
    Q, DO, G, Mrow, Rinv, GN, MS, CS, NS, DCS, DNS, PP,
    sqb, sqh, sqs, sqd, sdob, sdoh, sdos, sdod,
    NH, S, NC, DH, NVB, NT, scale,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr,
):
    """One program = one (BK, BV) tile of dC of one (batch, head), looping over the chunks backwards. Writes at
    index c the gradient state of chunk c's keys: dC_c = sum over later queries t of u_t q~_t (r_t dh_t)^T, and
    dn_c = sum u_t gN_t q~_t; and this tile's part of <dC_c, C_c> + dn_c . n_c (C_c, n_c: the state entering chunk
    c), the log-gradient of the state's decay rho_c times scale / rho_c."""
    pid_bh = tl.program_id(0) // NT                                         # a head's NT tiles run side by side,
    pid_t = tl.program_id(0) % NT                                           # sharing its k, v (q, dh) in L2
    bh = pid_bh.to(tl.int64)
    offs_k, offs_v, k_ok, v_ok, first_v = _tile_of_state(pid_t, NVB, BK, BV, DH)   # (BK,), (BV,)
    q_base = _head(Q, pid_bh, NH, sqb, sqh)
    do_base = _head(DO, pid_bh, NH, sdob, sdoh)
    vec = bh * S
    cs_off = offs_k[:, None] * DH + offs_v[None, :]                         # (BK, BV)
    dc = tl.zeros([BK, BV], dtype=tl.float32)
    dn = tl.zeros([BK], dtype=tl.float32)
    loc = tl.arange(0, L)
    for cc in range(0, NC):
        c = NC - 1 - cc
        st = bh * NC + c
        tl.store(DCS + st * DH * DH + cs_off, dc.to(DCS.dtype.element_ty), mask=k_ok[:, None] & v_ok[None, :])
        tl.store(DNS + st * DH + offs_k, dn, mask=k_ok & first_v)
        fst = bh * (NC + 1) + c
        c_st = tl.load(CS + fst * DH * DH + cs_off, mask=k_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
        n_st = tl.load(NS + fst * DH + offs_k, mask=k_ok & first_v, other=0.0)                     # (BK,)
        tl.store(PP + st * NT + pid_t, tl.sum(tl.sum(dc * c_st, axis=1), axis=0) + tl.sum(dn * n_st, axis=0))
        offs_t = c * L + loc                                                # (L,)
        ok = offs_t < S
        g = tl.load(G + vec + offs_t, mask=ok, other=0.0)                   # (L,)
        m = tl.load(Mrow + vec + offs_t, mask=ok, other=0.0)                # (L,)
        r = tl.load(Rinv + vec + offs_t, mask=ok, other=0.0)                # (L,)
        gn = tl.load(GN + vec + offs_t, mask=ok, other=0.0)                 # (L,)
        m_c = tl.load(MS + bh * (NC + 1) + c)
        rho = tl.exp((_last(g, loc, tl.minimum(S - c * L, L) - 1) + m_c) - tl.load(MS + bh * (NC + 1) + c + 1))
        w = tl.where(ok, tl.exp((g + m_c) - m), 0.0)                        # (L,)
        qb = _tile(q_base, offs_t, ok, sqs, offs_k, k_ok, sqd).to(tl.float32)   # (L, BK)
        dob = _tile(do_base, offs_t, ok, sdos, offs_v, v_ok, sdod)          # (L, BV)
        dc = _dot_tn(qb * (w * r * scale)[:, None], dob, dc * rho, IEEE)    # (BK, BV)
        dn = dn * rho + tl.sum(qb * (w * gn * scale)[:, None], axis=0)      # (BK,)


@triton.jit(do_not_specialize=["S", "NC"])
def _dkdv_kernel(
    Q, K, V, DO, G, IG, Mrow, Arg, Rinv, GN, MS, DCS, DNS, DK, DV, EpsK, ColG,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdob, sdoh, sdos, sdod,
    NH, S, NC, DH, scale,
    L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    BLOCK_D2P: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """One program = one key block of one chunk: dk, dv (later chunks through dC_c, dn_c; the chunk's own
    queries as tiles), and the log-gradients of the key's weights: eps_j of e_j (the inter-chunk part) and the
    intra-chunk column sums of dP P without the entries where the key is the row's arg-max."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bh = pid_bh.to(tl.int64)
    q_base, k_base, v_base = _qkv_heads(Q, K, V, pid_bh, NH, sqb, sqh, skb, skh, svb, svh)
    do_base = _head(DO, pid_bh, NH, sdob, sdoh)
    vec = bh * S
    start_n = pid_n * BLOCK_N
    c = start_n // L
    c_end = tl.minimum(S, (c + 1) * L)                                      # the chunk's end
    st = bh * NC + c
    offs_n = start_n + tl.arange(0, BLOCK_N)                                # (BN,)
    col_ok = offs_n < S
    g_col = tl.load(G + vec + offs_n, mask=col_ok, other=0.0)               # (BN,)
    i_col = tl.load(IG + vec + offs_n, mask=col_ok, other=0.0)              # (BN,)
    g_last = tl.load(G + vec + c_end - 1)
    e = tl.where(col_ok, tl.exp(((g_last - g_col) + i_col) - tl.load(MS + bh * (NC + 1) + c + 1)), 0.0)  # (BN,)

    # inter-chunk: dk = e (v dC_c^T + dn_c) (in units of 1 / scale), dv = e k dC_c
    offs_d = tl.arange(0, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)                     # (BN, BD)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)                     # (BN, BD)
    dk2 = tl.zeros([BLOCK_N, BLOCK_D2P], dtype=tl.float32)
    dv2 = tl.zeros([BLOCK_N, BLOCK_D2P], dtype=tl.float32)
    dcs = DCS + st * DH * DH
    for b in range(0, DH, BLOCK_K):
        offs_b = b + tl.arange(0, BLOCK_K)                                  # (BK,)
        b_ok = offs_b < DH
        vb = _tile(v_base, offs_n, col_ok, svs, offs_b, b_ok, svd)          # (BN, BK) v columns b
        kb = _tile(k_base, offs_n, col_ok, sks, offs_b, b_ok, skd)          # (BN, BK) k columns b
        dk = _dot_state_t(vb, _tile(dcs, offs_d, offs_d < DH, DH, offs_b, b_ok, 1), dk, IEEE)
        dv = _dot_state(kb, _tile(dcs, offs_b, b_ok, DH, offs_d, offs_d < DH, 1), dv, IEEE)
        if BLOCK_D2 > 0:
            offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
            dk2 = _dot_state_t(vb, _tile(dcs, offs_d2, offs_d2 < DH, DH, offs_b, b_ok, 1), dk2, IEEE)
            dv2 = _dot_state(kb, _tile(dcs, offs_b, b_ok, DH, offs_d2, offs_d2 < DH, 1), dv2, IEEE)
    k = _load_cols(k_base, offs_n, col_ok, sks, skd, DH, 0, BLOCK_D)       # (BN, BD)
    v = _load_cols(v_base, offs_n, col_ok, svs, svd, DH, 0, BLOCK_D)       # (BN, BD)
    dk = e[:, None] * (dk + tl.load(DNS + st * DH + offs_d, mask=offs_d < DH, other=0.0)[None, :]) / scale
    dv = e[:, None] * dv
    eps_k = tl.sum(k.to(tl.float32) * dk, axis=1) * scale                   # (BN,) K_j, inter part
    k2, v2 = k, v
    if BLOCK_D2 > 0:
        k2 = _load_cols(k_base, offs_n, col_ok, sks, skd, DH, BLOCK_D, BLOCK_D2)  # (BN, BD2)
        v2 = _load_cols(v_base, offs_n, col_ok, svs, svd, DH, BLOCK_D, BLOCK_D2)  # (BN, BD2)
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        dk2 = e[:, None] * (dk2 + tl.load(DNS + st * DH + offs_d2, mask=offs_d2 < DH, other=0.0)[None, :]) / scale
        dv2 = e[:, None] * dv2
        eps_k += tl.sum(k2.to(tl.float32) * dk2, axis=1) * scale
    tl.store(EpsK + vec + offs_n, eps_k, mask=col_ok)

    # intra-chunk: queries from the key block to the chunk's end
    col_g = tl.zeros([BLOCK_N], dtype=tl.float32)                           # (BN,) K_j, intra part
    for start_m in range(start_n, c_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)                            # (BM,)
        row_ok = offs_m < c_end
        q, q2, do, do2, pt, dovt = _tile_products(k, k2, v, v2, q_base, do_base, offs_m, row_ok, sqs, sqd,
                                                  sdos, sdod, DH, BLOCK_D, BLOCK_D2, IEEE)  # (BN, BM)
        pt = pt * scale
        g_row = tl.load(G + vec + offs_m, mask=row_ok, other=0.0)           # (BM,)
        m_row = tl.load(Mrow + vec + offs_m, mask=row_ok, other=0.0)        # (BM,)
        r = tl.load(Rinv + vec + offs_m, mask=row_ok, other=0.0)            # (BM,)
        gn = tl.load(GN + vec + offs_m, mask=row_ok, other=0.0)             # (BM,)
        arg = tl.load(Arg + vec + offs_m, mask=row_ok, other=-1)            # (BM,)
        causal = (offs_n[:, None] <= offs_m[None, :]) & row_ok[None, :] & col_ok[:, None]  # (BN, BM)
        decay = _decay(causal, g_row[None, :], g_col[:, None], i_col[:, None], m_row[None, :])  # (BN, BM)
        dpt = (r[None, :] * dovt + gn[None, :]) * decay                     # (BN, BM) dL/dP^T
        col_g += tl.sum(tl.where(offs_n[:, None] == arg[None, :], 0.0, dpt * pt), axis=1)
        ct = pt * decay * r[None, :]                                        # (BN, BM) (C / N)^T
        dk, dv, dk2, dv2 = _acc_dkdv(ct, dpt, q, q2, do, do2, dk, dv, dk2, dv2, BLOCK_D2, IEEE)
    _store_dkdv(DK, DV, pid_bh, NH, skb, skh, sks, skd, svb, svh, svs, svd, DH, scale, dk, dv, dk2, dv2, offs_n,
                col_ok, BLOCK_D, BLOCK_D2)
    tl.store(ColG + vec + offs_n, col_g, mask=col_ok)


# ----------------------------------------------------------------------------------------------------------
# launch configuration (`benchmarks/mlstm_kernel.py --long --sweep` times them)
# ----------------------------------------------------------------------------------------------------------

CHUNK_SIZE = 128           # tokens per chunk L (a power of two, >= 16; shorter rows use the next power of two)
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim, 2-byte inputs (float32 halves the tiles);
# BLOCK_M tiles queries, BLOCK_N keys, both <= L. Keys 128, 256 and 512 (DH 96, 192, 384): the fastest of
# `benchmarks/mlstm_kernel.py --long --sweep` at S 4,096, B 32 on an H200 whose h is the same call after call. Under
# Triton 3.6, with bf16 state tiles, _OUT_CFG's (64, 32, 4, 2) and (64, 32, 8, 2) at DH 96 race in the second
# column tile (h differs between calls, by up to 16 in a few thousand entries), and (64, 16, 4, 2) at DH 384
# computes h wrongly; tests/test_ops_mlstm_chunkwise.py::test_gpu_deterministic checks every head dim.
# Keys up to 64, not swept: the parallel kernel's tiles, with the warps and tiles at which `ptxas -v` (sm_90a,
# triton 3.8) reports few register spills.
_OUT_CFG = {16: (64, 32, 8, 2), 32: (64, 32, 8, 2), 64: (64, 32, 8, 2), 128: (64, 16, 4, 2),
            256: (64, 16, 4, 2), 512: (32, 32, 4, 2)}
_DQ_CFG = {16: (64, 32, 8, 2), 32: (64, 32, 8, 2), 64: (64, 32, 8, 2), 128: (64, 32, 4, 2),
           256: (64, 32, 4, 2), 512: (32, 32, 4, 2)}
_DKDV_CFG = {16: (32, 64, 8, 2), 32: (32, 64, 8, 2), 64: (32, 64, 8, 2), 128: (32, 64, 4, 2),
             256: (32, 32, 4, 2), 512: (64, 32, 8, 2)}
# (C tile rows, C tile columns, warps, stages) of the forward state loop and of the reverse (gradient) one, per
# padded head dim (keys 128 to 512: each table's H200 sweep at 4,096 tokens; 64 x 128 won at DH 96, 192 and 384)
_STATE_CFG = {16: (64, 64, 8, 2), 32: (64, 64, 8, 2), 64: (64, 64, 8, 2), 128: (64, 128, 4, 2), 256: (64, 128, 4, 2),
              512: (64, 128, 4, 2)}
_DSTATE_CFG = dict(_STATE_CFG)
_FP32_STATE_CFG = (64, 64, 8, 2)
_INNER_K = 32              # head-dim block of the q C, dh C^T, v dC^T, k dC products (float32 halves it at DH > 128)


def _cfg(table: dict, DH: int, dtype: torch.dtype, L: int) -> tuple[int, int, int, int]:
    bm, bn, warps, stages = table[_block_d(DH)]
    if dtype == torch.float32 and _block_d(DH) >= 128:   # 4-byte tiles: halve them to stay inside shared memory
        bm, bn, stages = max(16, bm // 2), max(16, bn // 2), 1
    return min(bm, L), min(bn, L), warps, stages


def _launch(table: dict, DH: int, dtype: torch.dtype, L: int) -> dict:
    """The constexpr and launch arguments of the query/key-block kernels (_out, _dq, _dkdv)."""
    bd, bd2 = _d_chunks(DH)
    bm, bn, warps, stages = _cfg(table, DH, dtype, L)
    return dict(L=L, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_D2=bd2, BLOCK_D2P=max(bd2, 16),
                BLOCK_K=_inner_k(DH, dtype), IEEE=dtype == torch.float32, num_warps=warps, num_stages=stages)


def _inner_k(DH: int, dtype: torch.dtype) -> int:
    """Head-dim block of the state products: their (BLOCK_K, DH) float32 state tiles stay within shared memory."""
    return 16 if dtype == torch.float32 and _block_d(DH) >= 256 else _INNER_K


def _state_launch(table: dict, DH: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(C tile rows, columns, warps, stages, tiles per head) of a state loop: the table's (float32 at the untuned
    (64, 64, 8, 2)), each edge at most DH's padded size; edges that do not divide DH leave masked rows/columns."""
    bk, bv, warps, stages = _FP32_STATE_CFG if dtype == torch.float32 else table[_block_d(DH)]
    bk, bv = min(bk, _block_d(DH)), min(bv, _block_d(DH))
    return bk, bv, warps, stages, triton.cdiv(DH, bk) * triton.cdiv(DH, bv)


def chunk_size_for(S: int, chunk_size: int | None = None) -> int:
    """The chunk length L for a row of S tokens: `chunk_size` (default CHUNK_SIZE), at most S's next power of two."""
    L = CHUNK_SIZE if chunk_size is None else chunk_size
    if L < 16 or L & (L - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {L}")
    return min(L, max(16, triton.next_power_of_2(S)))


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------

def _f32(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device=like.device)


def _run_states(k, v, lf, ig, L: int, init: State | None, stats=None):
    """The forward state loop: the states entering each chunk (and the final one) -> CS (B, NH, NC+1, DH, DH) in
    k's dtype, as the tensor cores read them (slot NC unused), NS (B, NH, NC+1, DH), MS (B, NH, NC+1) and the final
    C, CF (B, NH, DH, DH), float32; stats = (g, m, arg) (B, NH, S) buffers to fill, or None."""
    B, NH, S, DH = k.shape
    NC = triton.cdiv(S, L)
    cs = torch.empty((B, NH, NC + 1, DH, DH), dtype=k.dtype, device=k.device)
    cf, ns, ms = _f32((B, NH, DH, DH), k), _f32((B, NH, NC + 1, DH), k), _f32((B, NH, NC + 1), k)
    c0, n0, m0 = (None, None, None) if init is None else (t.float().contiguous() for t in init)
    g, m, arg = stats if stats is not None else (ms, ms, ms)                # unused when WRITE_STATS is off
    bk, bv, warps, stages, nt = _state_launch(_STATE_CFG, DH, k.dtype)
    _states_kernel[(B * NH * nt,)](
        k, v, lf, ig, c0 if c0 is not None else cf, n0 if n0 is not None else ns, m0 if m0 is not None else ms,
        cs, cf, ns, ms, g, m, arg, *_strides(k), *_strides(v),
        NH, S, NC, DH, triton.cdiv(DH, bv), nt, 1.0 / math.sqrt(DH),
        L=L, BK=bk, BV=bv, HAS_INIT=init is not None, WRITE_STATS=stats is not None, IEEE=k.dtype == torch.float32,
        num_warps=warps, num_stages=stages)
    return cs, cf, ns, ms


def _run_out(q, k, v, g, ig, m, cs, ns, ms, L: int, eps: float):
    """The forward outputs: h (q's dtype), 1/N and sign(s) (B, NH, S) float32."""
    B, NH, S, DH = q.shape
    out = torch.empty((B, NH, S, DH), dtype=q.dtype, device=q.device)     # (B, NH, S, DH)
    r, sgn = _f32((B, NH, S), q), _f32((B, NH, S), q)
    cfg = _launch(_OUT_CFG, DH, q.dtype, L)
    _out_kernel[(triton.cdiv(S, cfg["BLOCK_M"]), B * NH)](
        q, k, v, g, ig, m, cs, ns, ms, out, r, sgn,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        NH, S, triton.cdiv(S, L), DH, 1.0 / math.sqrt(DH), eps,
        **cfg)
    return out, r, sgn


def _run_dq(q, k, v, dout, g, ig, m, arg, r, sgn, cs, ns, ms, L: int):
    """dq (q's strides); dN, gN = dN sign(s), Omega (w's log-gradient) and the intra row sums of dP P without
    the arg-max entry, (B, NH, S) float32 each."""
    B, NH, S, DH = q.shape
    dq = torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=q.device)
    dn, gn, omega, row_g = (_f32((B, NH, S), q) for _ in range(4))
    cfg = _launch(_DQ_CFG, DH, q.dtype, L)
    _dq_kernel[(triton.cdiv(S, cfg["BLOCK_M"]), B * NH)](
        q, k, v, dout, g, ig, m, arg, r, sgn, cs, ns, ms, dq, dn, gn, omega, row_g,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
        NH, S, triton.cdiv(S, L), DH, 1.0 / math.sqrt(DH),
        **cfg)
    return dq, dn, gn, omega, row_g


def _run_dstates(q, dout, g, m, r, gn, ms, cs, ns, L: int):
    """The reverse state loop: dC (B, NH, NC, DH, DH) in q's dtype and dn (B, NH, NC, DH), index c for chunk c's keys, and
    per chunk the tiles' parts of <dC_c, C_c> + dn_c . n_c (B, NH, NC, tiles)."""
    B, NH, S, DH = q.shape
    NC = triton.cdiv(S, L)
    bk, bv, warps, stages, nt = _state_launch(_DSTATE_CFG, DH, q.dtype)
    dcs = torch.empty((B, NH, NC, DH, DH), dtype=q.dtype, device=q.device)
    dns, pp = _f32((B, NH, NC, DH), q), _f32((B, NH, NC, nt), q)
    _dstates_kernel[(B * NH * nt,)](
        q, dout, g, m, r, gn, ms, cs, ns, dcs, dns, pp, *_strides(q), *_strides(dout),
        NH, S, NC, DH, triton.cdiv(DH, bv), nt, 1.0 / math.sqrt(DH),
        L=L, BK=bk, BV=bv, IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages)
    return dcs, dns, pp


def _run_dkdv(q, k, v, dout, g, ig, m, arg, r, gn, ms, dcs, dns, L: int):
    """dk, dv (k's, v's strides); eps (e's log-gradient) and the intra column sums of dP P without the entries
    where the key is the row's arg-max, (B, NH, S) float32 each."""
    B, NH, S, DH = q.shape
    dk, dv = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in (k, v))
    eps_k, col_g = _f32((B, NH, S), q), _f32((B, NH, S), q)
    cfg = _launch(_DKDV_CFG, DH, q.dtype, L)
    _dkdv_kernel[(triton.cdiv(S, cfg["BLOCK_N"]), B * NH)](
        q, k, v, dout, g, ig, m, arg, r, gn, ms, dcs, dns, dk, dv, eps_k, col_g,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
        NH, S, triton.cdiv(S, L), DH, 1.0 / math.sqrt(DH),
        **cfg)
    return dk, dv, eps_k, col_g


def _chunks(x: torch.Tensor, L: int) -> torch.Tensor:
    """(B, NH, S) -> (B, NH, NC, L), zero-padded at the end."""
    S = x.shape[-1]
    return F.pad(x, (0, triton.cdiv(S, L) * L - S)).unflatten(-1, (-1, L))


def _segment_revcumsum(z: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """y_c = z_c + carry_c y_{c+1} (y past the end: 0) along the last dim, carry in {0, 1}: float64 sums of the
    runs of carry = 1 (a reverse cumsum restarted after each carry = 0)."""
    NC = z.shape[-1]
    total = F.pad(z.flip(-1).cumsum(-1).flip(-1), (0, 1))                  # (..., NC + 1) suffix sums, 0 at NC
    idx = torch.arange(NC, device=z.device).expand_as(z)
    stop = torch.where(carry.bool(), NC - 1, idx)                           # a run ends at a carry = 0
    end = stop.flip(-1).cummin(-1).values.flip(-1)                          # (..., NC) first stop >= c
    return total[..., :-1] - total.gather(-1, end + 1)


def _gate_grads(dn, sgn, m, arg, omega, row_g, eps_k, col_g, pp, g, ms, f, L: int, scale: float, i_dtype):
    """di, df by reverse mode through the chunkwise gate algebra (module docstring), in float64. Weights that are
    identically 1 (a row's arg-max decay, w_t where the state holds the row's arg-max, the chunk-end arg-max's
    e_j, rho_c where the state keeps its arg-max) get no gradient: their log-gradients cancel exactly, so they
    are left out rather than summed and cancelled in float."""
    B, NH, S = dn.shape
    NC = triton.cdiv(S, L)
    d = lambda x: x.double()
    t = torch.arange(S, device=dn.device)
    inter = arg.long() < (t // L) * L                                       # (B, NH, S) arg-max in the state
    last = torch.clamp(torch.arange(NC, device=dn.device) * L + L, max=S) - 1   # (NC,) chunks' last tokens
    inter_c, am_c = inter[..., last], arg.long()[..., last]                 # (B, NH, NC) at the chunk ends
    rowtot = torch.where(sgn == 0, -d(dn) * torch.exp(-d(m)), 0.0)          # (B, NH, S) the floor's term
    adj_mu = torch.where(inter, 0.0, -d(omega)) - d(row_g) + rowtot         # (B, NH, S) -> the row's stabilizer
    chunk_of = (t // L).expand_as(arg)
    eps_kept = torch.where((t == am_c.gather(-1, chunk_of)) & ~inter_c.gather(-1, chunk_of), 0.0, d(eps_k))
    e_sum = _chunks(eps_kept, L).sum(-1)                                    # (B, NH, NC)
    rho = torch.exp((d(g[..., last]) + d(ms[..., :NC])) - d(ms[..., 1:]))  # (B, NH, NC) the states' decay
    p_c = torch.where(inter_c, 0.0, rho * d(pp).sum(-1) / scale)            # (B, NH, NC) rho's log-gradient
    local = _chunks(torch.where(inter, adj_mu, d(omega)), L).sum(-1) + p_c  # (B, NH, NC) -> M_c from its rows
    adj_m = _segment_revcumsum(local - torch.where(inter_c, e_sum, 0.0), inter_c)   # (B, NH, NC) dL/dM_c
    adj_next = F.pad(adj_m[..., 1:], (0, 1))                                # (B, NH, NC) dL/dM_{c+1}
    adj_kappa = torch.zeros(B, NH, S + 1, dtype=torch.float64, device=dn.device)     # slot S: dropped
    adj_kappa.scatter_add_(-1, torch.where(inter, S, arg.long()), adj_mu)
    adj_kappa.scatter_add_(-1, torch.where(inter_c, S, am_c), torch.where(inter_c, 0.0, adj_next - e_sum - p_c))
    di = d(col_g) + eps_kept + adj_kappa[..., :S]                           # (B, NH, S)
    adj_g = _chunks(rowtot - di, L)                                         # (B, NH, NC, L) dL/dg
    d_logf = adj_g.flip(-1).cumsum(-1).flip(-1) + adj_next.unsqueeze(-1)    # (B, NH, NC, L) dL/dlogsigmoid(f)
    df = d_logf.flatten(-2)[..., :S] * torch.sigmoid(-d(f))
    return di.to(i_dtype), df.to(f.dtype)


# Run `_gate_grads` through torch.compile on CUDA (checked against eager by the GPU tests, torch 2.11). Off: eager.
# Never on CPU: there Inductor (torch 2.14.1) computes this function wrongly.
COMPILE_GATE_GRADS = True


@functools.cache
def compiled_gate_grads():
    """The one torch.compile of `_gate_grads`, made at its first use."""
    return torch.compile(_gate_grads)


def gate_grads(*args, **kwargs):
    """`_gate_grads`, on CUDA through one torch.compile: eagerly its sixty-odd small float64 operators launch about
    a hundred kernels per call, and in ViL-S that host work left the GPU idle for a third to a half of a step."""
    if not (COMPILE_GATE_GRADS and args[0].is_cuda):
        return _gate_grads(*args, **kwargs)
    return compiled_gate_grads()(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# autograd and entry points
# ----------------------------------------------------------------------------------------------------------

class _MlstmChunkwise(torch.autograd.Function):
    """Forward keeps q, k, v, f and O(S) statistics (and the chunk states if SAVE_STATES); backward recomputes
    the states and walks the chunks. The final state is an output without gradient."""

    @staticmethod
    def forward(ctx, q, k, v, i, f, eps, L, want_state, c0, n0, m0):
        B, NH, S, DH = q.shape
        init = None if c0 is None else (c0, n0, m0)
        lf = F.logsigmoid(f.float()).contiguous()                           # (B, NH, S)
        ig = i.float().contiguous()                                         # (B, NH, S)
        g, m = _f32((B, NH, S), q), _f32((B, NH, S), q)                     # local cumsum, stabilizer
        arg = torch.empty((B, NH, S), dtype=torch.int32, device=q.device)   # the rows' arg-max j*
        cs, cf, ns, ms = _run_states(k, v, lf, ig, L, init, (g, m, arg))
        out, r, sgn = _run_out(q, k, v, g, ig, m, cs, ns, ms, L, eps)
        NC = triton.cdiv(S, L)
        final = (cf, ns[:, :, NC].clone(), ms[:, :, NC].clone()) if want_state else (None,) * 3
        kept = (cs, ns) if SAVE_STATES else (() if init is None else init)
        ctx.save_for_backward(q, k, v, f, lf, ig, g, m, arg, ms, r, sgn, *kept)
        ctx.eps, ctx.L, ctx.i_dtype, ctx.has_init = eps, L, i.dtype, init is not None
        ctx.mark_non_differentiable(*(t for t in final if t is not None))
        return (out, *final)

    @staticmethod
    def backward(ctx, dout, *_):
        q, k, v, f, lf, ig, g, m, arg, ms, r, sgn, *kept = ctx.saved_tensors
        L = ctx.L
        if dout.dtype != q.dtype:
            dout = dout.to(q.dtype)
        if SAVE_STATES and len(kept) == 2:
            cs, ns = kept
        else:
            cs, _, ns, _ = _run_states(k, v, lf, ig, L, tuple(kept) if ctx.has_init else None)
        dq, dn, gn, omega, row_g = _run_dq(q, k, v, dout, g, ig, m, arg, r, sgn, cs, ns, ms, L)
        dcs, dns, pp = _run_dstates(q, dout, g, m, r, gn, ms, cs, ns, L)
        del cs, ns
        dk, dv, eps_k, col_g = _run_dkdv(q, k, v, dout, g, ig, m, arg, r, gn, ms, dcs, dns, L)
        di, df = gate_grads(dn, sgn, m, arg, omega, row_g, eps_k, col_g, pp, g, ms, f, L, 1.0 / math.sqrt(q.shape[-1]),
                             ctx.i_dtype)
        return dq, dk, dv, di, df, None, None, None, None, None, None


def mlstm_chunkwise_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                           eps: float = EPS, chunk_size: int | None = None, initial_state: State | None = None,
                           return_state: bool = False):
    """Chunkwise causal mLSTM. q, k, v (B, NH, S, DH); i, f (B, NH, S) -> h (B, NH, S, DH) in q's dtype, and
    (h, (C, n, m)) with the final state in float32 if return_state. initial_state: (C (B, NH, DH, DH),
    n (B, NH, DH), m (B, NH)) as `chunkwise_reference` defines it; it gets no gradient."""
    if initial_state is not None and any(t.requires_grad for t in initial_state):
        raise ValueError("the Triton chunkwise kernel gives no gradient for initial_state; detach it, or use "
                         "chunkwise_reference.mlstm_chunkwise_reference")
    L = chunk_size_for(q.shape[2], chunk_size)
    init = (None,) * 3 if initial_state is None else tuple(initial_state)
    out, *state = _MlstmChunkwise.apply(q, k, v, i, f, eps, L, return_state, *init)
    return (out, tuple(state)) if return_state else out


def supports(q, k, v, i, f) -> bool:
    """True for CUDA tensors of one float dtype, 16 <= DH <= 512, S >= 1 and int32 per-head offsets."""
    if not (cuda_cell_inputs(q, k, v, i, f) and q.shape[2] >= 1):
        return False
    S, DH = q.shape[2:]
    return max((S - 1) * t.stride(2) + (DH - 1) * t.stride(3) for t in (q, k, v)) <= MAX_OFFSET


__all__ = ["mlstm_chunkwise_triton", "supports", "chunk_size_for", "CHUNK_SIZE"]
