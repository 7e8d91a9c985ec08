"""Vision-LSTM (mLSTM) encoder: the backbone MAL pretrains and fine-tunes (DESIGN §3).

One class serves pretraining (num_classes=0, fed cluster-serialized tokens by `mal.objectives.mal`) and
classification (bilateral pooling + linear head), with the same parameter names, so pretraining
checkpoints load strictly.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from ..config import EncoderConfig
from ..ops import mlstm
from ..scan import RandomScanPlan, ScanPlan
from ..serialization import (cluster_grid, gather_tokens, inverse, layer_orders, order_from_clusters,
                             pretrain_layer_patterns, slot_perm)
from .base import PatchEncoder, check_output_fmt, take_indices, to_output_fmt

if TYPE_CHECKING:
    from ..ops.vil_block import FastPath


def small_init_(weight: torch.Tensor, dim: int) -> None:
    """N(0, sqrt(2 / (5 dim))): "Transformers without Tears" init used by ViL for up/q/k/v projections."""
    nn.init.normal_(weight, mean=0.0, std=math.sqrt(2 / (5 * dim)))


def down_init_(weight: torch.Tensor, dim: int) -> None:
    """N(0, std 2 / sqrt(dim)): the down-projection of each residual branch, as the official ViL
    (`vision_lstm2.py`: `wang_init_(..., num_blocks=1)`); docs/method.md, "Initialization"."""
    nn.init.normal_(weight, mean=0.0, std=2 / math.sqrt(dim))


class LinearHeadwise(nn.Module):
    """Block-diagonal linear map: `dim` features in independent blocks of `block_size` (ViL's q/k/v)."""

    def __init__(self, dim: int, block_size: int, bias: bool = True):
        super().__init__()
        self.dim, self.block_size = dim, block_size
        self.weight = nn.Parameter(torch.empty(dim // block_size, block_size, block_size))  # (nb, out, in)
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unflatten(-1, (-1, self.block_size))                          # (..., nb, bs)
        x = torch.einsum("...hi,hoi->...ho", x, self.weight).flatten(-2)   # (..., dim)
        return x if self.bias is None else x + self.bias


class CausalConv1d(nn.Module):
    """Depthwise conv along the sequence that only looks back: output t sees inputs t-K+1..t."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x.transpose(1, 2), (self.kernel_size - 1, 0))             # (B, C, S+K-1)
        return self.conv(x).transpose(1, 2)                                  # (B, S, C)


class ViLLayer(nn.Module):
    """mLSTM layer of a ViL block: up-projection, causal conv, q/k/v, gates, mLSTM cell, output gate."""

    def __init__(self, dim: int, num_heads: int = 4, expansion: int = 2, qkv_block_size: int = 4,
                 conv_kernel_size: int = 4, backend: str = "auto"):
        super().__init__()
        inner = expansion * dim
        self.dim, self.inner, self.num_heads = dim, inner, num_heads
        self.backend = backend
        self.proj_up = nn.Linear(dim, 2 * inner)
        self.conv = CausalConv1d(inner, conv_kernel_size)
        self.q_proj = LinearHeadwise(inner, qkv_block_size)
        self.k_proj = LinearHeadwise(inner, qkv_block_size)
        self.v_proj = LinearHeadwise(inner, qkv_block_size)
        self.igate = nn.Linear(3 * inner, num_heads)
        self.fgate = nn.Linear(3 * inner, num_heads)
        self.outnorm = nn.Parameter(torch.ones(inner))      # per-head LayerNorm weight
        self.outnorm_bias = nn.Parameter(torch.zeros(inner))
        self.skip = nn.Parameter(torch.ones(inner))         # learnable skip of the conv output
        self.proj_down = nn.Linear(inner, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        small_init_(self.proj_up.weight, self.dim)
        nn.init.zeros_(self.proj_up.bias)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            small_init_(proj.weight, self.dim)
            nn.init.zeros_(proj.bias)
        self.conv.conv.reset_parameters()
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, mean=0.0, std=0.1)
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        nn.init.ones_(self.outnorm)
        nn.init.zeros_(self.outnorm_bias)
        nn.init.ones_(self.skip)
        down_init_(self.proj_down.weight, self.dim)
        nn.init.zeros_(self.proj_down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        NH, DH = self.num_heads, self.inner // self.num_heads
        x_m, z = self.proj_up(x).chunk(2, dim=-1)                            # (B, S, I) each
        x_c = F.silu(self.conv(x_m))                                         # (B, S, I)
        q, k, v = self.q_proj(x_c), self.k_proj(x_c), self.v_proj(x_m)       # (B, S, I) each
        gate_in = torch.cat([q, k, v], dim=-1)                               # (B, S, 3I)
        i = self.igate(gate_in).transpose(1, 2)                              # (B, NH, S)
        f = self.fgate(gate_in).transpose(1, 2)                              # (B, NH, S)
        heads = lambda t: t.view(B, S, NH, DH).transpose(1, 2)               # (B, NH, S, DH)
        h = mlstm(heads(q), heads(k), heads(v), i, f, backend=self.backend)  # (B, NH, S, DH)
        h = F.layer_norm(h.transpose(1, 2), (DH,)).reshape(B, S, self.inner)  # (B, S, I) per-head norm
        h = h * self.outnorm + self.outnorm_bias                             # (B, S, I)
        h = (h + self.skip * x_c) * F.silu(z)                                # (B, S, I)
        return self.proj_down(h)                                             # (B, S, D)


class ViLBlock(nn.Module):
    """Pre-norm residual block around one mLSTM layer, with drop-path.

    `fast_path()` switches the block to `mal.ops.vil_block.FastPath` (same function and parameters, fewer
    kernels, optionally torch.compile'd); the default is the plain PyTorch forward.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, **layer_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.layer = ViLLayer(dim, **layer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.fast: FastPath | None = None

    def fast_path(self, enabled: bool = True, compile: bool = True, mode: str | None = None,
                  checkpoint: bool = False, recompute_qkv: bool = False) -> "ViLBlock":
        """Run the fused block (compile=True: its regions around the mLSTM cell under torch.compile(mode);
        checkpoint=True: in training keep only the block input and recompute the block in the backward;
        recompute_qkv=True: recompute the cell's q, k, v in the backward instead of keeping them)."""
        from ..ops.vil_block import FastPath
        self.fast = FastPath(compile=compile, mode=mode, checkpoint=checkpoint,
                             recompute_qkv=recompute_qkv) if enabled else None
        return self

    def forward(self, x: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, D) -> (B, S, D), on the tokens x[:, order] when `order` ((S,) or (B, S)) is given."""
        if self.fast is not None:
            return self.fast.forward(self, x, order)                         # (B, S, D)
        if order is not None:
            x = gather_tokens(x, order)                                      # (B, S, D) the block's sequence
        return x + self.drop_path(self.layer(self.norm(x)))                  # (B, S, D)


class VisionLSTM(PatchEncoder, tags=["vision-lstm"]):
    """ViL encoder + optional classification head (bilateral pooling: first and last token of the sequence, or
    the mean of the tokens with `global_pool="avg"`).

    The timm model API: `forward_features` (tokens), `forward_head` (pooling + head), `no_weight_decay`,
    `group_matcher` (the layer map of layer-wise lr decay), `get_classifier` / `reset_classifier`, `num_features`,
    `pretrained_cfg` (the data config); `fast_path()` (the fused GPU blocks); `save_pretrained` / `from_pretrained`
    (`mal.hub`). timm names: `mal.models.registry`.
    """
    default_pool = "first_last"          # the pooling (timm's name) unless model.global_pool says: forward_head joins
                                         # the first and last token; model.global_pool="avg" averages them

    def __init__(self, cfg: EncoderConfig, num_classes: int = 1000):
        super().__init__()
        if cfg.arch != "vil":
            raise ValueError(f"VisionLSTM needs model.arch=vil, got {cfg.arch!r} (mal.models.create_encoder picks)")
        self.embed_patches(cfg, num_classes)
        D = cfg.dim
        self.blocks = nn.ModuleList([                                        # constant drop-path rate, as ViL
            ViLBlock(D, drop_path=cfg.drop_path_rate, num_heads=cfg.num_heads, expansion=cfg.expansion,
                     qkv_block_size=cfg.qkv_block_size, conv_kernel_size=cfg.conv_kernel_size,
                     backend=cfg.mlstm_backend)
            for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D)
        self.head = self.new_head(num_classes)
        self._plans: dict[tuple, ScanPlan | list[torch.Tensor]] = {}   # scan plans per grid (and MAL's slots),
                                                                         # MAE's visible-scan ranks per device
        self.init_embeddings()

    def fast_path(self, enabled: bool = True, compile: bool = True, mode: str | None = None,
                  checkpoint: bool = False, recompute_qkv: bool = False) -> "VisionLSTM":
        """Switch every block to the fused fast path (`mal.ops.vil_block`); parameters and state dict are unchanged.

        compile=True compiles the regions around the mLSTM cell once for all blocks (static shapes: each new input
        shape compiles again). The mLSTM kernel is the model's `mlstm_backend` ("auto": Triton on the GPU).
        checkpoint=True: each block keeps only its input for the backward and recomputes its forward there.
        recompute_qkv=True: the mLSTM cell's q, k, v are recomputed in the backward instead of kept.
        """
        for blk in self.blocks:
            blk.fast_path(enabled, compile, mode, checkpoint, recompute_qkv)
        return self

    def scan_plan(self, h: int, w: int) -> ScanPlan:
        """The blocks' scan orders on an h x w grid (built once per grid)."""
        if (h, w) not in self._plans:
            c = self.cfg
            self._plans[(h, w)] = (RandomScanPlan(c.depth, h, w, c.cluster_size, c.bidirectional)
                                   if c.scan_order == "random" else
                                   ScanPlan(layer_orders(c.scan_order, c.depth, h, w, c.cluster_size, c.bidirectional)))
        return self._plans[(h, w)]

    # ---------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor, raster: bool = False) -> torch.Tensor:
        """Images -> normalized tokens (B, N, D), in the last layer's sequence order (raster=True: raster order)."""
        h, w = self.grid_of(x)
        t = self.patchify_embed(x) + self.pos_embed_for(h, w)               # (B, hw, D)
        t = self.scan_plan(h, w).run(self.blocks, t, canonical=raster)      # (B, hw, D)
        return self.norm(t)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's multi-level features: the outputs of the blocks `indices` (int n: the last n; a list: those blocks,
        negative from the end; None: all), each gathered back to raster order whatever the block's scan order, and
        (norm=True) through the final LayerNorm; NCHW (B, D, h, w) or NLC (B, h*w, D). Returns the intermediates
        (intermediates_only) or (the final-norm tokens (B, h*w, D) in raster order, intermediates); with stop_early
        the blocks after the last one taken do not run (the tokens are then those of that block)."""
        check_output_fmt(output_fmt)
        take, last = take_indices(len(self.blocks), indices)
        h, w = self.grid_of(x)
        t = self.patchify_embed(x) + self.pos_embed_for(h, w)               # (B, hw, D) raster
        blocks = self.blocks[:last + 1] if stop_early or intermediates_only else self.blocks
        t, taken = self.scan_plan(h, w).run_taking(blocks, t, set(take))   # (B, hw, D) raster, each (B, hw, D)
        taken = [taken[sorted(set(take)).index(i)] for i in take]           # in the order asked
        inter = to_output_fmt([self.norm(y) if norm else y for y in taken], h, w, output_fmt)
        return inter if intermediates_only else (self.norm(t), inter)

    def forward_clusters(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """MAL: tokens in the slot layout (B, S*k*k, D) -> normalized (B, S*k*k, D), causal across slots: every
        layer reads the slots in order, each slot's k*k tokens in the layer's inner pattern (`pretrain_layer_patterns`
        of the scan order). The plan is built once per (S, k)."""
        key = ("slots", x.shape[1] // (k * k), k)
        if key not in self._plans:
            patterns = pretrain_layer_patterns(self.cfg.scan_order, self.cfg.depth)
            self._plans[key] = ScanPlan([slot_perm(key[1], k, pat) for pat in patterns])
        return self.norm(self._plans[key].run(self.blocks, x))             # (B, S*k*k, D) slot layout

    def layer_ranks(self, batch: int, device: torch.device) -> list[torch.Tensor]:
        """Fine-tuning scan orders on the config's grid as ranks: per layer, the sequence position of every raster
        patch, (h*w,) shared or (B, h*w) per sample (random order: cluster sequences drawn on the device)."""
        (h, w), c = self.cfg.grid, self.cfg
        if c.scan_order != "random":
            key = ("ranks", h, w, str(device))
            if key not in self._plans:
                self._plans[key] = [inverse(p).to(device) for p in
                                    layer_orders(c.scan_order, c.depth, h, w, c.cluster_size, c.bidirectional)]
            return self._plans[key]
        n = math.prod(cluster_grid(h, w, c.cluster_size))
        clusters = torch.rand(batch, n, device=device, dtype=torch.float64).argsort(-1)  # (B, n) as RandomScanPlan
        rank = inverse(order_from_clusters(h, w, c.cluster_size, clusters))  # (B, hw)
        return [h * w - 1 - rank if c.bidirectional and layer % 2 else rank for layer in range(c.depth)]

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """MAE: the visible tokens (B, V, D) (with position) of the raster patches ids_keep (B, V), in any order ->
        normalized (B, V, D) in the same layout. Every layer scans them in its fine-tuning order restricted to
        the visible patches; the per-sample gathers are composed on the device (no host sync: CUDA-graph safe)."""
        prev = None
        for blk, rank in zip(self.blocks, self.layer_ranks(x.shape[0], x.device)):
            seen = rank[ids_keep] if rank.dim() == 1 else torch.gather(rank, 1, ids_keep)   # (B, V)
            order = seen.argsort(-1)                                         # (B, V) visible tokens in scan order
            x = blk(x, order if prev is None else torch.gather(prev, 1, order))  # (B, V, D) in this layer's order
            prev = inverse(order)                                            # (B, V) back to the visible layout
        return self.norm(gather_tokens(x, prev))                             # (B, V, D)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Bilateral pooling (first and last token of the sequence; global_pool "avg": the mean) + linear head."""
        if self.global_pool == "avg":
            x = x.mean(1)                                                    # (B, D)
        else:
            x = torch.cat([x[:, 0], x[:, -1]], dim=-1)                       # (B, 2D)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

