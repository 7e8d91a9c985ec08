"""Masked softmax attention for short sequences in Triton: all M <= 256 keys of a (batch, head) in one tile.

The pretraining decoder attends over M = 128 tokens (MAL-T on Imagenette-96) with heads of 32 channels and a
block-causal mask; there SDPA's kernels are far from the memory bound (docs/performance.md). One program takes one
(batch, head): it loads K and V once and walks the queries in blocks of BQ rows, so the softmax needs no online
rescaling and the backward no atomics (`BWD_KEYS` splits the backward instead: one program per block of keys for
dK and dV, a second kernel per block of queries for dQ, each skipping the tiles the mask hides whole):

    forward    S = q k^T / sqrt(Dh) (masked), P = softmax(S), O = P V; keeps lse = log-sum-exp of each row
    backward   P again from lse, dV = P^T dO, dP = dO V^T, dS = P (dP - delta) with delta = rowsum(dO O),
               dQ = dS K / sqrt(Dh), dK = dS^T Q / sqrt(Dh)

The mask is the (M, M) bool matrix SDPA takes. A row that sees no key gives 0 (SDPA gives NaN). Arithmetic is
float32 with the products in the inputs' dtype (IEEE float32 for float32 inputs).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

import triton  # imported by the ops' registry only for CUDA inputs; without triton the backend is unavailable
import triton.language as tl

MAX_TOKENS = 256            # all keys in one tile
HEAD_DIMS = (16, 32, 64)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)   # the op's dtypes; the kernels also take float32 (IEEE products,
                                                     # tested in the interpreter) but are timed only in 16 bits
FWD_CONFIG = (64, 4)        # (BQ query rows per block, warps): benchmarks/decoder_attention.py --sweep
BWD_CONFIG = (64, 4)
BWD_KEYS = None             # keys per backward program: None, all M in one kernel; else blocks of BWD_KEYS keys
                            # (dK, dV) and a second kernel for dQ, both skipping the mask's fully hidden tiles
LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _seen(MASK, rows, cols, M, smq, smk):
    """The mask's tile (BQ, BK): True where query row i sees key j (False past M)."""
    return tl.load(MASK + rows[:, None] * smq + cols[None, :] * smk,
                   mask=(rows < M)[:, None] & (cols < M)[None, :], other=0) != 0


@triton.jit
def _scores(q, k, seen, scale2, IEEE: tl.constexpr):
    """Scores in log2 units (BQ, BK) of the query rows against the keys, -inf where the mask hides the key."""
    return tl.where(seen, _dot(q, tl.trans(k), IEEE) * scale2, float("-inf"))


@triton.jit
def _dscores(p, do, v, delta, IEEE: tl.constexpr):
    """dS = P (dO V^T - delta) (BQ, BK), float32."""
    return p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])


@triton.jit
def _load_rows(T, b, h, rows, d, sb, sh, sm, M):
    """Rows `rows` of head (b, h) of a (B, H, M, Dh) tensor: (len(rows), Dh), 0 past M."""
    return tl.load(T + b * sb + h * sh + rows[:, None] * sm + d[None, :], mask=(rows < M)[:, None], other=0.0)


@triton.jit
def _store_rows(T, x, b, h, rows, d, sb, sh, sm, M):
    tl.store(T + b * sb + h * sh + rows[:, None] * sm + d[None, :], x.to(T.dtype.element_ty), mask=(rows < M)[:, None])


@triton.jit
def _query_rows(Q, O, DO, LSE, pid, b, h, rows, d, M, sqb, sqh, sqm, sob, soh, som, sdb, sdh, sdm):
    """A block of query rows for the backward: q, dO (BQ, D), lse (BQ,) (inf past M: P = 0 there) and
    delta = rowsum(dO O) (BQ,)."""
    q = _load_rows(Q, b, h, rows, d, sqb, sqh, sqm, M)                      # (BQ, D)
    do = _load_rows(DO, b, h, rows, d, sdb, sdh, sdm, M)                    # (BQ, D)
    o = _load_rows(O, b, h, rows, d, sob, soh, som, M)                      # (BQ, D)
    lse = tl.load(LSE + pid * M + rows, mask=rows < M, other=float("inf"))
    return q, do, lse, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)


