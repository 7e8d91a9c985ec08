"""The backward of the block's pointwise regions in Triton (`mal.ops.block_grad.kernel`), through the pair
`vil_block.pre.block_pre_fused(..., xz_view=True)` -> mLSTM cell -> `vil_block.post.PostFused`.

CPU: in Triton's interpreter (`tests/interpreter/block_grad.py`; float32), every gradient of pre-step -> cell ->
post-tail (xz, the residual and the 15 parameters) equals float64 autograd of `block_pre` -> `mlstm_parallel` ->
`block_post`, for sequences shorter than the conv and than a tile, head dims of one and several channel chunks,
one head or two, and 4 or 3 conv taps; the v that the post-tail's kernel forms for the cell's backward
(`vil_block.saved.VFromPost`) is the pre-step kernel's (to float32 rounding); `cast_colsum` (the down-projection's
d out in the activations' dtype and its column sums) equals a cast and float64 sums; `supports` refuses CPU
tensors, so the CPU fast path keeps its compiled/eager backward.
GPU: in bf16 at ViL-T/B shapes (around a pointwise stand-in for the cell) the gradients are as close to float64
as the plain autocast path's, and the fused block runs the kernels in training only.
"""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from mal.ops.mlstm.reference import mlstm_parallel
from mal.ops.qkv import block_pre
from mal.ops.vil_block.post import PostFused, block_post
from mal.ops.vil_block.pre import block_pre_fused
from mal.ops.vil_block.saved import VFromPost
NAMES = "xz conv_w conv_b wq bq wk bk wv bv wg bg norm_w norm_b skip down_w down_b residual".split()


