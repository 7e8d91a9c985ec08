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
  * on CUDA in fp16/bf16 `block_pre` is one Triton kernel (`kernels.qkv_triton`); in training there both regions'
    backward is `kernels.block_grad_triton` (`_QKVGates` hands xz to `_PostFused`, whose backward passes the
    post tail's x_c gradient and dz back through it: the conv's backward runs once and dxz is written once),
    otherwise (e.g. a head dim that is not a multiple of 16) `_QKVGates`' backward is the written-out
    `block_pre_vjp` (compiled) and `block_post`'s is inductor's;
  * the reorder between blocks (`order`) is no gather of its own: without grad it is inside the compiled up-
    and post-regions; in training on CUDA `_NormUp` (`kernels.norm_triton`) reads x's rows through it and
    scatters the gradient back, joined with the residual's, and the compiled post-region gathers the residual;
  * for the backward, `block_pre` and `block_post` save nothing but their inputs (`MEMORY_BUDGET`): x_c,
    the conv's padded input, SiLU and the per-head norm are recomputed from xz and h, which the block keeps
    anyway; `_NormUp` keeps x and its row statistics, not the LayerNorm's output; with the kernels' backward
    the cell's v is formed again by `post_grad` (`VFromPost`), so a block keeps x, xz, q, k and h (24 bytes per
    token and model dim in bf16 autocast, from 30); with `FastPath.recompute_qkv` q and k are recomputed too,
    by re-running the pre-step when the cell's backward needs them (`RecomputeQKV`).
Parameter names and state dicts are untouched: the fast path only reads the block's parameters.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .kernels import mlstm
from .serialization import gather_tokens

try:  # Triton kernels of the block (CUDA, fp16/bf16): q/k/v weight gradient, the pre-cell step, the regions' backward
    from .kernels import block_grad_triton, headwise_triton, norm_triton, qkv_triton
except ImportError:
    block_grad_triton = headwise_triton = norm_triton = qkv_triton = None


def headwise_wgrad_dense(g: torch.Tensor, x: torch.Tensor, bs: int) -> torch.Tensor:
    """Weight gradient of a block-diagonal map as the diagonal (bs, bs) blocks of one dense GEMM:
    g, x (N, nb*bs) -> (nb, bs, bs), I/bs times the needed FLOPs (the fallback of `kernels.headwise_triton`)."""
    nb = x.shape[1] // bs
    full = g.t() @ x                                                        # (nb*bs, nb*bs)
    return torch.diagonal(full.view(nb, bs, nb, bs), dim1=0, dim2=2).permute(2, 0, 1)  # (nb, bs, bs)


def headwise_wgrad(g: torch.Tensor, x: torch.Tensor, bs: int) -> torch.Tensor:
    """Weight gradient of a block-diagonal map, g, x (N, nb*bs) -> (nb, bs, bs): the Triton kernel where it
    applies (CUDA fp16/bf16), else the dense-GEMM form."""
    if headwise_triton is not None and headwise_triton.supports(g, x, bs):
        return headwise_triton.headwise_wgrad(g, x, bs)                     # (nb, bs, bs) float32
    return headwise_wgrad_dense(g, x, bs)                                   # (nb, bs, bs)


