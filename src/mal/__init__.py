"""MAL: cluster-masked autoregressive pretraining of Vision-LSTM (mLSTM) backbones."""
from .config import DecoderConfig, EncoderConfig, MaskConfig, ObjectiveConfig
from .objectives.mal import MALPretrain
from .models.vil import VisionLSTM, mal_base, mal_small, mal_tiny

__version__ = "0.1.0"
__all__ = ["EncoderConfig", "DecoderConfig", "MaskConfig", "ObjectiveConfig", "MALPretrain", "VisionLSTM",
           "mal_tiny", "mal_small", "mal_base", "__version__"]
