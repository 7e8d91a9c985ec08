"""The Triton mLSTM backend computes the same function, and the same gradients, as `mlstm_parallel`.

Accuracy is judged against the torch backend evaluated in float64 on the same (rounded) inputs:
  * float32: the Triton error may be at most FP32_REL_SLACK x the torch-float32 error + FP32_REL_FLOOR
    (with gates of magnitude 10 both lose ~1e-3 to the float32 log-gate cumsum, which neither can avoid);
  * bf16: relative error (||x - ref|| / ||ref||) at most BF16_REL_SLACK x the torch-bf16 error + BF16_REL_FLOOR,
    and the Triton and torch bf16 results differ by at most BF16_REL_VS_TORCH of the reference scale.
GPU tests skip without CUDA; the CPU tests check dispatch and run the kernels in Triton's interpreter, where the
O(S) gate kernels (statistics forward, gate gradients backward) also equal their torch form (the one rows
longer than `STATS_MAX_SEQ` take), ties of the running arg-max included.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from mal.kernels import mlstm_parallel, resolve_backend

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")

HEAD_DIMS = (96, 192, 384)
SEQ_LENS = (1, 17, 144, 197, 577)
BATCH, HEADS = 2, 2
FP32_REL_SLACK, FP32_REL_FLOOR = 2.0, 2e-5
BF16_REL_SLACK, BF16_REL_FLOOR = 1.5, 1e-2
BF16_REL_VS_TORCH = 5e-2
NAMES = ("h", "dq", "dk", "dv", "di", "df")


def _inputs(S, DH, dtype, gate_scale, device, seed):
    """Random q, k, v and gate pre-activations; gate_scale=10 exercises large |i|, |f| (both signs)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(BATCH, HEADS, S, DH, generator=g).to(device, dtype) for _ in range(3))
    i = (gate_scale * torch.randn(BATCH, HEADS, S, generator=g)).to(device)
    f = (gate_scale * torch.randn(BATCH, HEADS, S, generator=g) + (3.0 if gate_scale < 10 else 0.0)).to(device)
    dh = torch.randn(BATCH, HEADS, S, DH, generator=g).to(device, dtype)
    return (q, k, v, i, f), dh


def _run(fn, inputs, dh, upcast=False):
    """Output and gradients w.r.t. q, k, v, i, f of fn at the inputs (all in float64 if upcast)."""
    leaves = [(t.double() if upcast else t).detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dh.to(out.dtype))
    return (out, *grads)


def _rel(x, ref):
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _triton_fn(q, k, v, i, f):
    from mal.kernels import mlstm
    return mlstm(q, k, v, i, f, backend="triton")


