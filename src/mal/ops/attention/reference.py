"""Masked softmax attention in PyTorch: SDPA (what the pretraining decoder runs, the reference and fallback of the
"attention" op) and the eager math form (the tests' oracle)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh), keys where mask is False left out) v: q, k, v (B, H, M, Dh), mask (M, M) bool
    (True: query i sees key j) -> (B, H, M, Dh)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same in eager PyTorch, in q's dtype (float64 in the tests)."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])                   # (B, H, M, M)
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v        # (B, H, M, Dh)


__all__ = ["attention_sdpa", "attention_math"]
