"""Segmentation losses on logits (B, C, H, W) and masks (B, H, W) with an ignored value.

Both terms are means of per-pixel or per-image quantities over a fixed count (every pixel, every image), so the
mean over micro-batches equals the loss of the whole batch: the weights do not depend on the number of processes
or on gradient accumulation, as for classification.

- cross-entropy: summed over the pixels that are not ignored, divided by all pixels (mmseg's default,
  `avg_non_ignore=False`): an ignored pixel contributes 0.
- soft Dice (`ce_dice`): per image and per class c >= 1 (class 0 is the background of a binary or medical mask),
  1 - (2 sum p_c g_c + 1) / (sum p_c + sum g_c + 1) over the pixels that are not ignored, p = softmax; averaged
  over classes and images.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DICE_SMOOTH = 1.0


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean over all pixels of the per-pixel cross-entropy, 0 at ignored pixels."""
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none").mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """1 - soft Dice of the classes 1..C-1, per image, averaged (ignored pixels left out)."""
    C = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)                            # (B, 1, H, W)
    prob = logits.float().softmax(1) * valid                                 # (B, C, H, W)
    onehot = F.one_hot(target.masked_fill(~valid[:, 0], 0), C).permute(0, 3, 1, 2) * valid   # (B, C, H, W)
    prob, onehot = prob[:, 1:].flatten(2), onehot[:, 1:].flatten(2).float()  # (B, C-1, HW)
    inter, total = (prob * onehot).sum(-1), prob.sum(-1) + onehot.sum(-1)   # (B, C-1)
    return (1 - (2 * inter + DICE_SMOOTH) / (total + DICE_SMOOTH)).mean()


class SegLoss(nn.Module):
    """`loss(logits, masks)`: cross-entropy, plus `dice_weight` x soft Dice for kind="ce_dice"."""

    def __init__(self, kind: str = "ce", ignore_index: int = -1, dice_weight: float = 1.0):
        super().__init__()
        if kind not in ("ce", "ce_dice"):
            raise ValueError(f"segmentation loss must be 'ce' or 'ce_dice', got {kind!r}")
        self.kind, self.ignore_index, self.dice_weight = kind, ignore_index, dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = cross_entropy(logits, target, self.ignore_index)
        if self.kind == "ce_dice":
            loss = loss + self.dice_weight * soft_dice_loss(logits, target, self.ignore_index)
        return loss


__all__ = ["SegLoss", "cross_entropy", "soft_dice_loss"]
