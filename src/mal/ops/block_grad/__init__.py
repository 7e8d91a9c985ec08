"""The backward of the ViL block's pointwise regions around the cell: `reference` (the pre-cell step's backward
written out in PyTorch; the post tail's is autograd of `vil_block.post.block_post`) and `kernel` (both regions'
backward in Triton, the conv's backward once for both).

Backends of the op "block_grad", dispatched on (xz, num_heads, conv_w, wq, n_gates): "torch" (`block_pre_vjp`)
and "triton" (CUDA fp16/bf16, `kernel.supports`), whose implementation is the kernel module that
`mal.ops.vil_block` composes (`PostFused`, `QKVGates`).
"""
from __future__ import annotations

from ..registry import register
from .reference import block_pre_vjp, gate_weights_grad, pre_weight_grads

register("block_grad", "torch", block_pre_vjp, reference=True)
register("block_grad", "triton", "mal.ops.block_grad.kernel", "mal.ops.block_grad.kernel:supports", device="cuda")

__all__ = ["block_pre_vjp", "gate_weights_grad", "pre_weight_grads"]
