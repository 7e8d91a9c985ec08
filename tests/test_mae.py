"""The MAE baseline on both encoders: exact masking, a loss on masked patches only, an encoder that never sees a
masked patch, ViL's restricted scan orders, strict transfer, configs, and tiny CLI runs (pretrain, probe, fine-tune,
eval)."""
import json
import math

import pytest
import torch

from mal import DecoderConfig, EncoderConfig, MAEPretrain, MaskConfig, ObjectiveConfig, VisionLSTM, VisionTransformer
from mal.checkpoint import load_encoder, load_weights
from mal.cli import main
from mal.config import load_run_config
from mal.engine.build import build_model
from mal.objectives import create_objective
from mal.serialization import SCAN_ORDERS, gather_tokens, layer_orders
from test_model import _perturb

VIL = dict(img_size=16, patch_size=4, dim=16, depth=4, cluster_size=2)                         # 4x4 grid
VIT = dict(arch="vit", img_size=16, patch_size=4, dim=16, depth=3, num_heads=2, cluster_size=2)
ENCODERS = {"vil": VIL, "vit": VIT}


def _mae(arch="vil", ratio=0.75, **enc):
    torch.manual_seed(0)
    obj = ObjectiveConfig(kind="mae", decoder=DecoderConfig(depth=2, dim=16, num_heads=2),
                          mask=MaskConfig(unit="patch", ratio=ratio))
    return MAEPretrain(EncoderConfig(**{**ENCODERS[arch], **enc}), obj).double().eval()


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.6, 0.1])
def test_exactly_the_requested_fraction_is_masked_in_every_sample(ratio):
    model = _mae(ratio=ratio)
    keep = int(16 * (1 - ratio))
    ids, = model.sample_inputs(64, torch.Generator().manual_seed(0))
    assert ids.shape == (64, 16) and torch.equal(ids.sort(1).values, torch.arange(16).expand(64, 16))
    out = model(torch.randn(64, 3, 16, 16, dtype=torch.float64), ids)
    assert torch.equal(out["mask"].sum(1), torch.full((64,), 16.0 - keep, dtype=out["mask"].dtype))
    assert model.masked_input_fraction() == (16 - keep) / 16
    removed = out["mask"].bool()
    for b in range(64):
        assert set(ids[b, :keep].tolist()) == set(torch.nonzero(~removed[b]).flatten().tolist())
    assert len({tuple(r) for r in removed.int().tolist()}) > 32                 # drawn per sample
    again, = model.sample_inputs(64, torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)                                              # the generator decides


