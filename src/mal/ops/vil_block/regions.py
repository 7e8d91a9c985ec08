"""The fused block's compiled regions: one torch.compile of each region function per mode, shared by all blocks
(and models) of the same shapes, partitioned for the backward under `MEMORY_BUDGET`."""
from __future__ import annotations

import torch

from ..registry import prepare

_COMPILED: dict = {}

# Activation memory budget of each compiled region's forward/backward partition
# (torch._functorch.config.activation_memory_budget: the fraction of the default partition's saved bytes).
# 0 = save only the region's inputs and recompute the rest in the backward. block_pre and block_post are
# pointwise work around two thin gate GEMMs and the down-projection (whose output the backward does not
# need), so their backward recomputes x_c, the padded conv input, SiLU and the per-head norm from xz and h,
# which are saved anyway (~47 -> ~30 saved bytes per token and model dim and block). block_up keeps the
# default: at 0 it would recompute the up-projection GEMM.
MEMORY_BUDGET = {"block_up": 1.0, "block_pre": 0.0, "block_post": 0.0}

# Compiled versions dynamo keeps of each function before it runs new inputs eagerly and warns ("hit
# config.recompile_limit (8)"). Static shapes compile once per input shape and grad mode: the training step, the
# evaluation batches, the last partial batch and the probes of one run already need more than 8.
RECOMPILE_LIMIT = 64


def allow_recompiles() -> None:
    """Raise dynamo's per-function recompile limit to at least `RECOMPILE_LIMIT` (process-wide)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))


def compiled_region(fn, mode: str | None):
    """One torch.compile'd copy of `fn` per mode, shared by all blocks (static shapes), partitioned under
    `MEMORY_BUDGET[fn.__name__]` (read when a call compiles; every call sets it, so recompiles agree; functions
    not in it, such as the no-grad `block_pre_vjp`, compile under the default). The kernels of the inputs'
    device are imported before a call: a region that dispatches an op (headwise) then imports nothing while
    it is traced (an import there would break the graph)."""
    key = (fn.__name__, mode)
    if key not in _COMPILED:
        allow_recompiles()
        region, budget = torch.compile(fn, dynamic=False, mode=mode), MEMORY_BUDGET.get(fn.__name__)

        def call(*args, **kwargs):
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first is not None:
                prepare(first.device.type)
            if budget is None:                                              # no autograd: nothing to partition
                return region(*args, **kwargs)
            with torch._functorch.config.patch(activation_memory_budget=budget):
                return region(*args, **kwargs)
        _COMPILED[key] = call
    return _COMPILED[key]


__all__ = ["MEMORY_BUDGET", "RECOMPILE_LIMIT", "allow_recompiles", "compiled_region"]
