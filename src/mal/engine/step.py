"""The loss of one training micro-batch, run eagerly or replayed from CUDA graphs, and the optimizer.

On one GPU the forward and backward of a micro-batch are captured once in two CUDA graphs
(`torch.cuda.make_graphed_callables`) and replayed every step: the host then launches two graphs
instead of thousands of kernels, which is what bounds a small model's step (docs/fast_path.md). The
optimizer, gradient clipping and EMA stay eager (a few fused kernels); under DDP the gradients are averaged
between the replay and the optimizer (`mal.distributed.FlatGradSync`). The captured step is the same
computation as the eager one; the autocast weight cache is off so the casts are inside the graph.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn as nn

from ..distributed import DistInfo
from .evaluate import autocast_for

log = logging.getLogger("mal")


class LossStep(nn.Module):
    """Loss of one micro-batch as a module over the model's parameters (what the graphs capture).

    pretraining (no criterion): forward(imgs, *draws) -> the objective's loss, draws from its `sample_inputs`;
    classification: forward(imgs, targets) -> criterion(logits, targets).
    """

    def __init__(self, model: nn.Module, criterion: nn.Module | None = None):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, imgs: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        if self.criterion is None:
            return self.model(imgs, *extra)["loss"]
        return self.criterion(self.model(imgs).float(), extra[0])


def graphs_usable(want: bool, device: torch.device, info: DistInfo, grad_sync: str = "auto") -> bool:
    """CUDA graphs need a CUDA device, and under DDP the flat gradient all-reduce (`grad_sync` auto or flat):
    DDP's per-bucket hooks cannot run inside a replayed backward. A forward that draws random scan orders is
    captured too: it draws them on the GPU, so every replay draws new ones."""
    if not want:
        return False
    if device.type != "cuda":
        log.info("cuda_graph: no CUDA device, steps run eagerly")
        return False
    if info.enabled and grad_sync == "ddp":
        log.info("cuda_graph: off with grad_sync=ddp (%d processes): DDP's hooks run eagerly", info.world_size)
        return False
    return True


class StepRunner:
    """Calls `LossStep` eagerly under autocast, or through CUDA graphs captured at the first call.

    The first call's tensors fix the shapes (the loader drops the last partial batch, so every
    micro-batch has the same shapes); later calls copy their inputs into the captured buffers.
    A replayed backward hands out gradients that alias the graph's buffers, so with gradient
    accumulation the gradients are kept allocated and zeroed in place (`zero_grad`) instead.
    """

    def __init__(self, loss_step: LossStep, device: torch.device, amp: bool, graphs: bool, accum_steps: int = 1,
                 warmup: int = 3):
        self.loss_step, self.device, self.amp, self.graphs, self.warmup = loss_step, device, amp, graphs, warmup
        self.keep_grads = graphs and accum_steps > 1
        self._graphed: Callable | None = None

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Clear the gradients before a step's first micro-batch."""
        if not self.keep_grads:
            optimizer.zero_grad(set_to_none=True)
            return
        for g in optimizer.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        optimizer.zero_grad(set_to_none=False)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if not self.graphs:
            with autocast_for(self.device, self.amp):
                return self.loss_step(*args)
        if self._graphed is None:
            self._graphed = self.capture(args)
        return self._graphed(*args)

    def capture(self, args: tuple[torch.Tensor, ...]) -> Callable:
        """Warm up (compiles the fast path) and capture forward + backward for inputs shaped like `args`."""
        quiet_graphed_backward()
        static = tuple(a.detach().clone() for a in args)
        with autocast_for(self.device, self.amp, cache=False):
            return torch.cuda.make_graphed_callables(self.loss_step, static, num_warmup_iters=self.warmup,
                                                     allow_unused_input=True)


def quiet_graphed_backward() -> None:
    """Silence autograd's AccumulateGrad stream-mismatch warning (torch >= 2.10) for the rest of the process.
    `make_graphed_callables` warms up on a side stream, where the parameters' AccumulateGrad nodes are created, and
    the graphed backward then hands them gradients made on another stream. Autograd synchronizes the two streams (the
    graphed steps equal the eager ones: tests/test_step.py), so the mismatch is expected, and the warning, which
    names this switch for that case, would otherwise print once in every graphed run."""
    switch = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
    if switch is not None:
        switch(False)


__all__ = ["LossStep", "StepRunner", "graphs_usable", "quiet_graphed_backward"]
