"""The fine-tuning and evaluation protocol: layer-wise lr decay over pairs of blocks, EMA warm-up, raw and EMA
evaluation, the held-out split, probe pooling, the initialization we follow, position embeddings a fixed-order
pretraining never trains."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from mal.checkpoint import fill_unseen_positions, load_weights
from mal.cli import main
from mal.config import EncoderConfig, load_run_config
from mal.engine.optim import param_groups
from mal.engine.probe import pool_tokens
from mal.models.vil import VisionLSTM
from mal.serialization import cluster_patch_table, unseen_input_patches

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.dim=32", "model.depth=4", "data.num_workers=0", "data.cache=false", "optim.batch_size=16",
        "log_every=1", "save_every=1000"]


def _scales(model, layer_decay, group):
    groups = param_groups(model, 0.05, layer_decay, group)
    return {name: g["lr_scale"] for g in groups for p in g["params"]
            for name, q in model.named_parameters() if q is p}


def test_layer_decay_counts_pairs_of_blocks_like_maes_twelve_layers():
    model = VisionLSTM(EncoderConfig(img_size=16, patch_size=4, dim=16, depth=24, cluster_size=2), num_classes=3)
    s = _scales(model, 0.75, 2)
    assert s["head.weight"] == 1.0 and s["norm.weight"] == 1.0                   # the top: full lr
    assert s["blocks.23.layer.proj_up.weight"] == s["blocks.22.norm.weight"] == 0.75      # last pair
    assert s["blocks.0.layer.proj_up.weight"] == s["blocks.1.norm.weight"] == pytest.approx(0.75 ** 12)
    assert s["patch_embed.weight"] == s["pos_embed"] == pytest.approx(0.75 ** 13)         # MAE's ViT-B range
    per_block = _scales(model, 0.75, 1)
    assert per_block["patch_embed.weight"] == pytest.approx(0.75 ** 25)                     # what pairs fix
    assert set(_scales(model, 1.0, 2).values()) == {1.0}
    wd = {n: g["weight_decay"] for g in param_groups(model, 0.05, 0.75, 2) for p in g["params"]
          for n, q in model.named_parameters() if q is p}
    assert wd["pos_embed"] == 0 and wd["blocks.0.norm.weight"] == 0 and wd["blocks.0.layer.proj_up.weight"] == 0.05


@pytest.mark.parametrize("protocol", ["cifar10", "imagenette"])
@pytest.mark.parametrize("arch", ["", "_vit"])
def test_supervised_and_finetune_recipes_differ_only_in_init_epochs_and_layer_decay(protocol, arch):
    """The supervised baseline is the fine-tuning recipe from a random initialization, without layer decay
    (a device for pretrained encoders: from scratch it starves the patch embedding)."""
    ft = load_run_config(f"{protocol}_finetune{arch}", ["init=x"])
    sup = load_run_config(f"{protocol}_supervised{arch}")
    assert ft.model.arch == ("vit" if arch else "vil") and ft.optim.layer_decay_group == (1 if arch else 2)
    for section in ("model", "data", "aug"):
        assert getattr(ft, section) == getattr(sup, section), section
    diff = {k for k in vars(ft.optim) if getattr(ft.optim, k) != getattr(sup.optim, k)}
    assert diff == {"epochs", "layer_decay"} and (ft.optim.layer_decay, sup.optim.layer_decay) == (0.75, 1.0)
    assert (ft.ema_decay, ft.ema_warmup) == (sup.ema_decay, sup.ema_warmup)


def test_short_finetune_config_is_the_arm_the_light_pair_chose():
    """imagenette_finetune_short is imagenette_finetune with the overrides of the light pair's chosen MAL arm
    (sweep.py's light_ld1.0, 15 epochs): the config users get is the recipe that was measured."""
    sys.path.insert(0, str(REPO / "experiments"))
    from sweep import light_recipe
    arm = next(e for e in light_recipe([0]) if e.name == "light_ld1.0_s0")
    short = load_run_config("imagenette_finetune_short", ["init=x"])
    measured = load_run_config("imagenette_finetune", ["init=x", "optim.epochs=15", *arm.finetune,
                                                       "output_dir=runs/imagenette_finetune_short"])
    assert short == measured
    assert (short.optim.layer_decay, short.aug.mixup, short.aug.auto_augment) == (1.0, 0.0, "")


@pytest.mark.parametrize("protocol", ["cifar10", "imagenette"])
def test_baseline_pretraining_configs_change_only_the_encoder_and_objective(protocol):
    """MAL-ViL, MAE-ViL, MAE-ViT and MAL-ViT pretrain on the same data with the same recipe; each fine-tunes with
    the recipe of its architecture, whose data is the pretraining data."""
    ref = load_run_config(f"{protocol}_pretrain")
    want = {"mae_vil": ("vil", "mae"), "mae_vit": ("vit", "mae"), "mal_vit": ("vit", "mal")}
    for name, (arch, kind) in want.items():
        cfg = load_run_config(f"{protocol}_{name}")
        assert (cfg.task, cfg.model.arch, cfg.objective.kind) == ("pretrain", arch, kind), name
        assert (cfg.data, cfg.optim, cfg.model.img_size, cfg.model.patch_size) == (
            ref.data, ref.optim, ref.model.img_size, ref.model.patch_size), name
        assert cfg.objective.decoder == ref.objective.decoder, name
        if kind == "mae":
            assert (cfg.objective.mask.unit, cfg.objective.mask.ratio) == ("patch", 0.75)
        else:
            assert cfg.objective == ref.objective
        ft = load_run_config(f"{protocol}_finetune{'_vit' if arch == 'vit' else ''}", ["init=x"])
        assert ft.model.arch == arch and ft.data.dataset == cfg.data.dataset and ft.model.grid == cfg.model.grid
    assert ref.model.grid == (12, 12)


def test_init_follows_the_official_vil():
    torch.manual_seed(0)
    m = VisionLSTM(EncoderConfig(img_size=32, patch_size=4, dim=192, depth=2, drop_path_rate=0.1), num_classes=10)
    down = m.blocks[0].layer.proj_down.weight
    assert abs(down.std().item() - 2 / math.sqrt(192)) < 0.01                # N(0, 2/sqrt(D))
    assert m.head.weight.std().item() < 1e-4                                 # trunc normal, std 2e-5
    assert [b.drop_path.drop_prob for b in m.blocks] == [0.1, 0.1]           # constant, not linear


def test_probe_pooling():
    t = torch.arange(24.0).view(1, 4, 6)                                     # (B, N, D)
    assert torch.equal(pool_tokens(t, "mean"), t.mean(1))
    assert torch.equal(pool_tokens(t, "last"), t[:, -1])
    assert torch.equal(pool_tokens(t, "first_last"), torch.cat([t[:, 0], t[:, -1]], -1))
    with pytest.raises(ValueError, match="probe_pool|pooling"):
        pool_tokens(t, "cls")
    with pytest.raises(ValueError, match="probe_pool"):
        load_run_config(None, ["probe_pool=cls"])


def test_fixed_order_pretraining_leaves_one_cluster_untrained_and_finetuning_fills_it():
    assert unseen_input_patches("alternating", 12, 12, 4) == [] and unseen_input_patches("random", 12, 12, 4) == []
    last = unseen_input_patches("row_fwd", 12, 12, 4)
    assert last == sorted(cluster_patch_table(12, 12, 4)[8].tolist())        # bottom-right cluster
    assert unseen_input_patches("row_bwd", 12, 12, 4) == sorted(cluster_patch_table(12, 12, 4)[6].tolist())
    pos = torch.randn(1, 144, 8)
    state = {"encoder.pos_embed": pos.clone()}
    fill_unseen_positions(state, dict(img_size=48, patch_size=4, cluster_size=4, scan_order="row_fwd"))
    seen = [i for i in range(144) if i not in last]
    assert torch.allclose(state["encoder.pos_embed"][0, last], pos[0, seen].mean(0).expand(len(last), -1))
    assert torch.equal(state["encoder.pos_embed"][0, seen], pos[0, seen])
    state = {"encoder.pos_embed": pos.clone()}
    fill_unseen_positions(state, dict(img_size=48, patch_size=4, cluster_size=4, scan_order="alternating"))
    assert torch.equal(state["encoder.pos_embed"], pos)


def _finetune(image_folder, tmp_path, init, *extra):
    out = tmp_path / "ft"
    args = ["finetune", "--config", "cifar10_finetune", "--init", str(init), "--output",
            str(out), "--no-progress", f"data.dataset={image_folder}", *TINY, "optim.epochs=2",
            "optim.warmup_epochs=0.5", *extra]
    assert main(args) == 0
    return out, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def pretrained(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "pre"
    assert main(["pretrain", "--config", "cifar10_pretrain", "--output", str(out),
                 "--no-progress", f"data.dataset={image_folder}", *TINY, "objective.decoder.depth=1",
                 "objective.decoder.dim=32", "objective.decoder.num_heads=4", "max_steps=2", "probe=false",
                 "model.scan_order=row_fwd"]) == 0
    return out / "ckpt_last"


def test_ema_warms_up_and_both_models_are_reported(image_folder, tmp_path, pretrained):
    """decay 0.9999 without warm-up would keep ~all of the initial weights after a few steps; with timm's
    warm-up the EMA follows the weights early on. Both the raw and the EMA model are evaluated."""
    out, summary = _finetune(image_folder, tmp_path, pretrained, "ema_decay=0.9999")
    assert {"val_top1", "val_ema_top1", "val_top5", "val_ema_top5"} <= set(summary)
    raw, ema = load_weights(out / "ckpt_last"), load_weights(out / "ckpt_ema")
    init = load_weights(pretrained)
    key = "blocks.0.layer.proj_up.weight"
    moved = (raw[key] - init["encoder." + key]).norm()
    assert moved > 0
    assert (ema[key] - raw[key]).norm() < 0.5 * moved                        # closer to the weights than to init
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "eval_top1" in header and "eval_ema_top1" in header


def test_sweep_baseline_rows_use_the_baselines_configs():
    import sys
    sys.path.insert(0, str(REPO / "experiments"))
    from sweep import experiments
    rows = {e.setting: e for e in experiments([0]) if e.table == "table4"}
    assert set(rows) == {"MAE-ViL", "MAE-ViT", "MAL-ViT", "supervised ViT"}
    want = {"MAE-ViL": ("vil", "mae"), "MAE-ViT": ("vit", "mae"), "MAL-ViT": ("vit", "mal")}
    for protocol in ("cifar10", "imagenette"):
        for setting, (arch, kind) in want.items():
            cfgs = rows[setting].configs(protocol)
            pre, ft = load_run_config(cfgs["pretrain"]), load_run_config(cfgs["finetune"], ["init=x"])
            assert (pre.model.arch, pre.objective.kind, ft.model.arch) == (arch, kind, arch), setting
            assert pre.model.img_size == {"cifar10": 48, "imagenette": 96}[protocol]
        sup = load_run_config(rows["supervised ViT"].configs(protocol)["supervised"])
        assert sup.task == "supervised" and sup.model.arch == "vit"
    labelled = [e for e in experiments([0]) if e.name == "supervised_ft_s0"]
    assert len(labelled) == 1 and labelled[0].labelled_only and labelled[0].pretrain is None


def test_holdout_is_evaluated_during_training_and_the_val_folder_once(image_folder, tmp_path, pretrained):
    out, summary = _finetune(image_folder, tmp_path, pretrained, "data.holdout=0.25", "ema_decay=0.99")
    assert summary["eval_set"] == "holdout"
    assert {"holdout_top1", "holdout_ema_top1", "val_top1", "val_ema_top1"} <= set(summary)
    from mal.engine.build import build_datasets
    cfg = load_run_config("cifar10_finetune", [f"data.dataset={image_folder}", "init=x",
                                               "data.holdout=0.25", "data.cache=false"])
    data = build_datasets(cfg, progress=False)
    assert len(data.train) + len(data.eval) == 192 and len(data.eval) == 48                # 16 of 64 per class
    assert not set(data.train.indices) & set(data.eval.indices)
    assert torch.equal(data.eval[0][0], data.eval[0][0])                      # held-out part: eval transform
    assert not torch.equal(data.train[0][0], data.train[0][0])                # training part: augmented


def test_label_fraction_trains_on_part_of_the_labels_and_keeps_the_held_out_part(image_folder):
    """data.label_fraction=0.25 with a held-out quarter: the classifier trains on a quarter of each class of the
    remaining 48 per class (12), the held-out 16 per class are unchanged, and a pretraining run refuses the key."""
    from mal.engine.build import build_datasets
    base = [f"data.dataset={image_folder}", "init=x", "data.holdout=0.25", "data.cache=false"]
    full = build_datasets(load_run_config("cifar10_finetune", base), progress=False)
    low = build_datasets(load_run_config("cifar10_finetune", [*base, "data.label_fraction=0.25"]), progress=False)
    assert len(full.train) == 144 and len(low.train) == 36 and set(low.train.indices) < set(full.train.indices)
    assert low.train.targets.count(0) == 12 and low.eval.indices == full.eval.indices
    with pytest.raises(ValueError, match="a pretrain run would ignore it"):
        load_run_config("cifar10_pretrain", [f"data.dataset={image_folder}", "data.label_fraction=0.5"])
    with pytest.raises(ValueError, match=r"label_fraction must be in \(0, 1\]"):
        load_run_config("cifar10_finetune", [*base, "data.label_fraction=0"])


def test_pretrain_fraction_pretrains_on_part_of_the_images_and_probes_on_all(image_folder):
    """data.pretrain_fraction=0.25 with a held-out quarter: the pretraining sees a quarter of each class of the
    remaining 48 per class, the same images a label_fraction of 0.25 would pick; the probes' memory keeps all 144
    images and the held-out part is unchanged; a classifier run refuses the key."""
    from mal.engine.build import build_datasets
    base = [f"data.dataset={image_folder}", "data.holdout=0.25", "data.cache=false"]
    full = build_datasets(load_run_config("cifar10_pretrain", base), progress=False)
    part = build_datasets(load_run_config("cifar10_pretrain", [*base, "data.pretrain_fraction=0.25"]), progress=False)
    low = build_datasets(load_run_config("cifar10_finetune", [*base, "init=x", "data.label_fraction=0.25"]),
                         progress=False)
    assert len(full.train) == 144 and len(part.train) == 36 and part.train.targets.count(0) == 12
    assert part.train.indices == low.train.indices and part.eval.indices == full.eval.indices
    assert list(part.train_eval.indices) == list(full.train_eval.indices) and len(part.train_eval) == 144
    with pytest.raises(ValueError, match="a finetune run would ignore it"):
        load_run_config("cifar10_finetune", [*base, "init=x", "data.pretrain_fraction=0.5"])
    with pytest.raises(ValueError, match=r"pretrain_fraction must be in \(0, 1\]"):
        load_run_config("cifar10_pretrain", [*base, "data.pretrain_fraction=1.5"])


def test_pretraining_probes_report_their_pooling_and_the_holdout(image_folder, tmp_path):
    out = tmp_path / "pre"
    assert main(["pretrain", "--config", "cifar10_pretrain", "--output", str(out),
                 "--no-progress", f"data.dataset={image_folder}", *TINY, "objective.decoder.depth=1",
                 "objective.decoder.dim=32", "objective.decoder.num_heads=4", "max_steps=2", "data.holdout=0.25",
                 "optim.warmup_epochs=0.5"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["probe_pool"] == "mean"
    assert {"knn_top1", "linprobe_top1", "holdout_knn_top1", "holdout_linprobe_top1"} <= set(s)
    assert s["masked_input_fraction"] == 0.25                                  # 2 of 8 input clusters
