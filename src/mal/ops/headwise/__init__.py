"""The 4x4 block-diagonal q/k/v map of a ViL block (`LinearHeadwise`) with its weight gradient on tensor cores:
`reference` (the dense-GEMM weight gradient and the input gradient) and `kernel` (the weight gradient in Triton).

Backends of the op "headwise", the weight gradients of P maps dispatched on (g0, x0, ..., bs): "torch" (the
reference) and "triton" (CUDA fp16/bf16 pairs of one shape, `kernel.supports`).
"""
from __future__ import annotations

import torch

from ..registry import register, resolve
from .reference import headwise_input_grad, headwise_wgrad_dense

register("headwise", "torch", headwise_wgrad_dense, reference=True)
register("headwise", "triton", "mal.ops.headwise.kernel:headwise_wgrad", "mal.ops.headwise.kernel:supports",
         device="cuda")


def headwise_wgrad(*args) -> torch.Tensor:
    """Weight gradients of P block-diagonal maps, args = (g0, x0, g1, x1, ..., bs) with each pair (N, nb*bs)
    -> (P, nb, bs, bs): the Triton kernel where it applies (CUDA fp16/bf16; float32 out; one reduction for all
    pairs), else the dense-GEMM form."""
    return resolve("headwise", *args)(*args)                                # (P, nb, bs, bs)


class HeadwiseGemmGrad(torch.autograd.Function):
    """Block-diagonal map with pointwise forward and input gradient, and the weight gradient on tensor cores.

    The weight gradient dW[h] = sum_n g[n, h, :]^T x[n, h, :] is a reduction over all tokens; written
    pointwise, inductor turns it into slow reductions (14 % of a CIFAR MAL-T step). On CUDA in fp16/bf16 it
    is `kernel.headwise_wgrad` (64-channel tile products over token chunks, diagonal blocks kept); else the
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
        return gx.to(x.dtype), headwise_wgrad(g2, x2, bs)[0].to(weight.dtype)


def headwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pointwise: bool) -> torch.Tensor:
    """Block-diagonal map of `LinearHeadwise`: x (..., nb*bs), weight (nb, out=bs, in=bs) -> (..., nb*bs).

    pointwise: broadcast multiply + sum (fused by the compiler), weight gradient from a GEMM; else an einsum.
    """
    nb, bs = weight.shape[0], weight.shape[-1]
    if pointwise:
        y = HeadwiseGemmGrad.apply(x, weight)                               # (..., nb*bs)
    else:
        y = torch.einsum("...hi,hoi->...ho", x.unflatten(-1, (nb, bs)), weight).flatten(-2)  # (..., nb*bs)
    return y if bias is None else y + bias


__all__ = ["headwise", "headwise_wgrad", "headwise_wgrad_dense", "headwise_input_grad", "HeadwiseGemmGrad"]
