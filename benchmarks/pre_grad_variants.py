"""Experiment (reverted in the next commit): pre_grad variants, tensor-core block-diagonal maps (MMA) and per-tile tap sums (TAPSUM).

Note: repeated calls overwrite the packed buffer the kernel reads, so the err column is meaningless; the
times include the host-side weight preparation of every call. Run: PYTHONPATH=src python benchmarks/pre_grad_variants.py"""
import sys, torch
sys.path.insert(0, "benchmarks")
from block_grad import kernel_calls
from qkv_kernel import cuda_ms
for shape in ("B", "S"):
    B, S, NH, DH = {"B": (128, 197, 4, 384), "S": (128, 197, 4, 192)}[shape]
    _, run_post, run_pre = kernel_calls(B, S, NH, DH)
    ref = run_pre()
    res = []
    for mma in (0, 1):
        for taps in (0, 1):
            for bt, bc in ((32, 64), (64, 32), (32, 32), (16, 64), (64, 64)):
                cfg = (bt, bc, 4, mma, taps)
                try:
                    out = run_pre(cfg=cfg, dxm=(bt, bc, 4, mma, taps))
                    err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(out, ref))
                    ms_pre = cuda_ms(lambda: run_pre(cfg=cfg))
                    ms_dxm = cuda_ms(lambda: run_pre(dxm=(bt, bc, 4, mma, taps)))
                    res.append((ms_pre, ms_dxm, cfg, err))
                except Exception as e:
                    print(cfg, type(e).__name__, str(e)[:100])
    res.sort()
    for r in res:
        print(shape, "pre %.3f (with dxm variant %.3f)" % r[:2], r[2], "err %.2e" % r[3], flush=True)
