"""ViT encoder: the Transformer baseline of the paper's Tables 4 and 9, with `VisionLSTM`'s API.

timm's pre-LN ViT block (MAE's settings: qkv bias, LayerNorm eps 1e-6, MLP ratio 4) over the patch tokens with a
learned position embedding and no class token; classification pools the mean of the final-norm tokens. The same
class serves supervised training, fine-tuning, MAE (`forward_visible`: the visible tokens as a set) and MAL
(`forward_clusters`: block-causal attention over the cluster slots, so the MAL objective runs unchanged). With
`bidirectional=false` the classifier attends block-causally over the clusters of its scan order's cluster
sequence, as MAL pretrains it (the MAL-ViT probe encoder).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.models.vision_transformer import Block

from ..config import EncoderConfig
from ..ops.registry import prepare
from ..serialization import FIXED_ORDERS, gather_tokens, inverse, scan_order
from .base import PatchEncoder, check_output_fmt, take_indices, to_output_fmt

MLP_RATIO = 4.0
LN_EPS = 1e-6                                                               # MAE's / timm's ViT LayerNorm
CAUSAL_DEFAULT_ORDER = "row_fwd"                                            # (a): for alternating and random


def vit_block(dim: int, num_heads: int, drop_path: float = 0.0, mlp_ratio: float = MLP_RATIO) -> Block:
    """A pre-LN timm ViT block as MAE builds it; `blk(x, attn_mask)` takes a boolean (N, N) visibility mask."""
    return Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=drop_path,
                 norm_layer=partial(nn.LayerNorm, eps=LN_EPS))


def xavier_init_(module: nn.Module) -> None:
    """MAE's init of Transformer weights: xavier-uniform Linear weights, zero biases, LayerNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def block_causal_mask(groups: torch.Tensor) -> torch.Tensor:
    """(N, N) bool from the group (cluster slot) of each token (N,), non-decreasing: token i sees token j iff
    group[j] <= group[i] (its own group and the earlier ones)."""
    return groups.unsqueeze(1) >= groups.unsqueeze(0)


def blocks_forward(blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor | None, checkpoint: bool
                   ) -> torch.Tensor:
    """The blocks in turn on x (B, N, D) under the attention mask (N, N) or None -> (B, N, D). checkpoint: each
    block keeps only its input for the backward and recomputes its forward there."""
    for blk in blocks:
        if checkpoint:
            x = torch.utils.checkpoint.checkpoint(blk, x, mask, use_reentrant=False)   # (B, N, D)
        else:
            x = blk(x, mask)                                                 # (B, N, D)
    return x


_COMPILED: dict = {}


def compiled_blocks_forward(mode: str | None):
    """One torch.compile of `blocks_forward` per mode (static shapes), shared by every ViT: the whole stack is one
    graph, so per-block constants (the drop-path rates) cost no recompiles."""
    if mode not in _COMPILED:
        from ..ops.vil_block.regions import allow_recompiles
        allow_recompiles()                                                   # one compile per input shape
        _COMPILED[mode] = torch.compile(blocks_forward, dynamic=False, mode=mode)
    return _COMPILED[mode]


@dataclass(frozen=True)
class ViTFast:
    """How the blocks run on the fast path: torch.compile(mode) or eager; activation checkpointing in training."""
    compile: bool = True
    mode: str | None = None
    checkpoint: bool = False


def run_stack(blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor | None, fast: ViTFast | None
              ) -> torch.Tensor:
    """Transformer blocks `blk(x, mask)` on x (B, N, D) -> (B, N, D): as they are (fast None), or as `fast` says
    (the ViT encoder's and the pretraining decoders' blocks). The kernels of x's device are imported first: a block
    that dispatches an op (the decoders' attention) then imports nothing inside the compiled trace."""
    if fast is None:
        return blocks_forward(blocks, x, mask, False)
    prepare(x.device.type)
    run = compiled_blocks_forward(fast.mode) if fast.compile else blocks_forward
    return run(blocks, x, mask, fast.checkpoint and torch.is_grad_enabled())


