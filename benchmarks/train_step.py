"""Where a training run's time goes: the library's own training step (eager vs CUDA-graphed) and its data loader.

For each config (default: the CIFAR-10 protocol's pretraining and supervised/fine-tuning recipes) it builds the
run's `mal.engine.Trainer` (model, optimizer, loss, mixup, EMA as configured) and times `Trainer.train_step`, the
step `mal pretrain` / `mal finetune` run, on one GPU:
  step_eager   img/s of a full optimizer step (forward + backward + clip + fused AdamW [+ EMA]) launched eagerly
  step_graph   the same with the forward + backward replayed from CUDA graphs (cuda_graph=true, the default)
  step_loop    step_graph's steps back to back, one device sync at the end, as the training loop runs them:
               when it beats step_graph the host's launch work overlaps the GPU; the floor is gpu_ms. Also
               host_ms (host wall time of a step that does not wait for the GPU: with no hidden sync it is the
               launch work alone) and host_ops (the profiler's top host ops by self time per step)
  step_whole   graph_optimizer=true: forward, backward, clip and AdamW in one graph per step (EMA eager);
               step_whole_loop: the same back to back, as step_loop
  step_plain   fast_path=false (plain PyTorch ViL blocks, torch mLSTM), eager
  step_ops     step_eager, with its --profile-top kernels by GPU time, each named with the PyTorch op that launched
               it and the autograd node (backward) or outermost op (forward) above that: who owns the kernels that
               step_graph's profile names only by kernel (a graphed step's kernels are the eager step's)
  fit          the real training loop (`Trainer.fit`: loader with --fit-workers workers, logging, EMA, checkpoints
               at the config's intervals; no evaluations or probes) for --fit-steps steps: the median img/s of its
               10-step windows after the first 20 %, and their 10th / 90th percentiles. fit_whole: with
               graph_optimizer=true. Compare with step_loop, the same steps without the loop around them
  loader       img/s of the run's DataLoader (augmentation + collation + pinning) with --workers workers (with --data)
and columns:
  gpu_ms       (step_graph) GPU kernel time of one graphed step (torch.profiler): the floor a step cannot go below,
               with its --profile-top kernels by time
  gflop_img    model FLOPs of one training image (forward + backward; torch's FlopCounterMode on the plain
               path: matmuls, attention, the mLSTM cell's parallel form), and each row's tflops and mfu
               against --peak-tflops (989 for an H100/H200's dense bf16)
Synthetic images feed the step (its speed does not depend on pixel values); the loader reads --data. Without
--data the trainers are built on a small synthetic image folder (the step rows need no data set).

    PYTHONPATH=src python benchmarks/train_step.py --data data/cifar10 --workers 4,8,12 --json out.json

Prints JSON lines, then a markdown table.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402
from ddp_scaling import read, steady_windows  # noqa: E402
from throughput import top_kernels, warm_up  # noqa: E402

from mal.config import load_run_config  # noqa: E402
from mal.distributed import DistInfo  # noqa: E402
from mal.engine import Trainer  # noqa: E402
from mal.engine.build import build_datasets  # noqa: E402
from mal.engine.sampling import SeededDataset, StepSampler  # noqa: E402
from mal.engine.trainer import enable_fast_path  # noqa: E402

QUIET = ["log_every=1000000", "save_every=1000000", "eval_every=1000000", "probe=false", "data.num_workers=0"]


def build_step(cfg, run_dir: Path, info: DistInfo | None = None, compile_mode: str | None = None):
    """A zero-argument callable running one `Trainer.train_step` of `cfg` on synthetic device batches (`info`: this
    process of a torchrun job; default one process). compile_mode: the fast path's regions and block stacks under
    torch.compile(mode=compile_mode) instead of the default mode (rows with fast_path=false keep the plain path)."""
    trainer = Trainer(cfg, run_dir, info or DistInfo(), progress=False)
    if compile_mode and cfg.fast_path:
        enable_fast_path(trainer.model, trainer.device, mode=compile_mode, checkpoint=cfg.recompute,
                         recompute_qkv=cfg.recompute_qkv)
    trainer.begin()
    B, size, dev = trainer.micro, cfg.model.img_size, trainer.device
    batch = (torch.randn(B, 3, size, size, device=dev), torch.randint(0, trainer.num_classes or 10, (B,), device=dev))
    batches = itertools.repeat(batch)
    return lambda: trainer.train_step(batches)


def step_flops(path: str, over: list[str], batch: int = 4) -> float:
    """Model FLOPs per image of one training step of config `path` (forward + backward), counted on the plain
    eager path in float32 with a batch of `batch`, a ViL's mLSTM cell in its torch form (the counter does not see
    a Triton kernel's arithmetic); the fused kernels do the same arithmetic."""
    from torch.utils.flop_counter import FlopCounterMode
    c = load_run_config(path, over + QUIET + ["fast_path=false", "cuda_graph=false", "amp=false",
                                              f"optim.batch_size={batch}", "optim.accum_steps=1"])
    if c.model.arch == "vil":
        c.model.mlstm_backend = "torch"                     # a valid backend of every ViL config
    step = build_step(c, Path(tempfile.mkdtemp(prefix=f"train_step_{Path(path).stem}_flops_")))
    step()                                                  # lazy state (optimizer, EMA) outside the count
    with FlopCounterMode(display=False) as counter:
        step()
    ops = counter.get_flop_counts()["Global"]
    total = sum(ops.values())
    if torch.ops.aten.convolution_backward in ops:         # the counter ignores `groups` in the backward of the
        total += 2 * ops.get(torch.ops.aten.convolution, 0) - ops[torch.ops.aten.convolution_backward]  # depthwise
    return total / batch / 1e9                                                                          # conv


