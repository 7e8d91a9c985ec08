"""The block's pre-LayerNorm kernels (`mal.kernels.norm_triton`) and `fused._NormUp` around them.

CPU: in Triton's interpreter (float32 in, float32 out), `layer_norm` on x[:, order], `layer_norm_grad` (dx
scattered back through the order, with and without the residual's gradient, rows [xhat, 1, 0, ...] recomputed)
and `affine_grads` on one GEMM over those rows (d w, d b, d W_up, d b_up) equal float64 autograd of
`gather -> F.layer_norm -> F.linear`, for no order, a shared and a per-sample permutation, rows that fill no
tile and a padded row width. `supports` refuses CPU tensors and orders of another length.
GPU: `_NormUp` in bf16 gives the plain gather -> LayerNorm -> Linear's output and gradients.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("triton")),
                               reason="needs CUDA and triton")


def norm_reference(x, order, w, b, eps, up_w, up_b, dxz, dres):
    """float64 autograd of out = xr + 0 and xz = Linear(LayerNorm(xr)), xr = x[:, order]:
    (xn, dx, dw, db, d up_w, d up_b)."""
    from mal.serialization import gather_tokens
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b, up_w, up_b)]
    xr = leaves[0] if order is None else gather_tokens(leaves[0], order)
    xn = F.layer_norm(xr, (x.shape[-1],), leaves[1], leaves[2], eps)
    xz = F.linear(xn, leaves[3], leaves[4])
    loss = (xz * dxz.double()).sum() + (0 if dres is None else (xr * dres.double()).sum())
    return (xn.detach(), *torch.autograd.grad(loss, leaves))


def test_kernels_in_interpreter_match_float64_autograd(triton_interpreter):
    triton_interpreter("""
        import sys
        import torch
        from mal.kernels import norm_triton
        sys.path.insert(0, "tests")
        from test_norm_triton import norm_reference
        g = torch.Generator().manual_seed(0)
        for B, S, D, kind, res in [(2, 7, 24, None, True), (3, 5, 40, "shared", True), (2, 9, 16, "per_sample", True),
                                   (1, 3, 48, "shared", False), (2, 6, 24, None, False)]:
            x = torch.randn(B, S, D, generator=g) * 2 + 0.5
            w, b = 1 + 0.3 * torch.randn(D, generator=g), 0.2 * torch.randn(D, generator=g)
            up_w, up_b = torch.randn(3 * D, D, generator=g) / D ** 0.5, 0.1 * torch.randn(3 * D, generator=g)
            dxz, dres = torch.randn(B, S, 3 * D, generator=g), torch.randn(B, S, D, generator=g) if res else None
            order = {None: None, "shared": torch.randperm(S, generator=g),
                     "per_sample": torch.stack([torch.randperm(S, generator=g) for _ in range(B)])}[kind]
            y, mean, rstd = norm_triton.layer_norm(x, order, w, b, 1e-5, torch.float32)
            dxz2 = dxz.view(-1, 3 * D)                                      # (N, 3D)
            dx, rows = norm_triton.layer_norm_grad(x, order, w, (dxz2 @ up_w).view_as(x), dres, mean, rstd,
                                                   torch.float32)
            grads = norm_triton.affine_grads(dxz2.t() @ rows, w, b, up_w)
            want = norm_reference(x, order, w, b, 1e-5, up_w, up_b, dxz, dres)
            for name, got, ref in zip(("xn", "dx", "dw", "db", "d up_w", "d up_b"), (y, dx, *grads[2:], *grads[:2]),
                                      (want[0], *want[1:4], *want[4:])):
                e = ((got.double() - ref).norm() / ref.norm()).item()
                assert got.dtype == torch.float32 and got.shape == ref.shape and e < 1e-5, (B, S, D, kind, name, e)
            xhat = ((want[0] - b.double()) / w.double()).view(-1, D)        # the rows are [xhat, 1, 0, ...]
            assert rows.shape == (B * S, D + norm_triton.ONES_PAD)
            assert ((rows[:, :D].double() - xhat).norm() / xhat.norm()).item() < 1e-5
            ones = torch.zeros(B * S, norm_triton.ONES_PAD)
            ones[:, 0] = 1
            assert torch.equal(rows[:, D:], ones)
        print("ok")
    """)


def test_supports_refuses_cpu_and_orders_of_another_length():
    from mal.kernels import norm_triton
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


@needs_gpu
@pytest.mark.parametrize("kind", [None, "shared", "per_sample"])
@pytest.mark.parametrize("D,compiled", [(192, False), (768, True)])
def test_norm_up_bf16_matches_plain_gather_norm_linear(kind, D, compiled):
    from mal.fused import _NormUp
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
                xz, res = _NormUp.apply(compiled, None, leaves[0], order, *leaves[1:3], 1e-5, *leaves[3:])
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
