"""The optimizer side of a run: AdamW parameter groups (weight decay, layer-wise lr decay) and the schedule."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from timm.models import group_parameters


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 blocks_per_group: int = 1) -> list[dict[str, Any]]:
    """AdamW groups. No weight decay for 1-D parameters (biases, norms) and the model's `no_weight_decay()`.
    With layer_decay < 1, group g of the model's `group_matcher` layer map (0 = embeddings ... G = final norm
    and head) trains at lr * layer_decay^(G - g), stored as each group's `lr_scale`."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    layer: dict[str, int] = {}
    if layer_decay < 1:
        if not hasattr(model, "group_matcher"):
            raise ValueError(f"optim.layer_decay={layer_decay} needs a model with a layer map (group_matcher); "
                             f"{type(model).__name__} has none: set optim.layer_decay=1")
        layer = group_parameters(model, model.group_matcher(coarse=False, blocks_per_group=blocks_per_group),
                                 reverse=True)
    top = max(layer.values(), default=0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name in skip
        lid = layer.get(name, top)
        g = groups.setdefault((lid, no_wd), {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                             "lr_scale": layer_decay ** (top - lid)})
        g["params"].append(p)
    return list(groups.values())


def cosine_lr(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warm-up to `base` over `warmup` steps, then half-cosine to `floor` at `total`."""
    if step < warmup:
        return base * step / max(1, warmup)
    t = (step - warmup) / max(1, total - warmup)
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each group's lr: lr * its lr_scale; filled in place where the lr is a device tensor (a captured AdamW)."""
    for g in optimizer.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr * g.get("lr_scale", 1.0))
        else:
            g["lr"] = lr * g.get("lr_scale", 1.0)


def make_optimizer(groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device
                   ) -> torch.optim.AdamW:
    """AdamW, fused into a few kernels per parameter group on CUDA."""
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def adapt_loaded_optimizer(optimizer: torch.optim.AdamW, device: torch.device) -> None:
    """After `load_state_dict`: a checkpoint written on another device type keeps working here
    (fused only on CUDA; the fused kernel wants its step counters on the parameters' device), and one written by
    a captured AdamW (`graph_optimizer`) steps eagerly until a graph captures it again."""
    fused = device.type == "cuda"
    for g in optimizer.param_groups:
        g["fused"], g["capturable"] = fused, False
        if isinstance(g["lr"], torch.Tensor):
            g["lr"] = float(g["lr"])
        if fused:
            g["foreach"] = None
        for p in g["params"]:
            st = optimizer.state.get(p, {})
            if "step" in st:
                st["step"] = st["step"].to(device=p.device if fused else "cpu", dtype=torch.float32)


__all__ = ["param_groups", "cosine_lr", "set_lr", "make_optimizer", "adapt_loaded_optimizer"]
