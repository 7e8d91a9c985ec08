"""Pretraining decoders (DESIGN §4): a light block-causal Transformer (default) or an xLSTM stack (Table 13).

Both take the encoder output in the *slot layout* (slot s = the s-th input cluster of the sample's
cluster sequence, k*k tokens per slot, row-major inside) and predict, for every token of slot s, the
pixels of the patch at the same (a, b) inside cluster s+1.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Mlp, trunc_normal_

from ..config import DecoderConfig
from ..models.vil import ViLBlock
from ..models.vit import ViTFast, block_causal_mask, run_stack
from ..ops.attention import attention
from ..scan import ScanPlan
from ..serialization import gather_tokens, slot_perm


class CausalBlock(nn.Module):
    """Pre-LN Transformer block whose attention takes a boolean visibility mask (`mal.ops.attention`: a short-sequence
    kernel on CUDA, SDPA otherwise)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                       # (B, H, N, Dh) each
        a = attention(q, k, v, visible)                                      # (B, H, N, Dh)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, D))                # (B, N, D)
        return x + self.mlp(self.norm2(x))                                   # (B, N, D)


class Decoder(nn.Module):
    """Decoder embed + position of the predicted patch + blocks + LayerNorm/Linear pixel head."""

    def __init__(self, cfg: DecoderConfig, enc_dim: int, num_patches: int, patch_dim: int, cluster_size: int,
                 layer_patterns: list[str] | None = None):
        super().__init__()
        self.cfg, self.k = cfg, cluster_size
        self.embed = nn.Linear(enc_dim, cfg.dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, cfg.dim))  # indexed by target raster patch
        if cfg.kind == "transformer":
            self.blocks = nn.ModuleList([CausalBlock(cfg.dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        else:
            self.blocks = nn.ModuleList([ViLBlock(cfg.dim) for _ in range(cfg.depth)])
        self.layer_patterns = layer_patterns or ["row"] * cfg.depth
        self.norm = nn.LayerNorm(cfg.dim)
        self.pred = nn.Linear(cfg.dim, patch_dim)
        self._masks: dict = {}
        self._plans: dict[int, ScanPlan] = {}
        self.fast: ViTFast | None = None
        self.init_weights()

    def init_weights(self) -> None:
        """MAE-style xavier init for the Transformer's linears; ViL blocks keep their own init."""
        trunc_normal_(self.pos_embed, std=0.02)
        linears = [self.embed, self.pred]
        if self.cfg.kind == "transformer":
            linears += [m for m in self.blocks.modules() if isinstance(m, nn.Linear)]
        for m in linears:
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def fast_path(self, enabled: bool = True, compile: bool = True, mode: str | None = None, **kwargs) -> "Decoder":
        """The fused GPU blocks of an xLSTM decoder; a Transformer decoder's block stack under torch.compile(mode)
        (compile=True, as the ViT encoder's). Parameters and state dict are unchanged."""
        if self.cfg.kind == "transformer":
            self.fast = ViTFast(compile, mode) if enabled else None
        for blk in self.blocks:
            if isinstance(blk, ViLBlock):
                blk.fast_path(enabled, compile, mode, **kwargs)
        return self

    def _visible(self, num_tokens: int, device) -> torch.Tensor:
        """(M, M) block-causal mask: a token of slot s sees all tokens of slots <= s."""
        key = (num_tokens, str(device))
        if key not in self._masks:
            self._masks[key] = block_causal_mask(torch.arange(num_tokens, device=device) // (self.k * self.k))
        return self._masks[key]

    def _plan(self, num_tokens: int) -> ScanPlan:
        """xLSTM decoder: the layers' inner patterns over the slot layout."""
        if num_tokens not in self._plans:
            slots = num_tokens // (self.k * self.k)
            self._plans[num_tokens] = ScanPlan([slot_perm(slots, self.k, p) for p in self.layer_patterns])
        return self._plans[num_tokens]

    def forward(self, enc: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """enc (B, M, De) slot layout; target_idx (B, M) raster index of the patch each token predicts."""
        x = self.embed(enc) + gather_tokens(self.pos_embed.expand(enc.shape[0], -1, -1), target_idx)  # (B, M, Dd)
        M = x.shape[1]
        if self.cfg.kind == "transformer":
            x = run_stack(self.blocks, x, self._visible(M, x.device), self.fast)   # (B, M, Dd)
        else:
            x = self._plan(M).run(self.blocks, x)                            # (B, M, Dd) slot layout
        return self.pred(self.norm(x))                                       # (B, M, p*p*C)
