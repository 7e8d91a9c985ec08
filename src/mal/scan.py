"""Scan plans: the token gathers that put each layer's tokens into that layer's scan order.

A stack of layers scans one set of tokens in per-layer orders. Tokens stay in the previous layer's order
between layers, so layer l needs one gather from layer l-1's order to its own (none when the order does not
change), and a final gather takes the last layer's order back to the canonical layout (raster order for the
encoder, the slot layout for the pretraining objective). A `ScanPlan` owns those gathers and caches them per
device; a `RandomScanPlan` draws new per-sample cluster sequences on the device at every call. The encoder,
the objective and the decoder all run their blocks through `plan.run`. `plan.run_taking` also returns the outputs
of chosen layers, each gathered back to the canonical layout with the inverse of that layer's own order (the
encoder's `forward_intermediates`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .serialization import cluster_grid, gather_tokens, inverse, order_from_clusters

Gathers = tuple[list[torch.Tensor | None], torch.Tensor | None]
LayerGathers = tuple[list[torch.Tensor | None], list[torch.Tensor | None]]


def _is_identity(idx: torch.Tensor) -> bool:
    return torch.equal(idx, torch.arange(idx.shape[-1], device=idx.device).expand_as(idx))


def plan_steps(orders: list[torch.Tensor]) -> Gathers:
    """Per-layer orders over a canonical layout ((N,) shared or (B, N) per sample) -> (steps, back):
    step l gathers layer l's sequence from layer l-1's (None when unchanged), `back` gathers the last
    layer's sequence back to the canonical layout (None when it is canonical)."""
    steps: list[torch.Tensor | None] = []
    cur_inv = None
    for perm in orders:
        if cur_inv is None:
            idx = perm
        elif perm.dim() == 1 and cur_inv.dim() == 1:
            idx = cur_inv[perm]
        else:
            B = max(perm.shape[0] if perm.dim() == 2 else 1, cur_inv.shape[0] if cur_inv.dim() == 2 else 1)
            idx = torch.gather(cur_inv.expand(B, -1), 1, perm.expand(B, -1))
        steps.append(None if _is_identity(idx) else idx)
        cur_inv = inverse(perm)
    back = inverse(orders[-1])
    return steps, None if _is_identity(back) else back


class ScanPlan:
    """Fixed per-layer orders; their gathers are built once per device."""

    def __init__(self, orders: list[torch.Tensor]):
        if not orders:
            raise ValueError("a scan plan needs at least one layer")
        self.orders = [o.cpu() for o in orders]
        self._gathers: dict[str, Gathers] = {}
        self._backs: dict[str, list[torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self.orders)

    def gathers(self, device: torch.device | str, batch: int = 1) -> Gathers:
        """(steps, back) on `device` (the batch does not matter for fixed orders)."""
        key = str(device)
        if key not in self._gathers:
            steps, back = plan_steps(self.orders)
            move = lambda t: None if t is None else t.to(device)
            self._gathers[key] = [move(s) for s in steps], move(back)
        return self._gathers[key]

    def layer_gathers(self, device: torch.device | str, batch: int = 1) -> LayerGathers:
        """(steps, backs) on `device`: `steps` as in `gathers`, and per layer l the gather `backs[l]` from layer l's
        sequence back to the canonical layout (None when layer l scans the canonical layout)."""
        key = str(device)
        if key not in self._backs:
            backs = [inverse(o) for o in self.orders]
            self._backs[key] = [None if _is_identity(b) else b.to(device) for b in backs]
        return self.gathers(device, batch)[0], self._backs[key]

    def run_taking(self, blocks: nn.ModuleList, x: torch.Tensor, take: set[int] | list[int],
                   canonical: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the first len(blocks) layers on x (B, N, D) in canonical layout, each on its layer's order (a prefix
        of the plan's stack: stop early). Returns the tokens after the last block run (canonical layout, or that
        layer's order with canonical=False) and the outputs of the layers in `take`, in increasing layer order,
        each gathered back to the canonical layout."""
        if len(blocks) > len(self):
            raise ValueError(f"the plan has {len(self)} layers, the stack {len(blocks)}")
        steps, backs = self.layer_gathers(x.device, x.shape[0])
        back = lambda t, b: t if b is None else gather_tokens(t, b)
        taken = []
        for layer, (blk, idx) in enumerate(zip(blocks, steps)):
            x = blk(x, idx)                                                  # (B, N, D) in the layer's order
            if layer in take:
                taken.append(back(x, backs[layer]))                          # (B, N, D) canonical layout
        return (back(x, backs[len(blocks) - 1]) if canonical else x), taken

    def run(self, blocks: nn.ModuleList, x: torch.Tensor, canonical: bool = True) -> torch.Tensor:
        """Run `blocks` on x (B, N, D) in canonical layout, each on its layer's order. Returns the tokens in the
        canonical layout (canonical=False: in the last layer's order)."""
        if len(blocks) != len(self):
            raise ValueError(f"the plan has {len(self)} layers, the stack {len(blocks)}")
        steps, back = self.gathers(x.device, x.shape[0])
        for blk, idx in zip(blocks, steps):
            x = blk(x, idx)                                                  # (B, N, D) in the layer's order
        if canonical and back is not None:
            x = gather_tokens(x, back)                                       # (B, N, D) canonical layout
        return x


class RandomScanPlan(ScanPlan):
    """Every sample scans its own uniformly drawn cluster sequence (row-major inside each cluster), drawn on the
    device at every call; every layer scans it, reversed on every other layer when bidirectional. After the
    first gather each step is a flip or nothing, so no permutation is composed on the host."""

    def __init__(self, depth: int, h: int, w: int, k: int, bidirectional: bool):
        self.depth, self.h, self.w, self.k, self.bidirectional = depth, h, w, k, bidirectional

    def __len__(self) -> int:
        return self.depth

    def gathers(self, device: torch.device | str, batch: int = 1, clusters: torch.Tensor | None = None) -> Gathers:
        """(steps, back) for `batch` samples; `clusters` (B, n) fixes the cluster sequences (tests)."""
        steps, backs = self.layer_gathers(device, batch, clusters)
        return steps, backs[-1]

    def layer_gathers(self, device: torch.device | str, batch: int = 1,
                      clusters: torch.Tensor | None = None) -> LayerGathers:
        """(steps, backs) of one draw of `batch` cluster sequences: backs[l] gathers layer l's sequence (B, hw)
        back to raster order."""
        device = torch.device(device)
        n = math.prod(cluster_grid(self.h, self.w, self.k))
        if clusters is None:
            clusters = torch.rand(batch, n, device=device, dtype=torch.float64).argsort(-1)  # (B, n) uniform
        base = order_from_clusters(self.h, self.w, self.k, clusters.to(device))   # (B, hw) raster per position
        hw = self.h * self.w
        flip = torch.arange(hw - 1, -1, -1, device=device) if self.bidirectional else None  # (hw,)
        steps = [base] + [flip] * (self.depth - 1)
        back, back_rev = inverse(base), inverse(base.flip(-1)) if self.bidirectional else None   # (B, hw)
        backs = [back_rev if self.bidirectional and layer % 2 else back for layer in range(self.depth)]
        return steps, backs

__all__ = ["ScanPlan", "RandomScanPlan", "plan_steps"]
