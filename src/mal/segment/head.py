"""The decoder of `Segmenter`: a 4-level feature pyramid made from the single-scale encoder, and UperNet.

`FeaturePyramid` follows ViT-UperNet (BEiT / MAE's segmentation): four encoder blocks' outputs on the patch grid
become four levels by transposed convolutions (x4: two of stride 2 with a norm and GELU between, x2: one) or
max-pooling (x0.5, x0.25); x1 is the identity. `UperNetHead` is UperNet's decode head as mmsegmentation's
`UPerHead` computes it: a pyramid pooling module (PPM) on the coarsest level, lateral 1x1 convolutions, a top-down
path that adds each upsampled coarser map, a 3x3 convolution per level, all levels upsampled to the finest and
concatenated, a 3x3 fusion convolution, dropout and a 1x1 classifier. Every convolution block is conv + norm +
ReLU; the norm is GroupNorm (mmseg uses SyncBN) so that the result does not depend on the batch split
(processes, accumulation, batch size 1 at inference).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 2 channels each (a group of one channel on PPM's 1x1 bin would
    normalize a single value): the most groups <= 32 that divide `channels` that way."""
    groups = max((g for g in range(1, 33) if channels % g == 0 and channels // g >= 2), default=1)
    return nn.GroupNorm(groups, channels)


def conv_block(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    """mmseg's ConvModule: conv (no bias) + norm + ReLU, 'same' padding."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), group_norm(c_out),
                         nn.ReLU(inplace=True))


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize (align_corners=False, as mmseg's `resize`)."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear",
                                                                       align_corners=False)


def level(dim: int, scale: float) -> nn.Module:
    """One pyramid level from grid-sized features (B, dim, h, w): x4, x2, x1, x0.5 or x0.25 the size."""
    up = lambda: nn.ConvTranspose2d(dim, dim, 2, 2)
    if scale == 4:
        return nn.Sequential(up(), group_norm(dim), nn.GELU(), up())
    if scale == 2:
        return up()
    if scale == 1:
        return nn.Identity()
    if scale in (0.5, 0.25):
        k = int(round(1 / scale))
        return nn.MaxPool2d(k, k)
    raise ValueError(f"feature scale {scale} is not one of 4, 2, 1, 0.5, 0.25")


class FeaturePyramid(nn.Module):
    """Four grid-sized maps (B, dim, h, w) -> four levels, level i at `scales[i]` times the grid."""

    def __init__(self, dim: int, scales: list[float]):
        super().__init__()
        self.scales = [float(s) for s in scales]
        self.levels = nn.ModuleList([level(dim, s) for s in self.scales])

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [f(x) for f, x in zip(self.levels, feats)]


class PPM(nn.Module):
    """Pyramid pooling: adaptive average pooling to s x s for each scale s, a 1x1 conv block, upsampled back."""

    def __init__(self, c_in: int, channels: int, pool_scales: list[int]):
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_block(c_in, channels, 1))
                                     for s in pool_scales])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(stage(x), x.shape[-2:]) for stage in self.stages]


class UperNetHead(nn.Module):
    """UperNet over four levels of `in_channels` each (finest first) -> logits (B, num_classes) at the finest
    level's size."""

    def __init__(self, in_channels: list[int], channels: int, num_classes: int, pool_scales: list[int],
                 dropout: float = 0.1):
        super().__init__()
        self.ppm = PPM(in_channels[-1], channels, pool_scales)
        self.ppm_bottleneck = conv_block(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([conv_block(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([conv_block(channels, channels, 3) for _ in in_channels[:-1]])
        self.fpn_bottleneck = conv_block(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)                    # mmseg's init of conv_seg
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, feats[:-1])]
        laterals.append(self.ppm_bottleneck(torch.cat([top, *self.ppm(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):                            # top-down: coarse into fine
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([resize(o, size) for o in outs], dim=1))   # (B, C, H0, W0)
        return self.classifier(self.dropout(fused))                          # (B, classes, H0, W0)


__all__ = ["FeaturePyramid", "UperNetHead", "PPM", "conv_block", "resize"]
