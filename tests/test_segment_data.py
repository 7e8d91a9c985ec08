"""Image/mask pairs: alignment through every joint augmentation, padding, the dataset's errors and splits."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mal.data import BadMaskError, SegmentationFolder, split_pairs
from mal.data.segmentation import seeded_split, seg_eval_transform, seg_train_transform

PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
IGNORE = 9
ALL_ON = dict(scale_range=(0.5, 2.0), hflip=True, vflip=True)


def _palette_pair(seed=0, h=60, w=80, block=10):
    """An image whose mask is a function of its pixels: blocks of palette colours, the mask = the colour's index."""
    lab = np.kron(np.random.default_rng(seed).integers(0, len(PALETTE), (h // block, w // block)),
                  np.ones((block, block), int)).astype(np.uint8)
    return Image.fromarray(PALETTE[lab]), Image.fromarray(lab)


def _decode(x):
    """Normalized image (3, H, W) -> the palette index nearest each pixel (H, W)."""
    px = (x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)).clamp(0, 1) * 255
    d = ((px.permute(1, 2, 0)[:, :, None, :] - torch.tensor(PALETTE, dtype=torch.float32)) ** 2).sum(-1)
    return d.argmin(-1)


def _interior(mask, r=2):
    """Pixels whose (2r+1)^2 neighbourhood holds one label, away from the crop border (resampling blends edges)."""
    m = mask.float()[None, None]
    same = (F.max_pool2d(m, 2 * r + 1, 1, r) == -F.max_pool2d(-m, 2 * r + 1, 1, r))[0, 0]
    same[:r], same[-r:], same[:, :r], same[:, -r:] = False, False, False, False
    return same & (mask != IGNORE)


@pytest.mark.parametrize("aug", [dict(scale_range=(0.5, 0.5)), dict(scale_range=(2.0, 2.0)), dict(hflip=True),
                                 dict(vflip=True), ALL_ON])
def test_mask_stays_aligned_through_every_augmentation(aug):
    img, mask = _palette_pair()
    opts = {**dict(scale_range=(1.0, 1.0), hflip=False, vflip=False, photometric=False), **aug}
    tf = seg_train_transform((48, 48), MEAN, STD, IGNORE, **opts)
    checked = 0
    for seed in range(12):
        torch.manual_seed(seed)
        x, m = tf(img, mask)
        assert x.shape == (3, 48, 48) and m.shape == (48, 48) and m.dtype == torch.int64
        inside = _interior(m)
        assert torch.equal(_decode(x)[inside], m[inside])
        checked += int(inside.sum())
    assert checked > 1000                                                  # many pixels were compared


def test_photometric_jitter_changes_the_image_only():
    img, mask = _palette_pair(1)
    plain = seg_train_transform((48, 48), MEAN, STD, IGNORE, photometric=False, **ALL_ON)
    jitter = seg_train_transform((48, 48), MEAN, STD, IGNORE, photometric=True, **ALL_ON)
    for seed in range(6):
        torch.manual_seed(seed)
        x0, m0 = plain(img, mask)
        torch.manual_seed(seed)
        x1, m1 = jitter(img, mask)
        assert torch.equal(m0, m1) and not torch.allclose(x0, x1)        # same geometry, other colours


def test_padding_is_ignored_and_black():
    img, mask = _palette_pair(2, h=20, w=30)
    x, m = seg_train_transform((48, 48), MEAN, STD, IGNORE, scale_range=(1, 1), hflip=False, photometric=False)(
        img, mask)
    pad = m == IGNORE
    assert int(pad.sum()) == 48 * 48 - 20 * 30
    black = ((0 - torch.tensor(MEAN)) / torch.tensor(STD)).view(3, 1)
    assert torch.allclose(x[:, pad], black.expand(3, int(pad.sum())))
    x, m = seg_eval_transform(MEAN, STD, IGNORE)(img, mask)                  # eval: the full image as it is
    assert x.shape == (3, 20, 30) and torch.equal(m, torch.from_numpy(np.array(mask)).long())


def _write(root, split, n, size=(16, 12), labels=(0, 1, 2), mask_size=None, skip=()):
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / split / f"{i}.jpg")
        if i not in skip:
            ms = mask_size or size
            Image.fromarray(rng.choice(labels, (ms[1], ms[0])).astype(np.uint8)).save(root / f"{split}annot/{i}.png")


