"""Errors a user can fix: the command line prints their message in one line (no traceback) and exits 2."""


class MALError(Exception):
    """Base of the errors whose message says what went wrong and how to fix it."""


class GPUOutOfMemoryError(MALError, RuntimeError):
    """A training step ran out of GPU memory; the message names the config keys that lower it."""


class Interrupted(MALError):
    """Ctrl-C: the message says where the run stopped and how to continue it (exit status 130)."""


__all__ = ["MALError", "GPUOutOfMemoryError", "Interrupted"]
