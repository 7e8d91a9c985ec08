"""Tests for mal.data: image folders, mode conversion, bad files, cache, default set, transforms,
loaders. CPU only, small synthetic folders plus (if present) a few real CIFAR-10 JPEGs."""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mal.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    BadImageError,
    DataWarning,
    ImageFolderDataset,
    build_dataset,
    build_loader,
    default_dataset,
    eval_transform,
    finetune_transform,
    pretrain_transform,
    set_loader_epoch,
    to_rgb8,
)

CIFAR_TAR = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz"
SIDE = 8


def _solid(color: tuple[int, int, int], side: int = SIDE) -> Image.Image:
    return Image.new("RGB", (side, side), color)


def make_folder(root: Path, per_class: dict[str, int], side: int = SIDE) -> Path:
    """root/<class>/<i>.png with distinct solid colours (lossless, so pixels are checkable)."""
    for c, (name, n) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _solid((10 * c + i, 100 + i, 200 - c), side).save(root / name / f"{i:03d}.png")
    return root


def write_garbage_jpg(path: Path) -> None:
    path.write_bytes(b"this is not an image at all" * 10)


def write_truncated_jpg(path: Path) -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def rgb_array(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return arr


# ---------------------------------------------------------------- layout and errors


def test_folder_layout_labels_and_attributes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"b_cls": 2, "a_cls": 3})
    (root / "a_cls" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(root)
    assert ds.classes == ["a_cls", "b_cls"]
    assert ds.class_to_idx == {"a_cls": 0, "b_cls": 1}
    assert len(ds) == 5 and ds.targets == [0, 0, 0, 1, 1]
    assert [Path(p).name for p, _ in ds.samples[:3]] == ["000.png", "001.png", "002.png"]
    img, label = ds[3]
    assert label == 1 and img.size == (SIDE, SIDE)
    # b_cls was created first (c=0): its file 000.png has colour (0, 100, 200)
    assert tuple(rgb_array(img)[0, 0]) == (0, 100, 200)


def test_missing_root_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        ImageFolderDataset(missing)
    assert str(missing) in str(err.value) and "<class" in str(err.value)


def test_no_class_folders_or_no_images(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    _solid((1, 2, 3)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "flat")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no image"):
        ImageFolderDataset(tmp_path / "noimg")


def test_empty_class_folder_warns_and_is_kept(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"cat": 2, "dog": 2})
    (root / "bird").mkdir()
    with pytest.warns(DataWarning, match="bird"):
        ds = ImageFolderDataset(root)
    assert ds.classes == ["bird", "cat", "dog"] and ds.empty_classes == ["bird"]
    assert sorted(set(ds.targets)) == [1, 2]
    assert ds[0][1] == 1


# ---------------------------------------------------------------- mode conversion


def test_mode_conversion_values() -> None:
    s = (4, 4)
    grey = to_rgb8(Image.new("L", s, 128))
    assert (rgb_array(grey) == 128).all()

    onebit = to_rgb8(Image.new("1", s, 1))
    assert (rgb_array(onebit) == 255).all()

    rgba = Image.new("RGBA", s, (200, 10, 20, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent → white background
    out = rgb_array(to_rgb8(rgba))
    assert tuple(out[1, 1]) == (200, 10, 20) and tuple(out[0, 0]) == (255, 255, 255)
    half = rgb_array(to_rgb8(Image.new("RGBA", s, (0, 0, 0, 128))))  # half black on white
    assert abs(int(half[0, 0, 0]) - 127) <= 1

    la = rgb_array(to_rgb8(Image.new("LA", s, (50, 0))))
    assert (la == 255).all()

    cmyk = Image.new("CMYK", s, (0, 0, 0, 0))
    cmyk.putpixel((0, 0), (255, 0, 0, 0))  # pure cyan
    out = rgb_array(to_rgb8(cmyk))
    assert tuple(out[1, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 255, 255)

    pal = Image.new("P", s, 0)
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.putpixel((0, 0), 1)
    out = rgb_array(to_rgb8(pal))
    assert tuple(out[1, 1]) == (10, 20, 30) and tuple(out[0, 0]) == (40, 50, 60)
    pal.info["transparency"] = 1  # index 1 transparent → white
    out = rgb_array(to_rgb8(pal))
    assert tuple(out[1, 1]) == (10, 20, 30) and tuple(out[0, 0]) == (255, 255, 255)


def test_high_bit_depth_scaling() -> None:
    a16 = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)  # 32896 = 128*257
    for mode, arr in [("I;16", a16), ("I;16B", a16.astype(">u2"))]:
        img = Image.frombytes(mode, (2, 2), arr.tobytes())
        assert img.mode == mode
        out = rgb_array(to_rgb8(img))[..., 0]
        assert out.tolist() == [[0, 255], [128, 1]], mode  # scaled, not clipped at 255
    as_i = Image.fromarray(a16.astype(np.int32))
    assert as_i.mode == "I"
    assert rgb_array(to_rgb8(as_i))[..., 0].tolist() == [[0, 255], [128, 1]]

    f01 = Image.fromarray(np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32))
    assert f01.mode == "F"
    assert rgb_array(to_rgb8(f01))[..., 0].tolist() == [[0, 255], [128, 64]]
    fwide = Image.fromarray(np.array([[-1.0, 3.0], [1.0, 1.0]], dtype=np.float32))
    assert rgb_array(to_rgb8(fwide))[..., 0].tolist() == [[0, 255], [128, 128]]  # min-max


def test_mixed_modes_from_files(tmp_path: Path) -> None:
    """Every file comes out of the dataset as 3-channel uint8 with the right values."""
    d = tmp_path / "mixed" / "x"
    d.mkdir(parents=True)
    Image.new("L", (5, 5), 128).save(d / "a_grey.png")
    Image.fromarray(np.full((5, 5), 65535, dtype=np.uint16)).save(d / "b_16bit.png")
    Image.new("RGBA", (5, 5), (0, 0, 0, 0)).save(d / "c_rgba.png")
    Image.new("CMYK", (5, 5), (0, 255, 0, 0)).save(d / "d_cmyk.jpg", quality=100)
    pal = Image.new("P", (5, 5), 0)
    pal.putpalette([90, 80, 70] + [0] * 765)
    pal.save(d / "e_pal.gif")
    Image.new("1", (5, 5), 0).save(d / "f_1bit.bmp")
    Image.fromarray(np.full((5, 5), 0.5, dtype=np.float32)).save(d / "g_float.tif")

    with Image.open(d / "b_16bit.png") as raw:
        assert raw.mode.startswith("I")  # really stored as 16-bit
    ds = ImageFolderDataset(tmp_path / "mixed")
    got = {Path(p).stem: rgb_array(ds[i][0]) for i, (p, _) in enumerate(ds.samples)}
    assert ds.num_bad == 0
    assert (got["a_grey"] == 128).all()
    assert (got["b_16bit"] == 255).all()
    assert (got["c_rgba"] == 255).all()
    assert np.abs(got["d_cmyk"].astype(int) - [255, 0, 255]).max() <= 3  # magenta
    assert (got["e_pal"] == [90, 80, 70]).all()
    assert (got["f_1bit"] == 0).all()
    assert (got["g_float"] == 128).all()


# ---------------------------------------------------------------- bad files


def test_corrupt_and_truncated_files_skipped_and_counted(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 3, "b": 2})
    write_garbage_jpg(root / "a" / "001.jpg")  # sorts between 000.png and 001.png
    write_truncated_jpg(root / "b" / "000_trunc.jpg")
    ds = ImageFolderDataset(root)
    names = [Path(p).name for p, _ in ds.samples]
    bad_idx = names.index("001.jpg")
    with pytest.warns(DataWarning, match=r"001\.jpg.*bad files so far: 1"):
        img, label = ds[bad_idx]
    # substituted deterministically by the next readable file (a/001.png), label included
    ref_img, ref_label = ds[bad_idx + 1]
    assert label == ref_label == 0 and (rgb_array(img) == rgb_array(ref_img)).all()
    assert ds.num_bad == 1 and ds.bad_files == [str(root / "a" / "001.jpg")]

    with pytest.warns(DataWarning, match=r"000_trunc\.jpg.*bad files so far: 2"):
        ds[names.index("000_trunc.jpg")]
    assert ds.num_bad == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known bad file is skipped silently the second time
        ds[bad_idx]
    assert "2 of 7" in ds.report()


def test_bad_file_as_last_sample_wraps_around(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 2})
    write_garbage_jpg(root / "a" / "zzz.jpg")
    ds = ImageFolderDataset(root)
    with pytest.warns(DataWarning):
        img, label = ds[2]
    assert (rgb_array(img) == rgb_array(ds[0][0])).all()


