"""Render the sweep's results (results.jsonl from sweep.py) as tables in the paper's format next to
the paper's ImageNet numbers, written into the tables section of docs/results.md, plus plots (accuracy vs
cluster size, pretraining loss curves, validation curves of rows 1-2).

    python experiments/make_results.py --results docs/results/cifar10_sweep/results.jsonl --doc docs/results.md
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from sweep import diagnosis, finetune_diagnosis  # experiments/ is this script's directory

# The paper's ImageNet-1K top-1 (MAL-B) for each ablation row (Tables 5, 6, 7, 12, 13).
PAPER = {
    "baseline": {"supervised": 81.7, "supervised, labelled epochs": 81.7, "MAL default": 84.3},
    "table4": {"MAE-ViL": 83.1, "supervised ViT": 77.9, "MAL-ViT": 80.6, "MAE-ViT": 79.1},
    "table6": {"k=1": 82.7, "k=2": 83.2, "k=3": 83.5, "k=4": 84.3, "k=6": 83.4},
    "table7": {"random": 81.4, "row_fwd": 83.6, "row_bwd": 83.4, "col_fwd": 83.6, "col_bwd": 83.5,
               "alternating": 84.3},
    "table5": {"pixel 10%": 81.2, "pixel 20%": 81.7, "pixel 50%": 81.1, "patch 10%": 82.3, "patch 20%": 82.6,
               "patch 50%": 82.1, "cluster 10%": 83.3, "cluster 20%": 84.3, "cluster 50%": 83.0},
    "table12": {"depth 4, width 512": 82.9, "depth 8, width 384": 83.6, "depth 8, width 512": 84.3,
                "depth 8, width 1024": 84.0},
    "table13": {"xLSTM decoder": 84.1, "Transformer decoder": 84.3},
}
# The default run stands in for these rows of the ablation tables.
DEFAULT_ALIASES = {"table6": "k=4", "table7": "alternating", "table5": "cluster 20%", "table12": "depth 8, width 512",
                   "table13": "Transformer decoder"}
# The headline's arms, in the order of its table: (setting, model).
ARMS = [("MAL default", "MAL-T"), ("supervised, labelled epochs", "ViL-T"), ("supervised", "ViL-T"),
        ("MAE-ViL", "ViL-T"), ("MAE-ViT", "ViT-T"), ("MAL-ViT", "ViT-T"), ("supervised ViT", "ViT-T")]
ARM_ORDER = [setting for setting, _ in ARMS]


def arm_rank(setting: str) -> int:
    """Where a setting goes in the headline's table and legend (unknown settings last)."""
    return ARM_ORDER.index(setting) if setting in ARM_ORDER else len(ARM_ORDER)


def without_seed(name: str) -> str:
    """A run's name without its seed suffix (`default_s1` -> `default`): the runs of one setting."""
    return re.sub(r"_s\d+$", "", name)


TITLES = {"baseline": "Supervised vs MAL (rows 1-2)", "table6": "Table 6: cluster size", "table7": "Table 7: scan order",
          "table5": "Table 5: masking unit and ratio", "table12": "Table 12: decoder depth and width",
          "table13": "Table 13: decoder type"}


# two-sided 95 % Student-t quantiles, by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_difference(rows: list[dict], a, b, key: str = "top1", table: str = "baseline") -> dict | None:
    """Seed-by-seed differences `a - b` of `key`: mean, the 95 % t-interval of the mean (None with one seed), the
    seeds paired. `a` and `b` are settings of `table`, or (table, setting) pairs to compare across tables. None when
    no seed has both."""
    a, b = ((table, x) if isinstance(x, str) else tuple(x) for x in (a, b))
    by = {((r["table"], r["setting"]), r["seed"]): r.get(key) for r in rows}
    seeds = sorted(s for (arm, s), v in by.items() if arm == a and v is not None and by.get((b, s)) is not None)
    if not seeds:
        return None
    d = [by[(a, s)] - by[(b, s)] for s in seeds]
    mean = statistics.mean(d)
    half = T95[len(d) - 1] * statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else None
    return {"mean": mean, "ci": None if half is None else (mean - half, mean + half), "seeds": seeds, "diffs": d}


def paired_table(rows: list[dict], pairs=(("MAL default", "supervised, labelled epochs"), ("MAL default", "supervised")),
                 table: str = "baseline", title: str = "MAL minus supervised, paired by seed") -> list[str]:
    """Markdown rows: each pair's difference `a - b` (settings of `table`, or (table, setting) pairs), on the val
    folder and the held-out split."""
    out = [f"#### {title}", "",
           "| comparison | metric | mean difference | 95 % interval | seeds |", "|---|---|---|---|---|"]
    for a, b in pairs:
        for key, name in (("top1", "val top-1"), ("holdout_top1", "held-out top-1")):
            res = paired_difference(rows, a, b, key, table)
            if res is None:
                continue
            ci = "–" if res["ci"] is None else f"[{res['ci'][0]:+.2f}, {res['ci'][1]:+.2f}]"
            out.append(f"| {arm_label(a)} − {arm_label(b)} | {name} | {res['mean']:+.2f} | {ci} | "
                       f"{len(res['seeds'])} |")
    return out + [""] if len(out) > 4 else []


