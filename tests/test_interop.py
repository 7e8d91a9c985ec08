"""timm and Hugging Face interop: the registered names and timm's model API, timm's data config, checkpoints loaded
through `pretrained_cfg_overlay`, save_pretrained / from_pretrained round trips (offline), and `mal export`."""
import json

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config
from timm.optim import create_optimizer_v2

import mal
from mal import EncoderConfig, MALPretrain, ObjectiveConfig, VisionLSTM, VisionTransformer, mal_tiny
from mal.cli import main
from mal.config import DecoderConfig
from mal.data import eval_transform
from mal.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mal.checkpoint import fill_unseen_positions
from mal.export import export_run
from mal.models.registry import TIMM_PRESETS

NAMES = [f"{p}_{s}_patch16_{i}" for p in ("mal", "mal_vit") for s in ("tiny", "small", "base") for i in (224, 192)]
SMALL_VIL = dict(img_size=16, patch_size=4, dim=16, depth=2, cluster_size=2)
SMALL_VIT = dict(arch="vit", img_size=16, patch_size=4, dim=16, depth=2, num_heads=2, cluster_size=2)
# the demo geometry (24 px, patch 4, 6x6 grid, clusters of 2x2), smaller; row_fwd leaves positions the encoder never sees
DEMO = ["model.dim=32", "model.depth=2", "objective.decoder.depth=1", "objective.decoder.dim=32", "max_steps=2",
        "optim.batch_size=32", "probe=false", "model.scan_order=row_fwd"]
DEMO_MODEL = dict(img_size=24, patch_size=4, dim=32, depth=2, cluster_size=2, scan_order="row_fwd")


def _data(model: torch.nn.Module) -> dict:
    """timm's data config of a model, the keys of every timm release, sequences as tuples."""
    cfg = resolve_data_config(model=model)
    return {k: tuple(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]
            for k in ("input_size", "interpolation", "mean", "std", "crop_pct")}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- timm
def test_import_mal_registers_the_models_with_timm():
    assert sorted(timm.list_models("mal_*")) == sorted(NAMES) == sorted(TIMM_PRESETS)
    assert mal.mal_tiny is mal.models.registry.mal_tiny                   # the README's factories, from the presets
    clf = mal_tiny(num_classes=1000, img_size=224)
    assert isinstance(clf, VisionLSTM) and (clf.cfg.dim, clf.cfg.depth, clf.cfg.img_size) == (192, 24, 224)
    assert isinstance(mal.vit_small(num_classes=0), VisionTransformer)


def test_timm_create_model_forward_and_intermediates():
    torch.manual_seed(0)
    model = timm.create_model("mal_tiny_patch16_224").eval()
    assert isinstance(model, VisionLSTM) and (model.cfg.dim, model.cfg.depth, model.cfg.img_size) == (192, 24, 224)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (1, 196, 192) and model.forward_head(tokens).shape == (1, 1000)
    if not hasattr(model, "forward_intermediates"):
        pytest.skip("forward_intermediates lands with the segmentation branch")
    with torch.no_grad():
        final, feats = model.forward_intermediates(x, indices=[5, 11, 23])
        assert final.shape[0] == 1 and final.shape[-1] == 192
        assert [tuple(f.shape) for f in feats] == [(1, 192, 14, 14)] * 3
        only = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        assert isinstance(only, list) and [tuple(f.shape) for f in only] == [(1, 192, 14, 14)] * 2
        vit = timm.create_model("mal_vit_tiny_patch16_192", depth=2).eval()
        assert [tuple(f.shape) for f in vit.forward_intermediates(torch.randn(1, 3, 192, 192), indices=1,
                                                                    intermediates_only=True)] == [(1, 192, 12, 12)]


def test_resolve_data_config_gives_our_mean_std_and_eval_transform():
    for name, size in (("mal_small_patch16_224", 224), ("mal_vit_base_patch16_192", 192)):
        model = timm.create_model(name, depth=1)
        cfg = resolve_data_config(model=model)
        assert _data(model) == dict(input_size=(3, size, size), interpolation="bicubic", mean=IMAGENET_MEAN,
                                    std=IMAGENET_STD, crop_pct=0.875)
        img = Image.effect_noise((300, 260), 60).convert("RGB")                # timm's transform = mal's, exactly
        assert torch.equal(create_transform(**cfg)(img), eval_transform(size, IMAGENET_MEAN, IMAGENET_STD)(img))
    direct = VisionLSTM(EncoderConfig(**SMALL_VIL), num_classes=3)          # not built by timm: the same defaults
    assert resolve_data_config(model=direct)["input_size"] == (3, 16, 16)


