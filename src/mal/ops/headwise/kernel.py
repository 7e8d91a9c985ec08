"""Weight gradient of the 4x4 block-diagonal q/k/v maps in Triton.

    dW[h] = sum_n g[n, h, :]^T x[n, h, :]        g, x: (N, nb*bs) -> dW: (nb, bs, bs)

One program takes a group of C channels (C/bs blocks) and a chunk of tokens, accumulates the (C, C) product
g^T x of its tiles on tensor cores, keeps the diagonal (bs, bs) blocks and writes them as one partial sum;
torch adds the partials of the token chunks (deterministic, no atomics). The maps of a block (q, k, v) are one
launch each into one buffer of partials, added by one reduction kernel. It reads g and x once and does C/bs
times the needed FLOPs, where one dense (I, N) x (N, I) GEMM does I/bs times (384 x at ViL-B's I = 1536,
which made that GEMM 8 % of a B training step).
"""
from __future__ import annotations

import torch

import triton  # imported by the ops' registry only for CUDA inputs; without triton the backend is unavailable
import triton.language as tl

GROUP = 64                  # channels per program: a (64, 64) tile product, multiple of every block size used
BLOCK_N = 64                # tokens per tile
CHUNK = 1024                # tokens per program (a multiple of BLOCK_N); N / CHUNK partial sums
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _wgrad_kernel(G, X, OUT, N, stride_g, stride_x, CHUNK_N: tl.constexpr, C: tl.constexpr, BS: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid_c, pid_s = tl.program_id(0), tl.program_id(1)
    cols = pid_c * C + tl.arange(0, C)                                       # (C,) channels of this group
    acc = tl.zeros((C, C), dtype=tl.float32)
    for start in range(pid_s * CHUNK_N, pid_s * CHUNK_N + CHUNK_N, BLOCK):
        rows = start + tl.arange(0, BLOCK)                                   # (BLOCK,) tokens
        valid = (rows < N)[:, None]
        g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=valid, other=0.0)  # (BLOCK, C)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=valid, other=0.0)  # (BLOCK, C)
        acc += tl.dot(tl.trans(g), x)                                        # (C, C)
    r, c = tl.arange(0, C)[:, None], tl.arange(0, C)[None, :]
    diag = (r // BS) == (c // BS)                                            # the (BS, BS) blocks on the diagonal
    block = (pid_c * C + r) // BS                                            # (C, 1) block index h
    offs = pid_s * (tl.num_programs(0) * C * BS) + block * (BS * BS) + (r % BS) * BS + (c % BS)
    tl.store(OUT + offs, acc, mask=diag)


def _pair_ok(g: torch.Tensor, x: torch.Tensor, bs: int) -> bool:
    return (g.dim() == 2 and g.shape == x.shape and g.dtype == x.dtype and g.dtype in SUPPORTED_DTYPES
            and g.device == x.device and g.device.type == "cuda" and g.stride(1) == 1 and x.stride(1) == 1
            and g.shape[1] % GROUP == 0 and GROUP % bs == 0 and g.shape[0] > 0
            and (g.shape[0] + CHUNK) * max(g.stride(0), x.stride(0)) < 2 ** 31)


def supports(*args) -> bool:
    """args = (g0, x0, g1, x1, ..., bs): CUDA fp16/bf16 (N, I) pairs of one shape and dtype with unit channel
    stride, GROUP | I, bs | GROUP, offsets within int32."""
    *pairs, bs = args
    same = all(t.shape == pairs[0].shape and t.dtype == pairs[0].dtype for t in pairs)
    return (len(pairs) >= 2 and len(pairs) % 2 == 0 and same
            and all(_pair_ok(g, x, bs) for g, x in zip(pairs[::2], pairs[1::2])))


@torch.library.custom_op("mal::headwise_wgrad", mutates_args=())
def _headwise_wgrads(gs: list[torch.Tensor], xs: list[torch.Tensor], bs: int) -> torch.Tensor:
    """P pairs g, x (N, nb*bs) -> dW (P, nb, bs, bs) in float32: the diagonal blocks of each g^T x, one launch
    per pair into one buffer of partials and one sum for all (see the module docstring)."""
    N, I = xs[0].shape
    splits = triton.cdiv(N, CHUNK)
    partial = torch.empty(len(xs), splits, I // bs, bs, bs, device=xs[0].device, dtype=torch.float32)  # all written
    for g, x, out in zip(gs, xs, partial):
        _wgrad_kernel[(I // GROUP, splits)](g, x, out, N, g.stride(0), x.stride(0), CHUNK_N=CHUNK, C=GROUP, BS=bs,
                                            BLOCK=BLOCK_N)
    return partial.sum(1)                                                    # (P, nb, bs, bs)


@_headwise_wgrads.register_fake
def _(gs: list[torch.Tensor], xs: list[torch.Tensor], bs: int) -> torch.Tensor:
    return xs[0].new_empty(len(xs), xs[0].shape[1] // bs, bs, bs, dtype=torch.float32)


def headwise_wgrad(*args) -> torch.Tensor:
    """args = (g0, x0, g1, x1, ..., bs) -> (P, nb, bs, bs) float32: the weight gradients of P block-diagonal
    maps of one shape (the q, k and v maps of a block) with one reduction kernel for all."""
    *pairs, bs = args
    return _headwise_wgrads(list(pairs[::2]), list(pairs[1::2]), bs)


__all__ = ["headwise_wgrad", "supports", "GROUP"]
