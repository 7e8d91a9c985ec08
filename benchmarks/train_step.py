"""Where a training run's time goes: the library's own training step (eager vs CUDA-graphed) and its data loader.

For each config (default: the CIFAR-10 protocol's pretraining and supervised/fine-tuning recipes) it builds the
model, optimizer, loss and mixup exactly as `mal.train` does and measures, on one GPU:
  step_eager   img/s of a full optimizer step (forward + backward + clip + fused AdamW [+ EMA]) launched eagerly
  step_graph   the same with the forward + backward replayed from CUDA graphs (cuda_graph=true, the default)
  step_plain   fast_path=false (plain PyTorch ViL blocks, torch mLSTM), eager
  gpu_ms       GPU kernel time of one graphed step (torch.profiler): the floor a step cannot go below
  loader       img/s of the run's DataLoader (augmentation + collation + pinning) with --workers workers
Synthetic images feed the step (its speed does not depend on pixel values); the loader reads --data.

    PYTHONPATH=src python benchmarks/train_step.py --data data/cifar10 --workers 4,8,12 --json out.json

Prints JSON lines, then a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import top_kernels, warm_up  # noqa: E402

from mal.config import load_run_config  # noqa: E402
from mal.step import LossStep, StepRunner, make_optimizer  # noqa: E402
from mal.train import (SeededDataset, StepSampler, build_criterion, build_datasets, build_model,  # noqa: E402
                       enable_fast_path, param_groups)

NUM_CLASSES = 10


def build_step(cfg, graphs: bool):
    """A zero-argument callable running one optimizer step of `cfg` on synthetic data, as mal.train does."""
    device = torch.device("cuda")
    model = build_model(cfg, NUM_CLASSES).to(device).train()
    if cfg.fast_path:
        enable_fast_path(model, device, cfg.recompute)
    o = cfg.optim
    opt = make_optimizer(param_groups(model, o.weight_decay, o.layer_decay), o.abs_lr, o.betas, device)
    criterion, mixup = build_criterion(cfg, NUM_CLASSES)
    runner = StepRunner(LossStep(model, cfg.task, criterion), device, cfg.amp, graphs)
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.ema_decay)
    B, size = o.batch_size, cfg.model.img_size
    imgs = torch.randn(B, 3, size, size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (B,), device=device)
    draws = torch.Generator().manual_seed(0)
    it = [0]

    def step():
        if cfg.task == "pretrain":
            clusters, mask = model.sample_inputs(B, draws)
            clusters = clusters.pin_memory().to(device, non_blocking=True)
            extra = () if mask is None else (mask.pin_memory().to(device, non_blocking=True),)
            loss = runner(imgs, clusters, *extra)
        else:
            x, y = mixup(imgs.clone(), labels) if mixup is not None else (imgs, labels)
            loss = runner(x, y)
        loss.backward()
        if o.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model, step=it[0])
        it[0] += 1
    return step


def time_step(step, warmup: int, iters: int) -> tuple[float, float]:
    """Median wall-clock seconds per step (each ends with a device sync) over `iters` steps, and warm-up seconds."""
    warm = warm_up(step, warmup)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), warm


def bench_loader(cfg, workers: int, batches: int) -> float:
    """img/s of the run's training DataLoader (after its first batch)."""
    from torch.utils.data import DataLoader
    train, _, _ = build_datasets(cfg)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="configs/cifar10_pretrain.yaml,configs/cifar10_supervised.yaml")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every config")
    p.add_argument("--rows", default="step_graph,step_eager,step_plain")
    p.add_argument("--data", default="", help="ImageFolder root for the loader rows ('' = skip them)")
    p.add_argument("--workers", default="4,8")
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default="")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv)}
    print(json.dumps(info), flush=True)
    results = []
    for path in args.configs.split(","):
        over = [*args.set] + ([f"data.dataset={args.data}"] if args.data else [])
        cfg = load_run_config(path, over)
        name = Path(path).stem
        for row in args.rows.split(","):
            res = {"config": name, "row": row, "batch": cfg.optim.batch_size}
            try:
                c = load_run_config(path, over + (["fast_path=false"] if row == "step_plain" else []))
                step = build_step(c, graphs=row == "step_graph")
                sec, warm = time_step(step, args.warmup, args.iters)
                res.update(img_s=round(c.optim.batch_size / sec, 1), ms=round(sec * 1e3, 2), warmup_s=round(warm, 1),
                           peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
                if row == "step_graph":
                    prof = top_kernels(step, n=12)
                    res["gpu_ms"] = prof[0]["total_gpu_ms"]
                    res["profile"] = prof
                del step
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
    lines = ["| config | row | batch | img/s | ms/step | GPU ms/step | peak GiB | warm-up s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['config']} | {r['row']} | {r['batch']} | {r.get('img_s', r.get('error', '-'))} | "
                     f"{r.get('ms', '-')} | {r.get('gpu_ms', '-')} | {r.get('peak_gib', '-')} | {r.get('warmup_s', '-')} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
