"""mal.data's evaluation loaders: in-order and sharded reading, bad files seen from loader workers, strict mode
with workers (one clean error), worker counts."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_data_folder import SIDE, make_folder, write_garbage_jpg, write_truncated_jpg
from torch.utils.data import DataLoader, TensorDataset

from mal.data import BadImageError, ImageFolderDataset, build_loader, default_num_workers, eval_transform
from mal.data import loaders
from mal.data.loaders import ShardedEvalSampler

SRC = Path(__file__).resolve().parents[1] / "src"
TF = eval_transform(SIDE, (0.5,) * 3, (0.5,) * 3, crop_pct=1.0)


def test_eval_loader_reads_every_sample_in_order() -> None:
    ds = TensorDataset(torch.zeros(50, 1), torch.arange(50))
    loader = build_loader(ds, 8, num_workers=0)
    assert [int(v) for _, y in loader for v in y] == list(range(50))
    with pytest.raises(ValueError, match="StepSampler"):
        build_loader(ds, 8, num_workers=0, train=True)
    with pytest.raises(RuntimeError, match="initialised"):
        build_loader(ds, 2, num_workers=0, distributed=True)


def test_sharded_eval_sampler_reads_every_sample_once() -> None:
    shards = [list(ShardedEvalSampler(11, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))  # no padding, no duplicates
    assert [len(ShardedEvalSampler(11, 3, r)) for r in range(3)] == [4, 4, 3]


def test_bad_count_visible_from_main_process_with_workers(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 6, "b": 6})
    write_garbage_jpg(root / "a" / "bad1.jpg")
    write_truncated_jpg(root / "b" / "bad2.jpg")
    ds = ImageFolderDataset(root, transform=TF)
    n = sum(x.shape[0] for x, _ in build_loader(ds, 4, num_workers=2))
    assert n == len(ds) == 14
    assert ds.num_bad == 2  # flags set inside worker processes, read here
    assert sorted(Path(p).name for p in ds.bad_files) == ["bad1.jpg", "bad2.jpg"]


def _error_from(loader: DataLoader) -> BadImageError:
    try:
        for _ in loader:
            pass
    except BadImageError as err:
        err.__traceback__ = None  # frees the loader's iterator now, so its workers stop before the next loader forks
        return err
    raise AssertionError("no BadImageError")


def test_strict_with_workers_raises_one_clean_error(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 6})
    write_truncated_jpg(root / "a" / "002_broken.jpg")
    ds = ImageFolderDataset(root, transform=TF, strict=True)
    for loader in (build_loader(ds, 2, num_workers=2), DataLoader(ds, batch_size=2, num_workers=2)):
        err = _error_from(loader)
        msg = str(err)
        assert msg.startswith("cannot read image file ") and "002_broken.jpg" in msg and "strict" in msg
        assert "Traceback" not in msg and "\n" not in msg
        assert "DataLoader worker" in err.worker_traceback  # kept for debugging


def test_bad_file_logged_once_with_workers(tmp_path: Path) -> None:
    """Run in a fresh interpreter with plain logging: the worker that finds a bad file prints one line for it."""
    root = make_folder(tmp_path / "d", {"a": 6, "b": 6})
    write_garbage_jpg(root / "a" / "bad1.jpg")
    script = f"""
        import logging
        from mal.data import ImageFolderDataset, build_loader, eval_transform
        logging.basicConfig(level=logging.INFO)
        ds = ImageFolderDataset({str(root)!r}, eval_transform(8, (0.5,) * 3, (0.5,) * 3, crop_pct=1.0))
        for epoch in range(2):
            for _ in build_loader(ds, 4, num_workers=2):
                pass
        print("bad:", ds.num_bad, ds.bad_files)
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"bad: 1 ['{root / 'a' / 'bad1.jpg'}']" in proc.stdout
    mentions = [line for line in proc.stderr.splitlines() if "bad1.jpg" in line]
    assert len(mentions) == 1 and "DataWarning" not in proc.stderr, proc.stderr


def test_default_num_workers_leaves_one_cpu(monkeypatch) -> None:
    for cpus, want in [(1, 0), (2, 1), (4, 3), (64, 8)]:
        monkeypatch.setattr(loaders, "available_cpus", lambda cpus=cpus: cpus)
        assert default_num_workers() == want


def test_build_loader_caps_workers_at_cpus_with_one_log_line(caplog) -> None:
    caplog.set_level(logging.INFO, logger="mal.data")
    ds = TensorDataset(torch.zeros(4, 1), torch.arange(4))
    many = loaders.available_cpus() + 1000
    assert [build_loader(ds, 2, num_workers=many).num_workers for _ in range(3)] == [loaders.available_cpus()] * 3
    lines = [r.getMessage() for r in caplog.records if "num_workers" in r.getMessage()]
    assert len(lines) == 1 and f"data.num_workers={many}" in lines[0]
    assert all(r.levelno == logging.INFO for r in caplog.records)
    assert build_loader(ds, 2, num_workers=1).num_workers == 1
