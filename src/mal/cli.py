"""`mal` command line: pretrain, finetune, supervised, eval, segment, demo, export, config.

    mal pretrain   --config cifar10_pretrain [key=value ...]     (a shipped config's name, or a YAML file)
    mal finetune   --config cifar10_finetune --init runs/cifar_pre/ckpt_last
    mal eval       --checkpoint runs/cifar_ft/ckpt_last --data DATA/cifar10 [--knn --linprobe]
    mal segment    train --config camvid_segment [--init runs/pre/ckpt_last] [key=value ...]
    mal segment    eval --checkpoint runs/camvid_segment/ckpt_last [--split test] [--inference slide]
    mal segment    predict --checkpoint runs/camvid_segment/ckpt_last --input IMAGE_OR_FOLDER --out DIR
    mal demo       # offline first run on the embedded digits: pretrain, fine-tune, evaluate, PNG
    mal config     list | show FILE [key=value ...] | check FILE | reference
    mal export     runs/cifar_ft --to mal-tiny-cifar10 [--ema]   # a from_pretrained / timm "local-dir:" folder
Multi-GPU: `torchrun --nproc_per_node 8 -m mal pretrain --config ...` (global batch stays optim.batch_size).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from . import __version__
from .config import (RunConfig, apply_overrides, config_path, from_dict, load_run_config, reference_markdown,
                     shipped_configs, to_dict)
from .data import BadImageError
from .errors import Interrupted, MALError

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, BadImageError, MALError)


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand's parser that takes options and key=value overrides in any order."""
    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside or self._subparsers is not None:                   # `mal segment <action>`: plain parsing
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file, or the name of a config shipped with MAL (`mal config list`), e.g. "
                                    "cifar10_pretrain; omitted keys take the defaults of mal.config")
    p.add_argument("--output", help="run folder (default: output_dir of the config)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run folder from ckpt_last")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder and start over")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue although the config changes the recipe (lr, epochs, ...)")
    p.add_argument("--strict-data", action="store_true", help="fail on the first unreadable image instead of skipping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.epochs=10 model.dim=96")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mal", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_IntermixedParser)
    _add_run_args(sub.add_parser("pretrain", help="cluster-masked autoregressive pretraining"))
    p = sub.add_parser("finetune", help="fine-tune a pretrained encoder for classification")
    _add_run_args(p)
    p.add_argument("--init", help="pretraining checkpoint folder (runs/NAME/ckpt_last) or .safetensors")
    _add_run_args(sub.add_parser("supervised", help="train a classifier from scratch (the baseline)"))
    p = sub.add_parser("eval", help="top-1/top-5 of a classifier checkpoint; k-NN / linear probe of its encoder")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (runs/NAME/ckpt_last or ckpt_ema)")
    p.add_argument("--data", help="dataset: 'default' or an ImageFolder root (default: the run's dataset)")
    p.add_argument("--split", help="split folder to evaluate (default: the run's data.val_split)")
    p.add_argument("--knn", action="store_true", help="k-NN accuracy of frozen features (train split as memory)")
    p.add_argument("--linprobe", action="store_true", help="linear-probe accuracy of frozen features")
    p.add_argument("--pool", choices=["mean", "last", "first_last"],
                   help="probe features (default: the run's probe_pool, mean of the last layer's tokens)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", help="also write the metrics to this JSON file")
    r = p.add_argument_group("robustness (ImageNet-C corruptions; needs pip install 'mal[robustness]', "
                             "docs/robustness.md)")
    r.add_argument("--corruptions", help="'all', a group (noise, blur, weather, digital) or a comma list, "
                                         "e.g. gaussian_noise,fog")
    r.add_argument("--severities", help="severities 1..5 as a range or a list (default 1-5), e.g. 1-5 or 1,3,5")
    r.add_argument("--baseline", help="the baseline model's run folder or robustness.json: adds mCE and relative mCE")
    r.add_argument("--cache-dir", help="cache of the corrupted images (default ~/.cache/mal/corruptions)")
    r.add_argument("--workers", type=int, help="processes that make the corrupted images (default: the CPU cores)")
    r.add_argument("--out", help="folder for robustness.json/.csv/.png (default: RUN/robustness beside the checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.num_workers=2")
    _add_segment_parser(sub.add_parser("segment", help="semantic segmentation with a pretrained encoder: train, "
                                                       "eval, predict (docs/segmentation.md)"))
    p = sub.add_parser("demo", help="offline first run on the embedded digits (a few minutes on a CPU)")
    p.add_argument("--output", default="runs/demo", help="folder for the three runs (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every run")
    p = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face / timm folder (config.json, "
                                      "model.safetensors, README.md model card)")
    p.add_argument("run", help="run folder (runs/NAME) or checkpoint folder (runs/NAME/ckpt_last)")
    p.add_argument("--to", required=True, help="the folder to write (from_pretrained(DIR), timm 'local-dir:DIR')")
    p.add_argument("--ema", action="store_true", help="the run's EMA weights (ckpt_ema/) instead of the raw ones")
    p.add_argument("--objective", action="store_true",
                   help="pretraining runs: the whole pretraining model (MALPretrain / MAEPretrain), not the encoder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p = sub.add_parser("config", help="list the shipped configs, show or check a config, or print the reference of "
                                      "every key")
    p.add_argument("action", choices=["list", "show", "check", "reference"])
    p.add_argument("file", nargs="?", help="YAML file or shipped config name (show/check)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return ap


def _add_segment_parser(seg: argparse.ArgumentParser) -> None:
    acts = seg.add_subparsers(dest="action", required=True, parser_class=_IntermixedParser)
    p = acts.add_parser("train", help="train a Segmenter (encoder + UperNet) on image/mask pairs")
    _add_run_args(p)
    p.add_argument("--init", help="encoder checkpoint: a MAL / MAE pretraining or a classifier run's ckpt_last "
                                  "(default: the config's init; none = from scratch)")
    for name, text in (("eval", "mIoU / mDice / per-class IoU of a segment checkpoint on a split"),
                       ("predict", "predicted masks (PNG) and overlays of images")):
        p = acts.add_parser(name, help=text)
        p.add_argument("--checkpoint", required=True, help="segment checkpoint folder (runs/NAME/ckpt_last, ckpt_ema)")
        p.add_argument("--inference", choices=["whole", "slide"], help="default: the run's seg.inference")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. seg.stride=[96,96]")
    p = acts.choices["eval"]
    p.add_argument("--data", help="dataset root (default: the run's data.dataset)")
    p.add_argument("--split", help="split to evaluate (default: the run's data.val_split)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--png", help="also write the image / ground truth / prediction figure to this PNG")
    p = acts.choices["predict"]
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--out", required=True, help="folder for <stem>.png masks (class indices) and overlays.png")


def _resolve(args, task: str) -> RunConfig:
    overrides = [f"task={task}", *args.overrides]
    if getattr(args, "init", None):
        overrides.append(f"init={args.init}")
    if args.strict_data:
        overrides.append("data.strict=true")
    if args.output:
        overrides.append(f"output_dir={args.output}")
    return load_run_config(args.config, overrides)


def _run(cfg: RunConfig, resume: bool, overwrite: bool, progress: bool, allow_changes: bool = False) -> dict:
    from .distributed import cleanup, init_distributed
    from .engine import train
    info = init_distributed()
    try:
        if info.is_main:
            print("resolved config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
        return train(cfg, Path(cfg.output_dir), info, resume=resume, overwrite=overwrite, progress=progress,
                     allow_changes=allow_changes)
    finally:
        cleanup()


def _eval_config(meta: dict, overrides: list[str]) -> RunConfig:
    """The checkpoint's run config as an evaluation config (no init: the checkpoint's own weights are loaded)."""
    data = meta["config"]
    data["init"] = ""
    apply_overrides(data, overrides)
    return from_dict(RunConfig, data)


def _eval_model(cfg: RunConfig, meta: dict, ckpt: Path):
    """The model `mal eval` scores: a classifier checkpoint's classifier, or a pretraining checkpoint's encoder as
    it was pretrained (its objective's `probe_encoder`). Both load strictly."""
    from .checkpoint import load_encoder, load_weights
    from .engine.build import build_model
    if meta["task"] != "pretrain":
        model = build_model(cfg, meta["num_classes"], load_init=False)
        load_encoder(model, load_weights(ckpt))
        return model
    objective = build_model(cfg, 0)
    try:
        objective.load_state_dict(load_weights(ckpt))
    except RuntimeError as e:                                               # missing / unexpected / shapes
        raise ValueError(f"{ckpt} does not match its own config's objective: {str(e)[:600]}") from None
    return objective.probe_encoder()


def cmd_eval(args) -> dict:
    from . import data as mdata
    from .checkpoint import read_meta
    from .distributed import device_for, init_distributed
    from .engine.build import eval_loader
    from .engine.evaluate import evaluate_classifier
    from .engine.probe import probe_encoder

    ckpt = Path(args.checkpoint)
    meta = read_meta(ckpt)
    if meta.get("task") == "segment":
        raise ValueError(f"{ckpt} is a segmentation checkpoint: evaluate it with `mal segment eval --checkpoint {ckpt}`")
    cfg = _eval_config(meta, args.overrides)
    robust = _robustness_options(args, ckpt, meta, cfg)
    info = init_distributed()
    device = device_for(info)
    dataset = args.data or cfg.data.dataset
    split = args.split or cfg.data.val_split or "test"
    tf = mdata.eval_transform(cfg.model.img_size, cfg.data.mean, cfg.data.std, crop_pct=cfg.data.eval_crop_pct)
    test_set = mdata.build_dataset(dataset, split, tf, strict=cfg.data.strict)
    classes = meta.get("classes") or list(getattr(test_set, "classes", []))
    is_classifier = meta["task"] != "pretrain"
    model = _eval_model(cfg, meta, ckpt).to(device)
    loader = lambda ds: eval_loader(ds, cfg, info, False, args.batch_size)
    out: dict = {"checkpoint": str(ckpt), "dataset": str(dataset), "split": split}
    if is_classifier:
        if list(getattr(test_set, "classes", classes)) != classes:
            raise ValueError(f"the classes of {dataset}/{split} differ from the checkpoint's {classes[:5]}...; "
                             f"evaluate on a dataset with the same class folders")
        if robust is None:
            out.update(evaluate_classifier(model, loader(test_set), device, cfg.amp, progress=info.is_main))
        else:                                       # the clean numbers come with the corrupted ones
            out.update(_robustness(model, cfg, dataset, split, ckpt, device, info, robust, loader))
    elif not (args.knn or args.linprobe):
        raise ValueError(f"{ckpt} is a pretraining checkpoint: it has no classifier head; use --knn and/or "
                         f"--linprobe, or fine-tune it first with `mal finetune --init {ckpt}`")
    if args.knn or args.linprobe:
        train_set = mdata.build_dataset(dataset, cfg.data.train_split, tf, strict=cfg.data.strict)
        out.update(probe_encoder(model, loader, train_set, test_set, device, cfg.amp, knn=args.knn,
                                 linear=args.linprobe, knn_k=cfg.knn_k, pool=args.pool or cfg.probe_pool,
                                 seed=cfg.seed, progress=info.is_main))
    if info.is_main:
        print(json.dumps(out, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def _robustness_options(args, ckpt: Path, meta: dict, cfg: RunConfig):
    """The checked --corruptions options (None without --corruptions): their mistakes fail before any work."""
    extra = [f"--{k.replace('_', '-')}" for k in ("severities", "baseline", "cache_dir", "workers", "out")
             if getattr(args, k) is not None]
    if not args.corruptions:
        if extra:
            raise ValueError(f"{', '.join(extra)} only apply with --corruptions (e.g. --corruptions all)")
        return None
    if meta["task"] == "pretrain":
        raise ValueError(f"{ckpt} is a pretraining checkpoint: --corruptions needs a classifier; fine-tune it first "
                         f"with `mal finetune --init {ckpt}`")
    from .robustness.evaluate import options_from_args
    return options_from_args(args, ckpt, cfg.model.img_size)


def _robustness(model, cfg, dataset, split, ckpt, device, info, opts, loader) -> dict:
    """Clean and corrupted top-1 (files in opts.out_dir); the compact numbers for the printed summary."""
    from .robustness.evaluate import run_robustness
    if info.enabled:
        raise ValueError("mal eval --corruptions runs in one process: start it with `mal eval`, not torchrun")
    doc = run_robustness(model, cfg, dataset, split, ckpt, device, opts, loader)
    return {**{k: doc["clean"][k] for k in ("top1", "top5", "loss")},
            **{k: doc[k] for k in ("mean_corruption_top1", "mce", "relative_mce")},
            "robustness": doc["files"]}


def _segment_checkpoint(args):
    """(config, meta, Segmenter with the checkpoint's weights, evaluator) of `mal segment eval/predict`."""
    from .checkpoint import load_weights, read_meta
    from .engine.build import build_evaluator, build_model
    ckpt = Path(args.checkpoint)
    meta = read_meta(ckpt)
    if meta.get("task") != "segment":
        raise ValueError(f"{ckpt} is a {meta.get('task')} checkpoint, not a segmentation run; train one with "
                         f"`mal segment train --init {ckpt}`" + ("" if meta.get("task") == "pretrain" else
                                                                  ", or use `mal eval` for a classifier"))
    cfg = _eval_config(meta, [*args.overrides, *([f"seg.inference={args.inference}"] if args.inference else [])])
    model = build_model(cfg, meta["num_classes"], load_init=False)
    try:
        model.load_state_dict(load_weights(ckpt))
    except RuntimeError as e:                                               # missing / unexpected / shapes
        raise ValueError(f"{ckpt} does not match its own config's Segmenter: {str(e)[:600]}") from None
    return cfg, meta, model, build_evaluator(cfg, meta["classes"])


def cmd_segment_eval(args) -> dict:
    from . import data as mdata
    from .distributed import device_for, init_distributed
    from .engine.build import eval_loader
    from .engine.evaluate import save_segmentation_predictions
    cfg, meta, model, evaluator = _segment_checkpoint(args)
    info = init_distributed()
    device = device_for(info)
    s, root = cfg.seg, args.data or cfg.data.dataset
    split = args.split or cfg.data.val_split or "test"
    pairs = mdata.split_pairs(Path(root), split, s.image_dir, s.mask_dir, s.split_sizes, s.split_seed)
    test_set = mdata.SegmentationFolder(pairs, meta["num_classes"], s.ignore_index,
                                        mdata.seg_eval_transform(cfg.data.mean, cfg.data.std, s.ignore_index),
                                        meta["classes"], cfg.data.strict, root=root)
    model = model.to(device)
    loader = eval_loader(test_set, cfg, info, True, args.batch_size, evaluator.collate)
    out: dict = {"checkpoint": args.checkpoint, "dataset": str(root), "split": split, "images": len(test_set),
                 "inference": s.inference, **evaluator(model, loader, device, cfg.amp, progress=info.is_main)}
    if info.is_main:
        if args.png:
            out["prediction_png"] = str(save_segmentation_predictions(
                model, test_set, evaluator, Path(args.png), device, cfg.data.mean, cfg.data.std, cfg.viz_samples,
                cfg.amp))
        print(json.dumps(out, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def cmd_segment_predict(args) -> dict:
    """Masks (PNG of class indices, `<stem>.png`) and overlays.png for an image or a folder of images."""
    import torch
    from PIL import Image
    from . import data as mdata
    from .distributed import device_for, init_distributed
    from .engine.evaluate import autocast_for
    from .viz import save_segmentation_grid
    cfg, meta, model, evaluator = _segment_checkpoint(args)
    src, out_dir = Path(args.input), Path(args.out)
    files = [src] if src.is_file() else sorted(f for f in src.iterdir() if f.suffix.lower() in mdata.IMG_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"--input {src}: no image files ({', '.join(mdata.IMG_EXTENSIONS)})")
    device = device_for(init_distributed())
    model = model.to(device).eval()
    tf = mdata.seg_eval_transform(cfg.data.mean, cfg.data.std, cfg.seg.ignore_index)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown: list = []
    for f in files:
        img = tf(mdata.load_rgb_image(f), Image.new("L", (1, 1)))[0]      # (3, H, W); the mask is not used
        with torch.no_grad(), autocast_for(device, cfg.amp):
            pred = model.predict(img[None].to(device), evaluator.mode, evaluator.crop, evaluator.stride).argmax(1)
        Image.fromarray(pred[0].to(torch.uint8).cpu().numpy()).save(out_dir / f"{f.stem}.png")
        if len(shown) < cfg.viz_samples and (not shown or shown[0][0].shape == img.shape):
            shown.append((img, pred[0].cpu()))
    png = save_segmentation_grid(out_dir / "overlays.png", torch.stack([i for i, _ in shown]), None,
                                 torch.stack([p for _, p in shown]), cfg.data.mean, cfg.data.std, meta["classes"])
    print(f"wrote {len(files)} masks (class indices) to {out_dir}; overlays: {png}")
    return {"masks": len(files), "out": str(out_dir), "overlays": str(png)}


def cmd_segment(args) -> dict | None:
    if args.action == "train":
        return _run(_resolve(args, "segment"), args.resume, args.overwrite, not args.no_progress, args.allow_changes)
    return cmd_segment_eval(args) if args.action == "eval" else cmd_segment_predict(args)


def cmd_demo(args) -> dict:
    """Pretrain a tiny MAL on the embedded digits, fine-tune it, train the same classifier from scratch with the
    same recipe (without layer decay, as every supervised config) and labelled epochs (the baseline the
    fine-tuning must beat), evaluate, write the prediction PNG."""
    out = Path(args.output)
    dirs = {name: out / name for name in ("pretrain", "finetune", "scratch")}
    pre = load_run_config("demo_pretrain", [f"output_dir={dirs['pretrain']}", *args.overrides])
    s1 = _run(pre, False, args.overwrite, True)
    ft = load_run_config("demo_finetune", [f"output_dir={dirs['finetune']}",
                                           f"init={dirs['pretrain'] / 'ckpt_last'}", *args.overrides])
    s2 = _run(ft, False, args.overwrite, True)
    sup = load_run_config("demo_finetune", [f"output_dir={dirs['scratch']}", "task=supervised", "init=",
                                            "optim.layer_decay=1.0", *args.overrides])
    s3 = _run(sup, False, args.overwrite, True)
    gain = s2["val_top1"] - s3["val_top1"]
    print("\n=== MAL demo (embedded MNIST digits, 4,000 train / 1,000 test) ===")
    print(f"pretraining: final loss {s1['final_loss']:.4f}; frozen encoder ({s1.get('probe_pool')} pooling) "
          f"k-NN {s1.get('knn_top1', float('nan')):.1f} %, linear probe {s1.get('linprobe_top1', float('nan')):.1f} %")
    print(f"fine-tuned from the pretrained encoder: test top-1 {s2['val_top1']:.1f} %")
    print(f"trained from scratch, same recipe and labelled epochs: test top-1 {s3['val_top1']:.1f} %  "
          f"(pretraining {'+' if gain >= 0 else '-'}{abs(gain):.1f} points; chance 10 %)")
    print(f"next-cluster predictions: {s1.get('prediction_png')}")
    print(f"runs: {'  '.join(str(d) for d in dirs.values())}")
    return {"pretrain": s1, "finetune": s2, "scratch": s3}


def cmd_export(args) -> Path:
    """`mal export RUN --to DIR`: the run's model as a save_pretrained folder with a model card."""
    from .export import export_run
    out = export_run(args.run, args.to, ema=args.ema, objective=args.objective, overwrite=args.overwrite)
    print(f"wrote {out}/: config.json, model.safetensors and README.md, the model card (how to load it: "
          f"from_pretrained, timm 'local-dir:{out}'; the data, metrics and recipe)")
    return out


def cmd_config(args) -> None:
    if args.action == "reference":
        print(reference_markdown(), end="")
        return
    if args.action == "list":
        for name in shipped_configs():
            print(f"{name:28s} {_summary_line(name)}")
        return
    if not args.file:
        raise ValueError(f"mal config {args.action} needs a config file or name, e.g. cifar10_pretrain "
                         f"(`mal config list` names the shipped ones)")
    cfg = load_run_config(args.file, args.overrides)
    if args.action == "show":
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    else:
        print(f"{args.file}: ok ({cfg.task})")


def _summary_line(name: str) -> str:
    """The first comment line of a shipped config (what it is)."""
    for line in config_path(name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        if args.command == "eval":
            cmd_eval(args)
        elif args.command == "demo":
            cmd_demo(args)
        elif args.command == "config":
            cmd_config(args)
        elif args.command == "export":
            cmd_export(args)
        elif args.command == "segment":
            cmd_segment(args)
        else:
            _run(_resolve(args, args.command), args.resume, args.overwrite, not args.no_progress, args.allow_changes)
    except Interrupted as e:
        print(f"mal {args.command}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"mal {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"mal {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
