"""The small-scale reproduction of the paper's claims on one of the small protocols (the 12x12 grid of the
paper's 192 px / patch 16 shapes, MAL-T): `--protocol imagenette` (96 px, patch 8) or `cifar10` (48 px, patch 4).

Rows: MAL (pretraining + fine-tuning) against supervised training at the same labelled epochs
(`supervised_ft_*`) and at the same total epochs (`supervised_*`); the Tables 4/9 baselines (MAE-ViL, MAE-ViT,
MAL-ViT, supervised ViT-T: `table4_*`); the ablations of Tables 5, 6, 7, 12, 13 (every variant fine-tuned with
the same architecture). Each experiment appends one row to OUT/results.jsonl and OUT/results.csv with its
held-out and val numbers, GPU minutes and the exact commands. Several experiments may share a GPU
(--parallel), spread over the GPUs named by --gpus; finished stages are skipped, killed ones resumed.

    python experiments/sweep.py --protocol imagenette --data data/imagenette-96 --out runs/in --holdout 0.1 \
        --parallel 3 --pre-epochs 100 --ft-epochs 50 --seeds 0,1,2 --only '^(default|supervised)'
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Experiment:
    name: str
    table: str                      # which paper table the row belongs to
    setting: str                    # the value of the ablated variable
    pretrain: list[str] | None = None   # overrides of the pretraining config; None = supervised
    finetune: list[str] = field(default_factory=list)
    seed: int = 0
    model: str = ""                 # "" = MAL-ViL's configs; "mae_vil", "mae_vit", "mal_vit" or "vit" (supervised):
                                    # the baselines' configs (<protocol>_<model> and its ViT fine-tuning)
    labelled_only: bool = False     # supervised: as many epochs as the fine-tuning (not pretraining + fine-tuning)
    probe_only: bool = False        # pretraining only (no fine-tuning stage)
    pretrained_by: str = ""         # fine-tune the pretraining of this other experiment (same overrides and seed)

    def configs(self, protocol: str) -> dict[str, str]:
        """The config of each stage (the name of a config shipped with MAL): supervised, or pretrain and finetune."""
        vit = "_vit" if self.model.endswith("vit") else ""
        if self.pretrain is None:
            return {"supervised": f"{protocol}_supervised{vit}"}
        return {"pretrain": f"{protocol}_{self.model}" if self.model else f"{protocol}_pretrain",
                "finetune": f"{protocol}_finetune{vit}"}


def ablation_variants() -> list[tuple[str, str, str, list[str]]]:
    """(name, table, setting, pretraining overrides) of every ablation row but the default one. Every variant is
    fine-tuned with the same architecture (the <protocol>_finetune config: alternating, k=4, bidirectional): only
    the pretraining differs."""
    rows = [(f"table6_k{k}", "table6", f"k={k}", [f"model.cluster_size={k}"]) for k in (1, 2, 3, 6)]  # k=4: default
    rows += [(f"table7_{o}", "table7", o, [f"model.scan_order={o}"])
             for o in ("row_fwd", "col_fwd", "row_bwd", "col_bwd", "random")]
    for unit in ("pixel", "patch", "cluster"):
        for ratio in (0.0, 0.1, 0.2, 0.5):
            if (unit == "cluster" and ratio == 0.2) or (ratio == 0.0 and unit != "cluster"):
                continue                          # the default row; ratio 0 is the same run for every unit
            rows.append((f"table5_{unit}_{int(ratio * 100)}", "table5", f"{unit} {int(ratio * 100)}%",
                         [f"objective.mask.unit={unit}", f"objective.mask.ratio={ratio}"]))
    rows.append(("table12_d4", "table12", "depth 4, width 512", ["objective.decoder.depth=4"]))
    rows += [(f"table12_w{w}", "table12", f"depth 8, width {w}", [f"objective.decoder.dim={w}"])
             for w in (384, 1024)]                # 16 heads at every width, as the default 512
    rows.append(("table13_xlstm", "table13", "xLSTM decoder", ["objective.decoder.kind=xlstm",
                                                               "objective.decoder.depth=2"]))
    return rows


def experiments(seeds: list[int], ablation_seeds: tuple[int, ...] = (0,)) -> list[Experiment]:
    exps: list[Experiment] = []
    for s in seeds:   # rows 1-2 with several seeds
        exps.append(Experiment(f"supervised_s{s}", "baseline", "supervised", None, seed=s))
        exps.append(Experiment(f"supervised_ft_s{s}", "baseline", "supervised, labelled epochs", None, seed=s,
                               labelled_only=True))
        exps.append(Experiment(f"default_s{s}", "baseline", "MAL default", [], seed=s))
    for s in ablation_seeds:                     # seed 0 keeps the unsuffixed name of the first runs
        exps += [Experiment(name + (f"_s{s}" if s else ""), table, setting, pre, seed=s)
                 for name, table, setting, pre in ablation_variants()]
    # paper Tables 4 / 9: MAE vs MAL on ViL and ViT, and the supervised ViT (MAL-ViL and supervised ViL: rows 1-2)
    for s in seeds:
        exps.append(Experiment(f"table4_mae_vil_s{s}", "table4", "MAE-ViL", [], seed=s, model="mae_vil"))
        exps.append(Experiment(f"table4_mae_vit_s{s}", "table4", "MAE-ViT", [], seed=s, model="mae_vit"))
        exps.append(Experiment(f"table4_mal_vit_s{s}", "table4", "MAL-ViT", [], seed=s, model="mal_vit"))
        exps.append(Experiment(f"table4_supervised_vit_s{s}", "table4", "supervised ViT", None, seed=s, model="vit"))
    return exps


def diagnosis() -> list[Experiment]:
    """Step 1 of the reproduction, on the held-out split: which pretraining recipe makes MAL-T learn (lr, decoder
    size, pixel targets; MAE-ViL as the positive control; the encoder at initialization as the floor), scored by the
    frozen encoder's probes (every 10 epochs) and a short fine-tune; and which layer decay the supervised baseline
    trains best with. `--recipe-from` reads the winners."""
    exps = [Experiment("diag_random", "diag", "initialization (1 step at lr 0)", ["max_steps=1"], probe_only=True)]
    variants = [(f"blr{b}", f"blr {b}", [f"optim.blr={b}"]) for b in ("1.5e-4", "5e-4", "1.5e-3", "3e-3", "6e-3")]
    variants += [("blr3e-3_bs512", "blr 3e-3, batch 512", ["optim.blr=3e-3", "optim.batch_size=512"]),
                 ("blr3e-3_warm1", "blr 3e-3, 1 warm-up epoch", ["optim.blr=3e-3", "optim.warmup_epochs=1"]),
                 ("blr3e-3_dec8x1024", "blr 3e-3, decoder 8x1024", ["optim.blr=3e-3", "objective.decoder.dim=1024"]),
                 ("blr3e-3_400ep", "blr 3e-3, 400 epochs (probed every 50)", ["optim.blr=3e-3", "optim.epochs=400",
                                                                              "probe_every=50"])]
    variants += [("blr1.5e-3_dec4x256", "blr 1.5e-3, decoder 4x256", ["optim.blr=1.5e-3", "objective.decoder.depth=4",
                  "objective.decoder.dim=256", "objective.decoder.num_heads=8"]),
                 ("blr1.5e-3_rawpix", "blr 1.5e-3, raw pixel targets", ["optim.blr=1.5e-3",
                                                                        "objective.norm_pix_loss=false"])]
    exps += [Experiment(f"diag_{name}", "diag", setting, ov) for name, setting, ov in variants]
    exps.append(Experiment("diag_mae_vil_blr1.5e-3", "diag", "MAE-ViL, blr 1.5e-3", ["optim.blr=1.5e-3"],
                           model="mae_vil"))
    for ld in ("0.75", "1.0"):
        exps.append(Experiment(f"diag_supervised_ld{ld}", "diag", f"supervised, layer decay {ld}", None,
                               [f"optim.layer_decay={ld}"], labelled_only=True))
    return exps


LIGHT_AUG = ["aug.mixup=0", "aug.cutmix=0", "aug.auto_augment=", "aug.reprob=0"]   # crop and flip only
LIGHT_MAL = [*LIGHT_AUG, "optim.layer_decay=1.0"]   # the light pair's chosen MAL fine-tune (imagenette_finetune_short)


def finetune_diagnosis(seeds: list[int]) -> list[Experiment]:
    """Why a fine-tune ends below its own encoder's linear probe (held-out split): fine-tuning recipes of one
    pretraining (`default_s*`'s, shared, not re-run) and the same augmentation changes for the supervised baseline
    at the same labelled epochs."""
    variants = [("ld0.9", "layer decay 0.9", ["optim.layer_decay=0.9"]),
                ("ld1.0", "layer decay 1.0", ["optim.layer_decay=1.0"]),
                ("blr1e-3", "blr 1e-3", ["optim.blr=1e-3"]),
                ("blr2.5e-4", "blr 2.5e-4", ["optim.blr=2.5e-4"]),
                ("dp0", "drop path 0", ["model.drop_path_rate=0"]),
                ("nomix", "no mixup / cutmix", ["aug.mixup=0", "aug.cutmix=0"]),
                ("light", "no mixup / cutmix / RandAugment / erasing", LIGHT_AUG),
                ("causal", "causal layers, as pretrained (bidirectional false)", ["model.bidirectional=false"]),
                ("avgpool", "mean-pooled head, as the probe reads", ["model.global_pool=avg"]),
                ("ep30", "30 labelled epochs instead of 15", ["optim.epochs=30"])]
    exps = []
    for s in seeds:
        exps += [Experiment(f"ftdiag_{name}_s{s}", "ftdiag", setting, [], ov, seed=s, pretrained_by=f"default_s{s}")
                 for name, setting, ov in variants]
        exps += [Experiment(f"ftdiag_supervised_{name}_s{s}", "ftdiag", f"supervised, {setting}", None, ov, seed=s,
                            labelled_only=True)
                 for name, setting, ov in variants if name in ("nomix", "light", "causal", "avgpool", "ep30")]
    return exps


def light_recipe(seeds: list[int]) -> list[Experiment]:
    """The headline pair with the fine-tuning diagnosis's winner, light augmentation (crop and flip only): MAL with
    the layer decays its fine-tune was short of, the supervised arm given the same chance (with a mean-pooled head
    at the labelled epochs, and at the total epochs). Each arm's recipe is then chosen on the held-out split among
    these and the headline's heavy-augmentation runs. MAL fine-tunes default_s*'s pretraining (shared); the positive
    control, MAE-ViL, fine-tunes table4_mae_vil_s*'s with MAL's chosen recipe (layer decay 1.0), and so does MAE-ViT
    (table4_mae_vit_s*'s), beside a supervised ViT-T for the total epochs (Table 4's arms with light fine-tuning)."""
    mal = [("light", "MAL, light fine-tuning", []),
           ("light_ld0.9", "MAL, light fine-tuning, layer decay 0.9", ["optim.layer_decay=0.9"]),
           ("light_ld1.0", "MAL, light fine-tuning, layer decay 1.0", ["optim.layer_decay=1.0"])]
    exps = []
    for s in seeds:
        exps += [Experiment(f"{name}_s{s}", "light", setting, [], LIGHT_AUG + ov, seed=s, pretrained_by=f"default_s{s}")
                 for name, setting, ov in mal]
        exps += [Experiment(f"supervised_ft_light_s{s}", "light", "supervised, light, labelled epochs", None,
                            LIGHT_AUG, seed=s, labelled_only=True),
                 Experiment(f"supervised_ft_light_avgpool_s{s}", "light",
                            "supervised, light, mean-pooled head, labelled epochs", None,
                            LIGHT_AUG + ["model.global_pool=avg"], seed=s, labelled_only=True),
                 Experiment(f"supervised_light_s{s}", "light", "supervised, light", None, LIGHT_AUG, seed=s),
                 Experiment(f"mae_vil_light_s{s}", "light", "MAE-ViL, light fine-tuning, layer decay 1.0", [],
                            LIGHT_MAL, seed=s, model="mae_vil",
                            pretrained_by=f"table4_mae_vil_s{s}"),
                 Experiment(f"mae_vit_light_s{s}", "light", "MAE-ViT, light fine-tuning, layer decay 1.0", [],
                            LIGHT_MAL, seed=s, model="mae_vit",
                            pretrained_by=f"table4_mae_vit_s{s}"),
                 Experiment(f"vit_supervised_light_s{s}", "light", "ViT-T supervised, light", None, LIGHT_AUG, seed=s,
                            model="vit")]
    return exps


def objective_light(seeds: list[int]) -> list[Experiment]:
    """The objective variants that fine-tuned best in the ablations (single patches, 2x2 clusters, masking 20 % of
    single patches), each with its own 30-epoch pretraining and the light pair's MAL fine-tune: rows of the light
    pair's MAL group, so MAL's recipe is chosen on the held-out split among them and light_ld1.0_s*."""
    variants = [("k1", "k=1", ["model.cluster_size=1"]), ("k2", "k=2", ["model.cluster_size=2"]),
                ("patch20", "masking 20 % of single patches", ["objective.mask.unit=patch",
                                                               "objective.mask.ratio=0.2"])]
    return [Experiment(f"light_{name}_s{s}", "light", f"MAL {setting}, light fine-tuning, layer decay 1.0", pre,
                       LIGHT_MAL, seed=s) for s in seeds for name, setting, pre in variants]


def low_label(seeds: list[int]) -> list[Experiment]:
    """MAL against supervised training when labels are scarce: 10 % of each class's labels (data.label_fraction),
    100 labelled epochs (the steps of 10 epochs on every label), evaluated every 10; the fine-tune starts from
    default_s*'s pretraining (shared, not re-run). Twice: with the headline's heavy augmentation, and with each
    arm's recipe chosen in the light pair (MAL: crop and flip, layer decay 1.0; supervised: crop and flip, a
    mean-pooled head)."""
    ov = ["data.label_fraction=0.1", "optim.epochs=100", "eval_every=10"]
    recipes = [("", "", [], [], []),                                        # (tag, setting, both, MAL, supervised)
               ("_light", ", light recipes", LIGHT_AUG, ["optim.layer_decay=1.0"], ["model.global_pool=avg"])]
    exps = []
    for s in seeds:
        for tag, setting, aug, mal, sup in recipes:
            exps.append(Experiment(f"lowlabel10{tag}_s{s}", "lowlabel", f"MAL, 10 % of the labels{setting}", [],
                                   ov + aug + mal, seed=s, pretrained_by=f"default_s{s}"))
            exps.append(Experiment(f"lowlabel10{tag}_supervised_s{s}", "lowlabel",
                                   f"supervised, 10 % of the labels{setting}", None, ov + aug + sup, seed=s,
                                   labelled_only=True))
    return exps


def budget_split(seeds: list[int], pre_epochs: int, ft_epochs: int) -> list[Experiment]:
    """Equal total epochs split differently: MAL pretrained for a third and for two thirds of --pre-epochs and
    fine-tuned (crop and flip, layer decay 1.0) for the rest of the total, beside the light pair's arm at the full
    split (light_ld1.0_s*), against its supervised run of the total epochs (supervised_light_s*)."""
    total, exps = pre_epochs + ft_epochs, []
    for s in seeds:
        for pre in (pre_epochs // 3, 2 * pre_epochs // 3):                 # 10 and 20 of 30 + 15
            exps.append(Experiment(f"split{pre}_s{s}", "split", f"MAL, {pre} + {total - pre} epochs, light, layer "
                                   "decay 1.0", [f"optim.epochs={pre}"],
                                   LIGHT_MAL + [f"optim.epochs={total - pre}"], seed=s))
    return exps


def data_scale(seeds: list[int], pre_epochs: int, pre_warmup: float) -> list[Experiment]:
    """Does more unlabelled data make a better encoder at the same pretraining compute? MAL pretrained on a quarter
    and on half of each class's training images (data.pretrain_fraction) for 4x and 2x --pre-epochs, and 4x and 2x
    pre_warmup (the same optimizer steps and schedule), fine-tuned on every label with the light pair's MAL recipe;
    the light pair's light_ld1.0_s* is the full-data row."""
    exps = []
    for s in seeds:
        for frac in (0.25, 0.5):
            pct = round(100 * frac)
            exps.append(Experiment(f"scale{pct}_s{s}", "scale", f"MAL, {pct} % of the images, same steps",
                                   [f"data.pretrain_fraction={frac}", f"optim.epochs={round(pre_epochs / frac)}",
                                    f"optim.warmup_epochs={pre_warmup / frac:g}"],
                                   LIGHT_MAL, seed=s))
    return exps


