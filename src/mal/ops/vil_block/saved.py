"""What the mLSTM cell's autograd keeps of q, k, v in the fused block: saved-tensor hooks that store them as
recipes (their view's layout) and rebuild them for the cell's backward, by recomputing the pre-cell step
(`RecomputeQKV`) or from the post tail's backward kernel (`VFromPost`)."""
from __future__ import annotations

import torch

from ..headwise import headwise


class SavedRecipes:
    """Saved-tensor hooks around the mLSTM cell: saved tensors that live in the storage of `outs` are stored as
    their view's layout (`pack`) and rebuilt on the first `unpack` in the backward from `self.outs`, which a
    subclass fills: by `_recompute`, or before the cell's backward by another function's backward."""

    def __init__(self, outs: tuple[torch.Tensor, ...]):
        self.storage = {o.untyped_storage().data_ptr(): j for j, o in enumerate(outs)}
        self.layout = [(o.shape, o.stride(), o.storage_offset()) for o in outs]
        self.outs: tuple[torch.Tensor, ...] | None = None

    def pack(self, t: torch.Tensor):
        j = self.storage.get(t.untyped_storage().data_ptr())
        return t if j is None else (j, t.shape, t.stride(), t.storage_offset())

    def unpack(self, saved):
        if isinstance(saved, torch.Tensor):
            return saved
        j, shape, stride, offset = saved
        if self.outs is None:
            self.outs = self._recompute()
        return self.outs[j].as_strided(shape, stride, offset)

    def _recompute(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class RecomputeQKV(SavedRecipes):
    """q, k, v of the cell stored as recipes: the first `unpack` (in the cell's backward) re-runs the pre-region
    on the inputs it was called with, in the same grad and autocast mode (so the same compiled graph or kernel
    runs and returns bitwise the same values).

    The cell's autograd saves q, k, v (3 x (B, S, I) per block, 12 bytes per token and model dim in bf16). The
    inputs (xz and weights) are kept by the block anyway. Cost: one pre-region forward per block backward.
    """

    def __init__(self, fn, args: tuple, kwargs: dict, outs: tuple[torch.Tensor, ...]):
        super().__init__(outs)
        self.fn, self.kwargs = fn, kwargs
        self.args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        self.grad = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        dev = outs[0].device.type
        self.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev),
                         torch.is_autocast_cache_enabled())

    def _recompute(self) -> tuple[torch.Tensor, ...]:
        dev, enabled, dtype, cache = self.autocast
        args = tuple(a.detach().requires_grad_(g) if isinstance(a, torch.Tensor) else a
                     for a, g in zip(self.args, self.grad))
        with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled, cache_enabled=cache):
            outs = tuple(o.detach() for o in self.fn(*args, **self.kwargs)[:len(self.layout)])
        got = [(o.shape, o.stride(), o.storage_offset()) for o in outs]
        if got != self.layout:
            raise RuntimeError(f"recomputing q, k, v gave layouts {got}, the forward {self.layout}; "
                               "run the block with fast_path(recompute_qkv=False)")
        return outs


class VFromPost(SavedRecipes):
    """The cell's v (B, S, I) stored as a recipe: `PostFused`'s backward, which runs just before the cell's,
    forms v in `mal.ops.block_grad.kernel.post_grad` from the x_m it reads anyway and hands it over (`provide`):
    4 of the block's saved bytes per token and model dim in bf16, for one (B, S, I) write.
    v = blockdiag(wv) x_m + bv is the pre-step kernel's arithmetic; `_recompute` (torch, float32) serves if no
    post backward provided it.
    """

    def __init__(self, v: torch.Tensor, xz: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor):
        super().__init__((v,))
        self.xz, self.weights = xz.detach(), (wv.detach(), bv.detach())

    def provide(self, v: torch.Tensor) -> None:
        if (v.shape, v.stride(), v.storage_offset()) != self.layout[0]:
            raise RuntimeError(f"v of layout {(v.shape, v.stride())} cannot rebuild the forward's {self.layout[0]}")
        self.outs = (v,)

    def _recompute(self) -> tuple[torch.Tensor, ...]:
        wv, bv = self.weights
        I = self.xz.shape[-1] // 2
        with torch.no_grad():
            v = headwise(self.xz[..., :I].float(), wv.float(), bv.float(), pointwise=True).to(self.xz.dtype)
        return (v.contiguous(),)


__all__ = ["RecomputeQKV", "SavedRecipes", "VFromPost"]
