"""A ViL block's fast forward: the block's four pieces composed through the ops' registry, with the reorder
between blocks fused into its first and last kernels and its saved activations kept lean."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint

from ...serialization import gather_tokens
from ..mlstm import mlstm
from ..norm import block_up
from ..qkv import block_pre
from ..registry import resolve
from .regions import compiled_region
from .norm_up import NormUp, activation_dtype
from .post import PostFused, block_post
from .pre import block_pre_fused
from .saved import RecomputeQKV, VFromPost


@dataclass(frozen=True)
class FastPath:
    """How a block runs its fast path.

    compile: eager (False) or the two regions around the cell through torch.compile(mode).
    checkpoint: activation checkpointing of the whole block in training (`torch.utils.checkpoint`,
        non-reentrant): the backward keeps only the block input x (B, S, D) and recomputes the block's
        forward (pre-region, mLSTM cell forward, post-region) before its backward. Saves all of the block's
        other saved activations (q, k, v, h, xz, gates, LayerNorm outputs, ...) for one extra block forward
        per training step; no effect without grad.
    recompute_qkv: in training the mLSTM cell's q, k, v are not kept for the backward but recomputed from xz
        there (`RecomputeQKV`): 8 of 24 saved bytes per token and model dim (v alone is re-formed anyway, by the
        post-region's backward kernel) for one more pre-region forward per block (about 6 % of a step,
        docs/performance.md). Not used with checkpoint (which recomputes everything).
    """
    compile: bool = True
    mode: str | None = None
    checkpoint: bool = False
    recompute_qkv: bool = False

    def forward(self, blk: nn.Module, x: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        """`blk` (a `ViLBlock`) on x[:, order] the fast way: `block_forward`."""
        return block_forward(blk, x, self, order)


def _norm_kernel(x: torch.Tensor, order: torch.Tensor | None) -> bool:
    """Whether `NormUp` (the LayerNorm kernels) takes this block input and order in training."""
    return not resolve("norm", x, order, activation_dtype(x)).reference


def block_forward(blk: nn.Module, x: torch.Tensor, fast: FastPath,
                  order: torch.Tensor | None = None) -> torch.Tensor:
    """Fast forward of a `ViLBlock` on x[:, order] (x (B, S, D), order (S,) or (B, S) a permutation of the
    tokens, None = x as it is) -> (B, S, D); same function as `blk`'s plain forward. The reorder and the
    residual (with drop-path's per-sample scale) are fused into the block's first and last kernels (no (B, S, D)
    copy of the residual stream): without grad in the compiled regions, in training (on CUDA) in the LayerNorm
    kernels and the post-region; otherwise the reorder is a gather first."""
    keep_order = not torch.is_grad_enabled() or _norm_kernel(x, order)
    if order is not None and not keep_order:
        x, order = gather_tokens(x, order), None                            # (B, S, D)
    scale = drop_path_scale(blk, x)                                         # (B, 1, 1) or None
    if fast.checkpoint and torch.is_grad_enabled():
        # the drop-path draw (the block's only randomness) stays outside, so the recompute needs no RNG state
        return torch.utils.checkpoint.checkpoint(_branch, blk, x, fast, order, scale, use_reentrant=False,
                                                 preserve_rng_state=False)  # (B, S, D)
    return _branch(blk, x, fast, order, scale)                              # (B, S, D)


def drop_path_scale(blk: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The block's drop-path as a per-sample scale of its branch (B, 1, 1), drawn as timm's `DropPath` draws it
    (one Bernoulli per sample in the branch's dtype, divided by the keep probability): the same mask for the same
    generator state. None where drop-path is the identity (eval, rate 0)."""
    dp = blk.drop_path
    if not blk.training or not getattr(dp, "drop_prob", 0.0):
        return None
    keep = 1.0 - dp.drop_prob
    mask = torch.empty((x.shape[0], 1, 1), dtype=activation_dtype(x), device=x.device).bernoulli_(keep)
    return mask.div_(keep) if keep > 0.0 and dp.scale_by_keep else mask     # (B, 1, 1)


def _up(blk: nn.Module, x: torch.Tensor, fast: FastPath, order: torch.Tensor | None, norm_up: bool):
    """The block's LayerNorm + up-projection -> xz (B, S, 2I), and with `norm_up` (the LayerNorm kernels) the
    residual view of x that `PostFused` takes (else None)."""
    L = blk.layer
    if norm_up:
        return NormUp.apply(fast.compile, fast.mode, x, order, blk.norm.weight, blk.norm.bias, blk.norm.eps,
                            L.proj_up.weight, L.proj_up.bias)               # (B, S, 2I), (B, S, D)
    up = compiled_region(block_up, fast.mode) if fast.compile else block_up
    return up(x, blk.norm.weight, blk.norm.bias, blk.norm.eps, L.proj_up.weight, L.proj_up.bias,
              order=order), None                                            # (B, S, 2I)


def _branch(blk: nn.Module, x: torch.Tensor, fast: FastPath, order: torch.Tensor | None = None,
            scale: torch.Tensor | None = None) -> torch.Tensor:
    """The block on x[:, order]: x[:, order] plus its residual branch (B, S, D), times `scale` (B, 1, 1) if given."""
    L, conv = blk.layer, blk.layer.conv.conv
    post = compiled_region(block_post, fast.mode) if fast.compile else block_post
    wg = torch.cat([L.igate.weight, L.fgate.weight], 0)                     # (2NH, 3I)
    bg = torch.cat([L.igate.bias, L.fgate.bias], 0)                         # (2NH,)
    norm_up = torch.is_grad_enabled() and _norm_kernel(x, order)
    xz, x_res = _up(blk, x, fast, order, norm_up)                           # x_res: residual view for PostFused
    pre_args = (xz, conv.weight, conv.bias, L.q_proj.weight, L.q_proj.bias, L.k_proj.weight, L.k_proj.bias,
                L.v_proj.weight, L.v_proj.bias, wg, bg)
    B, S = xz.shape[:2]
    NH, DH = L.num_heads, L.inner // L.num_heads
    fused_pre = not resolve("qkv", xz, conv.weight, L.q_proj.weight, L.q_proj.bias, L.k_proj.bias, L.v_proj.bias,
                            2 * NH).reference
    # training on CUDA: both regions' backward in `mal.ops.block_grad.kernel` (the pre region hands xz to the post)
    grad_kernels = (fused_pre and torch.is_grad_enabled()
                    and not resolve("block_grad", xz, NH, conv.weight, L.q_proj.weight, 2 * NH).reference)
    if fused_pre:
        pre, pre_kwargs = block_pre_fused, dict(compiled=fast.compile, mode=fast.mode, xz_view=grad_kernels)
    else:
        pre = compiled_region(block_pre, fast.mode) if fast.compile else block_pre
        pre_kwargs = dict(pointwise=fast.compile)
    q, k, v, g, *xz_view = pre(*pre_args, **pre_kwargs)                     # (B, S, I) x 3, (B, S, 2NH)
    heads = lambda t: t.view(B, S, NH, DH).transpose(1, 2)                  # (B, NH, S, DH)
    i, f = g[..., :NH].transpose(1, 2), g[..., NH:].transpose(1, 2)         # (B, NH, S) each
    hooks = v_out = None                                                    # what the cell saves of q, k, v
    if torch.is_grad_enabled() and not fast.checkpoint:
        if fast.recompute_qkv:
            hooks = RecomputeQKV(pre, pre_args, pre_kwargs, (q, k, v))
        elif grad_kernels:
            hooks = v_out = VFromPost(v, xz, L.v_proj.weight, L.v_proj.bias)
    saved = contextlib.nullcontext() if hooks is None else torch.autograd.graph.saved_tensors_hooks(hooks.pack,
                                                                                                     hooks.unpack)
    with saved:
        h = mlstm(heads(q), heads(k), heads(v), i, f, backend=L.backend)    # (B, NH, S, DH)
    post_args = (conv.weight, conv.bias, L.outnorm, L.outnorm_bias, L.skip, L.proj_down.weight, L.proj_down.bias)
    if grad_kernels:
        residual = x_res if norm_up else x                                  # (with order, norm_up holds)
        return PostFused.apply(fast.compile, fast.mode, h, xz_view[0], residual, *post_args, order,
                               v_out, scale)                                # (B, S, D)
    return post(h, xz, x, *post_args, order=order, scale=scale)             # (B, S, D)


__all__ = ["FastPath", "block_forward"]