def test_timm_model_api():
    model = timm.create_model("mal_tiny_patch16_192", depth=4, num_classes=7, drop_path_rate=0.1, cluster_size=2)
    assert (model.cfg.depth, model.cfg.drop_path_rate, model.cfg.cluster_size, model.num_classes) == (4, 0.1, 2, 7)
    assert model.num_features == 192 and model.head_hidden_size == 384 and model.get_classifier() is model.head
    x = torch.randn(2, 3, 192, 192)
    model.reset_classifier(10)
    assert model.num_classes == 10 and model.eval()(x).shape == (2, 10)
    model.reset_classifier(0)
    assert model(x).shape == (2, 384)                                      # pooled features (first and last token)
    vit = timm.create_model("mal_vit_tiny_patch16_224", depth=2)
    assert vit.num_features == vit.head_hidden_size == 192 and vit.global_pool == "avg"
    # global_pool="avg": the mean of the tokens, as the probes read them (timm's argument, or reset_classifier's)
    avg = timm.create_model("mal_tiny_patch16_192", depth=2, num_classes=3, global_pool="avg").eval()
    tokens = avg.forward_features(x)                                       # (2, 144, 192)
    assert avg.head_hidden_size == 192 and avg.cfg.global_pool == "avg"
    assert torch.allclose(avg.forward_head(tokens), avg.head(tokens.mean(1)))
    model.reset_classifier(4, global_pool="avg")
    assert model.head.in_features == 192 and model.cfg.global_pool == "avg" and model(x).shape == (2, 4)
    model.reset_classifier(10, global_pool="")                             # back to the architecture's own
    assert model.global_pool == "first_last" and model.head.in_features == 384
    with pytest.raises(ValueError, match="not a pooling of model.arch=vit"):
        timm.create_model("mal_vit_tiny_patch16_224", depth=1, global_pool="first_last")
    assert model.no_weight_decay() == {"pos_embed"}
    # timm's layer decay reads group_matcher (the embeddings first, the head last), as our own param_groups does
    model.reset_classifier(5)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scale[id(model.patch_embed.weight)] == 0.5 ** 5 and scale[id(model.head.weight)] == 1.0
    assert scale[id(model.blocks[0].layer.proj_up.weight)] == 0.5 ** 4
    for kwargs, match in ((dict(foo=1), "unknown argument"), (dict(drop_rate=0.1), "drop_path_rate"),
                          (dict(global_pool="max"), "not a pooling"), (dict(features_only=True),
                                                                                  "forward_intermediates"),
                          (dict(pretrained=True), "publishes no weights")):
        with pytest.raises((TypeError, ValueError), match=match):
            timm.create_model("mal_tiny_patch16_224", depth=1, **kwargs)


