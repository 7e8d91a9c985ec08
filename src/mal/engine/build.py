"""What a run is made of, built from its config: datasets, model, loss, loaders."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .. import data as mdata
from ..checkpoint import fill_unseen_positions, load_encoder, load_weights, read_meta
from ..config import RunConfig
from ..distributed import DistInfo
from ..models import create_encoder
from ..objectives import create_objective
from ..segment import SegLoss, Segmenter
from .evaluate import ClassificationEvaluator, SegmentationEvaluator

log = logging.getLogger("mal")
MODEL_KEYS_MUST_MATCH = ("dim", "depth", "patch_size", "in_chans", "num_heads", "expansion", "qkv_block_size",
                         "conv_kernel_size")


@dataclass
class RunData:
    """The datasets of a run."""
    train: Dataset                     # training images with the training augmentation
    eval: Dataset | None               # evaluated during training: the held-out part, else the val folder
    eval_name: str                     # "holdout", "val" or (segment: seg.eval_split) "eval"
    val: Dataset | None                # the val_split folder: final numbers
    train_eval: Dataset | None         # the training images with the eval transform (the probes' memory)

    @property
    def classes(self) -> list[str]:
        return list(getattr(self.train, "classes", []))


def build_datasets(cfg: RunConfig, progress: bool = True) -> RunData:
    """Train / held-out / val sets of a run. With data.holdout > 0 a seeded fraction of every class of the
    training split is held out (eval transform) and evaluated during training; the val folder only at the end."""
    if cfg.task == "segment":
        return build_segmentation_datasets(cfg)
    d, m = cfg.data, cfg.model
    if cfg.task == "pretrain":
        train_tf = mdata.pretrain_transform(m.img_size, scale=(d.crop_min_scale, 1.0))     # uint8
    else:
        a = cfg.aug
        train_tf = mdata.finetune_transform(m.img_size, d.mean, d.std, auto_augment=a.auto_augment or None,
                                            re_prob=a.reprob, scale=(a.crop_min_scale, 1.0))
    eval_tf = mdata.eval_transform(m.img_size, d.mean, d.std, crop_pct=d.eval_crop_pct)
    kw = dict(strict=d.strict, cache=d.cache)
    if d.dataset != "default":
        kw.update(progress=progress, **({"cache_dir": d.cache_dir} if d.cache_dir else {}))
    full = mdata.build_dataset(d.dataset, d.train_split, train_tf, key="data.train_split", **kw)
    val = mdata.build_dataset(d.dataset, d.val_split, eval_tf, key="data.val_split", **kw) if d.val_split else None
    keep, held = list(range(len(full))), []
    if d.holdout > 0:
        keep, held = mdata.holdout_split(full.targets, d.holdout, d.holdout_seed)
        log.info("held out %d of %d training images (%.0f %% of each class) for evaluation during training",
                 len(held), len(full), 100 * d.holdout)
    probe_keep = keep                                                        # the probes' labelled images
    for fraction, what in ((d.label_fraction, "training on the labels of"), (d.pretrain_fraction, "pretraining on")):
        if fraction < 1:                                                     # one per task (RunConfig checks)
            keep = mdata.labelled_subset(full.targets, keep, fraction, d.holdout_seed)
            log.info("%s %d of %d training images (%.0f %% of each class)", what, len(keep), len(full) - len(held),
                     100 * fraction)
    train = mdata.IndexedView(full, keep) if len(keep) < len(full) else full
    holdout = mdata.IndexedView(full, held, transform=eval_tf) if held else None
    probes = cfg.task == "pretrain" and cfg.probe
    train_eval = mdata.IndexedView(full, probe_keep, transform=eval_tf) if probes else None
    return RunData(train, holdout if held else val, "holdout" if held else "val", val, train_eval)


def build_segmentation_datasets(cfg: RunConfig) -> RunData:
    """Image/mask pairs of a segment run: the training split (joint augmentation) and, at full resolution, the split
    evaluated during training (seg.eval_split, else the data.holdout part, else data.val_split) and data.val_split,
    scored once at the end."""
    d, s = cfg.data, cfg.seg
    train_tf = mdata.seg_train_transform(s.crop_size, d.mean, d.std, s.ignore_index, s.scale_range, s.hflip, s.vflip,
                                         s.photometric)
    eval_tf = mdata.seg_eval_transform(d.mean, d.std, s.ignore_index)

    def split(name: str, transform) -> mdata.SegmentationFolder:
        pairs = mdata.split_pairs(Path(d.dataset), name, s.image_dir, s.mask_dir, s.split_sizes, s.split_seed)
        return mdata.SegmentationFolder(pairs, cfg.num_classes, s.ignore_index, transform, s.class_names, d.strict,
                                        root=d.dataset)
    full = split(d.train_split, train_tf)
    val = split(d.val_split, eval_tf) if d.val_split else None
    if s.eval_split:
        return RunData(full, split(s.eval_split, eval_tf), "eval", val, None)
    if d.holdout > 0:
        keep, held = mdata.holdout_split(full.targets, d.holdout, d.holdout_seed)
        log.info("held out %d of %d training pairs for evaluation during training", len(held), len(full))
        return RunData(mdata.SegmentationView(full, keep), mdata.SegmentationView(full, held, eval_tf), "holdout",
                       val, None)
    return RunData(full, val, "val", val, None)


def build_evaluator(cfg: RunConfig, classes: list[str]):
    """The task's evaluator (`mal.engine.evaluate`): a classifier's top-1 / top-5, a segmenter's mIoU / mDice."""
    if cfg.task != "segment":
        return ClassificationEvaluator()
    s = cfg.seg
    return SegmentationEvaluator(cfg.num_classes, s.ignore_index, classes, s.inference, s.crop_size, s.stride)