def region_inputs(B, S, NH, DH, D, seed=0, device="cpu", taps=4):
    """float64 inputs of the pre-step and post-tail (a causal conv of `taps` taps): (pre args, post params,
    residual, output cotangent)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(device)
    inner = NH * DH
    pre = [r(B, S, 2 * inner), r(inner, 1, taps, s=0.5), r(inner, s=0.1)]
    for _ in range(3):
        pre += [r(inner // 4, 4, 4, s=0.5), r(inner, s=0.1)]
    pre += [r(2 * NH, 3 * inner, s=0.1), r(2 * NH)]
    post = [1 + r(inner, s=0.2), r(inner, s=0.1), 1 + r(inner, s=0.2), r(D, inner, s=0.1), r(D, s=0.1)]
    return pre, post, r(B, S, D), r(B, S, D)


def pointwise_cell(q, k, v, i, f):
    """A well-conditioned stand-in for the mLSTM cell (same signature): bf16 tests of the regions around it
    then measure the regions' rounding, not the cell's amplification of it."""
    return q * torch.sigmoid(i)[..., None] + k * torch.tanh(v) * torch.sigmoid(f)[..., None]


def region_grads(pre, post, residual, cot, num_heads, fused: bool, autocast: bool = False, cell=mlstm_parallel,
                 v_from_post: bool = False, scale=None):
    """Output and gradients of all inputs (in `NAMES` order) of pre-step -> cell -> post-tail, either through
    the fused pair (kernels' backward) or the plain functions' autograd. v_from_post: the cell's saved v is
    not kept but formed by the post-tail's backward kernel (`VFromPost`); checks it is the forward's v. scale:
    drop-path's per-sample scale of the branch (B, 1, 1)."""
    leaves = [t.clone().requires_grad_() for t in pre + post + [residual]]
    p, po, res = leaves[:len(pre)], leaves[len(pre):-1], leaves[-1]
    B, S, two_i = p[0].shape
    DH = two_i // 2 // num_heads
    heads = lambda t: t.view(B, S, num_heads, DH).transpose(1, 2)            # (B, NH, S, DH)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        if fused:
            q, k, v, g, xz = block_pre_fused(*p, compiled=False, xz_view=True)
        else:
            (q, k, v, g), xz = block_pre(*p), p[0]
        v_out = VFromPost(v, xz, p[7], p[8]) if v_from_post else None
        v_want = v.detach().clone() if v_from_post else None
        with torch.autograd.graph.saved_tensors_hooks(v_out.pack, v_out.unpack) if v_from_post else nullcontext():
            h = cell(heads(q), heads(k), heads(v), g[..., :num_heads].transpose(1, 2),
                     g[..., num_heads:].transpose(1, 2))                   # (B, NH, S, DH)
        del v
        args = (h, xz, res, p[1], p[2], *po)
        out = PostFused.apply(False, None, *args, None, v_out, scale) if fused else block_post(*args, scale=scale)
    grads = torch.autograd.grad(out, leaves, cot.to(out.dtype))
    if v_from_post:
        assert v_out.outs is not None                                       # provided by post_grad
        torch.testing.assert_close(v_out.outs[0], v_want, rtol=1e-6, atol=1e-6)
    return out, grads


def test_kernels_in_interpreter_match_float64_autograd(triton_interpreter):
    triton_interpreter("block_grad", "kernels_match_float64_autograd")


def test_post_fwd_in_interpreter_is_post_grads_u_and_float64(triton_interpreter):
    triton_interpreter("block_grad", "post_fwd_is_post_grads_u")


def test_cast_colsum_in_interpreter_is_a_cast_and_float64_column_sums(triton_interpreter):
    triton_interpreter("block_grad", "cast_colsum_is_a_cast_and_float64_column_sums")


def test_supports_refuses_cpu_and_odd_head_dims():
    from mal.ops.block_grad import kernel as block_grad_triton
    conv_w, wq = torch.zeros(64, 1, 4), torch.zeros(16, 4, 4)
    assert not block_grad_triton.supports(torch.zeros(2, 5, 128, dtype=torch.bfloat16), 2, conv_w, wq, 4)
    if torch.cuda.is_available():
        xz = torch.zeros(2, 5, 128, dtype=torch.bfloat16, device="cuda")
        assert block_grad_triton.supports(xz, 2, conv_w, wq, 4)
        assert not block_grad_triton.supports(xz, 8, conv_w, wq, 16)         # DH = 8
        assert not block_grad_triton.supports(xz.float(), 2, conv_w, wq, 4)


@pytest.mark.needs_gpu
@pytest.mark.parametrize("B,S,NH,DH,D,drop", [(8, 197, 4, 96, 192, False), (2, 197, 4, 384, 768, False),
                                               (3, 5, 2, 16, 32, False), (8, 144, 4, 96, 192, True)])
def test_bf16_gradients_as_close_to_float64_as_plain_autocast(B, S, NH, DH, D, drop):
    """The output (the forward's `post_fwd` kernel) and every gradient. drop: with drop-path's per-sample scale (bf16,
    0 or 1 / 0.9), which the kernel applies to the float32 d out while casting it."""
    pre, post, res, cot = region_inputs(B, S, NH, DH, D, device="cuda")
    xz = pre[0].to(torch.bfloat16)
    low = [xz] + [t.float() for t in pre[1:]]
    f32 = [t.float() for t in post]
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], device="cuda")[:B].view(B, 1, 1)
    scale = (keep.to(torch.bfloat16) / 0.9) if drop else None
    kw = dict(cell=pointwise_cell, scale=scale)
    out_f, g_f = region_grads(low, f32, res.float(), cot.float(), NH, fused=True, autocast=True, **kw)
    out_p, g_p = region_grads(low, f32, res.float(), cot.float(), NH, fused=False, autocast=True, **kw)
    kw["scale"] = None if scale is None else scale.double()
    out_r, g_r = region_grads([xz.double()] + pre[1:], post, res, cot, NH, fused=False, **kw)  # on the rounded xz
    e_out, e_out_plain = (((o.double() - out_r).norm() / out_r.norm()).item() for o in (out_f, out_p))
    assert out_f.dtype == out_p.dtype and e_out <= 1.5 * e_out_plain + 1e-3, (e_out, e_out_plain)
    for name, a, p, want in zip(NAMES, g_f, g_p, g_r):
        e = ((a.double() - want).norm() / want.norm()).item()
        e_plain = ((p.double() - want).norm() / want.norm()).item()
        assert a.dtype == p.dtype and e <= 1.5 * e_plain + 2e-3, (name, e, e_plain)


@pytest.mark.needs_gpu
def test_fused_block_runs_the_kernels_in_training_only(monkeypatch):
    from mal.models.vil import ViLBlock
    from mal.ops.block_grad import kernel as block_grad_triton
    calls = []
    for name in ("post_grad", "pre_grad"):
        real = getattr(block_grad_triton, name)
        monkeypatch.setattr(block_grad_triton, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    blk = ViLBlock(64, num_heads=4).cuda().fast_path(compile=False)
    x = torch.randn(2, 16, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            blk(x)
        blk(x).sum().backward()
    assert calls == ["post_grad", "pre_grad"]
    assert x.grad is not None and all(p.grad is not None for p in blk.parameters())