def arm_label(arm) -> str:
    """A comparison's name for a setting, or for a (table, setting) pair: MAL's default is "MAL"."""
    table, setting = ("baseline", arm) if isinstance(arm, str) else arm
    if setting == "MAL default":
        return "MAL"
    return setting if table in ("baseline", "lowlabel", "light", "split", "scale") else f"MAL {setting} ({TITLES.get(table, table).split(':')[0]})"


def fmt(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} (n={len(vals)})"


def stage_epochs(row: dict) -> tuple[int, int]:
    """(pretraining, labelled) epochs of a results row, read from its stages' commands."""
    epochs = [int(m[-1]) if (m := re.findall(r"optim\.epochs=(\d+)", c)) else 0 for c in row["commands"]]  # last wins
    return (epochs[0], epochs[1]) if len(epochs) == 2 else (0, epochs[0])


def by_setting(rows: list[dict], *tables: str) -> dict[str, list[dict]]:
    """The rows of `tables`, grouped by setting (first appearance first)."""
    by = defaultdict(list)
    for r in rows:
        if r["table"] in tables:
            by[r["setting"]].append(r)
    return by


def headline_table(rows: list[dict], dataset: str) -> list[str]:
    """Markdown rows of the headline: each arm (MAL, both supervised arms, the baselines' objectives) with its
    schedule, seeds pooled (mean ± std), wall minutes per run and the paper's ImageNet number."""
    by = by_setting(rows, "baseline", "table4")
    if not by:
        return []
    paper = {**PAPER["baseline"], **PAPER["table4"]}
    model = dict(ARMS)
    out = ["#### MAL against supervised training and the other objectives", "",
           f"| arm | encoder | pretraining epochs | labelled epochs | val top-1 ({dataset}) | held-out top-1 | "
           "held-out linear probe | wall min per run | paper top-1 (ImageNet, base) | runs |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for setting in sorted(by, key=arm_rank):
        rs = sorted(by[setting], key=lambda r: r["seed"])
        pre, lab = stage_epochs(rs[0])
        wall = statistics.mean(r.get("gpu_min") or 0 for r in rs)
        out.append(f"| {setting} | {model.get(setting, '–')} | {pre or '–'} | {lab} | {fmt([r.get('top1') for r in rs])} | "
                   f"{fmt([r.get('holdout_top1') for r in rs])} | {fmt([r.get('holdout_linprobe') for r in rs])} | "
                   f"{wall:.1f} | {paper.get(setting, '–')} | {', '.join(r['name'] for r in rs)} |")
    return out + [""]


ABLATIONS = ("table6", "table7", "table5", "table12", "table13")
# --tables: which tables to render, and which results rows they read (the default runs are a row of every ablation
# table and the reference of the fine-tuning recipes).
TABLE_SETS = {"all": None, "headline": ("baseline", "table4"), "ablations": ABLATIONS, "diagnosis": ("diag",),
              "ftdiag": ("ftdiag",), "lowlabel": ("lowlabel",), "table6": ("table6",), "light": ("light",),
              "split": ("split",), "scale": ("scale",)}
# The arms each family's tables are read against: settings of the baseline table, or (table, setting) pairs.
_EQUAL_LABELS = ("MAL default", "supervised, labelled epochs")
REFERENCE_ARMS = {"ablations": _EQUAL_LABELS, "ftdiag": _EQUAL_LABELS, "table6": ("MAL default",),
                  "light": (*_EQUAL_LABELS, "supervised"),
                  "split": (("light", "MAL, light fine-tuning, layer decay 1.0"), ("light", "supervised, light")),
                  "scale": (("light", "MAL, light fine-tuning, layer decay 1.0"),)}


def select(rows: list[dict], which: str) -> list[dict]:
    """The rows that the tables chosen by `which` read."""
    if TABLE_SETS[which] is None:
        return rows
    refs = REFERENCE_ARMS.get(which, ())
    return [r for r in rows if r["table"] in TABLE_SETS[which] or (r["table"] == "baseline" and r["setting"] in refs)
            or (r["table"], r["setting"]) in refs]


def tables(rows: list[dict], dataset: str = "CIFAR-10", which: str = "all") -> str:
    out = []
    if which in ("all", "diagnosis"):
        out += diagnosis_table(rows)
    if which in ("all", "ftdiag"):
        out += finetune_diagnosis_table(rows)
    if which in ("all", "headline"):
        out += headline_table(rows, dataset) + paired_table(rows)
    if which in ("all", "ablations", "table6"):
        out += ablation_tables(rows, dataset, every_table=which == "ablations")
    if which in ("all", "lowlabel"):
        out += low_label_table(rows, dataset)
    if which in ("all", "light"):
        out += light_recipe_table(rows, dataset)
    if which in ("all", "split"):
        out += budget_split_table(rows, dataset)
    if which in ("all", "scale"):
        out += data_scale_table(rows, dataset)
    return "\n".join(out)


LIGHT_GROUPS = {"MAL": lambda s: s.startswith("MAL"),
                "supervised at the labelled epochs": lambda s: s.startswith("supervised") and "labelled" in s,
                "supervised at the total epochs": lambda s: s.startswith("supervised") and "labelled" not in s}


def best_held_out(arms: dict, candidates) -> tuple | None:
    """Of the `candidates` (keys of `arms`, {arm: rows}), the arm with the best held-out mean; None where none has a
    held-out number."""
    return max((a for a in candidates if held(arms[a])), key=lambda a: statistics.mean(held(arms[a])), default=None)


def light_choices(rows: list[dict]) -> tuple[dict, dict]:
    """The light pair's arms, {(table, setting): rows} for the light_recipe rows and the headline's heavy runs, and
    each group's (LIGHT_GROUPS) arm with the best held-out mean; a group without held-out numbers chooses None."""
    heavy = by_setting(rows, "baseline")
    arms = {("baseline", s): rs for s, rs in heavy.items()} | {("light", s): rs for s, rs in
                                                                 by_setting(rows, "light").items()}
    chosen = {g: best_held_out(arms, [a for a in arms if pick(a[1])]) for g, pick in LIGHT_GROUPS.items()}
    return arms, chosen


def wall_minutes(row: dict) -> float:
    """A row's wall minutes with its pretraining's, where another experiment ran that (its summary.json beside the
    results.jsonl, found from the pretraining command's --output folder)."""
    own = row.get("gpu_min") or 0.0
    pre = re.search(r"--output \S*?([^/\s]+)/pretrain ", row["commands"][0]) if len(row["commands"]) == 2 else None
    if pre is None or pre.group(1) == row["name"]:
        return own
    summary = Path(row["_dir"]) / pre.group(1) / "pretrain" / "summary.json"
    return own + (json.loads(summary.read_text())["train_time_s"] / 60 if summary.exists() else float("nan"))


def light_recipe_table(rows: list[dict], dataset: str) -> list[str]:
    """Markdown rows of the light-augmentation pair (sweep.py's light_recipe rows) beside the headline's heavy-
    augmentation runs, seeds pooled; each arm's recipe chosen on the held-out split (the best mean), and the chosen
    MAL against the chosen supervised arms at the labelled and at the total epochs, paired by seed; MAE-ViL, the
    positive control, against the same two arms and against the chosen MAL; MAE-ViT against supervised ViT-T
    (Table 4's +MAE on ViT; the ViT arms are never chosen)."""
    if not by_setting(rows, "light"):
        return []
    arms, chosen = light_choices(rows)
    heavy = any(table != "light" for table, _ in arms)              # the headline's runs are in the results
    title = ("Light augmentation against the headline's recipe" if heavy
             else "MAL and supervised training, light augmentation")
    out = [f"#### {title} ({dataset})", "",
           "| arm | augmentation | labelled epochs | held-out top-1 | val top-1 | wall min per run, with pretraining | "
           "runs |", "|---|---|---|---|---|---|---|"]
    for (table, setting), rs in arms.items():
        out.append(f"| {setting} | {'crop and flip' if table == 'light' else 'RandAugment, mixup, cutmix, erasing'} | "
                   f"{stage_epochs(rs[0])[1]} | {fmt(held(rs))} | {fmt([r.get('top1') for r in rs])} | "
                   f"{statistics.mean(map(wall_minutes, rs)):.1f} | "
                   f"{run_names(rs)} |")
    out += ["", "Chosen on the held-out split (the best mean): " + "; ".join(
        f"{g}: {a[1]}" for g, a in chosen.items() if a) + ".", ""]
    mal = chosen["MAL"]
    pairs = [(mal, sup) for sup in chosen.values() if mal and sup and sup != mal]
    control = [(a, other) for a in arms if a[1].startswith("MAE-ViL")                 # the positive control
               for other in chosen.values() if other]
    vit = [(a, b) for a in arms if a[1].startswith("MAE-ViT") for b in arms if b[1].startswith("ViT-T supervised")]
    who = "MAL and MAE-ViL minus supervised, and MAE-ViL minus MAL" if control else "MAL minus supervised"
    who += ", MAE-ViT minus supervised ViT-T" if vit else ""
    return out + paired_table(rows, pairs + control + vit, title=f"{who}, each arm's chosen recipe, paired by seed")


def split_arms(rows: list[dict]) -> tuple[dict, tuple]:
    """The equal-total-epochs arms: MAL's splits (sweep.py's budget_split rows) and the light pair's MAL arm at the
    full split, keyed (table, setting) and ordered by pretraining epochs, and the light pair's supervised run of the
    same total epochs ({} and () where the splits or that run are missing)."""
    splits = by_setting(rows, "split")
    light = by_setting(rows, "light")
    (_, full), reference = REFERENCE_ARMS["split"]
    if not splits or reference[1] not in light:
        return {}, ()
    arms = {("split", k): v for k, v in splits.items()} | ({("light", full): light[full]} if full in light else {})
    return dict(sorted(arms.items(), key=lambda a: stage_epochs(a[1][0])[0])), (reference, light[reference[1]])


def budget_split_table(rows: list[dict], dataset: str) -> list[str]:
    """Markdown rows of the equal-total-epochs splits beside the light pair's MAL arm at the full split; the split
    with the best held-out mean against the light pair's supervised run of the same total epochs, paired by seed."""
    arms, reference = split_arms(rows)
    if not arms:
        return []
    out = [f"#### Equal total epochs, split between pretraining and fine-tuning ({dataset})", "",
           "| arm | pretraining epochs | labelled epochs | held-out top-1 | val top-1 | runs |",
           "|---|---|---|---|---|---|"]
    for (table, setting), rs in [*arms.items(), reference]:
        pre, lab = stage_epochs(rs[0])
        out.append(f"| {setting} | {pre or '–'} | {lab} | {fmt(held(rs))} | {fmt([r.get('top1') for r in rs])} | "
                   f"{run_names(rs)} |")
    best = best_held_out(arms, arms)
    if best is None:
        return out + [""]
    out += ["", f"Chosen on the held-out split (the best mean): {best[1]}.", ""]
    return out + paired_table(rows, [(best, reference[0])], title="The chosen split minus supervised "
                              "training for the same total epochs, paired by seed")


def data_scale_table(rows: list[dict], dataset: str) -> list[str]:
    """Markdown rows of the data-scale family (sweep.py's scale* rows: MAL pretrained on part of the images for the
    same steps) beside the light pair's MAL arm on every image, seeds pooled, and the full-data arm minus each
    fraction, paired by seed."""
    scale = by_setting(rows, "scale")
    (table, full), = REFERENCE_ARMS["scale"]
    if not scale:
        return []
    arms = [(("scale", k), v) for k, v in scale.items()]
    if full in (light := by_setting(rows, table)):
        arms.append(((table, full), light[full]))
    out = [f"#### Pretraining on part of the images, same steps ({dataset})", "",
           "| arm | pretraining epochs | labelled epochs | held-out linear probe | held-out top-1 | val top-1 | runs |",
           "|---|---|---|---|---|---|---|"]
    for (_, setting), rs in sorted(arms, key=lambda a: -stage_epochs(a[1][0])[0]):
        pre, lab = stage_epochs(rs[0])
        out.append(f"| {setting} | {pre} | {lab} | {fmt([r.get('holdout_linprobe') for r in rs])} | {fmt(held(rs))} | "
                   f"{fmt([r.get('top1') for r in rs])} | {run_names(rs)} |")
    return out + [""] + paired_table(rows, [((table, full), ("scale", k)) for k in scale],
                                     title="Every image minus part of them, paired by seed")


def light_plot(rows: list[dict], save, dataset: str) -> None:
    """results_light_curves.png: held-out top-1 against total epochs of every seed of each chosen arm of the light
    pair, and of the positive control (MAE-ViL) where it ran."""
    if not by_setting(rows, "light"):
        return
    arms, chosen = light_choices(rows)
    picked = [(g, a) for g, a in chosen.items() if a] + [("positive control", a) for a in arms
                                                          if a[1].startswith("MAE-ViL")]
    groups = [(f"{g}: {a[1]}", sorted(arms[a], key=lambda r: r["seed"])) for g, a in picked]
    save(total_epoch_curves(groups, f"{dataset} held-out top-1 (%)"), "results_light_curves.png")


def split_plot(rows: list[dict], save, dataset: str) -> None:
    """results_split_curves.png: held-out top-1 against total epochs of every seed of each split of the same total
    epochs, and of supervised training for all of them."""
    arms, reference = split_arms(rows)
    if arms:
        groups = [(setting, sorted(rs, key=lambda r: r["seed"])) for (_, setting), rs in [*arms.items(), reference]]
        save(total_epoch_curves(groups, f"{dataset} held-out top-1 (%)"), "results_split_curves.png")


def low_label_table(rows: list[dict], dataset: str) -> list[str]:
    """Markdown rows of the low-label arms (sweep.py's lowlabel* rows): MAL and supervised on the same fraction of
    the labels, seeds pooled, and their paired difference."""
    by = by_setting(rows, "lowlabel")
    if not by:
        return []
    out = ["#### MAL against supervised training with few labels", "",
           f"| arm | labelled epochs | val top-1 ({dataset}) | held-out top-1 | wall min per run | runs |",
           "|---|---|---|---|---|---|"]
    for setting, rs in sorted(by.items()):
        rs.sort(key=lambda r: r["seed"])
        out.append(f"| {setting} | {stage_epochs(rs[0])[1]} | {fmt([r.get('top1') for r in rs])} | "
                   f"{fmt([r.get('holdout_top1') for r in rs])} | {statistics.mean(r.get('gpu_min') or 0 for r in rs):.1f} | "
                   f"{', '.join(r['name'] for r in rs)} |")
    mal = [s for s in by if s.startswith("MAL")]
    pairs = [(m, "supervised" + m[3:]) for m in mal if "supervised" + m[3:] in by]
    return out + [""] + paired_table(rows, pairs, "lowlabel")


def same_seed_difference(variant: list[dict], default: list[dict]) -> str:
    """The variant's val top-1 minus the default run's of the same seed (same initialization and data order), the
    mean over the seeds both have, with its spread and the seeds; "–" when none pairs."""
    res = paired_difference(variant + default, (variant[0]["table"], variant[0]["setting"]),
                            (default[0]["table"], default[0]["setting"])) if variant and default else None
    if res is None:
        return "–"
    seeds = "s" + ",".join(str(s) for s in res["seeds"])
    if len(res["diffs"]) == 1:
        return f"{res['mean']:+.2f} ({seeds})"
    return f"{res['mean']:+.2f} ± {statistics.stdev(res['diffs']):.2f} ({seeds})"


def ablation_tables(rows: list[dict], dataset: str, every_table: bool = False) -> list[str]:
    """Markdown tables of the ablations (Tables 6, 7, 5, 12, 13) in the paper's row order, seeds pooled, the
    default runs as each table's default row, the val difference to that row, and the paper's row beside. A row of
    the paper that did not run is listed as such; `every_table` lists the tables that did not run at all too."""
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r["table"]][r["setting"]].append(r)
    default = by["baseline"].get("MAL default", [])
    ref = statistics.mean(r["top1"] for r in default) if default else None
    out = []
    for t in ABLATIONS:
        if t not in by and not every_table:
            continue
        settings = {s: [] for s in PAPER[t]} | dict(by[t])
        settings[DEFAULT_ALIASES[t]] = default
        out += [f"#### {TITLES[t]}", "", f"| setting | val top-1, fine-tuned ({dataset}) | val − default | "
                "val − default, same seed | held-out top-1 | held-out k-NN | held-out linear probe | "
                "paper top-1 (ImageNet, MAL-B) | runs |", "|---|---|---|---|---|---|---|---|---|"]
        for setting, rs in settings.items():
            paper = PAPER[t].get(setting, "–")
            if not rs:
                out.append(f"| {setting} | not run yet | | | | | | {paper} | |")
                continue
            top1 = [r.get("top1") for r in rs]
            delta = "–" if rs is default or ref is None else f"{statistics.mean(top1) - ref:+.2f}"
            paired = "–" if rs is default else same_seed_difference(rs, default)
            out.append(f"| {setting} | {fmt(top1)} | {delta} | {paired} | {fmt([r.get('holdout_top1') for r in rs])} | "
                       f"{fmt([r.get('holdout_knn') for r in rs])} | {fmt([r.get('holdout_linprobe') for r in rs])} | "
                       f"{paper} | {', '.join(r['name'] for r in rs)} |")
        out.append("")
    return out + recipe_candidates_table(rows)


