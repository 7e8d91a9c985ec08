"""The pre-cell step of the fused block as one Triton kernel (`mal.ops.qkv.kernel`) with a written-out
backward (`mal.ops.block_grad.block_pre_vjp`, through `mal.ops.vil_block.pre.block_pre_fused`).

CPU: the kernel in Triton's interpreter against `block_pre` in float64 (`tests/interpreter/qkv.py`: float32 and
float16, the interpreter's bf16 dot is broken; sequences shorter than the conv and than a tile, channel chunks of
16/32/64); the autograd function's forward and every gradient equal `block_pre`'s autograd in float64; the
backward traces as one graph.
GPU: bf16 at ViL-T/B shapes within bf16 rounding of float64, and the fused block uses the kernel.
"""
from __future__ import annotations

import pytest
import torch

from mal.ops.block_grad import block_pre_vjp
from mal.ops.qkv import block_pre, gate_weights
from mal.ops.vil_block.pre import block_pre_fused


def _pre_args(B, S, I, dtype=torch.float64, device="cpu", gates=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(device)
    args = [r(B, S, 2 * I).to(dtype), r(I, 1, 4, s=0.5), r(I, s=0.1)]
    for _ in range(3):
        args += [r(I // 4, 4, 4, s=0.5), r(I, s=0.1)]
    return args + [r(gates, 3 * I, s=0.1), r(gates)]


def test_interpreter_matches_block_pre_in_float64(triton_interpreter):
    triton_interpreter("qkv", "kernel_matches_block_pre_in_float64")


def test_fused_function_forward_and_gradients_equal_block_pre_autograd_float64():
    args = _pre_args(2, 9, 32)
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(2, 9, 32, generator=g, dtype=torch.float64) for _ in range(3)]
    cot.append(torch.randn(2, 9, 8, generator=g, dtype=torch.float64))
    res = []
    for fn in (block_pre, lambda *a: block_pre_fused(*a, compiled=False)):
        leaves = [t.clone().requires_grad_() for t in args]
        out = fn(*leaves)
        res.append((out, torch.autograd.grad(out, leaves, cot)))
    (out_f, g_f), (out_r, g_r) = res[1], res[0]
    for a, b in zip(out_f, out_r):
        assert torch.equal(a, b)
    for i, (a, b) in enumerate(zip(g_f, g_r)):
        assert ((a - b).norm() / b.norm()).item() < 1e-12, i


def test_fused_function_gives_zero_gradients_for_unused_outputs():
    args = _pre_args(1, 5, 16)
    leaves = [t.clone().requires_grad_() for t in args]
    q, k, v, g = block_pre_fused(*leaves, compiled=False)
    q.sum().backward()                                                       # k, v, g unused
    ref = [t.clone().requires_grad_() for t in args]
    block_pre(*ref)[0].sum().backward()
    for a, b in zip(leaves, ref):                                            # autograd: None where unused
        want = b.grad if b.grad is not None else torch.zeros_like(b)
        assert torch.allclose(a.grad, want, rtol=1e-12, atol=1e-14)


def test_written_out_backward_traces_as_one_graph():
    args = _pre_args(2, 7, 16, dtype=torch.float32)
    xz, cw, cb, wq, bq, wk, bk, wv, bv, wg, bg = args
    w_c, w_m, _ = gate_weights(wg, bg, wq, bq, wk, bk, wv, bv)
    grads = [torch.randn(2, 7, 16) for _ in range(3)] + [torch.randn(2, 7, 8)]
    ref = block_pre_vjp(xz, cw, cb, wq, wk, wv, w_c, w_m, *grads)
    torch._dynamo.reset()
    out = torch.compile(block_pre_vjp, backend="eager", fullgraph=True)(xz, cw, cb, wq, wk, wv, w_c, w_m, *grads)
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.needs_gpu
@pytest.mark.parametrize("B,S,I", [(8, 196, 384), (4, 196, 1536), (3, 5, 64)])
def test_kernel_bf16_on_gpu(B, S, I):
    from mal.ops.qkv import kernel as qkv_triton
    args = _pre_args(B, S, I, device="cuda")
    xz = args[0].to(torch.bfloat16)
    w_c, w_m, b = gate_weights(*args[9:], *args[3:9])
    assert qkv_triton.supports(xz, args[1], args[3], args[4], args[6], args[8], 8)
    out = qkv_triton.qkv_gates(xz, *[t.float() for t in args[1:9]], w_c.float(), w_m.float(), b.float())
    ref = block_pre(xz.double(), *args[1:])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = block_pre(xz, *[t.float() for t in args[1:]])               # the compiled region's math, eager
    for o, want, p in zip(out, ref, plain):
        e = ((o.double() - want).norm() / want.norm()).item()
        e_plain = ((p.double() - want).norm() / want.norm()).item()
        assert o.dtype == torch.bfloat16 and e <= 1.5 * e_plain + 1e-3, (e, e_plain)


@pytest.mark.needs_gpu
def test_fused_block_uses_the_kernel(monkeypatch):
    from mal.models.vil import ViLBlock
    from mal.ops.qkv import kernel as qkv_triton
    calls = []
    real = qkv_triton.qkv_gates
    monkeypatch.setattr(qkv_triton, "qkv_gates", lambda *a: calls.append(1) or real(*a))
    blk = ViLBlock(64, num_heads=4).cuda().fast_path(compile=False, recompute_qkv=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        blk(torch.randn(2, 16, 64, device="cuda")).sum().backward()
    assert len(calls) == 2                                                   # forward and the q, k, v recompute
