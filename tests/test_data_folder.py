"""mal.data's ImageFolderDataset: layout, labels, bad files (skipped, counted, reported once), strict mode, the
decode cache. Small synthetic folders; the helpers here are shared by the other test_data_* files."""
from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mal.data import BadImageError, ImageFolderDataset, eval_transform

SIDE = 8


def solid(color: tuple[int, int, int], side: int = SIDE) -> Image.Image:
    return Image.new("RGB", (side, side), color)


def make_folder(root: Path, per_class: dict[str, int], side: int = SIDE) -> Path:
    """root/<class>/<i>.png with distinct solid colours (lossless, so pixels are checkable)."""
    for c, (name, n) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            solid((10 * c + i, 100 + i, 200 - c), side).save(root / name / f"{i:03d}.png")
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


def warning_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------- layout and errors


def test_folder_layout_labels_and_attributes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"b_cls": 2, "a_cls": 3})
    (root / "a_cls" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(root)
    assert ds.classes == ["a_cls", "b_cls"]
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
    solid((1, 2, 3)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "flat")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no image"):
        ImageFolderDataset(tmp_path / "noimg")


def test_empty_class_folder_is_kept_and_reported_once(tmp_path: Path, caplog) -> None:
    root = make_folder(tmp_path / "d", {"cat": 2, "dog": 2})
    (root / "bird").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = ImageFolderDataset(root)
    assert ds.classes == ["bird", "cat", "dog"]
    assert sorted(set(ds.targets)) == [1, 2] and ds[0][1] == 1
    lines = warning_lines(caplog)
    assert len(lines) == 1 and "bird" in lines[0]


# ---------------------------------------------------------------- bad files


def test_corrupt_and_truncated_files_skipped_and_counted(tmp_path: Path, caplog) -> None:
    root = make_folder(tmp_path / "d", {"a": 3, "b": 2})
    write_garbage_jpg(root / "a" / "001.jpg")  # sorts between 000.png and 001.png
    write_truncated_jpg(root / "b" / "000_trunc.jpg")
    ds = ImageFolderDataset(root)
    names = [Path(p).name for p, _ in ds.samples]
    bad_idx = names.index("001.jpg")
    img, label = ds[bad_idx]
    # substituted deterministically by the next readable file (a/001.png), label included
    ref_img, ref_label = ds[bad_idx + 1]
    assert label == ref_label == 0 and (rgb_array(img) == rgb_array(ref_img)).all()
    assert ds.num_bad == 1 and ds.bad_files == [str(root / "a" / "001.jpg")]
    ds[names.index("000_trunc.jpg")]
    ds[bad_idx]  # a known bad file is skipped silently the second time
    assert ds.num_bad == 2
    lines = warning_lines(caplog)
    assert len(lines) == 2 and "001.jpg" in lines[0] and "000_trunc.jpg" in lines[1] and "2 of 7" in lines[1]
    assert "2 of 7" in ds.report() and "000_trunc.jpg" in ds.report()
    assert len(warning_lines(caplog)) == 2  # report() returns its line, it does not log it again


def test_bad_file_is_reported_once_as_one_log_line(tmp_path: Path, caplog) -> None:
    root = make_folder(tmp_path / "d", {"a": 2})
    write_garbage_jpg(root / "a" / "000_bad.jpg")
    ds = ImageFolderDataset(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            ds[1]  # 000_bad.jpg sorts after 000.png
    assert caught == []  # no warnings.warn beside the log line
    assert len(warning_lines(caplog)) == 1 and "000_bad.jpg" in warning_lines(caplog)[0]


def test_bad_file_as_last_sample_wraps_around(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 2})
    write_garbage_jpg(root / "a" / "zzz.jpg")
    ds = ImageFolderDataset(root)
    img, _ = ds[2]
    assert (rgb_array(img) == rgb_array(ds[0][0])).all()


def test_strict_mode_raises_naming_file(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 2})
    write_truncated_jpg(root / "a" / "broken.jpg")
    ds = ImageFolderDataset(root, strict=True)
    ds[0]
    with pytest.raises(BadImageError, match=r"broken\.jpg.*strict"):
        ds[2]
    with pytest.raises(BadImageError, match=r"broken\.jpg.*strict"):
        ImageFolderDataset(root, strict=True, cache=True, progress=False)


