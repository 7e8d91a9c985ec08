"""Fast path of a ViL block (DESIGN §6): the same function as `ViLBlock`'s plain forward, in fewer kernels.

A block runs as four pieces: `block_up` (pre-LayerNorm, up-projection), `block_pre` (causal conv + SiLU,
q/k/v and both gates), the mLSTM cell (`mal.kernels.mlstm`, eager: the fused Triton kernel on the GPU), and
`block_post` (per-head norm, learnable skip, output gate, down-projection, residual). The three regions are
pure functions of tensors, so one `torch.compile` of each serves every block of a model (and every model of
the same shapes), and they never trace the Triton kernel (tracing it into one whole-block graph failed in
inductor 2.11: cumsum scan codegen and the kernel's compile).

Algebra used (exact in real arithmetic, so the fused block equals the plain one up to rounding):
  * the gates are linear in [q, k, v] and q, k, v are affine in (x_c, x_m), so
        gates = x_c @ (Wg_q Wq + Wg_k Wk)^T + x_m @ (Wg_v Wv)^T + (bg + Wg_q bq + Wg_k bk + Wg_v bv)
    and the (B, S, 3I) concatenation and its two GEMMs become two thin GEMMs on tensors we have anyway;
  * the depthwise causal conv is K shifted multiply-adds (fused by the compiler with SiLU and q/k);
  * the 4x4 block-diagonal q/k/v maps are a broadcast multiply + sum over 4 inputs when compiled
    (a pointwise kernel; their weight gradients from `kernels.headwise_triton` on the GPU, else the diagonal
    blocks of one GEMM), an einsum in eager mode;
  * for the backward, `block_pre` and `block_post` save nothing but their inputs (`MEMORY_BUDGET`): x_c,
    the conv's padded input, SiLU and the per-head norm are recomputed from xz and h, which the block keeps
    anyway.
Parameter names and state dicts are untouched: the fast path only reads the block's parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .kernels import mlstm

try:  # the Triton weight-gradient kernel for the block-diagonal maps (CUDA, fp16/bf16)
    from .kernels import headwise_triton
except ImportError:
    headwise_triton = None


def headwise_wgrad_dense(g: torch.Tensor, x: torch.Tensor, bs: int) -> torch.Tensor:
    """Weight gradient of a block-diagonal map as the diagonal (bs, bs) blocks of one dense GEMM:
    g, x (N, nb*bs) -> (nb, bs, bs), I/bs times the needed FLOPs (the fallback of `kernels.headwise_triton`)."""
    nb = x.shape[1] // bs
    full = g.t() @ x                                                        # (nb*bs, nb*bs)
    return torch.diagonal(full.view(nb, bs, nb, bs), dim1=0, dim2=2).permute(2, 0, 1)  # (nb, bs, bs)


class _HeadwiseGemmGrad(torch.autograd.Function):
    """Block-diagonal map with pointwise forward and input gradient, and the weight gradient on tensor cores.

    The weight gradient dW[h] = sum_n g[n, h, :]^T x[n, h, :] is a reduction over all tokens; written
    pointwise, inductor turns it into slow reductions (14 % of a CIFAR MAL-T step). On CUDA in fp16/bf16 it
    is `kernels.headwise_triton` (64-channel tile products over token chunks, diagonal blocks kept); else the
    diagonal (bs, bs) blocks of the dense product g^T x (I, N) @ (N, I), I/bs times the needed FLOPs
    (benchmarks/headwise_grad.py measures the alternatives).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        nb, bs = weight.shape[0], weight.shape[-1]
        return (x.unflatten(-1, (nb, 1, bs)) * weight).sum(-1).flatten(-2)  # (..., nb*bs)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, weight = ctx.saved_tensors
        nb, bs = weight.shape[0], weight.shape[-1]
        gx = (gy.unflatten(-1, (nb, bs, 1)) * weight).sum(-2).flatten(-2)   # (..., nb*bs)
        low = x.dtype in (torch.bfloat16, torch.float16)                    # autocast: GEMM in the activations' dtype
        dt = x.dtype if low else torch.promote_types(x.dtype, gy.dtype)
        g2, x2 = gy.reshape(-1, nb * bs).to(dt), x.reshape(-1, nb * bs)       # (N, I) each
        if headwise_triton is not None and headwise_triton.supports(g2, x2, bs):
            gw = headwise_triton.headwise_wgrad(g2, x2, bs)                 # (nb, bs, bs) float32
        else:
            gw = headwise_wgrad_dense(g2, x2.to(dt), bs)                    # (nb, bs, bs)
        return gx.to(x.dtype), gw.to(weight.dtype)


def headwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pointwise: bool) -> torch.Tensor:
    """Block-diagonal map of `LinearHeadwise`: x (..., nb*bs), weight (nb, out=bs, in=bs) -> (..., nb*bs).

    pointwise: broadcast multiply + sum (fused by the compiler), weight gradient from a GEMM; else an einsum.
    """
    nb, bs = weight.shape[0], weight.shape[-1]
    if pointwise:
        y = _HeadwiseGemmGrad.apply(x, weight)                              # (..., nb*bs)
    else:
        y = torch.einsum("...hi,hoi->...ho", x.unflatten(-1, (nb, bs)), weight).flatten(-2)  # (..., nb*bs)
    return y if bias is None else y + bias


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SiLU(depthwise causal conv): x (B, S, C), weight (C, 1, K), bias (C,) -> (B, S, C) in x's dtype."""
    S, K = x.shape[1], weight.shape[-1]
    xp = F.pad(x, (0, 0, K - 1, 0))                                         # (B, S+K-1, C)
    w = weight[:, 0, :].t()                                                 # (K, C)
    y = bias + sum(xp[:, j:j + S] * w[j] for j in range(K))                 # (B, S, C)
    return F.silu(y).to(x.dtype)


def gate_weights(wg: torch.Tensor, bg: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None,
                 wk: torch.Tensor, bk: torch.Tensor | None, wv: torch.Tensor, bv: torch.Tensor | None):
    """Precompose the gate Linear(3I -> G) with the q/k/v maps: -> (w_c (G, I), w_m (G, I), b (G,)), float32+.

    wg (G, 3I), bg (G,) are the stacked [igate; fgate] weights; wq/wk/wv (nb, bs, bs) the headwise weights.
    """
    G, I = wg.shape[0], wq.shape[0] * wq.shape[-1]
    with torch.autocast(wg.device.type, enabled=False):
        gq, gk, gv = wg.split(I, dim=1)                                     # (G, I) each
        comp = lambda g, w: torch.einsum("gho,hoi->ghi", g.unflatten(1, (w.shape[0], w.shape[1])), w).reshape(G, I)
        w_c = comp(gq, wq) + comp(gk, wk)                                   # (G, I) acts on x_c
        w_m = comp(gv, wv)                                                  # (G, I) acts on x_m
        b = bg
        for g, bias in ((gq, bq), (gk, bk), (gv, bv)):
            if bias is not None:
                b = b + g @ bias                                            # (G,)
    return w_c, w_m, b


def block_up(x, ln_w, ln_b, ln_eps: float, up_w, up_b):
    """Block input x (B, S, D) -> up-projection xz (B, S, 2I) of its LayerNorm."""
    xn = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, ln_eps)                # (B, S, D)
    return F.linear(xn, up_w, up_b)                                         # (B, S, 2I)


def block_pre(xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, wg, bg, pointwise: bool = False):
    """xz (B, S, 2I) -> q, k, v (B, S, I) and gate pre-activations (B, S, 2NH)."""
    I = xz.shape[-1] // 2
    x_m = xz[..., :I]                                                       # (B, S, I)
    x_c = causal_conv_silu(x_m, conv_w, conv_b)                             # (B, S, I)
    q = headwise(x_c, wq, bq, pointwise).to(xz.dtype)                       # (B, S, I)
    k = headwise(x_c, wk, bk, pointwise).to(xz.dtype)                       # (B, S, I)
    v = headwise(x_m, wv, bv, pointwise).to(xz.dtype)                       # (B, S, I)
    w_c, w_m, b = gate_weights(wg, bg, wq, bq, wk, bk, wv, bv)
    g = F.linear(x_c, w_c) + F.linear(x_m, w_m, b)                          # (B, S, 2NH)
    return q, k, v, g


def block_post(h, xz, residual, conv_w, conv_b, norm_w, norm_b, skip, down_w, down_b):
    """Cell output h (B, NH, S, DH) + xz (B, S, 2I) -> down-projected branch (B, S, D), plus residual if given."""
    B, NH, S, DH = h.shape
    I = NH * DH
    x_m, z = xz[..., :I], xz[..., I:]                                       # (B, S, I) each
    x_c = causal_conv_silu(x_m, conv_w, conv_b)                             # (B, S, I) recomputed
    hn = F.layer_norm(h, (DH,)).transpose(1, 2).reshape(B, S, I)            # (B, S, I) per-head norm
    y = (hn * norm_w + norm_b + skip * x_c) * F.silu(z)                     # (B, S, I)
    y = F.linear(y, down_w, down_b)                                         # (B, S, D)
    return y if residual is None else residual + y


_COMPILED: dict = {}

