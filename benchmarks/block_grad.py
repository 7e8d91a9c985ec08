"""The backward of the ViL block's pointwise regions on one GPU: the Triton kernels (`mal.ops.block_grad.kernel`)
against the compiled regions' backward they replace (inductor's backward of `block_post` + the compiled
`block_pre_vjp`).

Per shape (B, S, NH, DH), bf16 activations, ms per call (median of CUDA-event-timed calls):
  post_grad_ms, pre_grad_ms      the kernels alone (pre_grad: its two kernels)
  compiled_regions_ms            forward + backward of pre-step -> post-tail (no cell: h is an input), captured
  kernel_regions_ms              in a CUDA graph, the same forward, the old and the new backward
  post_fwd_kernel_ms             the post tail's forward kernel alone (`post_fwd`: u)
  post_fwd_ms, post_fwd_compiled_ms   the post tail's forward without grad, as `PostFused` runs it (`post_fwd` +
                                 the compiled `block_down`) and as the compiled `block_post` (inductor)
--sweep times every kernel configuration (BLOCK_T, BLOCK_C, warps) of each kernel and reports the fastest (ms per
call from a CUDA graph of 10 calls: the kernel's time without launch overhead, as in a graphed training step).

    PYTHONPATH=src python benchmarks/block_grad.py --sweep --json block_grad.json
"""
from __future__ import annotations

import itertools
import json

import torch
from qkv_kernel import cuda_ms, graph_ms, inputs as pre_inputs, parse_args, report, sweep  # benchmarks/: this dir
from throughput import device_info

SHAPES = {"T": (128, 197, 4, 96), "S": (128, 197, 4, 192), "B": (128, 197, 4, 384), "B-pretrain": (256, 145, 4, 384),
          "T-pretrain": (256, 128, 4, 96), "T-small": (256, 144, 4, 96)}   # the small protocols' steps (144 tokens)