# Ablation variants that beat the default by more than its seed spread: candidates for the small protocols' recipe,
# each against the headline's arms with the same seeds.
RECIPE_CANDIDATES = (("table6", "k=1"), ("table5", "patch 20%"), ("table5", "patch 50%"))


def recipe_candidates_table(rows: list[dict]) -> list[str]:
    """Paired-by-seed differences of each recipe candidate against MAL's default and supervised training for the
    same labelled epochs."""
    pairs = [(c, ref) for c in RECIPE_CANDIDATES for ref in (("baseline", "MAL default"),
                                                              ("baseline", "supervised, labelled epochs"))]
    return paired_table(rows, pairs, title="Recipe candidates against the headline's arms, paired by seed")


DIAG_COLUMNS = ("| setting | pretraining loss (end) | held-out k-NN | held-out linear probe | held-out top-1, "
                "fine-tuned 15 ep | val top-1 | wall min | runs |", "|---|---|---|---|---|---|---|---|")


def finetune_diagnosis_table(rows: list[dict]) -> list[str]:
    """Markdown rows of the fine-tuning diagnosis (sweep.py's ftdiag_* rows): each change to the fine-tuning recipe,
    its effect on MAL's fine-tune (against the default recipe) beside its effect on the supervised baseline (the same
    change), and the MAL-minus-supervised gap it leaves; seeds pooled, the encoder's linear probe above."""
    diag, refs = ftdiag_runs(rows)
    if not diag:
        return []
    runs = lambda setting: [r for r in refs + diag if r["setting"] == setting]     # noqa: E731
    mal_ref, sup_ref = runs("MAL default"), runs("supervised, labelled epochs")
    order = [without_seed(e.name) for e in finetune_diagnosis([0])]           # the sweep's order
    mal_rows = sorted((r for r in diag if not r["setting"].startswith("supervised, ")),
                      key=lambda r: order.index(n) if (n := without_seed(r["name"])) in order else len(order))
    changes = list(dict.fromkeys(r["setting"] for r in mal_rows))
    probe = fmt([r.get("holdout_linprobe") for r in mal_ref])
    out = ["#### Fine-tuning recipes on the held-out split", "",
           f"The pretrained encoder's held-out linear probe: {probe}. Δ: against the same arm's default recipe.", "",
           "| change to the fine-tuning recipe | MAL held-out top-1 | Δ | supervised held-out top-1 | Δ | "
           "MAL − supervised | MAL val top-1 | supervised val top-1 | runs |", "|---|---|---|---|---|---|---|---|---|"]
    for change, mal, sup in [("none (the configs' recipe)", mal_ref, sup_ref)] + \
            [(c, runs(c), runs(f"supervised, {c}")) for c in changes]:
        out.append(f"| {change} | {fmt(held(mal))} | {delta(held(mal), held(mal_ref))} | {fmt(held(sup))} | "
                   f"{delta(held(sup), held(sup_ref))} | {delta(held(mal), held(sup))} | "
                   f"{fmt([r.get('top1') for r in mal])} | {fmt([r.get('top1') for r in sup])} | "
                   f"{', '.join(r['name'] for r in mal + sup)} |")
    return out + [""]


