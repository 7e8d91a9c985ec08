"""The ViT encoder: MAL on a ViT is causal over clusters (the leak test), the causal probe mode, the classifier, the
fast path, strict transfer, configs, and a tiny MAL-ViT pretrain + fine-tune through the CLI."""
import json
import math

import pytest
import timm
import torch

import mal.models.vit as vit_module
from mal import DecoderConfig, EncoderConfig, MALPretrain, MaskConfig, ObjectiveConfig, VisionLSTM, VisionTransformer
from mal.objectives import create_objective
from mal.checkpoint import load_encoder, load_weights
from mal.cli import main
from mal.config import load_run_config
from mal.engine.optim import param_groups
from mal.models import create_encoder, vit_base, vit_small, vit_tiny
from mal.serialization import MASK_UNITS, SCAN_ORDERS, cluster_patch_table, gather_tokens, scan_order
from test_model import _perturb
from test_ops_vil_block import _eager_fullgraph_compile

VIT = dict(arch="vit", img_size=16, patch_size=4, dim=16, depth=3, num_heads=2, cluster_size=2)   # 4x4 grid


def _mal_vit(order, unit, ratio=0.25):
    torch.manual_seed(0)
    obj = ObjectiveConfig(decoder=DecoderConfig(depth=2, dim=16, num_heads=2),
                          mask=MaskConfig(unit=unit, ratio=ratio if unit != "none" else 0.0))
    return MALPretrain(EncoderConfig(**VIT, scan_order=order), obj).double().eval()


@pytest.mark.parametrize("unit", MASK_UNITS)
@pytest.mark.parametrize("order", SCAN_ORDERS)
def test_vit_prediction_of_next_cluster_depends_only_on_earlier_clusters(order, unit):
    """MAL on a ViT: the prediction of cluster t+1 is bit-identical when clusters >= t+1 change, and changes
    when cluster t changes (unless all of it is masked)."""
    model = _mal_vit(order, unit)
    assert isinstance(model.encoder, VisionTransformer)
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    clusters, *rest = model.sample_inputs(2, g)
    mask = rest[0] if rest else None
    table, kk = cluster_patch_table(4, 4, 2), 4
    with torch.no_grad():
        base = model(imgs, clusters, mask)["pred"]
        for b in range(2):
            seq, changed_any = clusters[b], False
            for c in range(len(seq) - 1):                                   # prediction of cluster c+1 = slot c
                sl = slice(c * kk, (c + 1) * kk)
                one = imgs[b:b + 1]
                m = None if mask is None else mask[b:b + 1]
                ref = base[b:b + 1, sl]
                out = model(_perturb(one, table[seq[c + 1:]].flatten(), 4, 4, seed=c), clusters[b:b + 1], m)["pred"]
                assert torch.equal(out[:, sl], ref), f"cluster {c + 1} sees the future"
                own = table[seq[c]]
                out = model(_perturb(one, own, 4, 4, seed=100 + c), clusters[b:b + 1], m)["pred"]
                if m is not None and m.dim() == 2 and bool(m[0, own].all()):   # a masked cluster is never read
                    assert torch.equal(out[:, sl], ref)
                else:
                    assert not torch.allclose(out[:, sl], ref), f"cluster {c + 1} ignores cluster {c}"
                    changed_any = True
            assert changed_any


