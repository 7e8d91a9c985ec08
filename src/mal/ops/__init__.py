"""The fused ops of the ViL block, each a PyTorch reference beside its Triton kernel, and one dispatch."""
from .registry import backends, resolve

__all__ = ["resolve", "backends"]
