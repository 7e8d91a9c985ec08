"""Two calls of each kernel of `mal.ops.block_grad.kernel` at one of `block_grad.SHAPES` (default ViL-B's
training shape), for Nsight Compute (`--cell`: two forward + backward calls of the mLSTM cell,
`mal.ops.mlstm.kernel`, at the same shape); `--regs` prints what each compiled kernel holds per thread
(registers, spills, shared memory) without a profiler.

Launch order: post_grad (in `kernel_calls`), then post_grad, pre_grad's two kernels, twice; --launch-skip 3
--launch-count 3 profiles one launch of each, all compiled by then. What limits the kernels (registers,
occupancy, stalls, cache hit rates) is in the profiler's sections:

    PYTHONPATH=src ncu --clock-control none -k regex:"_post_grad|_pre_grad|_pre_dxm" --launch-skip 3 \
        --launch-count 3 --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis \
        --section LaunchStats --section WarpStateStats --section SchedulerStats python3 benchmarks/ncu_block_grad.py
    PYTHONPATH=src ncu --clock-control none -k regex:"_mlstm" --launch-skip 3 --launch-count 3 [sections] \
        python3 benchmarks/ncu_block_grad.py --cell
    PYTHONPATH=src python benchmarks/ncu_block_grad.py --shape T-small --regs
"""
from __future__ import annotations

import argparse

import torch
from block_grad import SHAPES, kernel_calls  # benchmarks/ is this script's directory


def compiled(fn) -> list:
    """The compiled kernels in a `triton.jit` function's cache (Triton 3's `device_caches`; [] where absent)."""
    out = []
    for cache in getattr(fn, "device_caches", {}).values():
        out += list((cache[0] if isinstance(cache, tuple) else cache).values())
    return out


def print_registers(kernels: dict) -> None:
    """One line per compiled kernel: registers and spills per thread, warps, shared memory per program."""
    for name, fn in kernels.items():
        for k in compiled(fn):
            meta = getattr(k, "metadata", None)
            print(f"{name}: {getattr(k, 'n_regs', '?')} registers, {getattr(k, 'n_spills', '?')} spills, "
                  f"{getattr(meta, 'num_warps', '?')} warps, {getattr(meta, 'shared', '?')} B shared", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="B", choices=list(SHAPES))
    ap.add_argument("--cell", action="store_true", help="the mLSTM cell's kernels instead of the block's")
    ap.add_argument("--regs", action="store_true", help="print the compiled kernels' registers and spills")
    args = ap.parse_args()
    B, S, NH, DH = SHAPES[args.shape]
    if args.cell:
        from mlstm_kernel import make_inputs
        from mal.ops.mlstm import kernel as mk
        inputs, dh = make_inputs(B, NH, S, DH, torch.bfloat16)
        for _ in range(2):                                                   # fwd, dq, dk/dv kernels per call
            torch.autograd.grad(mk.mlstm_triton(*inputs), inputs, dh)
        kernels = {n: getattr(mk, n) for n in ("_mlstm_fwd_kernel", "_mlstm_bwd_dq_kernel", "_mlstm_bwd_dkdv_kernel")}
    else:
        from mal.ops.block_grad import kernel as bg
        _, run_post, run_pre = kernel_calls(B, S, NH, DH)                    # compiles post_grad
        for _ in range(2):
            run_post()
            run_pre()
        kernels = {n: getattr(bg, n) for n in ("_post_grad_kernel", "_pre_grad_kernel", "_pre_dxm_kernel")}
    torch.cuda.synchronize()
    if args.regs:
        print(f"shape {args.shape}: B {B}, S {S}, NH {NH}, DH {DH}")
        print_registers(kernels)


if __name__ == "__main__":
    main()
