"""The pre-cell step's kernel (`mal.ops.qkv.kernel`) in the interpreter."""
import torch

from mal.ops.qkv import block_pre, gate_weights
from mal.ops.qkv.kernel import qkv_gates


def kernel_matches_block_pre_in_float64():
    """Against `block_pre` in float64 on the kernel's (rounded) input, float32 and float16 (the interpreter's
    bf16 dot is broken): sequences shorter than the conv and than a tile, channel chunks of 16/32/64, two
    configs."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape, s=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * s
    for B, S, I, dt, tol in [(2, 37, 64, torch.float32, 1e-6), (1, 70, 96, torch.float32, 1e-6),
                             (1, 3, 32, torch.float32, 1e-6), (2, 33, 128, torch.float16, 2e-3)]:
        xz = r(B, S, 2 * I)
        p = [r(I, 1, 4, s=0.5), r(I, s=0.1)] + [t for _ in range(3) for t in (r(I // 4, 4, 4, s=0.5), r(I, s=0.1))]
        wg, bg = r(8, 3 * I, s=0.1), r(8)
        w_c, w_m, b = gate_weights(wg, bg, *p[2:])
        f32 = [t.float() for t in p + [w_c, w_m, b]]
        ref = block_pre(xz.to(dt).double(), *p, wg, bg)                # on the kernel's input, exactly
        for config in [(64, 32, 4), (16, 64, 8)]:
            out = qkv_gates(xz.to(dt), *f32, config=config)
            for name, o, want in zip("qkvg", out, ref):
                assert o.dtype == dt and o.shape == want.shape, (name, o.dtype, o.shape)
                e = ((o.double() - want).norm() / want.norm()).item()
                assert e < tol, (B, S, I, dt, config, name, e)
