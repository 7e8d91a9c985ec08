"""Candidates for the block-diagonal q/k/v map's backward, the largest item of the graphed training step's
GPU time (docs/benchmarks.md, "Training step in the library": two inductor reductions forming the 4x4 weight
gradients take 14 % of a CIFAR MAL-T pretraining step).

y[..., h, o] = sum_i x[..., h, i] W[h, o, i] + b[h, o]   (x: (N, nb*bs), W: (nb, bs, bs))

Each candidate computes y, dx and dW for one upstream gradient; timed forward + backward, bf16 inputs as in
the fused block (x bf16 activations, W float32 parameters, autocast semantics):
  inductor_pointwise  broadcast-multiply-sum under torch.compile, autograd's own backward
                      (dW becomes an inductor reduction over all N tokens)
  einsum_eager        torch.einsum (batched GEMMs of shape (nb) x (N, bs) x (bs, bs)) in eager mode
  triton_wgrad        what `mal.ops.headwise.headwise(pointwise=True)` does on the GPU, compiled: forward
                      pointwise, dW from `mal.ops.headwise.kernel` (64-channel tile products over token chunks)
  dense_gemm_diag     forward pointwise, dW = diagonal blocks of one dense GEMM g^T x of shape
                      (nb*bs, N) x (N, nb*bs) (tensor cores; nb x the needed FLOPs; mal's CPU/fp32 form)
  chunked_bmm_diag    same, but the GEMM per chunk of C features: bmm of (I/C) x (C, N) x (N, C), diagonal
                      blocks kept (C/bs x the needed FLOPs)
  per_block_bmm       same, dW as nb batched (bs, N) x (N, bs) products (exact FLOPs, tiny GEMMs)

    PYTHONPATH=src python benchmarks/headwise_grad.py --json headwise.json

Prints JSON lines (ms per forward + backward, max relative error of y, dx, dW vs float64) and a table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cuda_times, device_info  # noqa: E402

from mal.ops.headwise import headwise, headwise_wgrad_dense  # noqa: E402

SHAPES = {  # name: (tokens N, inner dim I) for the blocks' q/k/v maps
    "T cifar pretrain (256x128, I=384)": (256 * 128, 384),
    "T 224 train (128x196, I=384)": (128 * 196, 384),
    "S 224 train (128x196, I=768)": (128 * 196, 768),
    "B 224 train (128x196, I=1536)": (128 * 196, 1536),
}
BS = 4


def chunk_diag(g: torch.Tensor, x: torch.Tensor, nb: int, bs: int, chunk: int) -> torch.Tensor:
    """Diagonal (bs, bs) blocks of g^T x computed per chunk of `chunk` features: g, x (N, I) -> (nb, bs, bs)."""
    N, I = x.shape
    c = I // chunk
    gt = g.t().reshape(c, chunk, N)                                         # (c, chunk, N)
    xc = x.t().reshape(c, chunk, N).transpose(1, 2)                         # (c, N, chunk)
    full = torch.bmm(gt, xc)                                                # (c, chunk, chunk)
    per = chunk // bs
    blocks = torch.diagonal(full.view(c, per, bs, per, bs), dim1=1, dim2=3)  # (c, bs, bs, per)
    return blocks.permute(0, 3, 1, 2).reshape(nb, bs, bs)


def pointwise_autograd(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The block-diagonal map as broadcast multiply + sum, differentiated by autograd."""
    nb, bs = w.shape[0], w.shape[-1]
    return (x.unflatten(-1, (nb, 1, bs)) * w).sum(-1).flatten(-2)          # (N, I)


class GemmHeadwise(torch.autograd.Function):
    """Pointwise forward; backward with dx pointwise and dW from a dense (chunk 0) or chunked GEMM, or
    per-block products (chunk < 0)."""

    @staticmethod
    def forward(ctx, x, w, chunk: int):
        ctx.save_for_backward(x, w)
        ctx.chunk = chunk
        nb, bs = w.shape[0], w.shape[-1]
        return (x.unflatten(-1, (nb, 1, bs)) * w).sum(-1).flatten(-2)      # (N, I)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        nb, bs = w.shape[0], w.shape[-1]
        gx = (gy.unflatten(-1, (nb, bs, 1)) * w).sum(-2).flatten(-2).to(x.dtype)  # (N, I)
        dt = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.promote_types(x.dtype, gy.dtype)
        g2, x2 = gy.reshape(-1, gy.shape[-1]).to(dt), x.reshape(-1, x.shape[-1]).to(dt)
        if ctx.chunk < 0:                                                    # batched (bs x N) @ (N x bs) per block
            gw = torch.einsum("nho,nhi->hoi", g2.unflatten(-1, (nb, bs)), x2.unflatten(-1, (nb, bs)))
        elif ctx.chunk == 0:                                                 # one dense GEMM, diagonal blocks
            gw = headwise_wgrad_dense(g2, x2, bs)[0]
        else:
            gw = chunk_diag(g2, x2, nb, bs, ctx.chunk)
        return gx, gw.to(w.dtype), None


def candidates():
    compiled = torch.compile(pointwise_autograd, dynamic=False)
    fused = torch.compile(lambda x, w: headwise(x, w, None, True), dynamic=False)
    dense = torch.compile(lambda x, w: GemmHeadwise.apply(x, w, 0), dynamic=False)
    chunk = torch.compile(lambda x, w: GemmHeadwise.apply(x, w, 64), dynamic=False)
    per_block = torch.compile(lambda x, w: GemmHeadwise.apply(x, w, -1), dynamic=False)
    return {
        "inductor_pointwise": compiled,
        "einsum_eager": lambda x, w: headwise(x.to(torch.float32) if x.dtype == torch.float64 else x,
                                              w.to(x.dtype), None, False),
        "triton_wgrad": fused,
        "dense_gemm_diag": dense,
        "chunked_bmm_diag": chunk,
        "per_block_bmm": per_block,
    }


def run(fn, x, w, g):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = fn(x, w)
    y.backward(g)
    return y, x.grad, w.grad


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default="")
    args = p.parse_args()
    dev = "cuda"
    info = device_info()
    print(json.dumps(info), flush=True)
    out = []
    cands = candidates()
    for shape, (N, I) in SHAPES.items():
        nb = I // BS
        torch.manual_seed(0)
        x = torch.randn(N, I, device=dev).to(torch.bfloat16)
        w = torch.randn(nb, BS, BS, device=dev) * 0.3
        g = torch.randn(N, I, device=dev).to(torch.bfloat16)
        ref = run(lambda a, b: headwise(a, b, None, False), x.double(), w.double(), g.double())
        for name, fn in cands.items():
            res = {"shape": shape, "candidate": name}
            try:
                got = run(fn, x, w, g)
                res["rel_err"] = {k: round(rel(a, b), 5) for k, a, b in zip(("y", "dx", "dW"), got, ref)}
                res["ms"] = round(cuda_times(lambda: run(fn, x, w, g), 3, args.iters)[0], 4)
            except Exception as e:  # noqa: BLE001 - keep the other candidates
                res["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(json.dumps(res), flush=True)
            out.append(res)
    print("| shape | candidate | ms (fwd+bwd) | rel err y / dx / dW |\n|---|---|---|---|")
    for r in out:
        e = r.get("rel_err", {})
        print(f"| {r['shape']} | {r['candidate']} | {r.get('ms', r.get('error'))} | "
              f"{e.get('y')} / {e.get('dx')} / {e.get('dW')} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": info, "results": out}, fh, indent=1)


if __name__ == "__main__":
    main()
