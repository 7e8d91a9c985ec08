"""The fused fast path of a ViL block (`mal.ops.vil_block`) computes the plain block's function, with the same
parameters.

CPU (always): float64, the eager fused block (einsum and pointwise headwise forms) equals the plain block
for outputs and every parameter gradient to ~1e-12 (the fusion is pure algebra).
GPU (needs CUDA + triton): the compiled fast path (Triton mLSTM) in bf16 autocast against the plain path in
float32: relative error ||x - ref|| / ||ref|| of the output and of every parameter gradient at most
BF16_REL_SLACK x the plain path's own bf16 error + BF16_REL_FLOOR.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from mal import EncoderConfig, MALPretrain, ObjectiveConfig, VisionLSTM
from mal.models.vil import ViLBlock
from mal.ops.headwise import headwise
from mal.ops.qkv import block_pre, gate_weights
from mal.ops.vil_block import block as fast_block
from mal.ops.vil_block import regions
from mal.ops.vil_block.saved import RecomputeQKV
from mal.serialization import gather_tokens, inverse

F64_TOL = 1e-10
BF16_REL_SLACK, BF16_REL_FLOOR = 2.0, 1e-2


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for every parameter (zero-init gates would hide gate-path bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            r = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)
            p.copy_(r * 0.3 + (p.data if p.dim() == 1 else 0) * 0.5)


def _out_and_grads(module, x, *args, cot=None):
    """module(x, *args) and the gradients of every parameter and of x ("input") for the output gradient `cot`
    (default: a fixed random one)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = module(x, *args)
    if cot is None:
        g = torch.Generator(device=out.device).manual_seed(7)
        cot = torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype)
    out.backward(cot)
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters()}
    grads["input"] = x.grad.detach().clone()
    return out.detach(), grads


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def _eager_fullgraph_compile():
    """The fast path's torch.compile as dynamo with the eager backend and fullgraph (a graph break fails), from
    empty caches."""
    torch._dynamo.reset()
    regions._COMPILED.clear()
    real = torch.compile
    torch.compile = lambda fn, **kw: real(fn, backend="eager", fullgraph=True)
    try:
        yield
    finally:
        torch.compile = real
        regions._COMPILED.clear()


@pytest.mark.parametrize("dim,heads,seq,drop", [(16, 4, 9, 0.0), (24, 2, 17, 0.0), (24, 2, 17, 0.5)])
def test_fused_block_equals_plain_block_float64(dim, heads, seq, drop):
    """Drop-path included: the fast path draws the same per-sample mask and fuses it into the residual."""
    torch.manual_seed(0)
    blk = ViLBlock(dim, drop_path=drop, num_heads=heads, backend="torch").double()
    _randomize(blk, 1)
    x = torch.randn(6, seq, dim, dtype=torch.float64)
    torch.manual_seed(3)
    out_ref, g_ref = _out_and_grads(blk, x)
    if drop:                                                                 # some samples dropped, some kept
        dropped = [torch.equal(out_ref[b], x[b]) for b in range(6)]
        assert any(dropped) and not all(dropped)
    blk.fast_path(compile=False)
    torch.manual_seed(3)
    out, g = _out_and_grads(blk, x)
    assert _rel(out, out_ref) < F64_TOL
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert _rel(g[name], g_ref[name]) < F64_TOL, name


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
def test_reorder_fused_into_the_block_equals_gather_then_block(compile, per_sample):
    """blk(x, order) == blk(x[:, order]): without grad the gather runs inside the compiled regions (up-projection
    and residual add), in training the block gathers first and the input gradient flows back through it."""
    torch.manual_seed(0)
    blk = ViLBlock(16, num_heads=4, backend="torch").double().eval()
    _randomize(blk, 6)
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    order = torch.stack([torch.randperm(9) for _ in range(3)]) if per_sample else torch.randperm(9)
    ref = blk(gather_tokens(x, order))                                       # plain path
    with _eager_fullgraph_compile():
        blk.fast_path(compile=compile)
        with torch.no_grad():
            out = blk(x, order)
        leaf = x.clone().requires_grad_()
        out_g = blk(leaf, order)
        out_g.sum().backward()
    assert _rel(out, ref) < F64_TOL and _rel(out_g.detach(), ref) < F64_TOL
    leaf_ref = x.clone().requires_grad_()
    blk.fast_path(enabled=False)(gather_tokens(leaf_ref, order), None).sum().backward()
    assert _rel(leaf.grad, leaf_ref.grad) < F64_TOL