def synthetic_folder(size: int, images: int, classes: int = 10) -> Path:
    """A throwaway ImageFolder (train/ and val/, `classes` classes, at least `images` random `size` px PNGs in
    train/) for building trainers."""
    per_class = -(-images // classes)
    from PIL import Image
    root = Path(tempfile.mkdtemp(prefix="train_step_data_"))
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for j in range(per_class):
                px = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(root / split / f"c{c}" / f"{j}.png")
    return root


def random_init(cfg) -> str:
    """A randomly initialized encoder as a bare .safetensors, the `init` a fine-tuning config needs (the step's
    speed does not depend on the weights)."""
    from safetensors.torch import save_file

    from mal.models import create_encoder
    path = Path(tempfile.mkdtemp(prefix="train_step_init_")) / "encoder.safetensors"
    enc = create_encoder(cfg.model, num_classes=0)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    return str(path)


def time_step(step, warmup: int, iters: int, sync_each: bool = True) -> tuple[float, float]:
    """Median wall-clock seconds per step (each ends with a device sync) over `iters` steps, and warm-up seconds;
    without `sync_each`, the mean over `iters` steps run back to back (one sync at the end)."""
    warm = warm_up(step, warmup)
    if not sync_each:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / iters, warm
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), warm


def host_time(step, n: int = 3) -> float:
    """Host milliseconds per call of `step` right after a device sync, without waiting for the device: the launch
    work alone, unless something in the step synchronizes (then the device's time shows up here)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    ms = (time.perf_counter() - t) / n * 1e3
    torch.cuda.synchronize()
    return ms


def host_ops(step, steps: int = 5, top: int = 15) -> list[dict]:
    """The host ops with the most self CPU time per step (torch.profiler, CPU activity only)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key[:100], "calls_per_step": e.count / steps,
             "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3)} for e in ev]


def owner(ev) -> str:
    """The autograd node an op ran under (the nearest 'autograd::engine::evaluate_function: X' above it: 'X'), or,
    outside the backward, 'forward: ' and the outermost op above it (a module's or a record_function's name)."""
    outer = ev
    while ev.cpu_parent is not None:
        ev = ev.cpu_parent
        if ev.name.startswith("autograd::engine::evaluate_function: "):
            return ev.name.split(": ", 1)[1]
        outer = ev
    return "forward: " + outer.name


def kernels_by_op(step, top: int, steps: int = 3) -> list[dict]:
    """The `top` (kernel, op, owner) triples of an eager step by GPU ms per step: each kernel with the op the
    profiler correlates its launch with (the innermost op or record_function active at the launch: for a Triton
    kernel launched from Python, the autograd Function around it) and that op's `owner`. A kernel launched with no
    op active is not listed."""
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    ms, calls = collections.Counter(), collections.Counter()
    for ev in prof.events():
        for k in ev.kernels:
            key = (k.name[:100], ev.name, owner(ev))
            ms[key] += k.duration / 1e3 / steps
            calls[key] += 1 / steps
    return [{"kernel": k, "op": op, "owner": own, "calls_per_step": round(calls[k, op, own], 1), "ms": round(t, 3)}
            for (k, op, own), t in ms.most_common(top)]


def bench_loader(cfg, workers: int, batches: int) -> float:
    """img/s of the run's training DataLoader (after its first batch)."""
    from torch.utils.data import DataLoader
    train = build_datasets(cfg).train
    B = cfg.optim.batch_size
    sampler = StepSampler(len(train), B, 1, 0, cfg.seed)
    loader = DataLoader(SeededDataset(train, cfg.seed), batch_size=B, sampler=sampler, num_workers=workers,
                        pin_memory=True, drop_last=True)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * B / (time.perf_counter() - t0)


# each row's overrides on top of the config
ROW_OVERRIDES = {"step_plain": ["fast_path=false", "cuda_graph=false"], "step_eager": ["cuda_graph=false"],
                 "step_ops": ["cuda_graph=false"],
                 "step_whole": ["graph_optimizer=true"], "step_whole_loop": ["graph_optimizer=true"],
                 "fit_whole": ["graph_optimizer=true"]}