def headwise_input_grad(gy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Input gradient of a block-diagonal map: gy (..., nb*bs), weight (nb, out, in) -> (..., nb*bs)."""
    nb, bs = weight.shape[0], weight.shape[-1]
    return (gy.unflatten(-1, (nb, bs, 1)) * weight).sum(-2).flatten(-2)      # (..., nb*bs)


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
        gx = headwise_input_grad(gy, weight)                                # (..., nb*bs)
        low = x.dtype in (torch.bfloat16, torch.float16)                    # autocast: GEMM in the activations' dtype
        dt = x.dtype if low else torch.promote_types(x.dtype, gy.dtype)
        g2, x2 = gy.reshape(-1, nb * bs).to(dt), x.reshape(-1, nb * bs).to(dt)  # (N, I) each
        return gx.to(x.dtype), headwise_wgrad(g2, x2, bs).to(weight.dtype)


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


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Depthwise causal conv as K shifted multiply-adds: x (B, S, C), weight (C, 1, K), bias (C,) ->
    pre-activation y (B, S, C) in the weights' precision, the padded input (B, S+K-1, C) and the taps (K, C)."""
    S, K = x.shape[1], weight.shape[-1]
    xp = F.pad(x, (0, 0, K - 1, 0))                                         # (B, S+K-1, C)
    w = weight[:, 0, :].t()                                                 # (K, C)
    return bias + sum(xp[:, j:j + S] * w[j] for j in range(K)), xp, w       # (B, S, C), ...


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SiLU(depthwise causal conv): x (B, S, C), weight (C, 1, K), bias (C,) -> (B, S, C) in x's dtype."""
    return F.silu(causal_conv(x, weight, bias)[0]).to(x.dtype)


def gate_weights(wg: torch.Tensor, bg: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None,
                 wk: torch.Tensor, bk: torch.Tensor | None, wv: torch.Tensor, bv: torch.Tensor | None):
    """Precompose the gate Linear(3I -> G) with the q/k/v maps: -> (w_c (G, I), w_m (G, I), b (G,)), float32+.

    wg (G, 3I), bg (G,) are the stacked [igate; fgate] weights; wq/wk/wv (nb, bs, bs) the headwise weights.
    """
    G, I = wg.shape[0], wq.shape[0] * wq.shape[-1]
    with torch.autocast(wg.device.type, enabled=False):
        gq, gk, gv = wg.split(I, dim=1)                                     # (G, I) each
        comp = lambda g, w: (g.unflatten(1, w.shape[:2])[..., None] * w).sum(2).reshape(G, I)  # gho,hoi->ghi
        w_c = comp(gq, wq) + comp(gk, wk)                                   # (G, I) acts on x_c
        w_m = comp(gv, wv)                                                  # (G, I) acts on x_m
        b = bg
        for g, bias in ((gq, bq), (gk, bk), (gv, bv)):
            if bias is not None:
                b = b + g @ bias                                            # (G,)
    return w_c, w_m, b


def gate_weights_grad(wg, wq, bq, wk, bk, wv, bv, d_wc, d_wm, d_b, qkv_grads):
    """Backward of `gate_weights` (written out: a few fused kernels when compiled, not autograd's dozens of
    tiny ones), added to the q/k/v maps' own gradients qkv_grads = (d wq, d bq, d wk, d bk, d wv, d bv):
    d_wc, d_wm (G, I), d_b (G,) -> gradients of wq, bq, wk, bk, wv, bv, wg, bg in the weights' dtypes.

    With w_c = comp(gq, wq) + comp(gk, wk), comp(g, w)[G, h, i] = sum_o g[G, h, o] w[h, o, i], and
    b = bg + gq bq + gk bk + gv bv: d g[G, h, o] = sum_i d[G, h, i] w[h, o, i] + d_b[G] bias[h, o],
    d w[h, o, i] = sum_G g[G, h, o] d[G, h, i], d bias = g^T d_b, d bg = d_b."""
    G, nb, bs = wg.shape[0], wq.shape[0], wq.shape[-1]
    acc = torch.promote_types(wg.dtype, d_wc.dtype)
    blocks = lambda t: t.to(acc).reshape(G, nb, bs)                         # (G, nb, bs)
    d_c, d_m, d_b = blocks(d_wc), blocks(d_wm), d_b.to(acc)
    d_g, out = [], []
    for g, w, bias, d, dw, db in zip(wg.split(nb * bs, dim=1), (wq, wk, wv), (bq, bk, bv), (d_c, d_c, d_m),
                                     qkv_grads[::2], qkv_grads[1::2]):
        g3 = blocks(g)                                                      # (G, nb, bs_out)
        dg3 = (d[:, :, None, :] * w.to(acc)).sum(-1) + d_b[:, None, None] * bias.to(acc).view(nb, bs)  # (G, nb, bs)
        d_g.append(dg3.reshape(G, nb * bs))
        dw_gate = (g3[..., None] * d[:, :, None, :]).sum(0)                 # (nb, bs_out, bs_in)
        out += [(dw + dw_gate).to(w.dtype), (db + (g3 * d_b[:, None, None]).sum(0).flatten()).to(bias.dtype)]
    return (*out, torch.cat(d_g, 1).to(wg.dtype), d_b.to(wg.dtype))


def block_up(x, ln_w, ln_b, ln_eps: float, up_w, up_b, order=None):
    """Block input x (B, S, D) -> up-projection xz (B, S, 2I) of its LayerNorm; with `order` ((S,) or (B, S)) the
    tokens x[:, order] (the gather fused into the LayerNorm's loads when compiled)."""
    if order is not None:
        x = gather_tokens(x, order)                                         # (B, S, D)
    xn = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, ln_eps)                # (B, S, D)
    return F.linear(xn, up_w, up_b)                                         # (B, S, 2I)


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the block's GEMMs run in: autocast's on x's device when it is on, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _NormUp(torch.autograd.Function):
    """`block_up` in training on CUDA: the LayerNorm in `kernels.norm_triton` (x[:, order] read through the
    order), then the up-projection. Saves x and the row statistics, not the LayerNorm's output.

    Returns xz (B, S, 2I) and a view of x, the residual for `_PostFused` (with the same order): the gradient
    that function returns for it is d out in the block's token order, which the backward here adds to the
    LayerNorm's input gradient while scattering it back through the order (no gather, scatter or add of
    (B, S, D) tensors around the block). All four parameter gradients come from one GEMM dxz^T [xhat, 1]
    (float32 out) on the recomputed normalized rows (`norm_triton.affine_grads`, compiled when `compiled`)."""

    @staticmethod
    def forward(ctx, compiled, mode, x, order, ln_w, ln_b, ln_eps: float, up_w, up_b):
        low = activation_dtype(x)
        xn, mean, rstd = norm_triton.layer_norm(x, order, ln_w, ln_b, ln_eps, low)   # (B, S, D), (B*S,) x 2
        xz = F.linear(xn, up_w.to(low), None if up_b is None else up_b.to(low))     # (B, S, 2I)
        ctx.save_for_backward(x, order, ln_w, ln_b, up_w, mean, rstd)
        ctx.compiled, ctx.mode, ctx.low, ctx.up_b = compiled, mode, low, up_b is not None
        ctx.set_materialize_grads(False)
        return xz, x.view_as(x)

    @staticmethod
    def backward(ctx, dxz, dres):
        x, order, ln_w, ln_b, up_w, mean, rstd = ctx.saved_tensors
        w_low = up_w.to(ctx.low)                                                # (2I, D) as the forward used it
        if dxz is None:
            dxz = x.new_zeros(*x.shape[:2], up_w.shape[0], dtype=ctx.low)
        g = dxz.reshape(-1, dxz.shape[-1]).to(ctx.low)                         # (N, 2I)
        dxn = (g @ w_low).view_as(x)                                            # (B, S, D) in the activations' dtype
        dx, xhat1 = norm_triton.layer_norm_grad(x, order, ln_w, dxn, dres, mean, rstd, ctx.low)  # (N, D + 8)
        m = torch.mm(g.t(), xhat1, out_dtype=torch.float32)                     # (2I, D + 8)
        grads = _compiled(norm_triton.affine_grads, ctx.mode) if ctx.compiled else norm_triton.affine_grads
        d_upw, d_upb, d_lnw, d_lnb = grads(m, ln_w, ln_b, w_low)
        return (None, None, dx, None, d_lnw, d_lnb, None, d_upw.to(up_w.dtype),
                d_upb.to(up_w.dtype) if ctx.up_b else None)


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


