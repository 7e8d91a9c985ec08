"""Hugging Face Hub interop: `save_pretrained` / `from_pretrained` / `push_to_hub` (huggingface_hub's
`PyTorchModelHubMixin`: a folder with `config.json` and `model.safetensors`) for the encoders (`VisionLSTM`,
`VisionTransformer`) and the pretraining objectives (`MALPretrain`, `MAEPretrain`). `mal.export` writes such a
folder from a run's checkpoint, with a model card (`mal export`).

    model.save_pretrained("mal-tiny-cifar10")                 # config.json, model.safetensors, README.md
    model = VisionLSTM.from_pretrained("mal-tiny-cifar10")    # a local folder (offline) or a Hub repo id

`config.json` holds the `__init__` arguments (the config dataclasses as JSON objects), which `from_pretrained`
rebuilds the model from before it loads the weights strictly. An encoder's folder is also a timm folder: its
config.json carries timm's keys too (`architecture`, `num_classes`, `num_features`, `global_pool`,
`pretrained_cfg`: the data config, `model_args`: every encoder setting), so after `import mal`,
`timm.create_model("local-dir:DIR", pretrained=True)` (or "hf-hub:USER/REPO") builds and loads it.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, PyTorchModelHubMixin, hf_hub_download

from .config import EncoderConfig, from_dict, to_dict

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

A `{{ class_name }}` saved with MAL (cluster-masked autoregressive pretraining of Vision-LSTM backbones):
`config.json` holds its configuration, `model.safetensors` its weights.

```python
from {{ module }} import {{ class_name }}
model = {{ class_name }}.from_pretrained("{{ repo_id | default("PATH", true) }}")   # a local folder or a Hub repo
```
"""


def _config_types(cls: type) -> dict[str, type]:
    """The `__init__` arguments of `cls` whose type is a config dataclass (or such a dataclass or None)."""
    hints = typing.get_type_hints(cls.__init__)
    out = {}
    for name, tp in hints.items():
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            out[name] = args[0]
    return out


class HubMixin(PyTorchModelHubMixin, library_name="mal", tags=["mal"], model_card_template=MODEL_CARD_TEMPLATE):
    """`PyTorchModelHubMixin` for MAL's models. Every `__init__` argument is kept as an attribute of the same name
    (`cfg`, `num_classes`; `enc_cfg`, `obj_cfg`), which `save_pretrained` writes to config.json as it is now (after
    `reset_classifier`, too). `from_pretrained` rebuilds the config dataclasses, loads the weights strictly (pass
    `strict=False` to allow missing or unexpected ones) and, for an encoder, restores its data config
    (`model.pretrained_cfg`: input size, mean/std, crop; the class names of a classifier exported by `mal export`)."""

    def hub_config(self) -> dict[str, Any]:
        """What `save_pretrained` writes to config.json."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {"mal_class": type(self).__name__, **{name: _jsonable(getattr(self, name)) for name in names}}

    def save_pretrained(self, save_directory: str | Path, *, config: dict | None = None, **kwargs: Any):
        return super().save_pretrained(save_directory, config=self.hub_config() if config is None else config,
                                       **kwargs)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        kwargs.setdefault("class_name", type(self).__name__)
        kwargs.setdefault("module", "mal")
        return super().generate_model_card(*args, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, cache_dir: str | Path | None = None,
                         force_download: bool = False, local_files_only: bool = False, token: str | bool | None = None,
                         map_location: str = "cpu", strict: bool = True, config: dict | None = None,
                         **model_kwargs: Any):
        for legacy in ("proxies", "resume_download"):                   # passed by older huggingface_hub releases
            model_kwargs.pop(legacy, None)
        if config is None:
            raise ValueError(f"{model_id} has no {CONFIG_NAME}: pass a folder written by save_pretrained or "
                             f"`mal export` (or such a Hub repo)")
        if config.get("mal_class", cls.__name__) != cls.__name__:
            raise ValueError(f"{model_id} holds a {config['mal_class']}: load it with "
                             f"mal.{config['mal_class']}.from_pretrained")
        types = _config_types(cls)
        missing = [name for name in types if name not in model_kwargs]
        if missing:
            raise ValueError(f"{model_id}: {CONFIG_NAME} has no {missing}; is it a {cls.__name__} folder?")
        for name, tp in types.items():
            if isinstance(model_kwargs[name], dict):
                model_kwargs[name] = from_dict(tp, model_kwargs[name], prefix=f"{name}.")
        model = cls(**model_kwargs)
        if os.path.isdir(model_id):
            weights = Path(model_id) / WEIGHTS_NAME
        else:
            weights = Path(hf_hub_download(repo_id=model_id, filename=WEIGHTS_NAME, revision=revision,
                                           cache_dir=cache_dir, force_download=force_download, token=token,
                                           local_files_only=local_files_only))
        from .checkpoint import load_weights
        model.load_state_dict(load_weights(weights), strict=strict)
        if isinstance(config.get("pretrained_cfg"), dict) and isinstance(getattr(model, "cfg", None), EncoderConfig):
            model.pretrained_cfg = {k: tuple(v) if isinstance(v, list) else v
                                    for k, v in config["pretrained_cfg"].items()}
        return model.to(map_location).eval()


def _jsonable(value: Any) -> Any:
    """A config value as JSON: dataclasses as objects (tuples as lists)."""
    return to_dict(value) if dataclasses.is_dataclass(value) else value


__all__ = ["HubMixin", "WEIGHTS_NAME", "CONFIG_NAME"]
