"""The causal mLSTM cell: `reference` (the stabilized parallel form, and the recurrent form as the oracle),
`kernel` (the fused Triton forward and backward), `chunkwise_reference` and `chunkwise` (the chunkwise form,
linear in the sequence length, with a causal state in and out).

Backends of the op "mlstm", dispatched on (q, k, v, i, f): "torch" (the reference), "recurrent" (by name only),
"triton" (CUDA; `kernel.supports` says which shapes and dtypes), the one "auto" picks where it applies, and
"chunkwise" (CUDA; by name, by "auto" beyond the parallel kernel's length limit, and by "auto" from
CHUNKWISE_MIN_SEQ tokens on once that is set).
"""
from __future__ import annotations

import torch

from ..registry import Backend, register, resolve
from .chunkwise_reference import State, mlstm_chunkwise_reference
from .reference import EPS, mlstm_parallel, mlstm_recurrent

register("mlstm", "torch", mlstm_parallel, reference=True)
register("mlstm", "recurrent", mlstm_recurrent, auto=False)
register("mlstm", "triton", "mal.ops.mlstm.kernel:mlstm_triton", "mal.ops.mlstm.kernel:supports", device="cuda")
register("mlstm", "chunkwise", "mal.ops.mlstm.chunkwise:mlstm_chunkwise_triton", "mal.ops.mlstm.chunkwise:supports",
         device="cuda", auto=False)

# backend="auto" runs the chunkwise kernel for rows of at least this many tokens (where it applies), the
# parallel one below; None: the parallel kernel at every length. Measured through ViL-T/S/B forward + backward
# (`benchmarks/vil_long.py --graph`, H200): at 4,096 tokens chunkwise is 1.04-2.2x faster eager and 1.75-2.2x
# replayed from a CUDA graph; at 1,024 it is 0.73-0.94x eager (host-bound) and 1.11-1.21x graphed (docs/fast_path.md).
CHUNKWISE_MIN_SEQ: int | None = 4096


def pick(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
         backend: str = "auto") -> Backend:
    """The backend that runs the cell: the registry's choice, and for "auto" the chunkwise kernel instead from
    CHUNKWISE_MIN_SEQ tokens on (the registry's "auto" does not know the length rule), and wherever the registry
    falls back to the torch form but the chunkwise kernel applies: CUDA rows longer than the parallel kernel's
    MAX_SEQ_LEN, where the torch form's memory grows with S² and the chunkwise kernel's with S."""
    chosen = resolve("mlstm", q, k, v, i, f, backend=backend)
    by_length = CHUNKWISE_MIN_SEQ is not None and q.shape[-2] >= CHUNKWISE_MIN_SEQ
    if backend != "auto" or not (by_length or chosen.reference):
        return chosen
    try:
        return resolve("mlstm", q, k, v, i, f, backend="chunkwise")
    except ValueError:                                  # not CUDA, triton missing, or unsupported shapes
        return chosen


def mlstm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
          backend: str = "auto", eps: float = EPS) -> torch.Tensor:
    """Causal mLSTM cell. q, k, v: (B, NH, S, DH); i, f: (B, NH, S) gate pre-activations -> (B, NH, S, DH)."""
    return pick(q, k, v, i, f, backend)(q, k, v, i, f, eps=eps)


def mlstm_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                    eps: float = EPS, chunk_size: int | None = None, initial_state: State | None = None,
                    return_state: bool = False):
    """The cell with a causal state: h (B, NH, S, DH), and (h, (C, n, m)) with the state after the last token
    if return_state. initial_state: the state before the first token (C (B, NH, DH, DH), n (B, NH, DH),
    m (B, NH); `chunkwise_reference`), e.g. a previous call's, so that a sequence can be run in pieces.
    The Triton kernel where it applies (its state gets no gradient), else the PyTorch form."""
    try:
        fn = resolve("mlstm", q, k, v, i, f, backend="chunkwise").impl
    except ValueError:                                  # not CUDA, triton missing, or unsupported shapes
        fn = mlstm_chunkwise_reference
    return fn(q, k, v, i, f, eps=eps, chunk_size=chunk_size, initial_state=initial_state, return_state=return_state)


__all__ = ["mlstm", "mlstm_chunkwise", "mlstm_parallel", "mlstm_recurrent", "mlstm_chunkwise_reference", "pick",
           "CHUNKWISE_MIN_SEQ", "EPS"]