@pytest.mark.parametrize("order", ["row_fwd", "col_bwd", "alternating"])
def test_causal_vit_probe_encoder_sees_only_earlier_clusters_on_a_ragged_grid(order):
    """bidirectional=false (the MAL-ViT probe encoder): a token sees its own cluster and the earlier clusters of the
    scan order's cluster sequence ((a)'s for alternating), also where k does not divide the grid (5x5, k=2)."""
    torch.manual_seed(0)
    cfg = EncoderConfig(**{**VIT, "img_size": 20, "scan_order": order, "bidirectional": False})
    enc = VisionTransformer(cfg, num_classes=0).double().eval()
    perm = scan_order(5, 5, 2, order if order != "alternating" else "row_fwd")
    cluster = (perm // 5) // 2 * 3 + (perm % 5) // 2                         # cluster of each sequence position
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    with torch.no_grad():
        base = enc.forward_features(x)                                      # (1, 25, D) in the scan order
        assert torch.equal(enc.forward_features(x, raster=True), gather_tokens(base, perm.argsort()))
        first_of = {int(c): t for t, c in reversed(list(enumerate(cluster)))}
        for c, start in sorted(first_of.items(), key=lambda kv: kv[1]):
            later = perm[start:][cluster[start:] != c]                      # raster patches of later clusters
            if len(later):
                out = enc.forward_features(_perturb(x, later, 4, 5, seed=c))
                assert torch.equal(out[:, :start + (cluster == c).sum()], base[:, :start + (cluster == c).sum()])
            out = enc.forward_features(_perturb(x, perm[cluster == c], 4, 5, seed=50 + c))
            assert not torch.allclose(out[:, start], base[:, start])       # its own cluster: seen
    full = VisionTransformer(EncoderConfig(**{**VIT, "img_size": 20}), num_classes=0).double().eval()
    full.load_state_dict(enc.state_dict())
    with torch.no_grad():
        out = full.forward_features(_perturb(x, perm[-1:], 4, 5, seed=9))
        assert not torch.allclose(out[:, perm[0]], full.forward_features(x)[:, perm[0]])   # bidirectional: sees all


def test_vit_matches_timm_sizes_and_pools_the_mean():
    for factory, timm_name in ((vit_tiny, "vit_tiny_patch16_224"), (vit_small, "vit_small_patch16_224"),
                               (vit_base, "vit_base_patch16_224")):
        ours = factory(num_classes=1000, img_size=192)
        ref = timm.create_model(timm_name, pretrained=False, img_size=192, class_token=False, global_pool="avg",
                                fc_norm=False, num_classes=1000)
        count = lambda m: sum(p.numel() for p in m.parameters())
        assert count(ours) == count(ref), timm_name
    torch.manual_seed(0)
    m = VisionTransformer(EncoderConfig(**VIT), num_classes=5).eval()
    x = torch.randn(2, 3, 16, 16)
    tokens = m.forward_features(x)
    assert tokens.shape == (2, 16, 16) and torch.equal(tokens, m.forward_features(x, raster=True))
    assert torch.allclose(m(x), m.head(tokens.mean(1)))
    assert m.head.weight.std().item() < 1e-4                                 # MAE's fine-tuning head init
    assert m(torch.randn(2, 3, 24, 24)).shape == (2, 5)                       # position embedding resampled


def test_vit_layer_decay_counts_each_block_as_a_layer():
    model = VisionTransformer(EncoderConfig(**{**VIT, "depth": 12}), num_classes=3)
    scales = {n: g["lr_scale"] for g in param_groups(model, 0.05, 0.75, 1) for p in g["params"]
              for n, q in model.named_parameters() if q is p}
    assert scales["head.weight"] == scales["norm.weight"] == 1.0
    assert scales["blocks.11.attn.qkv.weight"] == 0.75
    assert scales["patch_embed.weight"] == scales["pos_embed"] == pytest.approx(0.75 ** 13)   # MAE's ViT-B range


@pytest.mark.parametrize("compile,checkpoint", [(False, True), (True, False), (True, True)])
def test_vit_fast_path_is_the_same_function(compile, checkpoint):
    torch.manual_seed(0)
    enc = VisionTransformer(EncoderConfig(**{**VIT, "drop_path_rate": 0.0}), num_classes=0).double()
    keys = list(enc.state_dict())
    x = torch.randn(2, 8, 16, dtype=torch.float64)

    def run():
        enc.zero_grad(set_to_none=True)
        out = enc.forward_clusters(x, 2)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    ref, ref_g = run()
    vit_module._COMPILED.clear()
    with _eager_fullgraph_compile():                                        # dynamo, fullgraph: no graph break
        enc.fast_path(compile=compile, checkpoint=checkpoint)
        out, g = run()
    vit_module._COMPILED.clear()
    assert list(enc.state_dict()) == keys
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    assert g.keys() == ref_g.keys() and len(g) == len(list(enc.blocks.parameters())) + 2   # blocks and norm
    assert all(torch.allclose(g[k], ref_g[k], rtol=0, atol=1e-12) for k in g)
    enc.fast_path(enabled=False)
    assert enc.fast is None
    with pytest.raises(ValueError, match="recompute_qkv"):
        enc.fast_path(recompute_qkv=True)


def test_mal_vit_checkpoint_loads_strictly_into_a_classifier():
    pre = _mal_vit("alternating", "cluster")
    state = pre.state_dict()
    clf = VisionTransformer(EncoderConfig(**{**VIT, "img_size": 24}), num_classes=10).double()
    report = load_encoder(clf, state)
    assert set(report["new"]) == {"head.weight", "head.bias"}
    assert report["dropped"] and all(k.startswith(("decoder.", "mask_token")) for k in report["dropped"])
    assert torch.equal(clf.blocks[2].attn.qkv.weight, pre.encoder.blocks[2].attn.qkv.weight)
    assert clf.pos_embed.shape == (1, 36, 16)                                # 4x4 -> 6x6, resampled
    bad = dict(state)
    bad["encoder.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        load_encoder(clf, bad)
    with pytest.raises(ValueError, match="missing"):
        load_encoder(clf, {k: v for k, v in state.items() if k != "encoder.blocks.0.attn.qkv.weight"})
    vil = VisionLSTM(EncoderConfig(img_size=16, patch_size=4, dim=16, depth=3, cluster_size=2), num_classes=10)
    with pytest.raises(ValueError, match="missing"):
        load_encoder(vil, state)                                             # a ViT is no ViL


def test_vit_config_errors_are_clear():
    with pytest.raises(ValueError, match="model.arch must be one of"):
        EncoderConfig(arch="mamba")
    with pytest.raises(ValueError, match="divisible by model.num_heads"):
        EncoderConfig(arch="vit", dim=192, num_heads=5)
    with pytest.raises(ValueError, match="model.conv_kernel_size=3 only applies to model.arch=vil"):
        load_run_config(None, ["preset=vit_tiny", "model.conv_kernel_size=3"])
    with pytest.raises(ValueError, match="model.mlstm_backend='torch' only applies"):
        load_run_config(None, ["model.arch=vit", "model.mlstm_backend=torch"])
    with pytest.raises(ValueError, match="recompute_qkv=true recomputes the mLSTM cell"):
        load_run_config(None, ["preset=vit_tiny", "recompute_qkv=true"])
    assert load_run_config(None, ["preset=vit_tiny", "recompute=true"]).recompute
    cfg = load_run_config(None, ["preset=vit_small"]).model
    assert (cfg.arch, cfg.dim, cfg.depth, cfg.num_heads) == ("vit", 384, 12, 6)
    assert isinstance(create_encoder(EncoderConfig(**VIT)), VisionTransformer)
    with pytest.raises(ValueError, match="VisionLSTM needs model.arch=vil"):
        VisionLSTM(EncoderConfig(**VIT))
    with pytest.raises(ValueError, match="VisionTransformer needs model.arch=vit"):
        VisionTransformer(EncoderConfig(img_size=16, patch_size=4))


TINY = ["model.dim=32", "model.depth=2", "model.num_heads=2", "objective.decoder.depth=1", "objective.decoder.dim=32",
        "objective.decoder.num_heads=4", "data.num_workers=0", "data.cache=false", "optim.batch_size=16",
        "log_every=1"]


def test_mal_vit_pretrain_then_finetune_through_the_cli(image_folder, tmp_path):
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    assert main(["pretrain", "--config", "cifar10_mal_vit", "--output", str(pre),
                 "--no-progress", f"data.dataset={image_folder}", *TINY, "max_steps=3"]) == 0
    summary = json.loads((pre / "summary.json").read_text())
    assert math.isfinite(summary["final_loss"]) and 0 <= summary["knn_top1"] <= 100
    meta = json.loads((pre / "ckpt_last/meta.json").read_text())
    assert meta["config"]["model"]["arch"] == "vit" and meta["config"]["objective"]["kind"] == "mal"
    assert main(["finetune", "--config", "cifar10_finetune_vit", "--init",
                 str(pre / "ckpt_last"), "--output", str(ft), "--no-progress", f"data.dataset={image_folder}",
                 *TINY[:3], "data.num_workers=0", "data.cache=false", "optim.batch_size=16", "optim.epochs=1"]) == 0
    assert 0 <= json.loads((ft / "summary.json").read_text())["val_top1"] <= 100
    weights, init = load_weights(ft / "ckpt_last"), load_weights(pre / "ckpt_last")
    assert weights.keys() == {k[len("encoder."):] for k in init if k.startswith("encoder.")} | {"head.weight",
                                                                                               "head.bias"}
    code = main(["finetune", "--config", "cifar10_finetune", "--init", str(pre / "ckpt_last"),
                 "--output", str(tmp_path / "bad"), f"data.dataset={image_folder}", "model.dim=32", "model.depth=2",
                 "data.num_workers=0"])
    assert code == 2                                                         # a ViT checkpoint into a ViL config


# ----------------------------------------------------------------------------------------------- GPU
GPU_ENC = dict(arch="vit", img_size=48, patch_size=4, dim=64, depth=4, num_heads=4, cluster_size=4)


@pytest.mark.needs_gpu
@pytest.mark.parametrize("checkpoint", [False, True])
def test_compiled_vit_bf16_matches_plain_on_gpu(checkpoint):
    torch.manual_seed(0)
    plain = VisionTransformer(EncoderConfig(**GPU_ENC), num_classes=0).cuda()
    fast = VisionTransformer(EncoderConfig(**GPU_ENC), num_classes=0).cuda()
    fast.load_state_dict(plain.state_dict())
    fast.fast_path(compile=True, checkpoint=checkpoint)
    x = torch.randn(8, 128, 64, device="cuda")

    def run(m, dtype):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
            out = m.forward_clusters(x, 4)
        out.float().square().mean().backward()
        return out.float(), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    ref, g_ref = run(plain, torch.float32)
    out_plain, g_plain = run(plain, torch.bfloat16)
    out, g = run(fast, torch.bfloat16)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert rel(out, ref) <= 2 * rel(out_plain, ref) + 1e-2
    assert rel(g, g_ref) <= 2 * rel(g_plain, g_ref) + 1e-2


@pytest.mark.parametrize("kind", ["mal", "mae"])
def test_pretraining_decoders_fast_path_is_the_same_function(kind):
    """fast_path runs a Transformer decoder's block stack through the ViT's compiled stack (one graph, no graph
    break): the same loss and gradients, the same parameter names; fast_path(enabled=False) goes back."""
    torch.manual_seed(0)
    obj = ObjectiveConfig(kind=kind, decoder=DecoderConfig(depth=2, dim=16, num_heads=2),
                          mask=MaskConfig("patch", 0.75) if kind == "mae" else MaskConfig())
    model = create_objective(EncoderConfig(**{**VIT, "arch": "vil", "num_heads": 4}), obj).double()
    keys = list(model.state_dict())
    imgs = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    draws = model.sample_inputs(2, torch.Generator().manual_seed(0))

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(imgs, *draws)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.decoder.named_parameters()}
    ref, ref_g = run()
    vit_module._COMPILED.clear()
    with _eager_fullgraph_compile():
        model.decoder.fast_path() if kind == "mal" else model.fast_path()   # MAE: the encoder's is the plain path
        assert model.decoder.fast is not None
        out, g = run()
        assert vit_module._COMPILED                                         # the decoder's stack was compiled
    vit_module._COMPILED.clear()
    assert list(model.state_dict()) == keys
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    assert all(torch.allclose(g[k], ref_g[k], rtol=0, atol=1e-12) for k in ref_g)
    model.decoder.fast_path(enabled=False) if kind == "mal" else model.fast_path(enabled=False)
    assert model.decoder.fast is None
