"""Host time of a pretraining step's random draws (`MALPretrain.sample_inputs`: the cluster orders and the input
mask, drawn on the CPU before the step): single-patch clusters (k = 1, 143 input positions) against the default
k = 4 (8), at several intra-op thread counts. The training loop draws these on the host once per step; a GPU host
runs torch with one intra-op thread per core, while loader workers compete for the same cores (--busy N starts N
spinning processes to stand in for them).

    PYTHONPATH=src python benchmarks/mask_draw.py --threads 1,2,16 --busy 0,2 --json mask_draw.json

Prints JSON lines, then a markdown table (median and 90th percentile ms per draw, k = 1 over k = 4, and k = 1
drawn as the trainer draws it, inside `mal.engine.sampling.one_intra_op_thread`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch

from mal.config import load_run_config
from mal.engine.build import build_model
from mal.engine.sampling import one_intra_op_thread
from throughput import device_info  # benchmarks/ is this script's directory


def time_draws(k: int, batch: int, iters: int, one_thread: bool = False) -> list[float]:
    """Milliseconds of each of `iters` draws of `batch` samples (after 20 warm-up draws), imagenette_pretrain's
    objective with cluster size k; `one_thread`: inside `one_intra_op_thread`, as the trainer draws."""
    model = build_model(load_run_config("imagenette_pretrain", [f"model.cluster_size={k}"]), 0)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(20 + iters):
        t = time.perf_counter()
        with one_intra_op_thread() if one_thread else nullcontext():
            model.sample_inputs(batch, g)
        out.append((time.perf_counter() - t) * 1e3)
    return out[20:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2,16", help="intra-op thread counts (torch.set_num_threads)")
    ap.add_argument("--busy", default="0", help="numbers of spinning processes competing for the cores")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    info = device_info(gpu=False)
    print(json.dumps(info), flush=True)
    rows = []
    for busy in map(int, args.busy.split(",")):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            for threads in map(int, args.threads.split(",")):
                torch.set_num_threads(threads)
                row = {"threads": threads, "busy": busy, "batch": args.batch, "torch": torch.__version__}
                for name, k, one in (("k4", 4, False), ("k1", 1, False), ("k1_one_thread", 1, True)):
                    ms = sorted(time_draws(k, args.batch, args.iters, one))
                    row[f"{name}_median_ms"] = statistics.median(ms)
                    row[f"{name}_p90_ms"] = ms[int(0.9 * len(ms))]
                row["k1_over_k4"] = row["k1_median_ms"] / row["k4_median_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            for p in hogs:
                p.kill()
                p.wait()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": info, "results": rows}, f, indent=1)
    print(f"\nbatch {args.batch}, ms per draw, median (p90)\n")
    print("| intra-op threads | busy processes | k = 4 | k = 1 | k = 1 / k = 4 | k = 1 on one thread (the trainer) |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['busy']} | {r['k4_median_ms']:.2f} ({r['k4_p90_ms']:.2f}) | "
              f"{r['k1_median_ms']:.2f} ({r['k1_p90_ms']:.2f}) | {r['k1_over_k4']:.1f}x | "
              f"{r['k1_one_thread_median_ms']:.2f} ({r['k1_one_thread_p90_ms']:.2f}) |")


if __name__ == "__main__":
    main()
