"""The ViL block's pre-cell step (conv + SiLU, q/k/v, gates) on one GPU: the Triton kernel
(`mal.ops.qkv.kernel`) against `mal.ops.qkv.block_pre` under torch.compile (the fast path's previous form).

Rows per shape (B, S, I), bf16 activations, ms per call (median of CUDA-event-timed calls; triton_fwd and the
sweep from a CUDA graph of 10 calls, without launch overhead):
  compiled_fwd / triton_fwd        forward only (no grad), and the kernel's effective HBM bandwidth
  compiled_fwd_bwd / fused_fwd_bwd forward + backward: compiled block_pre with the fast path's memory budget
                                   vs `block_pre_fused` (Triton forward + compiled written-out backward)
--sweep times every kernel configuration (BLOCK_T, BLOCK_C, warps) and reports the fastest per shape.

    PYTHONPATH=src python benchmarks/qkv_kernel.py --sweep --json qkv.json
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
from throughput import cuda_times, device_info  # benchmarks/ is this script's directory

SHAPES = {"T": (128, 196, 384), "S": (128, 196, 768), "B": (128, 196, 1536), "B-pretrain": (256, 144, 1536),
          "T-pretrain": (256, 128, 384), "T-small": (256, 144, 384)}      # the small protocols' steps (144 tokens)


def cuda_ms(fn) -> float:
    """Median ms per call of fn (CUDA events, after 3 warm-up calls)."""
    return cuda_times(fn, warmup=3, iters=20)[0]


def graph_ms(fn, calls: int = 10) -> float:
    """ms per call of fn, from a CUDA graph of `calls` calls (warmed up first, so Triton compiles outside): the
    kernels' time without the launch overhead, as in a training step's graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(calls):
            fn()
    return cuda_ms(graph.replay) / calls


def sweep(fn, configs, timer=cuda_ms) -> dict:
    """ms per config of fn(config) (timer(callable) -> ms); configs that fail to compile are reported by their
    error's name."""
    res = {}
    for cfg in configs:
        try:
            res[str(cfg)] = round(timer(lambda: fn(cfg)), 4)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
            res[str(cfg)] = type(e).__name__
    timed = {k: v for k, v in res.items() if isinstance(v, float)}
    return {"all": res, "best": min(timed, key=timed.get), "best_ms": min(timed.values())}


def report(out: dict, header: list[str], row, path: str) -> None:
    """Print `out` as JSON and its shapes as a markdown table (header cells, row(name, result) -> cells), and
    write the JSON to path if given."""
    print(json.dumps(out, indent=1))
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in out["shapes"].items():
        print("| " + " | ".join(str(c) for c in row(name, r)) + " |")
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def parse_args(doc: str, shapes: dict) -> argparse.Namespace:
    """The kernel benchmarks' command line: --shapes (names of `shapes`), --sweep, --json."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(shapes))
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--json", default="")
    return p.parse_args()


def inputs(B, S, I, gates=8, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *shape, s=1.0: torch.randn(*shape, generator=g, device=device) * s
    args = [r(B, S, 2 * I).bfloat16(), r(I, 1, 4, s=0.5), r(I, s=0.1)]
    for _ in range(3):
        args += [r(I // 4, 4, 4, s=0.5), r(I, s=0.1)]
    return args + [r(gates, 3 * I, s=0.1), r(gates)]


def main() -> dict:
    from mal.ops.qkv import block_pre, gate_weights
    from mal.ops.qkv import kernel as qkv_triton
    from mal.ops.vil_block.pre import block_pre_fused
    from mal.ops.vil_block.regions import compiled_region
    args = parse_args(__doc__, SHAPES)
    out = {**device_info(), "default_config": qkv_triton.CONFIG, "shapes": {}}
    for name in args.shapes.split(","):
        B, S, I = SHAPES[name]
        a = inputs(B, S, I)
        xz, rest = a[0], a[1:]
        w_c, w_m, b = gate_weights(a[9], a[10], *a[3:9])
        kargs = [t.float() for t in a[1:9]] + [w_c, w_m, b]
        res: dict = {"B": B, "S": S, "I": I}
        moved = xz.numel() // 2 * 2 + 3 * B * S * I * 2 + B * S * 8 * 2       # read x_m, write q, k, v, g (bytes)
        pre = compiled_region(block_pre, None)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            res["compiled_fwd_ms"] = cuda_ms(lambda: pre(xz, *rest, pointwise=True))
        res["triton_fwd_ms"] = graph_ms(lambda: qkv_triton.qkv_gates(xz, *kargs))
        res["triton_fwd_GBps"] = round(moved / res["triton_fwd_ms"] / 1e6, 1)
        if args.sweep:
            configs = [c for c in itertools.product((16, 32, 64), (32, 64, 128), (4, 8)) if I % c[1] == 0]
            sw = sweep(lambda cfg: qkv_triton.qkv_gates(xz, *kargs, config=cfg), configs, graph_ms)
            res["sweep"], res["best"], res["best_ms"] = sw["all"], sw["best"], sw["best_ms"]
        leaves = [t.detach().requires_grad_() for t in a]
        cot = None

        def fwd_bwd(fn):
            def run():
                nonlocal cot
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    outs = fn(*leaves)
                if cot is None:
                    cot = [torch.randn_like(o) for o in outs]
                torch.autograd.backward(outs, cot)
            return run
        res["compiled_fwd_bwd_ms"] = cuda_ms(fwd_bwd(lambda *t: pre(*t, pointwise=True)))
        res["fused_fwd_bwd_ms"] = cuda_ms(fwd_bwd(lambda *t: block_pre_fused(*t, compiled=True)))
        res["fwd_speedup"] = round(res["compiled_fwd_ms"] / res["triton_fwd_ms"], 2)
        res["fwd_bwd_speedup"] = round(res["compiled_fwd_bwd_ms"] / res["fused_fwd_bwd_ms"], 2)
        out["shapes"][name] = res
        print(json.dumps({name: {k: v for k, v in res.items() if k != "sweep"}}), flush=True)
    report(out, ["shape", "compiled fwd ms", "triton fwd ms", "GB/s", "fwd x", "compiled fwd+bwd ms",
                 "fused fwd+bwd ms", "x", "best config (ms)"],
           lambda name, r: [f"{name} {r['B']}x{r['S']}x{r['I']}", f"{r['compiled_fwd_ms']:.3f}",
                            f"{r['triton_fwd_ms']:.3f}", r["triton_fwd_GBps"], r["fwd_speedup"],
                            f"{r['compiled_fwd_bwd_ms']:.3f}", f"{r['fused_fwd_bwd_ms']:.3f}", r["fwd_bwd_speedup"],
                            f"{r.get('best', '-')} ({r.get('best_ms', '-')})"], args.json)
    return out


if __name__ == "__main__":
    main()