@pytest.mark.parametrize("dim,heads,seq,drop", [(16, 4, 9, 0.0), (24, 2, 17, 0.3)])
def test_checkpointed_fused_block_equals_plain_block_float64(dim, heads, seq, drop):
    """fast_path(checkpoint=True): same output and every gradient as the plain block (drop-path included)."""
    torch.manual_seed(0)
    blk = ViLBlock(dim, drop_path=drop, num_heads=heads, backend="torch").double().train()
    _randomize(blk, 1)
    x = torch.randn(3, seq, dim, dtype=torch.float64)
    torch.manual_seed(11)
    out_ref, g_ref = _out_and_grads(blk, x)
    blk.fast_path(compile=False, checkpoint=True)
    assert blk.fast.checkpoint
    torch.manual_seed(11)                                                    # the same drop-path mask
    out, g = _out_and_grads(blk, x)
    assert _rel(out, out_ref) < F64_TOL
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert _rel(g[name], g_ref[name]) < F64_TOL, name


def test_checkpointed_fast_path_saves_only_the_block_input():
    """With checkpoint=True the autograd graph of a block keeps (about) its input alone: far fewer saved bytes."""
    torch.manual_seed(0)
    blk = ViLBlock(32, num_heads=4, backend="torch").double()
    x = torch.randn(2, 16, 32, dtype=torch.float64, requires_grad=True)

    def saved_bytes(checkpoint: bool) -> int:
        blk.fast_path(compile=False, checkpoint=checkpoint)
        seen: dict = {}

        def pack(t):
            seen[(t.data_ptr(), t.shape, t.stride())] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            blk(x)
        params = {p.data_ptr() for p in blk.parameters()}
        return sum(b for (ptr, *_), b in seen.items() if ptr not in params)
    full, ckpt = saved_bytes(False), saved_bytes(True)
    assert ckpt <= x.numel() * x.element_size(), (ckpt, full)
    assert ckpt * 10 < full, (ckpt, full)


def test_model_fast_path_checkpoint_option():
    cfg = EncoderConfig(img_size=32, patch_size=8, dim=16, depth=4, cluster_size=2, mlstm_backend="torch")
    torch.manual_seed(0)
    model = VisionLSTM(cfg, num_classes=5).double()
    _randomize(model, 3)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref = model(x)
    ref.square().sum().backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.fast_path(compile=False, checkpoint=True)
    assert all(b.fast.checkpoint for b in model.blocks)
    out = model(x)
    out.square().sum().backward()
    assert _rel(out, ref) < F64_TOL
    for n, p in model.named_parameters():
        assert _rel(p.grad, g_ref[n]) < F64_TOL, n
    with torch.no_grad():                                                    # no grad: no checkpointing at all
        assert _rel(model(x), ref) < F64_TOL


