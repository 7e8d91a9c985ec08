"""The run folder: nothing in it changes before every check has passed; metrics go to CSV and TensorBoard.

A folder is a run when it holds a checkpoint. `RunDir` only reads until `open()`: a run replaced with
--overwrite (or a folder with no checkpoint, left by a run that failed early) is moved aside there and deleted
only once the new run has written its first checkpoint (`committed()`), so a failed start loses nothing.
"""
from __future__ import annotations

import csv
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from ..distributed import DistInfo, barrier

log = logging.getLogger("mal")
CHECKPOINT_NAMES = ("ckpt_last", ".ckpt_last.old")


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run folder (ckpt_last, or the one a killed write left aside)."""
    for name in CHECKPOINT_NAMES:
        if (run_dir / name / "meta.json").is_file():
            return run_dir / name
    return None


class RunDir:
    """Checks a run folder against --resume / --overwrite at construction (read-only), prepares it in `open()`."""

    def __init__(self, path: Path, resume: bool, overwrite: bool, info: DistInfo):
        self.path, self.info = Path(path), info
        self.checkpoint = find_checkpoint(self.path) if self.path.is_dir() else None
        self.replace = False
        if resume:
            if self.checkpoint is None:
                raise FileNotFoundError(
                    f"--resume: {self.path} holds no checkpoint (expected {self.path / 'ckpt_last'}); the run never "
                    f"saved one, so there is nothing to continue: run the same command without --resume")
        elif self.path.is_dir() and any(self.path.iterdir()):
            if self.checkpoint is not None and not overwrite:
                raise FileExistsError(f"run folder {self.path} already exists and holds a checkpoint; pass --resume "
                                      f"to continue it, --overwrite to replace it, or choose another --output")
            self.replace = True
            self.checkpoint = None

    def open(self, config: dict[str, Any]) -> None:
        """Move a replaced folder aside, create the folder, write config.yaml (main process)."""
        self.aside = self.path.with_name(f".{self.path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        if self.info.is_main:
            for old in self.path.parent.glob(f".{self.path.name}.replaced-*"):
                log.warning("%s holds what an earlier --overwrite moved aside (that run failed before its first "
                            "checkpoint); delete it when it is no longer needed", old)
            if self.replace:
                os.replace(self.path, self.aside)
                log.info("moved the old contents of %s to %s; deleted after the first checkpoint", self.path,
                         self.aside)
            self.path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        barrier()

    def committed(self) -> None:
        """After the new run's first checkpoint: delete the replaced folder."""
        if self.info.is_main and self.replace:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.replace = False


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsLog:
    """CSV + TensorBoard scalars, written by the main process only."""

    TRAIN_FIELDS = ["step", "epoch", "loss", "lr", "img_per_s", "time"]

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0,
                 eval_fields: tuple[str, ...] = ("top1", "top5", "loss")):
        """`eval_fields`: the evaluator's scores, logged as eval_<name> and eval_ema_<name> columns."""
        self.FIELDS = self.TRAIN_FIELDS + [f"eval_{f}" for f in eval_fields] + [f"eval_ema_{f}" for f in eval_fields]
        self.enabled, self.path, self.tb = enabled, run_dir / "metrics.csv", None
        if not enabled:
            return
        if self.path.exists():
            self.truncate_after(resume_step)
        else:
            with open(self.path, "w", newline="") as fh:
                csv.DictWriter(fh, self.FIELDS).writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:
            log.warning("tensorboard not installed: CSV logs only")

    def write(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, self.FIELDS).writerow({"step": step, **{k: values.get(k, "") for k in self.FIELDS[1:]}})
        if self.tb is not None:
            for k, v in values.items():
                if k not in ("epoch", "time"):
                    self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run does those steps again)."""
        with open(self.path) as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= step]
        with open(self.path, "w", newline="") as fh:
            w = csv.DictWriter(fh, self.FIELDS)
            w.writeheader()
            w.writerows(rows)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Throughput:
    """Images per second over the window since the last `read()`."""

    def __init__(self):
        self.t, self.n = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.n += n

    def read(self) -> float:
        now = time.perf_counter()
        ips = self.n / max(now - self.t, 1e-9)
        self.t, self.n = now, 0
        return ips


__all__ = ["RunDir", "MetricsLog", "Throughput", "find_checkpoint", "write_text_atomic"]
