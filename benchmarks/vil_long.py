"""ViL forward + backward at high resolution through the whole model: the parallel mLSTM kernel vs the
chunkwise one.

At 512 px and 1024 px with 16-pixel patches, ViL's blocks see 1,024 and 4,096 tokens (4 heads; head dim 96 /
192 / 384 for --model mal_tiny / mal_small / mal_base). Each row builds the model (1000 classes; default MAL-S)
with `mlstm_backend` "triton" (parallel) or "chunkwise", switches
it to the fused fast path (compiled regions around the cell), and times one training step's forward + backward
(bf16 autocast, cross-entropy on random labels, no optimizer step) with CUDA events: median over --iters calls
after --warmup calls (compilation included there). Also the peak memory of a step, and the GPU's busy share of
it: the profiler's summed kernel time over the wall time (below 1: the GPU waits for the host). --graph adds
each row again with the step replayed from a CUDA graph, as the training loop runs it (`cuda_graph: true`): no
host work left. Prints JSON lines, then a markdown table with chunkwise / parallel ratios; --profile also prints
each row's kernels by GPU time and host operators by CPU time.

    PYTHONPATH=src python benchmarks/vil_long.py [--sizes 512 1024] [--batch 32 8] [--backends triton chunkwise]
        [--iters 20] [--warmup 5] [--json vil_long.json] [--profile] [--graph] [--model mal_small]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from throughput import cuda_times, graphed, warm_up  # benchmarks/ is this script's directory

GIB = 2**30


def build(backend: str, img: int, model: str = "mal_small") -> torch.nn.Module:
    """`model` (mal_tiny / mal_small / mal_base: head dim 96 / 192 / 384) at `img` px with the given mLSTM
    backend, on the fused fast path."""
    import mal
    return getattr(mal, model)(1000, img_size=img, mlstm_backend=backend).cuda().fast_path(compile=True)


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


def measure(backend: str, img: int, batch: int, warmup: int, iters: int, tables: bool = False,
            graph: bool = False, name: str = "mal_small") -> dict:
    """Median ms per forward + backward, images per second, the peak GiB of one step and the GPU's busy share
    (graph: of the step's CUDA-graph replay; its busy share is not measured)."""
    model = build(backend, img, name)
    model.train()
    step = step_fn(model, batch, img)
    warm_up(step, warmup)
    torch.cuda.reset_peak_memory_stats()                                    # the peak of the timed steps
    step = graphed(step, 2) if graph else step
    ms, _ = cuda_times(step, 0, iters)
    peak = torch.cuda.max_memory_allocated() / GIB
    if tables and not graph:
        print(f"--- {backend}, {img} px, batch {batch}", flush=True)
    busy = None if graph else round(kernel_ms(step, tables=tables) / ms, 3)
    grid = img // model.cfg.patch_size
    return {"model": name, "backend": backend, "graph": graph, "img": img, "tokens": grid * grid, "batch": batch,
            "fwd_bwd_ms": round(ms, 2), "img_s": round(batch / ms * 1e3, 1), "peak_gib": round(peak, 2),
            "gpu_busy": busy}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image sides in pixels")
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 8], help="batch per size (same order)")
    ap.add_argument("--backends", nargs="+", default=["triton", "chunkwise"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="print each row's kernels and host operators")
    ap.add_argument("--graph", action="store_true", help="also time each row replayed from a CUDA graph")
    ap.add_argument("--model", default="mal_small", choices=["mal_tiny", "mal_small", "mal_base"])
    args = ap.parse_args()
    if len(args.batch) != len(args.sizes):
        ap.error("give one --batch per --sizes entry")
    rows = []
    for img, batch in zip(args.sizes, args.batch):
        for backend, graph in ((b, g) for g in ((False, True) if args.graph else (False,)) for b in args.backends):
            try:
                row = measure(backend, img, batch, args.warmup, args.iters, args.profile, graph, args.model)
            except torch.cuda.OutOfMemoryError:
                row = {"backend": backend, "graph": graph, "img": img, "batch": batch, "error": "OOM"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    print(f"\n{torch.cuda.get_device_name()}, {args.model} fast path, bf16 autocast, forward + backward (no optimizer)\n")
    print("| px | tokens | batch | backend | CUDA graph | ms | img/s | peak GiB | GPU busy | vs triton |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {(r["img"], r["graph"]): r for r in rows if r.get("backend") == "triton" and "fwd_bwd_ms" in r}
    for r in rows:
        graph = "yes" if r["graph"] else "no"
        if "fwd_bwd_ms" not in r:
            print(f"| {r['img']} | | {r['batch']} | {r['backend']} | {graph} | {r['error']} | | | | |")
            continue
        ref = base.get((r["img"], r["graph"]))
        speed = f"{ref['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if ref else "-"
        busy = "-" if r["gpu_busy"] is None else f"{r['gpu_busy']:.2f}"
        print(f"| {r['img']} | {r['tokens']} | {r['batch']} | {r['backend']} | {graph} | {r['fwd_bwd_ms']} | "
              f"{r['img_s']} | {r['peak_gib']} | {busy} | {speed} |")


if __name__ == "__main__":
    main()