@pytest.mark.parametrize("arch", ["vil", "vit"])
def test_loss_counts_only_the_masked_patches(arch):
    model = _mae(arch)
    imgs = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ids, = model.sample_inputs(2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(imgs, ids)
    pred, mask = out["pred"], out["mask"]
    per_patch = (pred - out["target"]).pow(2).mean(-1)                         # (B, N)
    assert torch.allclose(out["loss"].double(), per_patch[mask.bool()].mean(), rtol=1e-6)
    visible, masked = torch.nonzero(mask == 0), torch.nonzero(mask == 1)
    for (b, i), changes in ((visible[0], False), (visible[-1], False), (masked[0], True), (masked[-1], True)):
        other = pred.clone()
        other[b, i] += 1.0
        loss, _ = model.forward_loss(imgs, other, mask)
        assert torch.equal(loss, out["loss"]) != changes, (b, i, changes)


@pytest.mark.parametrize("arch,order", [("vil", o) for o in SCAN_ORDERS] + [("vit", "alternating")])
def test_encoder_never_sees_a_masked_patch(arch, order):
    """Changing a masked patch's pixels leaves the encoder output bit-identical; changing a visible one changes it."""
    model = _mae(arch, scan_order=order)
    imgs = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ids, = model.sample_inputs(2, torch.Generator().manual_seed(2))

    def latent(x):
        torch.manual_seed(5)                                                    # the random order draws the same
        with torch.no_grad():
            return model.forward_encoder(x, ids)[0]
    base = latent(imgs)
    assert base.shape == (2, model.num_keep, 16)
    for b in range(2):
        one = slice(b, b + 1)
        for i in ids[b, model.num_keep:].tolist():                              # every masked patch, one by one
            x = imgs.clone()
            x[one] = _perturb(imgs[one], torch.tensor([i]), 4, 4, seed=i)
            assert torch.equal(latent(x), base), f"sample {b} sees masked patch {i}"
        x = imgs.clone()
        x[one] = _perturb(imgs[one], ids[b, :1], 4, 4, seed=99)
        changed = latent(x)
        assert not torch.allclose(changed[b], base[b])
        assert torch.equal(changed[1 - b], base[1 - b])                         # samples do not mix


@pytest.mark.parametrize("order", ["row_fwd", "col_bwd", "alternating"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_vil_scans_the_visible_patches_in_its_fine_tuning_orders(order, bidirectional):
    """VisionLSTM.forward_visible: layer l runs on the visible tokens in the order of layer l's fine-tuning scan
    (reversed on odd layers when bidirectional), restricted to them; with every patch visible it is
    forward_features."""
    torch.manual_seed(0)
    cfg = EncoderConfig(**VIL, scan_order=order, bidirectional=bidirectional)
    enc = VisionLSTM(cfg, num_classes=0).double().eval()
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    ids_keep = torch.stack([torch.randperm(16)[:7] for _ in range(2)])          # (B, V), any order
    orders = layer_orders(order, cfg.depth, 4, 4, 2, bidirectional)
    with torch.no_grad():
        out = enc.forward_visible(gather_tokens(x, ids_keep), ids_keep)
        for b in range(2):
            t = x[b:b + 1]                                                       # raster layout, all patches
            kept = set(ids_keep[b].tolist())
            for blk, perm in zip(enc.blocks, orders):
                seq = torch.tensor([i for i in perm.tolist() if i in kept])     # the layer's scan, visible only
                t = t.clone()
                t[:, seq] = blk(t[:, seq])
            ref = enc.norm(t)[:, ids_keep[b]]
            assert torch.allclose(out[b:b + 1], ref, rtol=0, atol=1e-12)
        imgs = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        tokens = enc.patchify_embed(imgs) + enc.pos_embed
        every = torch.arange(16).expand(2, 16)
        assert torch.allclose(enc.forward_visible(tokens, every), enc.forward_features(imgs, raster=True),
                              rtol=0, atol=1e-12)


def test_vit_runs_the_visible_patches_as_a_set():
    enc = _mae("vit").encoder
    imgs = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    tokens = enc.patchify_embed(imgs) + enc.pos_embed
    with torch.no_grad():
        assert torch.allclose(enc.forward_visible(tokens, torch.arange(16).expand(2, 16)),
                              enc.forward_features(imgs, raster=True), rtol=0, atol=1e-12)
        ids = torch.tensor([[3, 9, 0, 5], [1, 2, 15, 7]])
        perm = torch.tensor([2, 0, 3, 1])
        a = enc.forward_visible(gather_tokens(tokens, ids), ids)
        b = enc.forward_visible(gather_tokens(tokens, ids[:, perm]), ids[:, perm])
        assert torch.allclose(a[:, perm], b, atol=1e-12)                         # permutation-equivariant


@pytest.mark.parametrize("arch", ["vil", "vit"])
def test_mae_learns_and_draws_its_reconstruction(arch):
    torch.manual_seed(0)
    model = create_objective(EncoderConfig(**{**ENCODERS[arch], "dim": 32}),
                             ObjectiveConfig(kind="mae", decoder=DecoderConfig(depth=1, dim=32, num_heads=4),
                                             mask=MaskConfig("patch", 0.5)))
    imgs = torch.randn(4, 3, 16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        out = model(imgs, *model.sample_inputs(4, g))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.7 * losses[0]
    ids, = model.sample_inputs(4, g)
    seen, recon, target = model.prediction_rows(imgs, ids, fill=-5.0)
    assert seen.shape == recon.shape == target.shape == imgs.shape and torch.equal(target, imgs)
    visible = ids[0, :8].tolist()
    for i in range(16):
        r, c = divmod(i, 4)
        patch = (slice(None), slice(r * 4, r * 4 + 4), slice(c * 4, c * 4 + 4))
        if i in visible:
            assert torch.equal(seen[0][patch], imgs[0][patch]) and torch.allclose(recon[0][patch], imgs[0][patch])
        else:
            assert (seen[0][patch] == -5.0).all() and not torch.allclose(recon[0][patch], imgs[0][patch])
    assert model.no_weight_decay() <= set(dict(model.named_parameters()))


@pytest.mark.parametrize("arch", ["vil", "vit"])
def test_mae_checkpoint_loads_strictly_into_a_classifier(arch):
    pre = _mae(arch)
    state = pre.state_dict()
    assert {k.split(".")[0] for k in state} == {"encoder", "decoder"}
    cls = VisionLSTM if arch == "vil" else VisionTransformer
    clf = cls(EncoderConfig(**{**ENCODERS[arch], "img_size": 24}), num_classes=10).double()
    report = load_encoder(clf, state)
    assert set(report["new"]) == {"head.weight", "head.bias"}
    assert "decoder.mask_token" in report["dropped"] and all(k.startswith("decoder.") for k in report["dropped"])
    assert torch.equal(clf.norm.weight, pre.encoder.norm.weight) and clf.pos_embed.shape[1] == 36
    bad = dict(state)
    bad["encoder.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        load_encoder(clf, bad)
    with pytest.raises(ValueError, match="missing"):
        load_encoder(clf, {k: v for k, v in state.items() if k != "encoder.norm.bias"})


def test_mae_config_errors_are_clear():
    with pytest.raises(ValueError, match="objective.kind must be one of"):
        load_run_config(None, ["objective.kind=bert"])
    with pytest.raises(ValueError, match="objective.kind=mae masks random patches: set objective.mask.unit=patch"):
        load_run_config(None, ["objective.kind=mae"])                           # the MAL default: cluster 20 %
    with pytest.raises(ValueError, match=r"objective.mask.ratio in \(0, 1\)"):
        load_run_config(None, ["objective.kind=mae", "objective.mask.unit=patch", "objective.mask.ratio=0"])
    with pytest.raises(ValueError, match="objective.decoder.kind=transformer"):
        load_run_config("cifar10_mae_vil", ["objective.decoder.kind=xlstm"])
    with pytest.raises(ValueError, match="keeps 0 of the 16 patches"):
        _mae(ratio=0.99)
    with pytest.raises(ValueError, match="needs objective.kind=mae"):
        MAEPretrain(EncoderConfig(**VIL), ObjectiveConfig())
    cfg = load_run_config("cifar10_mae_vit", ["model.cluster_size=5"])   # MAE needs no clusters
    assert cfg.objective.kind == "mae"
    with pytest.raises(ValueError, match="cluster size 5 does not divide"):
        load_run_config("cifar10_mal_vit", ["model.cluster_size=5"])
    with pytest.raises(ValueError, match="pretraining images must be 16 px"):
        _mae()(torch.randn(1, 3, 24, 24, dtype=torch.float64))


TINY = ["model.dim=32", "model.depth=2", "data.num_workers=0", "data.cache=false", "optim.batch_size=16",
        "log_every=1"]
DEC = ["objective.decoder.depth=1", "objective.decoder.dim=32", "objective.decoder.num_heads=4"]


def _pretrain(config, data, out, *extra):
    args = ["pretrain", "--config", config, "--output", str(out), "--no-progress",
            f"data.dataset={data}", *TINY, *DEC, *extra]
    assert main(args) == 0
    return json.loads((out / "summary.json").read_text())


def _finetune(config, data, init, out, *extra):
    assert main(["finetune", "--config", config, "--init", str(init), "--output", str(out),
                 "--no-progress", f"data.dataset={data}", *TINY, "optim.epochs=1", *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_mae_vit_pretrain_probe_finetune_and_eval_through_the_cli(image_folder, tmp_path):
    pre = tmp_path / "pre"
    summary = _pretrain("cifar10_mae_vit.yaml", image_folder, pre, "model.num_heads=2", "max_steps=3")
    assert math.isfinite(summary["final_loss"]) and summary["masked_input_fraction"] == 0.75
    assert 0 <= summary["knn_top1"] <= 100 and 0 <= summary["linprobe_top1"] <= 100
    assert (pre / "predictions.png").stat().st_size > 0
    ft = _finetune("cifar10_finetune_vit.yaml", image_folder, pre / "ckpt_last", tmp_path / "ft", "model.num_heads=2")
    assert 0 <= ft["val_top1"] <= 100
    res = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(pre / "ckpt_last"), "--knn", "--json", str(res),
                 "data.num_workers=0"]) == 0
    assert json.loads(res.read_text())["knn_top1"] == pytest.approx(summary["knn_top1"])   # the same probe encoder


def test_mae_vil_fine_tunes_with_every_position_as_pretrained(image_folder, tmp_path):
    """MAE trains the position of every patch, so fine-tuning loads them as they are (MAL's fixed orders leave one
    cluster's positions untrained, which fine-tuning fills: not here)."""
    pre = tmp_path / "pre"
    _pretrain("cifar10_mae_vil.yaml", image_folder, pre, "max_steps=2", "probe=false", "model.scan_order=row_fwd")
    cfg = load_run_config("cifar10_finetune", [f"init={pre / 'ckpt_last'}", *TINY[:2],
                                               "model.scan_order=row_fwd"])
    model = build_model(cfg, num_classes=3)
    assert torch.equal(model.pos_embed, load_weights(pre / "ckpt_last")["encoder.pos_embed"])
    ft = _finetune("cifar10_finetune.yaml", image_folder, pre / "ckpt_last", tmp_path / "ft")
    assert 0 <= ft["val_top1"] <= 100


# ----------------------------------------------------------------------------------------------- GPU
GPU_ENC = dict(img_size=48, patch_size=4, dim=64, depth=4, cluster_size=4)


@pytest.mark.needs_gpu
def test_mae_vil_fast_path_matches_plain_path_on_gpu():
    """The fused ViL blocks (Triton mLSTM, compiled regions) on per-sample visible-token orders, in bf16."""
    torch.manual_seed(0)
    obj = ObjectiveConfig(kind="mae", decoder=DecoderConfig(depth=1, dim=32, num_heads=4),
                          mask=MaskConfig("patch", 0.75))
    plain = MAEPretrain(EncoderConfig(**GPU_ENC, mlstm_backend="torch"), obj).cuda()
    fast = MAEPretrain(EncoderConfig(**GPU_ENC), obj).cuda()
    fast.load_state_dict(plain.state_dict())
    fast.fast_path()
    imgs = torch.randn(8, 3, 48, 48, device="cuda")
    ids, = plain.sample_inputs(8, torch.Generator().manual_seed(0), "cuda")

    def run(m, amp):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = m(imgs, ids)["loss"]
        loss.backward()
        return loss.float(), torch.cat([p.grad.flatten() for p in m.encoder.parameters()])
    ref, g_ref = run(plain, False)
    loss_plain, g_plain = run(plain, True)
    loss, g = run(fast, True)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert rel(loss, ref) <= 2 * rel(loss_plain, ref) + 1e-2
    assert rel(g, g_ref) <= 2 * rel(g_plain, g_ref) + 1e-2


@pytest.mark.needs_gpu
@pytest.mark.parametrize("kind,arch", [("mae", "vil"), ("mae", "vit"), ("mal", "vit")])
def test_graphed_baseline_steps_match_eager_steps(kind, arch):
    """MAE-ViL, MAE-ViT and MAL-ViT steps replayed from CUDA graphs (the trainer's default on one GPU) == eager."""
    from test_step import _steps
    torch.manual_seed(0)
    enc = EncoderConfig(**GPU_ENC, **({"arch": "vit", "num_heads": 4} if arch == "vit" else {}))
    mask = MaskConfig("patch", 0.75) if kind == "mae" else MaskConfig()
    obj = ObjectiveConfig(kind=kind, decoder=DecoderConfig(depth=1, dim=32, num_heads=4), mask=mask)
    a, b = create_objective(enc, obj).cuda().train(), create_objective(enc, obj).cuda().train()
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.fast_path()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, 48, 48, device="cuda"), *a.sample_inputs(8, g, "cuda")) for _ in range(3)]
    eager, graph = _steps(a, False, batches), _steps(b, True, batches)
    assert torch.allclose(torch.tensor(eager), torch.tensor(graph), rtol=2e-2, atol=1e-3), (eager, graph)
    assert eager[0] != eager[1]                     # the replays saw new inputs and new weights