def test_folder_pairs_and_clear_errors(tmp_path):
    _write(tmp_path, "train", 4)
    ds = SegmentationFolder(split_pairs(tmp_path, "train", "{split}", "{split}annot"), 3,
                            transform=seg_eval_transform(MEAN, STD, -1))
    x, m = ds[1]
    assert len(ds) == 4 and x.shape == (3, 12, 16) and set(m.unique().tolist()) <= {0, 1, 2}
    _write(tmp_path, "val", 3, skip=(1,))
    with pytest.raises(BadMaskError, match=r"1 of the 3 images .* have no mask .*1\.png"):
        split_pairs(tmp_path, "val", "{split}", "{split}annot")
    _write(tmp_path, "bad", 2, mask_size=(8, 12))
    with pytest.raises(BadMaskError, match="is 8×12 but its image .* is 16×12"):
        SegmentationFolder(split_pairs(tmp_path, "bad", "{split}", "{split}annot"), 3)[0]
    _write(tmp_path, "labels", 2, labels=(0, 1, 7, IGNORE))
    pairs = split_pairs(tmp_path, "labels", "{split}", "{split}annot")
    with pytest.raises(BadMaskError, match=r"holds the labels \[7\], outside \[0, 3\) and not the ignore index 9"):
        SegmentationFolder(pairs, 3, ignore_index=IGNORE)[0]
    with pytest.raises(BadMaskError, match=r"0/255 binary mask"):
        _write(tmp_path, "bin", 1, labels=(0, 255))
        SegmentationFolder(split_pairs(tmp_path, "bin", "{split}", "{split}annot"), 2)[0]
    with pytest.raises(FileNotFoundError, match="mask folder .*nosuchannot does not exist"):
        _write(tmp_path, "nosuch", 1)
        import shutil
        shutil.rmtree(tmp_path / "nosuchannot")
        split_pairs(tmp_path, "nosuch", "{split}", "{split}annot")


def test_unreadable_image_is_skipped_unless_strict(tmp_path):
    _write(tmp_path, "train", 3)
    (tmp_path / "train/1.jpg").write_bytes(b"not a jpeg")
    pairs = split_pairs(tmp_path, "train", "{split}", "{split}annot")
    ds = SegmentationFolder(pairs, 3, transform=seg_eval_transform(MEAN, STD, -1))
    assert torch.equal(ds[1][1], ds[2][1]) and ds.num_bad == 1 and ds.bad_files[0].endswith("1.jpg")
    with pytest.raises(Exception, match="cannot read image file"):
        SegmentationFolder(pairs, 3, strict=True)[1]


def test_seeded_split_of_one_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(10):
        Image.new("RGB", (8, 8)).save(tmp_path / f"images/{i:02d}.jpg")
        Image.new("L", (8, 8)).save(tmp_path / f"masks/{i:02d}.png")
    parts = {s: split_pairs(tmp_path, s, "images", "masks", [6, 2, 2], 3) for s in ("train", "val", "test")}
    assert [len(p) for p in parts.values()] == [6, 2, 2]
    assert len({p for ps in parts.values() for p in ps}) == 10                 # disjoint, every pair once
    assert parts["val"] == split_pairs(tmp_path, "val", "images", "masks", [6, 2, 2], 3)   # seeded
    assert seeded_split(10, [6, 2, 2], 4, "test") != seeded_split(10, [6, 2, 2], 3, "test")
    with pytest.raises(ValueError, match="set seg.split_sizes"):
        split_pairs(tmp_path, "train", "images", "masks")
    with pytest.raises(ValueError, match="add up to 12, more than the 10"):
        split_pairs(tmp_path, "train", "images", "masks", [8, 2, 2])