def measure_fit(path: str, row: str, over: list[str], args) -> dict:
    """A fit row (the module docstring): `Trainer.fit` of config `path` for --fit-steps steps, read back from its
    metrics.csv."""
    extra = ["probe=false", "eval_every=1000000", "log_every=10", f"max_steps={args.fit_steps}",
             f"data.num_workers={args.fit_workers}", *ROW_OVERRIDES.get(row, [])]
    run_dir = Path(tempfile.mkdtemp(prefix=f"train_step_{Path(path).stem}_{row}_"))
    Trainer(load_run_config(path, over + extra), run_dir, DistInfo(), progress=False).fit()
    ips = steady_windows(read(run_dir), args.fit_steps)
    deciles = statistics.quantiles(ips, n=10, method="inclusive")   # within the windows seen, never beyond
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return dict(img_s=round(statistics.median(ips), 1), p10=round(deciles[0], 1), p90=round(deciles[-1], 1),
                windows=len(ips), peak_gib=round(peak, 2))


def measure_row(path: str, row: str, over: list[str], args) -> dict:
    """One step row of config `path` with overrides `over`: img/s, ms, peak memory (+ host or kernel profile)."""
    c = load_run_config(path, over + QUIET + ROW_OVERRIDES.get(row, []))
    step = build_step(c, Path(tempfile.mkdtemp(prefix=f"train_step_{Path(path).stem}_{row}_")),
                      compile_mode=args.compile_mode)
    loop = row.endswith("_loop")
    sec, warm = time_step(step, args.warmup, args.iters, sync_each=not loop)
    res = dict(img_s=round(c.optim.batch_size / sec, 1), ms=round(sec * 1e3, 2), warmup_s=round(warm, 1),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    if loop:
        res["host_ms"] = round(host_time(step), 2)
        res["host_ops"] = host_ops(step)
    if row == "step_graph":
        throughput.ARGS = argparse.Namespace(profile_top=args.profile_top)
        prof = top_kernels(step)
        res["gpu_ms"] = prof[0]["total_gpu_ms"]
        res["profile"] = prof
    if row == "step_ops":
        res["kernel_ops"] = kernels_by_op(step, args.profile_top)
    return res


def table(results: list[dict]) -> str:
    lines = ["| config | row | batch | img/s | ms/step | GPU ms/step | host ms/step | TFLOP/s | MFU | peak GiB | warm-up s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [r.get("img_s", r.get("error", "-")),
                 *(r.get(k, "-") for k in ("ms", "gpu_ms", "host_ms", "tflops", "mfu", "peak_gib", "warmup_s"))]
        lines.append(f"| {r['config']} | {r['row']} | {r['batch']} | " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="cifar10_pretrain,cifar10_supervised")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every config")
    p.add_argument("--rows", default="step_graph,step_loop,step_whole,step_whole_loop,step_eager,step_plain")
    p.add_argument("--data", default="", help="ImageFolder root for the loader rows ('' = skip them)")
    p.add_argument("--workers", default="4,8")
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--fit-steps", type=int, default=300, help="steps of each fit row")
    p.add_argument("--fit-workers", type=int, default=12, help="loader workers of the fit rows")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for the MFU")
    p.add_argument("--profile-top", type=int, default=12,
                   help="kernels listed in the step_graph row's profile and the step_ops row's")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the fast path's compiled regions in the step rows, e.g. "
                        "max-autotune-no-cudagraphs (default: torch's default mode, as the trainer runs)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    info = throughput.device_info()
    print(json.dumps(info), flush=True)
    results = []
    for path in args.configs.split(","):
        plain = load_run_config(path, args.set)
        data = args.data or synthetic_folder(plain.model.img_size, plain.optim.batch_size)
        over = [*args.set, f"data.dataset={data}", *([] if args.data else ["data.cache=false"])]
        cfg = load_run_config(path, over)
        if cfg.task == "finetune" and not cfg.init:
            over.append(f"init={random_init(cfg)}")
        name = Path(path).stem
        gflop = step_flops(path, over)
        for row in args.rows.split(","):
            res = {"config": name, "row": row, "batch": cfg.optim.batch_size, "gflop_img": round(gflop, 2)}
            try:
                res.update((measure_fit if row.startswith("fit") else measure_row)(path, row, over, args))
                res["tflops"] = round(res["img_s"] * gflop / 1e3, 1)
                res["mfu"] = round(res["tflops"] / args.peak_tflops, 3)
            except Exception as e:  # noqa: BLE001 - a broken row must not lose the others
                res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            print(json.dumps(res), flush=True)
            results.append(res)
        if args.data:
            for w in map(int, args.workers.split(",")):
                ips = bench_loader(cfg, w, args.loader_batches)
                res = {"config": name, "row": f"loader_{w}w", "batch": cfg.optim.batch_size, "img_s": round(ips, 1)}
                print(json.dumps(res), flush=True)
                results.append(res)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
