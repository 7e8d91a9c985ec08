"""The MAL objective: cluster-masked autoregressive pretraining (docs/method.md), in named stages.

Each sample's clusters are put in a sequence (its scan order). The encoder reads the patch tokens of
clusters 0..n-2 (optionally with some input units replaced by a mask token); the decoder turns the
encoder output at cluster c into a prediction of the pixels of cluster c+1. Every layer is causal in
the cluster sequence, so the prediction of cluster c+1 depends on clusters <= c only.

    forward = sample_inputs -> embed (+ mask) -> encode (clusters 0..n-2) -> decode -> targets -> loss
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..config import EncoderConfig, ObjectiveConfig
from ..hub import HubMixin
from ..models import copy_encoder, create_encoder
from ..serialization import (cluster_patch_table, gather_tokens, masked_count, patchify, pretrain_cluster_orders,
                             pretrain_layer_patterns, sample_mask, unpatchify)
from .decoder import Decoder

NORM_PIX_EPS = 1e-6


def normalized_targets(target: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Per-patch normalized pixels (MAE's norm_pix_loss): target (..., p²C) -> zero mean, unit variance."""
    if not norm_pix:
        return target
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    return (target - mean) / (var + NORM_PIX_EPS).sqrt()


def denormalized(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Predictions (..., p²C) drawn as pixels: mapped back with each target patch's own mean and std when norm_pix."""
    if not norm_pix:
        return pred
    return pred * (target.var(-1, keepdim=True) + NORM_PIX_EPS).sqrt() + target.mean(-1, keepdim=True)


def patch_pixels(mask: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """A patch mask (B, h*w) as a pixel mask (B, 1, h*p, w*p)."""
    return unpatchify(mask[..., None].expand(-1, -1, p * p).float(), p, h, w).bool()


def check_pretraining_size(encoder: nn.Module, cfg: EncoderConfig, imgs: torch.Tensor) -> None:
    """Pretraining runs on the config's grid: a clear error for images of another size."""
    if encoder.grid_of(imgs) != cfg.grid:
        raise ValueError(f"pretraining images must be {cfg.img_size} px (got {tuple(imgs.shape[2:])}); "
                         f"resize them or set model.img_size")


class MALPretrain(nn.Module, HubMixin, tags=["pretraining"]):
    """Encoder (a `VisionLSTM` or `VisionTransformer` without head) + mask token + decoder, trained with
    next-cluster pixel MSE. The encoder's `forward_clusters` keeps it causal across clusters."""

    PREDICTION_TITLES = ("input as the encoder sees it (masked units black)",
                         "first cluster, then each next-cluster prediction (drawn with the target patch's mean and std)",
                         "target")

    def __init__(self, enc_cfg: EncoderConfig, obj_cfg: ObjectiveConfig | None = None):
        super().__init__()
        obj_cfg = obj_cfg or ObjectiveConfig()
        self.enc_cfg, self.obj_cfg = enc_cfg, obj_cfg
        h, w = enc_cfg.grid
        self.k = k = enc_cfg.cluster_size
        self.table = cluster_patch_table(h, w, k)                             # (n, k*k); validates k | grid
        self.n = self.table.shape[0]
        if self.n < 2:
            raise ValueError(f"cluster size {k} leaves a single cluster on the {h}x{w} grid; nothing to predict: "
                             f"use a smaller cluster_size")
        p, C = enc_cfg.patch_size, enc_cfg.in_chans
        self.encoder = create_encoder(enc_cfg, num_classes=0)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, enc_cfg.dim))
        self.decoder = Decoder(obj_cfg.decoder, enc_cfg.dim, h * w, p * p * C, k,
                               layer_patterns=pretrain_layer_patterns(enc_cfg.scan_order, obj_cfg.decoder.depth))
        self._tables: dict[str, torch.Tensor] = {}
        nn.init.normal_(self.mask_token, std=0.02)

    # ---------------------------------------------------------------- model API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"encoder.pos_embed", "mask_token", "decoder.pos_embed"}

    def fast_path(self, enabled: bool = True, **kwargs) -> "MALPretrain":
        """The fused GPU blocks for the encoder (and an xLSTM decoder); see `VisionLSTM.fast_path`."""
        self.encoder.fast_path(enabled, **kwargs)
        self.decoder.fast_path(enabled, **kwargs)
        return self

    def probe_encoder(self) -> nn.Module:
        """The encoder as it was pretrained, for the frozen-feature probes: causal along one scan order
        (`bidirectional=False`: ViL without reversed layers; ViT block-causal over the clusters of the scan
        order's cluster sequence, (a)'s for alternating and random)."""
        return copy_encoder(self.encoder, dataclasses.replace(self.enc_cfg, bidirectional=False))

    def masked_input_fraction(self) -> float:
        """The fraction of the encoder's input (patches, or pixels for the pixel unit) masked in every sample."""
        m, (h, w) = self.obj_cfg.mask, self.enc_cfg.grid
        masked, inputs = masked_count(m.unit, m.ratio, h, w, self.k, self.enc_cfg.patch_size)
        return masked / inputs

    def sample_inputs(self, batch: int, generator: torch.Generator | None = None, device=None
                      ) -> tuple[torch.Tensor, ...]:
        """The random draws of a step, each with the batch first: cluster sequences (B, n) and, when input
        masking is on, the input mask. `forward(imgs, *draws)` takes them in this order."""
        h, w = self.enc_cfg.grid
        clusters = pretrain_cluster_orders(self.enc_cfg.scan_order, batch, h, w, self.k, generator)
        m = self.obj_cfg.mask
        mask = sample_mask(m.unit, m.ratio, clusters, h, w, self.k, self.enc_cfg.patch_size, generator)
        return (clusters.to(device),) if mask is None else (clusters.to(device), mask.to(device))

    # ---------------------------------------------------------------- stages
    def embed(self, imgs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Patch tokens (B, hw, D) in raster order with position; masked input units replaced (pixel unit:
        masked pixels set to the normalized mean 0 before the patch embedding; patch/cluster: the mask token)."""
        if mask is not None and mask.dim() == 3:                             # pixel unit (B, H, W)
            imgs, mask = imgs.masked_fill(mask.unsqueeze(1), 0.0), None
        tokens = self.encoder.patchify_embed(imgs)                           # (B, hw, D)
        if mask is not None:                                                 # (B, hw) patch / cluster unit
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        return tokens + self.encoder.pos_embed                               # (B, hw, D)

    def sequence(self, clusters: torch.Tensor) -> torch.Tensor:
        """Raster patch ids in each sample's cluster sequence, cluster by cluster: (B, n) -> (B, n*k²)."""
        key = str(clusters.device)
        if key not in self._tables:
            self._tables[key] = self.table.to(clusters.device)
        return self._tables[key][clusters].flatten(1)                        # (B, n*k²)

    def encode(self, tokens: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """The encoder on clusters 0..n-2 of each sequence -> (B, (n-1)k², D) in the slot layout."""
        x = gather_tokens(tokens, seq[:, :-self.k * self.k])                 # (B, (n-1)k², D) clusters 0..n-2
        return self.encoder.forward_clusters(x, self.k)                      # (B, (n-1)k², D) slot layout

    def targets(self, imgs: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """Pixels of the predicted patches (B, M, p²C), normalized per patch when norm_pix_loss."""
        target = gather_tokens(patchify(imgs, self.enc_cfg.patch_size), target_idx)   # (B, M, p²C)
        return normalized_targets(target, self.obj_cfg.norm_pix_loss)

    def forward(self, imgs: torch.Tensor, clusters: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """imgs (B, C, H, W) normalized. Returns loss, pred/target (B, (n-1)k², p²C) and target_idx (B, (n-1)k²)."""
        check_pretraining_size(self.encoder, self.enc_cfg, imgs)
        if clusters is None:
            clusters, *rest = self.sample_inputs(imgs.shape[0], generator, imgs.device)
            mask = rest[0] if rest else None
        seq = self.sequence(clusters)                                        # (B, n*k²)
        x = self.encode(self.embed(imgs, mask), seq)                         # (B, (n-1)k², D)
        target_idx = seq[:, self.k * self.k:]                                # (B, (n-1)k²) patches of clusters 1..n-1
        pred = self.decoder(x, target_idx)                                   # (B, (n-1)k², p²C)
        target = self.targets(imgs, target_idx)                              # (B, (n-1)k², p²C)
        loss = (pred.float() - target.float()).pow(2).mean()
        return {"loss": loss, "pred": pred, "target": target, "target_idx": target_idx}

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Images (B, C, H, W) showing the first cluster as input and every later cluster as predicted.

        With norm_pix_loss the predictions are mapped back with each target patch's own mean/std.
        """
        p = self.enc_cfg.patch_size
        h, w = self.enc_cfg.grid
        patches = patchify(imgs, p)                                          # (B, hw, p²C)
        tgt = gather_tokens(patches, out["target_idx"])                     # (B, M, p²C)
        pred = denormalized(out["pred"].to(patches.dtype), tgt, self.obj_cfg.norm_pix_loss)
        idx = out["target_idx"].unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        return unpatchify(patches.scatter(1, idx, pred), p, h, w)           # (B, C, H, W)

    @torch.no_grad()
    def prediction_rows(self, imgs: torch.Tensor, clusters: torch.Tensor, mask: torch.Tensor | None = None,
                        fill: torch.Tensor | float = 0.0) -> list[torch.Tensor]:
        """Rows of a prediction figure, each (B, C, H, W): the input as the encoder sees it (masked units set to
        `fill`, e.g. the normalized value of black), the first cluster followed by every next-cluster prediction
        (with norm_pix_loss drawn with each target patch's own mean and std), and the target images."""
        res = self(imgs, clusters, mask)
        seen = imgs.clone()
        if mask is not None and mask.dim() == 3:                             # pixel unit (B, H, W)
            pixels = mask.unsqueeze(1)                                       # (B, 1, H, W)
        elif mask is not None:                                               # patch / cluster unit (B, hw)
            pixels = patch_pixels(mask, self.enc_cfg.patch_size, *self.enc_cfg.grid)   # (B, 1, H, W)
        if mask is not None:
            seen = torch.where(pixels, torch.as_tensor(fill, dtype=seen.dtype, device=seen.device), seen)
        out = {k: v.float() if v.is_floating_point() else v for k, v in res.items()}
        return [seen, self.reconstruct(imgs.float(), out), imgs]
