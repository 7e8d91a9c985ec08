"""Multi-GPU scaling of MAL pretraining: the same per-GPU batch on 1 GPU and on N GPUs (torchrun, DDP), for every
GPU count in --gpus and every per-GPU batch in --per-gpu-batch.

Each run is `mal pretrain` for --steps steps on --data (the real loader). Prints JSON and a markdown table:
steady-state img/s (total and per GPU), scaling efficiency against one GPU at the same per-GPU batch, peak GPU
memory, the loss of N GPUs against one at equal images seen and, with --profile-steps, the all-reduce time per
step from a profile (`benchmarks/ddp_profile.py`).

    python benchmarks/ddp_scaling.py --gpus 2 --steps 300 --per-gpu-batch 256 --data data/cifar10
    python benchmarks/ddp_scaling.py --config mal_base_pretrain --gpus 2,4,8 --per-gpu-batch 64,256 \
        --data data/imagenet-jpeg --workers 15 --profile-steps 10 --json ddp_b.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def launcher(nproc: int) -> list[str]:
    """The command prefix that starts `nproc` processes (plain python for one)."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def environment(nproc: int) -> dict[str, str]:
    env = {**os.environ, **ENV}
    if nproc == 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = "0"
    return env


def run(nproc: int, batch: int, args, out: Path) -> float:
    """`mal pretrain` on `nproc` GPUs at `batch` images per GPU into `out`; returns the wall seconds."""
    overrides = [f"data.dataset={args.data}", f"optim.batch_size={batch * nproc}",
                 f"max_steps={args.steps}", "probe=false", f"log_every={args.log_every}", "save_every=100000",
                 f"optim.warmup_epochs={args.warmup_epochs}", f"data.num_workers={args.workers}", *args.set]
    cmd = [*launcher(nproc), "-m", "mal", "pretrain", "--config", args.config, "--output", str(out), "--overwrite",
           "--no-progress", *overrides]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, env=environment(nproc), cwd=REPO)
    return time.time() - t0


def profile_comm(nproc: int, batch: int, args) -> dict:
    """benchmarks/ddp_profile.py's row for `nproc` processes at `batch` images per GPU."""
    out = Path(tempfile.mkdtemp(prefix="ddp_profile_")) / "row.json"
    cmd = [*launcher(nproc), str(REPO / "benchmarks/ddp_profile.py"), "--config", args.config, "--per-gpu-batch",
           str(batch), "--steps", str(args.profile_steps), "--json", str(out), *(["--set", *args.set] if args.set else [])]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=environment(nproc), cwd=REPO)
    return json.loads(out.read_text())


def read(out: Path) -> list[dict]:
    return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(open(out / "metrics.csv"))]


def steady_windows(rows: list[dict], steps: int) -> list[float]:
    """img/s of the log windows after the first 20 % of the steps (compile and warm-up excluded)."""
    return [r["img_per_s"] for r in rows if "img_per_s" in r and r["step"] > steps * 0.2]


def steady_ips(rows: list[dict], steps: int) -> float:
    """Median img/s of `steady_windows`."""
    return statistics.median(steady_windows(rows, steps))


def measure(nproc: int, batch: int, args, one: list[dict] | None) -> dict:
    """One row: img/s, peak memory and (against the one-GPU run's metrics `one`) the loss at equal images seen."""
    out = Path(args.out) / f"b{batch}_gpu{nproc}"
    wall = run(nproc, batch, args, out)
    rows = read(out)
    summary = json.loads((out / "summary.json").read_text())
    row = {"gpus": nproc, "per_gpu_batch": batch, "global_batch": batch * nproc, "img_s": steady_ips(rows, args.steps),
           "peak_gib": summary.get("peak_gpu_gib"), "wall_s": round(wall, 1), "final_loss": rows[-1]["loss"],
           "loss_curve": [(int(r["step"]), r["loss"]) for r in rows if "loss" in r], "metrics": rows}
    if one is not None:      # N-GPU step k has seen as many images as 1-GPU step N*k
        loss1 = {int(r["step"]): r["loss"] for r in one if "loss" in r}
        rel = [abs(r["loss"] - loss1[int(r["step"]) * nproc]) / loss1[int(r["step"]) * nproc] for r in rows
               if "loss" in r and int(r["step"]) * nproc in loss1]
        row.update(loss_pairs=len(rel), max_rel_loss_diff_second_half=max(rel[len(rel) // 2:], default=None))
    if args.profile_steps:
        prof = profile_comm(nproc, batch, args)
        row.update(step_ms_profiled=prof["step_ms"], comm_ms=prof["comm_ms"], comm_share=prof["comm_share"])
    return row


def table(rows: list[dict]) -> str:
    lines = ["| per-GPU batch | GPUs | global batch | img/s | img/s per GPU | efficiency | peak GiB | all-reduce ms / step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        comm = f"{r['comm_ms']:.2f} ({100 * r['comm_share']:.1f} %)" if "comm_ms" in r else "–"
        lines.append(f"| {r['per_gpu_batch']} | {r['gpus']} | {r['global_batch']} | {r['img_s']:.0f} | "
                     f"{r['img_s'] / r['gpus']:.0f} | {r['efficiency']:.2f} | {r['peak_gib'] or '–'} | {comm} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="2", help="comma-separated GPU counts, each measured against one GPU")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--per-gpu-batch", default="256", help="comma-separated images per GPU")
    ap.add_argument("--data", default="data/cifar10")
    ap.add_argument("--config", default="cifar10_pretrain")
    ap.add_argument("--out", default="runs/ddp_scaling")
    ap.add_argument("--workers", type=int, default=6, help="loader workers per process")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--warmup-epochs", type=float, default=0.5)
    ap.add_argument("--profile-steps", type=int, default=0, help="also profile this many steps per row: the "
                    "all-reduce time per step (benchmarks/ddp_profile.py, synthetic batches)")
    ap.add_argument("--json", default="")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value")
    args = ap.parse_args()
    counts = [int(n) for n in args.gpus.split(",") if int(n) > 1]
    results = []
    for batch in (int(b) for b in args.per_gpu_batch.split(",")):
        one = measure(1, batch, args, None)
        rows = [one] + [measure(n, batch, args, one["metrics"]) for n in counts]
        for r in rows:
            r["efficiency"] = r["img_s"] / (r["gpus"] * one["img_s"])
            print(json.dumps({k: v for k, v in r.items() if k != "metrics"}), flush=True)
        results += rows
    for r in results:
        del r["metrics"]
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "config": args.config,
                                               "steps": args.steps, "rows": results}, indent=1))
    print("\n" + table(results))

if __name__ == "__main__":
    main()