def chosen_recipe(results: Path) -> tuple[list[str], list[str]]:
    """The diagnosis's winners on the held-out split (from a sweep's results.jsonl): the MAL-ViL pretraining overrides
    whose short fine-tune scores best (the linear probe where no fine-tune ran; rows with their own schedule left
    out), and the supervised overrides with the best top-1."""
    rows = [json.loads(line) for line in open(results)]
    mal = [r for r in rows if r["name"].startswith("diag_blr") and (r.get("holdout_top1") or r.get("holdout_linprobe"))
           is not None and not any(o.startswith("optim.epochs=") for o in r["recipe"]["pretrain"])]  # equal epochs
    sup = [r for r in rows if r["name"].startswith("diag_supervised") and r.get("holdout_top1") is not None]
    if not (mal and sup):
        sys.exit(f"{results} has no finished diagnosis rows (diag_blr*, diag_supervised*): run --only '^diag_' first")
    key = "holdout_top1" if all(r.get("holdout_top1") is not None for r in mal) else "holdout_linprobe"
    best_mal = max(mal, key=lambda r: r[key])
    best_sup = max(sup, key=lambda r: r["holdout_top1"])
    print(f"recipe from {results}: pretraining {best_mal['name']} (held-out {key} {best_mal[key]:.2f}), "
          f"supervised {best_sup['name']} (held-out top-1 {best_sup['holdout_top1']:.2f})", flush=True)
    return best_mal["recipe"]["pretrain"], best_sup["recipe"]["labelled"]


