"""Fault injection: NaN losses, out-of-memory, broken checkpoint writes, bad images, wrong formats."""
import json
import os
import signal
import stat
import subprocess
import sys
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
    return ["pretrain", "--config", "cifar10_pretrain", "--output", str(out), "--no-progress",
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


# ----------------------------------------------------------------------------- nothing lost
def test_rejected_resume_leaves_the_run_folder_untouched(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(image_folder, out, "max_steps=2")) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(_args(image_folder, out, "max_steps=4", "model.dim=48", "--resume")) == 2
    assert "model.dim: checkpoint 32 vs config 48" in capsys.readouterr().err
    ft = ["finetune", "--config", "cifar10_finetune", "--output", str(out), "--resume",
          "--no-progress", f"data.dataset={image_folder}", "init=x", *TINY]
    assert main(ft) == 2
    assert "is a pretrain run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_with_a_bad_dataset_keeps_the_old_run(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(image_folder, out, "max_steps=2")) == 0
    weights = (out / "ckpt_last/model.safetensors").read_bytes()
    assert main(_args(tmp_path / "no_such_data", out, "max_steps=2", "--overwrite")) == 2
    assert "no_such_data" in capsys.readouterr().err
    assert (out / "ckpt_last/model.safetensors").read_bytes() == weights
    assert main(_args(image_folder, out, "max_steps=2", "--overwrite", "seed=1")) == 0    # a good --overwrite
    assert (out / "ckpt_last/model.safetensors").read_bytes() != weights
    assert not list(tmp_path.glob(".run.replaced-*"))                        # the old run went after the new saved


def test_resume_with_a_changed_recipe_needs_allow_changes(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(image_folder, out, "max_steps=2")) == 0
    assert main(_args(image_folder, out, "max_steps=4", "optim.blr=1e-2", "--resume")) == 2
    err = capsys.readouterr().err
    assert "optim.blr: 0.003 -> 0.01" in err and "max_steps: 2 -> 4" in err and "--allow-changes" in err
    assert main(_args(image_folder, out, "max_steps=4", "data.num_workers=0", "log_every=2", "--resume",
                      "--allow-changes", "optim.blr=1e-2")) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_a_folder_without_a_checkpoint_is_not_a_run(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("step\n")                               # what a failed start leaves
    assert main(_args(image_folder, out, "max_steps=1", "--resume")) == 2
    assert "without --resume" in capsys.readouterr().err
    assert main(_args(image_folder, out, "max_steps=1")) == 0                # reused, no --overwrite needed


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_damaged_weights_give_one_line_naming_the_file(image_folder, tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert main(_args(image_folder, out, "max_steps=1")) == 0
    f = out / "ckpt_last/model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "random": bytes(range(256)) * 8}[damage])
    for args in (_args(image_folder, out, "max_steps=1", "--resume"),
                 ["eval", "--checkpoint", str(out / "ckpt_last"), "--knn", "data.num_workers=0"],
                 ["finetune", "--config", "cifar10_finetune", "--init",
                  str(out / "ckpt_last"), "--output", str(tmp_path / "ft"), f"data.dataset={image_folder}", *TINY]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert str(f) in err and "copy it again" in err and "Traceback" not in err and "\n" not in err


@pytest.mark.parametrize("name", ["state.pt", "meta.json"])
def test_damaged_state_or_meta_name_the_file(image_folder, tmp_path, capsys, name):
    out = tmp_path / "run"
    assert main(_args(image_folder, out, "max_steps=1")) == 0
    f = out / "ckpt_last" / name
    f.write_bytes(f.read_bytes()[:40])
    assert main(_args(image_folder, out, "max_steps=1", "--resume")) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "Traceback" not in err


def test_bad_config_values_are_rejected_before_any_work(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    for bad in ("aug.auto_augment=bogus", "aug.label_smoothing=1.5", "optim.blr=-1", "optim.weight_decay=-0.1",
                "optim.clip_grad=-1", "aug.reprob=2", "aug.mixup=-1", "data.std=[0,1,1]", "model.mlstm_backend=foo"):
        assert main(["supervised", "--config", "cifar10_supervised", "--output", str(out),
                     f"data.dataset={image_folder}", bad]) == 2, bad
        err = capsys.readouterr().err
        assert bad.split("=")[0].split(".")[-1] in err and "Traceback" not in err, (bad, err)
        assert not out.exists(), bad


def test_checkpoints_follow_the_umask(image_folder, tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert main(_args(image_folder, out, "max_steps=1")) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "ckpt_last").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "ckpt_last/model.safetensors").stat().st_mode) == 0o644


def test_ctrl_c_says_where_the_run_stopped(image_folder, tmp_path, monkeypatch, capsys):
    _poison_forward(monkeypatch, {4}, exc=KeyboardInterrupt())
    out = tmp_path / "run"
    assert main(_args(image_folder, out, "max_steps=6", "save_every=2")) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 3 of 6" in err and "checkpoint is at step 2" in err and "--resume" in err
    assert "Traceback" not in err


KILL_DURING_SAVE = """
import os, signal, sys
import mal.checkpoint as c
real = os.replace
def replace(src, dst):
    out = real(src, dst)
    if str(dst).endswith(".ckpt_last.old"):  # the old ckpt_last moved aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    return out
c.os.replace = replace
from mal.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_during_a_checkpoint_write_resumes_with_nothing_lost(image_folder, tmp_path):
    """SIGKILL between moving the old checkpoint aside and renaming the new one into place: the resume finds the
    previous checkpoint and ends with the weights of a run that was never interrupted."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    args = lambda out: _args(image_folder, out, "max_steps=4", "save_every=2")
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *args(killed)], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (killed / "ckpt_last").exists() and (killed / ".ckpt_last.old/meta.json").exists()
    for cmd in (args(killed) + ["--resume"], args(clean)):                  # same process setup as the killed run
        subprocess.run([sys.executable, "-m", "mal", *cmd], env=env, check=True, capture_output=True)
    a, b = ckpt_mod.load_weights(killed / "ckpt_last"), ckpt_mod.load_weights(clean / "ckpt_last")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_linear_probe_is_deterministic():
    from mal.engine.probe import linear_probe_accuracy
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, generator=g), torch.randint(0, 3, (60,), generator=g)
    torch.manual_seed(1)
    a = linear_probe_accuracy(x[:40], y[:40], x[40:], y[40:], epochs=3)
    torch.manual_seed(2)
    assert linear_probe_accuracy(x[:40], y[:40], x[40:], y[40:], epochs=3) == a


def test_prediction_figure_draws_masked_units_black_one_image_per_class(image_folder, tmp_path):
    from mal.config import EncoderConfig, ObjectiveConfig
    from mal.engine.trainer import one_per_class
    assert one_per_class([0, 0, 1, 1, 2, 2], 4) == [0, 2, 4, 1]              # each class first, then in order
    torch.manual_seed(0)
    model = MALPretrain(EncoderConfig(img_size=16, patch_size=4, dim=16, depth=2, cluster_size=2),
                        ObjectiveConfig()).eval()
    imgs = torch.randn(3, 3, 16, 16)
    clusters, mask = model.sample_inputs(3, torch.Generator().manual_seed(0))
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(-1, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(-1, 1, 1)
    seen, pred, target = model.prediction_rows(imgs, clusters, mask, fill=-mean / std)
    pixels = mask.view(3, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2)   # (3, 16, 16)
    black = seen * std + mean                                                # what the figure shows
    assert pixels.any() and torch.allclose(black.permute(0, 2, 3, 1)[pixels], torch.zeros(1, 3), atol=1e-6)
    assert torch.equal(seen.permute(0, 2, 3, 1)[~pixels], imgs.permute(0, 2, 3, 1)[~pixels])
    assert torch.equal(target, imgs) and pred.shape == imgs.shape
    out = tmp_path / "run"
    assert main(_args(image_folder, out, "max_steps=1", "viz_samples=3")) == 0
    assert (out / "predictions.png").stat().st_size > 0
