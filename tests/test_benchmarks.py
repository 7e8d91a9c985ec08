"""The benchmark scripts' own arithmetic (their speed numbers live in benchmarks/results/, not here)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_step_flops_is_three_forwards_of_the_model():
    """A supervised training step costs forward + backward = 3 forwards of the model's matmuls; torch's counter
    alone charges the depthwise causal conv's backward `groups` times over (56 % too much for ViL-T). The cell
    is counted in its torch form whatever the config's backend (on the GPU the counter misses a Triton kernel;
    here the recurrent form stands in for it)."""
    from train_step import step_flops, synthetic_folder

    from mal.config import load_run_config
    from mal.engine.build import build_model
    over = [f"data.dataset={synthetic_folder(96, 8)}", "data.cache=false", "model.depth=4"]
    cfg = load_run_config("imagenette_supervised", over)
    model = build_model(cfg, 10, load_init=False)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 96, 96))
    forward = counter.get_total_flops() / 2 / 1e9
    for backend in ("auto", "recurrent"):
        flops = step_flops("imagenette_supervised", over + [f"model.mlstm_backend={backend}"])
        assert abs(flops / (3 * forward) - 1) < 0.01, backend


def test_fit_row_reads_the_loops_own_windows(image_folder):
    """A fit row runs the real loop for --fit-steps steps and reports its 10-step windows after the first 20 %:
    30 steps give the windows ending at steps 10, 20 and 30."""
    import argparse

    from train_step import measure_fit
    tiny = ["model.dim=32", "model.depth=2", "objective.decoder.depth=1", "objective.decoder.dim=32",
            "objective.decoder.num_heads=4", "data.cache=false", "optim.batch_size=8", f"data.dataset={image_folder}"]
    res = measure_fit("cifar10_pretrain", "fit", tiny, argparse.Namespace(fit_steps=30, fit_workers=0))
    assert res["windows"] == 3
    assert 0 < res["p10"] <= res["img_s"] <= res["p90"]


def test_ddp_scaling_rows_on_two_cpu_processes(image_folder, tmp_path):
    """ddp_scaling.py end to end on gloo: one row per (per-GPU batch, process count), efficiency 1 for one
    process, the loss of two processes paired with one at equal images seen, and the profiled all-reduce: none
    with one process, some with two."""
    import json
    import os
    import subprocess

    tiny = ["model.dim=32", "model.depth=2", "objective.decoder.depth=1", "objective.decoder.dim=32",
            "objective.decoder.num_heads=4", "data.cache=false"]
    out = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "benchmarks/ddp_scaling.py", "--gpus", "2", "--per-gpu-batch", "8",
                          "--steps", "20", "--log-every", "5", "--workers", "0", "--data", str(image_folder),
                          "--out", str(tmp_path / "runs"), "--profile-steps", "2", "--json", str(out), "--set", *tiny],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    one, two = json.loads(out.read_text())["rows"]
    assert (one["gpus"], two["gpus"], two["global_batch"]) == (1, 2, 16)
    assert one["efficiency"] == 1.0 and two["efficiency"] > 0 and one["img_s"] > 0
    assert two["loss_pairs"] == 2                   # 2-process steps 5, 10 = 1-process steps 10, 20
    assert one["comm_ms"] == 0 and two["comm_ms"] > 0 and 0 < two["comm_share"] < 1
    assert "| 8 | 2 | 16 |" in res.stdout


def test_tfla_row_falls_back_to_llvm_passes_off(monkeypatch):
    """Where TFLA's probe aborts with LLVM's passes on and runs with them off, `--long` times TFLA's row (and no
    other) with DISABLE_LLVM_OPT=1 set and marks the row; where both probes abort, TFLA is left out."""
    import os

    import mlstm_kernel as mk
    monkeypatch.delenv("DISABLE_LLVM_OPT", raising=False)
    probed = []
    monkeypatch.setattr(mk, "tfla_compiles", lambda shape, env=None: probed.append(shape) or bool(env))
    monkeypatch.setattr(mk, "sdpa_fn", lambda: [])
    monkeypatch.setattr(mk, "long_inputs", lambda *a: ((), None))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test")
    seen = {}

    def fake_time(fn, inputs, dh):
        seen[fn] = os.environ.get("DISABLE_LLVM_OPT")
        return {"gpu_fwd_ms": 1.0, "gpu_fwd_bwd_ms": 2.0, "peak_mib": 1.0}
    monkeypatch.setattr(mk, "time_backend", fake_time)

    def tfla(*args):
        return None
    row = mk.long_row(1, 4, 256, 96, mk.long_backends((1, 4, 256, 96), tfla))
    assert probed == [(1, 4, 256, 96)] * 2                                  # with the passes on, then off
    assert row["tfla_llvm_opt"] is False and seen.pop(tfla) == "1"
    assert len(seen) == 2 and set(seen.values()) == {None}                  # the parallel and chunkwise rows
    assert "DISABLE_LLVM_OPT" not in os.environ
    monkeypatch.setattr(mk, "tfla_compiles", lambda shape, env=None: False)
    assert [n for n, _, _ in mk.long_backends((1, 4, 256, 96), tfla)] == ["triton", "chunkwise"]


def test_step_ops_names_each_kernel_with_its_op_and_autograd_node(monkeypatch):
    """The step_ops row sums each kernel's GPU time per step under (kernel, launching op, owner): the owner is the
    nearest autograd node above the op in the backward, else the outermost op of the forward."""
    from types import SimpleNamespace as Ev

    import train_step as ts
    from torch.autograd.profiler_util import Kernel
    node = Ev(name="autograd::engine::evaluate_function: SumBackward0", cpu_parent=None, kernels=[])
    expand = Ev(name="aten::expand", cpu_parent=Ev(name="aten::copy_", cpu_parent=node, kernels=[]),
                kernels=[Kernel("copy_kernel", 0, 3000.0)])
    linear = Ev(name="aten::linear", cpu_parent=Ev(name="## block 3 ##", cpu_parent=None, kernels=[]), kernels=[])
    mm = Ev(name="aten::mm", cpu_parent=linear, kernels=[Kernel("gemm", 0, 600.0), Kernel("gemm", 0, 600.0)])

    class FakeProfile:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return [node, expand, linear, mm]
    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []
    rows = ts.kernels_by_op(lambda: calls.append(1), top=5, steps=3)
    assert len(calls) == 4                                                  # one warm-up step, three profiled
    assert rows == [
        {"kernel": "copy_kernel", "op": "aten::expand", "owner": "SumBackward0", "calls_per_step": 0.3, "ms": 1.0},
        {"kernel": "gemm", "op": "aten::mm", "owner": "forward: ## block 3 ##", "calls_per_step": 0.7, "ms": 0.4}]
    assert ts.kernels_by_op(lambda: None, top=1, steps=3) == rows[:1]


def test_ab_step_alternates_the_codes_and_compares_their_medians(tmp_path):
    """ab_step.py runs the codes in the given order, alternations times over, and compares each code's median
    img/s with the first code's, leaving out failed rows; a --code that is not a source directory is refused."""
    import pytest

    from ab_step import compare, main, schedule
    assert schedule(["new", "old"], 2) == ["new_1", "old_1", "new_2", "old_2"]
    row = lambda ips, gpu=None: {"config": "c", "row": "step_loop", "img_s": ips, **({"gpu_ms": gpu} if gpu else {})}
    runs = {"new_1": [row(110.0, 9.0)], "old_1": [row(100.0)], "new_2": [row(130.0)],
            "old_2": [{"config": "c", "row": "step_loop", "error": "RuntimeError: ..."}], "new_3": [row(120.0)]}
    (entry,) = compare(runs, ["old", "new"])
    assert entry["old"] == {"img_s": [100.0], "gpu_ms": [], "median_img_s": 100.0, "ratio": 1.0}
    assert entry["new"]["img_s"] == [110.0, 130.0, 120.0] and entry["new"]["gpu_ms"] == [9.0]
    assert entry["new"]["median_img_s"] == 120.0 and entry["new"]["ratio"] == 1.2
    with pytest.raises(SystemExit):
        main(["--code", f"new={REPO / 'src'}", "--code", f"old={tmp_path}"])   # tmp_path holds no package mal


