"""Evaluation: top-1/top-5 of a classifier, and k-NN / linear-probe accuracy of frozen encoder features."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .distributed import all_reduce_sum

KNN_TEMPERATURE = 0.07       # DINO's weighted k-NN temperature
PROBE_EPOCHS = 100
PROBE_LR = 1e-3
PROBE_WD = 1e-4
PROBE_BATCH = 256


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


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device: torch.device, amp: bool = True,
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled (bilateral) features of a frozen `VisionLSTM`: (N, 2D) float32 on CPU, labels (N,)."""
    encoder.eval()
    feats, labels = [], []
    for imgs, y in tqdm(loader, desc="features", disable=not progress, leave=False):
        with autocast_for(device, amp):
            f = encoder.forward_head(encoder.forward_features(imgs.to(device, non_blocking=True)), pre_logits=True)
        feats.append(f.float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, num_classes: int | None = None, chunk: int = 1024) -> float:
    """Weighted k-NN (cosine similarity, exp(sim / 0.07) votes) top-1 accuracy in %."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(train_f))
    correct = 0
    for s in range(0, len(test_f), chunk):
        sim = test_f[s:s + chunk] @ train_f.T                               # (b, Ntrain)
        top_sim, top_idx = sim.topk(k, dim=1)                              # (b, k)
        votes = torch.zeros(len(top_sim), num_classes)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / KNN_TEMPERATURE).exp())
        correct += (votes.argmax(1) == test_y[s:s + chunk]).sum().item()
    return 100.0 * correct / len(test_f)


def linear_probe_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                          num_classes: int | None = None, epochs: int = PROBE_EPOCHS, seed: int = 0,
                          device: torch.device | str = "cpu") -> float:
    """Logistic regression on standardized frozen features (AdamW, cosine lr); test top-1 in %."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    xtr, xte = ((train_f - mean) / std).to(device), ((test_f - mean) / std).to(device)
    ytr, yte = train_y.to(device), test_y.to(device)
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(xtr.shape[1], num_classes).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=PROBE_LR, weight_decay=PROBE_WD)
    steps = epochs * max(1, (len(xtr) + PROBE_BATCH - 1) // PROBE_BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(xtr), generator=g).to(device)
            for s in range(0, len(xtr), PROBE_BATCH):
                idx = perm[s:s + PROBE_BATCH]
                loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        return 100.0 * (head(xte).argmax(1) == yte).float().mean().item()
