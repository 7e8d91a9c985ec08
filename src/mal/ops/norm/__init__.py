"""The ViL block's pre-LayerNorm + up-projection: `reference` (`block_up`, plain PyTorch) and `kernel` (the
LayerNorm for training in Triton: the token reorder in its loads, the backward joined with the residual's).

Backends of the op "norm", dispatched on (x, order, out_dtype): "torch" (`block_up`) and "triton" (CUDA,
`kernel.supports`), whose implementation is the kernel module that `mal.ops.vil_block.norm_up.NormUp` composes
with the up-projection.
"""
from __future__ import annotations

from ..registry import register
from .reference import block_up

register("norm", "torch", block_up, reference=True)
register("norm", "triton", "mal.ops.norm.kernel", "mal.ops.norm.kernel:supports", device="cuda")

__all__ = ["block_up"]