def test_kernel_report_compiles_the_attention_kernels_for_hopper_without_a_gpu():
    """kernel_report.py compiles each kernel as its op launches it, for sm_90, through Triton and its ptxas on this
    machine (no GPU): one row per kernel with its registers, shared memory and programs per multiprocessor; the
    driver it stands in for is put back after."""
    pytest.importorskip("triton")
    import kernel_report
    from triton.runtime import driver
    before = driver._active
    rows = kernel_report.report(["attention"], 90, 8192)
    assert driver._active is before
    assert sorted(r["kernel"] for r in rows) == ["_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_kernel",
                                                  "_attn_fwd_kernel"]
    for r in rows:
        assert 0 < r["regs"] <= 255 and r["smem"] > 0 and 1 <= r["ctas_per_sm"] <= 32, r
        assert r["launch"]["D"] == 32 and r["launch"]["IEEE"] is False                 # the decoder's bf16 heads of 32


def test_kernel_report_reads_conversions_and_occupancy_by_hand():
    """The TTGIR parser against a hand-written line, and programs per multiprocessor against hand arithmetic
    (registers go to a warp in blocks of 256; 65,536 registers, 228 KiB, 2,048 threads and 32 programs each)."""
    import kernel_report
    line = ("%s_95 = ttg.convert_layout %s_94 : tensor<64x128xf32, #mma> -> tensor<64x128xf32, #blocked> loc(#loc12)\n"
            "%x = ttg.convert_layout %y : tensor<16xf32, #blocked> -> tensor<16xf32, #blocked1> loc(#loc13)\n")
    assert kernel_report.conversions(line, 8192) == [{"tensor": "64x128xf32", "bytes": 32768, "from": "#mma",
                                                       "to": "#blocked"}]
    assert len(kernel_report.conversions(line, 1)) == 2
    assert kernel_report.ctas_per_sm(255, 4, 0) == 2              # 8,192 registers a warp, 32,768 a program
    assert kernel_report.ctas_per_sm(128, 4, 49408) == 4          # by registers 4, by shared memory 4
    assert kernel_report.ctas_per_sm(125, 4, 100_000) == 2        # shared memory bounds it
    assert kernel_report.ctas_per_sm(62, 1, 512) == 32            # the 32-program limit