class StageFailed(Exception):
    """A stage of an experiment failed (its own, or a pretraining it shares), or a finished one differs."""


def stage_env(gpu: str | None, threads: int) -> dict[str, str]:
    """A stage's environment: its GPU, and its share of the host's cores for torch's own CPU threads (the loader
    workers use one each), unless OMP_NUM_THREADS is set already. Without it every run starts one thread per core
    and several runs at once fight over the cores."""
    env = {**os.environ, **({} if gpu is None else {"CUDA_VISIBLE_DEVICES": gpu})}
    env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    return env


def cpu_warning(parallel: int, workers: int, cores: int) -> str | None:
    """A warning when the runs' processes (each run: itself and its loader workers) outnumber the host's cores."""
    procs = parallel * (1 + workers)
    if procs <= cores:
        return None
    return (f"warning: --parallel {parallel} x (1 + --workers {workers}) = {procs} processes on {cores} cores: the "
            f"runs will wait for the CPU and leave the GPUs idle; lower --parallel or --workers")


def run_stage(cmd: list[str], log: Path, gpu: str | None, threads: int) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = stage_env(gpu, threads)
    with open(log, "a") as fh:
        fh.write("$ " + shlex.join(cmd) + (f"  # on GPU {gpu}" if gpu is not None else "") + "\n")
        fh.flush()
        res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if res.returncode:
        raise StageFailed(f"`mal {shlex.join(cmd[3:8])}` exited with {res.returncode}; see {log}")


