"""The chunkwise mLSTM kernels (`mal.ops.mlstm.chunkwise`) in the interpreter, against float64."""
import torch
from cell_checks import NAMES, rel, run_cell   # tests/ is on the path

from mal.ops.mlstm import chunkwise as ck
from mal.ops.mlstm.chunkwise_reference import mlstm_recurrent_state
from mal.ops.mlstm.reference import mlstm_parallel

# (S, DH, chunk, gate scale): S = 1, shorter than a chunk, several chunks, not a multiple of the chunk; head
# dims as one tile (16, 32, 64) and as two (48 = 32 + 16, 96 = 64 + 32); gates uniform in [-scale, scale]
CASES = [(1, 16, 16, 30.0), (17, 32, 16, 30.0), (64, 64, 32, 30.0), (100, 16, 32, 30.0), (100, 32, 16, 1.0),
         (64, 16, 16, 1.0), (17, 64, 32, 1.0), (100, 48, 16, 10.0), (40, 96, 16, 10.0)]


def _inputs(S, DH, gate_scale, seed, B=2, NH=2):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, NH, S, DH, generator=g) for _ in range(3)]
    xs += [(torch.rand(B, NH, S, generator=g) * 2 - 1) * gate_scale for _ in range(2)]
    return xs, torch.randn(B, NH, S, DH, generator=g)


def _run(fn, xs, dh, dtype):
    """`run_cell` of fn with the inputs in `dtype`."""
    return run_cell(fn, [x.to(dtype) for x in xs], dh)


def _check(xs, dh, chunk, dtype, slack, floor, worst):
    """Kernel and torch (both in `dtype`) against torch in float64; records the worst kernel errors."""
    kern = _run(lambda *a: ck.mlstm_chunkwise_triton(*a, chunk_size=chunk), xs, dh, dtype)
    tor = _run(mlstm_parallel, xs, dh, dtype)
    ref = _run(mlstm_parallel, xs, dh, torch.float64)
    for name, a, b, r in zip(NAMES, kern, tor, ref):
        assert torch.isfinite(a).all() and a.dtype == dtype, name
        if r.norm() == 0:                                                   # df at S = 1
            assert a.abs().max() == 0, name
            continue
        e_k, e_t = rel(a, r), rel(b, r)
        assert e_k <= slack * e_t + floor, (name, chunk, e_k, e_t)
        prev = worst.get(name, (0.0, 0.0))
        worst[name] = (max(prev[0], e_k), max(prev[1], e_k / max(e_t, 1e-300)))


def kernels_match_float64():
    """Forward and backward in float32 (exact dots) within 2 x torch-float32's error + 2e-5 of float64."""
    worst = {}
    for S, DH, chunk, gs in CASES:
        xs, dh = _inputs(S, DH, gs, seed=S * DH + chunk)
        _check(xs, dh, chunk, torch.float32, 2.0, 2e-5, worst)
    print("worst relative error, worst ratio to torch's, float32:", {k: f"{a:.1e} {b:.2f}" for k, (a, b) in worst.items()})


def tensor_core_path_within_tolerance():
    """fp16 inputs run the tensor-core path (operands rounded to the inputs' dtype, as bf16 does on the GPU):
    within 1.5 x torch-fp16's error + 1e-2 of float64 (the bf16 bound of the GPU tests). Gates up to 5: fp16
    itself overflows beyond (both forms)."""
    worst = {}
    for S, DH, chunk, gs in [(64, 32, 16, 1.0), (100, 64, 16, 5.0), (33, 96, 32, 1.0)]:
        xs, dh = _inputs(S, DH, gs, seed=S + DH)
        _check(xs, dh, chunk, torch.float16, 1.5, 1e-2, worst)
    print("worst relative error, worst ratio to torch's, fp16:", {k: f"{a:.1e} {b:.2f}" for k, (a, b) in worst.items()})


def state_layouts_and_saved_states():
    _state_continues_a_sequence()
    _half_inputs_keep_a_float32_final_state()
    _head_views_get_gradients_in_their_layout()
    _saved_states_equal_recomputed()


