"""What the gradient all-reduce costs inside a data-parallel pretraining step: the real `Trainer.train_step` under
torchrun (graphed steps and the flat all-reduce of `grad_sync: auto`, or DDP's hooks when eager), synthetic batches
on every process, torch.profiler over --steps steps after --warmup. Rank 0 writes one JSON row:

  step_ms        wall milliseconds per step while profiled (the profiler adds a little)
  comm_ms        time per step of the all-reduce: the GPU time of NCCL kernels (CUDA), or the host time of the
                 gloo all-reduce ops (CPU)
  comm_share     comm_ms / step_ms
  peak_gib       peak GPU memory of rank 0 (CUDA)

    torchrun --standalone --nproc_per_node=2 benchmarks/ddp_profile.py --config mal_base_pretrain \\
        --per-gpu-batch 64 --json prof.json

`benchmarks/ddp_scaling.py --profile-steps N` runs it for every GPU count and batch it measures.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import QUIET, build_step, synthetic_folder  # noqa: E402

from mal.config import load_run_config  # noqa: E402
from mal.distributed import cleanup, device_for, init_distributed  # noqa: E402

COMM_NAMES = ("nccl", "allreduce", "all_reduce")


def comm_ms(prof, steps: int, cuda: bool) -> float:
    """All-reduce milliseconds per step in a profile: device time of NCCL kernels on CUDA, host time of the
    collective ops otherwise (top-level events only, so nested ones are not counted twice)."""
    events = [e for e in prof.key_averages() if any(n in e.key.lower() for n in COMM_NAMES)]
    if cuda:
        total_us = sum(e.self_device_time_total for e in events)
    else:
        total_us = max((e.cpu_time_total for e in events), default=0.0)
    return total_us / 1e3 / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cifar10_pretrain")
    ap.add_argument("--per-gpu-batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", default="")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value")
    args = ap.parse_args()
    info = init_distributed()
    plain = load_run_config(args.config, args.set)
    data = synthetic_folder(plain.model.img_size, args.per_gpu_batch * info.world_size)
    cfg = load_run_config(args.config, [*args.set, f"data.dataset={data}", "data.cache=false", *QUIET,
                                        f"optim.batch_size={args.per_gpu_batch * info.world_size}"])
    step = build_step(cfg, Path(tempfile.mkdtemp(prefix="ddp_profile_")), info)
    dev = device_for(info)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        step_ms = (time.perf_counter() - t) / args.steps * 1e3
    comm = comm_ms(prof, args.steps, cuda)
    row = {"config": args.config, "gpus": info.world_size, "per_gpu_batch": args.per_gpu_batch,
           "step_ms": round(step_ms, 2), "comm_ms": round(comm, 3), "comm_share": round(comm / step_ms, 4),
           "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if cuda else None,
           "device": torch.cuda.get_device_name(dev) if cuda else "cpu"}
    if info.is_main:
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(row, indent=1))
    cleanup()


if __name__ == "__main__":
    main()