def test_pointwise_headwise_and_gate_precomposition_are_exact():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    w, b = torch.randn(8, 4, 4, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    assert _rel(headwise(x, w, b, pointwise=True), headwise(x, w, b, pointwise=False)) < F64_TOL
    dense = torch.block_diag(*w.unbind(0))
    assert _rel(headwise(x, w, None, pointwise=True), x @ dense.t()) < F64_TOL
    # gates of [q, k, v] == precomposed gates of (x_c, x_m)
    ws = [torch.randn(8, 4, 4, dtype=torch.float64) for _ in range(3)]
    bs = [torch.randn(32, dtype=torch.float64) for _ in range(3)]
    wg, bg = torch.randn(6, 96, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    x_c, x_m = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    qkv = torch.cat([headwise(x_c, ws[0], bs[0], False), headwise(x_c, ws[1], bs[1], False),
                     headwise(x_m, ws[2], bs[2], False)], -1)
    w_c, w_m, b = gate_weights(wg, bg, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2])
    assert _rel(x_c @ w_c.t() + x_m @ w_m.t() + b, qkv @ wg.t() + bg) < F64_TOL


def test_pointwise_headwise_gradients_equal_einsum_gradients():
    """The GEMM-based weight gradient (diagonal blocks of g^T x) and the pointwise input gradient are exact,
    also for a non-contiguous input (the block feeds a slice of the up-projection)."""
    torch.manual_seed(0)
    xz = torch.randn(3, 7, 64, dtype=torch.float64)
    w, b = torch.randn(8, 4, 4, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    g = torch.randn(3, 7, 32, dtype=torch.float64)
    grads = []
    for pointwise in (True, False):
        x_, w_, b_ = (t.detach().clone().requires_grad_() for t in (xz, w, b))
        headwise(x_[..., :32], w_, b_, pointwise).backward(g)
        grads.append((x_.grad, w_.grad, b_.grad))
    for a, ref in zip(*grads):
        assert _rel(a, ref) < F64_TOL
    x_, w_ = xz[..., :32].detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: headwise(x, w, None, True), (x_[:1, :3], w_))


def test_pre_region_pointwise_form_matches_eager_form():
    torch.manual_seed(0)
    blk = ViLBlock(16, num_heads=4).double()
    _randomize(blk, 2)
    L, c = blk.layer, blk.layer.conv.conv
    args = (torch.randn(2, 7, 64, dtype=torch.float64), c.weight, c.bias, L.q_proj.weight, L.q_proj.bias,
            L.k_proj.weight, L.k_proj.bias, L.v_proj.weight, L.v_proj.bias,
            torch.cat([L.igate.weight, L.fgate.weight]), torch.cat([L.igate.bias, L.fgate.bias]))
    for a, b in zip(block_pre(*args, pointwise=True), block_pre(*args, pointwise=False)):
        assert _rel(a, b) < F64_TOL


def test_compiled_regions_trace_without_graph_breaks():
    """Each compiled region is one graph (dynamo, fullgraph) on the CPU."""
    torch.manual_seed(0)
    blk = ViLBlock(16, num_heads=4, backend="torch").double()
    _randomize(blk, 5)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    ref = blk(x)
    with _eager_fullgraph_compile():
        blk.fast_path(compile=True)
        out = blk(x)
    assert _rel(out, ref) < F64_TOL


class _CellStub(torch.autograd.Function):
    """Stands in for the Triton cell: saves q, k, v and h, as the kernel's autograd function does."""

    @staticmethod
    def forward(ctx, q, k, v, i, f):
        h = q * k + v * torch.sigmoid(i + f).unsqueeze(-1)                   # (B, NH, S, DH)
        ctx.save_for_backward(q, k, v, h)
        return h

    @staticmethod
    def backward(ctx, g):
        q, k, v, h = ctx.saved_tensors
        return g * k, g * q, g, g.sum(-1), g.sum(-1)


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_regions_save_only_their_inputs_and_recompute_no_gemm(monkeypatch, autocast):
    """Under the fast path's partition (MEMORY_BUDGET) a block keeps for its backward the block input, its
    LayerNorm output, xz and the cell's q, k, v, h: less than the default partition, with the same backward
    matrix-multiply FLOPs on tokens (only pointwise work and the weight-sized gate precomposition are
    recomputed), and the same output and gradients. (recompute_qkv is off here: its saving is tested below, and
    its recompute of the pre-region would run a compiled graph under the FLOP counter's dispatch mode.)"""
    from torch.utils.flop_counter import FlopCounterMode
    monkeypatch.setattr(fast_block, "mlstm", lambda q, k, v, i, f, backend=None: _CellStub.apply(q, k, v, i, f))
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="aot_eager_decomp_partition",
                                                                fullgraph=True))
    torch.manual_seed(0)
    B, S, D = 3, 12, 32
    blk = ViLBlock(D, num_heads=4).train()
    _randomize(blk, 7)
    x = torch.randn(B, S, D, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in blk.parameters()}

    def run(budget: dict):
        monkeypatch.setattr(regions, "MEMORY_BUDGET", budget)
        regions._COMPILED.clear()
        torch._dynamo.reset()
        blk.fast_path(compile=True, recompute_qkv=False)
        saved: dict = {}

        def pack(t):                                 # activations: (B, ...) or (B*S, ...); not weight-sized
            if t.shape and t.shape[0] in (B, B * S):
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y = blk(x)
        with FlopCounterMode(display=False) as flops:
            grads = torch.autograd.grad(y.float().square().sum(), [x, *blk.parameters()])
        return sum(n for p, n in saved.items() if p not in params), flops.get_total_flops(), y, grads
    try:
        lean, lean_flops, y, g = run(dict(regions.MEMORY_BUDGET))
        full, full_flops, y_ref, g_ref = run({k: 1.0 for k in regions.MEMORY_BUDGET})
    finally:
        regions._COMPILED.clear()
        blk.fast_path(enabled=False)
    act = 2 if autocast else 4                                               # bytes per activation element
    limit = B * S * D * (4 + act + 4 * act + 4 * 2 * act) + 4 * B * S * 64   # x, xn, xz, q/k/v/h, LN stats
    assert lean <= limit < full, (lean, limit, full)
    NH, I, bs = 4, 2 * D, 4
    assert 0 <= lean_flops - full_flops <= 3 * 2 * (2 * NH) * I * bs   # only the gate precomposition (weights)
    tol = 2e-2 if autocast else 1e-5
    assert _rel(y, y_ref) < tol
    for a, b in zip(g, g_ref):
        assert _rel(a, b) < tol