def test_strict_mode_raises_naming_file(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 2})
    write_truncated_jpg(root / "a" / "broken.jpg")
    ds = ImageFolderDataset(root, strict=True)
    with pytest.raises(BadImageError, match=r"broken\.jpg.*strict"):
        ds[2]
    with pytest.raises(BadImageError, match=r"broken\.jpg"):
        ImageFolderDataset(root, strict=True).verify(progress=False)


def test_verify_flags_all_bad_files(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 3})
    write_garbage_jpg(root / "a" / "x.jpg")
    ds = ImageFolderDataset(root)
    with pytest.warns(DataWarning):
        bad = ds.verify(progress=False)
    assert bad == [str(root / "a" / "x.jpg")] and ds.num_bad == 1


def test_bad_count_visible_from_main_process_with_workers(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 6, "b": 6})
    write_garbage_jpg(root / "a" / "bad1.jpg")
    write_truncated_jpg(root / "b" / "bad2.jpg")
    ds = ImageFolderDataset(root, transform=pretrain_transform(SIDE, CIFAR10_MEAN, CIFAR10_STD))
    loader = build_loader(ds, 4, train=False, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = sum(x.shape[0] for x, _ in loader)
    assert n == len(ds) == 14
    assert ds.num_bad == 2  # flags set inside worker processes, read here
    assert sorted(Path(p).name for p in ds.bad_files) == ["bad1.jpg", "bad2.jpg"]


# ---------------------------------------------------------------- cache


def test_cache_matches_uncached_and_persists(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 3, "b": 3})
    Image.new("L", (SIDE, SIDE), 77).save(root / "b" / "grey.png")
    plain = ImageFolderDataset(root)
    cdir = tmp_path / "cache"
    cached = ImageFolderDataset(root, cache=True, cache_dir=cdir, progress=False)
    assert not cached.cache_loaded_from_disk and cached.cache_path is not None
    assert cached.cache_path.is_file()
    for i in range(len(plain)):
        a, la = plain[i]
        b, lb = cached[i]
        assert la == lb and (rgb_array(a) == rgb_array(b)).all()
    again = ImageFolderDataset(root, cache=True, cache_dir=cdir, progress=False)
    assert again.cache_loaded_from_disk
    assert torch.equal(again._cache, cached._cache)
    # the key follows the file list: a new file means a new cache file
    _solid((1, 2, 3)).save(root / "a" / "new.png")
    third = ImageFolderDataset(root, cache=True, cache_dir=cdir, progress=False)
    assert not third.cache_loaded_from_disk and len(third) == len(plain) + 1


