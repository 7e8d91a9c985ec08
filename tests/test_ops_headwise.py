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


def test_interpreter_three_maps_in_one_call_on_cpu(triton_interpreter):
    triton_interpreter("headwise", "several_maps_are_each_maps_gradient")


@pytest.mark.needs_gpu
@pytest.mark.parametrize("N,I", [(128 * 196, 384), (128 * 196, 1536), (1000, 64)])
def test_kernel_matches_float64_on_gpu(N, I):
    from mal.ops.headwise.kernel import headwise_wgrad, supports
    torch.manual_seed(0)
    base = torch.randn(N, 2 * I, device="cuda", dtype=torch.bfloat16)
    x, g = base[:, I:], torch.randn(N, I, device="cuda", dtype=torch.bfloat16)
    assert supports(g, x, 4)
    out = headwise_wgrad(g, x, 4)[0]
    ref = _reference(g, x, 4)
    dense = headwise_wgrad_dense(g, x, 4)[0]
    assert _rel(out, ref) <= 2 * _rel(dense, ref) + 1e-4


def test_several_maps_at_once_are_each_maps_gradient_on_cpu():
    """The dispatch of P pairs (the q, k, v maps of a block) falls back to the dense form on a CPU and returns each
    pair's gradient in order, against float64."""
    from mal.ops.headwise import headwise_wgrad
    torch.manual_seed(0)
    gs, xs = [torch.randn(50, 32) for _ in range(3)], [torch.randn(50, 32) for _ in range(3)]
    out = headwise_wgrad(gs[0], xs[0], gs[1], xs[1], gs[2], xs[2], 4)
    assert out.shape == (3, 8, 4, 4)
    for p in range(3):
        assert _rel(out[p], _reference(gs[p], xs[p], 4)) < 1e-6


@pytest.mark.needs_gpu
def test_three_maps_in_one_call_match_float64_on_gpu():
    """The pre-step's call: q and k share x_c, v reads a strided half of xz."""
    from mal.ops import resolve
    from mal.ops.headwise import headwise_wgrad
    torch.manual_seed(0)
    N, I = 256 * 144, 384
    xz = torch.randn(N, 2 * I, device="cuda", dtype=torch.bfloat16)
    x_c, x_m = torch.randn(N, I, device="cuda", dtype=torch.bfloat16), xz[:, :I]
    dq, dk, dv = (torch.randn(N, I, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    args = (dq, x_c, dk, x_c, dv, x_m, 4)
    assert resolve("headwise", *args).name == "triton"
    out = headwise_wgrad(*args)
    dense = headwise_wgrad_dense(*args)
    for p, (g, x) in enumerate([(dq, x_c), (dk, x_c), (dv, x_m)]):
        ref = _reference(g, x, 4)
        assert _rel(out[p], ref) <= 2 * _rel(dense[p], ref) + 1e-4


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