def loader_workers(n: int) -> int:
    """data.num_workers, with -1 = what the machine has (`mal.data.default_num_workers`), capped at its CPUs."""
    return mdata.default_num_workers() if n < 0 else mdata.cap_num_workers(n)


def eval_loader(ds: Dataset, cfg: RunConfig, info: DistInfo, distributed: bool,
                batch_size: int | None = None, collate_fn=None, persistent: bool = False) -> DataLoader:
    """In-order evaluation loader; sharded over processes when `distributed` (default batch: the micro-batch).
    `persistent` keeps its workers between passes (for a loader read again and again during training)."""
    micro = max(1, cfg.optim.batch_size // cfg.optim.accum_steps // info.world_size)
    return mdata.build_loader(ds, batch_size or micro, train=False, num_workers=loader_workers(cfg.data.num_workers),
                              distributed=distributed and info.enabled, persistent_workers=persistent,
                              collate_fn=collate_fn)


def check_compatible(cfg: RunConfig, meta: dict[str, Any], source: str) -> None:
    """Raise a ValueError naming every architecture field where the checkpoint and the config differ."""
    theirs = meta.get("config", {}).get("model", {})
    diffs = [f"model.{k}: checkpoint {theirs[k]} vs config {getattr(cfg.model, k)}"
             for k in MODEL_KEYS_MUST_MATCH if k in theirs and theirs[k] != getattr(cfg.model, k)]
    if diffs:
        raise ValueError(f"incompatible checkpoint {source}: " + "; ".join(diffs) +
                         ". Use the same model preset/dims as the checkpoint.")


def build_model(cfg: RunConfig, num_classes: int, load_init: bool = True) -> nn.Module:
    """The pretraining objective of `objective.kind`, a classifier of `model.arch`, or a `Segmenter`. Fine-tuning loads
    the pretrained encoder strictly (segment: when `init` is set) unless `load_init` is False, as when a resumed
    run loads its own weights."""
    if cfg.task == "pretrain":
        return create_objective(cfg.model, cfg.objective)
    if cfg.task == "segment":
        model = Segmenter(cfg.model, cfg.seg, num_classes)
        if load_init and cfg.init:
            load_init_encoder(model.encoder, cfg)
        elif load_init:
            log.info("segment: no init checkpoint, the encoder starts from random weights")
        return model
    model = create_encoder(cfg.model, num_classes=num_classes)
    if cfg.task == "finetune" and load_init:
        if not cfg.init:
            raise ValueError("fine-tuning needs a pretraining checkpoint: pass --init runs/NAME/ckpt_last "
                             "(or use `mal supervised` to train from scratch)")
        load_init_encoder(model, cfg)
    return model


def load_init_encoder(encoder: nn.Module, cfg: RunConfig) -> None:
    """The encoder of checkpoint `cfg.init` (a MAL / MAE pretraining or a classifier checkpoint folder, or a bare
    .safetensors) into `encoder`, strictly (`mal.checkpoint.load_encoder`: position embedding resampled to the
    encoder's grid). A head-less encoder (a segmenter's) leaves a classifier's head out."""
    state = load_weights(Path(cfg.init))
    if Path(cfg.init).is_dir():
        meta = read_meta(Path(cfg.init))
        if meta.get("task") == "segment":
            raise ValueError(f"{cfg.init} is a segmentation run; --init takes a pretraining (MAL, MAE) or a "
                             f"classification checkpoint. Continue a segmentation run with --resume")
        pre = meta.get("config", {})
        arch = pre.get("model", {}).get("arch", "vil")                      # checkpoints before the ViT: ViL
        if arch != cfg.model.arch:
            raise ValueError(f"incompatible checkpoint {cfg.init}: its encoder is model.arch={arch}, the config "
                             f"has model.arch={cfg.model.arch}; use a {arch} config")
        check_compatible(cfg, meta, cfg.init)
        if pre.get("objective", {}).get("kind", "mal") == "mal":            # MAE trains every position
            fill_unseen_positions(state, pre.get("model", {}))
    head = [k for k in state if k.startswith("head.")]
    if head and not any(k.startswith("head.") for k in encoder.state_dict()):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        log.info("%s: the classifier head (%s) is not transferred", cfg.init, ", ".join(head))
    report = load_encoder(encoder, state)
    log.info("loaded %s: dropped %d pretraining-only tensors, new %s", cfg.init, len(report["dropped"]),
             report["new"])


def build_criterion(cfg: RunConfig, num_classes: int) -> tuple[nn.Module | None, Any]:
    """(loss on logits, timm Mixup or None) of a classification or segment run; (None, None) for pretraining."""
    if cfg.task == "pretrain":
        return None, None
    if cfg.task == "segment":
        return SegLoss(cfg.seg.loss, cfg.seg.ignore_index, cfg.seg.dice_weight), None
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


__all__ = ["RunData", "build_datasets", "build_segmentation_datasets", "build_evaluator",
           "loader_workers", "eval_loader", "check_compatible", "build_model", "load_init_encoder", "build_criterion"]