def test_cache_with_bad_file_and_transform(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 3})
    write_garbage_jpg(root / "a" / "001.jpg")
    tf = eval_transform(SIDE, (0.5,) * 3, (0.5,) * 3, crop_pct=1.0)
    with pytest.warns(DataWarning, match=r"001\.jpg"):
        ds = ImageFolderDataset(root, transform=tf, cache=True, cache_dir=tmp_path / "c",
                                progress=False)
    assert ds.num_bad == 1
    x, _ = ds[1]  # bad slot → next readable image
    assert x.shape == (3, SIDE, SIDE) and torch.equal(x, ds[2][0])
    again = ImageFolderDataset(root, cache=True, cache_dir=tmp_path / "c", progress=False)
    assert again.cache_loaded_from_disk and again.num_bad == 1  # bad flags persisted too


def test_cache_requires_same_size(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 2})
    _solid((1, 2, 3), side=SIDE * 2).save(root / "a" / "big.png")
    with pytest.raises(ValueError, match=r"big\.png.*same size|same size.*big\.png"):
        ImageFolderDataset(root, cache=True, progress=False)


# ---------------------------------------------------------------- default dataset


def test_default_dataset() -> None:
    train, test = default_dataset("train"), default_dataset("test")
    assert len(train) == 4000 and len(test) == 1000
    assert train.classes == [str(d) for d in range(10)] and len(test.classes) == 10
    assert set(train.targets) == set(range(10)) and set(test.targets) == set(range(10))
    img, label = train[0]
    assert img.mode == "RGB" and img.size == (28, 28) and 0 <= label <= 9
    arr = rgb_array(img)
    assert (arr[..., 0] == arr[..., 1]).all() and arr.max() > 200  # grey digit, real ink
    # deterministic and disjoint splits
    again = default_dataset("train")
    assert torch.equal(again.images, train.images) and again.targets == train.targets
    tr = {bytes(x) for x in train.images.numpy()}
    assert not any(bytes(x) in tr for x in test.images.numpy())
    x, _ = default_dataset("test", transform=eval_transform(32, (0.5,) * 3, (0.5,) * 3))[0]
    assert x.shape == (3, 32, 32)


