"""The ViL block's pre-LayerNorm in training on one GPU: `NormUp`'s kernels (`mal.ops.norm.kernel`)
against what the fast path ran before them.

Per shape (B, S, D) (ViL-T/S/B training, batch 128, 197 tokens, a shared token permutation), a float32 residual
stream x, bf16 activations and an up-projection to 4D, ms per forward + backward (median of CUDA-event-timed
calls of a CUDA graph of 10 calls, so that launch overhead is out as in the training step's graph):
  torch_ms     x[:, order] -> F.layer_norm -> bf16 xn, the residual x[:, order] kept, backward by autograd (the
               gather's index_put into zeros, the add of the residual's and the norm's gradients)
  compiled_ms  the same under torch.compile (the fast path's form before the kernels: a gather first, then the
               compiled up-region's LayerNorm)
  triton_ms    `norm_triton.layer_norm` + `layer_norm_grad` (reorder in the loads, gradients joined, rows
               [xhat, 1] recomputed) + `affine_grads` (compiled) on the one GEMM dxz^T [xhat, 1]: the parameter
               gradients the other two rows get from autograd (the GEMMs dxn = dxz W_up, d W_up are the same
               in every row and left out)
and the two kernels' effective HBM bandwidth. --sweep times each kernel's (elements per tile, warps).

    PYTHONPATH=src python benchmarks/norm_kernel.py --sweep --json norm_kernel.json
"""
from __future__ import annotations

import itertools
import json

import torch
import torch.nn.functional as F
from qkv_kernel import graph_ms, parse_args, report, sweep  # benchmarks/ is this script's directory
from throughput import device_info

SHAPES = {"T": (128, 197, 192), "S": (128, 197, 384), "B": (128, 197, 768), "B-pretrain": (256, 128, 768),
          "T-pretrain": (256, 128, 192), "T-small": (256, 144, 192)}      # the small protocols' steps (144 tokens)


def plain(x, order, w, b):
    """The reference: gather, LayerNorm, bf16 output and the gathered residual."""
    xr = x[:, order]                                                        # (B, S, D) float32
    return F.layer_norm(xr, (x.shape[-1],), w, b, 1e-6).bfloat16(), xr


def main() -> dict:
    from mal.ops.norm import kernel as norm_triton
    args = parse_args(__doc__, SHAPES)
    out = {**device_info(), "default_config": {"fwd": norm_triton.FWD_CONFIG, "bwd": norm_triton.BWD_CONFIG},
           "shapes": {}}
    compiled = torch.compile(plain, dynamic=False)
    affine_grads = torch.compile(norm_triton.affine_grads, dynamic=False)
    for name in args.shapes.split(","):
        B, S, D = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(B, S, D, device="cuda", generator=g, requires_grad=True)
        w = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).requires_grad_()
        b = (0.1 * torch.randn(D, device="cuda", generator=g)).requires_grad_()
        up_w = (torch.randn(4 * D, D, device="cuda", generator=g) / D ** 0.5).bfloat16()
        order = torch.randperm(S, device="cuda")
        dy = torch.randn(B, S, D, device="cuda", generator=g).bfloat16()
        dres = torch.randn(B, S, D, device="cuda", generator=g)
        m = torch.randn(4 * D, D + norm_triton.ONES_PAD, device="cuda", generator=g).bfloat16()  # dxz^T [xhat, 1]
        res: dict = {"B": B, "S": S, "D": D}

        def autograd_step(fn):
            def run():
                xn, xr = fn(x, order, w, b)
                torch.autograd.backward([xn, xr], [dy, dres])
            return run

        fwd = lambda cfg=None: norm_triton.layer_norm(x.detach(), order, w, b, 1e-6, torch.bfloat16, config=cfg)
        _, mean, rstd = fwd()
        bwd = lambda cfg=None: norm_triton.layer_norm_grad(x.detach(), order, w, dy, dres, mean, rstd, torch.bfloat16,
                                                           config=cfg)

        def kernels():
            fwd()
            bwd()
            affine_grads(m, w, b, up_w)
        res["torch_ms"] = graph_ms(autograd_step(plain))
        res["compiled_ms"] = graph_ms(autograd_step(compiled))
        res["triton_ms"] = graph_ms(kernels)
        n = B * S * D
        fwd_bytes, bwd_bytes = n * (4 + 2), n * (4 + 2 + 4 + 4 + 2)         # read x, write xn / + dy, dres, dx
        res["fwd_ms"], res["bwd_ms"] = graph_ms(fwd), graph_ms(bwd)
        res["affine_ms"] = graph_ms(lambda: affine_grads(m, w, b, up_w))
        res["fwd_GBps"] = round(fwd_bytes / res["fwd_ms"] / 1e6, 1)
        res["bwd_GBps"] = round(bwd_bytes / res["bwd_ms"] / 1e6, 1)
        res["speedup_vs_compiled"] = round(res["compiled_ms"] / res["triton_ms"], 2)
        if args.sweep:
            configs = list(itertools.product((1024, 2048, 4096, 8192), (1, 2, 4, 8, 16)))
            sw = sweep(bwd, configs, graph_ms)
            res["sweep"], res["best"], res["best_ms"] = sw["all"], sw["best"], sw["best_ms"]
            sw = sweep(fwd, configs, graph_ms)
            res["sweep_fwd"], res["best_fwd"], res["best_fwd_ms"] = sw["all"], sw["best"], sw["best_ms"]
        out["shapes"][name] = res
        print(json.dumps({name: {k: v for k, v in res.items() if not k.startswith("sweep")}}), flush=True)
    report(out, ["shape", "torch ms", "compiled ms", "triton ms", "x compiled", "fwd ms", "fwd GB/s", "bwd ms",
                 "bwd GB/s", "affine ms", "best fwd config (ms)", "best bwd config (ms)"],
           lambda name, r: [f"{name} {r['B']}x{r['S']}x{r['D']}", f"{r['torch_ms']:.3f}", f"{r['compiled_ms']:.3f}",
                            f"{r['triton_ms']:.3f}", r["speedup_vs_compiled"], f"{r['fwd_ms']:.4f}", r["fwd_GBps"],
                            f"{r['bwd_ms']:.4f}", r["bwd_GBps"], f"{r['affine_ms']:.4f}",
                            f"{r.get('best_fwd', '-')} ({r.get('best_fwd_ms', '-')})",
                            f"{r.get('best', '-')} ({r.get('best_ms', '-')})"], args.json)
    return out


if __name__ == "__main__":
    main()
