"""Render the sweep's results (OUT/results.jsonl from cifar10_sweep.py) as docs/results.md-style tables
next to the paper's ImageNet numbers, plus plots (accuracy vs cluster size, pretraining loss curves).

    python experiments/make_results.py --results runs/sweep/results.jsonl --out docs/results_tables.md
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

# The paper's ImageNet-1K top-1 (MAL-B) for each ablation row (Tables 5, 6, 7, 12, 13).
PAPER = {
    "baseline": {"supervised": 81.7, "MAL default": 84.3},
    "table6": {"k=1": 82.7, "k=2": 83.2, "k=3": 83.5, "k=4": 84.3, "k=6": 83.4},
    "table7": {"random": 81.4, "row_fwd": 83.6, "row_bwd": 83.4, "col_fwd": 83.6, "col_bwd": 83.5,
               "alternating": 84.3},
    "table5": {"pixel 10%": 81.2, "pixel 20%": 81.7, "pixel 50%": 81.1, "patch 10%": 82.3, "patch 20%": 82.6,
               "patch 50%": 82.1, "cluster 10%": 83.3, "cluster 20%": 84.3, "cluster 50%": 83.0},
    "table12": {"depth 4, width 512": 82.9, "depth 8, width 512": 84.3},
    "table13": {"xLSTM decoder": 84.1, "Transformer decoder": 84.3},
}
# The default run stands in for these rows of the ablation tables.
DEFAULT_ALIASES = {"table6": "k=4", "table7": "alternating", "table5": "cluster 20%", "table12": "depth 8, width 512",
                   "table13": "Transformer decoder"}
TITLES = {"baseline": "Supervised vs MAL (rows 1-2)", "table6": "Table 6: cluster size", "table7": "Table 7: scan order",
          "table5": "Table 5: masking unit and ratio", "table12": "Table 12: decoder depth",
          "table13": "Table 13: decoder type"}


def fmt(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} (n={len(vals)})"


def tables(rows: list[dict]) -> str:
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r["table"]][r["setting"]].append(r)
        if r["table"] == "baseline" and r["setting"] == "MAL default":
            for t, alias in DEFAULT_ALIASES.items():
                by[t][alias].append(r)
    out = []
    for t in ("baseline", "table6", "table7", "table5", "table12", "table13"):
        if t not in by:
            continue
        out += [f"### {TITLES[t]}", "", "| setting | fine-tuned top-1 (ours, CIFAR-10) | k-NN | linear probe | "
                "paper top-1 (ImageNet, MAL-B) | runs |", "|---|---|---|---|---|---|"]
        for setting, rs in by[t].items():
            out.append(f"| {setting} | {fmt([r.get('top1') for r in rs])} | {fmt([r.get('knn') for r in rs])} | "
                       f"{fmt([r.get('linprobe') for r in rs])} | {PAPER.get(t, {}).get(setting, '–')} | "
                       f"{', '.join(r['name'] for r in rs)} |")
        out.append("")
    return "\n".join(out)


def plots(rows: list[dict], runs_dir: Path, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    ks = sorted((int(r["setting"][2:]), r["top1"]) for r in rows if r["table"] == "table6" and r.get("top1") is not None)
    ks += [(4, r["top1"]) for r in rows if r["setting"] == "MAL default" and r.get("top1") is not None]
    if ks:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.scatter(*zip(*ks), label="ours (CIFAR-10)")
        ax.set_xlabel("cluster size k")
        ax.set_ylabel("fine-tuned top-1 (%)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        made.append(out_dir / "results_cluster_size.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    curves = [(r["name"], runs_dir / r["name"] / "pretrain/metrics.csv") for r in rows]
    curves = [(n, p) for n, p in curves if p.exists()]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, path in curves:
            pts = [(int(x["step"]), float(x["loss"])) for x in csv.DictReader(open(path)) if x.get("loss")]
            if pts:
                ax.plot(*zip(*pts), label=name, lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("pretraining loss")
        ax.set_yscale("log")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        made.append(out_dir / "results_pretrain_loss.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="runs/sweep/results.jsonl")
    ap.add_argument("--out", default="docs/results_tables.md")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.results) if line.strip()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = tables(rows)
    text += "\n### Commands\n\n" + "\n".join(f"- `{r['name']}`: " + " && ".join(f"`{c}`" for c in r["commands"])
                                            for r in rows) + "\n"
    out.write_text(text)
    for p in plots(rows, Path(args.results).parent, out.parent):
        print(p)
    print(out)


if __name__ == "__main__":
    main()
