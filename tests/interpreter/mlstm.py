"""The mLSTM cell's Triton kernels (`mal.ops.mlstm.kernel`) in the interpreter (float32)."""
import torch

from mal.ops.mlstm import kernel as mt
from mal.ops.mlstm.reference import mlstm_parallel


def gate_kernels_equal_the_torch_form():
    """The O(S) gate kernels (statistics forward, gate gradients backward) equal their torch form (the one rows
    longer than `STATS_MAX_SEQ` take), ties of the running arg-max included."""
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


def kernels_match_float64():
    """The kernels' math (fp32 path, forward and backward) against float64 torch, small shapes; head views of
    (B, S, NH*DH) tensors, as the fused block passes them, get their gradients back in that layout."""
    # head dims of 3 * 2^n run as two exact column tiles; others as one tile, padded and masked if need be
    assert [mt._d_chunks(d) for d in (96, 192, 384, 40, 64, 100)] == [
        (64, 32), (128, 64), (256, 128), (32, 16), (64, 0), (128, 0)]
    torch.manual_seed(0)
    for S, DH, gs in [(1, 16, 1.0), (23, 40, 1.0), (9, 100, 1.0), (70, 96, 10.0)]:
        xs = [torch.randn(2, 2, S, DH) for _ in range(3)] + [gs * torch.randn(2, 2, S) for _ in range(2)]
        dh = torch.randn(2, 2, S, DH)
        res = []
        for fn, dt in ((mt.mlstm_triton, torch.float32), (mlstm_parallel, torch.float32),
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
    _head_views_get_gradients_in_their_layout()


def _head_views_get_gradients_in_their_layout():
    """q, k, v as head views of (B, S, NH * DH) tensors: gradients in their strides, values within 2x
    torch-float32's error + 2e-5 of the float64 oracle."""
    B, S, NH, DH = 2, 19, 2, 32
    g = torch.Generator().manual_seed(7)
    bases = [torch.randn(B, S, NH * DH, generator=g) for _ in range(3)]
    gates = [torch.randn(B, NH, S, generator=g) for _ in range(2)]
    dh = torch.randn(B, NH, S, DH, generator=g)
    res = []
    for fn, dt in ((mt.mlstm_triton, torch.float32), (mlstm_parallel, torch.float32), (mlstm_parallel, torch.float64)):
        leaves = [x.to(dt).requires_grad_() for x in bases + gates]
        heads = [t.view(B, S, NH, DH).transpose(1, 2) for t in leaves[:3]]
        out = fn(*heads, *leaves[3:])
        res.append(list(torch.autograd.grad(out, leaves, dh.to(dt))))
        if fn is mt.mlstm_triton:
            views = [t.detach().requires_grad_() for t in heads]
            grads = torch.autograd.grad(fn(*views, *leaves[3:]), views, dh)
            assert all(g.stride() == t.stride() for g, t in zip(grads, views))
    for a, b, r in zip(*res):
        e_tri, e_tor = (((x.double() - r).norm() / r.norm()).item() for x in (a, b))
        assert e_tri <= 2.0 * e_tor + 2e-5, (e_tri, e_tor)
