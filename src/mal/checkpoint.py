"""Checkpoints: safetensors weights + the training state, written atomically; strict encoder transfer.

A run directory holds `ckpt_last/` (and `ckpt_<step>/`, `ckpt_ema/`) with `model.safetensors` (weights),
`state.pt` (optimizer, EMA, every RNG, step, loss) and `meta.json` (format version, task, full config).
A file that cannot be read gives one error naming the file and what to do.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from .serialization import grid_size, unseen_input_patches

log = logging.getLogger("mal")

FORMAT_VERSION = 1
PRETRAIN_ONLY_PREFIXES = ("decoder.", "mask_token")
HEAD_PREFIX = "head."


def encoder_weights_from_pretrain(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split a pretraining state dict into the encoder's weights (classifier names) and the dropped keys."""
    enc, dropped = {}, []
    for key, value in state.items():
        if key.startswith("encoder."):
            enc[key[len("encoder."):]] = value
        elif key.startswith(PRETRAIN_ONLY_PREFIXES):
            dropped.append(key)
        else:
            raise ValueError(f"unexpected key {key!r} in a pretraining checkpoint; is this a MAL pretraining "
                             f"checkpoint? (expected encoder.*, decoder.* and mask_token)")
    return enc, dropped


def load_encoder(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Load encoder weights into an encoder (`VisionLSTM` or `VisionTransformer`, with or without head), strictly.

    Accepts a pretraining state dict (MAL's or MAE's: encoder.* + decoder.* + mask_token) or a classifier's. The
    position embedding is resampled (bicubic) to the model's grid. Only the decoder and mask token may be dropped and
    only the head may be missing; anything else missing, unexpected or of another shape raises ValueError.
    """
    dropped: list[str] = []
    if any(k.startswith("encoder.") for k in state):
        state, dropped = encoder_weights_from_pretrain(state)
    state = dict(state)
    own = model.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        n_old = state["pos_embed"].shape[1]
        side_old = int(round(n_old ** 0.5))
        if side_old * side_old != n_old:
            raise ValueError(f"cannot resample a non-square position embedding of {n_old} tokens")
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"].float(), model.cfg.grid, (side_old, side_old),
                                                    num_prefix_tokens=0).to(own["pos_embed"].dtype)
    head_new = [k for k in own if k.startswith(HEAD_PREFIX)]
    if any(k.startswith(HEAD_PREFIX) for k in state):
        if any(state[k].shape != own[k].shape for k in head_new if k in state):
            dropped += [k for k in state if k.startswith(HEAD_PREFIX)]       # other number of classes: new head
            state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
        else:
            head_new = []
    missing = [k for k in own if k not in state and k not in head_new]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError("checkpoint does not match the model (check model.dim/depth/patch_size/in_chans "
                         f"against the checkpoint's meta.json): missing {missing[:8]}, unexpected {unexpected[:8]}, "
                         f"shape mismatch {mismatched[:8]}")
    model.load_state_dict(state, strict=not head_new)
    return {"dropped": dropped, "new": head_new}


# ----------------------------------------------------------------------------- checkpoint folders
def save_checkpoint(directory: Path, model_state: dict[str, torch.Tensor], train_state: dict[str, Any],
                    meta: dict[str, Any]) -> Path:
    """Write a checkpoint directory atomically (built aside, then renamed over the old one)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        torch.save(train_state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2))
        _user_permissions(tmp)
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _user_permissions(folder: Path) -> None:
    """The folder and its files as the user's umask makes new ones (mkdtemp creates 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _unreadable(path: Path, exc: BaseException) -> ValueError:
    return ValueError(f"cannot read {path} ({type(exc).__name__}: {str(exc)[:200]}); the file is damaged or "
                      f"incomplete (an interrupted copy or write?): copy it again, or use another checkpoint of the "
                      f"run (ckpt_<step>/, or .ckpt_last.old/ after an interrupted save)")


def read_meta(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a MAL checkpoint (no meta.json); pass a checkpoint folder "
                                f"such as runs/NAME/ckpt_last")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise _unreadable(meta_path, e) from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {directory} has format version {meta.get('format_version')}, this MAL reads "
                         f"version {FORMAT_VERSION}; re-export it with a matching MAL release")
    return meta


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint folder (or a bare .safetensors file)."""
    path = Path(directory)
    f = path if path.suffix == ".safetensors" else path / "model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"no weights at {f}; pass a checkpoint folder (runs/NAME/ckpt_last) or a .safetensors file")
    try:
        return load_file(str(f))
    except Exception as e:                                   # safetensors raises its own SafetensorError
        raise _unreadable(f, e) from None


def load_train_state(directory: Path) -> dict[str, Any]:
    """The training state (state.pt) of a checkpoint folder."""
    f = Path(directory) / "state.pt"
    if not f.is_file():
        raise FileNotFoundError(f"no training state at {f}; --resume needs a full checkpoint folder (ckpt_last)")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:                                   # EOFError, UnpicklingError, RuntimeError (zip)
        raise _unreadable(f, e) from None


def fill_unseen_positions(state: dict, pre_model: dict) -> None:
    """Pretraining in a fixed scan order never feeds its last cluster to the encoder, so those position embeddings
    keep their random init. Set them to the mean of the trained ones before fine-tuning (docs/method.md)."""
    key = "encoder.pos_embed"
    if key not in state or "scan_order" not in pre_model:
        return
    h, w = grid_size(pre_model["img_size"], pre_model["patch_size"])
    unseen = unseen_input_patches(pre_model["scan_order"], h, w, pre_model["cluster_size"])
    if not unseen or state[key].shape[1] != h * w:
        return
    pos = state[key].clone()                                                # (1, hw, D)
    seen = torch.ones(h * w, dtype=torch.bool)
    seen[unseen] = False
    pos[:, unseen] = pos[:, seen].mean(1, keepdim=True)
    state[key] = pos
    log.info("position embeddings of the %d patches that %s pretraining never fed to the encoder set to the mean "
             "of the others", len(unseen), pre_model["scan_order"])