def _pre_weight_grads(dq, dk, dv, dg, x_c, x_m, bs: int):
    """The pre-step's weight gradients from its incoming gradients and inputs, all (N, .) in the activations'
    dtype: dq, dk, dv, x_c, x_m (N, I), dg (N, G) -> d wq, d wk, d wv (nb, bs, bs), and in float32 (float64 in
    tests) d w_c, d w_m (G, I) and d b (G,) of the precomposed gates."""
    acc = torch.promote_types(x_c.dtype, torch.float32)
    return (headwise_wgrad(dq, x_c, bs), headwise_wgrad(dk, x_c, bs), headwise_wgrad(dv, x_m, bs),
            (dg.t() @ x_c).to(acc), (dg.t() @ x_m).to(acc), dg.sum(0, dtype=acc))


def block_pre_vjp(xz, conv_w, conv_b, wq, wk, wv, w_c, w_m, dq, dk, dv, dg):
    """Backward of `block_pre` written out: gradients of xz (B, S, 2I), the conv weight and bias, the q/k/v
    weights and biases, and the precomposed gate weights w_c, w_m (G, I) and bias (G,). The gate GEMMs run
    in xz's dtype (as autocast's linear does); x_c and the conv's pre-activation are recomputed from xz."""
    B, S, two_i = xz.shape
    I, K, dt = two_i // 2, conv_w.shape[-1], xz.dtype
    acc = torch.promote_types(dt, torch.float32)                            # float32, or float64 in tests
    x_m = xz[..., :I]                                                       # (B, S, I)
    y, xp, w = causal_conv(x_m, conv_w, conv_b)                             # (B, S, I) float32, (B, S+K-1, I), (K, I)
    sig = torch.sigmoid(y)
    x_c = (y * sig).to(dt)                                                  # (B, S, I)
    dg = dg.to(dt)                                                          # (B, S, G)
    dx_c = headwise_input_grad(dq, wq) + headwise_input_grad(dk, wk) + (dg @ w_c.to(dt)).to(acc)  # (B, S, I)
    dx_m = headwise_input_grad(dv, wv) + (dg @ w_m.to(dt)).to(acc)          # (B, S, I)
    dy = dx_c * (sig * (1 + y * (1 - sig)))                                 # (B, S, I) through SiLU
    dyp = F.pad(dy, (0, 0, 0, K - 1))                                       # (B, S+K-1, I)
    dx_m = dx_m + sum(dyp[:, K - 1 - j:K - 1 - j + S] * w[j] for j in range(K))  # (B, S, I) through the conv
    d_conv_w = torch.stack([(dy * xp[:, j:j + S]).sum((0, 1)) for j in range(K)], -1).unsqueeze(1)  # (I, 1, K)
    flat = lambda t: t.reshape(-1, I).to(dt)                                # (N, I)
    dwq, dwk, dwv, d_wc, d_wm, d_b = _pre_weight_grads(flat(dq), flat(dk), flat(dv), dg.reshape(-1, dg.shape[-1]),
                                                       flat(x_c), flat(x_m), wq.shape[-1])
    return (F.pad(dx_m, (0, I)).to(dt), d_conv_w, dy.sum((0, 1)), dwq, dq.to(acc).sum((0, 1)),
            dwk, dk.to(acc).sum((0, 1)), dwv, dv.to(acc).sum((0, 1)), d_wc, d_wm, d_b)


