"""The MAL objective: cluster-masked autoregressive pretraining (DESIGN §4), readable in one screen.

Each sample's clusters are put in a sequence (its scan order). The encoder reads the patch tokens of
clusters 0..n-2 (optionally with some input units replaced by a mask token); the decoder turns the
encoder output at cluster c into a prediction of the pixels of cluster c+1. Every layer is causal in
the cluster sequence, so the prediction of cluster c+1 depends on clusters <= c only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import EncoderConfig, ObjectiveConfig
from .decoder import Decoder
from ..serialization import (cluster_patch_table, gather_tokens, layer_plan, patchify, pretrain_cluster_orders,
                            pretrain_layer_patterns, sample_mask, slot_perm, unpatchify)
from ..models.vil import VisionLSTM, run_blocks

NORM_PIX_EPS = 1e-6


class MALPretrain(nn.Module):
    """Encoder (a `VisionLSTM` without head) + mask token + decoder, trained with next-cluster pixel MSE."""

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
        self.encoder = VisionLSTM(enc_cfg, num_classes=0)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, enc_cfg.dim))
        self.decoder = Decoder(obj_cfg.decoder, enc_cfg.dim, h * w, p * p * C, k,
                               layer_patterns=pretrain_layer_patterns(enc_cfg.scan_order, obj_cfg.decoder.depth))
        slots = self.n - 1
        self._enc_orders = [slot_perm(slots, k, pat) for pat in pretrain_layer_patterns(enc_cfg.scan_order, enc_cfg.depth)]
        self._device_cache: dict = {}
        nn.init.normal_(self.mask_token, std=0.02)

    def _on(self, device):
        """Per-device cache: encoder layer gathers, the gather back to the slot layout, the cluster table."""
        key = str(device)
        if key not in self._device_cache:
            steps, back = layer_plan(self._enc_orders, device)
            self._device_cache[key] = (steps, back, self.table.to(device))
        return self._device_cache[key]

    def sample_inputs(self, batch: int, generator: torch.Generator | None = None, device=None):
        """Draw the random parts of a step: cluster sequences (B, n) and the input mask (or None)."""
        h, w = self.enc_cfg.grid
        clusters = pretrain_cluster_orders(self.enc_cfg.scan_order, batch, h, w, self.k, generator)
        m = self.obj_cfg.mask
        mask = sample_mask(m.unit, m.ratio, batch, h, w, self.k, self.enc_cfg.patch_size, generator)
        return clusters.to(device), None if mask is None else mask.to(device)

    def forward(self, imgs: torch.Tensor, clusters: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """imgs (B, C, H, W) normalized. Returns loss, pred/target (B, (n-1)k², p²C) and target_idx (B, (n-1)k²)."""
        B = imgs.shape[0]
        h, w = self.encoder.grid_of(imgs)
        if (h, w) != self.enc_cfg.grid:
            raise ValueError(f"pretraining images must be {self.enc_cfg.img_size} px (got {tuple(imgs.shape[2:])}); "
                             f"resize them or set model.img_size")
        if clusters is None:
            clusters, mask = self.sample_inputs(B, generator, imgs.device)
        steps, back, table = self._on(imgs.device)
        if mask is not None and mask.dim() == 3:                             # pixel unit: mean pixel (0 when normalized)
            imgs_in = imgs.masked_fill(mask.unsqueeze(1), 0.0)
            mask = None
        else:
            imgs_in = imgs
        tokens = self.encoder.patchify_embed(imgs_in)                        # (B, hw, D)
        if mask is not None:                                                 # patch / cluster unit
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self.encoder.pos_embed                             # (B, hw, D)
        seq = table[clusters].flatten(1)                                     # (B, n*k²) raster ids in sequence
        kk = self.k * self.k
        x = gather_tokens(tokens, seq[:, :-kk])                              # (B, (n-1)k², D) clusters 0..n-2
        x = run_blocks(self.encoder.blocks, x, steps)                    # (B, (n-1)k², D) last layer's order
        if back is not None:
            x = gather_tokens(x, back)                                       # (B, (n-1)k², D) slot layout
        x = self.encoder.norm(x)
        target_idx = seq[:, kk:]                                             # (B, (n-1)k²) patches of clusters 1..n-1
        pred = self.decoder(x, target_idx)                                   # (B, (n-1)k², p²C)
        target = gather_tokens(patchify(imgs, self.enc_cfg.patch_size), target_idx)  # (B, (n-1)k², p²C)
        if self.obj_cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + NORM_PIX_EPS).sqrt()
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
        pred = out["pred"].to(patches.dtype)
        if self.obj_cfg.norm_pix_loss:
            tgt = gather_tokens(patches, out["target_idx"])
            pred = pred * (tgt.var(-1, keepdim=True) + NORM_PIX_EPS).sqrt() + tgt.mean(-1, keepdim=True)
        idx = out["target_idx"].unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        return unpatchify(patches.scatter(1, idx, pred), p, h, w)           # (B, C, H, W)
