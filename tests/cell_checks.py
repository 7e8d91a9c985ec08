"""Helpers shared by the mLSTM cell's kernel tests (parallel and chunkwise): a cell's output and gradients, relative
errors, and the call-after-call check."""
from __future__ import annotations

import torch

NAMES = ("h", "dq", "dk", "dv", "di", "df")


def run_cell(fn, inputs, dh, upcast=False):
    """Output and gradients w.r.t. q, k, v, i, f of fn at the inputs (all in float64 if upcast)."""
    leaves = [(t.double() if upcast else t).detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, dh.to(out.dtype)))


def rel(x, ref) -> float:
    """||x - ref|| / ||ref||, in float64."""
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_same_each_call(fn, inputs, dh, calls: int) -> None:
    """`calls` more calls of fn, with fresh buffers, give the first call's h, dq, dk, dv bitwise (di, df within
    1e-6: float64 sums)."""
    first = run_cell(fn, inputs, dh)
    for _ in range(calls):
        again = run_cell(fn, inputs, dh)
        for name, a, b in zip(NAMES, again, first):
            assert torch.equal(a, b) if name not in ("di", "df") else rel(a, b) < 1e-6, name
