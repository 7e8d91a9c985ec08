"""Training loops: MAL pretraining, fine-tuning and supervised training, on one process or many (DDP).

Determinism: a step's global batch is a slice of a (seed, epoch) permutation, every sample's
augmentation is seeded by (seed, epoch, index), and the pretraining draws (cluster sequences, input
masks) are made for the whole global batch from one generator. So the run's weights do not depend
on the number of processes, the gradient accumulation or on being killed and resumed.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
import math
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from . import data as mdata
from .checkpoint import load_encoder, load_weights, read_meta, save_checkpoint
from .config import RunConfig, to_dict
from .distributed import DistInfo, all_reduce_sum, barrier, device_for
from .evaluate import (autocast_for, evaluate_classifier, extract_features, knn_accuracy, linear_probe_accuracy)
from .objectives.mal import MALPretrain
from .serialization import patchify, unpatchify
from .step import LossStep, StepRunner, adapt_loaded_optimizer, graphs_usable, make_optimizer
from .viz import plot_curves, save_prediction_grid
from .models.vil import ViLBlock, VisionLSTM

log = logging.getLogger("mal")
SEED_STRIDE = 1_000_003
MODEL_KEYS_MUST_MATCH = ("dim", "depth", "patch_size", "in_chans", "num_heads", "expansion", "qkv_block_size",
                         "conv_kernel_size")


# ----------------------------------------------------------------------------- data plumbing
class SeededDataset(Dataset):
    """Wraps a dataset; item (epoch, i) seeds python/numpy/torch RNGs from (seed, epoch, i) before loading i."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        s = (self.seed * SEED_STRIDE + epoch) * SEED_STRIDE + index
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)
        return self.dataset[index]


class StepSampler(Sampler):
    """This process's share of the (seed, epoch) permutation, resumable at a micro-batch offset.

    The epoch keeps a whole number of global batches; process r takes positions r, r+W, r+2W, ...,
    so optimizer step s always trains on positions [s*B, (s+1)*B) of the permutation.
    """

    def __init__(self, n: int, global_batch: int, world: int, rank: int, seed: int):
        self.n, self.global_batch, self.world, self.rank, self.seed = n, global_batch, world, rank, seed
        self.usable = n // global_batch * global_batch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)[:self.usable]
        mine = perm[self.rank::self.world][self.start:].tolist()
        return iter([(self.epoch, i) for i in mine])

    def __len__(self) -> int:
        return self.usable // self.world - self.start


def build_datasets(cfg: RunConfig, progress: bool = True) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """(train set with training augmentation, val set with eval transform, train set with eval transform)."""
    d, m = cfg.data, cfg.model
    if cfg.task == "pretrain":
        train_tf = mdata.pretrain_transform(m.img_size, d.mean, d.std, scale=(d.crop_min_scale, 1.0))
    else:
        a = cfg.aug
        train_tf = mdata.finetune_transform(m.img_size, d.mean, d.std, auto_augment=a.auto_augment or None,
                                            re_prob=a.reprob, scale=(a.crop_min_scale, 1.0))
    eval_tf = mdata.eval_transform(m.img_size, d.mean, d.std, crop_pct=d.eval_crop_pct)
    kw = dict(strict=d.strict, cache=d.cache)
    if d.dataset != "default":
        kw.update(progress=progress, **({"cache_dir": d.cache_dir} if d.cache_dir else {}))
    train = mdata.build_dataset(d.dataset, d.train_split, train_tf, **kw)
    val = mdata.build_dataset(d.dataset, d.val_split, eval_tf, **kw) if d.val_split else None
    train_eval = None
    if cfg.task == "pretrain" and cfg.probe:
        train_eval = copy.copy(train)                   # same files (and decode cache), eval transform
        train_eval.transform = eval_tf
    return train, val, train_eval


