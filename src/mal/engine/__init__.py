"""The training engine: `Trainer` (one run), the eager or CUDA-graphed step, optimizer groups, probes."""
from .trainer import Trainer, train

__all__ = ["Trainer", "train"]
