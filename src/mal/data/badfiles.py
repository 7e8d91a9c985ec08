"""Unreadable image files: the error they raise, and the record of the files a dataset skips.

A file that fails to decode is flagged in one byte of a shared-memory tensor, so a flag set in a DataLoader worker
reaches the main process (``num_bad`` and ``bad_files`` for the run's summary) and the file is never decoded again.
Each bad file is logged once, by the process that found it, and only on the main rank. Until some file has decoded,
failures are held back: when no file of a dataset can be read, the user gets one error, not one line per file.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import MALError

logger = logging.getLogger(__name__)
SHOWN = 10  # bad files named in a report


class BadImageError(MALError, OSError):
    """An image file cannot be read (strict mode), or no image of a dataset can be.

    Raised in a DataLoader worker, it reaches the main process as a BadImageError again (torch re-raises the type
    with the worker's whole traceback as its message); the constructor keeps only the original one-line message
    and stores the traceback in ``worker_traceback``, so ``for batch in loader`` raises a clean error.
    """

    def __init__(self, *args: object) -> None:
        self.worker_traceback: str | None = None
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith(f"Caught {type(self).__name__} "):
            original = _original_message(args[0], type(self).__name__)
            if original:
                self.worker_traceback, args = args[0], (original,)
        super().__init__(*args)


def _original_message(text: str, name: str) -> str | None:
    """The message of the last ``...BadImageError: message`` line of a formatted traceback."""
    hits = list(re.finditer(rf"^(?:[\w.]+\.)?{name}: ", text, flags=re.M))
    return text[hits[-1].end():].rstrip() if hits else None


def warn_main_rank(log: logging.Logger, msg: str, *args: object) -> None:
    """Log a warning once per run: at warning level on the main rank (torchrun's RANK 0, or no RANK; loader
    workers inherit it), at debug level on the other ranks, which see the same data."""
    (log.warning if os.environ.get("RANK", "0") == "0" else log.debug)(msg, *args)


def _strict_error(what: str) -> BadImageError:
    return BadImageError(f"cannot read image file {what}. Remove or replace the file, or turn strict data checking "
                         f"off (data.strict=false, no --strict-data) to skip unreadable files.")


class BadFiles:
    """Which of a dataset's files are unreadable; ``add`` raises at once in strict mode."""

    def __init__(self, root: Path, paths: Sequence[str], strict: bool) -> None:
        self.root, self.paths, self.strict = root, paths, strict
        # one byte per file, plus a last byte set once any file has decoded; in shared memory for the workers
        self._flags = torch.zeros(len(paths) + 1, dtype=torch.uint8).share_memory_()
        self._held: list[str] = []  # this process's failures not logged yet (no file has decoded so far)

    def __contains__(self, i: int) -> bool:
        return bool(self._flags[i])

    @property
    def count(self) -> int:
        return int(self._flags[:-1].sum())

    def indices(self) -> list[int]:
        return torch.nonzero(self._flags[:-1]).flatten().tolist()

    def files(self) -> list[str]:
        return [self.paths[i] for i in self.indices()]

    def add(self, i: int, exc: BaseException) -> None:
        """Flag file ``i`` as unreadable and log it once (raise :class:`BadImageError` in strict mode)."""
        what = f"{self.paths[i]}: {type(exc).__name__}: {exc}"
        if self.strict:
            raise _strict_error(what) from exc
        if self._flags[i]:
            return
        self._flags[i] = 1
        self._held.append(what)
        if self._flags[-1]:
            self._log_held()

    def decoded_one(self) -> None:
        """Record that a file decoded: from now on failures are logged as they happen."""
        if not self._flags[-1]:
            self._flags[-1] = 1
        if self._held:
            self._log_held()

    def restore(self, indices: Sequence[int]) -> None:
        """Flags remembered from an earlier run (a stored cache), which decoded the other files."""
        if self.strict and indices:
            raise _strict_error(f"{self.paths[indices[0]]} (found unreadable when the stored decode cache was made)")
        self._flags[list(indices)] = 1
        self._flags[-1] = 1

    def _log_held(self) -> None:
        held, self._held = self._held, []
        for what in held:
            warn_main_rank(logger, "skipping unreadable image %s (%d of %d files bad so far); using the next readable "
                           "file", what, self.count, len(self.paths))

    def none_readable(self, tried: int) -> BadImageError:
        """The error for a dataset (or view) none of whose ``tried`` files can be read."""
        example = self._held[0] if self._held else (self.files() or ["?"])[0]
        return BadImageError(
            f"none of the {tried} image files tried under {self.root} can be read (e.g. {example}). Check that "
            f"they are real images (not Git LFS pointers, HTML error pages or partial downloads) and extract or "
            f"download them again, or set data.dataset to the right folder.")

    def report(self) -> str:
        """One line on the unreadable files found so far (for the end of a run)."""
        bad, n = self.files(), len(self.paths)
        if not bad:
            return f"{self.root}: no unreadable files among {n} (so far)."
        shown = ", ".join(bad[:SHOWN]) + (" …" if len(bad) > SHOWN else "")
        return f"{self.root}: {len(bad)} of {n} files unreadable, each replaced by the next readable file: {shown}"


class RecordsBadFiles:
    """`num_bad`, `bad_files` and `report()` of a dataset that records its unreadable files in `self.bad`
    (a `BadFiles`)."""

    bad: BadFiles

    @property
    def num_bad(self) -> int:
        """How many files were found unreadable so far, in any process."""
        return self.bad.count

    @property
    def bad_files(self) -> list[str]:
        """The paths of the files found unreadable so far, in any process."""
        return self.bad.files()

    def report(self) -> str:
        """One line on the unreadable files (for the end of a run)."""
        return self.bad.report()


__all__ = ["BadImageError", "BadFiles", "RecordsBadFiles", "warn_main_rank"]