# ----------------------------------------------------------------------------- Hugging Face Hub
@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the Hub fails the test."""
    def no_network(*args, **kwargs):
        raise AssertionError("from_pretrained of a local folder tried to download")
    monkeypatch.setattr(mal.hub, "hf_hub_download", no_network)


@pytest.mark.parametrize("cfg", [SMALL_VIL, SMALL_VIT], ids=["vil", "vit"])
def test_save_pretrained_from_pretrained_round_trip_is_bit_identical(cfg, tmp_path, offline):
    torch.manual_seed(0)
    model = mal.models.create_encoder(EncoderConfig(**cfg), num_classes=5)
    model.reset_classifier(3, global_pool="avg")                          # config.json says what the model is now
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    config = json.loads((tmp_path / "m/config.json").read_text())
    assert config["num_classes"] == 3 and config["cfg"]["dim"] == 16 and config["mal_class"] == type(model).__name__
    loaded = type(model).from_pretrained(tmp_path / "m")
    assert loaded.cfg == model.cfg and loaded.num_classes == 3 and not loaded.training
    assert loaded.global_pool == "avg" and loaded.head.in_features == 16
    assert _same_weights(model, loaded)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.eval()(x), loaded(x))
    with pytest.raises(ValueError, match="holds a"):
        (VisionTransformer if cfg is SMALL_VIL else VisionLSTM).from_pretrained(tmp_path / "m")


def test_mal_pretrain_round_trip_is_bit_identical(tmp_path, offline):
    torch.manual_seed(0)
    pre = MALPretrain(EncoderConfig(**SMALL_VIL), ObjectiveConfig(decoder=DecoderConfig(depth=1, dim=32, num_heads=4)))
    pre.save_pretrained(tmp_path / "pre")
    loaded = MALPretrain.from_pretrained(str(tmp_path / "pre"))
    assert loaded.enc_cfg == pre.enc_cfg and loaded.obj_cfg == pre.obj_cfg and _same_weights(pre, loaded)
    imgs = torch.randn(2, 3, 16, 16)
    draws = pre.sample_inputs(2, torch.Generator().manual_seed(0))
    assert torch.equal(pre.eval()(imgs, *draws)["loss"], loaded(imgs, *draws)["loss"])
    with pytest.raises(ValueError, match="no config.json"):
        MALPretrain.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- checkpoints: timm and mal export
@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """A two-step `mal pretrain` of the demo, the options given after the overrides."""
    out = tmp_path_factory.mktemp("runs") / "pre"
    assert main(["pretrain", *DEMO, "--config", "demo_pretrain", "--output", str(out), "--no-progress"]) == 0
    return out


def test_pretrain_checkpoint_loads_strictly_through_timm(pretrain_run):
    ckpt = pretrain_run / "ckpt_last"
    raw = load_file(str(ckpt / "model.safetensors"))
    want = {k[len("encoder."):]: v for k, v in raw.items() if k.startswith("encoder.")}
    filled = {"encoder.pos_embed": raw["encoder.pos_embed"]}
    fill_unseen_positions(filled, DEMO_MODEL)                              # as `mal finetune --init` loads it
    want["pos_embed"] = filled["encoder.pos_embed"]
    assert not torch.equal(want["pos_embed"], raw["encoder.pos_embed"])
    for file in (ckpt, ckpt / "model.safetensors"):                        # the folder or its weights file
        model = timm.create_model("mal_tiny_patch16_224", pretrained=True, num_classes=10,
                                  pretrained_cfg_overlay=dict(file=str(file)), **DEMO_MODEL)
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items()) and set(got) - set(want) == {"head.weight",
                                                                                                 "head.bias"}
    with pytest.raises(ValueError, match="missing"):                       # strict: another depth is an error
        timm.create_model("mal_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(ckpt)),
                          **{**DEMO_MODEL, "depth": 3})


def test_mal_export_encoder_classifier_and_objective(pretrain_run, tmp_path, capsys, offline):
    enc_dir, ft, clf_dir = tmp_path / "enc", tmp_path / "ft", tmp_path / "clf"
    assert main(["export", "--to", str(enc_dir), str(pretrain_run)]) == 0
    encoder = VisionLSTM.from_pretrained(enc_dir)
    assert encoder.num_classes == 0 and encoder.cfg.scan_order == "row_fwd"
    assert _data(encoder) == dict(input_size=(3, 24, 24), interpolation="bicubic", mean=(0.131,) * 3,
                                  std=(0.308,) * 3, crop_pct=1.0)                      # the run's data config
    via_timm = timm.create_model(f"local-dir:{enc_dir}", pretrained=True)
    assert via_timm.cfg == encoder.cfg and _same_weights(via_timm, encoder)
    assert _data(via_timm) == _data(encoder)
    card = (enc_dir / "README.md").read_text()
    assert "pretrained with MAL" in card and "final_loss" in card and "scan_order: row_fwd" in card
    assert main(["export", str(pretrain_run), "--to", str(enc_dir)]) == 2                 # no silent overwrite
    assert "--overwrite" in capsys.readouterr().err

    # fine-tune from the exported encoder (as its model card says), with EMA, scored on a small held-out part of the
    # training digits; export the EMA classifier
    assert main(["finetune", "max_steps=2", "optim.batch_size=32", "ema_decay=0.5", "model.dim=32", "model.depth=2",
                 "data.val_split=", "data.holdout=0.02", "--config", "demo_finetune", "--init",
                 str(enc_dir / "model.safetensors"), "--output", str(ft), "--no-progress"]) == 0
    assert main(["export", str(ft), "--to", str(clf_dir), "--ema"]) == 0
    clf = VisionLSTM.from_pretrained(clf_dir)
    ema = load_file(str(ft / "ckpt_ema/model.safetensors"))
    assert clf.num_classes == 10 and all(torch.equal(v, ema[k]) for k, v in clf.state_dict().items())
    assert list(clf.pretrained_cfg["label_names"]) == [str(i) for i in range(10)]
    card = (clf_dir / "README.md").read_text()
    assert "EMA weights" in card and "holdout_ema_top1" in card and "classification head for 10 classes" in card
    with pytest.raises(FileNotFoundError, match="no EMA checkpoint"):
        export_run(pretrain_run, tmp_path / "x", ema=True)

    assert main(["export", str(pretrain_run / "ckpt_last"), "--to", str(tmp_path / "obj"), "--objective"]) == 0
    objective = MALPretrain.from_pretrained(tmp_path / "obj")
    raw = load_file(str(pretrain_run / "ckpt_last/model.safetensors"))
    assert all(torch.equal(v, raw[k]) for k, v in objective.state_dict().items()) and len(raw) == len(
        objective.state_dict())
    with pytest.raises(ValueError, match="--objective exports a pretraining model"):
        export_run(ft, tmp_path / "y", objective=True)


def test_version_and_config_names(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mal {mal.__version__}"
    assert main(["config", "list"]) == 0
    assert "mal_base_pretrain" in capsys.readouterr().out
    for name in ("mal_base_pretrain", "mal_base_pretrain.yaml", "configs/mal_base_pretrain.yaml"):
        assert main(["config", "check", name]) == 0
    assert main(["config", "check", "mal_huge_pretrain"]) == 2
    assert "mal config list" in capsys.readouterr().err
