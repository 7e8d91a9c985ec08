"""Two calls of each kernel of `mal.kernels.block_grad_triton` at ViL-B's training shape, for Nsight Compute.

The first call of each compiles (skip it with --launch-skip 3); what limits the kernels (registers, occupancy,
stalls, cache hit rates) is in the profiler's sections:

    PYTHONPATH=src ncu --clock-control none -k regex:"_post_grad|_pre_grad|_pre_dxm" --launch-skip 3 \
        --launch-count 3 --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis \
        --section LaunchStats --section WarpStateStats --section SchedulerStats python3 benchmarks/ncu_block_grad.py
"""
from __future__ import annotations

import torch
from block_grad import SHAPES, inputs  # benchmarks/ is this script's directory


def main() -> None:
    from mal import fused
    from mal.fused import gate_weights
    from mal.kernels import block_grad_triton as bg
    B, S, NH, DH = SHAPES["B"]
    I = NH * DH
    pre, post, h, _ = inputs(B, S, NH, DH)
    xz = pre[0]
    w_c, w_m, _ = gate_weights(*pre[9:], *pre[3:9])
    du = torch.randn(B, S, I, device="cuda").bfloat16()
    d_qkv = [torch.randn(B, S, I, device="cuda").bfloat16() for _ in range(3)]
    dg = torch.randn(B, S, 2 * NH, device="cuda").bfloat16()
    for _ in range(2):
        packed = bg.post_grad(du, h, xz, *post[:5], fused.POST_LN_EPS)[1]
        bg.pre_grad(*d_qkv, dg, packed, xz, *pre[1:3], pre[3], pre[5], pre[7], w_c, w_m)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
