"""Encoder, pretraining model and classifier: causality, sizes, checkpoint transfer, input errors."""
import pytest
import torch

from mal import DecoderConfig, EncoderConfig, MALPretrain, MaskConfig, ObjectiveConfig, VisionLSTM
from mal.checkpoint import load_encoder
from mal.serialization import MASK_UNITS, SCAN_ORDERS, cluster_patch_table
from mal.models import mal_base, mal_small, mal_tiny

TINY = dict(img_size=16, patch_size=4, dim=16, depth=4, cluster_size=2)   # 4x4 grid, 4 clusters of 2x2


def _pretrain_model(order, unit, decoder="transformer", ratio=0.25):
    torch.manual_seed(0)
    enc = EncoderConfig(**TINY, scan_order=order)
    obj = ObjectiveConfig(decoder=DecoderConfig(kind=decoder, depth=2, dim=16, num_heads=2),
                          mask=MaskConfig(unit=unit, ratio=ratio if unit != "none" else 0.0))
    return MALPretrain(enc, obj).double().eval()


def _perturb(imgs, patches, p, grid_w, seed):
    """Replace the pixels of the given raster patches by new random values."""
    out = imgs.clone()
    g = torch.Generator().manual_seed(seed)
    for idx in patches.tolist():
        r, c = divmod(idx, grid_w)
        out[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = torch.randn(out.shape[0], out.shape[1], p, p, generator=g,
                                                                      dtype=out.dtype)
    return out


@pytest.mark.parametrize("decoder", ["transformer", "xlstm"])
@pytest.mark.parametrize("unit", MASK_UNITS)
@pytest.mark.parametrize("order", SCAN_ORDERS)
def test_prediction_of_next_cluster_depends_only_on_earlier_clusters(order, unit, decoder):
    model = _pretrain_model(order, unit, decoder)
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(1, 3, 16, 16, generator=g, dtype=torch.float64)
    clusters, *rest = model.sample_inputs(1, g)
    mask = rest[0] if rest else None
    table = cluster_patch_table(4, 4, 2)
    seq = clusters[0]                        # cluster ids in the sample's sequence
    kk = 4
    with torch.no_grad():
        base = model(imgs, clusters, mask)["pred"]
        changed_any = False
        for c in range(len(seq) - 1):        # prediction of cluster c+1 = decoder tokens of slot c
            sl = slice(c * kk, (c + 1) * kk)
            future = table[seq[c + 1:]].flatten()
            out = model(_perturb(imgs, future, 4, 4, seed=c), clusters, mask)["pred"]
            assert torch.equal(out[:, sl], base[:, sl]), f"cluster {c + 1} sees the future"
            own = table[seq[c]]
            out = model(_perturb(imgs, own, 4, 4, seed=100 + c), clusters, mask)["pred"]
            fully_masked = mask is not None and mask.dim() == 2 and bool(mask[0, own].all())
            if fully_masked:                 # a masked cluster's pixels are never read
                assert torch.equal(out[:, sl], base[:, sl])
            else:
                assert not torch.allclose(out[:, sl], base[:, sl]), f"cluster {c + 1} ignores cluster {c}"
                changed_any = True
        assert changed_any


def test_parameter_counts_match_official_vil():
    official = {mal_tiny: 6_381_544, mal_small: 23_378_728, mal_base: 89_223_592}
    for factory, n_ref in official.items():
        n = sum(p.numel() for p in factory(num_classes=1000, img_size=192).parameters())
        assert abs(n - n_ref) / n_ref < 0.01, (factory.__name__, n, n_ref)


def test_pretrain_checkpoint_loads_strictly_at_224():
    enc = EncoderConfig(img_size=192, patch_size=16, dim=32, depth=2, cluster_size=4)
    pre = MALPretrain(enc, ObjectiveConfig(decoder=DecoderConfig(depth=1, dim=32, num_heads=4)))
    state = pre.state_dict()
    clf = VisionLSTM(EncoderConfig(img_size=224, patch_size=16, dim=32, depth=2, cluster_size=4), num_classes=10)
    report = load_encoder(clf, state)
    assert set(report["new"]) == {"head.weight", "head.bias"}
    assert report["dropped"] and all(k.startswith(("decoder.", "mask_token")) for k in report["dropped"])
    assert "mask_token" in report["dropped"]
    assert torch.equal(clf.blocks[1].layer.proj_up.weight, pre.encoder.blocks[1].layer.proj_up.weight)
    assert clf.pos_embed.shape == (1, 196, 32)
    assert clf(torch.randn(2, 3, 224, 224)).shape == (2, 10)   # 14x14 grid, ragged clusters with k=4
    # anything else missing or unexpected is an error
    bad = dict(state)
    bad["encoder.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        load_encoder(clf, bad)
    bad = {k: v for k, v in state.items() if k != "encoder.norm.weight"}
    with pytest.raises(ValueError, match="missing"):
        load_encoder(clf, bad)
    wide = VisionLSTM(EncoderConfig(img_size=224, patch_size=16, dim=64, depth=2), num_classes=10)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_encoder(wide, state)


def test_pretraining_step_learns_and_reconstructs():
    torch.manual_seed(0)
    model = MALPretrain(EncoderConfig(img_size=16, patch_size=4, dim=32, depth=2, cluster_size=2),
                        ObjectiveConfig(decoder=DecoderConfig(depth=1, dim=32, num_heads=4)))
    imgs = torch.randn(4, 3, 16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        clusters, *mask = model.sample_inputs(4, g)
        out = model(imgs, clusters, *mask)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert out["pred"].shape == (4, 12, 48)
    assert losses[-1] < 0.7 * losses[0]
    rec = model.reconstruct(imgs, out)
    first = cluster_patch_table(4, 4, 2)[clusters[0, 0]]
    assert rec.shape == imgs.shape
    assert torch.equal(rec[0, :, 0:4, 0:4], imgs[0, :, 0:4, 0:4]) == (0 in first.tolist())


def test_forward_features_raster_and_sequence_order():
    model = VisionLSTM(EncoderConfig(img_size=32, patch_size=8, dim=16, depth=3), num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    seq = model.forward_features(x)
    ras = model.forward_features(x, raster=True)
    assert seq.shape == ras.shape == (2, 16, 16)
    assert torch.allclose(seq.sort(dim=1).values, ras.sort(dim=1).values)
    assert torch.allclose(model(x), model.forward_head(seq))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        EncoderConfig(img_size=200, patch_size=16)
    model = VisionLSTM(EncoderConfig(img_size=32, patch_size=8, dim=16, depth=1), num_classes=2)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="cluster size 5 does not divide the 12x12 patch grid"):
        MALPretrain(EncoderConfig(img_size=48, patch_size=4, dim=16, depth=1, cluster_size=5))
    with pytest.raises(ValueError, match="unknown scan order"):
        EncoderConfig(scan_order="zigzag")
    with pytest.raises(ValueError, match="unknown masking unit"):
        MaskConfig(unit="token")
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        MaskConfig(ratio=1.0)
    pre = MALPretrain(EncoderConfig(img_size=16, patch_size=4, dim=16, depth=1, cluster_size=2))
    with pytest.raises(ValueError, match="pretraining images must be 16 px"):
        pre(torch.randn(1, 3, 32, 32))
