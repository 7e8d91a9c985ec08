"""MAL: cluster-masked autoregressive pretraining of Vision-LSTM (mLSTM) backbones, with its baselines (MAE, ViT)."""
from .config import DecoderConfig, EncoderConfig, MaskConfig, ObjectiveConfig
from .objectives import MAEPretrain, MALPretrain, create_objective
from .models import (VisionLSTM, VisionTransformer, create_encoder, mal_base, mal_small, mal_tiny, vit_base, vit_small,
                     vit_tiny)

__version__ = "0.1.0"
__all__ = ["EncoderConfig", "DecoderConfig", "MaskConfig", "ObjectiveConfig", "MALPretrain", "MAEPretrain",
           "create_objective", "VisionLSTM", "VisionTransformer", "create_encoder", "mal_tiny", "mal_small", "mal_base",
           "vit_tiny", "vit_small", "vit_base", "__version__"]