def eval_loader(ds: Dataset, cfg: RunConfig, info: DistInfo, distributed: bool,
                batch_size: int | None = None) -> DataLoader:
    """In-order evaluation loader; sharded over processes when `distributed` (default batch: the micro-batch)."""
    micro = max(1, cfg.optim.batch_size // cfg.optim.accum_steps // info.world_size)
    return mdata.build_loader(ds, batch_size or micro, train=False, num_workers=cfg.data.num_workers,
                              distributed=distributed and info.enabled, persistent_workers=False)


# ----------------------------------------------------------------------------- model / optimizer
def check_compatible(cfg: RunConfig, meta: dict[str, Any], source: str) -> None:
    """Raise a ValueError naming every architecture field where the checkpoint and the config differ."""
    theirs = meta.get("config", {}).get("model", {})
    diffs = [f"model.{k}: checkpoint {theirs[k]} vs config {getattr(cfg.model, k)}"
             for k in MODEL_KEYS_MUST_MATCH if k in theirs and theirs[k] != getattr(cfg.model, k)]
    if diffs:
        raise ValueError(f"incompatible checkpoint {source}: " + "; ".join(diffs) +
                         ". Use the same model preset/dims as the checkpoint.")


def build_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    if cfg.task == "pretrain":
        return MALPretrain(cfg.model, cfg.objective)
    model = VisionLSTM(cfg.model, num_classes=num_classes)
    if cfg.task == "finetune":
        if not cfg.init:
            raise ValueError("fine-tuning needs a pretraining checkpoint: pass --init runs/NAME/ckpt_last "
                             "(or use `mal supervised` to train from scratch)")
        if Path(cfg.init).is_dir():
            check_compatible(cfg, read_meta(Path(cfg.init)), cfg.init)
        report = load_encoder(model, load_weights(Path(cfg.init)))
        log.info("loaded %s: dropped %d pretraining-only tensors, new %s", cfg.init, len(report["dropped"]),
                 report["new"])
    return model


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for biases, norms, position embeddings and the mask token; layer-wise lr decay
    (scale layer_decay^(L+1-layer)) for a `VisionLSTM` when layer_decay < 1."""
    depth = model.cfg.depth if isinstance(model, VisionLSTM) else 0

    def layer_id(name: str) -> int:
        if name.startswith(("patch_embed", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1

    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith(("pos_embed", "mask_token"))
        lid = layer_id(name) if (depth and layer_decay < 1) else 0
        scale = layer_decay ** (depth + 1 - lid) if (depth and layer_decay < 1) else 1.0
        g = groups.setdefault((lid, no_wd), {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                             "lr_scale": scale})
        g["params"].append(p)
    return list(groups.values())


def cosine_lr(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warm-up to `base` over `warmup` steps, then half-cosine to `floor` at `total`."""
    if step < warmup:
        return base * step / max(1, warmup)
    t = (step - warmup) / max(1, total - warmup)
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def build_criterion(cfg: RunConfig, num_classes: int) -> tuple[nn.Module | None, Any]:
    """(loss on logits, timm Mixup or None) of a classification run; (None, None) for pretraining."""
    if cfg.task == "pretrain":
        return None, None
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    a = cfg.aug
    if a.mixup > 0 or a.cutmix > 0:
        mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.label_smoothing,
                      num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    if a.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(a.label_smoothing), None
    return nn.CrossEntropyLoss(), None


# ----------------------------------------------------------------------------- run folder
def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, info: DistInfo) -> Path | None:
    """Create the run folder; never clobber an existing one unless asked. Returns the checkpoint to resume."""
    ckpt = None
    if resume:
        for cand in (run_dir / "ckpt_last", run_dir / ".ckpt_last.old"):
            if (cand / "meta.json").is_file():
                ckpt = cand
                break
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir} (expected {run_dir}/ckpt_last); "
                                    f"start without --resume")
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"run folder {run_dir} already exists; pass --resume to continue it, "
                                  f"--overwrite to start over, or choose another --output")
        if info.is_main:
            shutil.rmtree(run_dir)
    barrier()
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    return ckpt


class MetricsLog:
    """CSV + TensorBoard scalars, written by the main process only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.csv"
        self.fields = ["step", "epoch", "loss", "lr", "img_per_s", "time", "val_top1", "val_top5", "val_loss"]
        self.tb = None
        if enabled:
            if not self.path.exists():
                with open(self.path, "w", newline="") as fh:
                    csv.DictWriter(fh, self.fields).writeheader()
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                log.warning("tensorboard not installed: CSV logs only")

    def write(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, self.fields).writerow({"step": step, **{k: values.get(k, "") for k in self.fields[1:]}})
        if self.tb is not None:
            for k, v in values.items():
                if k not in ("epoch", "time"):
                    self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run re-does those steps)."""
        if self.enabled and self.path.exists():
            rows = [r for r in csv.DictReader(open(self.path)) if int(r["step"]) <= step]
            with open(self.path, "w", newline="") as fh:
                w = csv.DictWriter(fh, self.fields)
                w.writeheader()
                w.writerows(rows)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], "draws": gen.get_state()}


