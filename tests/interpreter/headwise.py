"""The block-diagonal maps' weight-gradient kernel (`mal.ops.headwise.kernel`) in the interpreter."""
import torch

from mal.ops.headwise.kernel import headwise_wgrad


def wgrad_matches_float64():
    """fp16 inputs against a float64 einsum: token counts not a multiple of the tile or chunk, a strided input
    as in the fused block, block sizes 2 and 4."""
    torch.manual_seed(0)
    for N, I, bs, strided in [(1000, 128, 4, False), (2100, 192, 4, True), (64, 64, 2, False), (5, 64, 4, False)]:
        base = torch.randn(N, 2 * I if strided else I, dtype=torch.float16)
        x, g = base[:, :I], torch.randn(N, I, dtype=torch.float16)
        out = headwise_wgrad(g, x, bs)[0]
        ref = torch.einsum("nho,nhi->hoi", g.double().view(N, -1, bs), x.double().view(N, -1, bs))
        assert out.shape == (I // bs, bs, bs) and out.dtype == torch.float32
        assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-3, (N, I, bs, strided)


def several_maps_are_each_maps_gradient():
    """Three pairs in one call (the q, k, v maps of a block: a shared input, a strided one) equal three calls."""
    torch.manual_seed(0)
    N, I, bs = 1100, 128, 4
    xz = torch.randn(N, 2 * I, dtype=torch.float16)
    x_c, x_m = torch.randn(N, I, dtype=torch.float16), xz[:, :I]
    dq, dk, dv = (torch.randn(N, I, dtype=torch.float16) for _ in range(3))
    out = headwise_wgrad(dq, x_c, dk, x_c, dv, x_m, bs)
    assert out.shape == (3, I // bs, bs, bs)
    for p, (g, x) in enumerate([(dq, x_c), (dk, x_c), (dv, x_m)]):
        assert torch.equal(out[p], headwise_wgrad(g, x, bs)[0]), p
