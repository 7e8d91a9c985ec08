"""Segmentation metrics: a torchmetrics confusion matrix over every evaluated pixel that is not ignored, summed over
processes, and the scores derived from it as mmsegmentation reports them.

For class c with tp, fp, fn pixels: IoU = tp / (tp + fp + fn), Dice = 2 tp / (2 tp + fp + fn). A class that is
neither in the masks nor predicted has no score (NaN) and is left out of the means (mIoU, mDice); pixel accuracy
is the fraction of pixels predicted right. Scores are in %.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
from torchmetrics.classification import MulticlassConfusionMatrix


def metric_key(name: str) -> str:
    """A class name as part of a metric key: letters, digits and underscores ("sign/symbol" -> "sign_symbol")."""
    return re.sub(r"\W+", "_", name).strip("_") or "class"


def scores_from_confusion(confmat: torch.Tensor, class_names: Sequence[str]) -> dict[str, float]:
    """mIoU, mDice, pixel accuracy and per-class IoU / Dice (%) from a confusion matrix (rows: truth, columns:
    prediction)."""
    cm = confmat.double().cpu()
    tp = cm.diag()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(tp + fp + fn > 0, tp / (tp + fp + fn), nan)
    dice = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), nan)
    out = {"miou": 100 * iou.nanmean().item(), "mdice": 100 * dice.nanmean().item(),
           "acc": 100 * (tp.sum() / cm.sum().clamp(min=1)).item()}
    for name, i, d in zip(class_names, iou.tolist(), dice.tolist()):
        out[f"iou_{metric_key(name)}"], out[f"dice_{metric_key(name)}"] = 100 * i, 100 * d
    return out


def confusion_matrix(num_classes: int, ignore_index: int, device: torch.device | str) -> MulticlassConfusionMatrix:
    """torchmetrics' confusion matrix of (predicted class (B, H, W), mask (B, H, W)) pairs, pixels equal to
    `ignore_index` left out; not synced by torchmetrics (the engine sums it over processes)."""
    return MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False,
                                     sync_on_compute=False).to(device)

__all__ = ["confusion_matrix", "scores_from_confusion", "metric_key"]