class VisionTransformer(PatchEncoder, tags=["vit"]):
    """ViT encoder + optional classification head (mean pooling + linear), with `VisionLSTM`'s parameter names and
    API (`PatchEncoder`). Tokens stay in raster order (attention does not scan), except for a causal ViT."""

    default_pool = "avg"                 # timm's name of the pooling: forward_head averages the tokens

    def __init__(self, cfg: EncoderConfig, num_classes: int = 1000):
        super().__init__()
        if cfg.arch != "vit":
            raise ValueError(f"VisionTransformer needs model.arch=vit, got {cfg.arch!r}")
        self.embed_patches(cfg, num_classes)
        D = cfg.dim
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()   # stochastic depth, linear (timm)
        self.blocks = nn.ModuleList([vit_block(D, cfg.num_heads, r) for r in rates])
        self.norm = nn.LayerNorm(D, eps=LN_EPS)
        self.head = self.new_head(num_classes)
        self.fast: ViTFast | None = None
        self._masks: dict[tuple, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}
        self.init_weights()

    def init_weights(self) -> None:
        """MAE: xavier Transformer weights; position trunc-normal 0.02, patch embedding xavier, head std 2e-5."""
        xavier_init_(self)
        self.init_embeddings()

    def fast_path(self, enabled: bool = True, compile: bool = True, mode: str | None = None,
                  checkpoint: bool = False, recompute_qkv: bool = False) -> "VisionTransformer":
        """compile=True: the block stack under torch.compile(mode); checkpoint=True: in training each block keeps
        only its input and recomputes its forward in the backward. recompute_qkv is ViL's (the mLSTM cell's
        q, k, v) and is rejected. Parameters and state dict are unchanged."""
        if recompute_qkv:
            raise ValueError("recompute_qkv recomputes the mLSTM cell's q, k, v of the fused ViL block; a ViT has "
                             "none: use checkpoint=True (recompute=true in a run config)")
        self.fast = ViTFast(compile, mode, checkpoint) if enabled else None
        return self

    # ---------------------------------------------------------------- blocks
    def run_blocks(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The block stack on x (B, N, D) under the attention mask (N, N) (None: every token sees every token)."""
        return run_stack(self.blocks, x, mask, self.fast)

    def slot_mask(self, num_tokens: int, k: int, device: torch.device) -> torch.Tensor:
        """(M, M) block-causal mask over the slot layout (k*k tokens per slot); cached per (M, k, device)."""
        key = ("slots", num_tokens, k, str(device))
        if key not in self._masks:
            self._masks[key] = block_causal_mask(torch.arange(num_tokens, device=device) // (k * k))
        return self._masks[key]

    def causal_order(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A causal ViT on an h x w grid: its scan order (h*w,) (the config's fixed order, (a) for alternating and
        random) and the block-causal mask (h*w, h*w) over that sequence's clusters (edge clusters may be smaller)."""
        key = ("causal", h, w, str(device))
        if key not in self._masks:
            k, name = self.cfg.cluster_size, self.cfg.scan_order
            perm = scan_order(h, w, k, name if name in FIXED_ORDERS else CAUSAL_DEFAULT_ORDER)      # (hw,)
            cluster = (perm // w) // k * ((w + k - 1) // k) + (perm % w) // k                      # (hw,)
            slot = torch.cat([cluster.new_zeros(1), (cluster[1:] != cluster[:-1]).long()]).cumsum(0)  # (hw,)
            self._masks[key] = perm.to(device), block_causal_mask(slot).to(device)
        return self._masks[key]

    # ---------------------------------------------------------------- forward
    def forward_clusters(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """MAL: tokens in the slot layout (B, S*k*k, D) -> normalized (B, S*k*k, D); a token sees its own slot and
        the earlier ones."""
        return self.norm(self.run_blocks(x, self.slot_mask(x.shape[1], k, x.device)))

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """MAE: the visible tokens (B, V, D) (with position) -> normalized (B, V, D); attention treats them as a set,
        so `ids_keep` (their raster patches, VisionLSTM's scan needs them) is not used."""
        return self.norm(self.run_blocks(x))

    def forward_features(self, x: torch.Tensor, raster: bool = False) -> torch.Tensor:
        """Images -> normalized tokens (B, N, D) in raster order; a causal ViT (bidirectional=false) returns them in
        its scan order unless raster=True."""
        h, w = self.grid_of(x)
        t = self.patchify_embed(x) + self.pos_embed_for(h, w)               # (B, hw, D) raster
        if self.cfg.bidirectional:
            return self.norm(self.run_blocks(t))
        perm, mask = self.causal_order(h, w, t.device)
        t = self.norm(self.run_blocks(gather_tokens(t, perm), mask))        # (B, hw, D) in the scan order
        return gather_tokens(t, inverse(perm)) if raster else t

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's multi-level features, as `VisionLSTM.forward_intermediates`: the outputs of the blocks `indices`
        in raster order (a causal ViT's are gathered back from its scan order), through the final norm when
        norm=True, NCHW or NLC; the blocks run one at a time (activation checkpointing in training on the fast path
        with recompute, no torch.compile of the stack)."""
        check_output_fmt(output_fmt)
        take, last = take_indices(len(self.blocks), indices)
        h, w = self.grid_of(x)
        t = self.patchify_embed(x) + self.pos_embed_for(h, w)               # (B, hw, D) raster
        perm = mask = back = None
        if not self.cfg.bidirectional:
            perm, mask = self.causal_order(h, w, t.device)
            t, back = gather_tokens(t, perm), inverse(perm)                 # (B, hw, D) in the scan order
        raster = (lambda y: y) if back is None else (lambda y: gather_tokens(y, back))
        ckpt = self.fast is not None and self.fast.checkpoint and torch.is_grad_enabled()
        blocks = self.blocks[:last + 1] if stop_early or intermediates_only else self.blocks
        taken = {}
        for i, blk in enumerate(blocks):
            t = torch.utils.checkpoint.checkpoint(blk, t, mask, use_reentrant=False) if ckpt else blk(t, mask)
            if i in take:
                taken[i] = raster(self.norm(t) if norm else t)              # (B, hw, D) raster
        inter = to_output_fmt([taken[i] for i in take], h, w, output_fmt)
        return inter if intermediates_only else (raster(self.norm(t)), inter)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Mean pooling of the tokens + linear head."""
        x = x.mean(1)                                                        # (B, D)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

