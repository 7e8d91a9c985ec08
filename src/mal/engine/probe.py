"""Frozen-encoder probes: k-NN and linear-probe accuracy of pooled features (used after pretraining and by
`mal eval`). The encoder is probed as it was pretrained (causal, no reversed layers)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .evaluate import autocast_for

KNN_TEMPERATURE = 0.07       # DINO's weighted k-NN temperature
PROBE_EPOCHS = 100
PROBE_LR = 1e-3
PROBE_WD = 1e-4
PROBE_BATCH = 256
PROBE_FIELDS = ("knn_top1", "linprobe_top1")   # what a probe scores, logged as eval_<name> during pretraining


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """Features of a token sequence (B, N, D) in the last layer's order: the mean of the tokens (B, D), the last
    token (B, D) (a causal encoder's summary of the whole image) or the first and last tokens (B, 2D)."""
    if pool == "mean":
        return tokens.mean(1)
    if pool == "last":
        return tokens[:, -1]
    if pool == "first_last":
        return torch.cat([tokens[:, 0], tokens[:, -1]], dim=-1)
    raise ValueError(f"unknown probe pooling {pool!r}; choose mean, last or first_last")


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device: torch.device, amp: bool = True, pool: str = "mean",
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of a frozen `VisionLSTM`'s last layer: (N, D or 2D) float32 on CPU, labels (N,)."""
    encoder.eval()
    feats, labels = [], []
    for imgs, y in tqdm(loader, desc="features", disable=not progress, leave=False):
        with autocast_for(device, amp):
            tokens = encoder.forward_features(imgs.to(device, non_blocking=True))    # (B, N, D)
        feats.append(pool_tokens(tokens.float(), pool).cpu())
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
    head = nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():                                # seeded init: the same probe in every call
        bound = 1 / xtr.shape[1] ** 0.5
        head.weight.uniform_(-bound, bound, generator=g)
        head.bias.uniform_(-bound, bound, generator=g)
    head = head.to(device)
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


def probe_encoder(encoder: nn.Module, make_loader, train_set, test_set, device: torch.device, amp: bool,
                  knn: bool = True, linear: bool = True, knn_k: int = 20, num_classes: int | None = None,
                  pool: str = "mean", seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """k-NN and/or linear-probe top-1 (%) of a frozen encoder: features of `train_set` are the memory / the
    probe's training set, `test_set` is scored. `make_loader(dataset)` gives an in-order loader. The result
    names the pooling (`probe_pool`)."""
    out: dict[str, Any] = {"probe_pool": pool}
    if not (knn or linear):
        return out
    tr_f, tr_y = extract_features(encoder, make_loader(train_set), device, amp, pool, progress=progress)
    te_f, te_y = extract_features(encoder, make_loader(test_set), device, amp, pool, progress=progress)
    num_classes = num_classes or len(getattr(train_set, "classes", [])) or None
    if knn:
        out["knn_top1"] = knn_accuracy(tr_f, tr_y, te_f, te_y, k=knn_k, num_classes=num_classes)
    if linear:
        out["linprobe_top1"] = linear_probe_accuracy(tr_f, tr_y, te_f, te_y, num_classes=num_classes, seed=seed,
                                                     device=device)
    return out
