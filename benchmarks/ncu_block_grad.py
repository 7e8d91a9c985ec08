"""Two calls of each kernel of `mal.ops.block_grad.kernel` at ViL-B's training shape, for Nsight Compute
(`--cell`: two forward + backward calls of the mLSTM cell, `mal.ops.mlstm.kernel`, at the same shape).

Launch order: post_grad (in `kernel_calls`), then post_grad, pre_grad's two kernels, twice; --launch-skip 3
--launch-count 3 profiles one launch of each, all compiled by then. What limits the kernels (registers,
occupancy, stalls, cache hit rates) is in the profiler's sections:

    PYTHONPATH=src ncu --clock-control none -k regex:"_post_grad|_pre_grad|_pre_dxm" --launch-skip 3 \
        --launch-count 3 --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis \
        --section LaunchStats --section WarpStateStats --section SchedulerStats python3 benchmarks/ncu_block_grad.py
    PYTHONPATH=src ncu --clock-control none -k regex:"_mlstm" --launch-skip 3 --launch-count 3 [sections] \
        python3 benchmarks/ncu_block_grad.py --cell
"""
from __future__ import annotations

import sys

import torch
from block_grad import SHAPES, kernel_calls  # benchmarks/ is this script's directory


def main() -> None:
    if "--cell" in sys.argv[1:]:
        from mlstm_kernel import make_inputs
        from mal.ops.mlstm.kernel import mlstm_triton
        B, S, NH, DH = SHAPES["B"]
        inputs, dh = make_inputs(B, NH, S, DH, torch.bfloat16)
        for _ in range(2):                                                   # fwd, dq, dk/dv kernels per call
            torch.autograd.grad(mlstm_triton(*inputs), inputs, dh)
    else:
        _, run_post, run_pre = kernel_calls(*SHAPES["B"])                    # compiles post_grad
        for _ in range(2):
            run_post()
            run_pre()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
