"""Fault injection: NaN losses, out-of-memory, broken checkpoint writes, bad images, wrong formats."""
import json
from pathlib import Path

import pytest
import torch

from mal import checkpoint as ckpt_mod
from mal.cli import main
from mal.objectives.mal import MALPretrain

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.dim=32", "model.depth=2", "objective.decoder.depth=1", "objective.decoder.dim=32",
        "objective.decoder.num_heads=4", "data.num_workers=0", "data.cache=false", "probe=false",
        "optim.batch_size=16", "save_every=1", "log_every=1"]


def _args(data, out, *extra):
    return ["pretrain", "--config", str(REPO / "configs/cifar10_pretrain.yaml"), "--output", str(out), "--no-progress",
            f"data.dataset={data}", *TINY, *extra]


def _poison_forward(monkeypatch, bad_calls, exc=None):
    """Make MALPretrain.forward return a NaN loss (or raise exc) on the given call numbers."""
    real = MALPretrain.forward
    calls = {"n": 0}

    def forward(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] in bad_calls:
            if exc is not None:
                raise exc
            out = real(self, *a, **kw)
            out["loss"] = out["loss"] * float("nan")
            return out
        return real(self, *a, **kw)

    monkeypatch.setattr(MALPretrain, "forward", forward)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(image_folder, tmp_path, monkeypatch, capsys):
    _poison_forward(monkeypatch, {3})
    out = tmp_path / "run"
    assert main(_args(image_folder, out, "max_steps=6")) == 2
    err = capsys.readouterr().err
    assert "loss is nan at step 2" in err and "nan_policy=skip" in err
    meta = json.loads((out / "ckpt_last/meta.json").read_text())
    assert meta["step"] == 2                                   # the last good step
    w = ckpt_mod.load_weights(out / "ckpt_last")
    assert all(torch.isfinite(v).all() for v in w.values())


def test_nan_loss_skip_policy_counts(image_folder, tmp_path, monkeypatch):
    _poison_forward(monkeypatch, {2, 4})
    out = tmp_path / "run"
    assert main(_args(image_folder, out, "max_steps=6", "nan_policy=skip")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 2 and summary["steps"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt_mod.load_weights(out / "ckpt_last").values())


def test_out_of_memory_suggests_smaller_batch(image_folder, tmp_path, monkeypatch, capsys):
    _poison_forward(monkeypatch, {1}, exc=torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert main(_args(image_folder, tmp_path / "run", "max_steps=2")) == 2
    err = capsys.readouterr().err
    assert "out of GPU memory" in err and "optim.accum_steps=2" in err and "optim.batch_size" in err


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    d = tmp_path / "ckpt_last"
    ckpt_mod.save_checkpoint(d, {"w": torch.ones(3)}, {"step": 1}, {"task": "pretrain"})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt_mod.save_checkpoint(d, {"w": torch.zeros(3)}, {"step": 2}, {"task": "pretrain"})
    assert torch.equal(ckpt_mod.load_weights(d)["w"], torch.ones(3))
    assert ckpt_mod.read_meta(d)["step"] if "step" in ckpt_mod.read_meta(d) else True
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_last"]     # no temp folders left behind


def test_checkpoint_format_version_and_missing_files(tmp_path):
    d = tmp_path / "c"
    ckpt_mod.save_checkpoint(d, {"w": torch.ones(1)}, {}, {"task": "pretrain"})
    meta = json.loads((d / "meta.json").read_text())
    meta["format_version"] = 99
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 99"):
        ckpt_mod.read_meta(d)
    with pytest.raises(FileNotFoundError, match="not a MAL checkpoint"):
        ckpt_mod.read_meta(tmp_path)


def test_bad_images_are_skipped_and_counted_or_fail_with_strict(image_folder, tmp_path, capsys):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    cls = sorted((data / "train").iterdir())[0]
    (cls / "zz_corrupt.jpg").write_bytes(b"this is not a jpeg")
    good = sorted(cls.glob("*.jpg"))[0].read_bytes()
    (cls / "zz_truncated.jpg").write_bytes(good[: len(good) // 3])
    assert main(_args(data, tmp_path / "ok", "optim.epochs=1")) == 0
    assert main(_args(data, tmp_path / "strict", "optim.epochs=1", "--strict-data")) == 2
    err = capsys.readouterr().err
    assert "zz_" in err and "strict" in err


def test_nan_between_checks_is_caught_before_the_next_checkpoint(image_folder, tmp_path, monkeypatch, capsys):
    """The loss is read only at log/save steps; a NaN in between still stops the run before it saves."""
    _poison_forward(monkeypatch, {6})                                # step index 5
    out = tmp_path / "run"
    assert main(_args(image_folder, out, "max_steps=10", "save_every=4", "log_every=4")) == 2
    assert "non-finite loss between steps 4 and 7" in capsys.readouterr().err
    assert json.loads((out / "ckpt_last/meta.json").read_text())["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt_mod.load_weights(out / "ckpt_last").values())
