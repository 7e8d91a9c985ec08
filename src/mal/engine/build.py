"""What a run is made of, built from its config: datasets, model, loss, loaders."""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .. import data as mdata
from ..checkpoint import load_encoder, load_weights, read_meta
from ..config import RunConfig
from ..distributed import DistInfo
from ..models.vil import VisionLSTM
from ..objectives.mal import MALPretrain

log = logging.getLogger("mal")
MODEL_KEYS_MUST_MATCH = ("dim", "depth", "patch_size", "in_chans", "num_heads", "expansion", "qkv_block_size",
                         "conv_kernel_size")


def build_datasets(cfg: RunConfig, progress: bool = True) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """(train set with training augmentation, val set with eval transform, train set with eval transform for
    the probes after pretraining)."""
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


def check_compatible(cfg: RunConfig, meta: dict[str, Any], source: str) -> None:
    """Raise a ValueError naming every architecture field where the checkpoint and the config differ."""
    theirs = meta.get("config", {}).get("model", {})
    diffs = [f"model.{k}: checkpoint {theirs[k]} vs config {getattr(cfg.model, k)}"
             for k in MODEL_KEYS_MUST_MATCH if k in theirs and theirs[k] != getattr(cfg.model, k)]
    if diffs:
        raise ValueError(f"incompatible checkpoint {source}: " + "; ".join(diffs) +
                         ". Use the same model preset/dims as the checkpoint.")


def build_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    """The pretraining objective, or a classifier (fine-tuning loads the pretrained encoder strictly)."""
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


__all__ = ["build_datasets", "eval_loader", "check_compatible", "build_model", "build_criterion"]
