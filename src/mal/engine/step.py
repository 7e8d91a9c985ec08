"""The loss of one training micro-batch, run eagerly or replayed from CUDA graphs, and the optimizer.

On one GPU the forward and backward of a micro-batch are captured once in two CUDA graphs
(`torch.cuda.make_graphed_callables`) and replayed every step: the host then launches two graphs
instead of thousands of kernels, which is what bounds a small model's step (docs/fast_path.md). The
optimizer, gradient clipping and EMA stay eager (a few fused kernels); under DDP the gradients are averaged
between the replay and the optimizer (`mal.distributed.FlatGradSync`). The captured step is the same
computation as the eager one; the autocast weight cache is off so the casts are inside the graph.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Callable, Iterator

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

    Given the optimizer (`graph_optimizer`, one process, one micro-batch a step), one graph holds the whole
    update: forward, backward, gradient clipping and AdamW. A call then returns the loss with the weights
    already updated (`updates`), and the host launches one graph a step instead of the optimizer's kernels and
    the autograd engine's per-parameter work.
    """

    def __init__(self, loss_step: LossStep, device: torch.device, amp: bool, graphs: bool, accum_steps: int = 1,
                 warmup: int = 3, optimizer: torch.optim.Optimizer | None = None, clip_grad: float = 0.0):
        self.loss_step, self.device, self.amp, self.graphs, self.warmup = loss_step, device, amp, graphs, warmup
        self.keep_grads = graphs and accum_steps > 1
        self.optimizer = optimizer if graphs else None
        self.clip_grad = clip_grad
        self._graphed: Callable | None = None

    @property
    def updates(self) -> bool:
        """Whether a call also clips the gradients and steps the optimizer (the whole update is one graph)."""
        return self.optimizer is not None

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
            self._graphed = self.capture_update(args) if self.updates else self.capture(args)
        return self._graphed(*args)

    def capture(self, args: tuple[torch.Tensor, ...]) -> Callable:
        """Warm up (compiles the fast path) and capture forward + backward for inputs shaped like `args`."""
        quiet_graphed_backward()
        static = tuple(a.detach().clone() for a in args)
        with autocast_for(self.device, self.amp, cache=False):
            return graphed_callables(self.loss_step, static, self.warmup)

    def capture_update(self, args: tuple[torch.Tensor, ...]) -> Callable:
        """Warm up (compiles, creates AdamW's state) and capture one whole update for inputs shaped like `args`;
        the warm-up's updates are undone, so the run's first step is the same as without the capture."""
        quiet_graphed_backward()                         # warm-up and capture run on two side streams
        opt = self.optimizer
        static = tuple(a.detach().clone() for a in args)
        params = [p for g in opt.param_groups for p in g["params"]]
        saved = snapshot(params, opt)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.update(static, params)
        torch.cuda.current_stream().wait_stream(side)
        restore(params, opt, saved)
        make_capturable(opt, self.device)               # after the eager warm-up (else AdamW warns at each step)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode=CAPTURE_MODE):
            loss = self.update(static, params)

        def replay(*new: torch.Tensor) -> torch.Tensor:
            for buf, a in zip(static, new):
                buf.copy_(a)
            graph.replay()
            return loss
        return replay

    def update(self, args: tuple[torch.Tensor, ...], params: list[torch.Tensor]) -> torch.Tensor:
        """One whole update of the weights on `args`: the loss (detached) after zero_grad, backward, clip, AdamW."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_for(self.device, self.amp, cache=False):
            loss = self.loss_step(*args)
        loss.backward()
        if self.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        self.optimizer.step()
        return loss.detach()


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """AdamW inside a CUDA graph: capturable, its lr a device tensor (`set_lr` fills it before each replay)."""
    for g in optimizer.param_groups:
        g["capturable"] = True
        if not isinstance(g["lr"], torch.Tensor):
            g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=device)


def snapshot(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """Copies of the weights and of the optimizer's state tensors (absent state: none yet, a fresh optimizer)."""
    return {"params": [p.detach().clone() for p in params],
            "state": {id(p): {k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
                      for p, st in optimizer.state.items()}}


@torch.no_grad()
def restore(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Back to `snapshot`'s weights and optimizer state, in place (a graph captured later keeps the addresses).
    State created since the snapshot is zeroed: AdamW's fresh state is zero moments at step 0."""
    for p, old in zip(params, saved["params"]):
        p.copy_(old)
        p.grad = None
    for p, st in optimizer.state.items():
        old = saved["state"].get(id(p), {})
        for k, v in st.items():
            if not isinstance(v, torch.Tensor):
                continue
            if k in old:
                v.copy_(old[k])
            else:
                v.zero_()


CAPTURE_MODE = "thread_local"


class _ThreadLocalGraph(torch.cuda.CUDAGraph):
    """A CUDA graph whose capture always begins in `CAPTURE_MODE` (for torch without make_graphed_callables'
    capture_error_mode argument, which creates its graphs itself)."""

    def capture_begin(self, pool=None, capture_error_mode: str = "global") -> None:
        super().capture_begin(pool, capture_error_mode=CAPTURE_MODE)


@contextlib.contextmanager
def _graphs_capture_thread_local() -> Iterator[None]:
    saved = torch.cuda.CUDAGraph
    torch.cuda.CUDAGraph = _ThreadLocalGraph
    try:
        yield
    finally:
        torch.cuda.CUDAGraph = saved


def graphed_callables(fn: Callable, static: tuple[torch.Tensor, ...], warmup: int) -> Callable:
    """`torch.cuda.make_graphed_callables` with thread-local capture: a CUDA call from another host thread during
    the capture (the loader's pin-memory thread allocating pinned memory, a profiler's thread) would otherwise
    invalidate it ("operation failed due to a previous error during capture"). The capture's own thread is
    checked as before."""
    kwargs = dict(num_warmup_iters=warmup, allow_unused_input=True)
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
        return torch.cuda.make_graphed_callables(fn, static, capture_error_mode=CAPTURE_MODE, **kwargs)
    with _graphs_capture_thread_local():
        return torch.cuda.make_graphed_callables(fn, static, **kwargs)


def quiet_graphed_backward() -> None:
    """Silence autograd's AccumulateGrad stream-mismatch warning (torch >= 2.10) for the rest of the process.
    `make_graphed_callables` warms up on a side stream, where the parameters' AccumulateGrad nodes are created, and
    the graphed backward then hands them gradients made on another stream. Autograd synchronizes the two streams (the
    graphed steps equal the eager ones: tests/test_step.py), so the mismatch is expected, and the warning, which
    names this switch for that case, would otherwise print once in every graphed run."""
    switch = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
    if switch is not None:
        switch(False)


__all__ = ["LossStep", "StepRunner", "graphs_usable", "graphed_callables", "make_capturable", "snapshot",
           "restore", "quiet_graphed_backward", "CAPTURE_MODE"]
