"""Evaluation of a classifier: top-1 / top-5 and mean cross-entropy, summed over processes."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..distributed import all_reduce_sum


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
