"""What each Triton kernel of the small protocol's step compiles to on a Hopper GPU, on a machine without one.

Every kernel is compiled as its op launches it at the step's shapes (MAL-T at 144 tokens: B 256, 4 heads of 96;
the decoder's attention at B 256, 16 heads of 32, M 128), for the target `--arch` (90: H100 / H200), by Triton's
own compiler and ptxas, with a stand-in driver: the launches compile and return without running. Per kernel and
launch configuration it reports

  regs, spill      registers per thread and the bytes of spill stores / loads (ptxas -v)
  smem             shared memory per program (bytes)
  ctas/SM          programs that fit on one multiprocessor by registers and by shared memory (65,536 registers,
                   228 KiB); fewer than two leaves no other program to hide a program's latency
  big converts     the layout conversions of register tiles of --min-kib or more in the kernel's TTGIR: each is a
                   round trip through shared memory

This says why a kernel may be slow, not how fast it is: timings need a GPU (benchmarks/block_grad.py and the
kernels' own scripts).

    python benchmarks/kernel_report.py [--ops attention,block_grad,qkv,mlstm] [--arch 90] [--json kernels.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

B, S, NH, DH = 256, 144, 4, 96          # block_grad.SHAPES["T-small"]
ATTENTION = (256, 16, 128, 32, 16)      # B, heads, M, head dim, tokens per slot
REGS_PER_SM, SMEM_PER_SM, THREADS_PER_SM, CTAS_PER_SM = 65536, 228 * 1024, 2048, 32
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i8": 1, "i1": 1, "i32": 4, "i64": 8}


class _CompileOnlyDriver:
    """A driver for `triton.runtime.driver` that names a GPU target and has no device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


