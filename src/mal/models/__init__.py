"""Encoders: the Vision-LSTM backbone and its ViT baseline, with one API (timm's model API plus
`forward_clusters` for MAL and `forward_visible` for MAE)."""
from __future__ import annotations

import torch.nn as nn

from ..config import EncoderConfig
from .registry import ENCODERS, create_model, mal_base, mal_small, mal_tiny, vit_base, vit_small, vit_tiny
from .vil import ViLBlock, VisionLSTM
from .vit import VisionTransformer


def create_encoder(cfg: EncoderConfig, num_classes: int = 0) -> nn.Module:
    """The encoder of `cfg.arch` (num_classes 0: no head, as the pretraining objectives and probes use it)."""
    return ENCODERS[cfg.arch](cfg, num_classes=num_classes)


def copy_encoder(encoder: nn.Module, cfg: EncoderConfig) -> nn.Module:
    """A head-less encoder of `cfg` holding `encoder`'s weights, on its device, in eval mode (for the probes)."""
    out = create_encoder(cfg, num_classes=0)
    out.load_state_dict(encoder.state_dict())
    return out.to(next(encoder.parameters()).device).eval()


__all__ = ["ENCODERS", "create_encoder", "copy_encoder", "create_model", "ViLBlock", "VisionLSTM", "VisionTransformer",
           "mal_tiny", "mal_small", "mal_base", "vit_tiny", "vit_small", "vit_base"]