def _state_continues_a_sequence():
    """Two pieces with the state carried equal the whole in float64, state included; the second piece's output and
    gradients with the first's state held constant are the whole sequence's gradients of its second part (within
    2 x torch-float32's error + 2e-5, the parallel form's in both)."""
    for S, cut, DH, chunk in [(100, 37, 32, 16), (64, 32, 16, 32), (20, 1, 16, 16)]:
        xs, dh = _inputs(S, DH, 30.0, seed=S + cut, B=1)
        part = lambda x, sl: x[..., sl, :] if x.dim() == 4 else x[..., sl]
        first, second = [part(x, slice(None, cut)) for x in xs], [part(x, slice(cut, None)) for x in xs]
        h1, s1 = ck.mlstm_chunkwise_triton(*first, chunk_size=chunk, return_state=True)
        h2, s2 = ck.mlstm_chunkwise_triton(*second, chunk_size=chunk, initial_state=s1, return_state=True)
        hr, sr = mlstm_recurrent_state(*(x.double() for x in xs))
        assert all(rel(a, b) < 5e-5 for a, b in zip(s2, sr)), [rel(a, b) for a, b in zip(s2, sr)]
        dh_second = torch.cat([torch.zeros_like(dh[..., :cut, :]), dh[..., cut:, :]], dim=-2)
        whole32, whole64 = (_run(mlstm_parallel, xs, dh_second, dt) for dt in (torch.float32, torch.float64))
        assert rel(torch.cat([h1, h2], dim=-2), hr) <= 2 * rel(whole32[0], whole64[0]) + 2e-5
        tor, ref = ([part(t, slice(cut, None)) for t in w] for w in (whole32, whole64))   # the second part's
        got = _run(lambda *a: ck.mlstm_chunkwise_triton(*a, chunk_size=chunk, initial_state=s1), second,
                   dh[..., cut:, :], torch.float32)
        for name, a, b, r in zip(NAMES, got, tor, ref):
            assert rel(a, r) <= 2 * rel(b, r) + 2e-5, (name, rel(a, r), rel(b, r))


def _half_inputs_keep_a_float32_final_state():
    """fp16 inputs (the chunk states stored in fp16, as the tensor cores read them): the final state comes back in
    float32, not rounded through that storage, and matches the recurrence on the same inputs."""
    xs, _ = _inputs(70, 32, 1.0, seed=3, B=1)
    half = [x.half() for x in xs]
    _, (C, n, m) = ck.mlstm_chunkwise_triton(*half, chunk_size=16, return_state=True)
    _, (Cr, nr, mr) = mlstm_recurrent_state(*(x.double() for x in half))
    assert C.dtype == n.dtype == m.dtype == torch.float32
    assert not torch.equal(C, C.half().float())                             # not an fp16 value
    assert rel(C, Cr) < 5e-3 and rel(n, nr) < 5e-3 and rel(m, mr) < 1e-6, (rel(C, Cr), rel(n, nr), rel(m, mr))


def _head_views_get_gradients_in_their_layout():
    """q, k, v as head views of (B, S, NH * DH) tensors, as the fused block passes them: dq, dk, dv come back
    with their strides, and the values are right (float64 oracle; within 2x torch-float32's error + 2e-5)."""
    B, S, NH, DH = 2, 19, 2, 32
    g = torch.Generator().manual_seed(7)
    bases = [torch.randn(B, S, NH * DH, generator=g) for _ in range(3)]
    gates = [3 * torch.randn(B, NH, S, generator=g) for _ in range(2)]
    dh = torch.randn(B, NH, S, DH, generator=g)
    res = []
    for fn, dt in ((lambda *a: ck.mlstm_chunkwise_triton(*a, chunk_size=16), torch.float32),
                   (mlstm_parallel, torch.float32), (mlstm_parallel, torch.float64)):
        leaves = [x.to(dt).requires_grad_() for x in bases + gates]
        heads = [t.view(B, S, NH, DH).transpose(1, 2) for t in leaves[:3]]
        res.append(list(torch.autograd.grad(fn(*heads, *leaves[3:]), leaves, dh.to(dt))))
        if not res[1:]:
            views = [t.detach().requires_grad_() for t in heads]
            grads = torch.autograd.grad(fn(*views, *leaves[3:]), views, dh)
            assert all(g.stride() == t.stride() for g, t in zip(grads, views))
    for a, b, r in zip(*res):
        assert rel(a, r) <= 2 * rel(b, r) + 2e-5, (rel(a, r), rel(b, r))


def _saved_states_equal_recomputed():
    """SAVE_STATES (the forward's chunk states kept) gives the gradients of recomputing them, bitwise."""
    xs, dh = _inputs(50, 32, 10.0, seed=11)
    keep = ck.SAVE_STATES
    try:
        grads = []
        for flag in (False, True):
            ck.SAVE_STATES = flag
            grads.append(_run(lambda *a: ck.mlstm_chunkwise_triton(*a, chunk_size=16), xs, dh, torch.float32))
    finally:
        ck.SAVE_STATES = keep
    assert all(torch.equal(a, b) for a, b in zip(*grads))
