"""The 4x4 block-diagonal q/k/v map's gradients in plain PyTorch: the input gradient (pointwise) and the
weight gradient as the diagonal blocks of one dense GEMM (the oracle and fallback of `kernel.headwise_wgrad`)."""
from __future__ import annotations

import torch


def headwise_wgrad_dense(g: torch.Tensor, x: torch.Tensor, bs: int) -> torch.Tensor:
    """Weight gradient of a block-diagonal map as the diagonal (bs, bs) blocks of one dense GEMM:
    g, x (N, nb*bs) -> (nb, bs, bs), I/bs times the needed FLOPs."""
    nb = x.shape[1] // bs
    full = g.t() @ x                                                        # (nb*bs, nb*bs)
    return torch.diagonal(full.view(nb, bs, nb, bs), dim1=0, dim2=2).permute(2, 0, 1)  # (nb, bs, bs)


def headwise_input_grad(gy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Input gradient of a block-diagonal map: gy (..., nb*bs), weight (nb, out, in) -> (..., nb*bs)."""
    nb, bs = weight.shape[0], weight.shape[-1]
    return (gy.unflatten(-1, (nb, bs, 1)) * weight).sum(-2).flatten(-2)      # (..., nb*bs)


__all__ = ["headwise_wgrad_dense", "headwise_input_grad"]
