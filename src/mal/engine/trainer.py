"""The training engine: MAL pretraining, fine-tuning, supervised training and segmentation, on one process or many
(DDP). What differs between the tasks is built from the config (engine/build.py): datasets, model, loss and the
evaluator (engine/evaluate.py).

    Trainer(cfg, run_dir, info).fit()  =  set up -> [resume] -> epochs of steps (log, save, evaluate) -> finish

Determinism (engine/sampling.py): a step's global batch is a fixed slice of a (seed, epoch) permutation,
every sample's augmentation is seeded by (seed, epoch, index), and the objective's random draws are made for
the whole global batch from one generator and sliced per process. So the run's weights do not depend on the
number of processes, the gradient accumulation or on being killed and resumed.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..checkpoint import load_train_state, load_weights, read_meta, save_checkpoint
from ..config import RunConfig, to_dict
from ..data import normalize_uint8
from ..distributed import DistInfo, FlatGradSync, all_reduce_sum, barrier, device_for, gather_objects
from ..errors import GPUOutOfMemoryError, Interrupted
from ..viz import plot_curves, save_prediction_grid
from .build import (build_criterion, build_datasets, build_evaluator, build_model, check_compatible, eval_loader,
                    loader_workers)
from .evaluate import autocast_for, save_segmentation_predictions
from .optim import adapt_loaded_optimizer, cosine_lr, make_optimizer, param_groups, set_lr
from .probe import PROBE_FIELDS, probe_encoder
from .run_dir import MetricsLog, RunDir, Throughput
from .sampling import SeededDataset, StepSampler, one_intra_op_thread, rng_state, seed_everything, set_rng_state
from .step import LossStep, StepRunner, graphs_usable

log = logging.getLogger("mal")


# keys that may differ on --resume without changing what the run computes
RESUMABLE_KEYS = {"output_dir", "data.num_workers", "data.cache", "data.cache_dir", "data.strict", "data.dataset",
                  "log_every", "save_every", "keep_every", "eval_every", "fast_path", "cuda_graph", "graph_optimizer",
                  "grad_sync", "recompute", "recompute_qkv", "probe", "probe_every", "probe_pool", "knn_k",
                  "viz_samples", "model.mlstm_backend", "seg.inference", "seg.stride"}


def recipe_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every config value that differs, except those in RESUMABLE_KEYS."""
    out = []
    for k, v in new.items():
        key, before = f"{prefix}{k}", old.get(k)
        if isinstance(v, dict):
            out += recipe_changes(before if isinstance(before, dict) else {}, v, f"{key}.")
        elif key not in RESUMABLE_KEYS and k in old and before != v:
            out.append(f"{key}: {before} -> {v}")
    return out


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without a stream sync (pinned, non-blocking) on CUDA."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def enable_fast_path(model: nn.Module, device: torch.device, **kwargs) -> None:
    """The fused GPU blocks (`model.fast_path(**kwargs)`) on CUDA; the plain PyTorch path elsewhere."""
    if device.type != "cuda":
        log.info("fast_path: no CUDA device, running the plain PyTorch path")
        return
    model.fast_path(**kwargs)


