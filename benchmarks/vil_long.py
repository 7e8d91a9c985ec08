"""ViL-S forward + backward at high resolution through the whole model: the parallel mLSTM kernel vs the
chunkwise one.

At 512 px and 1024 px with 16-pixel patches, ViL-S's blocks see 1,024 and 4,096 tokens (DH 192, 4 heads). Each
row builds MAL-S (`mal_small`, 1000 classes) with `mlstm_backend` "triton" (parallel) or "chunkwise", switches
it to the fused fast path (compiled regions around the cell, no CUDA graph), and times one training step's
forward + backward (bf16 autocast, cross-entropy on random labels, no optimizer step) with CUDA events:
median over --iters calls after --warmup calls (compilation included there). Also the peak memory of a step,
and the GPU's busy share of it: the profiler's summed kernel time over the wall time (below 1: the GPU waits for
the host). Prints JSON lines, then a markdown table with chunkwise / parallel ratios; --profile also prints each
row's kernels by GPU time and host operators by CPU time.

    PYTHONPATH=src python benchmarks/vil_long.py [--sizes 512 1024] [--batch 32 8] [--backends triton chunkwise]
        [--iters 20] [--warmup 5] [--json vil_long.json] [--profile]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from throughput import cuda_times, warm_up  # benchmarks/ is this script's directory

GIB = 2**30


def build(backend: str, img: int) -> torch.nn.Module:
    """MAL-S at `img` px with the given mLSTM backend, on the fused fast path."""
    from mal import mal_small
    model = mal_small(1000, img_size=img, mlstm_backend=backend).cuda()
    return model.fast_path(compile=True)


def step_fn(model, batch: int, img: int):
    """One forward + backward of a training step on fixed random images and labels."""
    x = torch.randn(batch, 3, img, img, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    return step


def kernel_ms(step, iters: int = 3, tables: bool = False) -> float:
    """The summed GPU kernel milliseconds per step (profiler); `tables`: print the kernels by GPU time and the host
    operators by CPU time."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    stats = prof.key_averages()
    if tables:
        for key in ("self_device_time_total", "self_cpu_time_total"):
            print(stats.table(sort_by=key, row_limit=15, max_name_column_width=60), flush=True)
    return sum(e.self_device_time_total for e in stats if e.device_type == torch.autograd.DeviceType.CUDA) / iters / 1e3


def measure(backend: str, img: int, batch: int, warmup: int, iters: int, tables: bool = False) -> dict:
    """Median ms per forward + backward, images per second, the peak GiB of one step and the GPU's busy share."""
    model = build(backend, img)
    model.train()
    step = step_fn(model, batch, img)
    warm_up(step, warmup)
    torch.cuda.reset_peak_memory_stats()                                    # the peak of the timed steps
    ms, _ = cuda_times(step, 0, iters)
    peak = torch.cuda.max_memory_allocated() / GIB
    if tables:
        print(f"--- {backend}, {img} px, batch {batch}", flush=True)
    busy = kernel_ms(step, tables=tables) / ms
    grid = img // model.cfg.patch_size
    return {"backend": backend, "img": img, "tokens": grid * grid, "batch": batch, "fwd_bwd_ms": round(ms, 2),
            "img_s": round(batch / ms * 1e3, 1), "peak_gib": round(peak, 2), "gpu_busy": round(busy, 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image sides in pixels")
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 8], help="batch per size (same order)")
    ap.add_argument("--backends", nargs="+", default=["triton", "chunkwise"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="print each row's kernels and host operators")
    args = ap.parse_args()
    if len(args.batch) != len(args.sizes):
        ap.error("give one --batch per --sizes entry")
    rows = []
    for img, batch in zip(args.sizes, args.batch):
        for backend in args.backends:
            try:
                row = measure(backend, img, batch, args.warmup, args.iters, args.profile)
            except torch.cuda.OutOfMemoryError:
                row = {"backend": backend, "img": img, "batch": batch, "error": "OOM"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    print(f"\n{torch.cuda.get_device_name()}, MAL-S fast path, bf16 autocast, forward + backward (no optimizer)\n")
    print("| px | tokens | batch | backend | ms | img/s | peak GiB | GPU busy | vs triton |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {r["img"]: r for r in rows if r.get("backend") == "triton" and "fwd_bwd_ms" in r}
    for r in rows:
        if "fwd_bwd_ms" not in r:
            print(f"| {r['img']} | | {r['batch']} | {r['backend']} | {r['error']} | | | | |")
            continue
        ref = base.get(r["img"])
        speed = f"{ref['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if ref else "-"
        print(f"| {r['img']} | {r['tokens']} | {r['batch']} | {r['backend']} | {r['fwd_bwd_ms']} | {r['img_s']} | "
              f"{r['peak_gib']} | {r['gpu_busy']:.2f} | {speed} |")


if __name__ == "__main__":
    main()