def _pre_and_cell_spies(monkeypatch):
    """Record weak references to every q, k, v the cell receives and count the pre-region's calls."""
    import weakref
    seen, calls = [], {"pre": 0}
    real_pre = fast_block.block_pre

    def cell(q, k, v, i, f, backend=None):
        seen.extend(weakref.ref(t._base if t._base is not None else t) for t in (q, k, v))
        return _CellStub.apply(q, k, v, i, f)

    def pre(*args, **kwargs):
        calls["pre"] += 1
        return real_pre(*args, **kwargs)
    pre.__name__ = "block_pre"
    monkeypatch.setattr(fast_block, "mlstm", cell)
    monkeypatch.setattr(fast_block, "block_pre", pre)
    return seen, calls


@pytest.mark.parametrize("compile,autocast", [(False, False), (True, False), (True, True)])
def test_recompute_qkv_frees_q_k_v_and_gives_the_same_gradients(monkeypatch, compile, autocast):
    """recompute_qkv: after the forward no q, k or v of the cell is alive (kept: all are), the backward
    re-runs the pre-region once per block, and output and every gradient are bitwise those of keeping them."""
    seen, calls = _pre_and_cell_spies(monkeypatch)
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="aot_eager_decomp_partition",
                                                                fullgraph=True))
    torch.manual_seed(0)
    blk = ViLBlock(32, num_heads=4).train()
    _randomize(blk, 8)
    x = torch.randn(3, 12, 32)
    results = {}
    try:
        for recompute in (False, True):
            regions._COMPILED.clear()
            torch._dynamo.reset()
            blk.fast_path(compile=compile, recompute_qkv=recompute)
            seen.clear()
            calls["pre"] = 0
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                blk.zero_grad(set_to_none=True)
                x_ = x.clone().requires_grad_(True)
                y = blk(x_)
            alive = sum(r() is not None for r in seen)
            assert alive == (0 if recompute else 3), (recompute, alive)
            assert calls["pre"] == 1
            y.float().square().sum().backward()
            assert calls["pre"] == (2 if recompute else 1)
            results[recompute] = [y.detach(), x_.grad] + [p.grad for p in blk.parameters()]
    finally:
        regions._COMPILED.clear()
        blk.fast_path(enabled=False)
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)


