"""The model names, made in one place from `mal.config.MODEL_PRESETS`: the factories `mal_tiny` ... `vit_base` and
the entry points registered with timm's registry when `mal` is imported.

    timm.create_model("mal_tiny_patch16_224")              MAL-T/S/B (ViL) at 224 px, the fine-tuning size
    timm.create_model("mal_base_patch16_192")              ... at 192 px, the pretraining size
    timm.create_model("mal_vit_small_patch16_224")         the ViT baseline (`VisionTransformer`: no class token,
                                                           mean pooling), also at 192 px

Keyword arguments are `num_classes`, `in_chans` and the fields of `mal.EncoderConfig` (`drop_path_rate=0.1`,
`cluster_size=2`, `img_size=96`, ...). Each name has a `pretrained_cfg` (input size, ImageNet mean/std, crop 0.875,
bicubic), so `timm.data.resolve_data_config(model=model)` gives the evaluation transform. MAL publishes no weights:
`pretrained=True` loads a MAL checkpoint named by `pretrained_cfg_overlay=dict(file=PATH)` (a run's checkpoint folder,
e.g. `runs/NAME/ckpt_last`, or its `model.safetensors`: a pretraining checkpoint's encoder or a classifier, strictly,
as `mal finetune --init` loads it), and `timm.create_model("local-dir:DIR")` a folder written by `mal export`.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..checkpoint import fill_unseen_positions, load_encoder, read_meta
from ..config import MODEL_PRESETS, EncoderConfig
from .names import TIMM_IMG_SIZES, TIMM_PATCH_SIZE, pretrained_cfg_for, timm_architecture, timm_name
from .vil import VisionLSTM
from .vit import VisionTransformer

ENCODERS: dict[str, type[nn.Module]] = {"vil": VisionLSTM, "vit": VisionTransformer}
LABELS = {"vil": "MAL-{} (Vision-LSTM)", "vit": "ViT-{} (the Transformer baseline)"}
ENCODER_FIELDS = tuple(f.name for f in dataclasses.fields(EncoderConfig))


def create_model(preset: str, num_classes: int = 1000, **overrides: Any) -> nn.Module:
    """The encoder of `MODEL_PRESETS[preset]` with a `num_classes` head (0: none) and the `EncoderConfig` fields in
    `overrides` (unset fields: the preset's, then EncoderConfig's defaults, e.g. img_size 192)."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(MODEL_PRESETS)}")
    unknown = sorted(set(overrides) - set(ENCODER_FIELDS))
    if unknown:
        raise TypeError(f"{preset}: unknown argument(s) {unknown}; an encoder takes num_classes and the fields of "
                        f"mal.EncoderConfig: {list(ENCODER_FIELDS)}")
    cfg = EncoderConfig(**{**MODEL_PRESETS[preset], **overrides})
    return ENCODERS[cfg.arch](cfg, num_classes=num_classes)


def _factory(preset: str) -> Callable[..., nn.Module]:
    """`preset(num_classes=1000, **overrides)`: `create_model` of one preset, named after it."""
    def factory(num_classes: int = 1000, **overrides: Any) -> nn.Module:
        return create_model(preset, num_classes, **overrides)
    p = MODEL_PRESETS[preset]
    factory.__name__ = factory.__qualname__ = preset
    factory.__module__ = __name__
    factory.__doc__ = (f"{_label(preset)}: dim {p['dim']}, {p['depth']} blocks, {p.get('num_heads', 4)} heads; "
                       f"keyword arguments: the fields of mal.EncoderConfig (img_size defaults to 192).")
    return factory


def _label(preset: str) -> str:
    arch, size = MODEL_PRESETS[preset]["arch"], preset.split("_")[-1]
    return LABELS[arch].format(size[0].upper())


mal_tiny = _factory("mal_tiny")
mal_small = _factory("mal_small")
mal_base = _factory("mal_base")
vit_tiny = _factory("vit_tiny")
vit_small = _factory("vit_small")
vit_base = _factory("vit_base")
FACTORIES = {f.__name__: f for f in (mal_tiny, mal_small, mal_base, vit_tiny, vit_small, vit_base)}
assert set(FACTORIES) == set(MODEL_PRESETS), "every preset has a factory"


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module,
                         pretraining: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """timm's `pretrained_filter_fn`: load a MAL checkpoint's weights into `model` as `mal finetune --init` does
    (`mal.checkpoint.load_encoder`: a pretraining checkpoint's encoder or a classifier, strictly; only the decoder
    and mask token may be dropped, only the head may be new; the position embedding resampled to the model's grid;
    with `pretraining`, the model config of a MAL pretraining run, the positions it never fed to the encoder set to
    the mean of the others) and return the model's state dict, which timm then loads as it is."""
    state = dict(state_dict)
    if pretraining is not None:
        fill_unseen_positions(state, pretraining)
    load_encoder(model, state)
    return model.state_dict()


