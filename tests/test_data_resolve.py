"""mal.data.build_dataset: "default" (the embedded digits) or ROOT/<split>, and the errors for wrong layouts."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from test_data_folder import make_folder, rgb_array

from mal.data import build_dataset, default_dataset, eval_transform


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
    assert len(build_dataset("default", "val", None)) == 1000 and train.num_bad == 0 and train.bad_files == []
    with pytest.raises(ValueError, match="'train' and 'test'"):
        build_dataset("default", "", None)


def test_split_folders_and_the_root_itself(tmp_path: Path) -> None:
    make_folder(tmp_path / "ds" / "train", {"a": 2, "b": 1})
    make_folder(tmp_path / "ds" / "val", {"a": 1, "b": 1})
    assert len(build_dataset(tmp_path / "ds", "train", None)) == 3
    assert len(build_dataset(str(tmp_path / "ds"), "val", None)) == 2
    flat = make_folder(tmp_path / "flat", {"x": 2, "y": 2})
    assert build_dataset(flat, "", None).classes == ["x", "y"]  # split "" = ROOT itself


@pytest.mark.parametrize("have,ask", [("val", "test"), ("test", "val")])
def test_test_and_val_stand_in_for_each_other(tmp_path: Path, caplog, have: str, ask: str) -> None:
    caplog.set_level(logging.INFO, logger="mal.data")
    make_folder(tmp_path / "ds" / "train", {"a": 2, "b": 2})
    make_folder(tmp_path / "ds" / have, {"a": 1, "b": 1})
    ds = build_dataset(tmp_path / "ds", ask, None)
    assert ds.root == tmp_path / "ds" / have and len(ds) == 2
    assert [r.getMessage() for r in caplog.records] == [f"no {tmp_path / 'ds' / ask}: using {tmp_path / 'ds' / have}"]


def test_missing_split_names_the_folders_that_exist(tmp_path: Path) -> None:
    make_folder(tmp_path / "ds" / "train", {"a": 1})
    make_folder(tmp_path / "ds" / "val", {"a": 1})
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(tmp_path / "ds", "validation", None, key="data.val_split")
    msg = str(err.value)
    assert msg.startswith("data.val_split='validation': no folder ") and str(tmp_path / "ds" / "validation") in msg
    assert msg.endswith("has train, val: set data.val_split to one of them")


def test_class_folders_without_split_folders_are_refused_with_the_fixes(tmp_path: Path) -> None:
    """ROOT/<class>/*.png: reading ROOT for every split would train and evaluate on the same images."""
    flat = make_folder(tmp_path / "flat", {"cat": 2, "dog": 2})
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(flat, "train", None, key="data.train_split")
    msg = str(err.value)
    assert "class folders (cat, dog)" in msg and f"{flat}/train/<class>/" in msg and f"{flat}/val/<class>/" in msg
    assert "set data.train_split='' to read" in msg and "\n" not in msg


def test_missing_root_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(missing, "train", None)
    msg = str(err.value)
    assert str(missing) in msg and "data.dataset must be an ImageFolder root" in msg and "'default'" in msg
    assert "\n" not in msg
