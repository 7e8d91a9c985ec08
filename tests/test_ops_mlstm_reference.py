"""The parallel mLSTM (`mal.ops.mlstm.reference`) against the recurrent oracle, and the backend dispatch."""
import pytest
import torch

from mal.ops import mlstm, resolve
from mal.ops.mlstm.reference import mlstm_parallel, mlstm_recurrent


def _inputs(B=2, NH=3, S=23, DH=8, dtype=torch.float64, gate_scale=30.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, NH, S, DH, generator=g, dtype=dtype) for _ in range(3))
    i = (torch.rand(B, NH, S, generator=g, dtype=dtype) * 2 - 1) * gate_scale
    f = (torch.rand(B, NH, S, generator=g, dtype=dtype) * 2 - 1) * gate_scale
    return q, k, v, i, f


@pytest.mark.parametrize("gate_scale", [1.0, 30.0])
@pytest.mark.parametrize("S", [1, 5, 64])
def test_parallel_equals_recurrent_float64(S, gate_scale):
    args = _inputs(S=S, gate_scale=gate_scale)
    err = (mlstm_parallel(*args) - mlstm_recurrent(*args)).abs().max().item()
    assert err <= 1e-8


def test_extreme_gates_stay_finite():
    q, k, v, i, f = _inputs(S=32)
    i[..., ::2], f[..., 1::3] = 30.0, -30.0
    out = mlstm_parallel(q, k, v, i, f)
    assert torch.isfinite(out).all()
    assert (out - mlstm_recurrent(q, k, v, i, f)).abs().max() <= 1e-8


@pytest.mark.parametrize("gate_scale", [1.0, 5.0])
def test_bf16_within_tolerance(gate_scale):
    """bf16 inputs, fp32 gate math, bf16 C @ V: against the float64 oracle on the same (bf16-rounded) inputs,
    max error <= 2 % of the output scale and mean error <= 0.5 % of the mean magnitude."""
    args = [a.to(torch.bfloat16) for a in _inputs(S=48, DH=16, gate_scale=gate_scale)]
    ref = mlstm_recurrent(*(a.double() for a in args))
    out = mlstm_parallel(*args)
    assert out.dtype == torch.bfloat16
    err = (out.double() - ref).abs()
    assert err.max() <= 2e-2 * ref.abs().max()
    assert err.mean() <= 5e-3 * ref.abs().mean()


def test_gradients_match_recurrent():
    args = [a.requires_grad_() for a in _inputs(B=1, NH=2, S=9, DH=4, gate_scale=3.0)]
    g_par = torch.autograd.grad(mlstm_parallel(*args).sum(), args)
    g_rec = torch.autograd.grad(mlstm_recurrent(*args).sum(), args)
    for a, b in zip(g_par, g_rec):
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-6)


def test_dispatch_falls_back_on_cpu():
    args = _inputs(dtype=torch.float32)
    assert resolve("mlstm", *args, backend="auto").name == "torch"
    assert torch.equal(mlstm(*args), mlstm_parallel(*args))
    assert torch.equal(mlstm(*args, backend="recurrent"), mlstm_recurrent(*args))
    with pytest.raises(ValueError, match="unknown mlstm backend"):
        mlstm(*args, backend="cuda-magic")
