"""What every MAL encoder shares: patch and position embeddings, the classification head, and the timm model API
(`no_weight_decay`, `group_matcher`, `get_classifier` / `reset_classifier`, `num_features`, `pretrained_cfg`,
`prune_intermediate_layers`), plus Hugging Face's `save_pretrained` / `from_pretrained` (`mal.hub`).

`VisionLSTM` and `VisionTransformer` subclass `PatchEncoder` with their blocks and pooling; the parameter names
(`patch_embed`, `pos_embed` (1, h*w, D), `blocks`, `norm`, `head`) are the same, so checkpoints transfer strictly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_

from ..config import EncoderConfig
from ..hub import HubMixin
from ..serialization import grid_size
from .names import pretrained_cfg_for, timm_config


def take_indices(num_blocks: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's `feature_take_indices`: None = every block, an int n = the last n blocks, a list = those blocks
    (negative ones count from the end). Returns (sorted-as-given absolute indices, the largest)."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"last-n indices={indices} is out of range (1 to {num_blocks})")
        take = list(range(num_blocks - indices, num_blocks))
    else:
        take = [num_blocks + i if i < 0 else i for i in indices]
        bad = [i for i in take if not 0 <= i < num_blocks]
        if bad or not take:
            raise ValueError(f"block indices {list(indices)} are out of range (0 to {num_blocks - 1}, or negative "
                             f"from the end)")
    return take, max(take)


def to_output_fmt(tokens: list[torch.Tensor], h: int, w: int, output_fmt: str) -> list[torch.Tensor]:
    """Raster tokens (B, h*w, D) as timm's intermediates: NCHW (B, D, h, w) or NLC (B, h*w, D)."""
    if output_fmt == "NLC":
        return tokens
    return [t.reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for t in tokens]


def check_output_fmt(output_fmt: str) -> None:
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")


def prune_blocks(model: nn.Module, indices: int | Sequence[int], prune_norm: bool, prune_head: bool) -> list[int]:
    """timm's `prune_intermediate_layers` for `VisionLSTM` / `VisionTransformer`: keep the blocks up to the last one
    taken (model.cfg.depth follows, cached plans are dropped), optionally the final norm and the head."""
    take, last = take_indices(len(model.blocks), indices)
    model.blocks = model.blocks[:last + 1]
    model.cfg = dataclasses.replace(model.cfg, depth=last + 1)
    for cache in ("_plans", "_masks"):
        if hasattr(model, cache):
            getattr(model, cache).clear()
    if prune_norm:
        model.norm = nn.Identity()
    if prune_head:
        model.head, model.num_classes = nn.Identity(), 0
    return take


class PatchEncoder(nn.Module, HubMixin):
    """Patch embedding (a strided conv) + learned position embedding in raster order + blocks + norm + head.
    A subclass builds `blocks`, `norm` and `head` after `embed_patches(cfg, num_classes)` and sets
    `default_pool` ("first_last" for ViL's bilateral pooling, "avg" for the ViT's mean)."""

    default_pool = "avg"

    def embed_patches(self, cfg: EncoderConfig, num_classes: int) -> None:
        """The configuration and the embeddings, in the parameter order every encoder keeps."""
        self.cfg, self.num_classes = cfg, num_classes
        h, w = cfg.grid
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch_size, cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, h * w, cfg.dim))

    def new_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def init_embeddings(self) -> None:
        """Position embedding trunc-normal 0.02, patch embedding xavier (on the flattened weight), the head."""
        trunc_normal_(self.pos_embed, std=0.02)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        self.init_head()

    def init_head(self) -> None:
        if isinstance(self.head, nn.Linear):                                 # MAE / ViL fine-tuning head init
            trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    # ---------------------------------------------------------------- timm-style API
    @property
    def global_pool(self) -> str:
        """The head's pooling (timm's name): `model.global_pool`, else the architecture's `default_pool`."""
        return self.cfg.global_pool or self.default_pool

    @property
    def num_features(self) -> int:
        """Channels of the tokens of `forward_features` (timm)."""
        return self.cfg.dim

    @property
    def head_hidden_size(self) -> int:
        """Width of the pooled features the head reads, `forward_head(x, pre_logits=True)` (timm)."""
        return 2 * self.cfg.dim if self.global_pool == "first_last" else self.cfg.dim

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for `num_classes` (0: none), initialized as for fine-tuning, on the model's device (timm)."""
        if global_pool is not None:                      # validated as model.global_pool
            self.cfg = dataclasses.replace(self.cfg, global_pool=global_pool)
        self.num_classes = num_classes
        self.head = self.new_head(num_classes).to(self.pos_embed.device, self.pos_embed.dtype)
        self.init_head()

    @property
    def pretrained_cfg(self) -> dict:
        """timm's data config of the model (`timm.data.resolve_data_config(model=model)`): the one timm.create_model,
        from_pretrained or `mal export` set, else `mal.models.names.pretrained_cfg_for` (ImageNet mean/std)."""
        if "_pretrained_cfg" in self.__dict__:
            return self.__dict__["_pretrained_cfg"]
        return pretrained_cfg_for(self.cfg, self.num_classes)

    @pretrained_cfg.setter
    def pretrained_cfg(self, value: dict) -> None:
        self.__dict__["_pretrained_cfg"] = value

    default_cfg = pretrained_cfg                                             # timm's earlier name

    def hub_config(self) -> dict[str, Any]:
        """config.json of `save_pretrained`: the `__init__` arguments (`HubMixin`) and timm's keys, so that the
        folder is also a timm folder (`timm.create_model("local-dir:DIR")`)."""
        return {**super().hub_config(), **timm_config(self)}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay (besides biases and norms, which have ndim 1)."""
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False, blocks_per_group: int = 1):
        """Layer map for layer-wise lr decay (timm's convention): the embeddings are group 0, block b is group
        1 + b // blocks_per_group, the final norm and the head come last. ViL's 24 blocks are 12 Transformer-
        equivalent layers, so `blocks_per_group=2` makes MAE's decay of 0.75 span the same range."""
        last = 1 + (self.cfg.depth - 1) // blocks_per_group + 1

        def layer_of(name: str) -> int:
            if name.startswith(("patch_embed", "pos_embed")):
                return 0
            if name.startswith("blocks."):
                return 1 + int(name.split(".")[1]) // blocks_per_group
            return last
        return layer_of

    # ---------------------------------------------------------------- embedding
    def grid_of(self, x: torch.Tensor) -> tuple[int, int]:
        """Patch grid of an image batch, with clear errors for wrong channels or sizes."""
        if x.dim() != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"expected images of shape (B, {self.cfg.in_chans}, H, W), got {tuple(x.shape)}; "
                             f"convert images to {self.cfg.in_chans} channels (RGB) or set model.in_chans")
        return grid_size((x.shape[2], x.shape[3]), self.cfg.patch_size)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """Position embedding (1, h*w, D), bicubically resampled when the grid differs from the config's."""
        h0, w0 = self.cfg.grid
        if (h, w) == (h0, w0):
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, (h, w), (h0, w0), num_prefix_tokens=0)

    def patchify_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> patch embeddings (B, h*w, D) in raster order, without position."""
        self.grid_of(x)
        return self.patch_embed(x).flatten(2).transpose(1, 2)               # (B, hw, D)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last one of `indices` (and the final norm / the head); returns the indices."""
        return prune_blocks(self, indices, prune_norm, prune_head)


__all__ = ["PatchEncoder", "take_indices", "to_output_fmt", "check_output_fmt", "prune_blocks"]