class _QKVGates(torch.autograd.Function):
    """`block_pre` as one Triton kernel forward (`kernels.qkv_triton`; `block_pre` itself without it). Saves only
    its inputs.

    Its fifth output is xz again (a view), for `_PostFused` to read: that function returns as "gradient" of it
    the packed [dx_c, dz] of the post tail (`kernels.block_grad_triton.post_grad`), and then the backward is
    `block_grad_triton.pre_grad`, which finishes dxz in that buffer. Without it (the view unused) the backward
    is the written-out `block_pre_vjp` (compiled when `compiled`)."""

    @staticmethod
    def forward(ctx, compiled, mode, xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, wg, bg):
        compose = _compiled(gate_weights, mode) if compiled else gate_weights
        w_c, w_m, b = compose(wg, bg, wq, bq, wk, bk, wv, bv)              # (G, I), (G, I), (G,)
        NG = w_c.shape[0]
        if qkv_triton is not None and qkv_triton.supports(xz, conv_w, wq, bq, bk, bv, NG):
            q, k, v, g = qkv_triton.qkv_gates(xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, w_c, w_m, b)
        else:
            q, k, v, g = block_pre(xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, wg, bg)
        ctx.save_for_backward(xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, wg, w_c, w_m)
        ctx.compiled, ctx.mode = compiled, mode
        ctx.set_materialize_grads(False)
        return q, k, v, g, xz.view_as(xz)

    @staticmethod
    def backward(ctx, dq, dk, dv, dg, d_packed):
        xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, wg, w_c, w_m = ctx.saved_tensors
        I = xz.shape[-1] // 2
        zero = lambda d, n: d if d is not None else xz.new_zeros(*xz.shape[:2], n)
        dq, dk, dv, dg = zero(dq, I), zero(dk, I), zero(dv, I), zero(dg, wg.shape[0])
        if d_packed is None:
            vjp = _compiled(block_pre_vjp, ctx.mode) if ctx.compiled else block_pre_vjp
            dxz, dcw, dcb, dwq, dbq, dwk, dbk, dwv, dbv, d_wc, d_wm, d_b = vjp(
                xz, conv_w, conv_b, wq, wk, wv, w_c, w_m, dq, dk, dv, dg)
        else:
            dxz, dcw, dcb, dwq, dbq, dwk, dbk, dwv, dbv, d_wc, d_wm, d_b = block_pre_grad_triton(
                xz, conv_w, conv_b, wq, wk, wv, w_c, w_m, dq, dk, dv, dg, d_packed)
        grad = _compiled(gate_weights_grad, ctx.mode) if ctx.compiled else gate_weights_grad
        return (None, None, dxz, dcw, dcb, *grad(wg, wq, bq, wk, bk, wv, bv, d_wc, d_wm, d_b,
                                                 (dwq, dbq, dwk, dbk, dwv, dbv)))


