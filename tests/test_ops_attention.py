"""The pretraining decoder's masked attention op (`mal.ops.attention`): SDPA (the reference) and the short-sequence
Triton kernel.

CPU: the kernel in Triton's interpreter against float64 math (`tests/interpreter/attention.py`: the decoder's slots
at M = 128 on head views of one qkv tensor, causal at M = 143, odd sizes, float32 and float16, a row that sees no
key), the op's dispatch to SDPA, and the kernels' FLOP counts. GPU: bf16 at the decoder's shape against float32 math,
as close as SDPA, also compiled; "auto" picks the kernel there (half SDPA's time: benchmarks/decoder_attention.py).
"""
from __future__ import annotations

import pytest
import torch

from cell_checks import rel
from mal.models.vit import block_causal_mask
from mal.ops import backends, resolve
from mal.ops.attention import attention, attention_math


def test_interpreter_matches_float64_on_cpu(triton_interpreter):
    triton_interpreter("attention", "matches_float64")


def test_interpreter_row_that_sees_nothing_gives_zero_on_cpu(triton_interpreter):
    triton_interpreter("attention", "hidden_rows_give_zero")


def test_the_op_runs_sdpa_on_cpu_and_equals_the_math_form():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 16, dtype=torch.float64) for _ in range(3))
    mask = block_causal_mask(torch.arange(24) // 4)
    assert backends("attention") == ["torch", "triton"]
    assert resolve("attention", q, k, v, mask).name == "torch"
    assert rel(attention(q, k, v, mask), attention_math(q, k, v, mask)) < 1e-12
    with pytest.raises(ValueError, match="attention backend 'triton' does not support"):
        attention(q, k, v, mask, backend="triton")


def test_flop_counter_counts_the_kernels_as_sdpa_on_cpu():
    """train_step.py's MFU counts the step's FLOPs on the device that runs it: the custom ops count as SDPA would,
    forward 2 products of B H M M Dh multiply-adds, backward 5 (the scores recomputed)."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    from mal.ops.attention.kernel import attention_bwd, attention_fwd
    B, H, M, D = 2, 4, 128, 32
    with FakeTensorMode():                                                   # CUDA tensors without a GPU
        q = torch.empty(B, H, M, D, device="cuda")
        mask = torch.ones(M, M, dtype=torch.bool, device="cuda")
        with FlopCounterMode(display=False) as counter:
            out, lse = attention_fwd(q, q, q, mask)
            attention_bwd(q, q, q, mask, out, lse, out)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts == {"mal.attention_fwd": 2 * 2 * B * H * M * M * D, "mal.attention_bwd": 5 * 2 * B * H * M * M * D}


def test_kernel_takes_the_decoders_16_bit_heads_and_leaves_the_rest_to_sdpa_on_cpu():
    """What "auto" hands the kernel, read off CUDA tensors' metadata (fake tensors, no GPU): 16-bit heads of 16, 32
    or 64 up to 256 tokens with an (M, M) bool mask; float32 (timed only in 16 bits), longer sequences, other head
    dims and other masks go to SDPA."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from mal.ops.attention.kernel import supports

    def case(B=2, H=4, M=128, D=32, dtype=torch.bfloat16, mask_shape=None, mask_dtype=torch.bool):
        q = torch.empty(B, M, 3, H, D, device="cuda", dtype=dtype).permute(2, 0, 3, 1, 4)[0]   # a head view
        mask = torch.ones(mask_shape or (M, M), device="cuda", dtype=mask_dtype)
        return supports(q, q, q, mask)
    with FakeTensorMode():
        assert case() and case(dtype=torch.float16) and case(M=256, D=64) and case(M=1, D=16)
        assert not case(dtype=torch.float32)
        assert not case(M=257) and not case(D=48) and not case(D=128)
        assert not case(mask_shape=(128, 127)) and not case(mask_dtype=torch.float32)


def _decoder_case(B=8, H=16, M=128, D=32, slot=16):
    qkv = torch.randn(B, M, 3, H, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                            # (B, H, M, D), as CausalBlock
    return q, k, v, block_causal_mask(torch.arange(M, device="cuda") // slot), torch.randn_like(q)


def _out_and_grads(fn, q, k, v, dout):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, dout)]


@pytest.mark.needs_gpu
@pytest.mark.parametrize("keys", [None, 64])
@pytest.mark.parametrize("M,slot", [(128, 16), (143, 1)])
def test_kernel_is_as_close_to_float32_math_as_sdpa_on_gpu(M, slot, keys, monkeypatch):
    """The backward whole (keys None) and split into blocks of 64 keys (BWD_KEYS)."""
    from mal.ops.attention import kernel
    monkeypatch.setattr(kernel, "BWD_KEYS", keys)
    torch.manual_seed(0)
    q, k, v, mask, dout = _decoder_case(M=M, slot=slot)
    assert resolve("attention", q, k, v, mask).name == "triton"
    ref = _out_and_grads(lambda *t: attention_math(*(x.float() for x in t), mask), q, k, v, dout.float())
    ours = _out_and_grads(lambda *t: attention(*t, mask, backend="triton"), q, k, v, dout)
    sdpa = _out_and_grads(lambda *t: attention(*t, mask, backend="torch"), q, k, v, dout)
    for name, a, s, r in zip(["out", "dq", "dk", "dv"], ours, sdpa, ref):
        assert rel(a, r) <= 2 * rel(s, r) + 2e-3, (name, rel(a, r), rel(s, r))


@pytest.mark.needs_gpu
def test_kernel_under_torch_compile_equals_eager_on_gpu():
    """The decoder's block stack is compiled: the kernel is a custom op with its autograd, one opaque node."""
    torch.manual_seed(0)
    q, k, v, mask, dout = _decoder_case(B=2)
    fn = lambda *t: attention(*t, mask, backend="triton")
    eager = _out_and_grads(fn, q, k, v, dout)
    compiled = _out_and_grads(torch.compile(fn, fullgraph=True), q, k, v, dout)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