@needs_gpu
@pytest.mark.parametrize("gate_scale", [1.0, 10.0])
@pytest.mark.parametrize("S", SEQ_LENS)
@pytest.mark.parametrize("DH", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch(dtype, DH, S, gate_scale):
    inputs, dh = _inputs(S, DH, dtype, gate_scale, "cuda", seed=1000 * DH + S)
    ref = _run(mlstm_parallel, inputs, dh, upcast=True)
    tor = _run(mlstm_parallel, inputs, dh)
    tri = _run(_triton_fn, inputs, dh)
    for name, a, b, r in zip(NAMES, tri, tor, ref):
        assert torch.isfinite(a).all(), name
        if r.norm() == 0:           # df at S=1 is exactly zero
            assert a.abs().max() == 0, name
            continue
        err_tri, err_tor = _rel(a, r), _rel(b, r)
        if dtype == torch.float32:
            assert err_tri <= FP32_REL_SLACK * err_tor + FP32_REL_FLOOR, (name, err_tri, err_tor)
        else:
            assert err_tri <= BF16_REL_SLACK * err_tor + BF16_REL_FLOOR, (name, err_tri, err_tor)
            assert _rel(a, b.double()) <= BF16_REL_VS_TORCH or _rel(a, r) <= _rel(b, r), (name, _rel(a, b))


@needs_gpu
def test_noncontiguous_and_autograd_through_model_like_views():
    """q, k, v as transposed views of a (B, S, NH, DH) tensor and i, f in bf16 give the same result."""
    torch.manual_seed(0)                                                    # di/df vs torch bf16 are 1e-2 apart
    B, S, NH, DH = 2, 50, 4, 96
    base = torch.randn(3, B, S, NH, DH, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in base)                             # (B, NH, S, DH) views
    i, f = torch.randn(2, B, NH, S, device="cuda", dtype=torch.bfloat16)
    dh = torch.randn(B, NH, S, DH, device="cuda", dtype=torch.bfloat16)
    a = _run(_triton_fn, (q, k, v, i, f), dh)
    b = _run(mlstm_parallel, tuple(t.contiguous() for t in (q, k, v, i, f)), dh)
    for name, x, y in zip(NAMES, a, b):
        assert x.dtype == y.dtype, name
        assert _rel(x, y) < BF16_REL_VS_TORCH, (name, _rel(x, y))


@needs_gpu
def test_auto_picks_triton_on_cuda():
    (q, k, v, i, f), _ = _inputs(17, 96, torch.bfloat16, 1.0, "cuda", seed=0)
    assert resolve_backend(q, k, v, i, f, backend="auto").name == "triton"
    q8 = torch.randn(1, 1, 4, 8, device="cuda")                             # DH=8 is below the kernel's minimum
    assert resolve_backend(q8, q8, q8, q8[..., 0], q8[..., 0], backend="auto").name == "torch"


def test_cpu_dispatch():
    q = torch.randn(1, 2, 5, 96)
    i = torch.randn(1, 2, 5)
    assert resolve_backend(q, q, q, i, i, backend="auto").name == "torch"
    if not HAS_TRITON:
        pytest.skip("triton is not installed: the 'triton' backend is not registered")
    with pytest.raises(ValueError):
        resolve_backend(q, q, q, i, i, backend="triton")


def test_gate_kernels_in_interpreter_equal_the_torch_form(triton_interpreter):
    triton_interpreter("""
        import torch
        from mal.kernels import mlstm_triton as mt
        g = torch.Generator().manual_seed(0)
        for S in (1, 7, 33, 200):
            i = 3 * torch.randn(2, 3, S, generator=g)
            f = 3 * torch.randn(2, 3, S, generator=g)
            f[0, 0] = 40.0                                                  # log-forget 0: a = 0, so ...
            i[0, 0, ::3] = 5.0                                              # ... ties of i - a at every third token
            i, f = i.transpose(1, 2).contiguous().transpose(1, 2), f        # a strided (B, NH, S) view for i
            got = mt._gate_stats(i, f)
            mt.STATS_MAX_SEQ, keep = 0, mt.STATS_MAX_SEQ                    # the torch form
            want = mt._gate_stats(i, f)
            mt.STATS_MAX_SEQ = keep
            assert torch.equal(got[2].long(), want[2]), S                   # the same arg-max, ties to the later
            scale = want[0].abs().max() + want[1].abs().max()               # a and m are sums of terms this large
            for x, y in zip(got[:2] + got[3:], want[:2] + want[3:]):        # float32 scans in another order
                assert (x - y).abs().max() <= 1e-6 * scale, (S, (x - y).abs().max(), scale)
            dn, row_g, col_g = (torch.randn(2, 3, S, generator=g) for _ in range(3))
            dn *= 1e5                                                       # eps dN visible next to R and K
            out = mt._gate_grads(dn, row_g, col_g, got[2], f, 1e-6, torch.float32)
            mt.STATS_MAX_SEQ = 0
            ref = mt._gate_grads(dn, row_g, col_g, want[2], f, 1e-6, torch.float32)
            mt.STATS_MAX_SEQ = keep
            for x, y in zip(out, ref):
                assert x.dtype == torch.float32 and torch.allclose(x, y, rtol=1e-5, atol=1e-5 * y.abs().max()), S
        print("ok")
    """)


def test_interpreter_matches_float64_on_cpu(triton_interpreter):
    """The kernels' math (fp32 path, forward and backward) in Triton's CPU interpreter, small shapes."""
    triton_interpreter("""
        import torch
        from mal.kernels import mlstm_parallel
        from mal.kernels.mlstm_triton import _d_chunks, mlstm_triton
        # head dims of 3 * 2^n run as two exact column tiles; others as one tile, padded and masked if need be
        assert [_d_chunks(d) for d in (96, 192, 384, 40, 64, 100)] == [
            (64, 32), (128, 64), (256, 128), (32, 16), (64, 0), (128, 0)]
        torch.manual_seed(0)
        for S, DH, gs in [(1, 16, 1.0), (23, 40, 1.0), (9, 100, 1.0), (70, 96, 10.0)]:
            xs = [torch.randn(2, 2, S, DH) for _ in range(3)] + [gs * torch.randn(2, 2, S) for _ in range(2)]
            dh = torch.randn(2, 2, S, DH)
            res = []
            for fn, dt in ((mlstm_triton, torch.float32), (mlstm_parallel, torch.float32),
                           (mlstm_parallel, torch.float64)):
                leaves = [x.to(dt).requires_grad_() for x in xs]
                out = fn(*leaves)
                res.append([out] + list(torch.autograd.grad(out, leaves, dh.to(dt))))
            for a, b, r in zip(*res):
                if r.norm() == 0:
                    continue
                e_tri = ((a.double() - r).norm() / r.norm()).item()
                e_tor = ((b.double() - r).norm() / r.norm()).item()
                assert e_tri <= 2.0 * e_tor + 2e-5, (S, DH, gs, e_tri, e_tor)
        # head views of (B, S, NH*DH) tensors, as the fused block passes them: gradients come back in that layout
        B, S, NH, DH = 2, 19, 2, 32
        bases = [torch.randn(B, S, NH * DH) for _ in range(3)]
        gates = [torch.randn(B, NH, S) for _ in range(2)]
        dh = torch.randn(B, NH, S, DH)
        res = []
        for fn, dt in ((mlstm_triton, torch.float32), (mlstm_parallel, torch.float64)):
            leaves = [x.to(dt).requires_grad_() for x in bases + gates]
            heads = [t.view(B, S, NH, DH).transpose(1, 2) for t in leaves[:3]]
            out = fn(*heads, *leaves[3:])
            res.append(list(torch.autograd.grad(out, leaves, dh.to(dt))))
            if fn is mlstm_triton:
                views = [t.detach().requires_grad_() for t in heads]
                grads = torch.autograd.grad(fn(*views, *leaves[3:]), views, dh)
                assert all(g.stride() == t.stride() for g, t in zip(grads, views))
        for a, r in zip(*res):
            assert ((a.double() - r).norm() / r.norm()).item() < 1e-4
        print("ok")
    """)