def graphed_ms(fn) -> float:
    """Median ms per replay of one call of fn captured in a CUDA graph (after warm-up on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    return cuda_ms(graph.replay)


def inputs(B, S, NH, DH, device="cuda"):
    """bf16 xz and the pre-step's float32 parameters (11, as `qkv_kernel.inputs`), the post tail's 7, bf16 h
    and a float32 cotangent of the block output."""
    g = torch.Generator(device=device).manual_seed(1)
    r = lambda *shape, s=1.0: torch.randn(*shape, generator=g, device=device) * s
    I, D = NH * DH, NH * DH // 2
    post = [r(I, 1, 4, s=0.5), r(I, s=0.1), 1 + r(I, s=0.2), r(I, s=0.1), 1 + r(I, s=0.2), r(D, I, s=0.05), r(D)]
    return pre_inputs(B, S, I, gates=2 * NH, device=device), post, r(B, NH, S, DH).bfloat16(), r(B, S, D)


def kernel_calls(B, S, NH, DH, device="cuda"):
    """`inputs`, random bf16 incoming gradients (dq, dk, dv, dg) and the kernels as functions of their config:
    run_post(cfg) -> `post_grad`'s outputs, run_pre(cfg, dxm) -> `pre_grad`'s (on run_post's packed buffer)."""
    from mal.ops.block_grad import kernel as bg
    from mal.ops.qkv import gate_weights
    from mal.ops.vil_block.post import POST_LN_EPS
    pre, post, h, cot = inputs(B, S, NH, DH, device)
    xz, I = pre[0], NH * DH
    w_c, w_m, _ = gate_weights(*pre[9:], *pre[3:9])
    du, *d_qkv = (torch.randn(B, S, I, device=device).bfloat16() for _ in range(4))
    dg = torch.randn(B, S, 2 * NH, device=device).bfloat16()
    run_post = lambda cfg=None: bg.post_grad(du, h, xz, *post[:5], POST_LN_EPS, config=cfg)
    packed = run_post()[1]
    run_pre = lambda cfg=None, dxm=None: bg.pre_grad(*d_qkv, dg, packed, xz, *pre[1:3], pre[3], pre[5], pre[7],
                                                     w_c, w_m, config=cfg, dxm_config=dxm)
    return (pre, post, h, cot, d_qkv, dg), run_post, run_pre


def forward_rows(res: dict, xz, post, h, sweep_configs: bool) -> None:
    """The post tail's forward rows of `res` (module docstring), residual included, bf16 autocast."""
    from mal.ops.block_grad import kernel as bg
    from mal.ops.vil_block.post import POST_LN_EPS, block_down, block_post
    from mal.ops.vil_block.regions import compiled_region
    B, S, D = xz.shape[0], xz.shape[1], post[5].shape[0]
    residual = torch.randn(B, S, D, device="cuda")
    run_fwd = lambda cfg=None: bg.post_fwd(h, xz, *post[:5], POST_LN_EPS, config=cfg)
    down, whole = compiled_region(block_down, None), compiled_region(block_post, None)

    def fused():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return down(run_fwd(), *post[5:], residual)

    def compiled():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return whole(h, xz, residual, *post)
    res["post_fwd_kernel_ms"] = cuda_ms(run_fwd)
    res["post_fwd_ms"], res["post_fwd_compiled_ms"] = graphed_ms(fused), graphed_ms(compiled)
    if sweep_configs:
        DH = h.shape[-1]
        res["sweep_post_fwd"] = sweep(run_fwd, [c for c in itertools.product((16, 32, 64), (32, 64, 128), (2, 4, 8))
                                                if DH % c[1] == 0], graph_ms)


def main() -> dict:
    from mal.ops.block_grad import kernel as bg
    from mal.ops.vil_block.post import PostFused, block_post
    from mal.ops.vil_block.pre import block_pre_fused
    from mal.ops.vil_block.regions import compiled_region
    args = parse_args(__doc__, SHAPES)
    out = {**device_info(), "defaults": {"post": bg.POST_CONFIG, "pre": bg.PRE_CONFIG,
                                         "pre_narrow": bg.PRE_CONFIG_NARROW, "dxm": bg.DXM_CONFIG,
                                         "post_fwd": bg.POST_FWD_CONFIG},
           "shapes": {}}
    for name in args.shapes.split(","):
        B, S, NH, DH = SHAPES[name]
        I = NH * DH
        (pre, post, h, cot, d_qkv, dg), run_post, run_pre = kernel_calls(B, S, NH, DH)
        res: dict = {"B": B, "S": S, "NH": NH, "DH": DH}
        res["post_grad_ms"] = cuda_ms(run_post)
        res["pre_grad_ms"] = cuda_ms(run_pre)
        if args.sweep:
            grid = lambda bcs: [c for c in itertools.product((16, 32, 64), bcs, (4, 8)) if I % c[1] == 0]
            res["sweep_post"] = sweep(run_post, [c for c in grid((32, 64, 128)) if DH % c[1] == 0], graph_ms)
            res["sweep_pre"] = sweep(lambda c: run_pre(cfg=c), grid((32, 64, 128)), graph_ms)
            res["sweep_dxm"] = sweep(lambda c: run_pre(dxm=c), grid((32, 64, 128)), graph_ms)
        forward_rows(res, pre[0], post, h, args.sweep)
        leaves = [t.detach().requires_grad_() for t in pre + post[2:] + [h]]
        pl, ql, hl = leaves[:11], leaves[11:16], leaves[16]

        def regions(kernels: bool):
            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    q, k, v, g, xzv = block_pre_fused(*pl, compiled=True, xz_view=True)
                    tail = (pl[1], pl[2], *ql)
                    y = (PostFused.apply(True, None, hl, xzv, None, *tail, None, None) if kernels
                         else compiled_region(block_post, None)(hl, pl[0], None, *tail))
                torch.autograd.backward([y, q, k, v, g], [cot.to(y.dtype), *d_qkv, dg])
            return step
        res["compiled_regions_ms"] = graphed_ms(regions(False))
        res["kernel_regions_ms"] = graphed_ms(regions(True))
        res["regions_speedup"] = round(res["compiled_regions_ms"] / res["kernel_regions_ms"], 2)
        out["shapes"][name] = res
        print(json.dumps({name: {k: (v if not k.startswith("sweep") else {"best": v["best"], "ms": v["best_ms"]})
                                 for k, v in res.items()}}), flush=True)
    best = lambda r: " / ".join(f"{r[k]['best']} {r[k]['best_ms']}" for k in
                                ("sweep_post", "sweep_pre", "sweep_dxm", "sweep_post_fwd") if k in r) or "-"
    report(out, ["shape", "post_grad ms", "pre_grad ms", "compiled regions fwd+bwd ms", "kernels fwd+bwd ms", "x",
                 "post fwd: kernel / +down / compiled ms", "best post / pre / dxm / post_fwd"],
           lambda name, r: [f"{name} {r['B']}x{r['S']}x{r['NH']}x{r['DH']}", f"{r['post_grad_ms']:.3f}",
                            f"{r['pre_grad_ms']:.3f}", f"{r['compiled_regions_ms']:.3f}",
                            f"{r['kernel_regions_ms']:.3f}", r["regions_speedup"],
                            f"{r['post_fwd_kernel_ms']:.3f} / {r['post_fwd_ms']:.3f} / {r['post_fwd_compiled_ms']:.3f}",
                            best(r)], args.json)
    return out


if __name__ == "__main__":
    main()
