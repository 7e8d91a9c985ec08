"""The one dispatch point for the mLSTM cell.

`mlstm(q, k, v, i, f, backend="auto")` runs the named backend. Backends register themselves with
`register_backend(name, fn, supports)`; `supports(q, k, v, i, f)` says whether the kernel can take
these tensors (device, dtype, head dim, length). "auto" picks the first registered fast backend that
supports the input and falls back to the PyTorch parallel form otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .mlstm_torch import EPS, mlstm_parallel, mlstm_recurrent

MlstmFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    fn: MlstmFn
    supports: Callable[..., bool]


_BACKENDS: dict[str, Backend] = {}
_AUTO_ORDER: list[str] = []


def register_backend(name: str, fn: MlstmFn, supports: Callable[..., bool], auto: bool = True) -> None:
    """Add a backend; `auto=True` makes it a candidate for backend="auto" (tried before "torch")."""
    _BACKENDS[name] = Backend(name, fn, supports)
    if auto and name not in _AUTO_ORDER:
        _AUTO_ORDER.append(name)


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def resolve_backend(q, k, v, i, f, backend: str = "auto") -> Backend:
    """The backend that `mlstm` would run for these tensors."""
    if backend == "auto":
        for name in _AUTO_ORDER:
            b = _BACKENDS[name]
            if b.supports(q, k, v, i, f):
                return b
        return _BACKENDS["torch"]
    if backend not in _BACKENDS:
        raise ValueError(f"unknown mLSTM backend {backend!r}; choose one of {['auto'] + available_backends()}")
    b = _BACKENDS[backend]
    if not b.supports(q, k, v, i, f):
        raise ValueError(f"mLSTM backend {backend!r} does not support q of shape {tuple(q.shape)}, "
                         f"dtype {q.dtype} on {q.device}; use backend='auto' to fall back to 'torch'")
    return b


def mlstm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
          backend: str = "auto", eps: float = EPS) -> torch.Tensor:
    """Causal mLSTM cell. q, k, v: (B, NH, S, DH); i, f: (B, NH, S) gate pre-activations -> (B, NH, S, DH)."""
    return resolve_backend(q, k, v, i, f, backend).fn(q, k, v, i, f, eps=eps)


register_backend("torch", mlstm_parallel, lambda *a: True, auto=False)
register_backend("recurrent", mlstm_recurrent, lambda *a: True, auto=False)

try:  # the fused Triton kernel registers itself as "triton" when triton and CUDA are present
    from . import mlstm_triton  # noqa: F401
except ImportError:
    pass

__all__ = ["mlstm", "mlstm_parallel", "mlstm_recurrent", "register_backend", "resolve_backend",
           "available_backends", "EPS"]
