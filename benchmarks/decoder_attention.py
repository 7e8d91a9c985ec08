"""The pretraining decoder's block-causal attention, one layer's forward + backward, in each candidate kernel.

The default decoder (8 blocks of width 512, 16 heads of 32) attends over the slot layout's M tokens with a
block-causal mask: slots of k*k tokens, a token sees its own slot and the earlier ones. In the MAL-T pretraining
step on Imagenette-96 (M = 128, slots of 16) it runs PyTorch's SDPA with a boolean mask, which picks cuDNN:
about 3.6 of the step's 48 GPU ms (docs/performance.md). Candidates, on the same bf16 q, k, v and upstream grad:

  sdpa          F.scaled_dot_product_attention(q, k, v, attn_mask=mask), as the decoder calls it
  sdpa-cudnn    the same with cuDNN's backend forced
  sdpa-mem-eff  the same with the memory-efficient backend forced
  flex          torch's flex_attention under torch.compile with the block mask (fully masked tiles skipped)
  math          softmax(q k^T / sqrt(d), masked) v in eager PyTorch
  mal-triton    MAL's short-sequence kernel (`mal.ops.attention`, backend "triton": all keys of a head in one tile)

    PYTHONPATH=src python benchmarks/decoder_attention.py [--batch 256] [--heads 16] [--tokens 128]
        [--head-dim 32] [--slot 16] [--sweep] [--json attn.json]

Prints a JSON line per candidate (forward + backward: median ms over CUDA-event-timed eager calls, and ms per call
replayed from a CUDA graph as the training step runs it; the relative error of out, dq, dk, dv against the float32
math form on the same inputs), then a table with each graphed time over `sdpa`'s.
--sweep adds a `mal-triton` row per launch configuration: the forward's (query rows per block, warps), then the
backward's, whole or split into blocks of keys (`BWD_KEYS`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qkv_kernel import graph_ms  # noqa: E402
from throughput import cuda_times, device_info  # noqa: E402

from mal.models.vit import block_causal_mask  # noqa: E402
from mal.ops.attention import attention  # noqa: E402


def math_attention(mask: torch.Tensor):
    """softmax(q k^T / sqrt(d) with -inf where mask is False) v, in eager PyTorch."""
    def call(q, k, v):
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])               # (B, H, M, M)
        return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v    # (B, H, M, Dh)
    return call


def candidates(mask: torch.Tensor, slot: int) -> dict:
    """name -> fn(q, k, v) for every candidate this torch build has."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def forced(backend):
        def call(q, k, v):
            with sdpa_kernel(backend):
                return sdpa(q, k, v)
        return call
    fns = {"sdpa": sdpa, "sdpa-cudnn": forced(SDPBackend.CUDNN_ATTENTION),
           "sdpa-mem-eff": forced(SDPBackend.EFFICIENT_ATTENTION), "math": math_attention(mask),
           "mal-triton": lambda q, k, v: attention(q, k, v, mask, backend="triton")}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        M = mask.shape[0]
        block = create_block_mask(lambda b, h, qi, ki: ki // slot <= qi // slot, None, None, M, M,
                                  device=mask.device)
        flex = torch.compile(flex_attention)
        fns["flex"] = lambda q, k, v: flex(q, k, v, block_mask=block)
    except Exception as exc:  # noqa: BLE001 - a torch build without flex attention: leave the row out
        print(f"flex skipped: {type(exc).__name__}: {exc}", flush=True)
    return fns


SWEEP_FWD = [(32, 4), (64, 4), (128, 4), (128, 8)]                     # (query rows per block, warps)
SWEEP_BWD = [(keys, cfg) for keys in (None, 32, 64) for cfg in [(32, 4), (64, 4), (64, 8), (128, 8)]]