# ---------------------------------------------------------------- transforms


def test_transforms_shapes_and_normalization() -> None:
    mean, std = (0.25, 0.5, 0.75), (0.1, 0.2, 0.3)
    img = _solid(tuple(round(m * 255) for m in mean), side=32)  # the mean colour → ~0
    for tf in (
        pretrain_transform(48, mean, std),
        finetune_transform(48, mean, std, re_prob=0.0),
        eval_transform(48, mean, std, crop_pct=1.0),
        eval_transform(48, mean, std),
    ):
        x = tf(img)
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    x = eval_transform(48, mean, std, crop_pct=1.0)(img)
    assert x.abs().max() < 0.05
    white = eval_transform(48, mean, std)(_solid((255, 255, 255), side=32))
    expect = torch.tensor([(1 - m) / s for m, s in zip(mean, std)])
    assert torch.allclose(white.mean((1, 2)), expect, atol=1e-3)

    # crop_pct=1.0 on a square image is a plain bicubic resize (32 → 48)
    rng = np.random.default_rng(1)
    rand = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    plain = eval_transform(48, (0.0,) * 3, (1.0,) * 3, crop_pct=1.0)(rand)
    ref = torch.from_numpy(np.array(rand.resize((48, 48), Image.BICUBIC))).permute(2, 0, 1)
    assert torch.allclose(plain * 255, ref.float(), atol=1.0)
    # default crop_pct crops the centre of an upscaled image
    assert eval_transform(224, mean, std)(_solid((0, 0, 0), 300)).shape == (3, 224, 224)


def test_finetune_transform_random_erasing() -> None:
    torch.manual_seed(0)
    tf = finetune_transform(32, (0.5,) * 3, (0.5,) * 3, re_prob=1.0, auto_augment=None)
    x = tf(_solid((128, 128, 128), side=32))
    assert x.shape == (3, 32, 32)
    assert x.std() > 0.1  # erased pixel patch ≠ the flat grey image


# ---------------------------------------------------------------- loaders


def _orders(loader, epochs: int) -> list[list[int]]:
    out = []
    for e in range(epochs):
        set_loader_epoch(loader, e)
        out.append([int(v) for _, y in loader for v in y])
    return out


def test_loader_deterministic_for_seed() -> None:
    from torch.utils.data import TensorDataset

    ds = TensorDataset(torch.zeros(50, 1), torch.arange(50))
    a = _orders(build_loader(ds, 8, train=True, num_workers=0, seed=3), 2)
    b = _orders(build_loader(ds, 8, train=True, num_workers=0, seed=3), 2)
    c = _orders(build_loader(ds, 8, train=True, num_workers=0, seed=4), 1)
    assert a == b  # same seed, same order per epoch
    assert a[0] != a[1]  # set_epoch reshuffles
    assert a[0] != c[0]
    assert all(len(o) == 48 for o in a)  # drop_last for training
    assert len(set(a[0])) == 48
    ev = _orders(build_loader(ds, 8, train=False, num_workers=0), 1)[0]
    assert ev == list(range(50))  # evaluation: all samples, in order


