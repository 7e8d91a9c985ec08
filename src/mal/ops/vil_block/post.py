"""The block's post-cell tail: per-head norm, learnable skip, output gate, down-projection and residual
(`block_post`, compiled), and in training on CUDA `PostFused`: its forward up to the down-projection and its
backward in `mal.ops.block_grad.kernel`, the down-projection and residual (`block_down`) compiled."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...serialization import gather_tokens
from ..qkv import causal_conv_silu
from ..registry import load
from .regions import compiled_region

POST_LN_EPS = 1e-5                      # the per-head norm's eps (F.layer_norm's default)


def block_post(h, xz, residual, conv_w, conv_b, norm_w, norm_b, skip, down_w, down_b, order=None, scale=None):
    """Cell output h (B, NH, S, DH) + xz (B, S, 2I) -> down-projected branch (B, S, D), times the per-sample
    `scale` (B, 1, 1: drop-path) if given, plus residual if given (residual[:, order] with `order`, as
    `block_up`)."""
    B, NH, S, DH = h.shape
    I = NH * DH
    x_m, z = xz[..., :I], xz[..., I:]                                       # (B, S, I) each
    x_c = causal_conv_silu(x_m, conv_w, conv_b)                             # (B, S, I) recomputed
    hn = F.layer_norm(h, (DH,), eps=POST_LN_EPS).transpose(1, 2).reshape(B, S, I)  # (B, S, I) per-head norm
    u = (hn * norm_w + norm_b + skip * x_c) * F.silu(z)                     # (B, S, I)
    return block_down(u, down_w, down_b, residual, order, scale)


def block_down(u, down_w, down_b, residual=None, order=None, scale=None):
    """The down-projection u (B, S, I) -> (B, S, D), times `scale` (B, 1, 1) and plus residual as `block_post`."""
    y = F.linear(u, down_w, down_b)                                         # (B, S, D)
    if scale is not None:
        y = y * scale                                                       # (B, S, D) drop-path
    if residual is not None and order is not None:
        residual = gather_tokens(residual, order)                           # (B, S, D)
    return y if residual is None else residual + y


class PostFused(torch.autograd.Function):
    """`block_post` as `mal.ops.block_grad.kernel.post_fwd` and `block_down` (compiled when `compiled`), with its
    backward in `mal.ops.block_grad.kernel.post_grad`.

    xz must be the view returned by `QKVGates` (`block_pre_fused(..., xz_view=True)`): the "gradient" this
    function returns for it is the packed [dx_c, dz] (B, S, 2I), which `QKVGates`' backward turns into dxz
    (the conv's gradient then runs once, for both regions). With `order`, residual must be the view returned by
    `NormUp` (which adds d out, returned here in the block's token order, while scattering back through the
    order). With `v_out` (a `VFromPost`) the backward also forms the cell's v and hands it over. With `scale`
    (B, 1, 1; drop-path) the branch is scaled per sample before the residual. Saves only its inputs."""

    @staticmethod
    def forward(ctx, compiled, mode, h, xz, residual, conv_w, conv_b, norm_w, norm_b, skip, down_w, down_b,
                order, v_out, scale=None):
        down = compiled_region(block_down, mode) if compiled else block_down
        ctx.save_for_backward(h, xz, conv_w, conv_b, norm_w, norm_b, skip, down_w, scale)
        ctx.residual, ctx.down_b, ctx.v_out = residual is not None, down_b is not None, v_out
        u = load("block_grad", "triton").post_fwd(h, xz, conv_w, conv_b, norm_w, norm_b, skip, POST_LN_EPS)
        return down(u, down_w, down_b, residual, order, scale)              # (B, S, D)

    @staticmethod
    def backward(ctx, dout):
        h, xz, conv_w, conv_b, norm_w, norm_b, skip, down_w, scale = ctx.saved_tensors
        kernels = load("block_grad", "triton")
        B, S, D = dout.shape
        if dout.dtype == xz.dtype:
            dlow = (dout if scale is None else dout * scale).reshape(-1, D)  # (N, D) the branch's gradient
            d_down_b = dlow.sum(0, dtype=torch.float32)                      # (D,)
        else:                                                               # one read of d out for all three
            dlow, d_down_b = kernels.cast_colsum(dout.reshape(-1, D), xz.dtype, scale=scale)
        du = (dlow @ down_w.to(xz.dtype)).view(B, S, -1)                    # GEMMs in the activations' dtype, as
                                                                            # autocast's linear
        v_weights = ctx.v_out.weights if ctx.v_out is not None else None
        dh, packed, u, d_nw, d_nb, d_skip, v = kernels.post_grad(
            du, h, xz, conv_w, conv_b, norm_w, norm_b, skip, POST_LN_EPS, v_weights)  # (B, NH, S, DH), (B, S, 2I), ...
        if v is not None:
            ctx.v_out.provide(v)                                            # (B, S, I) for the cell's backward, next
        d_down_w = (dlow.t() @ u.view(-1, u.shape[-1])).to(down_w.dtype)   # (D, I)
        return (None, None, dh, packed, dout if ctx.residual else None, None, None, d_nw, d_nb, d_skip,
                d_down_w, d_down_b if ctx.down_b else None, None, None, None)


__all__ = ["POST_LN_EPS", "PostFused", "block_down", "block_post"]
