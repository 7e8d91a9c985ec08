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
    PYTHONPATH=src ncu --clock-control none -k regex:"_(states|out|dq|dstates|dkdv)_kernel" --launch-skip 6 \
        --launch-count 6 [sections] python3 benchmarks/ncu_block_grad.py --chunkwise 32,4096,192
    PYTHONPATH=src python benchmarks/ncu_block_grad.py --shape T-small --regs

`--chunkwise B,S,DH`: two forward + backward calls of the chunkwise cell (`mal.ops.mlstm.chunkwise`, 4 heads,
bf16) instead; each call launches the state loop, the output kernel, the state loop again, dq, the gradient
states and dk/dv, so --launch-skip 6 --launch-count 6 profiles the second call's six launches.
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


def chunkwise_calls(B: int, S: int, DH: int) -> dict:
    """Two forward + backward calls of the chunkwise cell; its kernels by name."""
    from mlstm_kernel import long_inputs
    from mal.ops.mlstm import chunkwise as ck
    inputs, dh = long_inputs(B, 4, S, DH)
    for _ in range(2):
        torch.autograd.grad(ck.mlstm_chunkwise_triton(*inputs), inputs, dh)
    names = ("_states_kernel", "_out_kernel", "_dq_kernel", "_dstates_kernel", "_dkdv_kernel")
    return {n: getattr(ck, n) for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="B", choices=list(SHAPES))
    ap.add_argument("--cell", action="store_true", help="the mLSTM cell's kernels instead of the block's")
    ap.add_argument("--chunkwise", default=None, metavar="B,S,DH",
                    help="the chunkwise mLSTM cell's kernels at B images of S tokens, head dim DH (4 heads)")
    ap.add_argument("--regs", action="store_true", help="print the compiled kernels' registers and spills")
    args = ap.parse_args()
    B, S, NH, DH = SHAPES[args.shape]
    if args.chunkwise:
        kernels = chunkwise_calls(*(int(x) for x in args.chunkwise.split(",")))
    elif args.cell:
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
        where = f"chunkwise B,S,DH {args.chunkwise}" if args.chunkwise else f"{args.shape}: B {B}, S {S}, DH {DH}"
        print(f"shape {where}")
        print_registers(kernels)


if __name__ == "__main__":
    main()
