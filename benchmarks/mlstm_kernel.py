"""Time the mLSTM cell: fused Triton backend vs the torch parallel form vs causal SDPA (speed-of-light reference).

For each head dim: forward (no grad) and forward+backward medians from `triton.testing.do_bench` (CUDA events,
warm-up first), eagerly (host launch overhead included, as a training step sees it when the GPU waits on
the CPU), and as GPU kernel time alone (profiler sum of all kernels per call, marked 'gpu'); peak extra memory of one forward+backward; ratios.
Prints JSON, then a markdown table.

    PYTHONPATH=src python benchmarks/mlstm_kernel.py [--dh 96 192 384] [--batch 128] [--sweep] [--profile]
        [--delta-ablation] [--split-ablation] [--maxnreg-ablation]
    PYTHONPATH=src python benchmarks/mlstm_kernel.py --long [--seqs 196 1024 4096 16384] [--dh 96 192 384]
        [--tokens 131072 | --batch B] [--chunk 128] [--chunk-ablation] [--sweep] [--json long.json]

`--sweep` also times (GPU kernel time) candidate tile configurations of each Triton kernel and prints the
fastest per head dim; `--profile` prints the per-kernel GPU times of the Triton forward+backward; the
ablations time the kernels with one of their module settings off (EXACT_DELTA, SPLIT_HEAD_DIM, _DQ_MAXNREG).

`--long`: long sequences, in one run: ours parallel ("triton"), ours chunkwise ("chunkwise"), causal SDPA and, when
the `mlstm_kernels` package is importable, NX-AI's TFLA kernel `chunkwise--triton_xl_chunk` ("tfla", its chunk 128;
a length it does not take is zero-padded at the end to a multiple of 128 (causal: the first S outputs are
unchanged) and timed padded, `tfla_S`; it is first tried in a child process at each head dim's row with the most
(padded) tokens; where that run aborts it is tried again with Triton's LLVM optimization passes off
(`DISABLE_LLVM_OPT=1`: an LLVM pass aborts on its kernels under some Triton builds; ptxas still optimizes), and if
that runs, its rows are timed with the passes off while its kernels compile, `tfla_llvm_opt: false`; otherwise it is
left out at that head dim with the reason printed). Every length
has B = tokens // S sequences (B * S constant; --batch fixes B instead), 4 heads, bf16 q, k, v and gates. Per
backend: forward and forward+backward (eager and GPU kernel time), the peak extra memory of one forward+backward,
and per token (memory linear in S is a constant column). Ratios: TFLA / chunkwise and parallel / chunkwise GPU
forward+backward (> 1: chunkwise is faster). With --sweep, the chunkwise kernels' tile configurations are swept
first (GPU kernel time, per head dim at the longest S); with --chunk-ablation, the chunk length (64, 128, 256) and
SAVE_STATES are timed too; with --profile, the chunkwise kernels' GPU times per row are printed. The shortest S
where chunkwise beats parallel is where `mal.ops.mlstm.CHUNKWISE_MIN_SEQ` belongs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from unittest import mock

import torch
import torch.nn.functional as F

WARMUP_MS, REP_MS = 25, 200
# No 8-warp, 1-stage tilings: with two head-dim column tiles Triton 3.6 compiles (64, 32, 8, 1) to wrong results
# and an illegal address on the H100 (DH 96), which ends the process, so the sweep could not go on past it.
FWD_CANDIDATES = [(64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2),
                  (32, 32, 4, 2), (64, 16, 4, 2), (32, 64, 4, 2), (16, 32, 4, 2), (64, 32, 8, 2), (64, 16, 8, 2),
                  (32, 32, 8, 2), (32, 16, 4, 2)]
BWD_CANDIDATES = [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2),
                  (16, 32, 4, 2), (32, 16, 4, 2), (16, 64, 4, 2), (64, 16, 4, 2), (32, 32, 8, 2), (64, 32, 8, 2),
                  (64, 16, 8, 2), (32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)]


def bench(fn) -> float:
    """Median milliseconds of fn() (CUDA events)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def gpu_ms(fn, iters: int = 20) -> float:
    """GPU milliseconds per fn() call: the summed kernel times from the profiler (launch gaps removed)."""

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
    return total_us / iters / 1e3


