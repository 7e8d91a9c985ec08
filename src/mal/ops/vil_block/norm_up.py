"""The block's pre-LayerNorm and up-projection in training on CUDA: the LayerNorm kernels of `mal.ops.norm`
(x[:, order] read through the order, the gradient scattered back and joined with the residual's)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import load
from .regions import compiled_region


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the block's GEMMs run in: autocast's on x's device when it is on, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class NormUp(torch.autograd.Function):
    """`block_up` in training on CUDA: the LayerNorm in `mal.ops.norm.kernel` (x[:, order] read through the
    order), then the up-projection. Saves x and the row statistics, not the LayerNorm's output.

    Returns xz (B, S, 2I) and a view of x, the residual for `PostFused` (with the same order): the gradient
    that function returns for it is d out in the block's token order, which the backward here adds to the
    LayerNorm's input gradient while scattering it back through the order (no gather, scatter or add of
    (B, S, D) tensors around the block). All four parameter gradients come from one GEMM dxz^T [xhat, 1]
    (float32 out) on the recomputed normalized rows (`kernel.affine_grads`, compiled when `compiled`)."""

    @staticmethod
    def forward(ctx, compiled, mode, x, order, ln_w, ln_b, ln_eps: float, up_w, up_b):
        low = activation_dtype(x)
        kernels = load("norm", "triton")
        xn, mean, rstd = kernels.layer_norm(x, order, ln_w, ln_b, ln_eps, low)       # (B, S, D), (B*S,) x 2
        xz = F.linear(xn, up_w.to(low), None if up_b is None else up_b.to(low))     # (B, S, 2I)
        ctx.save_for_backward(x, order, ln_w, ln_b, up_w, mean, rstd)
        ctx.compiled, ctx.mode, ctx.low, ctx.up_b = compiled, mode, low, up_b is not None
        ctx.set_materialize_grads(False)
        return xz, x.view_as(x)

    @staticmethod
    def backward(ctx, dxz, dres):
        x, order, ln_w, ln_b, up_w, mean, rstd = ctx.saved_tensors
        kernels = load("norm", "triton")
        w_low = up_w.to(ctx.low)                                                # (2I, D) as the forward used it
        if dxz is None:
            dxz = x.new_zeros(*x.shape[:2], up_w.shape[0], dtype=ctx.low)
        g = dxz.reshape(-1, dxz.shape[-1]).to(ctx.low)                         # (N, 2I)
        dxn = (g @ w_low).view_as(x)                                            # (B, S, D) in the activations' dtype
        dx, xhat1 = kernels.layer_norm_grad(x, order, ln_w, dxn, dres, mean, rstd, ctx.low)  # (N, D + 8)
        m = torch.mm(g.t(), xhat1, out_dtype=torch.float32)                     # (2I, D + 8)
        grads = compiled_region(kernels.affine_grads, ctx.mode) if ctx.compiled else kernels.affine_grads
        d_upw, d_upb, d_lnw, d_lnb = grads(m, ln_w, ln_b, w_low)
        return (None, None, dx, None, d_lnw, d_lnb, None, d_upw.to(up_w.dtype),
                d_upb.to(up_w.dtype) if ctx.up_b else None)


__all__ = ["NormUp", "activation_dtype"]
