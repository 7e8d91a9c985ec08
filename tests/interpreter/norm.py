"""The pre-LayerNorm kernels (`mal.ops.norm.kernel`) in the interpreter (float32 in, float32 out)."""
import torch
import torch.nn.functional as F

from mal.ops.norm import kernel as norm_kernel
from mal.serialization import gather_tokens


def norm_reference(x, order, w, b, eps, up_w, up_b, dxz, dres):
    """float64 autograd of out = xr + 0 and xz = Linear(LayerNorm(xr)), xr = x[:, order]:
    (xn, dx, dw, db, d up_w, d up_b)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b, up_w, up_b)]
    xr = leaves[0] if order is None else gather_tokens(leaves[0], order)
    xn = F.layer_norm(xr, (x.shape[-1],), leaves[1], leaves[2], eps)
    xz = F.linear(xn, leaves[3], leaves[4])
    loss = (xz * dxz.double()).sum() + (0 if dres is None else (xr * dres.double()).sum())
    return (xn.detach(), *torch.autograd.grad(loss, leaves))


def kernels_match_float64_autograd():
    """`layer_norm` on x[:, order], `layer_norm_grad` (dx scattered back through the order, with and without the
    residual's gradient, rows [xhat, 1, 0, ...] recomputed) and `affine_grads` on one GEMM over those rows equal
    float64 autograd of gather -> LayerNorm -> Linear: no order, a shared and a per-sample permutation, rows that
    fill no tile and a padded row width."""
    g = torch.Generator().manual_seed(0)
    for B, S, D, kind, res in [(2, 7, 24, None, True), (3, 5, 40, "shared", True), (2, 9, 16, "per_sample", True),
                               (1, 3, 48, "shared", False), (2, 6, 24, None, False)]:
        x = torch.randn(B, S, D, generator=g) * 2 + 0.5
        w, b = 1 + 0.3 * torch.randn(D, generator=g), 0.2 * torch.randn(D, generator=g)
        up_w, up_b = torch.randn(3 * D, D, generator=g) / D ** 0.5, 0.1 * torch.randn(3 * D, generator=g)
        dxz, dres = torch.randn(B, S, 3 * D, generator=g), torch.randn(B, S, D, generator=g) if res else None
        order = {None: None, "shared": torch.randperm(S, generator=g),
                 "per_sample": torch.stack([torch.randperm(S, generator=g) for _ in range(B)])}[kind]
        y, mean, rstd = norm_kernel.layer_norm(x, order, w, b, 1e-5, torch.float32)
        dxz2 = dxz.view(-1, 3 * D)                                      # (N, 3D)
        dx, rows = norm_kernel.layer_norm_grad(x, order, w, (dxz2 @ up_w).view_as(x), dres, mean, rstd,
                                               torch.float32)
        grads = norm_kernel.affine_grads(dxz2.t() @ rows, w, b, up_w)
        want = norm_reference(x, order, w, b, 1e-5, up_w, up_b, dxz, dres)
        for name, got, ref in zip(("xn", "dx", "dw", "db", "d up_w", "d up_b"), (y, dx, *grads[2:], *grads[:2]),
                                  (want[0], *want[1:4], *want[4:])):
            e = ((got.double() - ref).norm() / ref.norm()).item()
            assert got.dtype == torch.float32 and got.shape == ref.shape and e < 1e-5, (B, S, D, kind, name, e)
        xhat = ((want[0] - b.double()) / w.double()).view(-1, D)        # the rows are [xhat, 1, 0, ...]
        assert rows.shape == (B * S, D + norm_kernel.ONES_PAD)
        assert ((rows[:, :D].double() - xhat).norm() / xhat.norm()).item() < 1e-5
        ones = torch.zeros(B * S, norm_kernel.ONES_PAD)
        ones[:, 0] = 1
        assert torch.equal(rows[:, D:], ones)
