"""Multi-level encoder features (timm's forward_intermediates), the Segmenter, and strict transfer of pretrained
encoders into it."""
import pytest
import torch

from mal.checkpoint import save_checkpoint
from mal.config import EncoderConfig, SegConfig, load_run_config, to_dict
from mal.engine.build import build_model
from mal.models import VisionLSTM, VisionTransformer, create_encoder
from mal.objectives import create_objective
from mal.segment import Segmenter, default_out_indices
from mal.segment.model import windows
from mal.serialization import layer_orders

TINY = dict(img_size=32, patch_size=4, dim=16, depth=4, num_heads=2, cluster_size=3)


def _vil(order="alternating", bidirectional=True, **kw):
    torch.manual_seed(0)
    return VisionLSTM(EncoderConfig(**{**TINY, "scan_order": order, "bidirectional": bidirectional, **kw}), 0).eval()


def _hand_intermediates(model, x, orders):
    """Run the blocks one at a time on raster tokens: block l reads them in its order and writes them back."""
    h, w = model.grid_of(x)
    r = model.patchify_embed(x) + model.pos_embed_for(h, w)                   # (B, hw, D) raster
    outs = []
    for blk, order in zip(model.blocks, orders):
        r = r.clone()
        r[:, order] = blk(r[:, order])
        outs.append(r)
    return outs


@pytest.mark.parametrize("order,bidirectional", [("alternating", True), ("alternating", False), ("row_bwd", True),
                                                 ("col_fwd", False)])
def test_vil_intermediates_are_each_blocks_raster_tokens(order, bidirectional):
    """A 5x7 grid with clusters of 3 (ragged last row and column): every intermediate is the block's output put back
    in raster order, computed by hand."""
    model, x = _vil(order, bidirectional), torch.randn(2, 3, 20, 28)
    with torch.no_grad():
        want = _hand_intermediates(model, x, layer_orders(order, 4, 5, 7, 3, bidirectional))
        got = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        final, nchw = model.forward_intermediates(x, indices=[0, -1], norm=True)
    assert len(got) == 4 and all(torch.allclose(g, w_, atol=1e-6) for g, w_ in zip(got, want))
    assert [tuple(t.shape) for t in nchw] == [(2, 16, 5, 7)] * 2
    assert torch.allclose(nchw[0], model.norm(want[0]).reshape(2, 5, 7, 16).permute(0, 3, 1, 2), atol=1e-6)
    assert torch.allclose(nchw[0][:, :, 2, 3], model.norm(want[0])[:, 2 * 7 + 3], atol=1e-6)   # (row 2, col 3)
    assert torch.allclose(final, model.forward_features(x, raster=True), atol=1e-6)


def test_vil_random_order_intermediates_match_forward_features():
    """Per-sample random cluster sequences: the last intermediate (normed) is forward_features' raster output."""
    model, x = _vil("random"), torch.randn(3, 3, 20, 28)
    with torch.no_grad():
        torch.manual_seed(5)
        final, (last,) = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC")
        torch.manual_seed(5)
        ref = model.forward_features(x, raster=True)
    assert torch.allclose(last, ref, atol=1e-6) and torch.allclose(final, ref, atol=1e-6)


def test_intermediates_indices_and_options_follow_timm():
    model, x = _vil(), torch.randn(1, 3, 16, 24)
    with torch.no_grad():
        everything = model.forward_intermediates(x, intermediates_only=True)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=[2, 0], intermediates_only=True)
        final, early = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert len(everything) == 4 and everything[0].shape == (1, 16, 4, 6)
    assert all(torch.equal(a, b) for a, b in zip(last2, everything[2:]))
    assert torch.equal(picked[0], everything[2]) and torch.equal(picked[1], everything[0])
    assert torch.allclose(final, model.norm(everything[1].flatten(2).transpose(1, 2)), atol=1e-6)   # stopped at 1
    for bad in (dict(indices=5), dict(indices=[4]), dict(output_fmt="NHWC")):
        with pytest.raises(ValueError):
            model.forward_intermediates(x, **bad)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_vit_intermediates_in_raster_order(bidirectional):
    torch.manual_seed(0)
    cfg = EncoderConfig(arch="vit", **{**TINY, "num_heads": 2}, bidirectional=bidirectional)
    model, x = VisionTransformer(cfg, 0).eval(), torch.randn(2, 3, 20, 28)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[1, 3], norm=True)
        ref = model.forward_features(x, raster=True)
    assert [tuple(t.shape) for t in inter] == [(2, 16, 5, 7)] * 2
    assert torch.allclose(inter[1].flatten(2).transpose(1, 2), ref, atol=1e-5)
    assert torch.allclose(final, ref, atol=1e-5)


