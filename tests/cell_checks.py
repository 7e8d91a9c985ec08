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


def assert_same_results(got, ref) -> None:
    """Two runs' (h, dq, dk, dv, di, df): h, dq, dk, dv bitwise equal, di and df within 1e-6 (float64 sums)."""
    for name, a, b in zip(NAMES, got, ref):
        assert torch.equal(a, b) if name not in ("di", "df") else rel(a, b) < 1e-6, name


def assert_same_each_call(fn, inputs, dh, calls: int) -> None:
    """`calls` more calls of fn, with fresh buffers, give the first call's results (`assert_same_results`)."""
    first = run_cell(fn, inputs, dh)
    for _ in range(calls):
        assert_same_results(run_cell(fn, inputs, dh), first)
