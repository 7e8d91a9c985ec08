"""Pretraining objectives: an encoder plus what it is trained to predict."""
from .mal import MALPretrain

__all__ = ["MALPretrain"]
