"""The block's pre-cell step as one autograd function: the forward through the qkv op (one Triton kernel on
CUDA in fp16/bf16), the backward written out (`mal.ops.block_grad`), saving only the step's inputs."""
from __future__ import annotations

import torch

from ..block_grad import block_pre_vjp, gate_weights_grad, pre_weight_grads
from ..qkv import gate_weights
from ..registry import load, resolve
from .regions import compiled_region


class QKVGates(torch.autograd.Function):
    """`block_pre` with the gate weights precomposed once (`gate_weights`) and the forward dispatched through
    the qkv op (`mal.ops.qkv.kernel` where it applies). Saves only its inputs.

    Its fifth output is xz again (a view), for `PostFused` to read: that function returns as "gradient" of it
    the packed [dx_c, dz] of the post tail (`mal.ops.block_grad.kernel.post_grad`), and then the backward is
    `block_grad.kernel.pre_grad`, which finishes dxz in that buffer. Without it (the view unused) the backward
    is the written-out `block_pre_vjp` (compiled when `compiled`)."""

    @staticmethod
    def forward(ctx, compiled, mode, xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, wg, bg):
        compose = compiled_region(gate_weights, mode) if compiled else gate_weights
        w_c, w_m, b = compose(wg, bg, wq, bq, wk, bk, wv, bv)              # (G, I), (G, I), (G,)
        qkv = resolve("qkv", xz, conv_w, wq, bq, bk, bv, w_c.shape[0])
        q, k, v, g = qkv(xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, w_c, w_m, b)
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
            vjp = compiled_region(block_pre_vjp, ctx.mode) if ctx.compiled else block_pre_vjp
            dxz, dcw, dcb, dwq, dbq, dwk, dbk, dwv, dbv, d_wc, d_wm, d_b = vjp(
                xz, conv_w, conv_b, wq, wk, wv, w_c, w_m, dq, dk, dv, dg)
        else:
            dxz, dcw, dcb, dwq, dbq, dwk, dbk, dwv, dbv, d_wc, d_wm, d_b = block_pre_grad_triton(
                xz, conv_w, conv_b, wq, wk, wv, w_c, w_m, dq, dk, dv, dg, d_packed)
        grad = compiled_region(gate_weights_grad, ctx.mode) if ctx.compiled else gate_weights_grad
        return (None, None, dxz, dcw, dcb, *grad(wg, wq, bq, wk, bk, wv, bv, d_wc, d_wm, d_b,
                                                 (dwq, dbq, dwk, dbk, dwv, dbv)))


def block_pre_grad_triton(xz, conv_w, conv_b, wq, wk, wv, w_c, w_m, dq, dk, dv, dg, packed):
    """`block_pre_vjp`'s outputs from `mal.ops.block_grad.kernel.pre_grad`, with the post tail's packed
    [dx_c, dz] (B, S, 2I) joined in: dxz is `packed` with its left half overwritten."""
    I = xz.shape[-1] // 2
    dxz, x_c, dcw, dcb, dbq, dbk, dbv, d_b = load("block_grad", "triton").pre_grad(
        dq, dk, dv, dg, packed, xz, conv_w, conv_b, wq, wk, wv, w_c, w_m)
    flat = lambda t: t.reshape(-1, I)                                        # (N, I)
    dwq, dwk, dwv, d_wc, d_wm = pre_weight_grads(flat(dq), flat(dk), flat(dv),
                                                 dg.reshape(-1, dg.shape[-1]).to(xz.dtype), flat(x_c),
                                                 flat(xz[..., :I]), wq.shape[-1])
    return dxz, dcw, dcb, dwq, dbq, dwk, dbk, dwv, dbv, d_wc, d_wm, d_b


def block_pre_fused(xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, wg, bg, compiled: bool = True,
                    mode: str | None = None, xz_view: bool = False):
    """`block_pre` through `QKVGates`: the Triton kernel forward where the qkv op takes the inputs (CUDA,
    fp16/bf16). xz_view: also return the view of xz that `PostFused` takes (q, k, v, g, xz)."""
    out = QKVGates.apply(compiled, mode, xz, conv_w, conv_b, wq, bq, wk, bk, wv, bv, wg, bg)
    return out if xz_view else out[:4]


__all__ = ["QKVGates", "block_pre_fused", "block_pre_grad_triton"]
