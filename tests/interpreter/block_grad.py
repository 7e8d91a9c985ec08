"""The backward kernels of the block's regions (`mal.ops.block_grad.kernel`) in the interpreter (float32)."""
import torch
from test_ops_block_grad import NAMES, region_grads, region_inputs   # tests/ is on the path

from mal.ops.block_grad import kernel as block_grad_kernel
from mal.ops.registry import register
from mal.ops.vil_block.post import block_post


def kernels_match_float64_autograd():
    """Every gradient of pre-step -> cell -> post-tail (xz, the residual and the 15 parameters) through the
    kernels equals float64 autograd of the plain functions: sequences shorter than the conv and than a tile,
    head dims of one and several channel chunks, one head or two, 4 or 3 conv taps; the v that the post tail's
    kernel forms is the pre-step kernel's; with drop-path's per-sample scale of the branch (0 or 1 / keep)."""
    register("qkv", "triton", "mal.ops.qkv.kernel:qkv_gates")              # the pre-step kernel on CPU tensors
    for B, S, NH, DH, D, taps, drop in [(2, 37, 2, 32, 24, 4, False), (1, 3, 1, 16, 8, 4, False),
                                        (2, 70, 2, 48, 16, 4, False), (1, 40, 2, 16, 8, 3, False),
                                        (1, 21, 2, 96, 16, 4, False), (1, 9, 1, 80, 8, 4, False),
                                        (3, 37, 2, 32, 24, 4, True)]:
        pre, post, res, cot = region_inputs(B, S, NH, DH, D, taps=taps)
        scale = torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64).view(3, 1, 1) if drop else None
        out_r, g_r = region_grads(pre, post, res, cot, NH, fused=False, scale=scale)
        f32 = lambda ts: [t.float() for t in ts]
        out_f, g_f = region_grads(f32(pre), f32(post), res.float(), cot.float(), NH, fused=True,
                                  v_from_post=DH != 16, scale=None if scale is None else scale.float())
        assert ((out_f.double() - out_r).norm() / out_r.norm()).item() < 1e-5
        for name, a, b in zip(NAMES, g_f, g_r):
            assert a.dtype == torch.float32 and a.shape == b.shape, (name, a.dtype, a.shape)
            e = ((a.double() - b).norm() / b.norm()).item()
            assert e < 5e-5, (B, S, NH, DH, name, e)


def cast_colsum_is_a_cast_and_float64_column_sums():
    """`cast_colsum` (the down-projection's d out in the activations' dtype and its column sums): the cast is
    bitwise torch's, the sums within float32 rounding of float64; with drop-path's per-sample scale (bf16, as the
    block draws it; 0 or 1 / keep) both are those of torch's `x * scale`, groups of rows split across programs."""
    g = torch.Generator().manual_seed(0)
    for N, D, config, groups in [(37, 24, (64, 1, 3), 0), (5, 40, (128, 2, 1), 0), (100, 16, None, 0),
                                 (36, 24, (64, 1, 3), 3), (100, 16, (32, 1, 2), 5), (6, 40, None, 6)]:
        x = torch.randn(N, D, generator=g) * 3
        scale = (torch.rand(groups, 1, 1, generator=g) < 0.7).to(torch.bfloat16) / 0.7 if groups else None
        want = x if scale is None else (x.view(groups, -1, D) * scale).view(N, D)    # (N, D) float32
        y, sums = block_grad_kernel.cast_colsum(x, torch.float16, config, scale=scale)
        assert y.dtype == torch.float16 and torch.equal(y, want.half())
        ref = want.double().sum(0)
        assert sums.dtype == torch.float32 and ((sums.double() - ref).abs() <= 1e-5 * want.abs().sum(0)).all()
    try:
        block_grad_kernel.cast_colsum(torch.ones(10, 4), torch.float16, scale=torch.ones(3, 1, 1))
    except ValueError as e:
        assert "10 rows do not split into 3" in str(e)
    else:
        raise AssertionError("a scale whose groups do not divide the rows must be refused")


def post_fwd_is_post_grads_u():
    """`post_fwd` (the post tail's forward up to the down-projection) writes the u that `post_grad` writes for
    the down-projection's weight gradient, to float32 rounding, and equals float64 `block_post`'s input of the
    down-projection: tiles that cut the sequence and the head, 4 or 3 conv taps, a head view of h."""
    g = torch.Generator().manual_seed(1)
    for B, S, NH, DH, taps, config in [(2, 37, 2, 32, 4, None), (1, 3, 1, 16, 4, (16, 16, 1)),
                                       (2, 21, 2, 96, 3, (8, 32, 2)), (1, 9, 1, 80, 4, None)]:
        inner = NH * DH
        r = lambda *shape, s=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * s
        h = r(B, S, NH, DH).transpose(1, 2)                                 # (B, NH, S, DH) a head view
        xz, cw, cb, nw, nb, skip = r(B, S, 2 * inner), r(inner, 1, taps, s=0.5), r(inner, s=0.1), \
            1 + r(inner, s=0.2), r(inner, s=0.1), 1 + r(inner, s=0.2)
        eye, zero = torch.eye(inner, dtype=torch.float64), torch.zeros(inner, dtype=torch.float64)
        want = block_post(h, xz, None, cw, cb, nw, nb, skip, eye, zero)    # (B, S, I): identity down-projection
        args = [t.float() for t in (h, xz, cw, cb, nw, nb, skip)]
        u = block_grad_kernel.post_fwd(*args, 1e-5, config)
        u_grad = block_grad_kernel.post_grad(torch.zeros(B, S, inner), *args, 1e-5)[2]
        assert u.dtype == torch.float32 and u.shape == (B, S, inner)
        torch.testing.assert_close(u, u_grad, rtol=1e-6, atol=1e-6)
        e = ((u.double() - want).norm() / want.norm()).item()
        assert e < 1e-6, (B, S, NH, DH, taps, e)
