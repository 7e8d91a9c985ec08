"""The fused ops of the ViL block and of the pretraining decoder, one folder each with the PyTorch reference (the
oracle) beside its Triton kernel, and one dispatch (`registry`) that picks the backend per call:

    mlstm       the causal mLSTM cell                        (backends torch, recurrent, triton)
    headwise    the block-diagonal q/k/v maps' weight gradient (torch, triton)
    qkv         the pre-cell step: conv + SiLU, q/k/v, gates  (torch, triton)
    norm        the pre-LayerNorm + up-projection              (torch, triton)
    block_grad  the backward of the regions around the cell    (torch, triton)
    attention   the pretraining decoder's masked attention     (torch, triton)

`vil_block` composes them into a block's fast path. Importing this package imports no Triton: a kernel module
is imported when its backend is resolved for CUDA inputs.
"""
from __future__ import annotations

from . import attention, block_grad, headwise, norm, qkv  # noqa: F401  (register their backends)
from .mlstm import EPS, mlstm
from .registry import backends, resolve

__all__ = ["mlstm", "resolve", "backends", "EPS"]