def test_recompute_qkv_is_off_without_grad_and_under_checkpoint(monkeypatch):
    seen, calls = _pre_and_cell_spies(monkeypatch)
    torch.manual_seed(0)
    blk = ViLBlock(16, num_heads=4).train()
    x = torch.randn(2, 9, 16, requires_grad=True)
    blk.fast_path(compile=False, checkpoint=True)                          # checkpoint recomputes the block
    blk(x).sum().backward()
    assert calls["pre"] == 2                                                 # forward + checkpoint's recompute
    blk.fast_path(compile=False)
    with torch.no_grad():
        blk(x)
    assert calls["pre"] == 3


def test_recompute_qkv_raises_a_clear_error_when_the_recompute_differs():
    """A recompute whose outputs have another memory layout than the forward's cannot rebuild the saved views."""
    x = torch.randn(2, 3, 8)
    q = x * 2                                                                # (2, 3, 8) contiguous
    other_layout = lambda t: ((t * 2).transpose(0, 1).contiguous().transpose(0, 1),)  # same values, strides differ
    hooks = RecomputeQKV(other_layout, (x,), {}, (q,))
    assert hooks.pack(x) is x                                                # not q's storage: kept as is
    token = hooks.pack(q[:, 1])
    assert not isinstance(token, torch.Tensor)
    with pytest.raises(RuntimeError, match="recompute_qkv=False"):
        hooks.unpack(token)
    same = RecomputeQKV(lambda t: (t * 2,), (x,), {}, (q,))
    assert torch.equal(same.unpack(same.pack(q[:, 1])), q[:, 1])


def test_fast_path_keeps_state_dict_and_model_output():
    cfg = EncoderConfig(img_size=32, patch_size=8, dim=16, depth=4, cluster_size=2, mlstm_backend="torch")
    torch.manual_seed(0)
    model = VisionLSTM(cfg, num_classes=5).double().eval()
    _randomize(model, 3)
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref = model(x)
    model.fast_path(compile=False)
    assert list(model.state_dict()) == keys
    assert _rel(model(x), ref) < F64_TOL
    plain = VisionLSTM(cfg, num_classes=5).double().eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    assert _rel(plain(x), ref) < F64_TOL
    model.fast_path(enabled=False)
    assert all(b.fast is None for b in model.blocks)


def test_fast_path_in_pretraining_model():
    cfg = EncoderConfig(img_size=16, patch_size=4, dim=16, depth=4, cluster_size=2, mlstm_backend="torch")
    torch.manual_seed(0)
    model = MALPretrain(cfg, ObjectiveConfig()).double()
    imgs = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    draws = model.sample_inputs(2, torch.Generator().manual_seed(0))
    ref = model(imgs, *draws)["loss"]
    model.fast_path(compile=False)
    assert abs(model(imgs, *draws)["loss"].item() - ref.item()) < 1e-10 * abs(ref.item())


@pytest.mark.needs_gpu
@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("dim,seq", [(64, 197), (192, 128)])
def test_compiled_fast_path_bf16_matches_plain_path_on_gpu(dim, seq, checkpoint):
    torch.manual_seed(0)
    blk = ViLBlock(dim, num_heads=4, backend="torch").cuda()
    _randomize(blk, 4)
    x = torch.randn(8, seq, dim, device="cuda")
    out_ref, g_ref = _out_and_grads(blk, x)                                  # plain, float32 reference
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_plain, g_plain = _out_and_grads(blk, x)                          # plain, bf16
    fast = ViLBlock(dim, num_heads=4, backend="auto").cuda()
    fast.load_state_dict(blk.state_dict(), strict=True)
    fast.fast_path(compile=True, checkpoint=checkpoint)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, g = _out_and_grads(fast, x)                                     # fused + Triton + compiled, bf16
    assert torch.isfinite(out).all()
    e_plain, e_fast = _rel(out_plain, out_ref), _rel(out, out_ref)
    assert e_fast <= BF16_REL_SLACK * e_plain + BF16_REL_FLOOR, (e_fast, e_plain)
    for name in g_ref:
        e_plain, e_fast = _rel(g_plain[name], g_ref[name]), _rel(g[name], g_ref[name])
        assert e_fast <= BF16_REL_SLACK * e_plain + BF16_REL_FLOOR, (name, e_fast, e_plain)


