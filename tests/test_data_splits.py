"""mal.data.holdout_split (per-class, seeded, disjoint, complete), labelled_subset (the low-label protocol) and
IndexedView (own transform, shared files)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_folder import SIDE, make_folder, rgb_array, write_garbage_jpg

from mal.data import (ImageFolderDataset, IndexedView, default_dataset, eval_transform, holdout_split,
                      labelled_subset)

TARGETS = [0] * 40 + [1] * 10 + [2] * 3 + [3] * 1 + [1] * 6  # class 1 split in two runs


def test_holdout_split_is_disjoint_complete_and_per_class() -> None:
    train, held = holdout_split(TARGETS, 0.25, seed=0)
    assert not set(train) & set(held) and sorted(train + held) == list(range(len(TARGETS)))
    assert train == sorted(train) and held == sorted(held)
    per_class = Counter(TARGETS[i] for i in held)
    assert per_class == {0: 10, 1: 4, 2: 1}  # round(0.25 * n_c); at least one of 3; the single image stays
    assert 53 in train  # the class of one image


def test_holdout_split_is_seeded() -> None:
    a, b, c = (holdout_split(TARGETS, 0.25, seed=s) for s in (3, 3, 4))
    assert a == b and a != c
    assert holdout_split(TARGETS, 0.0, seed=3) == (list(range(len(TARGETS))), [])


def test_holdout_split_depends_only_on_each_class_labels() -> None:
    """A class's held-out draw is the same whatever the other classes are."""
    alone = holdout_split([5] * 30, 0.2, seed=1)[1]
    mixed = [7, 5] * 30
    held = holdout_split(mixed, 0.2, seed=1)[1]
    fives = [i for i, t in enumerate(mixed) if t == 5]
    assert [fives.index(i) for i in held if mixed[i] == 5] == alone


def test_holdout_split_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        holdout_split(TARGETS, 1.0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        holdout_split(TARGETS, 0.1, seed=-1)
    assert holdout_split([0, 0], 0.9, seed=0)[0] != []  # never every image of a class


def test_labelled_subset_keeps_a_seeded_fraction_of_each_class_of_the_given_indices() -> None:
    train, _ = holdout_split(TARGETS, 0.25, seed=0)                 # 45 of the 60 indices: 30 / 12 / 2 / 1
    part = labelled_subset(TARGETS, train, 0.2, seed=0)
    assert part == sorted(part) and set(part) < set(train)
    assert Counter(TARGETS[i] for i in part) == {0: 6, 1: 2, 2: 1, 3: 1}   # round(0.2 n), at least one image
    assert part == labelled_subset(TARGETS, train, 0.2, seed=0) != labelled_subset(TARGETS, train, 0.2, seed=1)
    assert labelled_subset(TARGETS, train, 1.0, seed=0) == train
    assert set(labelled_subset(TARGETS, train, 0.1, seed=0)) <= set(part) <= set(labelled_subset(TARGETS, train, 0.5, 0))
    with pytest.raises(ValueError, match="labelled fraction"):
        labelled_subset(TARGETS, train, 0.0, seed=0)


def test_targets_need_no_decoding(tmp_path: Path, monkeypatch) -> None:
    root = make_folder(tmp_path / "d", {"a": 3, "b": 2})
    monkeypatch.setattr("mal.data.folder.load_rgb_image", lambda path: pytest.fail(f"decoded {path}"))
    ds = ImageFolderDataset(root)
    train, held = holdout_split(ds.targets, 0.5, seed=0)
    assert ds.targets == [0, 0, 0, 1, 1] and len(train) == 2
    assert IndexedView(ds, held).targets == [0, 0, 1]  # round(0.5 * 3) of class a, round(0.5 * 2) of class b


def test_view_has_its_own_transform_over_the_same_cache(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 6, "b": 6})
    base_tf = eval_transform(SIDE, (0.0,) * 3, (1.0,) * 3, crop_pct=1.0)
    view_tf = eval_transform(4, (0.5,) * 3, (0.5,) * 3, crop_pct=1.0)
    base = ImageFolderDataset(root, transform=base_tf, cache=True, progress=False)
    train_idx, held_idx = holdout_split(base.targets, 0.5, seed=0)
    train, held = IndexedView(base, train_idx), IndexedView(base, held_idx, transform=view_tf)
    assert base.transform is base_tf and train.transform is base_tf and held.transform is view_tf
    assert held[0][0].shape == (3, 4, 4) and train[0][0].shape == (3, SIDE, SIDE)
    assert torch.equal(train[0][0], base[train_idx[0]][0])
    assert held.targets == [base.targets[i] for i in held_idx] and held.classes == base.classes
    assert held.dataset is base and train.dataset is base  # one decode cache for both
    probe = IndexedView(held, [1, 0])  # a view of a view
    assert probe.transform is view_tf and probe.targets == [held.targets[1], held.targets[0]]
    assert torch.equal(probe[0][0], held[1][0])


def test_view_replaces_a_bad_file_from_inside_the_view(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 4})
    write_garbage_jpg(root / "a" / "001_bad.png")  # index 2, between 001.png and 002.png
    base = ImageFolderDataset(root)
    view = IndexedView(base, [2, 0])
    img, _ = view[0]  # the bad file → the view's next sample (index 0), not base index 3
    assert (rgb_array(img) == rgb_array(base[0][0])).all()
    assert view.num_bad == base.num_bad == 1 and view.bad_files == base.bad_files and view.report() == base.report()


def test_view_of_the_default_dataset() -> None:
    digits = default_dataset("test")
    view = IndexedView(digits, [5, 1])
    assert view.targets == [digits.targets[5], digits.targets[1]] and view.num_bad == 0
    assert np.array_equal(np.asarray(view[1][0]), np.asarray(digits[1][0]))
