"""What `mal eval --corruptions` writes (robustness.json, .csv, .png) and how it reads a baseline's JSON back."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .metrics import Results

JSON_NAME, CSV_NAME, PNG_NAME = "robustness.json", "robustness.csv", "robustness.png"
CSV_FIELDS = ("corruption", "severity", "top1", "top5", "error", "loss", "ce", "relative_ce")


def out_dir_for(checkpoint: Path) -> Path:
    """RUN/robustness for RUN/ckpt_last; RUN/robustness-<name> for another checkpoint folder (ckpt_ema, ...)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent / ("robustness" if checkpoint.name == "ckpt_last" else f"robustness-{checkpoint.name}")


def find_baseline(path: str | Path) -> Path:
    """The robustness.json of a baseline given as that file, its folder, a run folder or a checkpoint folder."""
    p = Path(path).expanduser()
    tried = [p] if p.suffix == ".json" else [p / JSON_NAME, p / "robustness" / JSON_NAME]
    if (p / "meta.json").is_file():                                 # a checkpoint folder
        tried.append(out_dir_for(p) / JSON_NAME)
    for f in tried:
        if f.is_file():
            return f
    raise FileNotFoundError(f"no robustness results for the baseline {path} (looked for "
                            f"{', '.join(str(f) for f in tried)}); evaluate the baseline first: "
                            f"mal eval --checkpoint BASELINE_RUN/ckpt_last --corruptions ... --severities ...")


def load_baseline(path: str | Path, corruptions: list[str], severities: list[int]) -> tuple[dict, Results, float]:
    """(the baseline's JSON, its top-1 table for our corruptions x severities, its clean top-1); a clear error
    when it lacks any of them."""
    f = find_baseline(path)
    try:
        doc = json.loads(f.read_text())
        table, clean = doc["results"], float(doc["clean"]["top1"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{f} is not a robustness.json written by `mal eval --corruptions` "
                         f"({type(e).__name__}: {e}); evaluate the baseline again") from None
    missing = [f"{c} {s}" for c in corruptions for s in severities if str(s) not in table.get(c, {})]
    if missing:
        raise ValueError(f"the baseline {f} has no results for {len(missing)} of the corruption/severity pairs "
                         f"asked for ({', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}; it has "
                         f"{', '.join(doc.get('corruptions', []))} at severities {doc.get('severities')}); evaluate "
                         f"both models with the same --corruptions and --severities")
    base = {c: {s: table[c][str(s)] for s in severities} for c in corruptions}
    return {**doc, "path": str(f)}, base, clean


def write_json(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def write_csv(path: Path, doc: dict) -> Path:
    """One row per (corruption, severity), one 'all' row per corruption (means, CE), and the clean row."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerow({"corruption": "clean", "severity": 0, **doc["clean"]})
        for c in doc["corruptions"]:
            for s, row in doc["results"][c].items():
                w.writerow({"corruption": c, "severity": s, **row})
            w.writerow({"corruption": c, "severity": "all", **doc["per_corruption"][c]})
    return path


def plot_heatmap(path: Path, doc: dict) -> Path:
    """Heat map of top-1 (%), corruptions down, severities across, each cell annotated (matplotlib, headless)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names, sev = doc["corruptions"], doc["severities"]
    top1 = np.array([[doc["results"][c][str(s)]["top1"] for s in sev] for c in names])     # (C, S)
    fig, ax = plt.subplots(figsize=(2.6 + 0.75 * len(sev), 1.4 + 0.38 * len(names)))
    im = ax.imshow(top1, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (i, j), v in np.ndenumerate(top1):
        ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
    ax.set_xticks(range(len(sev)), [str(s) for s in sev])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("severity")
    title = f"top-1 % (clean {doc['clean']['top1']:.1f}, mean corrupted {doc['mean_corruption_top1']:.1f})"
    if doc.get("mce") is not None:
        title += f"\nmCE {doc['mce']:.1f} %, relative mCE {_fmt(doc.get('relative_mce'))}"
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} %"


def write_all(out_dir: Path, doc: dict) -> dict[str, str]:
    """robustness.json, .csv and .png in `out_dir` (created); their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = (write_json(out_dir / JSON_NAME, doc), write_csv(out_dir / CSV_NAME, doc),
             plot_heatmap(out_dir / PNG_NAME, doc))
    return {p.suffix[1:]: str(p) for p in files}


__all__ = ["JSON_NAME", "out_dir_for", "find_baseline", "load_baseline", "write_all"]
