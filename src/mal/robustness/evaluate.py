"""`mal eval --corruptions`: a classifier's top-1 on ImageNet-C-corrupted test images, against a baseline.

The corrupted images are the ones `mal.data.eval_transform` would feed the model, before normalization: decoded,
resized and center-cropped to img_size (uint8), corrupted, then normalized on the device. They are made once
per machine (cache.py), so a second model is evaluated on the same pixels in seconds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torchvision import transforms as T
from tqdm.auto import tqdm

from .. import data as mdata
from ..config import RunConfig
from ..engine.evaluate import evaluate_classifier
from . import cache, corruptions as C, report
from .metrics import Results, error, summarize

log = logging.getLogger("mal")


@dataclass
class RobustnessOptions:
    """What to evaluate and where; built (and checked) from the command line before any work starts."""
    corruptions: list[str]
    severities: list[int]
    out_dir: Path
    cache_dir: Path
    workers: int
    backend: str                                   # 'imagecorruptions-imaug-<version>': part of the cache key
    baseline: tuple[dict, Results, float] | None   # (its JSON, its top-1 table, its clean top-1)
    batch_size: int = 256
    progress: bool = True

    @property
    def pairs(self) -> list[tuple[str, int]]:
        return [(c, s) for c in self.corruptions for s in self.severities]


def options_from_args(args, checkpoint: Path, img_size: int) -> RobustnessOptions:
    """Parse --corruptions/--severities/--baseline/--cache-dir/--workers/--out for a model of `img_size`; fails
    fast on any mistake, the missing extra included."""
    if img_size < C.MIN_SIDE:
        raise ValueError(f"the ImageNet-C corruptions need images of at least {C.MIN_SIDE}x{C.MIN_SIDE} pixels, but "
                         f"this model's img_size is {img_size}; evaluate a model trained at {C.MIN_SIDE} px or more")
    names = C.parse_corruptions(args.corruptions)
    sev = C.parse_severities(args.severities or "1-5")
    backend = C.backend_tag()
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be >= 0 (0: corrupt in this process), got {args.workers}")
    baseline = report.load_baseline(args.baseline, names, sev) if args.baseline else None
    return RobustnessOptions(
        corruptions=names, severities=sev, backend=backend, baseline=baseline,
        out_dir=Path(args.out) if args.out else report.out_dir_for(checkpoint),
        cache_dir=Path(args.cache_dir).expanduser() if args.cache_dir else cache.default_cache_dir(),
        workers=cache.cpu_workers() if args.workers is None else args.workers, batch_size=args.batch_size)


class FromUint8(nn.Module):
    """Feeds uint8 (B, H, W, 3) images to a model as ToTensor + Normalize would (on the model's device: 4x less
    to copy than floats)."""

    def __init__(self, model: nn.Module, mean, std) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).contiguous().float().div(255)             # (B, 3, H, W) in [0, 1]
        return self.model((x - self.mean) / self.std)                       # (B, num_classes)


def pixel_transform(cfg: RunConfig) -> T.Compose:
    """eval_transform's resize + center crop (no normalization), ending in a uint8 (3, H, W) tensor."""
    tf = mdata.eval_transform(cfg.model.img_size, cfg.data.mean, cfg.data.std, crop_pct=cfg.data.eval_crop_pct)
    geometric = [t for t in tf.transforms if not isinstance(t, (T.ToTensor, T.Normalize))]
    return T.Compose([*geometric, T.PILToTensor()])


def build_image_set(cfg: RunConfig, dataset: str, split: str, opts: RobustnessOptions, loader) -> cache.ImageSet:
    """The clean test images at model resolution, from the cache or decoded once into it (`loader`: the
    in-order eval DataLoader of a dataset)."""
    side = cfg.model.img_size
    tf = pixel_transform(cfg)
    ds = mdata.build_dataset(dataset, split, tf, strict=cfg.data.strict)
    name, key = cache.fingerprint(ds, repr(tf))
    folder = opts.cache_dir / f"{name}-{key}"
    meta = {"dataset": str(dataset), "split": split, "num_images": len(ds), "transform": repr(tf)}

    def decode():
        for x, y in tqdm(loader(ds), desc=f"decoding {name}", disable=not opts.progress, leave=False):
            yield x.permute(0, 2, 3, 1).numpy(), y.numpy()                  # (B, H, W, 3) uint8, (B,)
    return cache.clean_set(folder, decode, meta, (len(ds), side, side, 3))


