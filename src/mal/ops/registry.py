"""One registry and dispatch for the fused ops: which backend computes an op for given inputs.

Every op has one reference backend (plain PyTorch, the oracle and the fallback) and may have faster ones.
A backend is registered with a `supports(*args)` predicate over the op's dispatch arguments (documented by
each op's package) and, for a kernel, the device type it runs on. Implementation and predicate may be
named lazily as "package.module" or "package.module:attr": such a module is imported only when a backend is
resolved for inputs on its device, so that importing the ops (and the plain model) imports no Triton.

    resolve(op, *args, backend="auto")   the first auto-candidate whose supports(*args) holds, else the reference
    backends(op)                         the backend names, known without importing any implementation

An implementation is what a caller runs: a function (mlstm, headwise, qkv: one signature for every backend)
or a module of forward and backward pieces that `mal.ops.vil_block` composes (norm, block_grad).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

_MODULES: dict[str, Any] = {}           # imported lazily; kept so a lookup inside a torch.compile trace imports nothing
_UNAVAILABLE: dict[str, str] = {}       # module -> why it cannot be imported here (e.g. triton is not installed)


@dataclass(frozen=True)
class Lazy:
    """A module, or an attribute of one, named by "package.module[:attr]" and imported on first use."""
    module: str
    attr: str | None = None

    @classmethod
    def parse(cls, name: str) -> "Lazy":
        module, _, attr = name.partition(":")
        return cls(module, attr or None)

    def get(self) -> Any:
        module = _MODULES.get(self.module)
        if module is None:
            module = _MODULES[self.module] = importlib.import_module(self.module)
        return module if self.attr is None else getattr(module, self.attr)   # looked up per call: patchable


def _get(obj: Any) -> Any:
    return obj.get() if isinstance(obj, Lazy) else obj


def _first_tensor(args: tuple) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of an op. `device`: the device type of the first tensor argument it takes (checked
    before anything lazy is imported); `auto`: a candidate of backend="auto"; `reference`: the op's fallback."""
    op: str
    name: str
    target: Any
    supports: Any = None
    device: str | None = None
    auto: bool = True
    reference: bool = False

    @property
    def impl(self) -> Any:
        """The implementation (imported on first use if named lazily)."""
        return _get(self.target)

    def __call__(self, *args, **kwargs):
        return self.impl(*args, **kwargs)

    def on_device(self, args: tuple) -> bool:
        """Whether the inputs are on the backend's device (no import)."""
        if self.device is None:
            return True
        first = _first_tensor(args)
        return first is not None and first.device.type == self.device

    def unavailable(self) -> str | None:
        """Why the backend cannot run here (a dependency fails to import), else None."""
        for ref in (self.target, self.supports):
            if isinstance(ref, Lazy):
                if ref.module not in _MODULES and ref.module not in _UNAVAILABLE:
                    _try_import(ref.module)
                if ref.module in _UNAVAILABLE:
                    return _UNAVAILABLE[ref.module]
        return None

    def accepts(self, *args) -> bool:
        """Whether the backend takes these inputs: on its device, importable, and `supports(*args)`."""
        if not self.on_device(args) or self.unavailable() is not None:
            return False
        return self.supports is None or bool(_get(self.supports)(*args))


def _try_import(module: str) -> None:
    """Import `module` into the cache, or record why it cannot be imported. A missing module of this package
    (a wrong name) is an error; a failing dependency (e.g. no triton) makes the backend unavailable."""
    try:
        _MODULES[module] = importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if isinstance(exc, ModuleNotFoundError) and missing.partition(".")[0] == __name__.partition(".")[0]:
            raise                                                   # a module of this package: a wrong name
        _UNAVAILABLE[module] = f"{type(exc).__name__}: {exc}"


def _describe(args: tuple) -> str:
    first = _first_tensor(args)
    if first is None:
        return "no tensor inputs"
    return f"input of shape {tuple(first.shape)}, dtype {first.dtype} on {first.device}"


class Registry:
    """Backends per op, in registration order (the order in which backend="auto" tries them)."""

    def __init__(self):
        self._ops: dict[str, dict[str, Backend]] = {}
        self._prepared: set[str] = set()

    def register(self, op: str, name: str, impl: Any, supports: Any = None, *, device: str | None = None,
                 auto: bool = True, reference: bool = False) -> None:
        """Add (or replace) backend `name` of `op`. impl and supports: objects, or "package.module[:attr]"
        strings imported on first use; supports=None takes every input. reference=True: the op's fallback
        (plain PyTorch), never an auto-candidate; device: the device type the backend runs on."""
        lazy = lambda x: Lazy.parse(x) if isinstance(x, str) else x
        table = self._ops.setdefault(op, {})
        if reference and any(b.reference and b.name != name for b in table.values()):
            raise ValueError(f"op {op!r} has a reference backend already")
        table[name] = Backend(op, name, lazy(impl), lazy(supports), device, auto and not reference, reference)

    def backends(self, op: str) -> list[str]:
        """The names of `op`'s backends (without importing any of them)."""
        return list(self._table(op))

    def load(self, op: str, name: str) -> Any:
        """The implementation of backend `name` of `op` (for a caller that has resolved it already)."""
        return self._named(op, name).impl

    def resolve(self, op: str, *args, backend: str = "auto") -> Backend:
        """The backend that computes `op` for these dispatch arguments. "auto": the first auto-candidate that
        accepts them, else the reference; a named backend must accept them (ValueError otherwise)."""
        if backend == "auto":
            for b in self._table(op).values():
                if b.auto and b.accepts(*args):
                    return b
            return self._reference(op)
        b = self._named(op, backend)
        if not b.on_device(args):
            reason = f"it runs on {b.device} inputs"
        elif b.unavailable() is not None:
            reason = f"it is not available here ({b.unavailable()})"
        else:
            reason = None if b.accepts(*args) else "its supports() refuses them"
        if reason is not None:
            raise ValueError(f"{op} backend {backend!r} does not support the {_describe(args)}: {reason}; "
                             f"use backend='auto' to fall back to {self._reference(op).name!r}")
        return b

    def prepare(self, device: str) -> None:
        """Import every available backend of every op that runs on `device`, once: a resolution inside a
        torch.compile trace then imports nothing (an import there would break the graph)."""
        if device in self._prepared:
            return
        for table in self._ops.values():
            for b in table.values():
                if b.device == device:
                    b.unavailable()                                 # imports its modules, or notes why not
        self._prepared.add(device)

    def _table(self, op: str) -> dict[str, Backend]:
        if op not in self._ops:
            raise ValueError(f"unknown op {op!r}; the ops are {sorted(self._ops)}")
        return self._ops[op]

    def _named(self, op: str, name: str) -> Backend:
        table = self._table(op)
        if name not in table:
            raise ValueError(f"unknown {op} backend {name!r}; choose one of {['auto', *table]}")
        return table[name]

    def _reference(self, op: str) -> Backend:
        ref = next((b for b in self._table(op).values() if b.reference), None)
        if ref is None:
            raise ValueError(f"op {op!r} has no reference backend")
        return ref


REGISTRY = Registry()
register, resolve, backends, load, prepare = (REGISTRY.register, REGISTRY.resolve, REGISTRY.backends, REGISTRY.load,
                                              REGISTRY.prepare)

__all__ = ["Backend", "Lazy", "Registry", "REGISTRY", "register", "resolve", "backends", "load", "prepare"]