def set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    gen.set_state(state["draws"])


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- the loop
def train(cfg: RunConfig, run_dir: Path, info: DistInfo, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Run `cfg` in `run_dir`; returns the summary (also written to summary.json)."""
    cfg.check_world(info.world_size)
    device = device_for(info)
    ckpt = prepare_run_dir(run_dir, resume, overwrite, info)
    if info.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    train_set, val_set, train_eval_set = build_datasets(cfg, progress and info.is_main)
    classes = list(getattr(train_set, "classes", []))
    num_classes = cfg.num_classes or len(classes)
    model = build_model(cfg, num_classes).to(device)
    raw = model
    o = cfg.optim
    micro = o.batch_size // o.accum_steps // info.world_size
    steps_per_epoch = len(train_set) // o.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {len(train_set)} images, fewer than one global batch of "
                         f"{o.batch_size}; lower optim.batch_size")
    total_steps = steps_per_epoch * o.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warmup_steps = int(o.warmup_epochs * steps_per_epoch)
    optimizer = make_optimizer(param_groups(raw, o.weight_decay, o.layer_decay), o.abs_lr, o.betas, device)
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(raw, decay=cfg.ema_decay)
    draws = torch.Generator().manual_seed(cfg.seed + 17)

    step, resumed = 0, {"loss": float("nan"), "train_time_s": 0.0, "skipped": 0}
    if ckpt is not None:
        meta = read_meta(ckpt)
        if meta.get("task") != cfg.task:
            raise ValueError(f"cannot resume: checkpoint {ckpt} is a {meta.get('task')} run, the config is {cfg.task}")
        check_compatible(cfg, meta, str(ckpt))
        raw.load_state_dict(load_weights(ckpt))
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        adapt_loaded_optimizer(optimizer, device)
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
        step = state["step"]
        resumed.update({k: state[k] for k in resumed if k in state})     # so the summary covers the whole run
        set_rng_state(state["rng"][info.rank % len(state["rng"])], draws)
        log.info("resumed %s at step %d", ckpt, step)
    if cfg.fast_path:
        enable_fast_path(raw, device, cfg.recompute, cfg.recompute_qkv)
    if info.enabled:
        model = DDP(model, device_ids=[info.local_rank] if device.type == "cuda" else None)

    criterion, mixup = build_criterion(cfg, num_classes)
    runner = StepRunner(LossStep(model, cfg.task, criterion), device, cfg.amp,
                        graphs_usable(cfg.cuda_graph, device, info), o.accum_steps)
    runner.zero_grad(optimizer)
    metrics = MetricsLog(run_dir, info.is_main)
    metrics.truncate_after(step)
    sampler = StepSampler(len(train_set), o.batch_size, info.world_size, info.rank, cfg.seed)
    seeded = SeededDataset(train_set, cfg.seed)

    def save(final: bool = False) -> None:
        rngs = gather_objects(rng_state(draws), info)
        if not info.is_main:
            return
        state = {"optimizer": optimizer.state_dict(), "step": step, "rng": rngs, "loss": loss_val,
                 "train_time_s": time.perf_counter() - start_time, "skipped": skipped}
        if ema is not None:
            state["ema"] = ema.module.state_dict()
        meta = {"task": cfg.task, "step": step, "epoch": step / steps_per_epoch, "total_steps": total_steps,
                "num_classes": num_classes, "classes": classes, "config": to_dict(cfg), "final": final}
        save_checkpoint(run_dir / "ckpt_last", raw.state_dict(), state, meta)
        if cfg.keep_every and step % cfg.keep_every == 0:
            save_checkpoint(run_dir / f"ckpt_{step:07d}", raw.state_dict(), state, meta)
        if ema is not None:
            save_checkpoint(run_dir / "ckpt_ema", ema.module.state_dict(), {"step": step}, {**meta, "ema": True})

    bar = tqdm(total=total_steps, initial=step, desc=cfg.task, disable=not (progress and info.is_main),
               dynamic_ncols=True)
    skipped, last_eval, loss_val = resumed["skipped"], {}, resumed["loss"]
    bad, unchecked_from = torch.zeros((), device=device), step

    def eval_due(s: int) -> bool:
        return (cfg.task != "pretrain" and val_set is not None and
                (s % (steps_per_epoch * cfg.eval_every) == 0 or s == total_steps))

    t_window, n_window = time.perf_counter(), 0
    start_time = time.perf_counter() - resumed["train_time_s"]
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, in_epoch * o.accum_steps * micro)
        loader = DataLoader(seeded, batch_size=micro, sampler=sampler, num_workers=cfg.data.num_workers,
                            pin_memory=device.type == "cuda", drop_last=True)
        it = iter(loader)
        for _ in range(in_epoch, steps_per_epoch):
            if step >= total_steps:
                break
            lr = cosine_lr(step, total_steps, warmup_steps, o.abs_lr, o.min_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            model.train()
            if cfg.task == "pretrain":                  # draws for the whole global batch, sliced per process
                clusters_all, mask_all = (to_device(t, device) for t in raw.sample_inputs(o.batch_size, draws))
            loss_sum = torch.zeros((), device=device)
            try:
                for a in range(o.accum_steps):
                    imgs, labels = next(it)
                    imgs = imgs.to(device, non_blocking=True)
                    labels = labels.to(device, non_blocking=True)
                    sync = a == o.accum_steps - 1 or not info.enabled
                    ctx = model.no_sync() if (info.enabled and not sync) else nullcontext()
                    with ctx:
                        if cfg.task == "pretrain":
                            # this micro-batch holds global positions rank + W*j, j in [a*micro, (a+1)*micro)
                            rows = slice(info.rank + a * micro * info.world_size, None, info.world_size)
                            extra = () if mask_all is None else (mask_all[rows][:micro],)
                            loss = runner(imgs, clusters_all[rows][:micro], *extra)
                        else:
                            if mixup is not None:
                                imgs, labels = mixup(imgs, labels)
                            loss = runner(imgs, labels)
                        (loss / o.accum_steps).backward()
                    loss_sum += loss.detach().float() / o.accum_steps
            except torch.cuda.OutOfMemoryError:
                raise RuntimeError(f"out of GPU memory with a per-GPU micro-batch of {micro} images; lower "
                                   f"optim.batch_size or raise optim.accum_steps (e.g. optim.accum_steps="
                                   f"{o.accum_steps * 2}) to keep the global batch") from None
            # The loss is read (a host sync) only where it is used: logs, checkpoints, evaluations, the skip
            # policy. Non-finite losses in between are remembered on the device, so a checkpoint is never
            # written after one.
            bad += (~torch.isfinite(loss_sum)).float()
            nxt = step + 1
            if (cfg.nan_policy == "skip" or nxt % cfg.log_every == 0 or nxt % cfg.save_every == 0
                    or nxt == total_steps or eval_due(nxt)):
                stats = all_reduce_sum(torch.stack([loss_sum, bad]))
                loss_val = (stats[0] / info.world_size).item()
                if stats[1] > 0:
                    runner.zero_grad(optimizer)
                    if cfg.nan_policy == "stop":
                        where = (f"loss is {loss_val} at step {step}" if unchecked_from == step else
                                 f"non-finite loss between steps {unchecked_from} and {step} (now {loss_val})")
                        raise FloatingPointError(
                            f"{where}; stopped. The last good checkpoint is {run_dir / 'ckpt_last'}. Lower the lr, "
                            f"set optim.clip_grad, or set nan_policy=skip")
                    skipped += 1
                    log.warning("non-finite loss at step %d skipped (%d so far)", step, skipped)
                    bad.zero_()
                    unchecked_from = step = step + 1
                    bar.update(1)
                    continue
                bad.zero_()
                unchecked_from = nxt
            if o.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), o.clip_grad)
            optimizer.step()
            runner.zero_grad(optimizer)
            if ema is not None:
                ema.update(raw, step=step)
            step += 1
            n_window += o.batch_size
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                dt = time.perf_counter() - t_window
                ips = n_window / max(dt, 1e-9)
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                metrics.write(step, epoch=step / steps_per_epoch, loss=loss_val, lr=lr, img_per_s=ips,
                              time=time.perf_counter() - start_time)
                t_window, n_window = time.perf_counter(), 0
            if step % cfg.save_every == 0 or step == total_steps:
                save(final=step == total_steps)
            if eval_due(step):
                last_eval = evaluate_classifier(ema.module if ema is not None else raw,
                                                eval_loader(val_set, cfg, info, True), device, cfg.amp)
                metrics.write(step, epoch=step / steps_per_epoch, val_top1=last_eval["top1"],
                              val_top5=last_eval["top5"], val_loss=last_eval["loss"])
                if info.is_main:
                    bar.write(f"step {step}: val top-1 {last_eval['top1']:.2f} %  top-5 {last_eval['top5']:.2f} %")
        del it, loader
    bar.close()
    metrics.close()
    report = getattr(train_set, "report", None)
    if report is not None and info.is_main and getattr(train_set, "num_bad", 0):
        log.warning(report())

    summary: dict[str, Any] = {"task": cfg.task, "steps": step, "epochs": step / steps_per_epoch,
                               "skipped_steps": skipped, "train_time_s": time.perf_counter() - start_time,
                               "final_loss": loss_val, "run_dir": str(run_dir)}
    if cfg.task == "pretrain":
        summary.update(finish_pretraining(cfg, raw, train_eval_set, val_set, run_dir, info, device, num_classes))
    elif last_eval:
        summary.update({f"val_{k}": v for k, v in last_eval.items()})
    if info.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if (run_dir / "metrics.csv").exists():
            plot_curves(run_dir / "metrics.csv", run_dir / "loss.png")
    barrier()
    return summary


def to_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Host tensor -> device without a stream sync (pinned, non-blocking) on CUDA."""
    if t is None or device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def enable_fast_path(model: nn.Module, device: torch.device, recompute: bool = False,
                     recompute_qkv: bool = False) -> None:
    """Switch every ViL block (encoder, and an xLSTM decoder) to the fused fast path on CUDA
    (recompute: activation checkpointing of each block; recompute_qkv: of the mLSTM cell's q, k, v)."""
    if device.type != "cuda":
        log.info("fast_path: no CUDA device, running the plain PyTorch path")
        return
    for m in model.modules():
        if isinstance(m, ViLBlock):
            m.fast_path(checkpoint=recompute, recompute_qkv=recompute_qkv)


def finish_pretraining(cfg: RunConfig, model: MALPretrain, train_eval: Dataset | None, val: Dataset | None,
                       run_dir: Path, info: DistInfo, device: torch.device, num_classes: int) -> dict[str, Any]:
    """Prediction PNG and k-NN / linear-probe accuracy of the frozen encoder (main process)."""
    out: dict[str, Any] = {}
    if not info.is_main:
        return out
    model.eval()
    if val is not None or train_eval is not None:
        src = val if val is not None else train_eval
        n = min(cfg.viz_samples, len(src))
        imgs = torch.stack([src[i][0] for i in range(n)]).to(device)
        g = torch.Generator().manual_seed(cfg.seed)
        clusters, mask = model.sample_inputs(n, g, device)
        with torch.no_grad(), autocast_for(device, cfg.amp):
            res = model(imgs, clusters, mask)
        seen = imgs.clone()
        if mask is not None and mask.dim() == 3:
            seen = seen.masked_fill(mask.unsqueeze(1), 0.0)
        elif mask is not None:
            p, (h, w) = cfg.model.patch_size, cfg.model.grid
            patches = patchify(seen, p).masked_fill(mask.unsqueeze(-1), 0.0)
            seen = unpatchify(patches, p, h, w)
        pred = model.reconstruct(imgs.float(), {k: v.float() if v.is_floating_point() else v for k, v in res.items()})
        out["prediction_png"] = str(save_prediction_grid(run_dir / "predictions.png", [seen, pred, imgs],
                                                         cfg.data.mean, cfg.data.std))
    if cfg.probe and train_eval is not None and val is not None:
        # probe with the pretraining direction (no reversed layers), same weights
        enc = VisionLSTM(dataclasses.replace(cfg.model, bidirectional=False), num_classes=0).to(device)
        enc.load_state_dict(model.encoder.state_dict())
        if cfg.fast_path:
            enable_fast_path(enc, device)
        tr_f, tr_y = extract_features(enc, eval_loader(train_eval, cfg, info, False), device, cfg.amp)
        te_f, te_y = extract_features(enc, eval_loader(val, cfg, info, False), device, cfg.amp)
        out["knn_top1"] = knn_accuracy(tr_f, tr_y, te_f, te_y, k=cfg.knn_k, num_classes=num_classes)
        out["linprobe_top1"] = linear_probe_accuracy(tr_f, tr_y, te_f, te_y, num_classes=num_classes, device=device)
        log.info("frozen encoder: k-NN %.2f %%, linear probe %.2f %%", out["knn_top1"], out["linprobe_top1"])
    return out