def sweep_rows(mask: torch.Tensor, q, k, v, dout, ref, warmup: int, iters: int) -> list[dict]:
    """The Triton kernels' forward + backward at each forward config (the backward's default), then at each backward
    (BWD_KEYS, BWD_CONFIG) (the forward's default); the defaults restored."""
    from mal.ops.attention import kernel
    points = [(fwd, kernel.BWD_CONFIG, kernel.BWD_KEYS) for fwd in SWEEP_FWD]
    points += [(kernel.FWD_CONFIG, cfg, keys) for keys, cfg in SWEEP_BWD]
    rows = []
    for fwd, bwd, keys in points:
        with kernel.launch_config(FWD_CONFIG=fwd, BWD_CONFIG=bwd, BWD_KEYS=keys):
            row = measure(f"mal-triton fwd{fwd} bwd{bwd} keys {keys}",
                          lambda q, k, v: attention(q, k, v, mask, "triton"), q, k, v, dout, ref, warmup, iters)
        rows.append({**row, "fwd_config": fwd, "bwd_config": bwd, "bwd_keys": keys})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def rel_errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float]:
    return [((a.float() - b).norm() / b.norm()).item() for a, b in zip(got, ref)]


def forward_backward(fn, q, k, v, dout):
    """A call that returns fn's [out, dq, dk, dv] at q, k, v (as leaves) for the upstream gradient dout."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def step():
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, dout)]
    return step


def measure(name: str, fn, q, k, v, dout, ref, warmup: int, iters: int) -> dict:
    """One candidate: forward + backward time, eager (`ms`, launches included) and replayed from a CUDA graph as in
    the training step (`graph_ms`), and its errors against the float32 reference."""
    step = forward_backward(fn, q, k, v, dout)
    try:
        errs = rel_errors(step(), ref)
        ms, warm_s = cuda_times(step, warmup, iters)
    except (RuntimeError, ValueError) as exc:                                # a backend that takes no such input
        return {"name": name, "error": str(exc).splitlines()[0][:200]}
    row = {"name": name, "ms": ms, "warmup_s": warm_s, "rel_err": dict(zip(("out", "dq", "dk", "dv"), errs))}
    try:
        row["graph_ms"] = graph_ms(step)
    except RuntimeError as exc:                                              # a backend that cannot be captured
        row["graph_error"] = str(exc).splitlines()[0][:200]
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128, help="M, the decoder's tokens per image")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--slot", type=int, default=16, help="tokens per slot (k*k)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--sweep", action="store_true", help="time the Triton kernel at every launch configuration")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decoder_attention.py times CUDA kernels: run it on a machine with a CUDA GPU")
    if args.tokens % args.slot:
        raise SystemExit(f"--tokens {args.tokens} must be a multiple of --slot {args.slot}")
    g = torch.Generator("cuda").manual_seed(0)
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    q, k, v, dout = (torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(4))
    mask = block_causal_mask(torch.arange(args.tokens, device="cuda") // args.slot)   # (M, M)
    ref = [t.detach() for t in forward_backward(math_attention(mask), *(t.float() for t in (q, k, v, dout)))()]
    rows = []
    for name, fn in candidates(mask, args.slot).items():
        rows.append(measure(name, fn, q, k, v, dout, ref, args.warmup, args.iters))
        print(json.dumps(rows[-1]), flush=True)
    if args.sweep:
        rows += sweep_rows(mask, q, k, v, dout, ref, args.warmup, args.iters)
    timed = {r["name"]: r for r in rows if "graph_ms" in r}
    base = timed.get("sdpa", {}).get("graph_ms")
    print(f"\n{torch.cuda.get_device_name()}, B {args.batch}, {args.heads} heads of {args.head_dim}, M {args.tokens}, "
          f"slots of {args.slot}, bf16, forward + backward, CUDA-graph replay (eager in brackets)\n\n"
          "| kernel | ms | / sdpa | max rel. error |\n|---|---|---|---|")
    for r in rows:
        if "graph_ms" in r:
            ratio = f"{r['graph_ms'] / base:.2f}" if base else "-"
            print(f"| {r['name']} | {r['graph_ms']:.3f} ({r['ms']:.3f}) | {ratio} | {max(r['rel_err'].values()):.1e} |")
        else:
            why = r.get("error") or r.get("graph_error", "")
            print(f"| {r['name']} | failed: {why[:60]} | - | - |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device_info(), "args": vars(args), "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
