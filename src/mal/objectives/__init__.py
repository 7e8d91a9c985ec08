"""Pretraining objectives: an encoder plus what it is trained to predict (MAL, or the MAE baseline)."""
from __future__ import annotations

import torch.nn as nn

from ..config import EncoderConfig, ObjectiveConfig
from .mae import MAEPretrain
from .mal import MALPretrain

OBJECTIVES = {"mal": MALPretrain, "mae": MAEPretrain}


def create_objective(enc_cfg: EncoderConfig, obj_cfg: ObjectiveConfig) -> nn.Module:
    """The pretraining model of `obj_cfg.kind` around the encoder of `enc_cfg.arch`."""
    return OBJECTIVES[obj_cfg.kind](enc_cfg, obj_cfg)


__all__ = ["OBJECTIVES", "create_objective", "MALPretrain", "MAEPretrain"]
