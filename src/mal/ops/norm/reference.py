"""The ViL block's pre-LayerNorm and up-projection in plain PyTorch, on the tokens in the block's order."""
from __future__ import annotations

import torch.nn.functional as F

from ...serialization import gather_tokens


def block_up(x, ln_w, ln_b, ln_eps: float, up_w, up_b, order=None):
    """Block input x (B, S, D) -> up-projection xz (B, S, 2I) of its LayerNorm; with `order` ((S,) or (B, S)) the
    tokens x[:, order] (the gather fused into the LayerNorm's loads when compiled)."""
    if order is not None:
        x = gather_tokens(x, order)                                         # (B, S, D)
    xn = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, ln_eps)                # (B, S, D)
    return F.linear(xn, up_w, up_b)                                         # (B, S, 2I)


__all__ = ["block_up"]