def block_pre_grad_triton(xz, conv_w, conv_b, wq, wk, wv, w_c, w_m, dq, dk, dv, dg, packed):
    """`block_pre_vjp`'s outputs from `kernels.block_grad_triton.pre_grad`, with the post tail's packed
    [dx_c, dz] (B, S, 2I) joined in: dxz is `packed` with its left half overwritten."""
    I = xz.shape[-1] // 2
    dxz, x_c, dcw, dcb, dbq, dbk, dbv = block_grad_triton.pre_grad(dq, dk, dv, dg, packed, xz, conv_w, conv_b,
                                                                   wq, wk, wv, w_c, w_m)
    flat = lambda t: t.reshape(-1, I)                                        # (N, I)
    dwq, dwk, dwv, d_wc, d_wm, d_b = _pre_weight_grads(flat(dq), flat(dk), flat(dv),
                                                       dg.reshape(-1, dg.shape[-1]).to(xz.dtype), flat(x_c),
                                                       flat(xz[..., :I]), wq.shape[-1])
    return dxz, dcw, dcb, dwq, dbq, dwk, dbk, dwv, dbv, d_wc, d_wm, d_b


def block_pre_fused(xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, wg, bg, compiled: bool = True,
                    mode: str | None = None, xz_view: bool = False):
    """`block_pre` through `_QKVGates`: the Triton kernel forward on CUDA in fp16/bf16 (`qkv_triton.supports`).
    xz_view: also return the view of xz that `_PostFused` takes (q, k, v, g, xz)."""
    out = _QKVGates.apply(compiled, mode, xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, wg, bg)
    return out if xz_view else out[:4]


POST_LN_EPS = 1e-5                                                          # the per-head norm's eps (F.layer_norm's default)


def block_post(h, xz, residual, conv_w, conv_b, norm_w, norm_b, skip, down_w, down_b, order=None):
    """Cell output h (B, NH, S, DH) + xz (B, S, 2I) -> down-projected branch (B, S, D), plus residual if given
    (residual[:, order] with `order`, as `block_up`)."""
    B, NH, S, DH = h.shape
    I = NH * DH
    x_m, z = xz[..., :I], xz[..., I:]                                       # (B, S, I) each
    x_c = causal_conv_silu(x_m, conv_w, conv_b)                             # (B, S, I) recomputed
    hn = F.layer_norm(h, (DH,), eps=POST_LN_EPS).transpose(1, 2).reshape(B, S, I)  # (B, S, I) per-head norm
    y = (hn * norm_w + norm_b + skip * x_c) * F.silu(z)                     # (B, S, I)
    y = F.linear(y, down_w, down_b)                                         # (B, S, D)
    if residual is not None and order is not None:
        residual = gather_tokens(residual, order)                           # (B, S, D)
    return y if residual is None else residual + y


