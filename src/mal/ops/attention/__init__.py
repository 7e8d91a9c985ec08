"""Masked softmax attention of the pretraining decoders: `reference` (SDPA, and the eager math form as the oracle)
and `kernel` (short sequences, all keys in one tile, in Triton).

Backends of the op "attention", dispatched on (q, k, v, mask): "triton" (CUDA, `kernel.supports`: fp16/bf16, up to
256 tokens, heads of 16, 32 or 64; about half SDPA's time at the decoder's shape, `benchmarks/decoder_attention.py`)
and "torch" (SDPA, the reference and the fallback).
"""
from __future__ import annotations

import torch

from ..registry import register, resolve
from .reference import attention_math, attention_sdpa

register("attention", "torch", attention_sdpa, reference=True)
register("attention", "triton", "mal.ops.attention.kernel:attention_triton", "mal.ops.attention.kernel:supports",
         device="cuda")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, backend: str = "auto"
              ) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh), masked) v: q, k, v (B, H, M, Dh), mask (M, M) bool (True: query i sees key j)
    -> (B, H, M, Dh), by `backend`."""
    return resolve("attention", q, k, v, mask, backend=backend)(q, k, v, mask)


__all__ = ["attention", "attention_sdpa", "attention_math"]
