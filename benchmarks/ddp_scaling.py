"""Multi-GPU scaling of MAL pretraining: the same per-GPU batch on 1 GPU and on N GPUs (torchrun, DDP).

Prints JSON and a markdown table: steady-state img/s (total and per GPU), scaling efficiency, peak
step time, and whether the loss curves agree when compared at the same number of images seen.

    python benchmarks/ddp_scaling.py --gpus 2 --steps 300 --per-gpu-batch 256 --data data/cifar10
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(nproc: int, args, out: Path) -> float:
    overrides = [f"data.dataset={args.data}", f"optim.batch_size={args.per_gpu_batch * nproc}",
                 f"max_steps={args.steps}", "probe=false", f"log_every={args.log_every}", "save_every=100000",
                 f"optim.warmup_epochs={args.warmup_epochs}", f"data.num_workers={args.workers}", *args.set]
    mal = ["-m", "mal", "pretrain", "--config", args.config, "--output", str(out), "--overwrite", "--no-progress",
           *overrides]
    if nproc == 1:
        cmd = [sys.executable, *mal]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *mal]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    if nproc == 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = "0"
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return time.time() - t0


def read(out: Path) -> list[dict]:
    return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(open(out / "metrics.csv"))]


def steady_ips(rows: list[dict], steps: int) -> float:
    """Median img/s of the log windows after the first 20 % of the steps (compile and warm-up excluded)."""
    vals = [r["img_per_s"] for r in rows if "img_per_s" in r and r["step"] > steps * 0.2]
    return statistics.median(vals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--per-gpu-batch", type=int, default=256)
    ap.add_argument("--data", default="data/cifar10")
    ap.add_argument("--config", default="cifar10_pretrain")
    ap.add_argument("--out", default="runs/ddp_scaling")
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--warmup-epochs", type=float, default=0.5)
    ap.add_argument("--json", default="")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value")
    args = ap.parse_args()
    out = Path(args.out)
    wall = {1: run(1, args, out / "gpu1"), args.gpus: run(args.gpus, args, out / f"gpu{args.gpus}")}
    one, many = read(out / "gpu1"), read(out / f"gpu{args.gpus}")
    ips1, ipsn = steady_ips(one, args.steps), steady_ips(many, args.steps)
    # loss at equal images seen: N-GPU step k has seen as many images as 1-GPU step N*k
    loss1 = {int(r["step"]): r["loss"] for r in one if "loss" in r}
    pairs = [(r["loss"], loss1[int(r["step"]) * args.gpus]) for r in many
             if "loss" in r and int(r["step"]) * args.gpus in loss1]
    rel = [abs(a - b) / b for a, b in pairs]
    res = {"gpus": args.gpus, "per_gpu_batch": args.per_gpu_batch, "steps": args.steps,
           "img_s_1gpu": ips1, f"img_s_{args.gpus}gpu": ipsn, "img_s_per_gpu": ipsn / args.gpus,
           "scaling_efficiency": ipsn / (args.gpus * ips1), "wall_s": wall,
           "final_loss_1gpu": one[-1]["loss"], f"final_loss_{args.gpus}gpu": many[-1]["loss"],
           "loss_pairs_at_equal_images": len(pairs), "max_rel_loss_diff_second_half": max(rel[len(rel) // 2:], default=None),
           "loss_curve_1gpu": [(int(r["step"]), r["loss"]) for r in one if "loss" in r],
           f"loss_curve_{args.gpus}gpu": [(int(r["step"]), r["loss"]) for r in many if "loss" in r]}
    print(json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(f"\n| GPUs | global batch | img/s | img/s per GPU | efficiency |\n|---|---|---|---|---|\n"
          f"| 1 | {args.per_gpu_batch} | {ips1:.0f} | {ips1:.0f} | 1.00 |\n"
          f"| {args.gpus} | {args.per_gpu_batch * args.gpus} | {ipsn:.0f} | {ipsn / args.gpus:.0f} | "
          f"{res['scaling_efficiency']:.2f} |")
    if rel:
        print(f"loss at equal images seen ({len(pairs)} points): max relative difference over the second half "
              f"{res['max_rel_loss_diff_second_half']:.3f}; final {res['final_loss_1gpu']:.4f} (1 GPU) vs "
              f"{res[f'final_loss_{args.gpus}gpu']:.4f} ({args.gpus} GPUs)")


if __name__ == "__main__":
    main()