def ftdiag_runs(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The fine-tuning diagnosis's rows, and the reference runs of its seeds (the default fine-tune and the
    supervised baseline at the labelled epochs)."""
    diag = [r for r in rows if r["table"] == "ftdiag"]
    seeds = {r["seed"] for r in diag}
    refs = [r for r in rows if r["table"] == "baseline" and r["seed"] in seeds
            and r["setting"] in ("MAL default", "supervised, labelled epochs")]
    return diag, refs


def run_names(rs: list[dict]) -> str:
    """The runs of an arm, by seed."""
    return ", ".join(r["name"] for r in sorted(rs, key=lambda r: r["seed"]))


def held(rs: list[dict]) -> list[float]:
    return [r["holdout_top1"] for r in rs if r.get("holdout_top1") is not None]


def delta(vals: list[float], ref: list[float]) -> str:
    """The difference of two means, signed; '–' where either side has no value."""
    return f"{statistics.mean(vals) - statistics.mean(ref):+.2f}" if vals and ref else "–"


def diagnosis_table(rows: list[dict]) -> list[str]:
    """Markdown rows of the held-out diagnosis (sweep.py's diag_* rows), one per setting, seeds pooled."""
    by = by_setting(rows, "diag")
    if not by:
        return []
    order = [e.name for e in diagnosis()]                                  # the sweep's order
    rank = {s: min(order.index(n) if (n := without_seed(r["name"])) in order else len(order) for r in rs)
            for s, rs in by.items()}
    by = dict(sorted(by.items(), key=lambda kv: rank[kv[0]]))
    out = ["#### Diagnosis on the held-out split", "", *DIAG_COLUMNS]
    for setting, rs in by.items():
        loss = fmt([r.get("pretrain_loss") for r in rs]) if rs[0].get("knn") is not None else "–"
        gpu = sum(r.get("gpu_min") or 0 for r in rs)
        out.append(f"| {setting} | {loss} | {fmt([r.get('holdout_knn') for r in rs])} | "
                   f"{fmt([r.get('holdout_linprobe') for r in rs])} | {fmt([r.get('holdout_top1') for r in rs])} | "
                   f"{fmt([r.get('top1') for r in rs])} | {gpu:.1f} | {', '.join(r['name'] for r in rs)} |")
    return out + [""]


def diagnosis_plot(rows: list[dict], save) -> None:
    """diagnosis_curves.png: the held-out linear probe against pretraining epochs (the encoder at initialization
    as the floor) and the held-out top-1 of the short fine-tunes and the supervised runs against epochs."""
    import matplotlib.pyplot as plt
    diag = [r for r in rows if r["table"] == "diag"]
    if not diag:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in diag:
        probe = read_metrics(run_dir(r) / "pretrain/metrics.csv", "eval_linprobe_top1")
        if r["name"] == "diag_random":
            a.axhline(r["holdout_linprobe"], color="gray", ls=":", label="initialization")
        elif r.get("holdout_linprobe") is not None:            # the end of the run is probed by its summary
            loss = read_metrics(run_dir(r) / "pretrain/metrics.csv", "loss")
            end = loss[-1][0] if loss else 10.0 * (len(probe) + 1)
            a.plot(*zip(*probe, (end, r["holdout_linprobe"])), marker="o", ms=3, label=r["setting"])
        stage = "supervised" if r.get("knn") is None else "finetune"
        curve = read_metrics(run_dir(r) / stage / "metrics.csv", "eval_top1")
        if curve:
            b.plot(*zip(*curve), lw=0.9, ls="--" if stage == "supervised" else "-", label=f"{r['setting']} (s{r['seed']})")
    a.set(xlabel="pretraining epoch", ylabel="held-out linear probe top-1 (%)")
    b.set(xlabel="labelled epoch (fine-tuning or supervised)", ylabel="held-out top-1 (%)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    save(fig, "diagnosis_curves.png")


def probe_plot(rows: list[dict], save) -> None:
    """results_probe_epochs.png: the held-out linear probe and k-NN top-1 against pretraining epochs, for runs
    probed during pretraining (`probe_every`); the run's last point is its summary's."""
    import matplotlib.pyplot as plt
    runs = []
    for r in rows:
        if r.get("holdout_linprobe") is None or r["table"] == "diag":
            continue
        path = run_dir(r) / "pretrain/metrics.csv"
        end = stage_epochs(r)[0]
        lin = read_metrics(path, "eval_linprobe_top1") + [(end, r["holdout_linprobe"])]
        knn = read_metrics(path, "eval_knn_top1") + [(end, r["holdout_knn"])]
        if len(lin) > 1:
            runs.append((r, lin, knn))
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for i, (r, lin, knn) in enumerate(runs):
        ax.plot(*zip(*lin), marker="o", color=f"C{i}", label=f"{r['setting']} (s{r['seed']}), linear probe")
        ax.plot(*zip(*knn), marker="^", ls="--", color=f"C{i}", label=f"{r['setting']} (s{r['seed']}), k-NN")
    ax.set(xlabel="pretraining epoch", ylabel="held-out top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, "results_probe_epochs.png")


def total_epoch_curves(groups: list[tuple[str, list[dict]]], ylabel: str):
    """A figure of each run's evaluation top-1 against total epochs (a fine-tune starts after its pretraining):
    one colour and legend label per group, solid with pretraining, dashed without."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (label, runs) in enumerate(groups):
        for j, r in enumerate(runs):
            pre, _ = stage_epochs(r)
            pts = read_metrics(run_dir(r) / ("finetune" if pre else "supervised") / "metrics.csv", "eval_top1")
            if pts:
                ax.plot(*zip(*[(e + pre, v) for e, v in pts]), lw=0.9, color=f"C{i}", ls="-" if pre else "--",
                        label=None if j else label)
    ax.set(xlabel="total epochs (pretraining + labelled)", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def curves_plot(rows: list[dict], save, dataset: str) -> None:
    """results_val_curves.png: the evaluation-set top-1 of every headline run against total epochs, one colour per
    arm."""
    runs = [r for r in rows if r["table"] in ("baseline", "table4")]
    if not runs:
        return
    settings = sorted({r["setting"] for r in runs}, key=arm_rank)
    held_out = any(r.get("holdout_top1") is not None for r in runs)
    save(total_epoch_curves([(st, [r for r in runs if r["setting"] == st]) for st in settings],
                            f"{dataset} {'held-out' if held_out else 'val'} top-1 (%)"), "results_val_curves.png")


def run_dir(row: dict) -> Path:
    """The folder of a results row's run: beside the results.jsonl it was read from."""
    return Path(row["_dir"]) / row["name"]


def read_metrics(path: Path, key: str) -> list[tuple[float, float]]:
    """(epoch, value) points of one column of a run's metrics.csv."""
    if not path.exists():
        return []
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    if rows and key not in rows[0] and f"val_{key.removeprefix('eval_')}" in rows[0]:   # runs logged before the
        key = f"val_{key.removeprefix('eval_')}"                                          # eval_* columns
    return [(float(x["epoch"]), float(x[key])) for x in rows if x.get(key)]


def cluster_size_plot(rows: list[dict], save, dataset: str) -> None:
    """results_cluster_size.png: fine-tuned top-1, linear probe and k-NN against the cluster size (Table 6's runs
    and the default run as k = 4), the mean per k and every run."""
    import matplotlib.pyplot as plt
    by_k = defaultdict(list)
    for r in rows:
        if r["table"] == "table6":
            by_k[int(r["setting"][2:])].append(r)
        elif r["setting"] == "MAL default":
            by_k[4].append(r)
    if len(by_k) < 2:                                 # the default run and Table 6's
        return
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for key, label, m in (("top1", "fine-tuned top-1", "o"), ("linprobe", "linear probe", "s"), ("knn", "k-NN", "^")):
        ks = sorted(by_k)
        means = [statistics.mean(r[key] for r in by_k[k]) for k in ks]
        ax.plot(ks, means, marker=m, label=label)
        for k in ks:                                     # every run, not only the mean
            ax.scatter([k] * len(by_k[k]), [r[key] for r in by_k[k]], s=8, color="gray", zorder=3)
    ax.set_xlabel("cluster size k (12x12 grid)")
    ax.set_ylabel(f"{dataset} top-1 (%)")
    ax.set_xticks(sorted(by_k))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, "results_cluster_size.png")


def plots(rows: list[dict], out_dir: Path, dataset: str = "CIFAR-10", which: str = "all") -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []

    def save(fig, name):
        fig.tight_layout()
        made.append(out_dir / name)
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)

    cluster_size_plot(rows, save, dataset)
    curves = {r["name"]: read_metrics(run_dir(r) / "pretrain/metrics.csv", "loss") for r in rows}
    panels = [(t, [r for r in rows if r["table"] == t and curves[r["name"]]])
              for t in ("table6", "table7", "table5", "table12", "table13")]
    panels = [(t, rs) for t, rs in panels if rs]
    default = [r for r in rows if r["setting"] == "MAL default" and curves[r["name"]]]
    if (panels or default) and which in ("all", "headline", "ablations", "table6"):   # one panel per ablation,
                                                                                       # the default run(s) in each
        n = max(len(panels), 1)
        cols = min(n, 3)
        fig, axes = plt.subplots(-(-n // cols), cols, figsize=(3.8 * cols, 3.2 * -(-n // cols)), sharey=True,
                                 squeeze=False)
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        for ax, (t, rs) in zip(axes.flat, panels or [("baseline", [])]):
            seeds = ", ".join(str(r["seed"]) for r in default)
            for j, r in enumerate(default):
                ax.plot(*zip(*curves[r["name"]]), color="black", lw=0.8, ls="--",
                        label=None if j else f"default ({DEFAULT_ALIASES.get(t, 'MAL')}, seeds {seeds})")
            colors = {s: f"C{i}" for i, s in enumerate(dict.fromkeys(r["setting"] for r in rs))}
            for r in rs:                             # one colour per setting; its seeds share it
                ax.plot(*zip(*curves[r["name"]]), lw=0.9, color=colors[r["setting"]],
                        label=f"{r['setting']} (seed {r['seed']})")
            ax.set_title(TITLES.get(t, t), fontsize=9)
            ax.set_xlabel("pretraining epoch")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        for ax in axes[:, 0]:
            ax.set_ylabel("next-cluster loss (normalized MSE)")
        save(fig, "results_pretrain_loss.png")
    if which in ("all", "headline"):
        curves_plot(rows, save, dataset)
    if which in ("all", "headline", "table6"):
        probe_plot(rows, save)
    if which in ("all", "diagnosis"):
        diagnosis_plot(rows, save)
    if which in ("all", "ftdiag"):
        ftdiag_plot(rows, save, dataset)
    if which in ("all", "light"):
        light_plot(rows, save, dataset)
    if which in ("all", "split"):
        split_plot(rows, save, dataset)
    return made


def ftdiag_plot(rows: list[dict], save, dataset: str) -> None:
    """results_ftdiag_curves.png: held-out top-1 against labelled epochs for every fine-tuning recipe, MAL (left,
    from the shared pretraining) beside the supervised baseline (right), one colour per change in both panels."""
    import matplotlib.pyplot as plt
    diag, refs = ftdiag_runs(rows)
    if not diag:
        return
    change = lambda r: "none (the configs' recipe)" if r["table"] == "baseline" else r["setting"].removeprefix(  # noqa: E731
        "supervised, ")
    colors = {c: ("black" if i == 0 else f"C{i - 1}") for i, c in enumerate(dict.fromkeys(map(change, refs + diag)))}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for r in refs + diag:
        supervised = r["setting"].startswith("supervised")
        pts = read_metrics(run_dir(r) / ("supervised" if supervised else "finetune") / "metrics.csv", "eval_top1")
        if pts:
            axes[int(supervised)].plot(*zip(*pts), lw=1.6 if r["table"] == "baseline" else 0.9,
                                       color=colors[change(r)], label=change(r))
    for ax, title in zip(axes, ("MAL: fine-tuning one pretraining", "supervised from scratch")):
        ax.set(title=title, xlabel="labelled epochs", ylabel=f"{dataset} held-out top-1 (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="lower right")   # the emptier panel
    save(fig, "results_ftdiag_curves.png")


def markers(section: str) -> tuple[str, str]:
    return f"<!-- {section}:begin (experiments/make_results.py) -->", f"<!-- {section}:end -->"


def fill_section(doc: Path, section: str, text: str) -> None:
    """Replace what lies between the section's markers in `doc` (a missing doc is created with them)."""
    begin, end = markers(section)
    old = doc.read_text() if doc.exists() else f"{begin}\n{end}\n"
    if begin not in old or end not in old:
        raise SystemExit(f"{doc} has no {begin} ... {end} section to fill")
    head, rest = old.split(begin, 1)
    doc.write_text(head + begin + "\n" + text + rest[rest.index(end):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", nargs="+", default=["docs/results/cifar10_sweep/results.jsonl"],
                    help="one or more sweeps' results.jsonl, pooled (e.g. an ablation sweep with the headline's "
                         "default seeds); a name read again replaces the earlier row")
    ap.add_argument("--doc", default="docs/results.md", help="markdown file whose tables section is replaced")
    ap.add_argument("--figures", default="docs/results")
    ap.add_argument("--section", default="tables", help="which marked section of --doc to fill")
    ap.add_argument("--dataset", default="CIFAR-10", help="the data set's name in table headers and plot labels")
    ap.add_argument("--tables", choices=list(TABLE_SETS), default="all",
                    help="which tables (and the rows and plots they use): all, or one family")
    args = ap.parse_args()
    rows = {}
    for path in args.results:
        for line in open(path):                # one row per experiment: a re-run replaces the earlier row
            if line.strip():
                r = json.loads(line)
                rows[r["name"]] = {**r, "_dir": str(Path(path).parent)}
    rows = select(sorted(rows.values(), key=lambda r: r["name"]), args.tables)
    text = tables(rows, args.dataset, args.tables)
    if not text.strip():
        sys.exit(f"no {args.tables} table from {' '.join(args.results)}: its rows have not run; {args.doc} is "
                 "unchanged")
    text += "\n#### Commands\n\n" + "\n".join(f"- `{r['name']}`: " + " && ".join(f"`{c}`" for c in r["commands"])
                                              for r in rows) + "\n"
    fill_section(Path(args.doc), args.section, text)
    figs = Path(args.figures)
    figs.mkdir(parents=True, exist_ok=True)
    for p in plots(rows, figs, args.dataset, args.tables):
        print(p)
    print(args.doc)


if __name__ == "__main__":
    main()