def _checkpoint_source(overlay: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A pretrained_cfg_overlay whose `file` names a MAL checkpoint folder, resolved to its weights file, and the
    model config of the MAL pretraining run that wrote it (None for other checkpoints or plain files)."""
    if not overlay or not overlay.get("file"):
        return overlay, None
    path = Path(overlay["file"])
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        overlay = {**overlay, "file": str(path / "model.safetensors")}
    if not (folder / "meta.json").is_file():
        return overlay, None
    meta = read_meta(folder)
    run = meta.get("config", {})
    mal_pretraining = meta.get("task") == "pretrain" and run.get("objective", {}).get("kind", "mal") == "mal"
    return overlay, run.get("model") if mal_pretraining else None


def _timm_model(preset: str, img_size: int | tuple[int, int] | list[int], num_classes: int = 1000, in_chans: int = 3,
                global_pool: str | None = None, drop_rate: float = 0.0, **overrides: Any) -> nn.Module:
    """The model a timm entry point builds: timm's arguments mapped to `create_model`'s."""
    if not isinstance(img_size, int):
        if len(set(img_size)) != 1:
            raise ValueError(f"{preset}: img_size must be square, got {tuple(img_size)}")
        img_size = int(img_size[0])
    if drop_rate:
        raise ValueError(f"{preset}: drop_rate={drop_rate} (dropout before the head) is not part of MAL's encoders; "
                         f"use drop_path_rate")
    if global_pool is not None:
        overrides["global_pool"] = global_pool
    return create_model(preset, num_classes, img_size=img_size, in_chans=in_chans, **overrides)


def _timm_entrypoint(preset: str, img_size: int) -> Callable[..., nn.Module]:
    """`name(pretrained=False, **kwargs)`, registered with timm under `timm_name(preset, img_size)`."""
    name = timm_name(preset, img_size)

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if kwargs.pop("features_only", False):
            raise ValueError(f"{name}: features_only is not supported; use model.forward_intermediates(...)")
        overlay, pretraining = _checkpoint_source(kwargs.pop("pretrained_cfg_overlay", None))
        if pretrained and not (overlay or {}).get("file") and not (overlay or {}).get("state_dict") and isinstance(
                kwargs.get("pretrained_cfg"), (type(None), str)):
            raise ValueError(f"{name}: MAL publishes no weights; load a checkpoint with pretrained_cfg_overlay=dict("
                             f"file='runs/NAME/ckpt_last'), or a `mal export` folder with "
                             f"timm.create_model('local-dir:DIR', pretrained=True)")
        return build_model_with_cfg(partial(_timm_model, preset, kwargs.pop("img_size", img_size)), name, pretrained,
                                    pretrained_cfg_overlay=overlay,
                                    pretrained_filter_fn=partial(checkpoint_filter_fn, pretraining=pretraining),
                                    **kwargs)
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{_label(preset)} at {img_size} px, patch {TIMM_PATCH_SIZE} (timm entry point)."
    return entrypoint


TIMM_PRESETS = {timm_name(p, s): (p, s) for p in MODEL_PRESETS for s in TIMM_IMG_SIZES}
__all__ = ["ENCODERS", "FACTORIES", "TIMM_PRESETS", "create_model", "timm_name", "timm_architecture",
           "pretrained_cfg_for", "checkpoint_filter_fn", *FACTORIES, *TIMM_PRESETS]
default_cfgs = generate_default_cfgs({                 # read by timm's register_model from this module
    name: dict(pretrained_cfg_for(EncoderConfig(**{**MODEL_PRESETS[p], "img_size": s, "patch_size": TIMM_PATCH_SIZE})),
               description=f"{_label(p)}; weights: a MAL checkpoint, pretrained_cfg_overlay=dict(file=...)")
    for name, (p, s) in TIMM_PRESETS.items()})
for _name, (_preset, _size) in TIMM_PRESETS.items():
    globals()[_name] = register_model(_timm_entrypoint(_preset, _size))
