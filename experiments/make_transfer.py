"""Render the transfer studies into their marked sections of docs/results.md: segmentation from each
encoder initialization (`mal segment train` runs' summary.json) and ImageNet-C robustness of the classifiers
(`mal eval --corruptions` runs' robustness.json).

    python experiments/make_transfer.py --segmentation docs/results/camvid docs/results/kvasir \
        --robustness docs/results/robustness_imagenette

Each segmentation folder fills the section `segmentation-<folder name>` (e.g. segmentation-camvid).
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml
from make_results import fill_section, fmt, without_seed  # experiments/ is this script's directory

# What each run folder's encoder started from, in the table's order.
INITS = {"scratch": "none (random)", "mal": "MAL pretraining", "mae": "MAE-ViL pretraining",
         "supervised": "supervised classifier"}


def segmentation_table(root: Path) -> list[str]:
    """One row per initialization (run folders `<init>` or `<init>_s<seed>`, seeds pooled as mean ± std): the split
    used for choices (seg.eval_split) and the test split, scored once; then the test IoU of every class."""
    by: dict[str, list] = defaultdict(list)
    for p in sorted(root.glob("*/summary.json")):
        init = yaml.safe_load((p.parent / "config.yaml").read_text()).get("init") or ""
        by[without_seed(p.parent.name)].append((p.parent.name, json.loads(p.read_text()), init))
    by = dict(sorted(by.items(), key=lambda kv: list(INITS).index(kv[0]) if kv[0] in INITS else 99))
    out = ["| encoder initialization | init checkpoint | val mIoU | test mIoU | test mDice | test pixel acc. | "
           "wall min per run | runs |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in by.items():
        col = lambda key: fmt([s[key] for _, s, _ in rs])                  # noqa: E731
        wall = sum(s["train_time_s"] for _, s, _ in rs) / len(rs) / 60
        out.append(f"| {INITS.get(name, name)} | {rs[0][2] or '–'} | {col('eval_miou')} | {col('val_miou')} | "
                   f"{col('val_mdice')} | {col('val_acc')} | {wall:.1f} | {', '.join(f'`{n}`' for n, _, _ in rs)} |")
    first = next(iter(by.values()))[0][1]
    classes = [k.removeprefix("val_iou_") for k in first if k.startswith("val_iou_")]
    dice = all(f"val_dice_{c}" in first for c in classes)

    def cell(rs: list, c: str) -> str:
        iou = statistics.mean(s[f"val_iou_{c}"] for _, s, _ in rs)
        return f"{iou:.1f} / {statistics.mean(s[f'val_dice_{c}'] for _, s, _ in rs):.1f}" if dice else f"{iou:.1f}"
    out += ["", f"Test {'IoU / Dice' if dice else 'IoU'} per class (mean over seeds):", "",
            "| class | " + " | ".join(INITS.get(n, n) for n in by) + " |", "|---|" + "---|" * len(by)]
    out += [f"| {c} | " + " | ".join(cell(rs, c) for rs in by.values()) + " |" for c in classes]
    return out + [""]


def robustness_table(root: Path) -> list[str]:
    """One row per classifier (clean and corrupted top-1, mCE against the baseline), then the top-1 of every
    corruption averaged over its severities."""
    docs = {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/robustness.json"))}
    base = {d["baseline"]["checkpoint"] for d in docs.values() if d.get("baseline")}
    out = [f"Baseline of the CE columns: `{', '.join(sorted(base))}`.", "",
           "| run | clean top-1 | mean corrupted top-1 | drop | mCE | relative mCE |", "|---|---|---|---|---|---|"]
    for name, d in docs.items():
        mce = "–" if d["mce"] is None else f"{d['mce']:.1f}"
        rel = "–" if d["relative_mce"] is None else f"{d['relative_mce']:.1f}"
        out.append(f"| `{name}` | {d['clean']['top1']:.2f} | {d['mean_corruption_top1']:.2f} | "
                   f"{d['clean']['top1'] - d['mean_corruption_top1']:.2f} | {mce} | {rel} |")
    corruptions = list(next(iter(docs.values()))["per_corruption"])
    out += ["", "Top-1 per corruption (mean over severities 1-5):", "",
            "| corruption | " + " | ".join(f"`{n}`" for n in docs) + " |", "|---|" + "---|" * len(docs)]
    out += [f"| {c} | " + " | ".join(f"{d['per_corruption'][c]['top1']:.1f}" for d in docs.values()) + " |"
            for c in corruptions]
    return out + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segmentation", nargs="*", default=[],
                    help="folders of segment runs (one run folder per initialization and seed)")
    ap.add_argument("--robustness", default="", help="folder of robustness runs (one folder per classifier)")
    ap.add_argument("--doc", default="docs/results.md")
    args = ap.parse_args()
    for folder in map(Path, args.segmentation):
        fill_section(Path(args.doc), f"segmentation-{folder.name}", "\n".join(segmentation_table(folder)))
    if args.robustness:
        fill_section(Path(args.doc), "robustness", "\n".join(robustness_table(Path(args.robustness))))
    print(args.doc)


if __name__ == "__main__":
    main()
