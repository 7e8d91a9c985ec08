"""Typed configuration: dataclasses validated at construction, loaded from YAML plus `key=value` overrides.

Every field has a type; loading rejects unknown keys (with a "did you mean"), wrong types and
impossible combinations before any work starts.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import tokenize
import types
import typing
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .serialization import FIXED_ORDERS, MASK_UNITS, SCAN_ORDERS, check_mask, check_scan_order, grid_size

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SHIPPED_CONFIGS: Traversable = files(__package__) / "configs"   # package data: one YAML per paper setting, the demo

# ----------------------------------------------------------------------------- model


ARCHS = ("vil", "vit")
GLOBAL_POOLS = {"vil": ("", "first_last", "avg"), "vit": ("", "avg")}   # "" = the architecture's own
VIL_ONLY_DEFAULTS = {"expansion": 2, "qkv_block_size": 4, "conv_kernel_size": 4, "mlstm_backend": "auto"}


@dataclass
class EncoderConfig:
    """The encoder: a Vision-LSTM (DESIGN §3) or a ViT baseline. Defaults are MAL-T at 192 px."""
    arch: str = "vil"                # "vil" (Vision-LSTM, mLSTM blocks) or "vit" (Transformer blocks, the baseline)
    img_size: int = 192              # image side in pixels (a multiple of patch_size)
    patch_size: int = 16             # patch side in pixels
    in_chans: int = 3                # image channels
    dim: int = 192                   # model width D (MAL-T/S/B: 192/384/768)
    depth: int = 24                  # ViL blocks (two blocks are one Transformer-equivalent layer); ViT blocks
    num_heads: int = 4               # ViL: mLSTM heads, head dim = expansion * dim / num_heads; ViT: attention
                                     # heads, head dim = dim / num_heads
    expansion: int = 2               # up-projection D -> expansion*D for each of the x and z branches
    qkv_block_size: int = 4          # block-diagonal q/k/v projections with blocks of this size
    conv_kernel_size: int = 4        # causal depthwise conv along each layer's sequence
    drop_path_rate: float = 0.0      # stochastic depth. ViL: the same rate in every block (as the official ViL);
                                     # ViT: linear from 0 to this rate over the blocks (as timm / MAE)
    cluster_size: int = 4            # k: clusters of k x k patches
    scan_order: str = "alternating"  # row_fwd, col_fwd, row_bwd, col_bwd, random or alternating (ViT: only the
                                     # cluster sequence matters, in MAL pretraining and with bidirectional=false)
    bidirectional: bool = True       # fine-tuning/inference. ViL: every other layer runs its sequence reversed;
                                     # false = causal along the scan order. ViT: full attention; false =
                                     # block-causal attention over the clusters of the scan order's cluster
                                     # sequence ((a)'s for alternating and random), as MAL pretrains it
    mlstm_backend: str = "auto"      # ViL: mLSTM kernel; "auto" picks the fastest available
    global_pool: str = ""            # the classifier's pooling: "" = the architecture's own (ViL: "first_last", the
                                     # first and last token as the paper; ViT: "avg"), or "avg", the mean of the
                                     # tokens (as the probes read them)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch must be one of {list(ARCHS)}, got {self.arch!r}")
        if self.global_pool not in GLOBAL_POOLS[self.arch]:
            raise ValueError(f"model.global_pool={self.global_pool!r} is not a pooling of model.arch={self.arch}; "
                             f"choose one of {list(GLOBAL_POOLS[self.arch])}")
        grid_size(self.img_size, self.patch_size)
        check_scan_order(self.scan_order)
        for name in ("patch_size", "in_chans", "dim", "depth", "num_heads", "expansion", "qkv_block_size",
                     "conv_kernel_size", "cluster_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.arch == "vit":
            self._check_vit()
            return
        inner = self.expansion * self.dim
        if inner % self.num_heads or inner % self.qkv_block_size:
            raise ValueError(f"model.expansion*model.dim = {inner} must be divisible by num_heads "
                             f"({self.num_heads}) and qkv_block_size ({self.qkv_block_size})")
        from .ops import backends
        if self.mlstm_backend not in ("auto", *backends("mlstm")):
            raise ValueError(f"model.mlstm_backend={self.mlstm_backend!r} is not an mLSTM backend; choose one of "
                             f"{['auto', *backends('mlstm')]}")

    def _check_vit(self) -> None:
        """A ViT has no mLSTM layer: its ViL-only settings must keep their defaults (none may silently do nothing)."""
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim {self.dim} must be divisible by model.num_heads {self.num_heads} (attention "
                             f"heads of model.arch=vit)")
        changed = [f"model.{k}={getattr(self, k)!r}" for k, v in VIL_ONLY_DEFAULTS.items() if getattr(self, k) != v]
        if changed:
            raise ValueError(f"{', '.join(changed)} only applies to model.arch=vil (the mLSTM layer); a ViT has no "
                             f"such setting: remove it or set model.arch=vil")

    @property
    def grid(self) -> tuple[int, int]:
        return grid_size(self.img_size, self.patch_size)


@dataclass
class DecoderConfig:
    """The pretraining decoder (DESIGN §4, paper Tables 12-13)."""
    kind: str = "transformer"        # "transformer" or "xlstm"
    depth: int = 8                   # decoder blocks
    dim: int = 512                   # decoder width
    num_heads: int = 16              # transformer heads (xlstm decoder uses 4 mLSTM heads)
    mlp_ratio: float = 4.0           # transformer MLP hidden width / dim

    def __post_init__(self):
        if self.kind not in ("transformer", "xlstm"):
            raise ValueError(f"decoder.kind must be 'transformer' or 'xlstm', got {self.kind!r}")
        if self.depth < 1 or self.dim < 1:
            raise ValueError("decoder.depth and decoder.dim must be >= 1")
        if self.kind == "transformer" and self.dim % self.num_heads:
            raise ValueError(f"decoder.dim {self.dim} must be divisible by decoder.num_heads {self.num_heads}")


@dataclass
class MaskConfig:
    """Input masking for pretraining (paper Table 5)."""
    unit: str = "cluster"            # none | pixel | patch | cluster
    ratio: float = 0.2               # of all h*w patch positions (20 % of 144 = 28 patches, 2 clusters of 16)

    def __post_init__(self):
        check_mask(self.unit, self.ratio)


OBJECTIVES = ("mal", "mae")


@dataclass
class ObjectiveConfig:
    """The pretraining objective beyond the encoder: MAL (next-cluster prediction) or the MAE baseline."""
    kind: str = "mal"                # "mal" (cluster-masked autoregression) or "mae" (masked autoencoder baseline)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)   # MAL: input masking; MAE: the masked patches (unit
                                                           # patch, e.g. ratio 0.75)
    norm_pix_loss: bool = True       # targets normalized per patch (MAE)

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective.kind must be one of {list(OBJECTIVES)}, got {self.kind!r}")
        if self.kind != "mae":
            return
        if self.mask.unit != "patch" or not 0.0 < self.mask.ratio < 1.0:
            raise ValueError(f"objective.kind=mae masks random patches: set objective.mask.unit=patch and "
                             f"objective.mask.ratio in (0, 1), e.g. 0.75 (got unit {self.mask.unit!r}, ratio "
                             f"{self.mask.ratio})")
        if self.decoder.kind != "transformer":
            raise ValueError(f"objective.kind=mae uses MAE's bidirectional Transformer decoder: set "
                             f"objective.decoder.kind=transformer (got {self.decoder.kind!r})")


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "mal_tiny": dict(arch="vil", dim=192, depth=24),
    "mal_small": dict(arch="vil", dim=384, depth=24),
    "mal_base": dict(arch="vil", dim=768, depth=24),
    "vit_tiny": dict(arch="vit", dim=192, depth=12, num_heads=3),     # DeiT-T / ViT-Ti widths
    "vit_small": dict(arch="vit", dim=384, depth=12, num_heads=6),
    "vit_base": dict(arch="vit", dim=768, depth=12, num_heads=12),
}


# ----------------------------------------------------------------------------- training



def _in_range(name: str, value: float, low: float, high: float, high_open: bool = False) -> None:
    """ValueError unless low <= value <= high (value < high when high_open)."""
    if value < low or value > high or (high_open and value == high):
        raise ValueError(f"{name} must be in [{low}, {high}{')' if high_open else ']'}, got {value}")


@dataclass
class DataConfig:
    """Where images come from and how they are loaded."""
    dataset: str = "default"           # "default" (embedded MNIST digits) or an ImageFolder root
    train_split: str = "train"         # sub-folder of the training images
    val_split: str = "test"            # sub-folder evaluated at the end ("" = none); test and val stand in for
                                       # each other when only one exists
    holdout: float = 0.0               # fraction of each class of the training split held out for evaluation
                                       # during training (recipe choices); the val_split folder is then used once,
                                       # at the end
    holdout_seed: int = 0              # which images are held out (fixed across run seeds)
    label_fraction: float = 1.0        # finetune / supervised: train on this fraction of each class of the
                                       # training images (after the held-out part), the low-label protocol;
                                       # drawn with holdout_seed, fixed across run seeds
    pretrain_fraction: float = 1.0     # pretrain: pretrain on this fraction of each class of the training images
                                       # (after the held-out part), the data-scale protocol; the probes still
                                       # train on every training image. Drawn as label_fraction, nested
    mean: tuple[float, float, float] = IMAGENET_MEAN   # per-channel normalization of [0, 1] pixels
    std: tuple[float, float, float] = IMAGENET_STD     # per-channel standard deviation of [0, 1] pixels
    num_workers: int = -1              # loader worker processes; -1 = what the machine has (at most 8)
    cache: bool = False                # decode all images once into a uint8 tensor (small images)
    cache_dir: str = ""                # where cache=true also stores the decoded array (.npy), reused by later
                                       # runs while the files are unchanged ("" = memory only)
    strict: bool = False               # fail on the first unreadable image instead of skipping it
    crop_min_scale: float = 0.2        # pretraining RandomResizedCrop scale lower bound
    eval_crop_pct: float = 0.875       # eval: resize to img_size / crop_pct, center crop

    def __post_init__(self):
        if self.num_workers < -1:
            raise ValueError("data.num_workers must be >= 0, or -1 for what the machine has")
        if not 0 < self.crop_min_scale <= 1 or not 0 < self.eval_crop_pct <= 1:
            raise ValueError("data.crop_min_scale and data.eval_crop_pct must be in (0, 1]")
        _in_range("data.holdout", self.holdout, 0.0, 0.5)
        if not 0 < self.label_fraction <= 1:
            raise ValueError(f"data.label_fraction must be in (0, 1] (1 = every label), got {self.label_fraction}")
        if not 0 < self.pretrain_fraction <= 1:
            raise ValueError(f"data.pretrain_fraction must be in (0, 1] (1 = every image), got {self.pretrain_fraction}")
        if min(self.std) <= 0:
            raise ValueError(f"data.std must be positive in every channel, got {list(self.std)}")


@dataclass
class OptimConfig:
    """AdamW + warm-up + cosine. lr = blr * batch_size / 256 unless lr is set."""
    batch_size: int = 256              # global batch: processes x accum_steps x per-process micro-batch
    accum_steps: int = 1               # micro-batches per optimizer step
    epochs: int = 100                  # passes over the training set
    warmup_epochs: float = 5.0         # linear warm-up, then half-cosine to min_lr
    blr: float = 1.5e-4                # base lr, scaled by batch_size / 256
    lr: float = 0.0                    # absolute lr; 0 = derive from blr
    min_lr: float = 0.0                # lr at the end of the cosine
    weight_decay: float = 0.05         # AdamW decoupled weight decay (not on biases, norms, embeddings)
    betas: tuple[float, float] = (0.9, 0.999)   # AdamW betas
    clip_grad: float = 0.0             # max grad norm; 0 = off
    layer_decay: float = 1.0           # layer-wise lr decay (fine-tuning); 1 = off
    layer_decay_group: int = 2         # blocks per layer-decay group: 2 ViL blocks = one Transformer layer, so
                                       # MAE's 0.75 spans the same range over MAL's 24 blocks as over ViT's 12
                                       # (ViT configs set 1: each ViT block is one layer)

    def __post_init__(self):
        if self.batch_size < 1 or self.accum_steps < 1 or self.epochs < 1 or self.layer_decay_group < 1:
            raise ValueError("optim.batch_size, accum_steps, epochs and layer_decay_group must be >= 1")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"optim.batch_size {self.batch_size} is not divisible by optim.accum_steps "
                             f"{self.accum_steps}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError("optim.layer_decay must be in (0, 1]")
        for name in ("blr", "lr", "min_lr", "weight_decay", "clip_grad", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if self.abs_lr <= 0:
            raise ValueError("the lr is 0: set optim.blr or optim.lr > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be in [0, 1), got {list(self.betas)}")

    @property
    def abs_lr(self) -> float:
        return self.lr if self.lr > 0 else self.blr * self.batch_size / 256


@dataclass
class AugConfig:
    """Fine-tuning augmentation (MAE's recipe through timm); pretraining uses RandomResizedCrop + flip."""
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm auto-augment policy ("rand-...", "augmix", "v0", ...); "" = off
    reprob: float = 0.25               # random-erasing probability
    mixup: float = 0.8                 # mixup alpha; 0 = off
    cutmix: float = 1.0                # cutmix alpha; 0 = off
    label_smoothing: float = 0.1       # of the targets (mixup's soft targets included)
    crop_min_scale: float = 0.08       # RandomResizedCrop scale lower bound

    def __post_init__(self):
        _in_range("aug.reprob", self.reprob, 0.0, 1.0)
        _in_range("aug.label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        _in_range("aug.crop_min_scale", self.crop_min_scale, 0.0, 1.0)
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"aug.mixup and aug.cutmix are Beta-distribution alphas >= 0 (0 = off), got "
                             f"{self.mixup} and {self.cutmix}")
        if self.auto_augment:
            check_auto_augment(self.auto_augment)


def check_auto_augment(policy: str) -> None:
    """A clear error for an auto-augment string timm cannot parse."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    hparams = dict(translate_const=10, img_mean=(124, 116, 104))
    build = (rand_augment_transform if policy.startswith("rand") else
             augment_and_mix_transform if policy.startswith("augmix") else auto_augment_transform)
    try:
        build(policy, hparams)
    except (AssertionError, KeyError, ValueError, IndexError) as e:
        raise ValueError(f"aug.auto_augment={policy!r} is not a timm policy ({type(e).__name__}: {e}); use e.g. "
                         f"rand-m9-mstd0.5-inc1, augmix-m5-w3, v0, original, or '' for none") from None


SEG_LOSSES = ("ce", "ce_dice")
SEG_INFERENCE = ("whole", "slide")
FEATURE_SCALES = (4.0, 2.0, 1.0, 0.5, 0.25)


@dataclass
class SegConfig:
    """Semantic segmentation (task: segment): masks, the UperNet head, the loss, augmentation, inference."""
    class_names: list[str] = field(default_factory=list)   # one name per class for the per-class metrics and the
                                                           # figure ([] = "0", "1", ...); num_classes counts them
    ignore_index: int = -1             # mask value ignored by the loss and the metrics (CamVid's void: 11; -1 =
                                       # none in the masks), also given to padding; outside [0, num_classes)
    image_dir: str = "{split}"         # image folder under data.dataset; "{split}" is replaced by the split name
    mask_dir: str = "{split}annot"     # mask folder (PNG of class indices, same file stem as the image)
    split_sizes: list[int] = field(default_factory=list)   # folders without "{split}": a seeded split of the
                                                           # pairs into [train, val, test] counts (Kvasir: 800, 98,
                                                           # 100); the split names pick the parts
    split_seed: int = 0                # which pairs go to which part of split_sizes
    eval_split: str = ""               # split evaluated during training (e.g. val); "" = the data.holdout part,
                                       # else data.val_split, as for classification
    out_indices: list[int] = field(default_factory=list)   # the 4 encoder blocks feeding the head ([] = the last
                                                           # block of each quarter of the depth: 5, 11, 17, 23 of 24)
    feature_scales: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])  # each level's size relative
                                       # to the patch grid (deconvolutions up, max-pooling down; ViT-UperNet's
                                       # 4, 2, 1, 0.5 = strides 4-32 px at patch 16)
    norm_features: bool = True         # pass every level through the encoder's final LayerNorm
    channels: int = 256                # UperNet width (PPM, FPN and the fused map)
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])   # PPM bins on the coarsest level
    dropout: float = 0.1               # before the 1x1 classifier
    loss: str = "ce"                   # "ce" (cross-entropy averaged over all pixels, ignored ones count 0) or
                                       # "ce_dice" (+ soft Dice of the classes other than 0, per image)
    dice_weight: float = 1.0           # weight of the Dice term of ce_dice
    crop_size: tuple[int, int] = (192, 192)      # training crop (height, width), multiples of model.patch_size
    scale_range: tuple[float, float] = (0.5, 2.0)   # training: resize by a random factor of the image size,
                                       # then crop (padded with the ignore index where the image is smaller)
    hflip: bool = True                 # training: random horizontal flip
    vflip: bool = False                # training: random vertical flip (endoscopy, aerial images)
    photometric: bool = True           # training: brightness / contrast / saturation / hue jitter, image only
    inference: str = "whole"           # evaluation: "whole" (padded to the patch grid) or "slide" (crop_size
                                       # windows, logits averaged where they overlap)
    stride: tuple[int, int] = (128, 128)   # slide inference: window step (height, width)

    def __post_init__(self):
        if self.loss not in SEG_LOSSES:
            raise ValueError(f"seg.loss must be one of {list(SEG_LOSSES)}, got {self.loss!r}")
        if self.inference not in SEG_INFERENCE:
            raise ValueError(f"seg.inference must be one of {list(SEG_INFERENCE)}, got {self.inference!r}")
        if len(self.feature_scales) != 4 or any(float(f) not in FEATURE_SCALES for f in self.feature_scales):
            raise ValueError(f"seg.feature_scales needs 4 levels among {list(FEATURE_SCALES)}, got "
                             f"{list(self.feature_scales)}")
        if self.out_indices and len(self.out_indices) != 4:
            raise ValueError(f"seg.out_indices needs 4 block indices (one per level) or [], got {self.out_indices}")
        if self.split_sizes and (len(self.split_sizes) != 3 or min(self.split_sizes) < 0):
            raise ValueError(f"seg.split_sizes needs 3 counts >= 0 [train, val, test], got {self.split_sizes}")
        if min(*self.crop_size, *self.stride, self.channels) < 1 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError("seg.crop_size, seg.stride and seg.channels must be >= 1 and seg.scale_range must be "
                             "0 < low <= high")
        _in_range("seg.dropout", self.dropout, 0.0, 1.0, high_open=True)
        if self.dice_weight < 0 or min(self.pool_scales, default=1) < 1:
            raise ValueError("seg.dice_weight must be >= 0 and seg.pool_scales >= 1")

    def check(self, num_classes: int, patch_size: int) -> None:
        """What depends on the run: the number of classes and the patch size."""
        if not 2 <= num_classes <= 255:
            raise ValueError(f"task=segment needs num_classes in [2, 255] (the mask's classes, without the ignored value; "
                             f"2 for a binary mask), got {num_classes}")
        if 0 <= self.ignore_index < num_classes:
            raise ValueError(f"seg.ignore_index={self.ignore_index} is one of the {num_classes} classes; use a value "
                             f"outside [0, {num_classes}) (e.g. 255)")
        if self.class_names and len(self.class_names) != num_classes:
            raise ValueError(f"seg.class_names has {len(self.class_names)} names for num_classes={num_classes}")
        if self.crop_size[0] % patch_size or self.crop_size[1] % patch_size:
            raise ValueError(f"seg.crop_size {list(self.crop_size)} must be multiples of model.patch_size "
                             f"{patch_size}")


TASKS = ("pretrain", "finetune", "supervised", "segment")
PROBE_POOLS = ("mean", "last", "first_last")


@dataclass
class RunConfig:
    """One training run: pretraining, fine-tuning from a pretraining checkpoint, or supervised from scratch."""
    task: str = "pretrain"             # pretrain, finetune (needs init), supervised or segment (init optional)
    model: EncoderConfig = field(default_factory=EncoderConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    init: str = ""                     # fine-tuning: pretraining checkpoint folder or .safetensors; segment: a
                                       # pretraining or classifier checkpoint for the encoder ("" = from scratch)
    num_classes: int = 0               # 0 = number of class folders of the dataset; segment: the mask's classes
    ema_decay: float = 0.0             # model EMA for fine-tuning; 0 = off
    ema_warmup: bool = True            # EMA decay 1 - (1 + step)^(-2/3) early on (timm), so short runs forget
                                       # the initial weights; the raw and the EMA model are both evaluated
    amp: bool = True                   # bf16 autocast on CUDA
    fast_path: bool = True             # CUDA: fused ViL blocks (compiled regions + Triton mLSTM), ViT blocks under
                                       # torch.compile; CPU: plain path
    recompute: bool = False            # fast path: keep only block inputs, recompute blocks in the backward
                                       # (ViL: ~18 % slower training, ~4-5x less activation memory)
    recompute_qkv: bool = False        # fast path: recompute the mLSTM cell's q, k, v in the backward
                                       # (~6 % slower training, ~1/4 less training memory)
    cuda_graph: bool = True            # CUDA: replay each micro-batch's forward + backward from CUDA graphs
    graph_optimizer: bool = False      # with cuda_graph on one process: capture gradient clipping and AdamW in
                                       # the same graph (one replay per step; needs optim.accum_steps=1 and
                                       # nan_policy=stop: a replayed step has updated the weights already)
    grad_sync: str = "auto"            # several processes: "ddp" = DDP's bucketed all-reduce during the
                                       # backward (steps eager), "flat" = one all-reduce of all gradients after
                                       # it (what graphed steps need), "auto" = flat when steps are graphed
    seed: int = 0                      # weights, data order, augmentation and draws
    output_dir: str = "runs/mal"       # the run folder (--output)
    save_every: int = 500              # checkpoint every N optimizer steps (and at the end)
    keep_every: int = 0                # also keep ckpt_<step> every N steps; 0 = only ckpt_last
    log_every: int = 10                # steps between metrics.csv / TensorBoard rows
    eval_every: int = 1                # epochs between evaluations
    nan_policy: str = "stop"           # "stop": abort keeping the last good checkpoint; "skip": skip the step
    max_steps: int = 0                 # stop after this many optimizer steps (0 = all epochs)
    probe: bool = True                 # pretraining: k-NN and linear probe of the frozen encoder at the end
    probe_every: int = 0               # pretraining: also probe the evaluation set (data.holdout's part, else the
                                       # val folder) every N epochs, logged as eval_knn_top1 / eval_linprobe_top1
                                       # in metrics.csv; 0 = only at the end
    probe_pool: str = "mean"           # probe features: mean of the last layer's tokens, the last token, or the
                                       # first and last token concatenated (first_last)
    knn_k: int = 20                    # neighbours of the k-NN probe
    viz_samples: int = 8               # pretraining: images in the prediction PNG (one per class where possible)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")
        if self.graph_optimizer and (self.optim.accum_steps > 1 or self.nan_policy != "stop"):
            raise ValueError(f"graph_optimizer=true captures one whole update per step: it needs "
                             f"optim.accum_steps=1 (got {self.optim.accum_steps}) and nan_policy=stop (got "
                             f"{self.nan_policy!r}); set graph_optimizer=false for those")
        if self.grad_sync not in ("auto", "ddp", "flat"):
            raise ValueError(f"grad_sync must be 'auto', 'ddp' or 'flat', got {self.grad_sync!r}")
        if self.probe_pool not in PROBE_POOLS:
            raise ValueError(f"probe_pool must be one of {list(PROBE_POOLS)}, got {self.probe_pool!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must be in [0, 1)")
        if self.task == "segment":
            self.seg.check(self.num_classes, self.model.patch_size)
        if self.data.label_fraction < 1 and self.task not in ("finetune", "supervised"):
            raise ValueError(f"data.label_fraction={self.data.label_fraction} limits the labels a classifier trains "
                             f"on (task finetune or supervised); a {self.task} run would ignore it: remove it")
        if self.data.pretrain_fraction < 1 and self.task != "pretrain":
            raise ValueError(f"data.pretrain_fraction={self.data.pretrain_fraction} limits the images a pretraining "
                             f"sees; a {self.task} run would ignore it: remove it (data.label_fraction limits a "
                             "classifier's labels)")
        if self.task == "pretrain" and self.objective.kind == "mal":
            from .serialization import check_divides
            check_divides(*self.model.grid, self.model.cluster_size)
        if self.recompute and not self.fast_path:
            raise ValueError("recompute=true needs fast_path=true (it is a mode of the fused block)")
        if self.recompute_qkv and not self.fast_path:
            raise ValueError("recompute_qkv=true needs fast_path=true (it is a mode of the fused block)")
        if self.recompute_qkv and self.model.arch != "vil":
            raise ValueError("recompute_qkv=true recomputes the mLSTM cell's q, k, v of the fused ViL block; "
                             "model.arch=vit has none: use recompute=true (activation checkpointing of each block)")
        if self.save_every < 1 or self.log_every < 1 or self.eval_every < 1 or self.knn_k < 1:
            raise ValueError("save_every, log_every, eval_every and knn_k must be >= 1")
        if self.probe_every < 0:
            raise ValueError(f"probe_every must be >= 0 (epochs between probes; 0 = only at the end), "
                             f"got {self.probe_every}")
        if self.max_steps < 0 or self.keep_every < 0:
            raise ValueError("max_steps and keep_every must be >= 0 (0 = off)")

    def check_world(self, world_size: int) -> None:
        """The global batch must split evenly over processes and accumulation steps."""
        per = self.optim.batch_size // self.optim.accum_steps
        if per % world_size:
            raise ValueError(f"optim.batch_size {self.optim.batch_size} / accum_steps {self.optim.accum_steps} = "
                             f"{per} is not divisible by the {world_size} processes; pick a batch size that is")


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file or shipped config name (optional, `config_path`) + overrides -> validated RunConfig. A `preset:` key
    picks MAL-T/S/B or ViT-T/S/B dims."""
    data = load_yaml(path) if path else {}
    apply_overrides(data, overrides or [])
    preset = data.pop("preset", None)
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {list(MODEL_PRESETS)}")
        data["model"] = {**MODEL_PRESETS[preset], **(data.get("model") or {})}
    return from_dict(RunConfig, data)


__all__ = ["RunConfig", "DataConfig", "OptimConfig", "AugConfig", "SegConfig", "load_run_config", "EncoderConfig", "DecoderConfig",
           "MaskConfig", "ObjectiveConfig", "MODEL_PRESETS", "ARCHS", "OBJECTIVES",
           "FIXED_ORDERS", "MASK_UNITS", "SCAN_ORDERS", "from_dict", "to_dict", "apply_overrides", "load_yaml",
           "config_path", "shipped_configs", "SHIPPED_CONFIGS"]


# ----------------------------------------------------------------------------- generic loading
def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return value coerced to tp (int -> float allowed, tuples from lists) or raise a clear ValueError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{key}: {value!r} matches none of {tp}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_check_type(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return origin(_check_type(v, inner, key) for v in value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):   # YAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ValueError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {names}"
        raise ValueError(f"unknown config key '{prefix}{k}'{hint}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{name}: expected a mapping, got {value!r}")
            kwargs[name] = from_dict(tp, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, tp, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"invalid config{' ' + prefix.rstrip('.') if prefix else ''}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain nested dict (tuples as lists), ready for YAML/JSON."""
    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(obj))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return data


def shipped_configs() -> list[str]:
    """The names of the configs shipped inside the package (`mal/configs/NAME.yaml`), sorted."""
    return sorted(f.name[:-len(".yaml")] for f in SHIPPED_CONFIGS.iterdir() if f.name.endswith(".yaml"))


def config_path(name: str | Path) -> Path | Traversable:
    """The config file `name`: an existing file, else the config of that name shipped with MAL ("cifar10_pretrain",
    "cifar10_pretrain.yaml", or "configs/cifar10_pretrain.yaml", the checkout path of releases before 0.2).

    Shipped configs are package data (`importlib.resources`), so they are found in any installation."""
    path = Path(name)
    if path.is_file():
        return path
    if path.parent in (Path("."), Path("configs")):
        shipped = SHIPPED_CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
        if shipped.is_file():
            return shipped
    close = difflib.get_close_matches(path.stem, shipped_configs(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise FileNotFoundError(f"config file {name} not found; {hint}pass a YAML file or the name of a config shipped "
                            f"with MAL ({', '.join(shipped_configs())}; `mal config list` describes them)")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of config file `path` (a file, or a shipped config's name: `config_path`)."""
    src = config_path(path)
    data = yaml.safe_load(src.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data


# ----------------------------------------------------------------------------- reference
def field_comments(cls: type) -> dict[str, str]:
    """The comment written beside each field of dataclass `cls` (and on the comment-only lines below it)."""
    src = inspect.getsource(cls)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    body = ast.parse(src).body[0].body
    fields = [n for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    lines = src.splitlines()
    out = {}
    for n in fields:
        text, line = [comments[n.lineno]] if n.lineno in comments else [], n.lineno + 1
        while line in comments and lines[line - 1].strip().startswith("#"):
            text.append(comments[line])
            line += 1
        out[n.target.id] = " ".join(text)
    return out


def reference_markdown() -> str:
    """The config reference (docs/config.md): every key of a run config, its type, default and meaning."""
    rows = ["# Config reference", "",
            "Every key of a run config (`mal.config.RunConfig`), generated from the dataclasses by "
            "`mal config reference` (do not edit by hand). Unknown keys, wrong types and impossible combinations are "
            "rejected before any work starts.", ""]

    def section(cls: type, prefix: str) -> None:
        notes, hints = field_comments(cls), typing.get_type_hints(cls)
        rows.extend([f"## `{prefix.rstrip('.') or 'top level'}` ({cls.__name__})", "",
                     (inspect.getdoc(cls) or "").splitlines()[0], "", "| key | type | default | meaning |",
                     "|---|---|---|---|"])
        nested = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                nested.append((tp, f"{prefix}{f.name}."))
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            name = getattr(tp, "__name__", str(tp)).replace("|", "or")
            rows.append(f"| `{prefix}{f.name}` | {name} | `{default!r}` | {notes.get(f.name, '')} |")
        rows.append("")
        for tp, pre in nested:
            section(tp, pre)
    section(RunConfig, "")
    return "\n".join(rows) + "\n"