class Trainer:
    """One run of `cfg` in `run_dir`. Construction checks everything (config, data, init and resume
    checkpoints) before the run folder is touched; `fit()` trains and returns the summary."""

    def __init__(self, cfg: RunConfig, run_dir: Path, info: DistInfo, resume: bool = False,
                 overwrite: bool = False, progress: bool = True, allow_changes: bool = False):
        cfg.check_world(info.world_size)
        self.cfg, self.info, self.progress = cfg, info, progress and info.is_main
        self.device = device_for(info)
        self.pixel_stats = tuple(torch.tensor(v, dtype=torch.float32, device=self.device).view(-1, 1, 1)
                                 for v in (cfg.data.mean, cfg.data.std))   # (3, 1, 1) each, made once: no copy per step
        self.folder = RunDir(Path(run_dir), resume, overwrite, info)
        seed_everything(cfg.seed)
        self.data = build_datasets(cfg, self.progress)
        self.train_set = self.data.train
        self.classes = self.data.classes
        self.num_classes = cfg.num_classes or len(self.classes)
        self.evaluator = build_evaluator(cfg, self.classes)
        self.model = build_model(cfg, self.num_classes, load_init=self.folder.checkpoint is None).to(self.device)
        self._schedule()
        o = cfg.optim
        groups = param_groups(self.model, o.weight_decay, o.layer_decay, o.layer_decay_group)
        self.optimizer = make_optimizer(groups, o.abs_lr, o.betas, self.device)
        self.ema = None
        if cfg.ema_decay > 0:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
        self.draws = torch.Generator().manual_seed(cfg.seed + 17)
        self.step, self.skipped, self.loss_val, self.time_before = 0, 0, float("nan"), 0.0
        if self.folder.checkpoint is not None:
            self._load(self.folder.checkpoint, allow_changes)
        self.folder.open(to_dict(cfg))                                    # the first write to the run folder
        self._wrap()

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    # ---------------------------------------------------------------- setup
    def _schedule(self) -> None:
        o = self.cfg.optim
        self.micro = o.batch_size // o.accum_steps // self.info.world_size
        self.steps_per_epoch = len(self.train_set) // o.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set has {len(self.train_set)} images, fewer than one global batch of "
                             f"{o.batch_size}; lower optim.batch_size")
        self.total_steps = self.steps_per_epoch * o.epochs
        if self.cfg.max_steps:
            self.total_steps = min(self.total_steps, self.cfg.max_steps)
        self.warmup_steps = int(o.warmup_epochs * self.steps_per_epoch)
        if self.warmup_steps > self.total_steps and self.info.is_main:
            log.warning("the warm-up (%d steps) is longer than the run (%d steps): the lr stops at %.0f %% of its "
                        "peak; lower optim.warmup_epochs", self.warmup_steps, self.total_steps,
                        100 * self.total_steps / self.warmup_steps)

    def _load(self, ckpt: Path, allow_changes: bool) -> None:
        """Continue from a checkpoint of this run: weights, optimizer, EMA, step, every RNG."""
        meta = read_meta(ckpt)
        if meta.get("task") != self.cfg.task:
            raise ValueError(f"cannot resume: checkpoint {ckpt} is a {meta.get('task')} run, the config is "
                             f"{self.cfg.task}")
        check_compatible(self.cfg, meta, str(ckpt))
        changes = recipe_changes(meta.get("config", {}), to_dict(self.cfg))
        if changes and not allow_changes:
            raise ValueError(f"cannot resume {ckpt}: the config changes the recipe ({'; '.join(changes)}); resume "
                             f"with the run's own config (its config.yaml), or pass --allow-changes to continue "
                             f"with the new values")
        for c in changes:
            log.warning("resuming with a changed recipe: %s", c)
        self.model.load_state_dict(load_weights(ckpt))
        state = load_train_state(ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        adapt_loaded_optimizer(self.optimizer, self.device)
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])
        self.step = state["step"]
        self.loss_val = state.get("loss", float("nan"))
        self.time_before, self.skipped = state.get("train_time_s", 0.0), state.get("skipped", 0)
        set_rng_state(state["rng"][self.info.rank % len(state["rng"])], self.draws)
        log.info("resumed %s at step %d", ckpt, self.step)

    def _wrap(self) -> None:
        """Fast path, DDP, the (graphed) loss step, metrics."""
        cfg = self.cfg
        if cfg.fast_path:
            enable_fast_path(self.model, self.device, checkpoint=cfg.recompute, recompute_qkv=cfg.recompute_qkv)
        graphs = graphs_usable(cfg.cuda_graph, self.device, self.info, cfg.grad_sync)
        self.ddp, self.grad_sync = self.model, None
        if self.info.enabled and (cfg.grad_sync == "flat" or (cfg.grad_sync == "auto" and graphs)):
            self.grad_sync = FlatGradSync(self.model.parameters(), self.info.world_size)
        elif self.info.enabled:
            self.ddp = DDP(self.model, device_ids=[self.info.local_rank] if self.device.type == "cuda" else None)
        criterion, self.mixup = build_criterion(cfg, self.num_classes)
        whole = cfg.graph_optimizer and graphs and not self.info.enabled
        if cfg.graph_optimizer and not whole:
            log.info("graph_optimizer: off (%s), AdamW steps eagerly",
                     "several processes" if graphs else "no CUDA graphs")
        self.runner = StepRunner(LossStep(self.ddp, criterion), self.device, cfg.amp, graphs, cfg.optim.accum_steps,
                                 optimizer=self.optimizer if whole else None, clip_grad=cfg.optim.clip_grad)
        self.runner.zero_grad(self.optimizer)
        fields = PROBE_FIELDS if cfg.task == "pretrain" else self.evaluator.fields
        self.metrics = MetricsLog(self.run_dir, self.info.is_main, self.step, fields)
        self.sampler = StepSampler(len(self.train_set), cfg.optim.batch_size, self.info.world_size, self.info.rank,
                                   cfg.seed)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train to the last step, then write the summary (and, after pretraining, predictions and probes)."""
        self.begin()
        try:
            batches = iter(self._loader())
            while self.step < self.total_steps:
                self.train_step(batches)
            del batches
        except KeyboardInterrupt:
            self.bar.close()
            saved = read_meta(self.run_dir / "ckpt_last")["step"] if (self.run_dir / "ckpt_last").is_dir() else None
            where = f"the last checkpoint is at step {saved}" if saved is not None else "no checkpoint was written"
            raise Interrupted(f"interrupted at step {self.step} of {self.total_steps}; {where}; continue with the "
                              f"same command and --resume") from None
        return self.finish()

    def begin(self) -> None:
        """The loop's running state: progress bar, throughput window, the device-side count of bad losses."""
        self.bar = tqdm(total=self.total_steps, initial=self.step, desc=self.cfg.task, disable=not self.progress,
                        dynamic_ncols=True)
        self.last_eval: dict[str, float] = {}
        self.eval_loaders: dict[int, DataLoader] = {}
        self.bad = torch.zeros((), device=self.device)                   # non-finite losses not yet read
        self.unchecked_from, self.speed = self.step, Throughput()
        self.start_time = time.perf_counter() - self.time_before

    def _loader(self) -> DataLoader:
        """The training batches from this step to the last, in one pass (workers never restart between epochs)."""
        o = self.cfg.optim
        epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
        self.sampler.set_epoch(epoch, in_epoch * o.accum_steps * self.micro,
                               until=-(-self.total_steps // self.steps_per_epoch))
        return DataLoader(SeededDataset(self.train_set, self.cfg.seed), batch_size=self.micro, sampler=self.sampler,
                          num_workers=loader_workers(self.cfg.data.num_workers), pin_memory=self.device.type == "cuda",
                          drop_last=True)

    def train_step(self, batches: Iterator) -> None:
        """One optimizer step: accumulated micro-batches, the finite-loss check, clip, AdamW, EMA, then logs."""
        o = self.cfg.optim
        lr = cosine_lr(self.step, self.total_steps, self.warmup_steps, o.abs_lr, o.min_lr)
        set_lr(self.optimizer, lr)
        if not self.model.training:                     # after an evaluation (train() walks every module)
            self.ddp.train()
        loss_sum = self.forward_backward(batches)
        if not self._finite(loss_sum):
            return
        if not self.runner.updates:                     # else the replayed graph has clipped and stepped
            if o.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.clip_grad)
            self.optimizer.step()
            self.runner.zero_grad(self.optimizer)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.step += 1
        self.speed.add(o.batch_size)
        self.bar.update(1)
        self._after_step(lr)

    def forward_backward(self, batches: Iterator) -> torch.Tensor:
        """Gradients of the global batch's mean loss over this process's micro-batches (with a whole-update graph,
        the update itself); returns that loss."""
        o, info = self.cfg.optim, self.info
        draws = ()
        if self.cfg.task == "pretrain":                                  # for the global batch, sliced per process
            with one_intra_op_thread():
                draws = self.model.sample_inputs(o.batch_size, self.draws)
            draws = tuple(to_device(t, self.device) for t in draws)
        loss_sum = torch.zeros((), device=self.device)
        try:
            for a in range(o.accum_steps):
                imgs, labels = (t.to(self.device, non_blocking=True) for t in next(batches))
                if imgs.dtype == torch.uint8:                            # pretraining batches: normalized here
                    imgs = normalize_uint8(imgs, *self.pixel_stats)                       # (B, 3, H, W) float32
                hooks_wait = isinstance(self.ddp, DDP) and a < o.accum_steps - 1      # DDP syncs the last one
                with self.ddp.no_sync() if hooks_wait else nullcontext():
                    if draws:      # this micro-batch holds global positions rank + W*j, j in [a*micro, (a+1)*micro)
                        rows = slice(info.rank + a * self.micro * info.world_size, None, info.world_size)
                        loss = self.runner(imgs, *(t[rows][:self.micro] for t in draws))
                    else:
                        if self.mixup is not None:
                            imgs, labels = self.mixup(imgs, labels)
                        loss = self.runner(imgs, labels)
                    if not self.runner.updates:
                        (loss / o.accum_steps).backward()
                loss_sum += loss.detach().float() / o.accum_steps
            if self.grad_sync is not None:
                self.grad_sync()
        except torch.cuda.OutOfMemoryError:
            raise GPUOutOfMemoryError(
                f"out of GPU memory with a per-GPU micro-batch of {self.micro} images; lower optim.batch_size or "
                f"raise optim.accum_steps (e.g. optim.accum_steps={o.accum_steps * 2}) to keep the global batch"
            ) from None
        return loss_sum

    def _finite(self, loss_sum: torch.Tensor) -> bool:
        """The nan policy. The loss is read (a host sync) only where it is used: logs, checkpoints, evaluations,
        the skip policy. Non-finite losses in between are counted on the device, so no checkpoint is written
        after one. Returns False when the step is skipped."""
        self.bad += (~torch.isfinite(loss_sum)).float()
        nxt, cfg = self.step + 1, self.cfg
        if not (cfg.nan_policy == "skip" or nxt % cfg.log_every == 0 or nxt % cfg.save_every == 0
                or nxt == self.total_steps or self._eval_due(nxt)):
            return True
        stats = all_reduce_sum(torch.stack([loss_sum, self.bad]))
        self.loss_val = (stats[0] / self.info.world_size).item()
        bad, self.bad = stats[1] > 0, self.bad.zero_()
        if not bad:
            self.unchecked_from = nxt
            return True
        self.runner.zero_grad(self.optimizer)
        if cfg.nan_policy == "stop":
            where = (f"loss is {self.loss_val} at step {self.step}" if self.unchecked_from == self.step else
                     f"non-finite loss between steps {self.unchecked_from} and {self.step} (now {self.loss_val})")
            raise FloatingPointError(f"{where}; stopped. The last good checkpoint is {self.run_dir / 'ckpt_last'}. "
                                     f"Lower the lr, set optim.clip_grad, or set nan_policy=skip")
        self.skipped += 1
        log.warning("non-finite loss at step %d skipped (%d so far)", self.step, self.skipped)
        self.unchecked_from = self.step = self.step + 1
        self.bar.update(1)
        return False

    def _after_step(self, lr: float) -> None:
        s, cfg = self.step, self.cfg
        if s % cfg.log_every == 0 or s == self.total_steps:
            ips = self.speed.read()
            self.bar.set_postfix(loss=f"{self.loss_val:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
            self.metrics.write(s, epoch=s / self.steps_per_epoch, loss=self.loss_val, lr=lr, img_per_s=ips,
                               time=time.perf_counter() - self.start_time)
        if s % cfg.save_every == 0 or s == self.total_steps:
            self.save(final=s == self.total_steps)
        if self._eval_due(s):
            self.evaluate()
        if self._probe_due(s):
            self.probe_during_training()

    # ---------------------------------------------------------------- checkpoints and evaluation
    def save(self, final: bool = False) -> None:
        """ckpt_last (and ckpt_<step> every keep_every steps, ckpt_ema with EMA), written atomically by rank 0."""
        rngs = gather_objects(rng_state(self.draws), self.info)
        if not self.info.is_main:
            return
        s = self.step
        state = {"optimizer": self.optimizer.state_dict(), "step": s, "rng": rngs, "loss": self.loss_val,
                 "train_time_s": time.perf_counter() - self.start_time, "skipped": self.skipped}
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        meta = {"task": self.cfg.task, "step": s, "epoch": s / self.steps_per_epoch, "total_steps": self.total_steps,
                "num_classes": self.num_classes, "classes": self.classes, "config": to_dict(self.cfg), "final": final}
        weights = self.model.state_dict()
        save_checkpoint(self.run_dir / "ckpt_last", weights, state, meta)
        if self.cfg.keep_every and s % self.cfg.keep_every == 0:
            save_checkpoint(self.run_dir / f"ckpt_{s:07d}", weights, state, meta)
        if self.ema is not None:
            save_checkpoint(self.run_dir / "ckpt_ema", self.ema.module.state_dict(), {"step": s}, {**meta, "ema": True})
        self.folder.committed()

    def _eval_due(self, s: int) -> bool:
        return (self.cfg.task != "pretrain" and self.data.eval is not None and
                (s % (self.steps_per_epoch * self.cfg.eval_every) == 0 or s == self.total_steps))

    def _probe_due(self, s: int) -> bool:
        """Pretraining with probe_every: a probe every probe_every epochs (the last step's is finish's)."""
        every = self.cfg.probe_every * self.steps_per_epoch
        return (self.cfg.task == "pretrain" and every > 0 and s % every == 0 and s < self.total_steps and
                self.cfg.probe and self.data.train_eval is not None and self.data.eval is not None)

    def probe_during_training(self) -> None:
        """k-NN and linear probe of a copy of the encoder on the evaluation set, logged in metrics.csv; the global
        RNGs are restored after, so a run with probes draws what a run without them draws."""
        if not self.info.is_main:
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            res = self.probe_frozen(self.frozen_encoder(), self.data.eval)
        self.metrics.write(self.step, epoch=self.step / self.steps_per_epoch,
                           **{f"eval_{k}": res[k] for k in PROBE_FIELDS})
        self.bar.write(f"step {self.step}: {self.data.eval_name} k-NN {res['knn_top1']:.2f} %, "
                       f"linear probe {res['linprobe_top1']:.2f} %")

    def frozen_encoder(self) -> nn.Module:
        """A copy of the encoder as it was pretrained (causal, one scan order), on the device, for the probes."""
        enc = self.model.probe_encoder().to(self.device)
        if self.cfg.fast_path:
            enable_fast_path(enc, self.device)
        return enc

    def probe_frozen(self, enc: nn.Module, test) -> dict[str, Any]:
        """k-NN and linear-probe top-1 (%) of the frozen encoder `enc`, features of the training split as memory /
        probe training set, `test` scored."""
        cfg = self.cfg
        return probe_encoder(enc, lambda ds: eval_loader(ds, cfg, self.info, False), self.data.train_eval, test,
                             self.device, cfg.amp, knn_k=cfg.knn_k, num_classes=self.num_classes,
                             pool=cfg.probe_pool, seed=cfg.seed)

    def scores(self, dataset) -> dict[str, float]:
        """The evaluator's scores (top1 / top5 / loss, or miou / mdice / acc / loss / per class) of the raw model, and
        ema_top1 / ... of the EMA model, on `dataset`."""
        if id(dataset) not in self.eval_loaders:        # built once: its workers do not restart at every evaluation
            self.eval_loaders[id(dataset)] = eval_loader(dataset, self.cfg, self.info, True,
                                                         collate_fn=self.evaluator.collate, persistent=True)
        loader = self.eval_loaders[id(dataset)]
        out = self.evaluator(self.model, loader, self.device, self.cfg.amp)
        if self.ema is not None:
            ema = self.evaluator(self.ema.module, loader, self.device, self.cfg.amp)
            out.update({f"ema_{k}": v for k, v in ema.items()})
        return out

    def evaluate(self) -> None:
        """The raw and the EMA model on the evaluation set (the held-out part of the training split if any)."""
        res = self.last_eval = self.scores(self.data.eval)
        self.metrics.write(self.step, epoch=self.step / self.steps_per_epoch,
                           **{f"eval_{k}": v for k, v in res.items() if f"eval_{k}" in self.metrics.FIELDS})
        if self.info.is_main:
            ema = {k[4:]: v for k, v in res.items() if k.startswith("ema_")}
            ema_text = f"  (EMA: {self.evaluator.describe(ema)})" if ema else ""
            self.bar.write(f"step {self.step}: {self.data.eval_name} {self.evaluator.describe(res)}{ema_text}")

    # ---------------------------------------------------------------- the end
    def finish(self) -> dict[str, Any]:
        """Close the logs; summary.json, loss.png and, after pretraining, the predictions and probes."""
        self.bar.close()
        self.metrics.close()
        if self.info.is_main and self.train_set.num_bad:
            log.warning(self.train_set.report())
        summary: dict[str, Any] = {"task": self.cfg.task, "steps": self.step, "epochs": self.step / self.steps_per_epoch,
                                   "skipped_steps": self.skipped, "train_time_s": time.perf_counter() - self.start_time,
                                   "final_loss": self.loss_val, "run_dir": str(self.run_dir)}
        if self.device.type == "cuda":                  # of training, before the probes and predictions
            summary["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        if self.cfg.task == "pretrain":
            summary.update(self.finish_pretraining())
        elif self.last_eval:
            summary["eval_set"] = self.data.eval_name
            summary.update({f"{self.data.eval_name}_{k}": v for k, v in self.last_eval.items()})
            if self.data.eval_name != "val" and self.data.val is not None:        # the val folder, once
                summary.update({f"val_{k}": v for k, v in self.scores(self.data.val).items()})
            self.eval_loaders.clear()                                          # their workers stop here
        if self.cfg.task == "segment" and self.info.is_main:
            src = self.data.val if self.data.val is not None else self.data.eval
            if src is not None:
                summary["prediction_png"] = str(self.save_segmentations(src))
        summary.update(num_bad=self.train_set.num_bad, bad_files=[str(f) for f in self.train_set.bad_files])
        if self.info.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            if (self.run_dir / "metrics.csv").exists():
                plot_curves(self.run_dir / "metrics.csv", self.run_dir / "loss.png")
        barrier()
        return summary

    def finish_pretraining(self) -> dict[str, Any]:
        """Prediction PNG and k-NN / linear-probe accuracy of the frozen encoder (main process): on the held-out
        part of the training split when there is one, and on the val folder."""
        cfg, data = self.cfg, self.data
        out: dict[str, Any] = {"masked_input_fraction": self.model.masked_input_fraction()}
        if not self.info.is_main:
            return out
        self.model.eval()
        src = data.val if data.val is not None else data.train_eval
        if src is not None:
            out["prediction_png"] = str(self.save_predictions(src))
        if not (cfg.probe and data.train_eval is not None):
            return out
        enc = self.frozen_encoder()
        for name, test in (("holdout_", data.eval if data.eval_name == "holdout" else None), ("", data.val)):
            if test is not None:
                res = self.probe_frozen(enc, test)
                out.update({("" if k == "probe_pool" else name) + k: v for k, v in res.items()})
                log.info("frozen encoder (%s, %s pooling): k-NN %.2f %%, linear probe %.2f %%",
                         name.rstrip("_") or "val", cfg.probe_pool, res["knn_top1"], res["linprobe_top1"])
        return out

    def save_segmentations(self, dataset) -> Path:
        """predictions.png of a segment run: images of `dataset`, their ground truth and the raw model's prediction."""
        cfg = self.cfg
        return save_segmentation_predictions(self.model, dataset, self.evaluator, self.run_dir / "predictions.png",
                                             self.device, cfg.data.mean, cfg.data.std, cfg.viz_samples, cfg.amp)

    def save_predictions(self, dataset) -> Path:
        """predictions.png: the input as seen, the next-cluster predictions, the target, one image per class."""
        cfg = self.cfg
        idx = one_per_class(getattr(dataset, "targets", list(range(len(dataset)))), cfg.viz_samples)
        imgs = torch.stack([dataset[i][0] for i in idx]).to(self.device)
        draws = self.model.sample_inputs(len(idx), torch.Generator().manual_seed(cfg.seed), self.device)
        mean, std = (torch.tensor(v, device=self.device).view(-1, 1, 1) for v in (cfg.data.mean, cfg.data.std))
        with torch.no_grad(), autocast_for(self.device, cfg.amp):
            rows = self.model.prediction_rows(imgs, *draws, fill=-mean / std)      # masked units black
        return save_prediction_grid(self.run_dir / "predictions.png", rows, cfg.data.mean, cfg.data.std,
                                    self.model.PREDICTION_TITLES)


def one_per_class(targets, n: int) -> list[int]:
    """Up to n indices, the first image of each class first, then the next ones in order."""
    first: dict = {}
    for i, t in enumerate(targets):
        first.setdefault(int(t), i)
    chosen = list(first.values())[:n]
    rest = [i for i in range(len(targets)) if i not in set(chosen)]
    return chosen + rest[:n - len(chosen)]


def train(cfg: RunConfig, run_dir: Path, info: DistInfo, resume: bool = False, overwrite: bool = False,
          progress: bool = True, allow_changes: bool = False) -> dict[str, Any]:
    """Run `cfg` in `run_dir`; returns the summary (also written to summary.json)."""
    return Trainer(cfg, run_dir, info, resume=resume, overwrite=overwrite, progress=progress,
                   allow_changes=allow_changes).fit()


__all__ = ["Trainer", "train", "enable_fast_path", "to_device"]