def stage_cmd(task: str, cfg: str, out: Path, overrides: list[str], resume: bool) -> list[str]:
    return [sys.executable, "-m", "mal", task, "--config", cfg, "--output", str(out), "--no-progress",
            *(["--resume"] if resume else []), *overrides]


def plan_stages(exp: Experiment, args) -> list[tuple[str, str, Path, list[str]]]:
    """The stages of one experiment: (task, config, output folder, overrides) each, in the order they run."""
    base = Path(args.out) / exp.name
    pre_base = Path(args.out) / (exp.pretrained_by or exp.name)           # where the pretraining stage lives
    common = [f"data.dataset={args.data}", f"seed={exp.seed}", f"data.num_workers={args.workers}",
              f"data.holdout={args.holdout}", *args.set]
    cfgs = exp.configs(args.protocol)
    vil = not exp.model.endswith("vit")
    if exp.pretrain is None:
        epochs = args.ft_epochs if exp.labelled_only else args.pre_epochs + args.ft_epochs
        recipe = args.supervised_recipe if vil and not exp.name.startswith("diag_") else []
        stages = [("supervised", cfgs["supervised"], base / "supervised",
                   [*common, f"optim.epochs={epochs}", *recipe, *exp.finetune])]
    else:
        recipe = args.pretrain_recipe if exp.model == "" and not exp.name.startswith("diag_") else []
        stages = [("pretrain", cfgs["pretrain"], pre_base / "pretrain",
                   [*common, f"optim.epochs={args.pre_epochs}", *recipe,
                    *(["probe_every=10"] if exp.table == "diag" else []), *exp.pretrain])]
        if not exp.probe_only:
            stages.append(("finetune", cfgs["finetune"], base / "finetune",
                           [*common, f"optim.epochs={args.ft_epochs}", f"init={pre_base / 'pretrain/ckpt_last'}",
                            *exp.finetune]))
    return [(task, cfg, out, last_wins(overrides)) for task, cfg, out, overrides in stages]