@pytest.mark.parametrize("cache", [False, True])
def test_every_file_unreadable_is_one_clear_error(tmp_path: Path, caplog, cache: bool) -> None:
    root = tmp_path / "lfs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(20):
            (root / c / f"{i:02d}.jpg").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n")
    with pytest.raises(BadImageError) as err:
        ImageFolderDataset(root, cache=cache, progress=False)[5]
    msg = str(err.value)
    assert "none of the 40 image files" in msg and str(root) in msg and "UnidentifiedImageError" in msg
    assert str(root / "cat") in msg and "Git LFS" in msg and "\n" not in msg
    assert warning_lines(caplog) == []  # not one line per file before the error


# ---------------------------------------------------------------- cache


def test_cache_matches_uncached_and_persists(tmp_path: Path, monkeypatch) -> None:
    root = make_folder(tmp_path / "d", {"a": 3, "b": 3})
    Image.new("L", (SIDE, SIDE), 77).save(root / "b" / "grey.png")
    plain = ImageFolderDataset(root)
    cdir = tmp_path / "cache"
    cached = ImageFolderDataset(root, cache=True, cache_dir=cdir, progress=False)
    assert len(list(cdir.glob("*.npy"))) == 1
    for i in range(len(plain)):
        a, la = plain[i]
        b, lb = cached[i]
        assert la == lb and (rgb_array(a) == rgb_array(b)).all()

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the cache is stored")

    with monkeypatch.context() as m:
        m.setattr("mal.data.folder.load_rgb_image", no_decoding)
        again = ImageFolderDataset(root, cache=True, cache_dir=cdir, progress=False)
        assert all((rgb_array(again[i][0]) == rgb_array(cached[i][0])).all() for i in range(len(plain)))
    # the key follows the file list: a new file means a new cache file
    solid((1, 2, 3)).save(root / "a" / "new.png")
    third = ImageFolderDataset(root, cache=True, cache_dir=cdir, progress=False)
    assert len(third) == len(plain) + 1 and len(list(cdir.glob("*.npy"))) == 2


def test_cache_with_bad_file_and_transform(tmp_path: Path, caplog) -> None:
    root = make_folder(tmp_path / "d", {"a": 3})
    write_garbage_jpg(root / "a" / "001.jpg")
    tf = eval_transform(SIDE, (0.5,) * 3, (0.5,) * 3, crop_pct=1.0)
    ds = ImageFolderDataset(root, transform=tf, cache=True, cache_dir=tmp_path / "c", progress=False)
    assert ds.num_bad == 1 and len(warning_lines(caplog)) == 1 and "001.jpg" in warning_lines(caplog)[0]
    x, _ = ds[1]  # bad slot → next readable image
    assert x.shape == (3, SIDE, SIDE) and torch.equal(x, ds[2][0])
    again = ImageFolderDataset(root, cache=True, cache_dir=tmp_path / "c", progress=False)
    assert again.num_bad == 1 and again.bad_files == ds.bad_files  # bad flags stored with the cache
    with pytest.raises(BadImageError, match=r"001\.jpg \(found unreadable when the stored decode cache"):
        ImageFolderDataset(root, strict=True, cache=True, cache_dir=tmp_path / "c", progress=False)


def test_cache_requires_same_size(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 2})
    solid((1, 2, 3), side=SIDE * 2).save(root / "a" / "big.png")
    with pytest.raises(ValueError, match=r"big\.png.*same size|same size.*big\.png"):
        ImageFolderDataset(root, cache=True, progress=False)


# ---------------------------------------------------------------- real data


def test_real_cifar_jpegs(image_folder: Path, tmp_path: Path) -> None:
    ds = ImageFolderDataset(image_folder / "test")
    assert ds.classes == ["airplane", "automobile", "frog"] and len(ds) == 48
    img, label = ds[20]
    assert label == 1 and rgb_array(img).shape == (32, 32, 3)
    cached = ImageFolderDataset(image_folder / "test", cache=True, cache_dir=tmp_path, progress=False)
    assert all((rgb_array(ds[i][0]) == rgb_array(cached[i][0])).all() for i in range(len(ds)))
    assert np.asarray(cached[0][0]).std() > 5  # real, varied pixels
    assert ds.num_bad == 0 and cached.num_bad == 0
