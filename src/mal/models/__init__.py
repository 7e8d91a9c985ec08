"""Encoders: the Vision-LSTM backbone (and, later, its baselines)."""
from .vil import ViLBlock, VisionLSTM, mal_base, mal_small, mal_tiny

__all__ = ["ViLBlock", "VisionLSTM", "mal_tiny", "mal_small", "mal_base"]