def test_loader_distributed_shards() -> None:
    from torch.utils.data import TensorDataset

    ds = TensorDataset(torch.zeros(11, 1), torch.arange(11))
    shards = [
        _orders(build_loader(ds, 4, train=False, num_workers=0, distributed=True,
                             world_size=3, rank=r), 1)[0]
        for r in range(3)
    ]
    assert sorted(sum(shards, [])) == list(range(11))  # every eval sample once, no padding
    train = [
        _orders(build_loader(ds, 2, train=True, num_workers=0, distributed=True, seed=1,
                             world_size=2, rank=r), 1)[0]
        for r in range(2)
    ]
    assert not set(train[0]) & set(train[1])
    with pytest.raises(RuntimeError, match="initialised"):
        build_loader(ds, 2, train=True, num_workers=0, distributed=True)


def test_loader_workers_augmentation_reproducible(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 4, "b": 4}, side=16)
    ds = ImageFolderDataset(root, transform=pretrain_transform(8, (0.5,) * 3, (0.5,) * 3))
    runs = []
    for _ in range(2):
        loader = build_loader(ds, 4, train=True, num_workers=2, seed=7, persistent_workers=False)
        set_loader_epoch(loader, 0)
        runs.append(torch.cat([x for x, _ in loader]))
    assert runs[0].shape == (8, 3, 8, 8) and torch.equal(runs[0], runs[1])


# ---------------------------------------------------------------- build_dataset


def test_build_dataset_resolution(tmp_path: Path) -> None:
    make_folder(tmp_path / "ds" / "train", {"a": 2, "b": 1})
    make_folder(tmp_path / "ds" / "val", {"a": 1, "b": 1})
    assert len(build_dataset(tmp_path / "ds", "train", None)) == 3
    assert len(build_dataset(str(tmp_path / "ds"), "val", None)) == 2
    with pytest.raises(FileNotFoundError, match=r"'test'.*train"):
        build_dataset(tmp_path / "ds", "test", None)  # must not treat train/val as classes
    flat = make_folder(tmp_path / "flat", {"x": 2, "y": 2})
    assert build_dataset(flat, "train", None).classes == ["x", "y"]
    with pytest.raises(FileNotFoundError, match="nope"):
        build_dataset(tmp_path / "nope", "train", None)
    assert len(build_dataset("default", "test", None)) == 1000


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def cifar_few(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 real CIFAR-10 JPEGs (10 airplane, 10 automobile of the test split) extracted to tmp."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"{CIFAR_TAR} not present")
    out = tmp_path_factory.mktemp("cifar")
    want = {"airplane": 0, "automobile": 0}
    with tarfile.open(CIFAR_TAR, "r:gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and parts[1] == "test" and parts[2] in want:
                if want[parts[2]] < 10:
                    want[parts[2]] += 1
                    dest = out / parts[2] / parts[3]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(tf.extractfile(m).read())
            if all(v == 10 for v in want.values()):
                break
    return out


def test_real_cifar_jpegs(cifar_few: Path, tmp_path: Path) -> None:
    ds = ImageFolderDataset(cifar_few)
    assert ds.classes == ["airplane", "automobile"] and len(ds) == 20
    img, label = ds[15]
    assert label == 1 and rgb_array(img).shape == (32, 32, 3)
    cached = ImageFolderDataset(cifar_few, cache=True, cache_dir=tmp_path, progress=False)
    assert cached._cache.shape == (20, 32, 32, 3)
    for i in range(20):
        assert (rgb_array(ds[i][0]) == rgb_array(cached[i][0])).all()
    assert cached._cache.float().std() > 20  # real, varied pixels
    tf = pretrain_transform(48, CIFAR10_MEAN, CIFAR10_STD)
    ds.transform = tf
    loader = build_loader(ds, 10, train=True, num_workers=0, seed=0)
    x, y = next(iter(loader))
    assert x.shape == (10, 3, 48, 48) and abs(float(x.mean())) < 1.0
    assert ds.num_bad == 0