@contextlib.contextmanager
def compile_only(arch: int):
    """Inside: every @triton.jit launch compiles for sm_`arch` and does not run; yields {(kernel name, its launch's
    integer and bool keywords): compiled kernel}."""
    import triton.runtime.jit as jit
    from triton.runtime import driver
    compiled: dict[tuple, object] = {}
    run, previous = jit.JITFunction.run, driver._active

    def warm(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        consts = tuple((k, v) for k, v in kwargs.items() if isinstance(v, (bool, int)))
        compiled[(self.fn.__name__, consts)] = kernel
        return kernel
    driver.set_active(_CompileOnlyDriver(arch))
    jit.JITFunction.run = warm
    try:
        yield compiled
    finally:
        jit.JITFunction.run = run
        driver._active = previous


def launch_attention() -> None:
    """The decoder attention's forward and backward (whole, and split in blocks of 64 keys)."""
    from mal.ops.attention import kernel
    b, h, m, d, slot = ATTENTION
    q = torch.zeros(b, m, 3, h, d, dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)[0]    # (B, H, M, D) head views
    mask = torch.ones(m, m, dtype=torch.bool)
    out, lse = kernel.attention_fwd(q, q, q, mask)
    for keys in (None, 64):
        with kernel.launch_config(BWD_KEYS=keys):
            kernel.attention_bwd(q, q, q, mask, out, lse, out)


def launch_block_grad() -> None:
    """The ViL block's region kernels: post tail forward and backward (also forming the cell's v, as the step's
    backward does), pre-step backward."""
    import block_grad
    from mal.ops.block_grad import kernel
    from mal.ops.vil_block.post import POST_LN_EPS
    (pre, post, h, _, d_qkv, _), run_post, run_pre = block_grad.kernel_calls(B, S, NH, DH, device="cpu")
    run_pre()
    kernel.post_grad(d_qkv[0], h, pre[0], *post[:5], POST_LN_EPS, v_weights=(pre[7], pre[8]))
    kernel.post_fwd(h, pre[0], *post[:5], POST_LN_EPS)


def launch_qkv() -> None:
    """The pre-step's forward (q, k, v and gates)."""
    import qkv_kernel
    from mal.ops.qkv import gate_weights, kernel
    a = qkv_kernel.inputs(B, S, NH * DH, gates=2 * NH, device="cpu")
    w_c, w_m, b = gate_weights(a[9], a[10], *a[3:9])
    kernel.qkv_gates(a[0], *[t.float() for t in a[1:9]], w_c, w_m, b)


def launch_mlstm() -> None:
    """The mLSTM cell's forward and backward."""
    from mal.ops.mlstm.kernel import mlstm_triton
    q, k, v = (torch.zeros(B, NH, S, DH, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    i, f = (torch.zeros(B, NH, S, requires_grad=True) for _ in range(2))
    out = mlstm_triton(q, k, v, i, f)
    out.backward(torch.zeros_like(out))


def launch_headwise() -> None:
    """The q, k and v maps' weight gradients of a block."""
    from mal.ops.headwise.kernel import headwise_wgrad
    g, x = (torch.zeros(B * S, NH * DH, dtype=torch.bfloat16) for _ in range(2))
    headwise_wgrad(g, x, g, x, g, x, 4)


OPS = {"attention": launch_attention, "block_grad": launch_block_grad, "qkv": launch_qkv, "mlstm": launch_mlstm,
       "headwise": launch_headwise}


def ptxas_usage(ptx: str) -> dict:
    """Registers per thread and spill bytes of a kernel's PTX, from ptxas -v (the ptxas Triton ships)."""
    import triton
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    arch = re.search(r"^\.target (\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        Path(src).write_text(ptx)
        res = subprocess.run([str(ptxas), f"-arch={arch}", "-v", src, "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    info = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {"regs": int(regs.group(1)), "spill_stores": int(spill.group(1)) if spill else 0,
            "spill_loads": int(spill.group(2)) if spill else 0}


def conversions(ttgir: str, min_bytes: int) -> list[dict]:
    """The `ttg.convert_layout`s of tensors of min_bytes or more: shape, dtype, bytes, source and target layout."""
    out = []
    pattern = r"ttg\.convert_layout %\S+ : tensor<([0-9x]+)x(\w+), (.+?)> -> tensor<[0-9x]+x\w+, (.+?)>(?: loc|$)"
    for m in re.finditer(pattern, ttgir, re.M):
        numel = 1
        for n in m.group(1).split("x"):
            numel *= int(n)
        size = numel * BYTES.get(m.group(2), 4)
        if size >= min_bytes:
            out.append({"tensor": f"{m.group(1)}x{m.group(2)}", "bytes": size, "from": m.group(3)[:40],
                        "to": m.group(4)[:40]})
    return out


def ctas_per_sm(regs: int, warps: int, smem: int) -> int:
    """Programs of `warps` warps that fit on one multiprocessor at `regs` registers per thread (allocated per warp in
    blocks of 256) and `smem` bytes of shared memory each."""
    threads = warps * 32
    by_regs = REGS_PER_SM // (-(-regs * 32 // 256) * 256 * warps)
    by_smem = SMEM_PER_SM // smem if smem else CTAS_PER_SM
    return min(by_regs, by_smem, THREADS_PER_SM // threads, CTAS_PER_SM)


def describe(name: str, consts: dict, kernel, min_bytes: int) -> dict:
    """One compiled kernel's row (module docstring)."""
    meta = kernel.metadata
    usage = ptxas_usage(kernel.asm["ptx"])
    return {"kernel": name, "launch": consts, "warps": meta.num_warps, **usage, "smem": meta.shared,
            "ctas_per_sm": ctas_per_sm(usage["regs"], meta.num_warps, meta.shared),
            "big_converts": conversions(kernel.asm["ttgir"], min_bytes)}


def report(ops: list[str], arch: int, min_bytes: int) -> list[dict]:
    """Compile the kernels of `ops` and describe each kernel at each launch configuration."""
    with compile_only(arch) as compiled:
        for op in ops:
            OPS[op]()
    return [describe(name, dict(consts), kernel, min_bytes) for (name, consts), kernel in compiled.items()]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {list(OPS)}")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    p.add_argument("--min-kib", type=float, default=8.0, help="report conversions of tiles of this size or more")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    ops = args.ops.split(",")
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise SystemExit(f"unknown op(s) {unknown}; choose from {list(OPS)}")
    rows = report(ops, args.arch, int(args.min_kib * 1024))
    print(f"sm_{args.arch}, MAL-T step shapes\n\n| kernel | launch | regs | spill st / ld | smem | ctas/SM | "
          f"converts >= {args.min_kib:g} KiB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        conv = "; ".join(f"{c['tensor']} {c['from']} -> {c['to']}" for c in r["big_converts"]) or "-"
        launch = ", ".join(f"{k}={v}" for k, v in r["launch"].items())
        print(f"| {r['kernel']} | {launch} | {r['regs']} | {r['spill_stores']} / {r['spill_loads']} | "
              f"{r['smem']} | {r['ctas_per_sm']} | {conv} |")
    if args.json:
        import triton
        Path(args.json).write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__,
                                               "command": " ".join(sys.argv), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
