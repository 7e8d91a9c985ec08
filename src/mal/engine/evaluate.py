"""Evaluation during and after training, summed over processes: a classifier's top-1 / top-5 and mean
cross-entropy, a segmenter's mIoU / mDice / pixel accuracy. Each task has an evaluator object with the same face
(`fields` logged in metrics.csv, `describe`, `collate` of its loader, `__call__(model, loader, device, amp)`), so
the trainer does not branch on the task."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..distributed import all_reduce_sum
from ..viz import save_segmentation_grid


def autocast_for(device: torch.device, amp: bool, cache: bool = True):
    """bf16 autocast on CUDA when amp is on; a no-op elsewhere. cache=False for CUDA-graph capture."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return nullcontext()


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, device: torch.device, amp: bool = True,
                        progress: bool = False) -> dict[str, float]:
    """Top-1, top-5 (%) and mean cross-entropy over the loader, summed over all processes."""
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)   # correct1, correct5, loss_sum, count
    for imgs, labels in tqdm(loader, desc="eval", disable=not progress, leave=False):
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast_for(device, amp):
            logits = model(imgs)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices          # (B, 5)
        hit = top == labels.unsqueeze(1)                                   # (B, 5)
        stats += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), F.cross_entropy(logits, labels, reduction="sum"),
                              torch.tensor(float(len(labels)), device=device)]).double()
    all_reduce_sum(stats)
    n = stats[3].clamp(min=1)
    return {"top1": (100 * stats[0] / n).item(), "top5": (100 * stats[1] / n).item(), "loss": (stats[2] / n).item()}


class ClassificationEvaluator:
    """Top-1, top-5 (%) and mean cross-entropy of a classifier (`evaluate_classifier`)."""

    fields = ("top1", "top5", "loss")
    collate: Callable | None = None

    def describe(self, res: dict[str, float]) -> str:
        return f"top-1 {res['top1']:.2f} %"

    def __call__(self, model: nn.Module, loader, device: torch.device, amp: bool = True, progress: bool = False
                 ) -> dict[str, float]:
        return evaluate_classifier(model, loader, device, amp, progress)


class SegmentationEvaluator:
    """mIoU, mDice, pixel accuracy (%), the loss's cross-entropy term and per-class IoU / Dice of a `Segmenter`,
    with whole-image or sliding-window inference (`mal.segment.metrics`)."""

    fields = ("miou", "mdice", "acc", "loss")

    def __init__(self, num_classes: int, ignore_index: int, class_names: Sequence[str], mode: str = "whole",
                 crop: tuple[int, int] | None = None, stride: tuple[int, int] | None = None):
        from ..data.segmentation import PadCollate
        self.num_classes, self.ignore_index, self.class_names = num_classes, ignore_index, list(class_names)
        self.mode, self.crop, self.stride = mode, crop, stride
        self.collate = PadCollate(ignore_index)

    def describe(self, res: dict[str, float]) -> str:
        return f"mIoU {res['miou']:.2f} %, mDice {res['mdice']:.2f} %, pixel accuracy {res['acc']:.2f} %"

    @torch.no_grad()
    def __call__(self, model: nn.Module, loader, device: torch.device, amp: bool = True, progress: bool = False
                 ) -> dict[str, float]:
        from ..segment.loss import cross_entropy
        from ..segment.metrics import confusion_matrix, scores_from_confusion
        model.eval()
        confmat = confusion_matrix(self.num_classes, self.ignore_index, device)
        stats = torch.zeros(2, dtype=torch.float64, device=device)          # loss sum (per image), images
        for imgs, masks in tqdm(loader, desc="eval", disable=not progress, leave=False):
            imgs, masks = imgs.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            with autocast_for(device, amp):
                logits = model.predict(imgs, self.mode, self.crop, self.stride)   # (B, C, H, W)
            confmat.update(logits.argmax(1), masks)
            stats += torch.stack([cross_entropy(logits, masks, self.ignore_index).double() * len(imgs),
                                  torch.tensor(float(len(imgs)), dtype=torch.float64, device=device)])
        total = all_reduce_sum(confmat.compute().double())                  # (C, C) over all processes
        all_reduce_sum(stats)
        return {**scores_from_confusion(total, self.class_names), "loss": (stats[0] / stats[1].clamp(min=1)).item()}


@torch.no_grad()
def save_segmentation_predictions(model: nn.Module, dataset, evaluator: SegmentationEvaluator, path: Path,
                                  device: torch.device, mean, std, samples: int = 8, amp: bool = True) -> Path:
    """predictions.png of a `Segmenter`: `samples` images spread evenly over `dataset` (full resolution, the
    evaluator's inference mode), their ground truth and the prediction as class-colour overlays."""
    n = min(samples, len(dataset))
    idx = sorted({round(i * (len(dataset) - 1) / max(1, n - 1)) for i in range(n)})
    imgs, masks = evaluator.collate([dataset[i] for i in idx])              # (n, 3, H, W), (n, H, W)
    model.eval()
    with autocast_for(device, amp):
        logits = model.predict(imgs.to(device), evaluator.mode, evaluator.crop, evaluator.stride)
    return save_segmentation_grid(path, imgs, masks, logits.argmax(1).cpu(), mean, std, evaluator.class_names)
