"""Semantic segmentation with a pretrained encoder (docs/segmentation.md): `Segmenter` (encoder + 4-level feature
pyramid + UperNet) and its loss; `mal.segment.metrics` (torchmetrics, imported when evaluating) its scores. The
engine trains it as the task `segment`."""
from .head import FeaturePyramid, UperNetHead
from .loss import SegLoss
from .model import Segmenter, default_out_indices

__all__ = ["Segmenter", "FeaturePyramid", "UperNetHead", "SegLoss", "default_out_indices"]
