"""The Triton weight-gradient kernel of the block-diagonal q/k/v maps (`mal.ops.headwise.kernel`).

CPU: the kernel in Triton's interpreter against a float64 einsum (`tests/interpreter/headwise.py`: token counts
not a multiple of the tile or chunk, a strided input as in the fused block, block sizes 2 and 4). GPU: bf16 at
ViL-T/B shapes, and the fused block's autograd function picks the kernel and agrees with its dense-GEMM form.
"""
from __future__ import annotations

import pytest
import torch

from mal.ops.headwise import headwise, headwise_wgrad_dense


def _reference(g: torch.Tensor, x: torch.Tensor, bs: int) -> torch.Tensor:
    N = x.shape[0]
    return torch.einsum("nho,nhi->hoi", g.double().view(N, -1, bs), x.double().view(N, -1, bs))  # (nb, bs, bs)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_interpreter_matches_float64_on_cpu(triton_interpreter):
    triton_interpreter("headwise", "wgrad_matches_float64")


@pytest.mark.needs_gpu
@pytest.mark.parametrize("N,I", [(128 * 196, 384), (128 * 196, 1536), (1000, 64)])
def test_kernel_matches_float64_on_gpu(N, I):
    from mal.ops.headwise.kernel import headwise_wgrad, supports
    torch.manual_seed(0)
    base = torch.randn(N, 2 * I, device="cuda", dtype=torch.bfloat16)
    x, g = base[:, I:], torch.randn(N, I, device="cuda", dtype=torch.bfloat16)
    assert supports(g, x, 4)
    out = headwise_wgrad(g, x, 4)
    ref = _reference(g, x, 4)
    dense = headwise_wgrad_dense(g, x, 4)
    assert _rel(out, ref) <= 2 * _rel(dense, ref) + 1e-4


@pytest.mark.needs_gpu
def test_fused_headwise_uses_the_kernel_and_matches_dense_form(monkeypatch):
    from mal.ops.headwise import kernel
    torch.manual_seed(0)
    x = torch.randn(8, 196, 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(96, 4, 4, device="cuda", requires_grad=True)
    gy = torch.randn(8, 196, 384, device="cuda", dtype=torch.bfloat16)
    calls = []
    real = kernel.headwise_wgrad
    monkeypatch.setattr(kernel, "headwise_wgrad", lambda *a: calls.append(1) or real(*a))
    gx, gw = torch.autograd.grad(headwise(x, w, None, pointwise=True), (x, w), gy)
    assert calls
    monkeypatch.setattr(kernel, "supports", lambda *a: False)                # the dense-GEMM form
    gx_d, gw_d = torch.autograd.grad(headwise(x, w, None, pointwise=True), (x, w), gy)
    assert torch.equal(gx, gx_d)
    assert _rel(gw, gw_d) < 1e-2