def last_wins(overrides: list[str]) -> list[str]:
    """The overrides with each key once, at its last setting (an experiment's own epochs replace the sweep's), so
    that no recorded command carries a setting that does nothing."""
    keys = [override_key(o) for o in overrides]
    last = {k: i for i, k in enumerate(keys)}
    return [o for i, (o, k) in enumerate(zip(overrides, keys)) if last[k] == i]


def override_key(override: str) -> str:
    """The key of a `key=value` override, as mal.config.apply_overrides reads it."""
    return override.split("=", 1)[0].strip()


def override_value(overrides: list[str], key: str) -> str | None:
    """The value the last `key=value` of the overrides sets, else None."""
    values = [o.split("=", 1)[1].strip() for o in overrides if "=" in o and override_key(o) == key]
    return values[-1] if values else None


def command_line(task: str, cfg: str, out: Path, overrides: list[str]) -> str:
    """A stage's command as results rows and --dry-run name it."""
    return shlex.join(["mal", *stage_cmd(task, cfg, out, overrides, False)[3:]])


def execute(exp: Experiment, args, gpus: queue.Queue) -> dict:
    """Run (or resume, or skip if done) the stages of one experiment on a free GPU slot; return its results row."""
    stages = plan_stages(exp, args)
    summaries = {}
    for task, cfg, out, overrides in stages:
        with stage_lock(out):                                   # a shared pretraining runs once
            if (out / "summary.json").exists():
                check_finished(out, cfg, overrides)
            else:
                resume = (out / "ckpt_last/meta.json").exists()     # killed before its first checkpoint: start over
                gpu = gpus.get()
                try:
                    run_stage(stage_cmd(task, cfg, out, overrides, resume) + ([] if resume else ["--overwrite"]),
                              out.parent / "log.txt", gpu, (os.cpu_count() or 1) // args.parallel)
                finally:
                    gpus.put(gpu)
        summaries[task] = json.loads((out / "summary.json").read_text())
    return result_row(exp, summaries, stages)


def check_finished(out: Path, cfg: str, overrides: list[str]) -> None:
    """A finished stage is reused only if its config.yaml is the recipe asked for now: a sweep re-run into the same
    --out with other settings, or experiments sharing a pretraining, would otherwise mix recipes silently. A stage
    without config.yaml (a summary copied in by hand) is taken as it is."""
    import yaml

    from mal.config import load_run_config, to_dict
    from mal.engine.trainer import recipe_changes
    saved = out / "config.yaml"
    if not saved.exists():
        return
    changes = recipe_changes(yaml.safe_load(saved.read_text()), to_dict(load_run_config(cfg, overrides)))
    if changes:
        raise StageFailed(f"{out} finished with another recipe than this sweep asks for ({'; '.join(changes)}); "
                             f"write to another --out, or delete {out} to run it again")


_LOCKS: defaultdict[Path, threading.Lock] = defaultdict(threading.Lock)
_LOCKS_GUARD = threading.Lock()


def stage_lock(out: Path) -> threading.Lock:
    """One lock per stage folder: experiments sharing a stage wait for the one that runs it."""
    with _LOCKS_GUARD:
        return _LOCKS[out.resolve()]


def result_row(exp: Experiment, summaries: dict[str, dict], stages: list) -> dict:
    """One results row: the val folder's numbers (scored once, at the end), the held-out split's (every recipe
    choice), the probes, the GPU minutes of every stage and the commands."""
    pre, last = summaries.get("pretrain", {}), summaries[stages[-1][0]]
    own = {t: v for t, v in summaries.items() if not (t == "pretrain" and exp.pretrained_by)}   # stages it ran
    return {"name": exp.name, "table": exp.table, "setting": exp.setting, "seed": exp.seed,
            "recipe": {"pretrain": exp.pretrain, "labelled": exp.finetune},   # the experiment's own overrides
            "pretrain_loss": pre.get("final_loss"), "knn": pre.get("knn_top1"), "linprobe": pre.get("linprobe_top1"),
            "holdout_knn": pre.get("holdout_knn_top1"), "holdout_linprobe": pre.get("holdout_linprobe_top1"),
            "top1": last.get("val_top1"), "top5": last.get("val_top5"), "ema_top1": last.get("val_ema_top1"),
            "holdout_top1": last.get("holdout_top1"), "holdout_ema_top1": last.get("holdout_ema_top1"),
            "train_s": round(sum(v.get("train_time_s", 0) for v in own.values()), 1),
            "gpu_min": round(sum(v.get("train_time_s", 0) for v in own.values()) / 60, 2),
            "commands": [command_line(*stage) for stage in stages]}


def schedule(exps: list[Experiment], first: str, out: Path) -> list[Experiment]:
    """The start order: experiments matching `first` at the front (the slow ones, so that a deadline cuts the cheap
    ones); experiments that fine-tune another's pretraining not finished yet at the back, so that waiting for it
    holds no slot while independent runs could use it. Where the pretraining's own experiment is not among them,
    the first experiment sharing it runs it and does not wait. Stable: the rest keep their order."""
    names, runs_it, waits = {e.name for e in exps}, set(), set()
    for e in exps:
        if not e.pretrained_by or (out / e.pretrained_by / "pretrain/summary.json").exists():
            continue
        if e.pretrained_by in names or e.pretrained_by in runs_it:
            waits.add(e.name)
        else:
            runs_it.add(e.pretrained_by)
    return sorted(exps, key=lambda e: (e.name in waits, not (first and re.search(first, e.name))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", default="cifar10", choices=["cifar10", "imagenette"],
                    help="which shipped configs: <protocol>_pretrain, <protocol>_finetune, ...")
    ap.add_argument("--data", default="data/cifar10")
    ap.add_argument("--holdout", type=float, default=0.0,
                    help="data.holdout of every run: a fraction of each class of the training split for recipe choices")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--parallel", type=int, default=1, help="experiments running at once (over all GPUs)")
    ap.add_argument("--gpus", default="", help="comma-separated GPU ids to spread the runs over (default: as visible)")
    ap.add_argument("--workers", type=int, default=4, help="data loader workers per run")
    ap.add_argument("--pre-epochs", type=int, default=30)
    ap.add_argument("--ft-epochs", type=int, default=30)
    ap.add_argument("--seeds", default="0,1", help="seeds of the headline's arms (default, supervised, Table 4)")
    ap.add_argument("--ablation-seeds", default="0", help="seeds of the ablation variants (seed 0 is named "
                                                          "table6_k1, seed 1 table6_k1_s1, ...)")
    ap.add_argument("--only", default="", help="regex on experiment names")
    ap.add_argument("--first", default="", help="regex: these experiments start first (e.g. the slowest, so that a "
                                                 "deadline cuts the cheap ones)")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every run (smoke tests)")
    ap.add_argument("--recipe-from", default="", metavar="RESULTS",
                    help="a diagnosis sweep's results.jsonl: its best held-out pretraining recipe goes into every "
                         "MAL-ViL pretraining, its best supervised recipe into every supervised ViL run")
    ap.add_argument("--list", action="store_true", help="print the experiments and exit")
    ap.add_argument("--dry-run", action="store_true", help="print each experiment's stage commands and exit")
    args = ap.parse_args()
    args.pretrain_recipe, args.supervised_recipe = [], []
    if args.recipe_from:
        args.pretrain_recipe, args.supervised_recipe = chosen_recipe(Path(args.recipe_from))
    seeds = [int(s) for s in args.seeds.split(",")]
    ablation_seeds = tuple(int(s) for s in args.ablation_seeds.split(","))
    from mal.config import load_run_config
    pre_warmup = float(override_value(args.set, "optim.warmup_epochs")
                       or load_run_config(f"{args.protocol}_pretrain").optim.warmup_epochs)
    families = experiments(seeds, ablation_seeds) + diagnosis() + finetune_diagnosis(seeds) + light_recipe(seeds) \
        + objective_light(seeds) + low_label(seeds) + budget_split(seeds, args.pre_epochs, args.ft_epochs) \
        + data_scale(seeds, args.pre_epochs, pre_warmup)
    exps = [e for e in families if re.search(args.only, e.name)]
    exps = schedule(exps, args.first, Path(args.out))
    if args.list:
        for e in exps:
            print(f"{e.name:24s} {e.table:9s} {e.setting}")
        return
    if args.dry_run:
        for e in exps:
            print(e.name, *(f"  {command_line(*stage)}" for stage in plan_stages(e, args)), sep="\n")
        return
    failed = run_all(exps, args)
    if failed:
        sys.exit(f"{len(failed)} experiment(s) failed: {', '.join(failed)}")


def run_all(exps: list[Experiment], args) -> list[str]:
    """Run the experiments, --parallel at a time over the GPU slots; append each finished row to results.jsonl
    and rewrite results.csv from all rows. Returns the names of the experiments that failed."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if warning := cpu_warning(args.parallel, args.workers, os.cpu_count() or 1):
        print(warning, file=sys.stderr, flush=True)
    gpus: queue.Queue = queue.Queue()       # one token per slot, round-robin over the GPUs
    ids = [g for g in args.gpus.split(",") if g] or [None]
    for i in range(args.parallel):
        gpus.put(ids[i % len(ids)])
    failed = []
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {pool.submit(execute, e, args, gpus): e for e in exps}
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except StageFailed as err:                        # keep the other experiments going
                failed.append(futures[fut].name)
                print(f"FAILED {futures[fut].name}: {err}", file=sys.stderr, flush=True)
                continue
            print(json.dumps(row), flush=True)
            with open(out / "results.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
    done = out / "results.jsonl"
    rows = [json.loads(line) for line in open(done)] if done.exists() else []      # none yet if every one failed
    keys = ["name", "table", "setting", "seed", "pretrain_loss", "knn", "linprobe", "holdout_knn", "holdout_linprobe",
            "top1", "ema_top1", "top5", "holdout_top1", "holdout_ema_top1", "gpu_min"]
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return failed


if __name__ == "__main__":
    main()
