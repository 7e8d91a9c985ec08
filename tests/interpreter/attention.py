"""The short-sequence attention kernels (`mal.ops.attention.kernel`) in the interpreter."""
import torch

from cell_checks import rel   # tests/ is on the path
from mal.models.vit import block_causal_mask
from mal.ops.attention import attention_math
from mal.ops.attention.kernel import attention_triton, launch_config


def _case(B, H, M, D, slot, dtype, heads_last):
    """q, k, v (B, H, M, Dh) (views of one (B, M, 3, H, Dh) tensor as the decoder makes them, or contiguous), the
    block-causal mask of slots of `slot` tokens and an upstream gradient."""
    if heads_last:
        qkv = torch.randn(B, M, 3, H, D, dtype=dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                       # (B, H, M, D) each
    else:
        q, k, v = (torch.randn(B, H, M, D, dtype=dtype) for _ in range(3))
    mask = block_causal_mask(torch.arange(M) // slot)                        # (M, M)
    return q, k, v, mask, torch.randn(B, H, M, D, dtype=dtype)



def matches_float64():
    """Output and q/k/v gradients against the float64 math form: the decoder's slots of 16 at M = 128 (heads
    views of one qkv tensor), causal at M = 143 (clusters of one patch: keys in a 256-wide tile), odd M and slot,
    a head dim of 16; float32 (IEEE products) and float16; the backward whole and split into blocks of 32 keys
    (at M = 128 with 64-row query blocks, the first query block's tiles of keys 64-127 are hidden and skipped)."""
    torch.manual_seed(0)
    for B, H, M, D, slot, dtype, heads_last in [(2, 2, 128, 32, 16, torch.float32, True),
                                                 (1, 2, 143, 32, 1, torch.float32, False),
                                                 (2, 1, 37, 16, 5, torch.float32, False),
                                                 (2, 2, 128, 32, 16, torch.float16, True)]:
        q, k, v, mask, dout = _case(B, H, M, D, slot, dtype, heads_last)
        ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = attention_math(*ref_leaves, mask)
        ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
        tol = 1e-5 if dtype == torch.float32 else 3e-3
        for keys in (None, 32):
            with launch_config(BWD_KEYS=keys):
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                out = attention_triton(*leaves, mask)
                grads = torch.autograd.grad(out, leaves, dout)
            assert out.shape == q.shape and out.dtype == dtype
            for name, a, b in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref, *ref_grads]):
                assert rel(a, b) < tol, (B, H, M, D, slot, dtype, keys, name, rel(a, b))
            assert grads[0].stride() == q.stride() and out.transpose(1, 2).is_contiguous()   # q's, heads-last


def hidden_rows_give_zero():
    """A query row that sees no key gives out 0 and no gradient (SDPA gives NaN), the backward whole or split in
    blocks of 16 keys; the other rows are the math form's."""
    torch.manual_seed(0)
    q, k, v, mask, dout = _case(1, 1, 20, 16, 4, torch.float32, False)
    mask = mask.clone()
    mask[3] = False
    for keys in (None, 16):
        with launch_config(BWD_KEYS=keys):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = attention_triton(*leaves, mask)
            dq = torch.autograd.grad(out, leaves, dout)[0]
        assert torch.equal(out[0, 0, 3], torch.zeros(16)) and torch.equal(dq[0, 0, 3], torch.zeros(16)), keys
    keep = torch.arange(20) != 3
    ref = attention_math(q.double(), k.double(), v.double(), mask)
    assert rel(out[..., keep, :], ref[..., keep, :]) < 1e-5
