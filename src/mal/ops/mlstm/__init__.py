"""The causal mLSTM cell: `reference` (the stabilized parallel form, and the recurrent form as the oracle) and
`kernel` (the fused Triton forward and backward).

Backends of the op "mlstm", dispatched on (q, k, v, i, f): "torch" (the reference), "recurrent" (by name only)
and "triton" (CUDA; `kernel.supports` says which shapes and dtypes), the one "auto" picks where it applies.
"""
from __future__ import annotations

import torch

from ..registry import register, resolve
from .reference import EPS, mlstm_parallel, mlstm_recurrent

register("mlstm", "torch", mlstm_parallel, reference=True)
register("mlstm", "recurrent", mlstm_recurrent, auto=False)
register("mlstm", "triton", "mal.ops.mlstm.kernel:mlstm_triton", "mal.ops.mlstm.kernel:supports", device="cuda")


def mlstm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
          backend: str = "auto", eps: float = EPS) -> torch.Tensor:
    """Causal mLSTM cell. q, k, v: (B, NH, S, DH); i, f: (B, NH, S) gate pre-activations -> (B, NH, S, DH)."""
    return resolve("mlstm", q, k, v, i, f, backend=backend)(q, k, v, i, f, eps=eps)


__all__ = ["mlstm", "mlstm_parallel", "mlstm_recurrent", "EPS"]
