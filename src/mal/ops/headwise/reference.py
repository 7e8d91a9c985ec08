"""The 4x4 block-diagonal q/k/v map's gradients in plain PyTorch: the input gradient (pointwise) and the
weight gradient as the diagonal blocks of one dense GEMM (the oracle and fallback of `kernel.headwise_wgrad`)."""
from __future__ import annotations

import torch


def headwise_wgrad_dense(*args) -> torch.Tensor:
    """Weight gradients of block-diagonal maps as the diagonal (bs, bs) blocks of dense GEMMs, I/bs times the
    needed FLOPs: args = (g0, x0, g1, x1, ..., bs), each pair (N, nb*bs) -> (P, nb, bs, bs)."""
    *pairs, bs = args
    out = []
    for g, x in zip(pairs[::2], pairs[1::2]):
        nb = x.shape[1] // bs
        full = g.t() @ x                                                    # (nb*bs, nb*bs)
        out.append(torch.diagonal(full.view(nb, bs, nb, bs), dim1=0, dim2=2).permute(2, 0, 1))  # (nb, bs, bs)
    return torch.stack(out)                                                 # (P, nb, bs, bs)


def headwise_input_grad(gy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Input gradient of a block-diagonal map: gy (..., nb*bs), weight (nb, out, in) -> (..., nb*bs)."""
    nb, bs = weight.shape[0], weight.shape[-1]
    return (gy.unflatten(-1, (nb, bs, 1)) * weight).sum(-2).flatten(-2)      # (..., nb*bs)


__all__ = ["headwise_wgrad_dense", "headwise_input_grad"]
