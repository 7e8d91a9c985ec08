"""The MAE baseline (He et al. 2022, `models_mae.py`) on either encoder, in named stages.

A random subset of the patches (75 % by default) is dropped per sample; the encoder runs only the visible ones
(ViL: every layer scans them in its fine-tuning order restricted to them; ViT: as a set). A bidirectional
Transformer decoder takes the encoded visible tokens plus a mask token at every dropped position, each with the
decoder position embedding, and reconstructs the (per-patch normalized) pixels of every patch; the loss
averages over the dropped patches only.

    forward = sample_inputs -> random_masking -> forward_encoder -> forward_decoder -> forward_loss
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ..config import DecoderConfig, EncoderConfig, MaskConfig, ObjectiveConfig
from ..hub import HubMixin
from ..models import copy_encoder, create_encoder
from ..models.vit import LN_EPS, ViTFast, run_stack, vit_block, xavier_init_
from ..serialization import gather_tokens, patchify, unpatchify
from .mal import check_pretraining_size, denormalized, normalized_targets, patch_pixels


class MAEDecoder(nn.Module):
    """MAE's decoder weights: embed (encoder -> decoder width), mask token, learned position embedding,
    bidirectional pre-LN blocks, LayerNorm + linear pixel head. `MAEPretrain.forward_decoder` runs them."""

    def __init__(self, cfg: DecoderConfig, enc_dim: int, num_patches: int, patch_dim: int):
        super().__init__()
        self.embed = nn.Linear(enc_dim, cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, cfg.dim))
        self.blocks = nn.ModuleList([vit_block(cfg.dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio)
                                     for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=LN_EPS)
        self.pred = nn.Linear(cfg.dim, patch_dim)
        xavier_init_(self)
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.fast: ViTFast | None = None                                     # how the blocks run (fast_path)


class MAEPretrain(nn.Module, HubMixin, tags=["pretraining"]):
    """Encoder (a `VisionLSTM` or `VisionTransformer` without head) + MAE decoder, trained to reconstruct the
    pixels of the masked patches. The same engine-facing API as `MALPretrain`."""

    PREDICTION_TITLES = ("input as the encoder sees it (masked patches black)",
                         "visible patches as given, masked patches as predicted (drawn with the target patch's mean and std)",
                         "target")

    def __init__(self, enc_cfg: EncoderConfig, obj_cfg: ObjectiveConfig | None = None):
        super().__init__()
        obj_cfg = obj_cfg or ObjectiveConfig(kind="mae", mask=MaskConfig(unit="patch", ratio=0.75))
        if obj_cfg.kind != "mae":
            raise ValueError(f"MAEPretrain needs objective.kind=mae, got {obj_cfg.kind!r}")
        self.enc_cfg, self.obj_cfg = enc_cfg, obj_cfg
        h, w = enc_cfg.grid
        self.num_patches = N = h * w
        self.num_keep = int(N * (1 - obj_cfg.mask.ratio))                  # visible patches per sample (MAE's)
        if not 0 < self.num_keep < N:
            raise ValueError(f"objective.mask.ratio {obj_cfg.mask.ratio} keeps {self.num_keep} of the {N} patches; "
                             f"MAE needs at least one visible and one masked patch")
        p, C = enc_cfg.patch_size, enc_cfg.in_chans
        self.encoder = create_encoder(enc_cfg, num_classes=0)
        self.decoder = MAEDecoder(obj_cfg.decoder, enc_cfg.dim, N, p * p * C)

    # ---------------------------------------------------------------- model API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"encoder.pos_embed", "decoder.pos_embed", "decoder.mask_token"}

    def fast_path(self, enabled: bool = True, compile: bool = True, mode: str | None = None,
                  **kwargs) -> "MAEPretrain":
        """The encoder's fast path (`VisionLSTM.fast_path` / `VisionTransformer.fast_path`) and the decoder's block
        stack under torch.compile(mode) (compile=True), as MAL's Transformer decoder."""
        self.encoder.fast_path(enabled, compile, mode, **kwargs)
        self.decoder.fast = ViTFast(compile, mode) if enabled else None
        return self

    def probe_encoder(self) -> nn.Module:
        """The encoder as pretrained (its fine-tuning scan orders, bidirectional as configured), for the probes."""
        return copy_encoder(self.encoder, self.enc_cfg)

    def masked_input_fraction(self) -> float:
        """The fraction of the patches masked in every sample."""
        return (self.num_patches - self.num_keep) / self.num_patches

    def sample_inputs(self, batch: int, generator: torch.Generator | None = None, device=None
                      ) -> tuple[torch.Tensor, ...]:
        """The step's random draw: each sample's patch shuffle (B, N) (MAE's argsort of uniform noise, drawn on the
        CPU from `generator`); its first `num_keep` patches stay visible. `forward(imgs, *draws)` takes it."""
        noise = torch.rand(batch, self.num_patches, generator=generator)   # (B, N)
        return (noise.argsort(dim=1).to(device),)

    # ---------------------------------------------------------------- stages
    def random_masking(self, x: torch.Tensor, ids_shuffle: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the first `num_keep` patches of each sample's shuffle: x (B, N, D) -> visible tokens (B, V, D), the
        mask (B, N) (1 = removed, float), ids_restore (B, N) (unshuffles [visible, removed]) and ids_keep (B, V)."""
        ids_keep = ids_shuffle[:, :self.num_keep]                            # (B, V) raster patches kept
        ids_restore = ids_shuffle.argsort(dim=1)                             # (B, N)
        mask = torch.ones(x.shape[:2], device=x.device).scatter_(1, ids_keep, 0.0)   # (B, N)
        return gather_tokens(x, ids_keep), mask, ids_restore, ids_keep

    def forward_encoder(self, imgs: torch.Tensor, ids_shuffle: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed all patches, drop the masked ones, run the encoder on the visible ones -> latent (B, V, D), mask,
        ids_restore."""
        x = self.encoder.patchify_embed(imgs) + self.encoder.pos_embed      # (B, N, D)
        x, mask, ids_restore, ids_keep = self.random_masking(x, ids_shuffle)   # (B, V, D)
        return self.encoder.forward_visible(x, ids_keep), mask, ids_restore  # (B, V, D)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, V, D) -> pixel predictions (B, N, p²C) of every patch, in raster order."""
        d = self.decoder
        x = d.embed(x)                                                       # (B, V, Dd)
        masked = d.mask_token.to(x.dtype).expand(x.shape[0], ids_restore.shape[1] - x.shape[1], -1)  # (B, N-V, Dd)
        x = gather_tokens(torch.cat([x, masked], dim=1), ids_restore) + d.pos_embed   # (B, N, Dd) unshuffled
        x = run_stack(d.blocks, x, None, d.fast)                             # (B, N, Dd)
        return d.pred(d.norm(x))                                             # (B, N, p²C)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean squared error over the pixels of each patch, averaged over the removed patches only -> (loss,
        target (B, N, p²C), normalized per patch when norm_pix_loss)."""
        target = normalized_targets(patchify(imgs, self.enc_cfg.patch_size), self.obj_cfg.norm_pix_loss)
        loss = (pred.float() - target.float()).pow(2).mean(dim=-1)          # (B, N) per patch
        return (loss * mask).sum() / mask.sum(), target

    def forward(self, imgs: torch.Tensor, ids_shuffle: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """imgs (B, C, H, W) normalized. Returns loss, pred/target (B, N, p²C) and mask (B, N) (1 = removed)."""
        check_pretraining_size(self.encoder, self.enc_cfg, imgs)
        if ids_shuffle is None:
            ids_shuffle, = self.sample_inputs(imgs.shape[0], generator, imgs.device)
        latent, mask, ids_restore = self.forward_encoder(imgs, ids_shuffle)  # (B, V, D)
        pred = self.forward_decoder(latent, ids_restore)                     # (B, N, p²C)
        loss, target = self.forward_loss(imgs, pred, mask)
        return {"loss": loss, "pred": pred, "target": target, "mask": mask}

    @torch.no_grad()
    def prediction_rows(self, imgs: torch.Tensor, ids_shuffle: torch.Tensor, fill: torch.Tensor | float = 0.0
                        ) -> list[torch.Tensor]:
        """Rows of a prediction figure, each (B, C, H, W): the input with the masked patches set to `fill` (e.g. the
        normalized value of black), the reconstruction of the masked patches with the visible ones pasted (with
        norm_pix_loss drawn with each patch's own mean and std), and the target images."""
        out = self(imgs, ids_shuffle)
        p, (h, w) = self.enc_cfg.patch_size, self.enc_cfg.grid
        patches = patchify(imgs.float(), p)                                  # (B, N, p²C)
        pred = denormalized(out["pred"].float(), patches, self.obj_cfg.norm_pix_loss)   # (B, N, p²C)
        removed = out["mask"].bool()                                         # (B, N)
        seen = torch.where(patch_pixels(removed, p, h, w), torch.as_tensor(fill, dtype=imgs.dtype,
                                                                           device=imgs.device), imgs)
        recon = unpatchify(torch.where(removed.unsqueeze(-1), pred, patches), p, h, w)   # (B, C, H, W)
        return [seen, recon, imgs]