@triton.jit
def _key_rows(K, V, b, h, cols, d, M, skb, skh, skm, svb, svh, svm):
    """k and v (BK, D) of a block of keys."""
    return _load_rows(K, b, h, cols, d, skb, skh, skm, M), _load_rows(V, b, h, cols, d, svb, svh, svm, M)


@triton.jit
def _store_dkdv(DK, DV, dk, dv, scale, b, h, cols, d, M, skb, skh, skm, svb, svh, svm):
    _store_rows(DK, dk * scale, b, h, cols, d, skb, skh, skm, M)
    _store_rows(DV, dv, b, h, cols, d, svb, svh, svm, M)


@triton.jit
def _attn_fwd_kernel(Q, K, V, MASK, O, LSE, H, M, scale2,
                     sqb, sqh, sqm, skb, skh, skm, svb, svh, svm, sob, soh, som, smq, smk,
                     BQ: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    cols, d = tl.arange(0, BK), tl.arange(0, D)
    k, v = _key_rows(K, V, b, h, cols, d, M, skb, skh, skm, svb, svh, svm)  # (BK, D) each, all keys
    for q0 in range(0, M, BQ):
        rows = q0 + tl.arange(0, BQ)                                         # (BQ,) queries
        q = _load_rows(Q, b, h, rows, d, sqb, sqh, sqm, M)                  # (BQ, D)
        s = _scores(q, k, _seen(MASK, rows, cols, M, smq, smk), scale2, IEEE)  # (BQ, BK) log2 units
        mx = tl.max(s, 1)
        mx = tl.where(mx == float("-inf"), 0.0, mx)                          # a row that sees nothing
        p = tl.exp2(s - mx[:, None])                                         # (BQ, BK)
        den = tl.sum(p, 1)
        o = _dot(p.to(v.dtype), v, IEEE) / tl.where(den > 0, den, 1.0)[:, None]  # (BQ, D)
        _store_rows(O, o, b, h, rows, d, sob, soh, som, M)
        lse = tl.where(den > 0, mx + tl.log2(tl.where(den > 0, den, 1.0)), float("inf"))  # inf: P = 0 in the backward
        tl.store(LSE + pid * M + rows, lse, mask=rows < M)


@triton.jit
def _attn_bwd_kernel(Q, K, V, MASK, O, LSE, DO, DQ, DK, DV, H, M, scale2, scale,
                     sqb, sqh, sqm, skb, skh, skm, svb, svh, svm, sob, soh, som, sdb, sdh, sdm, smq, smk,
                     BQ: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    """All keys of a head in one tile: dK and dV accumulate over the query blocks, dQ of a block is whole at once."""
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    cols, d = tl.arange(0, BK), tl.arange(0, D)
    k, v = _key_rows(K, V, b, h, cols, d, M, skb, skh, skm, svb, svh, svm)  # (BK, D) each
    dk = tl.zeros((BK, D), dtype=tl.float32)
    dv = tl.zeros((BK, D), dtype=tl.float32)
    for q0 in range(0, M, BQ):
        rows = q0 + tl.arange(0, BQ)
        q, do, lse, delta = _query_rows(Q, O, DO, LSE, pid, b, h, rows, d, M,
                                        sqb, sqh, sqm, sob, soh, som, sdb, sdh, sdm)
        p = tl.exp2(_scores(q, k, _seen(MASK, rows, cols, M, smq, smk), scale2, IEEE) - lse[:, None])  # (BQ, BK)
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)                       # (BK, D)
        ds = _dscores(p, do, v, delta, IEEE).to(q.dtype)                     # (BQ, BK)
        _store_rows(DQ, _dot(ds, k, IEEE) * scale, b, h, rows, d, sqb, sqh, sqm, M)
        dk += _dot(tl.trans(ds), q, IEEE)                                    # (BK, D)
    _store_dkdv(DK, DV, dk, dv, scale, b, h, cols, d, M, skb, skh, skm, svb, svh, svm)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, MASK, O, LSE, DO, DQ, DK, DV, H, M, scale2, scale,
                          sqb, sqh, sqm, skb, skh, skm, svb, svh, svm, sob, soh, som, sdb, sdh, sdm, smq, smk,
                          BQ: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    """dK and dV of one block of BK keys (program id 1), over the query blocks whose mask tile sees one of them."""
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    cols, d = tl.program_id(1) * BK + tl.arange(0, BK), tl.arange(0, D)
    k, v = _key_rows(K, V, b, h, cols, d, M, skb, skh, skm, svb, svh, svm)  # (BK, D) each
    dk = tl.zeros((BK, D), dtype=tl.float32)
    dv = tl.zeros((BK, D), dtype=tl.float32)
    for q0 in range(0, M, BQ):
        rows = q0 + tl.arange(0, BQ)
        seen = _seen(MASK, rows, cols, M, smq, smk)                          # (BQ, BK)
        if tl.max(seen.to(tl.int32)) > 0:                                    # a fully hidden tile adds nothing
            q, do, lse, delta = _query_rows(Q, O, DO, LSE, pid, b, h, rows, d, M,
                                            sqb, sqh, sqm, sob, soh, som, sdb, sdh, sdm)
            p = tl.exp2(_scores(q, k, seen, scale2, IEEE) - lse[:, None])   # (BQ, BK)
            dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)                   # (BK, D)
            dk += _dot(tl.trans(_dscores(p, do, v, delta, IEEE).to(q.dtype)), q, IEEE)  # (BK, D)
    _store_dkdv(DK, DV, dk, dv, scale, b, h, cols, d, M, skb, skh, skm, svb, svh, svm)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, MASK, O, LSE, DO, DQ, DK, DV, H, M, scale2, scale,
                        sqb, sqh, sqm, skb, skh, skm, svb, svh, svm, sob, soh, som, sdb, sdh, sdm, smq, smk,
                        BQ: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    """dQ of one block of BQ queries (program id 1), over the key blocks its mask tile sees."""
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    rows, d = tl.program_id(1) * BQ + tl.arange(0, BQ), tl.arange(0, D)
    q, do, lse, delta = _query_rows(Q, O, DO, LSE, pid, b, h, rows, d, M,
                                    sqb, sqh, sqm, sob, soh, som, sdb, sdh, sdm)
    dq = tl.zeros((BQ, D), dtype=tl.float32)
    for k0 in range(0, M, BK):
        cols = k0 + tl.arange(0, BK)
        seen = _seen(MASK, rows, cols, M, smq, smk)                          # (BQ, BK)
        if tl.max(seen.to(tl.int32)) > 0:
            k, v = _key_rows(K, V, b, h, cols, d, M, skb, skh, skm, svb, svh, svm)  # (BK, D) each
            p = tl.exp2(_scores(q, k, seen, scale2, IEEE) - lse[:, None])   # (BQ, BK)
            dq += _dot(_dscores(p, do, v, delta, IEEE).to(q.dtype), k, IEEE)  # (BQ, D)
    _store_rows(DQ, dq * scale, b, h, rows, d, sqb, sqh, sqm, M)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> bool:
    """CUDA fp16/bf16 q, k, v (B, H, M, Dh) of one dtype with unit channel stride, M <= MAX_TOKENS, Dh in
    HEAD_DIMS, and an (M, M) bool mask on the same device (float32 goes to SDPA)."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v, mask)) or q.dim() != 4:
        return False
    B, H, M, D = q.shape
    return (q.is_cuda and k.shape == q.shape and v.shape == q.shape and q.dtype in SUPPORTED_DTYPES
            and k.dtype == q.dtype and v.dtype == q.dtype and all(t.stride(-1) == 1 for t in (q, k, v))
            and k.device == q.device and v.device == q.device and mask.device == q.device
            and mask.dtype == torch.bool and mask.shape == (M, M) and 1 <= M <= MAX_TOKENS and D in HEAD_DIMS
            and B * H > 0)


@contextlib.contextmanager
def launch_config(**settings) -> Iterator[None]:
    """Inside the block, the named launch settings (FWD_CONFIG, BWD_CONFIG, BWD_KEYS) take the given values; the
    previous ones come back after (for sweeps and tests)."""
    unknown = sorted(set(settings) - {"FWD_CONFIG", "BWD_CONFIG", "BWD_KEYS"})
    if unknown:
        raise ValueError(f"unknown attention launch settings {unknown}; use FWD_CONFIG, BWD_CONFIG or BWD_KEYS")
    saved = {name: globals()[name] for name in settings}
    globals().update(settings)
    try:
        yield
    finally:
        globals().update(saved)


def _blocks(M: int, config: tuple) -> tuple[int, int, int]:
    """(BQ query rows, BK keys: all M padded to a power of two >= 16, warps) of a launch for M tokens."""
    bq, warps = config
    bk = max(16, triton.next_power_of_2(M))
    return min(bq, bk), bk, warps


def _like_heads_last(q: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, M, Dh) tensor laid out as (B, M, H, Dh): `.transpose(1, 2).reshape(B, M, H * Dh)` of it,
    as a Transformer block does next, needs no copy."""
    B, H, M, D = q.shape
    return q.new_empty(B, M, H, D).transpose(1, 2)


