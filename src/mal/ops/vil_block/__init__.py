"""Fast path of a ViL block (DESIGN §6): the same function as `ViLBlock`'s plain forward, in fewer kernels.

A block runs as four pieces: `block_up` (pre-LayerNorm, up-projection), `block_pre` (causal conv + SiLU,
q/k/v and both gates), the mLSTM cell (`mal.ops.mlstm`, eager: the fused Triton kernel on the GPU), and
`block_post` (per-head norm, learnable skip, output gate, down-projection, residual). The three regions are
pure functions of tensors, so one `torch.compile` of each serves every block of a model (and every model of
the same shapes), and they never trace the Triton kernel (inductor 2.11 cannot compile it into one whole-block
graph: cumsum scan codegen and the kernel's compile). Which backend runs each op is the registry's choice
(`mal.ops.registry.resolve`).

Algebra used (exact in real arithmetic, so the fused block equals the plain one up to rounding):
  * the gates are linear in [q, k, v] and q, k, v are affine in (x_c, x_m), so
        gates = x_c @ (Wg_q Wq + Wg_k Wk)^T + x_m @ (Wg_v Wv)^T + (bg + Wg_q bq + Wg_k bk + Wg_v bv)
    and the (B, S, 3I) concatenation and its two GEMMs become two thin GEMMs on tensors we have anyway;
  * the depthwise causal conv is K shifted multiply-adds (fused by the compiler with SiLU and q/k);
  * the 4x4 block-diagonal q/k/v maps are a broadcast multiply + sum over 4 inputs when compiled
    (a pointwise kernel; their weight gradients from the headwise op: `mal.ops.headwise.kernel` on the GPU,
    else the diagonal blocks of one GEMM), an einsum in eager mode;
  * on CUDA in fp16/bf16 `block_pre` is one Triton kernel (`mal.ops.qkv.kernel`, through `QKVGates`); in
    training there both regions' backward is `mal.ops.block_grad.kernel` (`QKVGates` hands xz to `PostFused`,
    whose backward passes the post tail's x_c gradient and dz back through it: the conv's backward runs once
    and dxz is written once), and the post tail's forward is that module's `post_fwd` kernel up to the
    down-projection (then `block_down`, compiled), otherwise (e.g. a head dim that is not a multiple of 16)
    `QKVGates`' backward is the written-out `block_pre_vjp` (compiled) and `block_post`'s is inductor's;
  * the reorder between blocks (`order`) is no gather of its own: without grad it is inside the compiled up-
    and post-regions; in training on CUDA `NormUp` (`mal.ops.norm.kernel`) reads x's rows through it and
    scatters the gradient back, joined with the residual's, and the compiled `block_down` gathers the residual;
  * for the backward, `block_pre` and `block_post` save nothing but their inputs (`regions.MEMORY_BUDGET`):
    x_c, the conv's padded input, SiLU and the per-head norm are recomputed from xz and h, which the block keeps
    anyway; `NormUp` keeps x and its row statistics, not the LayerNorm's output; with the kernels' backward
    the cell's v is formed again by `post_grad` (`VFromPost`), so a block keeps x, xz, q, k and h (24 bytes per
    token and model dim in bf16 autocast, from 30); with `FastPath.recompute_qkv` q and k are recomputed too,
    by re-running the pre-step when the cell's backward needs them (`RecomputeQKV`).
Parameter names and state dicts are untouched: the fast path only reads the block's parameters.

Modules: `block` (FastPath, block_forward), `regions` (the compiled regions), `norm_up` (NormUp), `pre`
(QKVGates), `post` (block_post, block_down, PostFused), `saved` (RecomputeQKV, VFromPost).
"""
from __future__ import annotations

from .block import FastPath, block_forward

__all__ = ["FastPath", "block_forward"]