class _PostFused(torch.autograd.Function):
    """`block_post` (compiled when `compiled`) with its backward in `kernels.block_grad_triton.post_grad`.

    xz must be the view returned by `_QKVGates` (`block_pre_fused(..., xz_view=True)`): the "gradient" this
    function returns for it is the packed [dx_c, dz] (B, S, 2I), which `_QKVGates`' backward turns into dxz
    (the conv's gradient then runs once, for both regions). With `order`, residual must be the view returned by
    `_NormUp` (which adds d out, returned here in the block's token order, while scattering back through the
    order). With `v_out` (a `VFromPost`) the backward also forms the cell's v and hands it over. Saves only its
    inputs."""

    @staticmethod
    def forward(ctx, compiled, mode, h, xz, residual, conv_w, conv_b, norm_w, norm_b, skip, down_w, down_b,
                order, v_out):
        post = _compiled(block_post, mode) if compiled else block_post
        ctx.save_for_backward(h, xz, conv_w, conv_b, norm_w, norm_b, skip, down_w)
        ctx.residual, ctx.down_b, ctx.v_out = residual is not None, down_b is not None, v_out
        return post(h, xz, residual, conv_w, conv_b, norm_w, norm_b, skip, down_w, down_b, order=order)

    @staticmethod
    def backward(ctx, dout):
        h, xz, conv_w, conv_b, norm_w, norm_b, skip, down_w = ctx.saved_tensors
        B, S, D = dout.shape
        d2 = dout.reshape(-1, D)                                            # (N, D)
        if d2.dtype == xz.dtype:
            dlow, d_down_b = d2, d2.sum(0, dtype=torch.float32)             # (N, D), (D,)
        else:                                                               # one read of d out for both
            dlow, d_down_b = block_grad_triton.cast_colsum(d2, xz.dtype)
        du = (dlow @ down_w.to(xz.dtype)).view(B, S, -1)                    # GEMMs in the activations' dtype, as
                                                                            # autocast's linear
        v_weights = ctx.v_out.weights if ctx.v_out is not None else None
        dh, packed, u, d_nw, d_nb, d_skip, v = block_grad_triton.post_grad(
            du, h, xz, conv_w, conv_b, norm_w, norm_b, skip, POST_LN_EPS, v_weights)  # (B, NH, S, DH), (B, S, 2I), ...
        if v is not None:
            ctx.v_out.provide(v)                                            # (B, S, I) for the cell's backward, next
        d_down_w = (dlow.t() @ u.view(-1, u.shape[-1])).to(down_w.dtype)   # (D, I)
        return (None, None, dh, packed, dout if ctx.residual else None, None, None, d_nw, d_nb, d_skip,
                d_down_w, d_down_b if ctx.down_b else None, None, None)


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
    `MEMORY_BUDGET[fn.__name__]` (read when a call compiles; every call sets it, so recompiles agree; functions
    not in it, such as the no-grad `block_pre_vjp`, compile under the default)."""
    key = (fn.__name__, mode)
    if key not in _COMPILED:
        compiled, budget = torch.compile(fn, dynamic=False, mode=mode), MEMORY_BUDGET.get(fn.__name__)

        def call(*args, **kwargs):
            if budget is None:                                              # no autograd: nothing to partition
                return compiled(*args, **kwargs)
            with torch._functorch.config.patch(activation_memory_budget=budget):
                return compiled(*args, **kwargs)
        _COMPILED[key] = call
    return _COMPILED[key]


class SavedRecipes:
    """Saved-tensor hooks around the mLSTM cell: saved tensors that live in the storage of `outs` are stored as
    their view's layout (`pack`) and rebuilt on the first `unpack` in the backward from `self.outs`, which a
    subclass fills: by `_recompute`, or before the cell's backward by another function's backward."""

    def __init__(self, outs: tuple[torch.Tensor, ...]):
        self.storage = {o.untyped_storage().data_ptr(): j for j, o in enumerate(outs)}
        self.layout = [(o.shape, o.stride(), o.storage_offset()) for o in outs]
        self.outs: tuple[torch.Tensor, ...] | None = None

    def pack(self, t: torch.Tensor):
        j = self.storage.get(t.untyped_storage().data_ptr())
        return t if j is None else (j, t.shape, t.stride(), t.storage_offset())

    def unpack(self, saved):
        if isinstance(saved, torch.Tensor):
            return saved
        j, shape, stride, offset = saved
        if self.outs is None:
            self.outs = self._recompute()
        return self.outs[j].as_strided(shape, stride, offset)

    def _recompute(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class RecomputeQKV(SavedRecipes):
    """q, k, v of the cell stored as recipes: the first `unpack` (in the cell's backward) re-runs the pre-region
    on the inputs it was called with, in the same grad and autocast mode (so the same compiled graph or kernel
    runs and returns bitwise the same values).

    The cell's autograd saves q, k, v (3 x (B, S, I) per block, 12 bytes per token and model dim in bf16). The
    inputs (xz and weights) are kept by the block anyway. Cost: one pre-region forward per block backward.
    """

    def __init__(self, fn, args: tuple, kwargs: dict, outs: tuple[torch.Tensor, ...]):
        super().__init__(outs)
        self.fn, self.kwargs = fn, kwargs
        self.args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        self.grad = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        dev = outs[0].device.type
        self.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev),
                         torch.is_autocast_cache_enabled())

    def _recompute(self) -> tuple[torch.Tensor, ...]:
        dev, enabled, dtype, cache = self.autocast
        args = tuple(a.detach().requires_grad_(g) if isinstance(a, torch.Tensor) else a
                     for a, g in zip(self.args, self.grad))
        with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled, cache_enabled=cache):
            outs = tuple(o.detach() for o in self.fn(*args, **self.kwargs)[:len(self.layout)])
        got = [(o.shape, o.stride(), o.storage_offset()) for o in outs]
        if got != self.layout:
            raise RuntimeError(f"recomputing q, k, v gave layouts {got}, the forward {self.layout}; "
                               "run the block with fast_path(recompute_qkv=False)")
        return outs


class VFromPost(SavedRecipes):
    """The cell's v (B, S, I) stored as a recipe: `_PostFused`'s backward, which runs just before the cell's,
    forms v in `block_grad_triton.post_grad` from the x_m it reads anyway and hands it over (`provide`): 4 of
    the block's saved bytes per token and model dim in bf16, for one (B, S, I) write. v = blockdiag(wv) x_m + bv
    is the pre-step kernel's arithmetic; `_recompute` (torch, float32) serves if no post backward provided it.
    """

    def __init__(self, v: torch.Tensor, xz: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor):
        super().__init__((v,))
        self.xz, self.weights = xz.detach(), (wv.detach(), bv.detach())

    def provide(self, v: torch.Tensor) -> None:
        if (v.shape, v.stride(), v.storage_offset()) != self.layout[0]:
            raise RuntimeError(f"v of layout {(v.shape, v.stride())} cannot rebuild the forward's {self.layout[0]}")
        self.outs = (v,)

    def _recompute(self) -> tuple[torch.Tensor, ...]:
        wv, bv = self.weights
        I = self.xz.shape[-1] // 2
        with torch.no_grad():
            v = headwise(self.xz[..., :I].float(), wv.float(), bv.float(), pointwise=True).to(self.xz.dtype)
        return (v.contiguous(),)


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
        docs/benchmarks.md). Not used with checkpoint (which recomputes everything).
    """
    compile: bool = True
    mode: str | None = None
    checkpoint: bool = False
    recompute_qkv: bool = False


def _norm_kernel(x: torch.Tensor, order: torch.Tensor | None) -> bool:
    """Whether `_NormUp` (the LayerNorm kernels) takes this block input and order in training."""
    return norm_triton is not None and norm_triton.supports(x, order, activation_dtype(x))


def block_forward(blk: nn.Module, x: torch.Tensor, fast: FastPath,
                  order: torch.Tensor | None = None) -> torch.Tensor:
    """Fast forward of a `ViLBlock` on x[:, order] (x (B, S, D), order (S,) or (B, S) a permutation of the
    tokens, None = x as it is) -> (B, S, D); same function as `blk`'s plain forward. The reorder is fused into
    the block's first and last kernels (no (B, S, D) copy of the residual stream): without grad in the compiled
    regions, in training (on CUDA) in the LayerNorm kernels and the post-region; otherwise it is a gather first."""
    fuse_residual = isinstance(blk.drop_path, nn.Identity) or not blk.training
    keep_order = fuse_residual and (not torch.is_grad_enabled() or _norm_kernel(x, order))
    if order is not None and not keep_order:
        x, order = gather_tokens(x, order), None                            # (B, S, D)
    if fast.checkpoint and torch.is_grad_enabled():
        # drop-path (the block's only randomness) stays outside, so the recompute needs no RNG state
        y = torch.utils.checkpoint.checkpoint(_branch, blk, x, fast, fuse_residual, order, use_reentrant=False,
                                              preserve_rng_state=False)  # (B, S, D)
    else:
        y = _branch(blk, x, fast, fuse_residual, order)                     # (B, S, D)
    return y if fuse_residual else x + blk.drop_path(y)


def _branch(blk: nn.Module, x: torch.Tensor, fast: FastPath, fuse_residual: bool,
            order: torch.Tensor | None = None) -> torch.Tensor:
    """The block's residual branch (B, S, D) on x[:, order], plus x[:, order] when fuse_residual."""
    L, conv = blk.layer, blk.layer.conv.conv
    post = _compiled(block_post, fast.mode) if fast.compile else block_post
    wg = torch.cat([L.igate.weight, L.fgate.weight], 0)                     # (2NH, 3I)
    bg = torch.cat([L.igate.bias, L.fgate.bias], 0)                         # (2NH,)
    norm_up = torch.is_grad_enabled() and _norm_kernel(x, order)
    if norm_up:                                                             # x_res: residual view for _PostFused
        xz, x_res = _NormUp.apply(fast.compile, fast.mode, x, order, blk.norm.weight, blk.norm.bias, blk.norm.eps,
                                  L.proj_up.weight, L.proj_up.bias)         # (B, S, 2I), (B, S, D)
    else:
        up = _compiled(block_up, fast.mode) if fast.compile else block_up
        xz = up(x, blk.norm.weight, blk.norm.bias, blk.norm.eps, L.proj_up.weight, L.proj_up.bias,
                order=order)                                                # (B, S, 2I)
    pre_args = (xz, conv.weight, conv.bias, L.q_proj.weight, L.q_proj.bias, L.k_proj.weight, L.k_proj.bias,
                L.v_proj.weight, L.v_proj.bias, wg, bg)
    B, S = xz.shape[:2]
    NH, DH = L.num_heads, L.inner // L.num_heads
    fused_pre = qkv_triton is not None and qkv_triton.supports(xz, conv.weight, L.q_proj.weight, L.q_proj.bias,
                                                               L.k_proj.bias, L.v_proj.bias, 2 * NH)
    # training on CUDA: both regions' backward in `kernels.block_grad_triton` (the pre region hands xz to the post)
    grad_kernels = (fused_pre and torch.is_grad_enabled() and block_grad_triton is not None
                    and block_grad_triton.supports(xz, NH, conv.weight, L.q_proj.weight, 2 * NH))
    if fused_pre:
        pre, pre_kwargs = block_pre_fused, dict(compiled=fast.compile, mode=fast.mode, xz_view=grad_kernels)
    else:
        pre = _compiled(block_pre, fast.mode) if fast.compile else block_pre
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
        residual = (x_res if norm_up else x) if fuse_residual else None     # (with order, norm_up holds)
        return _PostFused.apply(fast.compile, fast.mode, h, xz_view[0], residual, *post_args, order,
                                v_out)                                      # (B, S, D)
    return post(h, xz, x if fuse_residual else None, *post_args, order=order)  # (B, S, D)


__all__ = ["FastPath", "RecomputeQKV", "SavedRecipes", "VFromPost", "activation_dtype", "block_forward",
           "block_up", "block_pre", "block_pre_fused", "block_pre_vjp",
           "block_pre_grad_triton", "block_post", "gate_weights", "gate_weights_grad", "headwise", "headwise_wgrad", "headwise_wgrad_dense",
           "headwise_input_grad", "causal_conv", "causal_conv_silu", "MEMORY_BUDGET", "POST_LN_EPS"]