@pytest.mark.needs_gpu
@pytest.mark.parametrize("checkpoint", [False, True])
def test_drop_path_fused_into_the_kernels_is_the_branch_scaled_per_sample(checkpoint):
    """bf16 training on the GPU with drop-path and an order: the fused residual draws the plain path's mask (a
    dropped sample's output is its input, bitwise, in both), and its output and gradients are those of the same
    fused block without drop-path, its branch and output gradient scaled per sample (0 or 1 / keep = 2, exact in
    floating point: the kernels see the same numbers). The bf16 test above compares the fused block with the plain
    one; with the real cell a comparison in bf16 measures the cell's amplification of rounding, not the mask."""
    torch.manual_seed(0)
    blk = ViLBlock(192, drop_path=0.5, num_heads=4, backend="auto").cuda().train()
    _randomize(blk, 5)
    x = torch.randn(8, 128, 192, device="cuda")
    order = torch.randperm(128, device="cuda")
    cot = torch.randn(8, 128, 192, device="cuda")
    xo = gather_tokens(x, order)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.manual_seed(1)
        dropped = [torch.equal(o, xb) for o, xb in zip(blk(x, order).detach(), xo)]   # the plain path's mask
        blk.fast_path(compile=True, checkpoint=checkpoint)
        torch.manual_seed(1)
        out, g = _out_and_grads(blk, x, order, cot=cot)
        scale = torch.tensor([0.0 if d else 2.0 for d in dropped], device="cuda").view(8, 1, 1)
        blk.drop_path.drop_prob = 0.0
        out0, g0 = _out_and_grads(blk, x, order, cot=cot * scale)          # no drop-path, scaled
    assert any(dropped) and not all(dropped)
    assert [torch.equal(out[b], xo[b]) for b in range(8)] == dropped
    assert _rel(out, xo + scale * (out0 - xo)) < 1e-6
    g0["input"] += gather_tokens(cot - cot * scale, inverse(order))         # the residual's own gradient
    assert g.keys() == g0.keys()
    for name in g0:
        assert _rel(g[name], g0[name]) < 1e-5, (name, _rel(g[name], g0[name]))


@pytest.mark.needs_gpu
@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("kind", ["shared", "per_sample"])
def test_training_reorder_inside_the_kernels_equals_gather_first_bitwise(kind, checkpoint):
    """blk(x, order) in bf16 training on the GPU reads x through the order in the LayerNorm kernel and scatters
    the gradient back (`NormUp`): output, parameter gradients and x's gradient are bitwise those of
    blk(x[:, order]) with the gather's own autograd."""
    torch.manual_seed(0)
    blk = ViLBlock(192, num_heads=4, backend="auto").cuda().train()
    _randomize(blk, 5)
    blk.fast_path(compile=True, checkpoint=checkpoint)
    x = torch.randn(8, 128, 192, device="cuda")
    order = (torch.randperm(128, device="cuda") if kind == "shared"
             else torch.stack([torch.randperm(128, device="cuda") for _ in range(8)]))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_a, g_a = _out_and_grads(blk, x, order)
        out_b, g_b = _out_and_grads(blk, gather_tokens(x, order))           # gather first
    g_b["input"] = gather_tokens(g_b["input"], inverse(order))               # back to x's token order
    assert torch.equal(out_a, out_b)
    for name in g_b:
        assert torch.equal(g_a[name], g_b[name]), name