def _s3(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and token strides of a (B, H, M, Dh) tensor (the channel stride is 1)."""
    return t.stride(0), t.stride(1), t.stride(2)


@torch.library.custom_op("mal::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, M, Dh), mask (M, M) -> out (B, H, M, Dh) laid out heads-last, lse (B, H, M) float32 (log2)."""
    B, H, M, D = q.shape
    out, lse = _like_heads_last(q), torch.empty(B, H, M, device=q.device, dtype=torch.float32)
    bq, bk, warps = _blocks(M, FWD_CONFIG)
    m8 = mask.view(torch.uint8)
    _attn_fwd_kernel[(B * H,)](q, k, v, m8, out, lse, H, M, LOG2E / math.sqrt(D),
                               *_s3(q), *_s3(k), *_s3(v), *_s3(out), m8.stride(0), m8.stride(1),
                               BQ=bq, BK=bk, D=D, IEEE=q.dtype == torch.float32, num_warps=warps)
    return out, lse


@attention_fwd.register_fake
def _(q, k, v, mask):
    B, H, M, D = q.shape
    return _like_heads_last(q), q.new_empty(B, H, M, dtype=torch.float32)


@torch.library.custom_op("mal::attention_bwd", mutates_args=())
def attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients dq, dk, dv (in q's, k's and v's layouts) from the forward's out, lse and dout."""
    B, H, M, D = q.shape
    dq, dk, dv = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in (q, k, v))
    bq, bk, warps = _blocks(M, BWD_CONFIG)
    m8 = mask.view(torch.uint8)
    dout = dout.to(q.dtype) if dout.stride(-1) == 1 else dout.to(q.dtype).contiguous()
    args = (q, k, v, m8, out, lse, dout, dq, dk, dv, H, M, LOG2E / math.sqrt(D), 1.0 / math.sqrt(D),
            *_s3(q), *_s3(k), *_s3(v), *_s3(out), *_s3(dout), m8.stride(0), m8.stride(1))
    meta = dict(D=D, IEEE=q.dtype == torch.float32, num_warps=warps)
    if BWD_KEYS is None:
        _attn_bwd_kernel[(B * H,)](*args, BQ=bq, BK=bk, **meta)
    else:
        bk = min(BWD_KEYS, bk)
        _attn_bwd_dkdv_kernel[(B * H, triton.cdiv(M, bk))](*args, BQ=bq, BK=bk, **meta)
        _attn_bwd_dq_kernel[(B * H, triton.cdiv(M, bq))](*args, BQ=bq, BK=bk, **meta)
    return dq, dk, dv


@attention_bwd.register_fake
def _(q, k, v, mask, out, lse, dout):
    return tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, mask = inputs
    ctx.save_for_backward(q, k, v, mask, *output)


def _backward(ctx, dout, dlse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    return (*attention_bwd(q, k, v, mask, out, lse, dout), None)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.mal.attention_fwd)
def _fwd_flops(q, k, v, mask, *args, **kwargs) -> int:
    """SDPA's count for the same shapes (FlopCounterMode passes shapes): the kernel skips no masked work."""
    return sdpa_flop_count(q, k, v)


@register_flop_formula(torch.ops.mal.attention_bwd)
def _bwd_flops(q, k, v, mask, out, lse, dout, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(dout, q, k, v)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked softmax attention, q, k, v (B, H, M, Dh), mask (M, M) bool -> (B, H, M, Dh) (see the module
    docstring)."""
    return attention_fwd(q, k, v, mask)[0]


__all__ = ["attention_triton", "attention_fwd", "attention_bwd", "launch_config", "supports", "MAX_TOKENS",
           "HEAD_DIMS"]