def _batches(images: np.ndarray, labels: np.ndarray, batch_size: int):
    """In-order (uint8 (B, H, W, 3), int64 (B,)) batches of a (memory-mapped, read-only) image array, copied."""
    for a in range(0, len(images), batch_size):
        yield torch.from_numpy(np.array(images[a:a + batch_size])), torch.from_numpy(labels[a:a + batch_size])


def evaluate_table(model: nn.Module, image_set: cache.ImageSet, opts: RobustnessOptions, cfg: RunConfig,
                   device: torch.device) -> tuple[dict, Results]:
    """(clean metrics, results[corruption][severity] metrics); each metric dict: top1, top5, loss, error (%)."""
    net = FromUint8(model, cfg.data.mean, cfg.data.std).to(device)

    def run(images: np.ndarray) -> dict:
        m = evaluate_classifier(net, _batches(images, image_set.labels, opts.batch_size), device, cfg.amp)
        return {**m, "error": error(m["top1"])}

    clean = run(image_set.images)
    results: Results = {c: {} for c in opts.corruptions}
    for c, s in tqdm(opts.pairs, desc="evaluating", unit="set", disable=not opts.progress):
        arr = np.load(image_set.corrupted_path(c, s, opts.backend), mmap_mode="r")      # (N, H, W, 3)
        results[c][s] = run(arr)
    return clean, results


def run_robustness(model: nn.Module, cfg: RunConfig, dataset: str, split: str, checkpoint: Path,
                   device: torch.device, opts: RobustnessOptions, loader) -> dict:
    """Make (or reuse) the corrupted sets, evaluate the model on each, write robustness.json/.csv/.png; returns
    the JSON document plus the paths of the files."""
    image_set = build_image_set(cfg, dataset, split, opts, loader)
    made = cache.ensure_corrupted(image_set, opts.pairs, opts.backend, opts.workers, opts.progress)
    log.info("corrupted sets: %d made, %d from the cache %s", made, len(opts.pairs) - made, image_set.folder)
    clean, results = evaluate_table(model, image_set, opts, cfg, device)
    base_doc, base_table, base_clean = opts.baseline or (None, None, None)
    doc = {"checkpoint": str(checkpoint), "dataset": str(dataset), "split": split,
           "num_images": len(image_set.images), "img_size": cfg.model.img_size, "image_set": image_set.folder.name,
           "backend": opts.backend, "corruptions": opts.corruptions, "severities": opts.severities, "clean": clean,
           "results": {c: {str(s): r for s, r in v.items()} for c, v in results.items()},
           **summarize(results, clean["top1"], base_table, base_clean),
           "baseline": _baseline_info(base_doc, image_set.folder.name)}
    doc["files"] = report.write_all(opts.out_dir, doc)
    _log_table(doc)
    return doc


def _baseline_info(base: dict | None, image_set: str) -> dict | None:
    """Where the baseline's numbers come from; a warning when they were measured on other pixels (another test
    set, resolution or crop), which makes the CE ratios compare different images."""
    if base is None:
        return None
    if base.get("image_set") != image_set:
        log.warning("the baseline %s was evaluated on other images (%s, not %s): its CE ratios compare different "
                    "test sets", base["path"], base.get("image_set"), image_set)
    return {"path": base["path"], "checkpoint": base.get("checkpoint"), "clean_top1": base["clean"]["top1"],
            "image_set": base.get("image_set")}


def _log_table(doc: dict) -> None:
    lines = [f"{'corruption':<18} {'top-1 %':>8} {'CE %':>7} {'rel. CE %':>9}"]
    for c in doc["corruptions"]:
        v = doc["per_corruption"][c]
        lines.append(f"{c:<18} {v['top1']:8.2f} {_num(v.get('ce')):>7} {_num(v.get('relative_ce')):>9}")
    lines.append(f"{'clean':<18} {doc['clean']['top1']:8.2f}")
    lines.append(f"{'mean corrupted':<18} {doc['mean_corruption_top1']:8.2f} {_num(doc['mce']):>7} "
                 f"{_num(doc['relative_mce']):>9}")
    log.info("robustness of %s:\n%s", doc["checkpoint"], "\n".join(lines))


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


__all__ = ["RobustnessOptions", "options_from_args", "FromUint8", "pixel_transform", "build_image_set",
           "evaluate_table", "run_robustness"]
