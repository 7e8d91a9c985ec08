"""The block's pre-LayerNorm kernels (`mal.ops.norm.kernel`) and `mal.ops.vil_block.norm_up.NormUp` around them.

CPU: in Triton's interpreter (`tests/interpreter/norm.py`; float32 in, float32 out), `layer_norm` on x[:, order],
`layer_norm_grad` (dx scattered back through the order, with and without the residual's gradient, rows
[xhat, 1, 0, ...] recomputed) and `affine_grads` on one GEMM over those rows (d w, d b, d W_up, d b_up) equal
float64 autograd of `gather -> F.layer_norm -> F.linear`, for no order, a shared and a per-sample permutation,
rows that fill no tile and a padded row width. `supports` refuses CPU tensors and orders of another length.
GPU: `NormUp` in bf16 gives the plain gather -> LayerNorm -> Linear's output and gradients.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def test_kernels_in_interpreter_match_float64_autograd(triton_interpreter):
    triton_interpreter("norm", "kernels_match_float64_autograd")


def test_supports_refuses_cpu_and_orders_of_another_length():
    from mal.ops.norm import kernel as norm_triton
    x = torch.zeros(2, 5, 16)
    assert not norm_triton.supports(x, None, torch.bfloat16)
    if torch.cuda.is_available():
        x = x.cuda()
        assert norm_triton.supports(x, None, torch.bfloat16)
        assert norm_triton.supports(x, torch.arange(5, device="cuda"), torch.bfloat16)
        assert not norm_triton.supports(x, torch.arange(4, device="cuda"), torch.bfloat16)      # not a permutation
        assert not norm_triton.supports(x, torch.zeros(3, 5, dtype=torch.long, device="cuda"), torch.bfloat16)
        assert not norm_triton.supports(x, None, torch.float32)
        assert not norm_triton.supports(x.transpose(0, 1), None, torch.bfloat16)


@pytest.mark.needs_gpu
@pytest.mark.parametrize("kind", [None, "shared", "per_sample"])
@pytest.mark.parametrize("D,compiled", [(192, False), (768, True)])
def test_norm_up_bf16_matches_plain_gather_norm_linear(kind, D, compiled):
    from mal.ops.vil_block.norm_up import NormUp
    from mal.serialization import gather_tokens
    torch.manual_seed(0)
    B, S = 4, 197
    x = torch.randn(B, S, D, device="cuda") * 3 + 1
    ln_w, ln_b = 1 + 0.2 * torch.randn(D, device="cuda"), 0.1 * torch.randn(D, device="cuda")
    up_w, up_b = torch.randn(4 * D, D, device="cuda") / D ** 0.5, 0.1 * torch.randn(4 * D, device="cuda")
    order = {None: None, "shared": torch.randperm(S, device="cuda"),
             "per_sample": torch.stack([torch.randperm(S, device="cuda") for _ in range(B)])}[kind]
    dxz, dout = torch.randn(B, S, 4 * D, device="cuda"), torch.randn(B, S, D, device="cuda")

    def run(fused: bool):
        leaves = [t.clone().requires_grad_() for t in (x, ln_w, ln_b, up_w, up_b)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if fused:
                xz, res = NormUp.apply(compiled, None, leaves[0], order, *leaves[1:3], 1e-5, *leaves[3:])
                res_term = (res * dout).sum()                               # dres arrives in the token order
            else:
                xr = leaves[0] if order is None else gather_tokens(leaves[0], order)
                xz = F.linear(F.layer_norm(xr, (D,), leaves[1], leaves[2], 1e-5), leaves[3], leaves[4])
                res_term = (xr * dout).sum()
        (xz.float() * dxz).sum().add(res_term).backward()
        return [xz.detach()] + [t.grad for t in leaves]

    fused, plain = run(True), run(False)
    for name, a, b in zip("xz x ln_w ln_b up_w up_b".split(), fused, plain):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        e = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert e < 1e-2, (name, e)