def peak_mib(fn) -> float:
    """Extra peak memory (MiB) of one call, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def sdpa_fn():
    """Causal SDPA restricted to flash, else memory-efficient attention; returns (fn, backend name)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def make(backend):
        def call(q, k, v, i, f):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return call
    return [(make(SDPBackend.FLASH_ATTENTION), "sdpa-flash"), (make(SDPBackend.EFFICIENT_ATTENTION), "sdpa-mem-eff")]


def make_inputs(B, NH, S, DH, dtype):
    q, k, v = (torch.randn(B, NH, S, DH, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    i = torch.randn(B, NH, S, device="cuda", requires_grad=True)
    f = (torch.randn(B, NH, S, device="cuda") + 3.0).requires_grad_()
    dh = torch.randn(B, NH, S, DH, device="cuda", dtype=dtype)
    return (q, k, v, i, f), dh


def time_backend(fn, inputs, dh):
    """Eager and GPU-kernel-time fwd / fwd+bwd milliseconds and the peak MiB of one fwd+bwd for fn on inputs."""
    leaves = [t for t in inputs if t.requires_grad]

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        out = fn(*inputs)
        torch.autograd.grad(out, leaves, dh, allow_unused=True)

    fwd_bwd()
    res = {"fwd_ms": bench(fwd), "fwd_bwd_ms": bench(fwd_bwd), "peak_mib": peak_mib(fwd_bwd)}
    res["gpu_fwd_ms"] = gpu_ms(fwd)
    res["gpu_fwd_bwd_ms"] = gpu_ms(fwd_bwd)
    return res


def floors(B, NH, S, DH, itemsize=2):
    """Causal-attention-like FLOPs (two S x S x DH products, half of the square) and HBM bytes of q, k, v, h."""
    flop_fwd = 2 * 2 * B * NH * S * S * DH / 2
    bytes_fwd = 4 * B * NH * S * DH * itemsize
    return flop_fwd, bytes_fwd


def sweep(B, NH, S, DH, dtype, tol=2e-2):
    """Time each Triton kernel's candidate configs; returns the best per table.

    A config whose outputs (and gradients) differ from the current config's by more than `tol` (relative), or
    between two calls, is reported as wrong and never picked: a compiler fault in one tiling must not win the sweep."""
    from mal.ops.mlstm import kernel as mt
    results, timing = results_and_timing(mt.mlstm_triton, *make_inputs(B, NH, S, DH, dtype))
    bd = mt._block_d(DH)
    best = {}
    for name, table, cands, with_bwd in (("fwd", mt._FWD_CFG, FWD_CANDIDATES, False),
                                         ("dq", mt._BWD_DQ_CFG, BWD_CANDIDATES, True),
                                         ("dkdv", mt._BWD_DKDV_CFG, BWD_CANDIDATES, True)):
        best[name] = sweep_configs(f"DH={DH} {name}", f"sweep DH={DH} {name}", lambda cfg: table.__setitem__(bd, cfg),
                                   table[bd], cands, lambda: results(with_bwd), timing(with_bwd), tol)
    return best


def profile(inputs, dh, iters=5, fn=None):
    """Per-kernel GPU time of a cell's forward+backward (default: the parallel Triton kernel)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    if fn is None:
        from mal.ops.mlstm.kernel import mlstm_triton as fn
    for _ in range(2):
        torch.autograd.grad(fn(*inputs), inputs, dh)
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            torch.autograd.grad(fn(*inputs), inputs, dh)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=50))


def ablation(inputs, dh, name: str, off=False) -> dict:
    """GPU-kernel fwd and fwd+bwd ms of the Triton cell with the module setting `name` set to `off`."""
    from mal.ops.mlstm import kernel as mt
    detached = [t.detach() for t in inputs]
    keep = getattr(mt, name)
    setattr(mt, name, off)
    try:
        return {"gpu_fwd_ms": gpu_ms(lambda: mt.mlstm_triton(*detached)),
                "gpu_fwd_bwd_ms": gpu_ms(lambda: torch.autograd.grad(mt.mlstm_triton(*inputs), inputs, dh))}
    finally:
        setattr(mt, name, keep)


# ----------------------------------------------------------------------------------------------- --long
LONG_SEQS = (196, 1024, 4096, 16384)
TFLA_CHUNK = 128
# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates of the chunkwise block kernels; state-loop candidates
# (C tile rows, C tile columns, num_warps, num_stages). Block tiles larger than the chunk are skipped.
CHUNK_BLOCK_CANDIDATES = [(64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 8, 2), (64, 64, 8, 2),
                          (32, 64, 4, 2), (32, 64, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2),
                          (64, 16, 4, 2), (128, 32, 8, 2)]
CHUNK_STATE_CANDIDATES = [(bk, bv, 4, 2) for bk in (32, 64, 128) for bv in (32, 64, 128)] + [
    (64, 128, 8, 2), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 8, 2), (64, 64, 2, 2), (32, 32, 2, 2), (64, 64, 4, 3),
    (32, 256, 4, 2), (32, 256, 8, 2), (64, 256, 8, 2)]


def long_inputs(B, NH, S, DH, dtype=torch.bfloat16):
    """q, k, v, i, f (all `dtype`, gates as the fused block hands them over) with grad, and dh."""
    q, k, v = (torch.randn(B, NH, S, DH, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    i = torch.randn(B, NH, S, device="cuda", dtype=dtype, requires_grad=True)
    f = (torch.randn(B, NH, S, device="cuda") + 3.0).to(dtype).requires_grad_()
    return (q, k, v, i, f), torch.randn(B, NH, S, DH, device="cuda", dtype=dtype)


def tfla_fn():
    """NX-AI's TFLA chunkwise kernel (mlstm_kernels' `chunkwise--triton_xl_chunk`), or None if not importable."""
    try:
        from mlstm_kernels.torch import get_mlstm_kernel
        kernel = get_mlstm_kernel("chunkwise--triton_xl_chunk")
    except Exception as exc:  # noqa: BLE001 - optional baseline: any import failure means "skip it"
        print(f"TFLA skipped: mlstm_kernels is not importable ({type(exc).__name__}: {exc})")
        return None

    def call(q, k, v, i, f):
        S = q.shape[2]
        pad = tfla_len(S) - S
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            i, f = (F.pad(t, (0, pad)) for t in (i, f))
        h = kernel(q, k, v, i, f, chunk_size=TFLA_CHUNK)
        return h[:, :, :S] if pad else h
    return call


TFLA_PROBE = """
import torch
from mlstm_kernels.torch import get_mlstm_kernel
q, k, v = (torch.randn({B}, {NH}, {S}, {DH}, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
i, f = (torch.randn({B}, {NH}, {S}, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
get_mlstm_kernel("chunkwise--triton_xl_chunk")(q, k, v, i, f, chunk_size=128).sum().backward()
torch.cuda.synchronize()
"""


NO_LLVM_OPT = {"DISABLE_LLVM_OPT": "1"}


def tfla_len(S: int) -> int:
    """The length TFLA is run at: S, or S zero-padded to a multiple of its chunk (it takes 16..64 (powers) or
    k * 128)."""
    return S + ((-S) % TFLA_CHUNK if S >= TFLA_CHUNK or S & (S - 1) else 0)


def tfla_compiles(shape: tuple, env: dict | None = None) -> bool:
    """Whether TFLA's forward + backward compiles and runs at shape (B, NH, S, DH) (with `env` added to the
    environment), tried in a child process: a Triton compile that aborts (an LLVM assertion on some toolchains) or an
    illegal memory access (TFLA at B 128, S 4096, DH 384 on an H200) would end this one and lose every row."""
    import subprocess
    import sys
    B, NH, S, DH = shape
    res = subprocess.run([sys.executable, "-c", TFLA_PROBE.format(B=B, NH=NH, S=tfla_len(S), DH=DH)],
                         capture_output=True, text=True, env={**os.environ, **(env or {})})
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1][:200]
        print(f"TFLA's probe at (B, NH, S, DH) = {shape} with {env or 'the default environment'} ended with code "
              f"{res.returncode} ({last})", flush=True)
    return res.returncode == 0


def long_backends(shape: tuple, tfla):
    """(name, fn, env) of every backend of the --long rows at shape (B, NH, S, DH), TFLA's probe run at that shape
    (`tfla`: `tfla_fn()`'s, or None); env is added to the environment while the backend is timed (TFLA's fallback
    without LLVM's passes)."""
    from mal.ops.mlstm.chunkwise import mlstm_chunkwise_triton
    from mal.ops.mlstm.kernel import mlstm_triton
    rows = [("triton", mlstm_triton, {}), ("chunkwise", mlstm_chunkwise_triton, {})]
    if tfla is not None:
        env = {} if tfla_compiles(shape) else NO_LLVM_OPT if tfla_compiles(shape, NO_LLVM_OPT) else None
        if env is not None:
            rows.append(("tfla", tfla, env))
    return rows + [(n, f, {}) for f, n in sdpa_fn()]


def long_row(B, NH, S, DH, fns) -> dict:
    """One --long row: every backend timed on the same inputs; the ratios."""
    inputs, dh = long_inputs(B, NH, S, DH)
    row = {"device": torch.cuda.get_device_name(), "B": B, "NH": NH, "S": S, "DH": DH, "dtype": "bf16"}
    for name, fn, env in fns:
        if name == "tfla":
            row["tfla_S"] = tfla_len(S)
            row["tfla_llvm_opt"] = "DISABLE_LLVM_OPT" not in env
        if name == "sdpa-mem-eff" and "sdpa-flash" in row:
            continue
        try:
            with mock.patch.dict(os.environ, env):           # Triton reads DISABLE_LLVM_OPT at each compile
                row[name] = time_backend(fn, inputs, dh)
            row[name]["peak_bytes_per_token"] = row[name]["peak_mib"] * 2**20 / (B * S)
        except (RuntimeError, AssertionError) as exc:   # flash above DH 256, TFLA's shape limits, OOM
            print(f"{name} S={S} DH={DH}: {str(exc).splitlines()[0][:160]}", flush=True)
        torch.cuda.empty_cache()
    row["sdpa"] = "sdpa-flash" if "sdpa-flash" in row else "sdpa-mem-eff"
    chk = row.get("chunkwise")
    for other in ("triton", "tfla", row["sdpa"]):
        if chk and other in row:
            row[f"{other}_over_chunkwise_gpu_fwd_bwd"] = row[other]["gpu_fwd_bwd_ms"] / chk["gpu_fwd_bwd_ms"]
            row[f"{other}_over_chunkwise_gpu_fwd"] = row[other]["gpu_fwd_ms"] / chk["gpu_fwd_ms"]
    return row


def chunk_ablation(B, NH, S, DH) -> dict:
    """GPU fwd+bwd ms of the chunkwise kernel per chunk length and with SAVE_STATES (the others at defaults)."""
    from mal.ops.mlstm import chunkwise as ck
    inputs, dh = long_inputs(B, NH, S, DH)
    out = {}
    for L in (64, 128, 256):
        for save in (False, True):
            ck.SAVE_STATES = save
            try:
                fn = lambda *a: ck.mlstm_chunkwise_triton(*a, chunk_size=L)  # noqa: E731
                out[f"L{L}{'_saved' if save else ''}"] = gpu_ms(
                    lambda: torch.autograd.grad(fn(*inputs), inputs, dh))
            except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
                out[f"L{L}{'_saved' if save else ''}"] = f"{type(exc).__name__}"
            finally:
                ck.SAVE_STATES = False
            torch.cuda.empty_cache()
    return out


def results_and_timing(fn, inputs, dh):
    """For a cell fn(q, k, v, i, f): results(with_bwd) -> its output (and input gradients for dh), and
    timing(with_bwd) -> the call to time (forward on detached inputs, or forward + backward)."""
    detached = [t.detach() for t in inputs]

    def results(with_bwd):
        out = fn(*inputs)
        return [out.detach()] + (list(torch.autograd.grad(out, inputs, dh)) if with_bwd else [])

    def timing(with_bwd):
        if with_bwd:
            return lambda: torch.autograd.grad(fn(*inputs), inputs, dh)
        return lambda: fn(*detached)
    return results, timing


def sweep_configs(label, title, apply, keep, candidates, results, timing, tol):
    """Time each candidate config (apply(cfg) installs it) with gpu_ms(timing); a config whose results() differ
    from the current config's by more than tol (relative), whose output and q, k, v gradients differ between two
    calls (a race), or that fails, is reported and never picked (a compiler fault in one tiling must not win the
    sweep). Reinstalls `keep`, prints the five fastest, returns the fastest."""
    expect, timed = results(), []
    for cfg in candidates:
        apply(cfg)
        try:
            got, again = results(), results()
            err = max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
                      for a, b in zip(got, expect))
            if not err <= tol or not all(torch.equal(a, b) for a, b in list(zip(got, again))[:4]):
                print(f"  {label} {cfg}: wrong results (rel. difference {err:.3g}, or not the same twice)")
                timed.append((math.inf, cfg))
                continue
            timed.append((gpu_ms(timing), cfg))
        except Exception as exc:  # noqa: BLE001 - out-of-resources configs are expected
            timed.append((math.inf, cfg))
            print(f"  {label} {cfg}: {type(exc).__name__}")
    apply(keep)
    timed.sort()
    print(f"{title}: " + ", ".join(f"{c}={ms:.3f}" for ms, c in timed[:5]), flush=True)
    return timed[0][1]


SWEPT_TABLES = ("out", "dq", "dkdv", "states", "dstates")


def sweep_chunkwise(B, NH, S, DH, tol=2e-2, only=SWEPT_TABLES) -> dict:
    """Time candidate configurations of each chunkwise kernel in `only` (the others at their current entries),
    checking the results against the current configuration's; returns the fastest per table (not written back)."""
    from mal.ops.mlstm import chunkwise as ck
    results, timing = results_and_timing(ck.mlstm_chunkwise_triton, *long_inputs(B, NH, S, DH))
    L = ck.chunk_size_for(S)
    best, bd = {}, ck._block_d(DH)
    tables = [("out", ck._OUT_CFG, False), ("dq", ck._DQ_CFG, True), ("dkdv", ck._DKDV_CFG, True)]
    for name, table, with_bwd in tables:
        if name not in only:
            continue
        best[name] = sweep_configs(
            f"DH={DH} {name}", f"chunkwise sweep DH={DH} {name}", lambda cfg: table.__setitem__(bd, cfg), table[bd],
            [c for c in CHUNK_BLOCK_CANDIDATES if c[0] <= L and c[1] <= L], lambda: results(with_bwd),
            timing(with_bwd), tol)

    for name, table in (("states", ck._STATE_CFG), ("dstates", ck._DSTATE_CFG)):
        if name not in only:
            continue
        best[name] = sweep_configs(f"DH={DH} {name}", f"chunkwise sweep DH={DH} {name} (fwd+bwd)",
                                   lambda cfg: table.__setitem__(bd, cfg), table[bd],
                                   CHUNK_STATE_CANDIDATES, lambda: results(True), timing(True), tol)
    return best


def long_table(rows) -> None:
    """Markdown: GPU kernel ms (fwd / fwd+bwd) per backend, the ratios, peak bytes per token."""
    names = [n for n in ("triton", "chunkwise", "tfla") if any(n in r for r in rows)]
    print(f"\n{rows[0]['device']}, NH={rows[0]['NH']}, bf16, GPU kernel ms (profiler) fwd / fwd+bwd; "
          "ratios: other / chunkwise fwd+bwd (> 1: chunkwise faster); peak extra bytes per token of one fwd+bwd\n")
    head = " | ".join([f"{n} fwd / f+b" for n in names] + ["sdpa fwd / f+b"])
    ratios = " | ".join(f"{n} / chunkwise" for n in names if n != "chunkwise")
    peaks = " / ".join(names + ["sdpa"])
    print(f"| S | DH | B | {head} | {ratios} | peak B/token {peaks} |")
    print("|" + "---|" * (3 + len(names) + 1 + len(names) - 1 + 1))
    for r in rows:
        cell = lambda x: f"{x['gpu_fwd_ms']:.3f} / {x['gpu_fwd_bwd_ms']:.3f}" if x else "-"  # noqa: E731
        cols = [cell(r.get(n)) for n in names] + [cell(r.get(r["sdpa"]))]
        rat = [f"{r[k]:.2f}x" if (k := f"{n}_over_chunkwise_gpu_fwd_bwd") in r else "-" for n in names if n != "chunkwise"]
        pk = " / ".join(f"{r[n]['peak_bytes_per_token']:.0f}" if n in r else "-" for n in names + [r["sdpa"]])
        print(f"| {r['S']} | {r['DH']} | {r['B']} | " + " | ".join(cols + rat) + f" | {pk} |")


def long_main(args) -> None:
    """--long: every backend at every (S, DH), in one run; JSON lines, then the markdown table."""
    rows, tfla = [], tfla_fn()
    for DH in args.dh:
        shapes = [(args.batch or max(1, args.tokens // S), args.heads, S, DH) for S in args.seqs]   # (B, NH, S, DH)
        fns = long_backends(max(shapes, key=lambda b: (b[0] * tfla_len(b[2]), b[2])), tfla)   # the most tokens
        if args.sweep:
            print(json.dumps({"DH": DH, "chunkwise_best": sweep_chunkwise(
                *max(shapes, key=lambda b: b[2]), only=args.sweep_tables)}), flush=True)     # at the longest S
        for B, NH, S, _ in shapes:
            row = long_row(B, NH, S, DH, fns)
            if args.chunk_ablation:
                row["chunk_ablation_gpu_fwd_bwd_ms"] = chunk_ablation(B, NH, S, DH)
            if args.profile:
                from mal.ops.mlstm.chunkwise import mlstm_chunkwise_triton
                print(f"chunkwise kernels, B={B} S={S} DH={DH}:", flush=True)
                profile(*long_inputs(B, NH, S, DH), fn=mlstm_chunkwise_triton)
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    long_table(rows)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dh", type=int, nargs="+", default=[96, 192, 384])
    ap.add_argument("--batch", type=int, default=None, help="sequences per call (default 128; --long: tokens // S)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=197)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-tables", type=lambda s: tuple(s.split(",")), default=SWEPT_TABLES,
                    help="--long --sweep: the chunkwise tables to sweep (comma-separated; default all)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--delta-ablation", action="store_true",
                    help="also time the backward with delta from the stored output (EXACT_DELTA=False)")
    ap.add_argument("--split-ablation", action="store_true",
                    help="also time the kernels with one padded head-dim tile (SPLIT_HEAD_DIM=False)")
    ap.add_argument("--maxnreg-ablation", action="store_true",
                    help="also time the kernels without the dq kernel's register cap (_DQ_MAXNREG={})")
    ap.add_argument("--json", default=None, help="also write the JSON results here")
    ap.add_argument("--long", action="store_true", help="long sequences: parallel vs chunkwise vs TFLA vs SDPA")
    ap.add_argument("--seqs", type=int, nargs="+", default=list(LONG_SEQS), help="--long: sequence lengths")
    ap.add_argument("--tokens", type=int, default=128 * 1024, help="--long: B * S per call (B = tokens // S)")
    ap.add_argument("--chunk", type=int, default=None, help="--long: the chunkwise kernel's chunk length")
    ap.add_argument("--chunk-ablation", action="store_true", help="--long: also time chunk 64/128/256, SAVE_STATES")
    return ap.parse_args()


def short_row(args: argparse.Namespace, DH: int, dev: str) -> dict:
    """One head dim at ViL's sequence length: our kernel, the torch reference and SDPA, timed, with the ratios and
    the ablations asked for."""
    from mal.ops.mlstm.kernel import mlstm_triton
    from mal.ops.mlstm.reference import mlstm_parallel

    dtype = torch.bfloat16
    B, NH, S = args.batch, args.heads, args.seq
    if args.sweep:
        print(json.dumps({"DH": DH, "best": sweep(B, NH, S, DH, dtype)}), flush=True)
    inputs, dh = make_inputs(B, NH, S, DH, dtype)
    row = {"device": dev, "B": B, "NH": NH, "S": S, "DH": DH, "dtype": "bf16"}
    for name, fn in [("triton", mlstm_triton), ("torch", mlstm_parallel)] + [(n, f) for f, n in sdpa_fn()]:
        try:
            row[name] = time_backend(fn, inputs, dh)
        except RuntimeError as exc:   # e.g. flash attention rejects head dims above 256
            print(f"{name} DH={DH}: {str(exc).splitlines()[0][:120]}")
            continue
        torch.cuda.empty_cache()
    sdpa = row.get("sdpa-flash") or row.get("sdpa-mem-eff")
    row["sdpa"] = "sdpa-flash" if "sdpa-flash" in row else "sdpa-mem-eff"
    flop, nbytes = floors(B, NH, S, DH)
    row["triton_fwd_tflops"] = flop / row["triton"]["fwd_ms"] / 1e9
    row["triton_fwd_gbps_qkvh"] = nbytes / row["triton"]["fwd_ms"] / 1e6
    row["speedup_vs_torch_fwd"] = row["torch"]["fwd_ms"] / row["triton"]["fwd_ms"]
    row["speedup_vs_torch_fwd_bwd"] = row["torch"]["fwd_bwd_ms"] / row["triton"]["fwd_bwd_ms"]
    row["vs_sdpa_fwd"] = row["triton"]["fwd_ms"] / sdpa["fwd_ms"]
    row["vs_sdpa_fwd_bwd"] = row["triton"]["fwd_bwd_ms"] / sdpa["fwd_bwd_ms"]
    row["gpu_vs_sdpa_fwd_bwd"] = row["triton"]["gpu_fwd_bwd_ms"] / sdpa["gpu_fwd_bwd_ms"]
    row["gpu_speedup_vs_torch_fwd_bwd"] = row["torch"]["gpu_fwd_bwd_ms"] / row["triton"]["gpu_fwd_bwd_ms"]
    if args.profile:
        profile(inputs, dh)
    if args.delta_ablation:
        row["triton_o_delta_gpu_fwd_bwd_ms"] = ablation(inputs, dh, "EXACT_DELTA")["gpu_fwd_bwd_ms"]
    if args.split_ablation:
        row["triton_one_tile"] = ablation(inputs, dh, "SPLIT_HEAD_DIM")
        for key in ("gpu_fwd_ms", "gpu_fwd_bwd_ms"):
            row[f"one_tile_over_split_{key}"] = row["triton_one_tile"][key] / row["triton"][key]
    if args.maxnreg_ablation:
        row["triton_no_dq_maxnreg"] = ablation(inputs, dh, "_DQ_MAXNREG", {})
        row["no_cap_over_cap_gpu_fwd_bwd_ms"] = (row["triton_no_dq_maxnreg"]["gpu_fwd_bwd_ms"]
                                                 / row["triton"]["gpu_fwd_bwd_ms"])
    del inputs, dh
    torch.cuda.empty_cache()
    return row


def print_short_table(rows: list[dict], args: argparse.Namespace, dev: str) -> None:
    """The markdown table of the short rows (eager / GPU-kernel milliseconds, ratios, peak memory)."""
    print(f"\n{dev}, B={args.batch}, NH={args.heads}, S={args.seq}, bf16, median ms (do_bench); "
          "eager / gpu kernel time\n")
    print("| DH | sdpa | triton fwd | torch fwd | sdpa fwd | triton f+b | torch f+b | sdpa f+b "
          "| torch/triton f+b | triton/sdpa f+b | peak MiB triton / torch / sdpa |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, p, s = r["triton"], r["torch"], r[r["sdpa"]]

        def two(x, key):
            return f"{x[key]:.3f} / {x['gpu_' + key]:.3f}"
        print(f"| {r['DH']} | {r['sdpa'][5:]} | {two(t, 'fwd_ms')} | {two(p, 'fwd_ms')} | {two(s, 'fwd_ms')} | "
              f"{two(t, 'fwd_bwd_ms')} | {two(p, 'fwd_bwd_ms')} | {two(s, 'fwd_bwd_ms')} | "
              f"{r['speedup_vs_torch_fwd_bwd']:.1f}x / {r['gpu_speedup_vs_torch_fwd_bwd']:.1f}x | "
              f"{r['vs_sdpa_fwd_bwd']:.2f}x / {r['gpu_vs_sdpa_fwd_bwd']:.2f}x | "
              f"{t['peak_mib']:.0f} / {p['peak_mib']:.0f} / {s['peak_mib']:.0f} |")


def main():
    args = parse_args()
    if args.long:
        if args.chunk is not None:
            from mal.ops.mlstm import chunkwise as ck
            ck.CHUNK_SIZE = args.chunk
        return long_main(args)
    args.batch = args.batch or 128
    dev = torch.cuda.get_device_name()
    rows = []
    for DH in args.dh:
        rows.append(short_row(args, DH, dev))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    print_short_table(rows, args, dev)


if __name__ == "__main__":
    main()
