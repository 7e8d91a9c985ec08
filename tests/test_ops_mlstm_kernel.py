"""The Triton mLSTM backend (`mal.ops.mlstm.kernel`) computes the same function, and the same gradients, as
`mlstm_parallel`.

Accuracy is judged against the torch backend evaluated in float64 on the same (rounded) inputs:
  * float32: the Triton error may be at most FP32_REL_SLACK x the torch-float32 error + FP32_REL_FLOOR
    (with gates of magnitude 10 both lose ~1e-3 to the float32 log-gate cumsum, which neither can avoid);
  * bf16: relative error (||x - ref|| / ||ref||) at most BF16_REL_SLACK x the torch-bf16 error + BF16_REL_FLOOR,
    and the Triton and torch bf16 results differ by at most BF16_REL_VS_TORCH of the reference scale.
GPU tests skip without CUDA; the CPU tests check dispatch and run the kernels in Triton's interpreter
(`tests/interpreter/mlstm.py`), where the O(S) gate kernels (statistics forward, gate gradients backward) also
equal their torch form (the one rows longer than `STATS_MAX_SEQ` take), ties of the running arg-max included.
"""
from __future__ import annotations

import pytest
import torch

from cell_checks import NAMES, assert_same_each_call, rel, run_cell
from mal.ops import mlstm, resolve
from mal.ops.mlstm.reference import mlstm_parallel

HEAD_DIMS = (96, 192, 384)
SEQ_LENS = (1, 17, 144, 197, 577)
BATCH, HEADS = 2, 2
FP32_REL_SLACK, FP32_REL_FLOOR = 2.0, 2e-5
BF16_REL_SLACK, BF16_REL_FLOOR = 1.5, 1e-2
BF16_REL_VS_TORCH = 5e-2


def _inputs(S, DH, dtype, gate_scale, device, seed):
    """Random q, k, v and gate pre-activations; gate_scale=10 exercises large |i|, |f| (both signs)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(BATCH, HEADS, S, DH, generator=g).to(device, dtype) for _ in range(3))
    i = (gate_scale * torch.randn(BATCH, HEADS, S, generator=g)).to(device)
    f = (gate_scale * torch.randn(BATCH, HEADS, S, generator=g) + (3.0 if gate_scale < 10 else 0.0)).to(device)
    dh = torch.randn(BATCH, HEADS, S, DH, generator=g).to(device, dtype)
    return (q, k, v, i, f), dh


def _triton_fn(q, k, v, i, f):
    return mlstm(q, k, v, i, f, backend="triton")


@pytest.mark.needs_gpu
@pytest.mark.parametrize("gate_scale", [1.0, 10.0])
@pytest.mark.parametrize("S", SEQ_LENS)
@pytest.mark.parametrize("DH", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch(dtype, DH, S, gate_scale):
    inputs, dh = _inputs(S, DH, dtype, gate_scale, "cuda", seed=1000 * DH + S)
    ref = run_cell(mlstm_parallel, inputs, dh, upcast=True)
    tor = run_cell(mlstm_parallel, inputs, dh)
    tri = run_cell(_triton_fn, inputs, dh)
    for name, a, b, r in zip(NAMES, tri, tor, ref):
        assert torch.isfinite(a).all(), name
        if r.norm() == 0:           # df at S=1 is exactly zero
            assert a.abs().max() == 0, name
            continue
        err_tri, err_tor = rel(a, r), rel(b, r)
        if dtype == torch.float32:
            assert err_tri <= FP32_REL_SLACK * err_tor + FP32_REL_FLOOR, (name, err_tri, err_tor)
        else:
            assert err_tri <= BF16_REL_SLACK * err_tor + BF16_REL_FLOOR, (name, err_tri, err_tor)
            assert rel(a, b.double()) <= BF16_REL_VS_TORCH or rel(a, r) <= rel(b, r), (name, rel(a, b))


@pytest.mark.needs_gpu
@pytest.mark.parametrize("S", [144, 197])
@pytest.mark.parametrize("DH", HEAD_DIMS)
def test_deterministic(DH, S):
    """Call after call, with fresh buffers, h, dq, dk, dv are bitwise equal (the kernels use no atomics; di, df
    within 1e-6). 64 images run many programs at once: that is where a launch tile that races would show."""
    g = torch.Generator().manual_seed(DH + S)
    q, k, v, dh = (torch.randn(64, 4, S, DH, generator=g).to("cuda", torch.bfloat16) for _ in range(4))
    i, f = (torch.randn(64, 4, S, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    assert_same_each_call(_triton_fn, (q, k, v, i, f + 3.0), dh, calls=2)


@pytest.mark.needs_gpu
def test_noncontiguous_and_autograd_through_model_like_views():
    """q, k, v as transposed views of a (B, S, NH, DH) tensor and i, f in bf16 give the same result."""
    torch.manual_seed(0)                                                    # di/df vs torch bf16 are 1e-2 apart
    B, S, NH, DH = 2, 50, 4, 96
    base = torch.randn(3, B, S, NH, DH, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in base)                             # (B, NH, S, DH) views
    i, f = torch.randn(2, B, NH, S, device="cuda", dtype=torch.bfloat16)
    dh = torch.randn(B, NH, S, DH, device="cuda", dtype=torch.bfloat16)
    a = run_cell(_triton_fn, (q, k, v, i, f), dh)
    b = run_cell(mlstm_parallel, tuple(t.contiguous() for t in (q, k, v, i, f)), dh)
    for name, x, y in zip(NAMES, a, b):
        assert x.dtype == y.dtype, name
        assert rel(x, y) < BF16_REL_VS_TORCH, (name, rel(x, y))


@pytest.mark.needs_gpu
def test_auto_picks_triton_on_cuda():
    (q, k, v, i, f), _ = _inputs(17, 96, torch.bfloat16, 1.0, "cuda", seed=0)
    assert resolve("mlstm", q, k, v, i, f, backend="auto").name == "triton"
    q8 = torch.randn(1, 1, 4, 8, device="cuda")                             # DH=8 is below the kernel's minimum
    assert resolve("mlstm", q8, q8, q8, q8[..., 0], q8[..., 0], backend="auto").name == "torch"


def test_cpu_dispatch():
    q = torch.randn(1, 2, 5, 96)
    i = torch.randn(1, 2, 5)
    assert resolve("mlstm", q, q, q, i, i, backend="auto").name == "torch"
    with pytest.raises(ValueError, match="runs on cuda inputs"):          # named, with or without triton
        resolve("mlstm", q, q, q, i, i, backend="triton")


def test_gate_kernels_in_interpreter_equal_the_torch_form(triton_interpreter):
    triton_interpreter("mlstm", "gate_kernels_equal_the_torch_form")


def test_interpreter_matches_float64_on_cpu(triton_interpreter):
    """The kernels' math (fp32 path, forward and backward) in Triton's CPU interpreter, small shapes."""
    triton_interpreter("mlstm", "kernels_match_float64")
