"""The timm names and data configs of MAL's encoders, from their configs alone (no model classes): the entry-point
names (`mal_tiny_patch16_224`, ...), the architecture a config is built by, its `pretrained_cfg` (the data config
timm resolves transforms from), and the timm keys of a saved folder's config.json."""
from __future__ import annotations

import json
from typing import Any

from ..config import MODEL_PRESETS, DataConfig, EncoderConfig, to_dict

TIMM_PREFIX = {"vil": "mal", "vit": "mal_vit"}      # timm names: {prefix}_{size}_patch16_{img}
TIMM_PATCH_SIZE = 16
TIMM_IMG_SIZES = (224, 192)                         # fine-tuning, pretraining (paper Table 11)
# timm's pretrained_cfg keys that locate weights: a saved folder's config describes its own weights, not the source
SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture", "tag")


def timm_name(preset: str, img_size: int) -> str:
    """The timm name of a preset at an image size, e.g. ("mal_tiny", 224) -> "mal_tiny_patch16_224"."""
    return f"{TIMM_PREFIX[MODEL_PRESETS[preset]['arch']]}_{preset.split('_')[-1]}_patch{TIMM_PATCH_SIZE}_{img_size}"


def timm_architecture(cfg: EncoderConfig) -> str:
    """The timm entry point that builds `cfg` from its fields: the name of its preset and size where they match,
    else a name of its architecture (the fields, which a saved folder's `model_args` carry, set the rest)."""
    for preset, p in MODEL_PRESETS.items():
        if p["arch"] == cfg.arch and all(getattr(cfg, k) == v for k, v in p.items()):
            if cfg.patch_size == TIMM_PATCH_SIZE and cfg.img_size in TIMM_IMG_SIZES:
                return timm_name(preset, cfg.img_size)
            return timm_name(preset, TIMM_IMG_SIZES[0])
    return timm_name(next(p for p, v in MODEL_PRESETS.items() if v["arch"] == cfg.arch), TIMM_IMG_SIZES[0])


def pretrained_cfg_for(cfg: EncoderConfig, num_classes: int = 1000, data: DataConfig | None = None) -> dict[str, Any]:
    """timm's pretrained_cfg of an encoder: the data config of `data` (default: ImageNet mean/std, crop 0.875, the
    bicubic resize of `mal.data.eval_transform`) at the encoder's image size, and its head."""
    data = data or DataConfig()
    return dict(architecture=timm_architecture(cfg), input_size=(cfg.in_chans, cfg.img_size, cfg.img_size),
                fixed_input_size=False, interpolation="bicubic", crop_pct=data.eval_crop_pct, crop_mode="center",
                mean=tuple(data.mean), std=tuple(data.std), num_classes=num_classes, pool_size=None,
                first_conv="patch_embed", classifier="head")


def timm_config(model: Any) -> dict[str, Any]:
    """timm's keys of an encoder's config.json (what `timm.create_model("local-dir:DIR")` reads)."""
    cfg: EncoderConfig = model.cfg
    data = {k: v for k, v in model.pretrained_cfg.items() if k not in SOURCE_KEYS}
    data["num_classes"] = model.num_classes
    return {"architecture": timm_architecture(cfg), "num_classes": model.num_classes,
            "num_features": model.num_features, "global_pool": model.global_pool,
            "pretrained_cfg": json.loads(json.dumps(data)),
            "model_args": {k: v for k, v in to_dict(cfg).items() if k != "arch"}}


__all__ = ["TIMM_PREFIX", "TIMM_PATCH_SIZE", "TIMM_IMG_SIZES", "SOURCE_KEYS", "timm_name", "timm_architecture",
           "pretrained_cfg_for", "timm_config"]