@pytest.mark.needs_gpu
def test_v_formed_by_the_post_kernel_is_the_pre_kernels_v_up_to_float32_rounding():
    """`block_grad.kernel.post_grad` forms the cell's v (`VFromPost`) with the pre-step kernel's
    arithmetic; the two kernels may sum the four products of a 4x4 block in another order, so after rounding
    to bf16 a few elements (of ViL-B's step: 3e-5 of 8e7 in the measurement, docs/fast_path.md) differ in the last
    bits, by float32 rounding of the products."""
    from mal.ops.block_grad import kernel as block_grad_triton
    from mal.ops.qkv import kernel as qkv_triton
    torch.manual_seed(0)
    B, S, NH, DH = 16, 197, 4, 192
    I = NH * DH
    xz = torch.randn(B, S, 2 * I, device="cuda").bfloat16()
    cw, cb = torch.randn(I, 1, 4, device="cuda") * 0.5, torch.randn(I, device="cuda") * 0.1
    ws = [torch.randn(I // 4, 4, 4, device="cuda") * 0.5 for _ in range(3)]
    bs = [torch.randn(I, device="cuda") * 0.1 for _ in range(3)]
    w_c, w_m, b = (torch.randn(2 * NH, I, device="cuda") * 0.1, torch.randn(2 * NH, I, device="cuda") * 0.1,
                   torch.randn(2 * NH, device="cuda"))
    v = qkv_triton.qkv_gates(xz, cw, cb, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], w_c, w_m, b)[2]
    h, du = torch.randn(B, NH, S, DH, device="cuda").bfloat16(), torch.randn(B, S, I, device="cuda").bfloat16()
    v2 = block_grad_triton.post_grad(du, h, xz, cw, cb, bs[0] + 1, bs[1], bs[2], 1e-5, (ws[2], bs[2]))[-1]
    assert v2.shape == v.shape and v2.dtype == v.dtype and v2.is_contiguous()
    assert (v != v2).float().mean().item() < 1e-4
    x_m = xz[..., :I].float().unflatten(-1, (I // 4, 1, 4))
    scale = (x_m * ws[2]).abs().sum(-1).flatten(-2) + bs[2].abs()            # sum of the magnitudes of the terms
    assert ((v.float() - v2.float()).abs() <= 2 ** -7 * scale + 1e-6).all()  # a bf16 rounding of the terms' scale


@pytest.mark.needs_gpu
def test_block_keeps_24_bytes_per_token_and_dim_and_recompute_qkv_16_with_the_same_gradients():
    """Compiled regions + Triton kernels in bf16 training: after the forward a block keeps xz, q, k, h and its
    output (~24 bytes per token and model dim; not the LayerNorm output or v, which the backward forms again),
    with recompute_qkv not q and k either (~16). The output is bitwise the same; the gradients differ only by
    the rare last-bit differences of the post kernel's v (test above)."""
    torch.manual_seed(0)
    blk = ViLBlock(192, num_heads=4, backend="auto").cuda().train()
    _randomize(blk, 9)
    x = torch.randn(16, 196, 192, device="cuda")
    results, kept = {}, {}
    for recompute in (False, True):
        blk.fast_path(compile=True, recompute_qkv=recompute)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _out_and_grads(blk, x)                                           # compile outside the measurement
            torch.cuda.synchronize()
            x_ = x.clone().requires_grad_(True)
            before = torch.cuda.memory_allocated()
            y = blk(x_)
            kept[recompute] = (torch.cuda.memory_allocated() - before) / x.numel()   # bytes per token and dim
            del y, x_
            results[recompute] = _out_and_grads(blk, x)
    assert 23 <= kept[False] <= 26 and 15 <= kept[True] <= 18, kept
    assert 7.95 <= kept[False] - kept[True] < 9, kept                       # q, k: 2 x (B, S, I=2D) in bf16
    # (7.95: a small tensor, one 512-byte block of the allocator, is made in one of the forwards after some tests)
    (out_a, g_a), (out_b, g_b) = results[True], results[False]
    assert torch.equal(out_a, out_b)
    for name in g_b:
        assert _rel(g_a[name], g_b[name]) < 1e-3, (name, _rel(g_a[name], g_b[name]))