@pytest.mark.parametrize("arch", ["vil", "vit"])
def test_prune_intermediate_layers(arch):
    torch.manual_seed(0)
    model = create_encoder(EncoderConfig(arch=arch, **TINY), num_classes=5).eval()
    x = torch.randn(1, 3, 16, 24)
    with torch.no_grad():
        before = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert model.prune_intermediate_layers([0, 2]) == [0, 2]
        after = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        feats = model.forward_features(x)
    assert len(model.blocks) == 3 and model.cfg.depth == 3 and isinstance(model.head, torch.nn.Identity)
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and feats.shape == (1, 24, 16)


def test_segmenter_logits_at_any_size_whole_and_slide():
    torch.manual_seed(0)
    seg = SegConfig(channels=16, feature_scales=[4, 2, 1, 0.5], crop_size=(32, 32), stride=(16, 16))
    model = Segmenter(EncoderConfig(**TINY), seg, num_classes=3).eval()
    assert model.out_indices == [0, 1, 2, 3] and default_out_indices(24) == [5, 11, 17, 23]
    x = torch.randn(2, 3, 30, 45)                                          # not multiples of the patch: padded
    assert model(x).shape == (2, 3, 30, 45)
    assert model.predict(x, "slide").shape == (2, 3, 30, 45)
    small = x[..., :28, :28]                                               # one window covers it: slide == whole
    assert torch.allclose(model.predict(small, "slide"), model.predict(small, "whole"), atol=1e-5)
    assert windows((30, 45), (32, 32), (16, 16)) == [(0, 30, 0, 32), (0, 30, 13, 45)]


def _save_pretraining(tmp_path, name, overrides):
    cfg = load_run_config(None, ["model.img_size=32", "model.patch_size=4", "model.dim=16", "model.depth=4",
                                 "model.num_heads=2", "model.cluster_size=2", "objective.decoder.depth=1",
                                 "objective.decoder.dim=16", "objective.decoder.num_heads=2", *overrides])
    torch.manual_seed(1)
    obj = create_objective(cfg.model, cfg.objective)
    folder = save_checkpoint(tmp_path / name / "ckpt_last", obj.state_dict(), {"step": 0},
                             {"task": cfg.task, "step": 0, "config": to_dict(cfg), "num_classes": 0, "classes": []})
    return obj, folder


def _seg_config(init, *extra):
    return load_run_config(None, ["task=segment", "num_classes=3", f"init={init}", "model.img_size=48",
                                  "model.patch_size=4", "model.dim=16", "model.depth=4", "model.num_heads=2",
                                  "seg.channels=16", "seg.crop_size=[32,32]", *extra])


@pytest.mark.parametrize("objective", [["objective.kind=mal"], ["objective.kind=mae", "objective.mask.unit=patch",
                                                                 "objective.mask.ratio=0.75"]])
def test_strict_encoder_transfer_from_pretraining(tmp_path, objective):
    """MAL and MAE checkpoints load strictly into the segmenter's encoder; the position embedding is resampled
    from the 8x8 pretraining grid to 12x12."""
    obj, folder = _save_pretraining(tmp_path, "pre", objective)
    model = build_model(_seg_config(folder), 3)
    own, pre = model.encoder.state_dict(), obj.encoder.state_dict()
    assert own.keys() == pre.keys()
    assert all(torch.equal(own[k], pre[k]) for k in own if k != "pos_embed")
    assert pre["pos_embed"].shape == (1, 64, 16) and own["pos_embed"].shape == (1, 144, 16)
    scratch = build_model(_seg_config(""), 3)
    assert not torch.equal(scratch.encoder.blocks[0].layer.proj_up.weight, pre["blocks.0.layer.proj_up.weight"])


def test_encoder_transfer_from_a_classifier_and_mismatches(tmp_path):
    torch.manual_seed(2)
    cfg = load_run_config(None, ["task=supervised", "model.img_size=32", "model.patch_size=4", "model.dim=16",
                                 "model.depth=4", "model.num_heads=2"])
    clf = create_encoder(cfg.model, num_classes=10)
    folder = save_checkpoint(tmp_path / "clf/ckpt_last", clf.state_dict(), {"step": 0},
                             {"task": "supervised", "step": 0, "config": to_dict(cfg), "num_classes": 10, "classes": []})
    model = build_model(_seg_config(folder), 3)                            # the 10-class head is left out
    assert torch.equal(model.encoder.blocks[3].norm.weight, clf.blocks[3].norm.weight)
    with pytest.raises(ValueError, match="model.dim: checkpoint 16 vs config 24"):
        build_model(_seg_config(folder, "model.dim=24"), 3)
    with pytest.raises(ValueError, match="model.arch=vil, the config has model.arch=vit"):
        build_model(_seg_config(folder, "model.arch=vit", "model.num_heads=2"), 3)
