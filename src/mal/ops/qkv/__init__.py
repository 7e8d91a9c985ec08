"""The ViL block's pre-cell step (causal conv + SiLU, the q/k/v maps, both gates): `reference` (plain PyTorch)
and `kernel` (one Triton kernel).

Backends of the op "qkv", dispatched on (xz, conv_w, wq, bq, bk, bv, n_gates) and called as
`qkv_gates(xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, w_c, w_m, b_g)`: "torch" (the reference) and "triton"
(CUDA fp16/bf16, `kernel.supports`).
"""
from __future__ import annotations

from ..registry import register
from .reference import block_pre, causal_conv, causal_conv_silu, gate_weights, qkv_gates

register("qkv", "torch", qkv_gates, reference=True)
register("qkv", "triton", "mal.ops.qkv.kernel:qkv_gates", "mal.ops.qkv.kernel:supports", device="cuda")

__all__ = ["block_pre", "causal_conv", "causal_conv_silu", "gate_weights", "qkv_gates"]