# Activation memory budget of each compiled region's forward/backward partition
# (torch._functorch.config.activation_memory_budget: the fraction of the default partition's saved bytes).
# 0 = save only the region's inputs and recompute the rest in the backward. block_pre and block_post are
# pointwise work around two thin gate GEMMs and the down-projection (whose output the backward does not
# need), so their backward recomputes x_c, the padded conv input, SiLU and the per-head norm from xz and h,
# which are saved anyway (~47 -> ~30 saved bytes per token and model dim and block). block_up keeps the
# default: at 0 it would recompute the up-projection GEMM.
MEMORY_BUDGET = {"block_up": 1.0, "block_pre": 0.0, "block_post": 0.0}


def _compiled(fn, mode: str | None):
    """One torch.compile'd copy of `fn` per mode, shared by all blocks (static shapes), partitioned under
    `MEMORY_BUDGET[fn.__name__]` (read when a call compiles; every call sets it, so recompiles agree)."""
    key = (fn.__name__, mode)
    if key not in _COMPILED:
        compiled, budget = torch.compile(fn, dynamic=False, mode=mode), MEMORY_BUDGET[fn.__name__]

        def call(*args, **kwargs):
            with torch._functorch.config.patch(activation_memory_budget=budget):
                return compiled(*args, **kwargs)
        _COMPILED[key] = call
    return _COMPILED[key]


@dataclass(frozen=True)
class FastPath:
    """How a block runs its fast path.

    compile: eager (False) or the two regions around the cell through torch.compile(mode).
    checkpoint: activation checkpointing of the whole block in training (`torch.utils.checkpoint`,
        non-reentrant): the backward keeps only the block input x (B, S, D) and recomputes the block's
        forward (pre-region, mLSTM cell forward, post-region) before its backward. Saves all of the block's
        other saved activations (q, k, v, h, xz, gates, LayerNorm outputs, ...) for one extra block forward
        per training step; no effect without grad.
    """
    compile: bool = True
    mode: str | None = None
    checkpoint: bool = False


def block_forward(blk: nn.Module, x: torch.Tensor, fast: FastPath) -> torch.Tensor:
    """Fast forward of a `ViLBlock` (x (B, S, D) -> (B, S, D)); same function as `blk`'s plain forward."""
    fuse_residual = isinstance(blk.drop_path, nn.Identity) or not blk.training
    if fast.checkpoint and torch.is_grad_enabled():
        # drop-path (the block's only randomness) stays outside, so the recompute needs no RNG state
        y = torch.utils.checkpoint.checkpoint(_branch, blk, x, fast, fuse_residual, use_reentrant=False,
                                              preserve_rng_state=False)  # (B, S, D)
    else:
        y = _branch(blk, x, fast, fuse_residual)                            # (B, S, D)
    return y if fuse_residual else x + blk.drop_path(y)


def _branch(blk: nn.Module, x: torch.Tensor, fast: FastPath, fuse_residual: bool) -> torch.Tensor:
    """The block's residual branch (B, S, D), plus x when fuse_residual."""
    L, conv = blk.layer, blk.layer.conv.conv
    up = _compiled(block_up, fast.mode) if fast.compile else block_up
    pre = _compiled(block_pre, fast.mode) if fast.compile else block_pre
    post = _compiled(block_post, fast.mode) if fast.compile else block_post
    wg = torch.cat([L.igate.weight, L.fgate.weight], 0)                     # (2NH, 3I)
    bg = torch.cat([L.igate.bias, L.fgate.bias], 0)                         # (2NH,)
    xz = up(x, blk.norm.weight, blk.norm.bias, blk.norm.eps, L.proj_up.weight, L.proj_up.bias)  # (B, S, 2I)
    q, k, v, g = pre(xz, conv.weight, conv.bias, L.q_proj.weight, L.q_proj.bias, L.k_proj.weight,
                     L.k_proj.bias, L.v_proj.weight, L.v_proj.bias, wg, bg, pointwise=fast.compile)
    B, S, _ = x.shape
    NH, DH = L.num_heads, L.inner // L.num_heads
    heads = lambda t: t.view(B, S, NH, DH).transpose(1, 2)                  # (B, NH, S, DH)
    i, f = g[..., :NH].transpose(1, 2), g[..., NH:].transpose(1, 2)         # (B, NH, S) each
    h = mlstm(heads(q), heads(k), heads(v), i, f, backend=L.backend)        # (B, NH, S, DH)
    return post(h, xz, x if fuse_residual else None, conv.weight, conv.bias, L.outnorm, L.outnorm_bias, L.skip,
             L.proj_down.weight, L.proj_down.bias)                          # (B, S, D)


__all__ = ["FastPath", "block_forward", "block_up", "block_pre", "block_post", "gate_weights", "headwise",
           "headwise_wgrad_dense", "causal_conv_silu", "MEMORY_BUDGET"]
