"""`Segmenter`: an encoder (ViL or ViT, the classifier's parameter names under `encoder.`) + a 4-level feature
pyramid + UperNet, returning logits at the input's resolution for any input size.

    forward(x) = pad to the patch grid -> encoder.forward_intermediates (4 blocks, raster order, NCHW)
                 -> FeaturePyramid -> UperNetHead -> bilinear upsampling -> crop the padding
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import EncoderConfig, SegConfig
from ..models import create_encoder
from .head import FeaturePyramid, UperNetHead, resize


def default_out_indices(depth: int) -> list[int]:
    """The last block of each quarter of the encoder: 5, 11, 17, 23 of 24 blocks (the second block of a ViL pair,
    so every token has seen the image in both directions), 2, 5, 8, 11 of 12."""
    if depth < 4:
        return [min(i, depth - 1) for i in range(4)]
    return [depth * q // 4 - 1 for q in range(1, 5)]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad (the normalized mean) on the bottom and right to multiples of `multiple`."""
    H, W = x.shape[-2:]
    ph, pw = -H % multiple, -W % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def windows(size: tuple[int, int], crop: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """mmseg's sliding windows (y1, y2, x1, x2) of `crop` every `stride` over an image of `size`; the last window of
    a row or column is moved back to end at the border, and an image smaller than the crop is one window."""
    (H, W), (ch, cw), (sh, sw) = size, crop, stride
    out = []
    for i in range(max(H - ch + sh - 1, 0) // sh + 1):
        for j in range(max(W - cw + sw - 1, 0) // sw + 1):
            y2, x2 = min(i * sh + ch, H), min(j * sw + cw, W)
            out.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return out


class Segmenter(nn.Module):
    """Encoder + feature pyramid + UperNet head; `forward` returns logits (B, num_classes, H, W)."""

    def __init__(self, enc_cfg: EncoderConfig, seg_cfg: SegConfig, num_classes: int):
        super().__init__()
        self.enc_cfg, self.seg_cfg, self.num_classes = enc_cfg, seg_cfg, num_classes
        self.encoder = create_encoder(enc_cfg, num_classes=0)
        self.out_indices = list(seg_cfg.out_indices) or default_out_indices(enc_cfg.depth)
        bad = [i for i in self.out_indices if not -enc_cfg.depth <= i < enc_cfg.depth]
        if bad:
            raise ValueError(f"seg.out_indices {bad} are not blocks of the {enc_cfg.depth}-block encoder")
        self.neck = FeaturePyramid(enc_cfg.dim, seg_cfg.feature_scales)
        self.decode_head = UperNetHead([enc_cfg.dim] * 4, seg_cfg.channels, num_classes, seg_cfg.pool_scales,
                                       seg_cfg.dropout)

    # ---------------------------------------------------------------- model API (as the encoders')
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{k}" for k in self.encoder.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False, blocks_per_group: int = 1):
        """Layer-wise lr decay: the encoder's layer map; the pyramid and the head are the last group, with the
        encoder's final norm."""
        inner = self.encoder.group_matcher(coarse, blocks_per_group)
        return lambda name: inner(name[len("encoder."):] if name.startswith("encoder.") else "head")

    def fast_path(self, enabled: bool = True, **kwargs) -> "Segmenter":
        """The encoder's fast path (fused ViL blocks / ViT blocks); the head runs as is."""
        self.encoder.fast_path(enabled, **kwargs)
        return self

    # ---------------------------------------------------------------- forward
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four pyramid levels of images whose sides are multiples of the patch size."""
        feats = self.encoder.forward_intermediates(x, self.out_indices, norm=self.seg_cfg.norm_features,
                                                   intermediates_only=True)       # 4 x (B, D, h, w) raster
        return self.neck(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W), any size -> logits (B, num_classes, H, W); padded to the patch grid inside."""
        H, W = x.shape[-2:]
        xp = pad_to_multiple(x, self.enc_cfg.patch_size)                     # (B, C, H', W')
        logits = resize(self.decode_head(self.features(xp)), xp.shape[-2:])  # (B, classes, H', W')
        return logits[..., :H, :W]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, mode: str = "whole", crop: tuple[int, int] | None = None,
                stride: tuple[int, int] | None = None) -> torch.Tensor:
        """Inference logits (B, num_classes, H, W): the whole (padded) image, or `crop` windows every `stride`
        (default: seg.crop_size and seg.stride) with the logits averaged where windows overlap."""
        if mode == "whole":
            return self(x)
        if mode != "slide":
            raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
        crop, stride = crop or self.seg_cfg.crop_size, stride or self.seg_cfg.stride
        B, _, H, W = x.shape
        out = x.new_zeros(B, self.num_classes, H, W, dtype=torch.float32)
        count = x.new_zeros(1, 1, H, W, dtype=torch.float32)
        for y1, y2, x1, x2 in windows((H, W), crop, stride):
            out[..., y1:y2, x1:x2] += self(x[..., y1:y2, x1:x2]).float()
            count[..., y1:y2, x1:x2] += 1
        return out / count


__all__ = ["Segmenter", "default_out_indices", "pad_to_multiple", "windows"]
