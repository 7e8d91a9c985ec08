"""The CIFAR-10 sweep runner and the results generator, end to end on a tiny model (CPU)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.dim=32", "model.depth=2", "objective.decoder.depth=1", "objective.decoder.dim=32",
        "objective.decoder.num_heads=4", "data.cache=false", "optim.batch_size=32", "optim.warmup_epochs=0.5",
        "log_every=1"]


def _sweep(data, out, *extra):
    cmd = [sys.executable, "experiments/sweep.py", "--data", str(data), "--out", str(out), "--workers", "0",
           "--pre-epochs", "1", "--ft-epochs", "1", "--only", "^(supervised|default)_s0$", *extra, "--set", *TINY]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


def _sweep_in_process(capsys, monkeypatch, *argv) -> str:
    """sweep.py's main() in this process (no interpreter start-up) with `argv`; returns what it printed."""
    sys.path.insert(0, str(REPO / "experiments"))
    import sweep
    monkeypatch.setattr(sys, "argv", ["sweep.py", *argv])
    capsys.readouterr()
    sweep.main()
    return capsys.readouterr().out


def test_sweep_rows_resume_and_tables(image_folder, tmp_path):
    out = tmp_path / "sweep"
    res = _sweep(image_folder, out)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["supervised_s0", "default_s0"]
    sup, mal = rows
    assert sup["knn"] is None and len(sup["commands"]) == 1 and "optim.epochs=2" in sup["commands"][0]
    assert 0 <= mal["knn"] <= 100 and 0 <= mal["linprobe"] <= 100 and 0 <= mal["top1"] <= 100
    assert mal["commands"][1].startswith("mal finetune") and "init=" in mal["commands"][1]
    assert (out / "default_s0/pretrain/ckpt_last/meta.json").exists()
    assert (out / "results.csv").read_text().count("\n") == 3

    # a fine-tuning killed before its first checkpoint leaves a folder without one: the re-run starts it over,
    # finished stages are skipped (the pretraining is not re-run), and the row is written again
    ft = out / "default_s0/finetune"
    for f in ft.iterdir():
        if f.is_dir():
            subprocess.run(["rm", "-rf", str(f)], check=True)
        else:
            f.unlink()
    (ft / "partial.txt").write_text("killed")
    pre_mtime = (out / "default_s0/pretrain/summary.json").stat().st_mtime
    res = _sweep(image_folder, out, "--gpus", "3")
    assert res.returncode == 0, res.stdout + res.stderr
    placed = [ln for ln in (out / "default_s0/log.txt").read_text().splitlines() if ln.endswith("# on GPU 3")]
    assert len(placed) == 1 and placed[0].startswith("$ ") and " finetune " in placed[0]   # only the re-run stage
    assert (ft / "summary.json").exists() and not (ft / "partial.txt").exists()
    assert (out / "default_s0/pretrain/summary.json").stat().st_mtime == pre_mtime
    assert len((out / "results.jsonl").read_text().splitlines()) == 4

    doc = tmp_path / "results.md"
    doc.write_text("# head\n<!-- tables:begin (experiments/make_results.py) -->\nOLD-TABLES\n<!-- tables:end -->\ntail\n")
    res = subprocess.run([sys.executable, "experiments/make_results.py", "--results", str(out / "results.jsonl"),
                          "--doc", str(doc), "--figures", str(tmp_path / "fig")], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    text = doc.read_text()
    assert text.startswith("# head") and text.rstrip().endswith("tail") and "OLD-TABLES" not in text
    assert text.count("| supervised |") == 1 and text.count("| MAL default |") == 1   # re-run rows not doubled
    assert f"{sup['top1']:.2f}" in text and "84.3" in text                            # ours next to the paper's
    figures = {p.name for p in (tmp_path / "fig").iterdir()}
    assert figures >= {"results_pretrain_loss.png", "results_val_curves.png"}
    assert "results_cluster_size.png" not in figures                    # one cluster size: nothing to plot

    # the same --out with another schedule: the finished stages are not reused, and the sweep says why
    res = _sweep(image_folder, out, "--pre-epochs", "2")
    assert res.returncode != 0
    assert "default_s0/pretrain finished with another recipe" in res.stderr and "optim.epochs: 1 -> 2" in res.stderr
    assert len((out / "results.jsonl").read_text().splitlines()) == 4


def test_ablations_fine_tune_one_fixed_architecture():
    """Cluster-size and scan-order ablations change only the pretraining: fine-tuning keeps the default
    architecture of the cifar10_finetune config (alternating, k=4, bidirectional)."""
    sys.path.insert(0, str(REPO / "experiments"))
    from sweep import experiments
    exps = experiments([0])
    ablations = [e for e in exps if e.table in ("table6", "table7")]
    assert len(ablations) == 9
    for e in ablations:
        assert e.pretrain and not e.finetune, e.name
        assert not any(o.startswith("model.") for o in e.finetune)


def test_ablation_seeds_repeat_every_variant_under_a_suffixed_name():
    """--ablation-seeds 0,1: seed 0 keeps the committed names (table6_k1), seed 1 adds table6_k1_s1 with the same
    pretraining overrides and seed 1, so make_results pools both into one row of the table."""
    sys.path.insert(0, str(REPO / "experiments"))
    from sweep import experiments
    one = {e.name: e for e in experiments([0]) if e.table.startswith("table") and e.table != "table4"}
    two = {e.name: e for e in experiments([0], (0, 1)) if e.table.startswith("table") and e.table != "table4"}
    assert len(one) == 22 and len(two) == 44 and set(one) < set(two)
    k1, k1_s1 = two["table6_k1"], two["table6_k1_s1"]
    assert (k1.seed, k1_s1.seed) == (0, 1)
    assert k1_s1.pretrain == k1.pretrain == ["model.cluster_size=1"] and k1_s1.setting == k1.setting == "k=1"


def test_paired_difference_matches_a_hand_computation():
    sys.path.insert(0, str(REPO / "experiments"))
    from make_results import paired_difference
    rows = [{"table": "baseline", "setting": s, "seed": seed, "top1": v}
            for s, vals in (("MAL default", (70.0, 72.0, 71.0)), ("supervised", (68.0, 71.0, 68.0)))
            for seed, v in enumerate(vals)]
    res = paired_difference(rows, "MAL default", "supervised")
    # differences 2, 1, 3: mean 2, sample std 1, half-width t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.732 = 2.484
    assert res["diffs"] == [2.0, 1.0, 3.0] and res["mean"] == 2.0
    assert abs(res["ci"][0] - (2 - 2.4843)) < 1e-3 and abs(res["ci"][1] - (2 + 2.4843)) < 1e-3
    assert paired_difference(rows[:1] + rows[3:4], "MAL default", "supervised")["ci"] is None   # one seed
    assert paired_difference(rows, "MAL default", "nobody") is None
    # across tables: an ablation variant against a headline arm, seeds 0 and 2 only (seed 1 did not run)
    rows += [{"table": "table6", "setting": "k=1", "seed": seed, "top1": v} for seed, v in ((0, 73.0), (2, 75.0))]
    res = paired_difference(rows, ("table6", "k=1"), ("baseline", "supervised"))
    assert res["seeds"] == [0, 2] and res["diffs"] == [5.0, 7.0] and res["mean"] == 6.0
    assert paired_difference(rows, "k=1", "supervised") is None          # plain names are settings of one table


def test_diagnosis_picks_the_recipe_on_the_held_out_split(image_folder, tmp_path, capsys, monkeypatch):
    """The diagnosis rows are probed and fine-tuned on the held-out part; --recipe-from takes the pretraining
    overrides with the best held-out fine-tune and the supervised ones with the best held-out top-1 into later runs."""
    diag = tmp_path / "diag"
    res = _sweep(image_folder, diag, "--holdout", "0.25", "--only", "^diag_(blr1.5e-4|blr3e-3|supervised_ld1.0)$")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {r["name"]: r for r in map(json.loads, (diag / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"diag_blr1.5e-4", "diag_blr3e-3", "diag_supervised_ld1.0"}
    for name in ("diag_blr1.5e-4", "diag_blr3e-3"):
        assert 0 <= rows[name]["holdout_linprobe"] <= 100 and 0 <= rows[name]["holdout_top1"] <= 100
        assert len(rows[name]["commands"]) == 2 and "probe_every=10" in rows[name]["commands"][0]
    assert 0 <= rows["diag_supervised_ld1.0"]["holdout_top1"] <= 100

    # a hand-made diagnosis with known winners decides the recipe of the next sweep
    made = tmp_path / "made.jsonl"
    made.write_text("".join(json.dumps({**rows[n], "holdout_linprobe": p, "holdout_top1": t}) + "\n" for n, p, t in
                            [("diag_blr1.5e-4", 60.0, 40.0), ("diag_blr3e-3", 50.0, 45.0),
                             ("diag_supervised_ld1.0", None, 60.0)]))
    out = _sweep_in_process(capsys, monkeypatch, "--data", str(image_folder), "--out", str(tmp_path / "next"),
                            "--only", "^(supervised|default)_s0$", "--seeds", "0", "--recipe-from", str(made),
                            "--dry-run")
    assert "pretraining diag_blr3e-3" in out
    lines = out.splitlines()[1:]                    # each name, then its stages' commands, as results rows name them
    assert lines[0] == "supervised_s0" and lines[2] == "default_s0" and len(lines) == 5
    assert lines[3].startswith("  mal pretrain ") and "optim.blr=3e-3" in lines[3]
    assert lines[4].startswith("  mal finetune ") and "optim.blr" not in lines[4]   # the fine-tuning recipe is fixed
    assert "optim.layer_decay=1.0" in lines[1] and not (tmp_path / "next").exists()   # nothing ran


def test_diagnosis_section_renders_the_committed_rows(tmp_path):
    """make_results --section diagnosis fills only its own section: one row per setting in the study's order,
    seeds pooled (mean ± std), and the probe / fine-tuning curves figure."""
    doc = tmp_path / "results.md"
    doc.write_text("# head\n<!-- tables:begin (experiments/make_results.py) -->\nKEEP\n<!-- tables:end -->\n"
                   "<!-- diagnosis:begin (experiments/make_results.py) -->\nOLD\n<!-- diagnosis:end -->\ntail\n")
    res = subprocess.run([sys.executable, "experiments/make_results.py", "--results",
                          "docs/results/imagenette_diagnosis/results.jsonl", "--doc", str(doc), "--section", "diagnosis",
                          "--figures", str(tmp_path / "fig")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    text = doc.read_text()
    assert "KEEP" in text and "OLD" not in text and text.rstrip().endswith("tail")
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "diag_" in ln]
    assert [r.split(" | ")[0][2:] for r in rows[:3]] == ["initialization (1 step at lr 0)", "blr 1.5e-4", "blr 5e-4"]
    assert "| blr 3e-3 | 0.73 | 42.77 | 55.33 | 51.21 | 49.40 |" in text
    assert "| supervised, layer decay 1.0 | – | – | – | 48.43 ± 0.76 (n=3) | 46.85 ± 0.86 (n=3) |" in text
    assert (tmp_path / "fig/diagnosis_curves.png").stat().st_size > 0


def _render_section(tmp_path, study: str, section: str, *extra) -> str:
    """make_results --section `section` from docs/results/`study` into a one-section doc; returns the doc."""
    doc = tmp_path / "results.md"
    doc.write_text(f"<!-- {section}:begin (experiments/make_results.py) -->\nOLD\n<!-- {section}:end -->\n")
    res = subprocess.run([sys.executable, "experiments/make_results.py", "--results",
                          f"docs/results/{study}/results.jsonl", "--doc", str(doc), "--section", section,
                          "--figures", str(tmp_path / "fig"), *extra], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return doc.read_text()


def test_headline_section_renders_the_committed_rows(tmp_path):
    """make_results --section headline: one row per arm with its schedule read from the commands, seeds pooled,
    the paired MAL-minus-supervised intervals, and the curves of every run against total epochs."""
    text = _render_section(tmp_path, "imagenette_headline", "headline", "--dataset", "Imagenette-96")
    arms = [ln.split(" | ")[0][2:] for ln in text.splitlines() if ln.startswith("| ") and "_s0" in ln]
    assert arms == ["MAL default", "supervised, labelled epochs", "supervised", "MAE-ViL", "MAE-ViT", "MAL-ViT",
                    "supervised ViT"]
    # MAL: val 49.40, 49.76, 50.52 (mean 49.89, sample std 0.57); 30 + 15 epochs against 45 supervised
    assert "| MAL default | MAL-T | 30 | 15 | 49.89 ± 0.57 (n=3) |" in text
    assert "| supervised | ViL-T | – | 45 | 63.01 ± 0.52 (n=3) |" in text
    assert "| MAL − supervised, labelled epochs | val top-1 | +3.04 | [+1.04, +5.04] | 3 |" in text
    assert (tmp_path / "fig/results_val_curves.png").stat().st_size > 0


def test_long_section_renders_the_400_epoch_pair_and_its_probe_curve(tmp_path):
    """make_results --section long: the 400 + 15-epoch MAL run against 415 supervised epochs, and the probe
    curve read from the pretraining metrics (probes at 100, 200, 300 epochs, the summary's at 400)."""
    text = _render_section(tmp_path, "imagenette_long", "long", "--dataset", "Imagenette-96")
    # val 70.29 (s0) and 70.57 (s1): mean 70.43, sample std 0.20; the supervised run has seed 0 only
    assert "| MAL default | MAL-T | 400 | 15 | 70.43 ± 0.20 (n=2) |" in text
    assert "| supervised | ViL-T | – | 415 | 85.81 |" in text
    assert "| MAL − supervised | val top-1 | -15.52 | – | 1 |" in text
    sys.path.insert(0, str(REPO / "experiments"))
    from make_results import read_metrics
    probes = read_metrics(REPO / "docs/results/imagenette_long/default_s0/pretrain/metrics.csv", "eval_linprobe_top1")
    assert [e for e, _ in probes] == [100.0, 200.0, 300.0]
    assert (tmp_path / "fig/results_probe_epochs.png").stat().st_size > 0


def test_ftdiag_and_lowlabel_sections_render_the_committed_rows(tmp_path):
    """make_results --tables ftdiag / lowlabel on the committed fine-tuning diagnosis: the light recipe's row
    (held-out 602 / 947 for MAL, 599 / 947 supervised; default 478 / 947, supervised 449 / 947), the fine-tuning
    curves, and the low-label pair's difference."""
    text = _render_section(tmp_path, "imagenette_ftdiag", "ftdiag", "--tables", "ftdiag", "--dataset", "Imagenette-96")
    light = next(ln for ln in text.splitlines() if ln.startswith("| no mixup / cutmix / RandAugment"))
    assert light.split(" | ")[1:6] == ["63.57", "+13.09", "63.25", "+15.84", "+0.32"]
    assert "held-out linear probe: 55.65." in text
    assert (tmp_path / "fig/results_ftdiag_curves.png").stat().st_size > 0               # the fine-tuning curves
    text = _render_section(tmp_path, "imagenette_ftdiag", "lowlabel", "--tables", "lowlabel")
    assert "| MAL, 10 % of the labels − supervised, 10 % of the labels | val top-1 | +2.65 | – | 1 |" in text


def test_table6_family_reads_k1_against_the_default_runs_only(tmp_path):
    """--tables table6 over two studies: the 400-epoch k = 1 run against both 400-epoch default seeds (the
    supervised run is left out), its same-seed difference, and the probe curves of all three runs."""
    doc = tmp_path / "results.md"
    doc.write_text("<!-- long-k:begin (experiments/make_results.py) -->\nOLD\n<!-- long-k:end -->\n")
    res = subprocess.run([sys.executable, "experiments/make_results.py", "--results",
                          "docs/results/imagenette_long/results.jsonl", "docs/results/imagenette_long_k/results.jsonl",
                          "--doc", str(doc), "--section", "long-k", "--tables", "table6", "--dataset", "Imagenette-96",
                          "--figures", str(tmp_path / "fig")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    text = doc.read_text()
    assert "supervised_s0" not in text and "#### Table 7" not in text
    # k = 1: val 71.90; default mean 70.43, same seed (s0) 70.29 -> +1.61; held-out 70.86 - 70.54 = +0.32
    assert "| k=1 | 71.90 | +1.46 | +1.61 (s0) | 70.86 |" in text
    assert "| MAL k=1 (Table 6) − MAL | held-out top-1 | +0.32 | – | 1 |" in text
    assert (tmp_path / "fig/results_probe_epochs.png").stat().st_size > 0


def test_transfer_sections_render_the_committed_runs(tmp_path):
    """make_transfer fills the segmentation and robustness sections from the committed summaries: one row per
    encoder initialization / classifier, the test split's numbers, and the mCE against the named baseline."""
    doc = tmp_path / "results.md"
    doc.write_text("".join(f"<!-- {s}:begin (experiments/make_results.py) -->\nOLD\n<!-- {s}:end -->\n"
                           for s in ("segmentation-camvid", "segmentation-kvasir", "robustness")))
    res = subprocess.run([sys.executable, "experiments/make_transfer.py", "--segmentation", "docs/results/camvid",
                          "docs/results/kvasir", "--robustness", "docs/results/robustness_imagenette",
                          "--doc", str(doc)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    text = doc.read_text()
    assert "OLD" not in text
    summary = json.loads((REPO / "docs/results/camvid/scratch/summary.json").read_text())
    assert f"| none (random) | – | {summary['eval_miou']:.2f} | {summary['val_miou']:.2f} |" in text
    kvasir = text.split("segmentation-kvasir:begin")[1]
    kv = [json.loads((REPO / f"docs/results/kvasir/mal_s{s}/summary.json").read_text()) for s in (0, 1)]
    iou, dice = (sum(k[f"val_{m}_polyp"] for k in kv) / 2 for m in ("iou", "dice"))
    polyp = next(ln for ln in kvasir.splitlines() if ln.startswith("| polyp |")).split(" | ")
    assert polyp[2] == f"{iou:.1f} / {dice:.1f}"                         # columns: class, scratch, MAL, ...
    rob = json.loads((REPO / "docs/results/robustness_imagenette/default_s1/robustness.json").read_text())
    drop = rob["clean"]["top1"] - rob["mean_corruption_top1"]
    assert f"| `default_s1` | {rob['clean']['top1']:.2f} | {rob['mean_corruption_top1']:.2f} | {drop:.2f} | " \
           f"{rob['mce']:.1f} | {rob['relative_mce']:.1f} |" in text
    assert "| `supervised_s1` |" in text and text.count("| fog |") == 1


def test_segmentation_table_pools_seeds_per_initialization(tmp_path):
    """Run folders `<init>_s<seed>` are one row per initialization, mean ± sample std over the seeds."""
    sys.path.insert(0, str(REPO / "experiments"))
    from make_transfer import segmentation_table
    for name, miou in (("mal_s0", 40.0), ("mal_s1", 42.0), ("scratch_s0", 41.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(f"init: {'runs/pre/ckpt_last' if 'mal' in name else ''}\n")
        (tmp_path / name / "summary.json").write_text(json.dumps(
            {"eval_miou": miou + 10, "val_miou": miou, "val_mdice": miou + 5, "val_acc": 90.0, "train_time_s": 60.0,
             "val_iou_polyp": miou - 1, "val_iou_background": 95.0}))
    lines = segmentation_table(tmp_path)
    rows = [ln for ln in lines if ln.startswith("| none") or ln.startswith("| MAL")]
    assert rows[0] == "| none (random) | – | 51.00 | 41.00 | 46.00 | 90.00 | 1.0 | `scratch_s0` |"
    assert rows[1].startswith("| MAL pretraining | runs/pre/ckpt_last | 51.00 ± 1.41 (n=2) | 41.00 ± 1.41 (n=2) |")
    assert rows[1].endswith("| 1.0 | `mal_s0`, `mal_s1` |")
    assert "| polyp | 40.0 | 40.0 |" in lines


def test_data_scale_warm_up_scales_the_sweeps_own_setting(tmp_path, capsys, monkeypatch):
    """--set optim.warmup_epochs is the warm-up the data-scale rows stretch (a quarter of the images: 4x), not the
    config's default; each stage's command carries the key once."""
    def pretrain_line(*extra):
        out = _sweep_in_process(capsys, monkeypatch, "--protocol", "imagenette", "--seeds", "0", "--only",
                                "^scale25_s0$", "--out", str(tmp_path), "--dry-run", *extra)
        return next(ln for ln in out.splitlines() if ln.startswith("  mal pretrain"))
    from mal.config import load_run_config
    default = load_run_config("imagenette_pretrain").optim.warmup_epochs
    assert f"optim.warmup_epochs={4 * default:g}" in pretrain_line()
    line = pretrain_line("--set", "optim.warmup_epochs=1.5")
    assert "optim.warmup_epochs=6 " in line + " " and line.count("optim.warmup_epochs") == 1


def test_sweep_first_starts_the_named_experiments_first_and_keeps_the_rest_in_order(capsys, monkeypatch):
    """--first moves the matching experiments to the front (the slow ones, so a deadline cuts cheap ones)."""
    def names(*extra):
        out = _sweep_in_process(capsys, monkeypatch, "--protocol", "imagenette", "--seeds", "0", "--only",
                                "^table(6|12)", "--list", *extra)
        return [ln.split()[0] for ln in out.splitlines()]
    plain = names()
    first = names("--first", "w1024|d4")
    assert plain[:2] == ["table6_k1", "table6_k2"] and "table12_w1024" in plain[4:]
    assert first[:2] == ["table12_d4", "table12_w1024"]
    assert first[2:] == [n for n in plain if n not in ("table12_d4", "table12_w1024")]


def test_sweep_starts_runs_waiting_for_a_shared_pretraining_last(tmp_path, capsys, monkeypatch):
    """A fine-tune of another experiment's unfinished pretraining waits for it holding a slot: such runs start after
    the independent ones, even against --first; once the pretraining is done they keep their place."""
    def names(*extra):
        out = _sweep_in_process(capsys, monkeypatch, "--protocol", "imagenette", "--seeds", "0", "--only",
                                r"^(default_s0|ftdiag_(ld1\.0|supervised_nomix|nomix)_s0)$", "--list", "--out",
                                str(tmp_path), *extra)
        return [ln.split()[0] for ln in out.splitlines()]
    order = ["default_s0", "ftdiag_supervised_nomix_s0", "ftdiag_ld1.0_s0", "ftdiag_nomix_s0"]
    assert names() == order
    assert names("--first", "nomix") == ["ftdiag_supervised_nomix_s0", "default_s0", "ftdiag_nomix_s0",
                                         "ftdiag_ld1.0_s0"]
    # without default_s0 among them, the first fine-tune of its pretraining runs it (and --first can put it first)
    assert names("--only", r"^(ftdiag_(ld1\.0|supervised_nomix|nomix)_s0)$") == [
        "ftdiag_ld1.0_s0", "ftdiag_supervised_nomix_s0", "ftdiag_nomix_s0"]
    (tmp_path / "default_s0/pretrain").mkdir(parents=True)
    (tmp_path / "default_s0/pretrain/summary.json").write_text("{}")
    assert names() == ["default_s0", "ftdiag_ld1.0_s0", "ftdiag_nomix_s0", "ftdiag_supervised_nomix_s0"]


def test_finetune_diagnosis_shares_one_pretraining(image_folder, tmp_path):
    """ftdiag rows fine-tune default_s0's pretraining: it runs once (however the two experiments are scheduled),
    every row names its commands, and a row's GPU minutes are the stages it ran itself."""
    out = tmp_path / "ft"
    res = _sweep(image_folder, out, "--only", r"^(default_s0|ftdiag_(ld1\.0|avgpool)_s0)$", "--parallel", "3")
    assert res.returncode == 0, res.stdout + res.stderr
    runs = [ln for ln in (out / "default_s0/log.txt").read_text().splitlines() if ln.startswith("$ ")]
    assert sum(" pretrain " in ln for ln in runs) == 1
    rows = {r["name"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    ft = rows["ftdiag_ld1.0_s0"]
    assert ft["commands"][0] == rows["default_s0"]["commands"][0]                     # the same pretraining
    assert f"init={out / 'default_s0/pretrain/ckpt_last'}" in ft["commands"][1] and "optim.layer_decay=1.0" in ft["commands"][1]
    assert ft["holdout_linprobe"] == rows["default_s0"]["holdout_linprobe"]
    ft_s = json.loads((out / "ftdiag_ld1.0_s0/finetune/summary.json").read_text())["train_time_s"]
    assert ft["gpu_min"] == round(ft_s / 60, 2)
    assert not (out / "ftdiag_ld1.0_s0/pretrain").exists()
    assert "model.global_pool=avg" in rows["ftdiag_avgpool_s0"]["commands"][1]       # a mean-pooled head trains
    assert 0 <= rows["ftdiag_avgpool_s0"]["top1"] <= 100


def test_finetune_diagnosis_table_sets_each_recipe_beside_its_reference():
    """The ftdiag table: the default recipe first, then each change with its effect on MAL beside the same change's
    effect on the supervised baseline, pooled over seeds; the encoder's linear probe above. Rows of seeds without a
    recipe row stay out."""
    sys.path.insert(0, str(REPO / "experiments"))
    from make_results import finetune_diagnosis_table

    def row(name, table, setting, seed, top1, **kw):
        return {"name": name, "table": table, "setting": setting, "seed": seed, "top1": top1 - 1,
                "holdout_top1": top1, "gpu_min": 1.0, **kw}
    rows = [row("default_s0", "baseline", "MAL default", 0, 50.0, holdout_linprobe=55.0),
            row("default_s1", "baseline", "MAL default", 1, 40.0, holdout_linprobe=45.0),
            row("supervised_ft_s0", "baseline", "supervised, labelled epochs", 0, 48.0),
            row("supervised_s0", "baseline", "supervised", 0, 63.0),
            row("ftdiag_nomix_s0", "ftdiag", "no mixup / cutmix", 0, 56.0),
            row("ftdiag_supervised_nomix_s0", "ftdiag", "supervised, no mixup / cutmix", 0, 55.0),
            row("ftdiag_dp0_s0", "ftdiag", "drop path 0", 0, 49.0)]
    text = "\n".join(finetune_diagnosis_table(rows))
    assert "held-out linear probe: 55.00." in text
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and "_s" in ln]
    assert lines == [
        "| none (the configs' recipe) | 50.00 | +0.00 | 48.00 | +0.00 | +2.00 | 49.00 | 47.00 | default_s0, supervised_ft_s0 |",
        "| drop path 0 | 49.00 | -1.00 | – | – | – | 48.00 | – | ftdiag_dp0_s0 |",           # the sweep's order
        "| no mixup / cutmix | 56.00 | +6.00 | 55.00 | +7.00 | +1.00 | 55.00 | 54.00 | ftdiag_nomix_s0, "
        "ftdiag_supervised_nomix_s0 |"]
    assert finetune_diagnosis_table(rows[:4]) == []


def test_data_scale_rows_keep_the_steps_and_pair_with_the_full_data_arm():
    """sweep.py's data-scale rows pretrain on a quarter / half of the images for 4x / 2x the epochs and warm-up
    (the same optimizer steps) and fine-tune with the light pair's MAL recipe; make_results pairs the full-data arm
    (light_ld1.0) with each fraction by seed."""
    sys.path.insert(0, str(REPO / "experiments"))
    from make_results import data_scale_table
    from sweep import data_scale, light_recipe
    exps = {e.name: e for e in data_scale([0, 1], 30, 5)}
    assert sorted(exps) == ["scale25_s0", "scale25_s1", "scale50_s0", "scale50_s1"]
    assert exps["scale25_s1"].pretrain == ["data.pretrain_fraction=0.25", "optim.epochs=120", "optim.warmup_epochs=20"]
    assert exps["scale50_s0"].pretrain[1:] == ["optim.epochs=60", "optim.warmup_epochs=10"]
    full = next(e for e in light_recipe([0]) if e.name == "light_ld1.0_s0")
    assert exps["scale25_s0"].finetune == full.finetune and exps["scale25_s0"].seed == 0

    def row(name, table, setting, seed, top1, pre):
        return {"name": f"{name}_s{seed}", "table": table, "setting": setting, "seed": seed, "top1": top1 + seed,
                "holdout_top1": top1 + 2 * seed, "holdout_linprobe": top1 - 5,
                "commands": [f"mal pretrain optim.epochs=30 optim.epochs={pre}", "mal finetune optim.epochs=15"]}
    rows = [row(n, t, s, seed, v, pre) for n, t, s, v, pre in (
        ("light_ld1.0", "light", "MAL, light fine-tuning, layer decay 1.0", 70, 30),
        ("scale25", "scale", "MAL, 25 % of the images, same steps", 64, 120),
        ("scale50", "scale", "MAL, 50 % of the images, same steps", 67, 60)) for seed in (0, 1)]
    text = "\n".join(data_scale_table(rows, "Imagenette-96"))
    lines = [ln for ln in text.splitlines() if ln.startswith("| MAL")]
    assert [ln.split(" | ")[1] for ln in lines[:3]] == ["120", "60", "30"]        # fewest images first
    assert "| MAL, 25 % of the images, same steps | 120 | 15 | 59.00 ± 0.00 (n=2) | 65.00 ± 1.41 (n=2) | " \
           "64.50 ± 0.71 (n=2) | scale25_s0, scale25_s1 |" in text
    assert "| MAL, light fine-tuning, layer decay 1.0 − MAL, 25 % of the images, same steps | val top-1 | +6.00 | " \
           "[+6.00, +6.00] | 2 |" in text
    assert data_scale_table(rows[:2], "x") == []                              # no scale rows: no table


def test_objective_variants_pretrain_their_own_and_join_the_light_pairs_mal_choice():
    """sweep.py's objective_light rows: each variant pretrains with its own overrides (no shared pretraining) and
    fine-tunes with the light pair's MAL recipe; in the light table they are MAL arms, so the held-out split
    chooses among them and light_ld1.0, and the chosen one is paired with supervised training."""
    sys.path.insert(0, str(REPO / "experiments"))
    from make_results import light_recipe_table
    from sweep import LIGHT_MAL, objective_light
    exps = {e.name: e for e in objective_light([0, 1])}
    assert sorted(exps) == ["light_k1_s0", "light_k1_s1", "light_k2_s0", "light_k2_s1", "light_patch20_s0",
                            "light_patch20_s1"]
    assert exps["light_k1_s1"].pretrain == ["model.cluster_size=1"] and exps["light_k1_s1"].seed == 1
    assert exps["light_patch20_s0"].pretrain == ["objective.mask.unit=patch", "objective.mask.ratio=0.2"]
    assert all(e.finetune == LIGHT_MAL and not e.pretrained_by and e.table == "light" for e in exps.values())

    def row(name, setting, seed, ho, epochs):
        return {"name": f"{name}_s{seed}", "table": "light", "setting": setting, "seed": seed, "top1": ho + seed,
                "holdout_top1": ho + seed, "commands": [f"mal x optim.epochs={epochs}"]}
    arms = [("light_ld1.0", "MAL, light fine-tuning, layer decay 1.0", 70, 15),
            ("light_k1", exps["light_k1_s0"].setting, 73, 15), ("light_k2", exps["light_k2_s0"].setting, 69, 15),
            ("supervised_light", "supervised, light", 72, 45)]
    text = "\n".join(light_recipe_table([row(n, s, seed, ho, ep) for n, s, ho, ep in arms for seed in (0, 1)],
                                         "Imagenette-96"))
    assert "MAL: MAL k=1, light fine-tuning, layer decay 1.0;" in text
    assert "| MAL k=1, light fine-tuning, layer decay 1.0 − supervised, light | val top-1 | +1.00 |" in text


def test_light_recipe_table_chooses_each_arm_on_the_held_out_split_and_pairs_the_choices():
    """The light-augmentation pair: every arm (the headline's heavy-augmentation runs and the light runs) pooled over
    seeds; each arm's recipe is the best held-out mean of its group, and the chosen MAL is paired by seed with the
    chosen supervised arms at the labelled and the total epochs, on val (top-1 here: held-out - 1) and held-out."""
    sys.path.insert(0, str(REPO / "experiments"))
    from make_results import light_recipe_table

    def row(name, table, setting, seed, ho, epochs):
        return {"name": f"{name}_s{seed}", "table": table, "setting": setting, "seed": seed, "top1": ho - 1 + seed,
                "holdout_top1": ho + seed, "commands": [f"mal x optim.epochs={epochs}"]}
    arms = [("default", "baseline", "MAL default", 50, 15), ("supervised_ft", "baseline",
             "supervised, labelled epochs", 47, 15), ("supervised", "baseline", "supervised", 63, 45),
            ("light", "light", "MAL, light fine-tuning", 63, 15),
            ("light_ld1.0", "light", "MAL, light fine-tuning, layer decay 1.0", 65, 15),
            ("supervised_ft_light", "light", "supervised, light, labelled epochs", 62, 15),
            ("supervised_light", "light", "supervised, light", 70, 45),
            ("mae_vil_light", "light", "MAE-ViL, light fine-tuning, layer decay 1.0", 66, 15),
            ("mae_vit_light", "light", "MAE-ViT, light fine-tuning, layer decay 1.0", 64, 15),
            ("vit_supervised_light", "light", "ViT-T supervised, light", 90, 45)]
    rows = [row(n, t, s, seed, ho, ep) for n, t, s, ho, ep in arms for seed in (0, 1)]
    text = "\n".join(light_recipe_table(rows, "Imagenette-96"))
    # the positive control is an arm of no group (not chosen as MAL although its held-out mean is higher), paired
    # with both supervised arms and with the chosen MAL
    assert ("| MAE-ViL, light fine-tuning, layer decay 1.0 − supervised, light, labelled epochs | val top-1 | +4.00 |"
            in text)
    assert "| MAE-ViL, light fine-tuning, layer decay 1.0 − supervised, light | val top-1 | -4.00 |" in text
    assert ("| MAE-ViL, light fine-tuning, layer decay 1.0 − MAL, light fine-tuning, layer decay 1.0 | val top-1 | "
            "+1.00 |") in text
    assert "| ViT-T supervised, light | crop and flip | 45 |" in text     # the ViT arms: listed, never chosen,
    assert "− MAE-ViT" not in text and text.count("− ViT-T") == 2         # paired only with each other
    assert "| MAE-ViT, light fine-tuning, layer decay 1.0 − ViT-T supervised, light | val top-1 | -26.00 |" in text
    assert "| MAL, light fine-tuning, layer decay 1.0 | crop and flip | 15 | 65.50 ± 0.71 (n=2) | 64.50 ± 0.71 (n=2) | " \
           "0.0 | light_ld1.0_s0, light_ld1.0_s1 |" in text
    assert "| supervised | RandAugment, mixup, cutmix, erasing | 45 | 63.50 ± 0.71 (n=2) |" in text
    assert ("Chosen on the held-out split (the best mean): MAL: MAL, light fine-tuning, layer decay 1.0; supervised at "
            "the labelled epochs: supervised, light, labelled epochs; supervised at the total epochs: supervised, "
            "light.") in text
    assert "| MAL, light fine-tuning, layer decay 1.0 − supervised, light, labelled epochs | val top-1 | +3.00 | " \
           "[+3.00, +3.00] | 2 |" in text
    assert "| MAL, light fine-tuning, layer decay 1.0 − supervised, light | held-out top-1 | -5.00 |" in text
    assert light_recipe_table(rows[:6], "Imagenette-96") == []                 # no light rows: no table
    assert text.startswith("#### Light augmentation against the headline's recipe (Imagenette-96)")
    light_only = light_recipe_table(rows[6:14], "CIFAR-10")                  # no heavy runs: a title without them
    assert light_only[0] == "#### MAL and supervised training, light augmentation (CIFAR-10)"


def test_budget_split_keeps_the_total_and_its_table_pairs_the_best_split_with_supervised():
    """split{P}_s*: MAL pretrained for a third and two thirds of --pre-epochs, fine-tuned for the rest of the total
    with the light recipe; the table lists them by pretraining epochs beside the light pair's full split, chooses
    the best held-out mean and pairs it by seed with supervised training for the same total epochs."""
    sys.path.insert(0, str(REPO / "experiments"))
    from make_results import budget_split_table
    from sweep import budget_split
    ten, twenty = budget_split([0], 30, 15)
    assert (ten.name, ten.pretrain, ten.pretrained_by) == ("split10_s0", ["optim.epochs=10"], "")
    assert ten.finetune[-2:] == ["optim.layer_decay=1.0", "optim.epochs=35"] and "aug.mixup=0" in ten.finetune
    assert twenty.finetune[-1] == "optim.epochs=25"

    def row(name, table, setting, seed, ho, commands):
        return {"name": f"{name}_s{seed}", "table": table, "setting": setting, "seed": seed, "top1": ho - 1 + seed,
                "holdout_top1": ho + seed, "commands": commands}
    arms = [("split20", "split", twenty.setting, 71, ["mal pretrain optim.epochs=20", "mal finetune optim.epochs=25"]),
            ("split10", "split", ten.setting, 69, ["mal pretrain optim.epochs=10", "mal finetune optim.epochs=35"]),
            ("light_ld1.0", "light", "MAL, light fine-tuning, layer decay 1.0", 70,
             ["mal pretrain optim.epochs=30", "mal finetune optim.epochs=15"]),
            ("supervised_light", "light", "supervised, light", 72, ["mal supervised optim.epochs=45"])]
    rows = [row(n, t, st, seed, ho, c) for n, t, st, ho, c in arms for seed in (0, 1)]
    text = "\n".join(budget_split_table(rows, "Imagenette-96"))
    order = [ln.split(" | ")[1:3] for ln in text.splitlines() if ln.startswith("| MAL") or ln.startswith("| sup")]
    assert order[:4] == [["10", "35"], ["20", "25"], ["30", "15"], ["–", "45"]]
    assert "Chosen on the held-out split (the best mean): MAL, 20 + 25 epochs, light, layer decay 1.0." in text
    assert ("| MAL, 20 + 25 epochs, light, layer decay 1.0 − supervised, light | val top-1 | -1.00 | [-1.00, -1.00] | 2 |"
            in text)
    assert budget_split_table(rows[:4], "x") == []                    # no supervised run of the total: no table


def test_split_plot_draws_each_split_and_supervised_training_on_total_epochs(tmp_path):
    """results_split_curves.png: every seed of each split (ordered by pretraining epochs, the light pair's 30 + 15
    among them) and of supervised training for the total, a fine-tune shifted by its own pretraining epochs."""
    sys.path.insert(0, str(REPO / "experiments"))
    import matplotlib
    matplotlib.use("Agg")
    from make_results import split_plot
    arms = [("split20", "split", "MAL, 20 + 25", ["mal pretrain optim.epochs=20", "mal finetune optim.epochs=25"]),
            ("split10", "split", "MAL, 10 + 35", ["mal pretrain optim.epochs=10", "mal finetune optim.epochs=35"]),
            ("light_ld1.0", "light", "MAL, light fine-tuning, layer decay 1.0",
             ["mal pretrain optim.epochs=30", "mal finetune optim.epochs=15"]),
            ("supervised_light", "light", "supervised, light", ["mal supervised optim.epochs=45"]),
            ("light_k1", "light", "MAL, k = 1", ["mal pretrain optim.epochs=30", "mal finetune optim.epochs=15"])]
    rows = []
    for name, table, setting, commands in arms:
        for seed in (0, 1):
            rows.append({"name": f"{name}_s{seed}", "table": table, "setting": setting, "seed": seed,
                         "holdout_top1": 70.0, "commands": commands, "_dir": str(tmp_path)})
            stage = tmp_path / rows[-1]["name"] / ("supervised" if "supervised" in name else "finetune")
            stage.mkdir(parents=True)
            (stage / "metrics.csv").write_text("epoch,eval_top1\n1,20\n2,30\n")
    figs = {}
    split_plot(rows, lambda fig, name: figs.setdefault(name, fig), "Imagenette-96")
    ax = figs["results_split_curves.png"].axes[0]
    assert sorted(line.get_xdata()[0] for line in ax.get_lines()) == [1, 1, 11, 11, 21, 21, 31, 31]   # not k = 1
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "MAL, 10 + 35", "MAL, 20 + 25", "MAL, light fine-tuning, layer decay 1.0", "supervised, light"]
    figs.clear()
    split_plot(rows[4:], lambda fig, name: figs.setdefault(name, fig), "x")           # no split ran: no figure
    assert figs == {}


def test_make_results_leaves_the_doc_alone_when_the_family_has_not_run(tmp_path):
    """--tables split on results without split rows: a clear exit, and the doc's section is not filled with the
    reference rows' commands."""
    res = tmp_path / "results.jsonl"
    res.write_text(json.dumps({"name": "supervised_light_s0", "table": "light", "setting": "supervised, light",
                               "seed": 0, "top1": 70.0, "holdout_top1": 71.0, "commands": ["mal supervised x"]}) + "\n")
    doc = tmp_path / "results.md"
    doc.write_text("<!-- split:begin (experiments/make_results.py) -->\n<!-- split:end -->\n")
    before = doc.read_text()
    out = subprocess.run([sys.executable, "experiments/make_results.py", "--results", str(res), "--doc", str(doc),
                          "--section", "split", "--tables", "split", "--figures", str(tmp_path / "fig")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "no split table" in out.stderr and "have not run" in out.stderr
    assert doc.read_text() == before


def test_wall_minutes_add_the_pretraining_another_experiment_ran(tmp_path):
    """A fine-tune sharing default_s0's pretraining costs its own minutes plus that pretraining's train_time_s (read
    from the summary beside the results); a supervised row or a row that ran its own pretraining, its own only."""
    sys.path.insert(0, str(REPO / "experiments"))
    from make_results import wall_minutes
    (tmp_path / "default_s0/pretrain").mkdir(parents=True)
    (tmp_path / "default_s0/pretrain/summary.json").write_text(json.dumps({"train_time_s": 180.0}))
    pre = "mal pretrain --config c --output runs/light/default_s0/pretrain --no-progress optim.epochs=30"
    shared = {"name": "light_s0", "gpu_min": 2.0, "_dir": str(tmp_path), "commands": [pre, "mal finetune x"]}
    assert wall_minutes(shared) == 5.0
    assert wall_minutes({**shared, "name": "default_s0"}) == 2.0                      # its own pretraining: counted
    assert wall_minutes({"name": "supervised_s0", "gpu_min": 1.5, "commands": ["mal supervised x"]}) == 1.5
    missing = {**shared, "commands": [pre.replace("default_s0", "default_s1"), "mal finetune x"]}
    assert math.isnan(wall_minutes(missing))                                          # unknown, not 0


def test_light_plot_draws_every_seed_of_the_chosen_arms_only_on_total_epochs(tmp_path):
    """results_light_curves.png: one line per seed of each chosen arm and of the positive control (MAE-ViL), a
    fine-tune shifted by its pretraining epochs; the arms not chosen are not drawn."""
    sys.path.insert(0, str(REPO / "experiments"))
    import matplotlib
    matplotlib.use("Agg")
    from make_results import light_plot
    mal = ["mal pretrain x optim.epochs=30", "mal finetune optim.epochs=15"]
    arms = [("default", "baseline", "MAL default", 50, mal),
            ("light_ld1.0", "light", "MAL, light fine-tuning, layer decay 1.0", 65, mal),
            ("supervised_ft_light", "light", "supervised, light, labelled epochs", 62,
             ["mal supervised optim.epochs=15"]),
            ("supervised_light", "light", "supervised, light", 70, ["mal supervised optim.epochs=45"]),
            ("mae_vil_light", "light", "MAE-ViL, light fine-tuning, layer decay 1.0", 66, mal)]
    rows = []
    for name, table, setting, ho, commands in arms:
        for seed in (0, 1):
            rows.append({"name": f"{name}_s{seed}", "table": table, "setting": setting, "seed": seed,
                         "holdout_top1": ho + seed, "commands": commands, "_dir": str(tmp_path)})
            stage = tmp_path / rows[-1]["name"] / ("supervised" if "supervised" in name else "finetune")
            stage.mkdir(parents=True)
            (stage / "metrics.csv").write_text("epoch,eval_top1\n1,20\n2,30\n")
    figs = {}
    light_plot(rows, lambda fig, name: figs.setdefault(name, fig), "Imagenette-96")
    lines = figs["results_light_curves.png"].axes[0].get_lines()
    assert len(lines) == 8                                     # (3 chosen arms + MAE-ViL) x 2 seeds, not the default
    starts = sorted((line.get_xdata()[0], line.get_linestyle()) for line in lines)
    assert starts == [(1.0, "--")] * 4 + [(31.0, "-")] * 4                # fine-tunes after 30 epochs
    labels = [t.get_text() for t in figs["results_light_curves.png"].axes[0].get_legend().get_texts()]
    assert labels == ["MAL: MAL, light fine-tuning, layer decay 1.0", "supervised at the labelled epochs: supervised, "
                      "light, labelled epochs", "supervised at the total epochs: supervised, light",
                      "positive control: MAE-ViL, light fine-tuning, layer decay 1.0"]


def test_low_label_arms_share_the_default_pretraining_and_pair_by_seed():
    """lowlabel10_*: MAL fine-tunes default_s*'s pretraining and the supervised arm trains from scratch, both on 10 %
    of the labels for 100 epochs; the table pools seeds and pairs MAL with the supervised arm of the same seed."""
    sys.path.insert(0, str(REPO / "experiments"))
    from make_results import low_label_table
    from sweep import low_label
    mal, sup, mal_light, sup_light = low_label([1])
    assert (mal.name, mal.pretrained_by, mal.pretrain) == ("lowlabel10_s1", "default_s1", [])
    assert sup.pretrain is None and sup.labelled_only and sup.finetune == mal.finetune
    assert {"data.label_fraction=0.1", "optim.epochs=100"} <= set(mal.finetune)
    # the light pair's choices: MAL with layer decay 1.0, supervised with a mean-pooled head; both crop and flip only
    assert mal_light.pretrained_by == "default_s1" and set(mal.finetune) < set(mal_light.finetune)
    assert set(mal_light.finetune) - set(sup_light.finetune) == {"optim.layer_decay=1.0"}
    assert set(sup_light.finetune) - set(mal_light.finetune) == {"model.global_pool=avg"}
    assert "aug.mixup=0" in sup_light.finetune and sup_light.setting == "supervised" + mal_light.setting[3:]

    def row(name, setting, seed, top1):
        return {"name": name, "table": "lowlabel", "setting": setting, "seed": seed, "top1": top1,
                "holdout_top1": top1 + 1, "gpu_min": 0.5, "commands": ["mal pretrain x", "mal finetune optim.epochs=100"]}
    rows = [row("lowlabel10_s0", mal.setting, 0, 40.0), row("lowlabel10_s1", mal.setting, 1, 44.0),
            row("lowlabel10_supervised_s0", sup.setting, 0, 35.0), row("lowlabel10_supervised_s1", sup.setting, 1, 41.0)]
    text = "\n".join(low_label_table(rows, "Imagenette-96"))
    assert "| MAL, 10 % of the labels | 100 | 42.00 ± 2.83 (n=2) | 43.00 ± 2.83 (n=2) | 0.5 |" in text
    # paired differences 5 and 3: mean 4, interval 4 ± 12.706 * 1 (t with one degree of freedom, std sqrt(2) / sqrt(2))
    assert ("| MAL, 10 % of the labels − supervised, 10 % of the labels | val top-1 | +4.00 | [-8.71, +16.71] | 2 |"
            in text)
    assert low_label_table([r for r in rows if "supervised" in r["name"]], "x")[-2].startswith("| supervised")


def test_results_of_several_sweeps_pool_into_one_table(tmp_path):
    """--results takes several files: an ablation sweep's rows and its own default seed join the headline's three
    default seeds in the k = 4 row of Table 6; each row's curves are read beside its own file."""
    import statistics
    head = [json.loads(x) for x in (REPO / "docs/results/imagenette_headline/results.jsonl").read_text().splitlines()]
    default = next(r for r in head if r["name"] == "default_s0")
    abl = tmp_path / "abl"
    abl.mkdir()
    rows = [{**default, "name": "default_s3", "seed": 3, "top1": 50.0},
            {**default, "name": "table6_k2", "table": "table6", "setting": "k=2", "top1": 47.5}]
    (abl / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = tmp_path / "results.md"
    doc.write_text("<!-- ablations:begin (experiments/make_results.py) -->\nOLD\n<!-- ablations:end -->\n")
    res = subprocess.run([sys.executable, "experiments/make_results.py", "--results",
                          "docs/results/imagenette_headline/results.jsonl", str(abl / "results.jsonl"), "--doc", str(doc),
                          "--section", "ablations", "--tables", "ablations", "--dataset", "Imagenette-96", "--figures",
                          str(tmp_path / "fig")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    vals = [r["top1"] for r in head if r["setting"] == "MAL default"] + [50.0]
    text = doc.read_text()
    k4 = next(ln for ln in text.splitlines() if ln.startswith("| k=4 |"))
    assert k4.startswith(f"| k=4 | {statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} (n=4) | – |")
    assert "default_s3" in k4 and f"| k=2 | 47.50 | {47.5 - statistics.mean(vals):+.2f} |" in text
    assert f"| {47.5 - default['top1']:+.2f} (s0) |" in text          # paired with default_s0: the same seed
    # --tables ablations: every ablation table, a paper row without a run says so, and neither the headline's
    # other arms nor their commands appear
    assert "| k=6 | not run yet |" in text and "| cluster 10% | not run yet |" in text
    assert "| cluster 20% | " + k4.split(" | ", 1)[1] in text                # the default row in Table 5 too
    assert "#### Table 13: decoder type" in text and "| MAL default |" not in text and "supervised_s0" not in text
    assert {p.name for p in (tmp_path / "fig").iterdir()} == {"results_cluster_size.png", "results_pretrain_loss.png"}


def test_stage_epochs_reads_the_override_that_wins():
    """A row's schedule is read from its commands; an experiment's own optim.epochs comes after the sweep's and
    wins (as in load_run_config), so the last one is the schedule."""
    sys.path.insert(0, str(REPO / "experiments"))
    from make_results import stage_epochs
    row = {"commands": ["mal pretrain optim.epochs=30", "mal finetune optim.epochs=15 init=x optim.epochs=30"]}
    assert stage_epochs(row) == (30, 30)
    assert stage_epochs({"commands": ["mal supervised optim.epochs=45"]}) == (0, 45)


def test_stage_commands_carry_each_key_once_at_the_setting_that_wins():
    """An experiment's own epochs replace the sweep's in the recorded command (no override that does nothing);
    the merged overrides load the same config as the duplicated ones."""
    sys.path.insert(0, str(REPO / "experiments"))
    from sweep import budget_split, last_wins, plan_stages

    from mal.config import load_run_config
    assert last_wins(["a=1", "b=2", "a=3", "c="]) == ["b=2", "a=3", "c="]
    args = SimpleNamespace(out="runs/x", data="default", workers=0, holdout=0.1, set=["seed=5"], protocol="imagenette",
                           pre_epochs=30, ft_epochs=15, pretrain_recipe=[], supervised_recipe=[])
    ten = budget_split([1], 30, 15)[0]
    (_, _, _, pre), (_, ft_cfg, _, ft) = plan_stages(ten, args)
    assert [o for o in pre if o.startswith("optim.epochs=")] == ["optim.epochs=10"]
    assert [o for o in ft if o.startswith("optim.epochs=")] == ["optim.epochs=35"]
    assert [o for o in ft if o.startswith("seed=")] == ["seed=5"]          # --set comes after the sweep's seed
    duplicated = ["data.dataset=default", "optim.epochs=15", *ten.finetune]
    assert load_run_config(ft_cfg, last_wins(duplicated)) == load_run_config(ft_cfg, duplicated)


def test_a_failed_stage_names_its_command_and_log(image_folder, tmp_path):
    """A stage that fails (here: a config mal rejects) fails its experiment only; the message names the stage's
    command and the log it wrote to, and the sweep exits non-zero after the others."""
    out = tmp_path / "bad"
    cmd = [sys.executable, "experiments/sweep.py", "--data", str(image_folder), "--out", str(out), "--workers", "0",
           "--pre-epochs", "1", "--ft-epochs", "1", "--only", "^default_s0$", "--set", *TINY, "model.dim=33"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode != 0
    assert f"FAILED default_s0: `mal pretrain --config cifar10_pretrain --output {out / 'default_s0/pretrain'}` exited" \
        in res.stderr
    assert f"see {out / 'default_s0/log.txt'}" in res.stderr and "model.dim" in (out / "default_s0/log.txt").read_text()
    assert "Traceback" not in res.stderr and "1 experiment(s) failed: default_s0" in res.stderr


def test_each_run_gets_its_share_of_the_cores_unless_the_user_set_one(monkeypatch):
    """Several runs at once must not each start one torch thread per core: a stage's OMP_NUM_THREADS is its share
    of the cores (at least 1), a value the user exported wins, and the GPU is the slot's."""
    sys.path.insert(0, str(REPO / "experiments"))
    from sweep import cpu_warning, stage_env
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = stage_env("1", 32 // 16)
    assert env["OMP_NUM_THREADS"] == "2" and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert stage_env(None, 0)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert stage_env(None, 4)["OMP_NUM_THREADS"] == "7"
    assert cpu_warning(16, 2, 32) is not None and "48 processes on 32 cores" in cpu_warning(16, 2, 32)
    assert cpu_warning(10, 2, 32) is None
