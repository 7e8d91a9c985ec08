"""Encoder and pretraining throughput on one GPU: MAL's fast path vs its plain path, a reference ViL, DeiT.

Rows (all bf16 autocast, 224 px, 1000 classes, one process, one GPU, measured side by side):
  fast         MAL encoder, fused block (`VisionLSTM.fast_path()`: torch.compile'd regions around the "auto"
               (Triton) mLSTM kernel), the whole inference call / training step captured in one CUDA graph
  fast_nocg    as fast, without the CUDA graph (every kernel launched from Python)
  fast_ckpt    as fast, with `fast_path(checkpoint=True)` (each block keeps only its input for the backward and
               recomputes its forward there); training only (inference is the fast row's: nothing is saved)
  fast_ckpt_nocg  as fast_ckpt, without the CUDA graph
  fast_recompute  as fast, with `fast_path(recompute_qkv=True)` (the cell's q, k, v recomputed in the backward
               instead of kept); training only
  plain        MAL encoder, mlstm_backend="torch", eager (the plain PyTorch path)
  ref          reference ViL of the same dims from the PyPI `xlstm` package's `mLSTMLayer` (ViL v1 block), eager
  ref_compile  the same reference, every residual block torch.compile'd (regional compilation)
  deit         timm DeiT-T/S/B (pretrained=False), eager
Measured: inference img/s (batch 256, no grad), training img/s and peak memory (batch 128, forward + backward
+ AdamW step), and the pretraining step at 192 px (12x12 grid, the small protocols' sequence shapes; batches 64
and 256; rows fast, fast_nocg, plain, ...) of each --pretrain-models objective, side by side through the same
code: mal_vil (MALPretrain on MAL-T/S/B, default ObjectiveConfig), mae_vil (MAEPretrain on the same ViL, 8x512
decoder, 75 % of the patches masked), mae_vit and mal_vit (the same objectives on ViT-T/S/B, `VisionTransformer`:
its fast path is the block stack under torch.compile; plain = eager). Times are medians of per-iteration CUDA
events after warm-up.

    PYTHONPATH=src python benchmarks/throughput.py --sizes T,S,B --rows fast,fast_nocg,plain,ref,ref_compile,deit \
        --pretrain B --json results.json
    PYTHONPATH=src python benchmarks/throughput.py --sizes '' --pretrain T,B --pretrain-rows fast,plain \
        --pretrain-models mal_vil,mae_vil,mae_vit,mal_vit --json pretrain.json

Prints JSON, then markdown tables with the ratios and the DESIGN §6 goals.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {"T": ("mal_tiny", 192, "deit_tiny_patch16_224"), "S": ("mal_small", 384, "deit_small_patch16_224"),
         "B": ("mal_base", 768, "deit_base_patch16_224")}
VIT_PRESETS = {"T": "vit_tiny", "S": "vit_small", "B": "vit_base"}
PRETRAIN_MODELS = {"mal_vil": ("vil", "mal"), "mae_vil": ("vil", "mae"), "mae_vit": ("vit", "mae"),
                   "mal_vit": ("vit", "mal")}                              # name: (model.arch, objective.kind)
ROWS = ("fast", "fast_nocg", "fast_ckpt", "fast_ckpt_nocg", "fast_recompute", "plain", "ref", "ref_compile", "deit")
IMG, NUM_CLASSES, DEPTH = 224, 1000, 24
GIB = 2**30


# ----------------------------------------------------------------------------------------------- reference ViL
class RefViL(nn.Module):
    """ViL v1 built from `xlstm.mLSTMLayer`: patch embed + pos embed, 24 pre-LN residual mLSTM blocks whose
    sequence direction alternates (the sequence is flipped after every block), bilateral pooling, head."""

    def __init__(self, dim: int, depth: int = DEPTH, img: int = IMG, patch: int = 16, num_classes: int = NUM_CLASSES):
        super().__init__()
        from xlstm.blocks.mlstm.layer import mLSTMLayer, mLSTMLayerConfig
        seq = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        cfg = dict(embedding_dim=dim, proj_factor=2, num_heads=4, qkv_proj_blocksize=4, conv1d_kernel_size=4,
                   context_length=seq, _num_blocks=depth)
        self.blocks = nn.ModuleList([RefBlock(dim, mLSTMLayer(mLSTMLayerConfig(**cfg))) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, S, D)
        for blk in self.blocks:
            t = blk(t).flip(1)                                                # (B, S, D) next block runs reversed
        t = self.norm(t)
        return self.head(torch.cat([t[:, 0], t[:, -1]], dim=-1))            # (B, classes)


class RefBlock(nn.Module):
    """Pre-LN residual block around one xlstm mLSTMLayer."""

    def __init__(self, dim: int, layer: nn.Module):
        super().__init__()
        self.norm, self.layer = nn.LayerNorm(dim), layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer(self.norm(x))                                   # (B, S, D)


# ----------------------------------------------------------------------------------------------- models
def fast_path(model: nn.Module, row: str) -> None:
    """The fast path as a fast* row names it: ckpt = checkpoint=True, recompute = recompute_qkv=True."""
    model.fast_path(compile=True, mode=ARGS.compile_mode, checkpoint="ckpt" in row, recompute_qkv="recompute" in row)


def uses_graphs(row: str) -> bool:
    """fast* rows replay whole steps from CUDA graphs, except the *_nocg ones."""
    return row.startswith("fast") and not row.endswith("nocg")


def build(row: str, size: str) -> nn.Module:
    from mal.models import create_model
    preset, dim, deit = SIZES[size]
    if row.startswith("fast") or row == "plain":
        model = create_model(preset, NUM_CLASSES, img_size=IMG, mlstm_backend="torch" if row == "plain" else "auto")
        if row != "plain":
            fast_path(model, row)
    elif row in ("ref", "ref_compile"):
        model = RefViL(dim)
        if row == "ref_compile":
            for blk in model.blocks:
                blk.compile(dynamic=False)
    elif row == "deit":
        import timm
        model = timm.create_model(deit, pretrained=False, num_classes=NUM_CLASSES)
    else:
        raise ValueError(row)
    return model.cuda()


# ----------------------------------------------------------------------------------------------- timing
def warm_up(step, n: int) -> float:
    """Call `step` n times (compiles, fills caches); seconds until the device is done."""
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def cuda_times(step, warmup: int, iters: int) -> tuple[float, float]:
    """(median ms per call over `iters` CUDA-event-timed calls, warm-up seconds incl. compilation)."""
    warm_s = warm_up(step, warmup)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), warm_s


def graphed(step, warmup: int):
    """Warm `step` up on a side stream (compiles), capture one call in a CUDA graph, return its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        step()
    return graph.replay


def timed(step, cg: bool):
    """Reset the peak-memory counter, capture `step` in a CUDA graph when cg, and time it.

    Returns (median ms per call, warm-up seconds, the timed callable); with cg the warm-up seconds also
    count the capture and the timed calls (everything since the capture started)."""
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run = graphed(step, ARGS.warmup) if cg else step
    ms, warm = cuda_times(run, ARGS.warmup, ARGS.iters)
    return ms, warm + (time.perf_counter() - t0 if cg else 0), run


def top_kernels(step) -> list[dict]:
    """torch.profiler: the --profile-top CUDA kernels with the most total time over one call of step."""
    n = ARGS.profile_top
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    evs = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0]
    tot = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
    evs.sort(key=tot, reverse=True)
    all_us = sum(tot(e) for e in evs)
    out = [{"kernel": e.key[:90], "calls": e.count, "ms": round(tot(e) / 1e3, 3)} for e in evs[:n]]
    return [{"total_gpu_ms": round(all_us / 1e3, 2), "kernels_launched": sum(e.count for e in evs)}] + out


def measure_encoder(row: str, size: str, res: dict) -> None:
    model = build(row, size)
    res["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    if row.startswith("fast"):
        from mal.ops import resolve
        dh = model.cfg.expansion * model.cfg.dim // model.cfg.num_heads
        q = torch.empty(1, 4, 196, dh, device="cuda", dtype=torch.bfloat16)
        res["mlstm_backend"] = resolve("mlstm", q, q, q, q[..., 0], q[..., 0]).name
    x = torch.randn(ARGS.infer_batch, 3, IMG, IMG, device="cuda")
    cg = uses_graphs(row)                                                # capture whole calls in CUDA graphs
    if "infer" in ARGS.modes and "ckpt" not in row and "recompute" not in row:  # those change training only
        model.eval()

        def infer():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not cg):
                model(x)
        ms, warm, _ = timed(infer, cg)
        res["infer_img_s"] = round(ARGS.infer_batch / ms * 1e3, 1)
        res["infer_warmup_s"] = round(warm, 1)
    if "train" in ARGS.modes:
        model.train()
        xb = x[:ARGS.train_batch].contiguous()
        y = torch.randint(0, NUM_CLASSES, (ARGS.train_batch,), device="cuda")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True, capturable=cg)

        def train():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not cg):
                loss = F.cross_entropy(model(xb), y)
            loss.backward()
            opt.step()
        ms, warm, step = timed(train, cg)
        res["train_img_s"] = round(ARGS.train_batch / ms * 1e3, 1)
        res["train_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        res["train_warmup_s"] = round(warm, 1)
        if row in ARGS.profile:
            res["train_profile"] = top_kernels(step)


def pretrain_objective(name: str, row: str, size: str) -> nn.Module:
    """The pretraining model of a --pretrain-models entry at 192 px: MAL or MAE (8x512 decoder, 75 % of the patches
    masked) on the ViL (MAL-T/S/B; plain row: mlstm_backend torch) or the ViT (ViT-T/S/B) of that size."""
    from mal import create_objective
    from mal.config import MODEL_PRESETS, EncoderConfig, MaskConfig, ObjectiveConfig
    arch, kind = PRETRAIN_MODELS[name]
    enc = {**MODEL_PRESETS[SIZES[size][0] if arch == "vil" else VIT_PRESETS[size]], "img_size": 192}
    if arch == "vil":
        enc["mlstm_backend"] = "torch" if row == "plain" else "auto"
    obj = ObjectiveConfig() if kind == "mal" else ObjectiveConfig(kind="mae", mask=MaskConfig("patch", 0.75))
    return create_objective(EncoderConfig(**enc), obj)


def measure_pretrain(name: str, row: str, size: str, batch: int, res: dict) -> None:
    model = pretrain_objective(name, row, size).cuda()
    res["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    cg = uses_graphs(row)
    if row.startswith("fast"):
        fast_path(model, row)                                           # the decoder's block stack compiled too
    imgs = torch.randn(batch, 3, 192, 192, device="cuda")
    sets = [model.sample_inputs(batch, torch.Generator().manual_seed(s), "cuda") for s in range(4)]
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.999), weight_decay=0.05, fused=True,
                            capturable=cg)
    it = [0]

    def step():
        draws = sets[0 if cg else it[0] % len(sets)]                    # a graph replays static inputs
        it[0] += 1
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not cg):
            loss = model(imgs, *draws)["loss"]
        loss.backward()
        opt.step()
    ms, warm, run = timed(step, cg)
    res["img_s"] = round(batch / ms * 1e3, 1)
    res["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    res["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    res["warmup_s"] = round(warm, 1)
    if row in ARGS.profile:
        res["profile"] = top_kernels(run)


def guarded(fn, *a) -> dict:
    """Run one measurement; record OOMs, errors and budget skips instead of dying."""
    res: dict = {}
    if time.perf_counter() - T_START > ARGS.time_budget:
        return {"skipped": "time budget"}
    from torch._dynamo.utils import counters
    counters.clear()
    try:
        fn(*a, res)
        if counters["graph_break"] or counters["stats"].get("unique_graphs"):
            res["dynamo"] = {"graphs": counters["stats"].get("unique_graphs", 0),
                             "graph_breaks": {k[:120]: v for k, v in counters["graph_break"].items()}}
    except torch.cuda.OutOfMemoryError:
        res["error"] = "OOM"
    except Exception as e:  # noqa: BLE001 - a broken row must not lose the others
        res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    gc.collect()
    torch.cuda.empty_cache()
    print(json.dumps({"row": a, **res}), flush=True)
    return res


# ----------------------------------------------------------------------------------------------- report
def ratio(a, b):
    return round(a / b, 2) if a and b else None


def goals(enc: dict, pre: dict) -> list[dict]:
    """DESIGN §6 goals as (goal, target, measured, met)."""
    out = []
    for size, rows in enc.items():
        r, rc = rows.get("ref", {}), rows.get("ref_compile", {})
        fr = rows.get("fast", {})
        f = fr if ("infer_img_s" in fr or "train_img_s" in fr) else rows.get("fast_nocg", {})
        for key, target, name in (("infer_img_s", 5.0, "inference vs ref eager"), ("train_img_s", 4.0, "training vs ref eager")):
            v = ratio(f.get(key), r.get(key))
            out.append({"size": size, "goal": f"{name} >= {target}x", "measured": v, "met": v is not None and v >= target})
        v = ratio(f.get("train_peak_gib"), r.get("train_peak_gib"))
        out.append({"size": size, "goal": "train memory <= 1/3 of ref eager", "measured": v,
                    "met": v is not None and v <= 1 / 3})
        fc = rows.get("fast_ckpt", {}) if "train_img_s" in rows.get("fast_ckpt", {}) else rows.get("fast_ckpt_nocg", {})
        if fc:
            v = ratio(fc.get("train_img_s"), r.get("train_img_s"))
            out.append({"size": size, "goal": "training vs ref eager >= 4.0x (checkpoint=True)", "measured": v,
                        "met": v is not None and v >= 4.0})
            v = ratio(fc.get("train_peak_gib"), r.get("train_peak_gib"))
            out.append({"size": size, "goal": "train memory <= 1/3 of ref eager (checkpoint=True)", "measured": v,
                        "met": v is not None and v <= 1 / 3})
        for key, target, name in (("infer_img_s", 2.5, "inference vs ref compiled"), ("train_img_s", 2.0, "training vs ref compiled")):
            v = ratio(f.get(key), rc.get(key))
            out.append({"size": size, "goal": f"{name} >= {target}x", "measured": v, "met": v is not None and v >= target})
    for size, models in pre.items():
        rows = models.get("mal_vil", {})
        fast = rows.get("fast", {}) if any("img_s" in v for v in rows.get("fast", {}).values()) else rows.get("fast_nocg", {})
        best = max((v.get("img_s") or 0) for v in fast.values()) if fast else None
        out.append({"size": size, "goal": "pretraining >= 3000 img/s (better batch)", "measured": best,
                    "met": bool(best and best >= 3000)})
        m64 = fast.get("64", {}).get("peak_gb")
        out.append({"size": size, "goal": "pretraining peak <= 12 GB at batch 64", "measured": m64,
                    "met": m64 is not None and m64 <= 12})
    return out


def markdown(enc: dict, pre: dict, gl: list[dict]) -> str:
    lines = ["| size | row | infer img/s | train img/s | train peak GiB | fast/ref infer | fast/ref train | "
             "fast/ref_compile infer | fast/ref_compile train | fast/deit infer | fast/deit train |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for size, rows in enc.items():
        f = rows.get("fast", {})
        for row, v in rows.items():
            cells = [v.get("infer_img_s", v.get("error", v.get("skipped", "-"))), v.get("train_img_s", "-"),
                     v.get("train_peak_gib", "-")]
            if row.startswith("fast"):
                f = v
                for other in ("ref", "ref_compile", "deit"):
                    o = rows.get(other, {})
                    cells += [ratio(f.get("infer_img_s"), o.get("infer_img_s")),
                              ratio(f.get("train_img_s"), o.get("train_img_s"))]
            else:
                cells += [""] * 6
            lines.append(f"| {size} | {row} | " + " | ".join("-" if c is None else str(c)[:70].replace("\n", " ")
                                                             for c in cells) + " |")
    if pre:
        lines += ["", "| pretrain size | model | row | batch | img/s | peak GiB | peak GB | / mal_vil |",
                  "|---|---|---|---|---|---|---|---|"]
        for size, models in pre.items():
            for name, rows in models.items():
                for row, bs in rows.items():
                    for b, v in bs.items():
                        val = str(v.get('img_s', v.get('error', v.get('skipped'))))[:70].replace("\n", " ")
                        mal = models.get("mal_vil", {}).get(row, {}).get(b, {})
                        lines.append(f"| {size} | {name} | {row} | {b} | {val} | {v.get('peak_gib', '-')} | "
                                     f"{v.get('peak_gb', '-')} | {ratio(v.get('img_s'), mal.get('img_s')) or '-'} |")
    lines += ["", "| size | goal | measured | met |", "|---|---|---|---|"]
    verdict = lambda g: "not measured" if g["measured"] is None else ("yes" if g["met"] else "NO")
    lines += [f"| {g['size']} | {g['goal']} | {'-' if g['measured'] is None else g['measured']} | {verdict(g)} |"
              for g in gl]
    return "\n".join(lines)


def cpu_name() -> str:
    """The host CPU's model name (Linux /proc/cpuinfo; elsewhere what `platform` knows)."""
    import platform
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_info(gpu: bool = True) -> dict:
    """The GPU (gpu=False: none), the CPU, the versions of torch and of the peers' packages, and the command line:
    the header of every benchmark's results."""
    import os
    info = {"gpu": torch.cuda.get_device_name() if gpu else None, "cpu": cpu_name(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": sys.version.split()[0], "command": " ".join(sys.argv)}
    for mod in ("triton", "timm", "xlstm"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            info[mod] = f"unavailable ({type(e).__name__})"
    return info


def main(argv=None) -> dict:
    global ARGS, T_START
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="T,S,B")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--modes", default="infer,train", help="encoder measurements: infer, train")
    p.add_argument("--no-ref-compile", default="", help="sizes to skip ref_compile for (its compile is slow), e.g. B")
    p.add_argument("--pretrain", default="B", help="sizes for the pretraining step ('' = none)")
    p.add_argument("--pretrain-rows", default="fast,fast_nocg,plain", help="also: fast_recompute (ViL only)")
    p.add_argument("--pretrain-models", default=",".join(PRETRAIN_MODELS),
                   help=f"objectives on encoders, side by side: {', '.join(PRETRAIN_MODELS)}")
    p.add_argument("--pretrain-batches", default="64,256")
    p.add_argument("--infer-batch", type=int, default=256)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile-mode", default=None, help="torch.compile mode of the fast path (default: 'default')")
    p.add_argument("--profile", default="", help="rows to profile (top CUDA kernels of one training step)")
    p.add_argument("--profile-top", type=int, default=15, help="how many kernels a profile lists")
    p.add_argument("--time-budget", type=float, default=1e9, help="seconds; later measurements are skipped")
    p.add_argument("--json", default="")
    ARGS = p.parse_args(argv)
    ARGS.profile = [r for r in ARGS.profile.split(",") if r]
    ARGS.modes = ARGS.modes.split(",")
    T_START = time.perf_counter()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    info = device_info()
    print(json.dumps(info), flush=True)
    skip_rc = set(filter(None, ARGS.no_ref_compile.split(",")))
    enc: dict = {}
    for size in filter(None, ARGS.sizes.split(",")):
        enc[size] = {}
        for row in filter(None, ARGS.rows.split(",")):
            if row == "ref_compile" and size in skip_rc:
                enc[size][row] = {"skipped": "--no-ref-compile"}
                continue
            enc[size][row] = guarded(measure_encoder, row, size)
    pre: dict = {}
    for size in filter(None, ARGS.pretrain.split(",")):
        pre[size] = {}
        for name in filter(None, ARGS.pretrain_models.split(",")):
            pre[size][name] = {row: {b: guarded(measure_pretrain, name, row, size, int(b))
                                     for b in filter(None, ARGS.pretrain_batches.split(","))}
                               for row in filter(None, ARGS.pretrain_rows.split(","))}
    gl = goals(enc, pre)
    result = {"device": info, "encoder": enc, "pretrain": pre, "goals": gl,
              "settings": {k: v for k, v in vars(ARGS).items() if k != "json"},
              "total_s": round(time.perf_counter() - T_START, 1)}
    print(json.dumps(result, indent=1))
    print(markdown(enc, pre, gl))
    if ARGS.json:
        with open(ARGS.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


ARGS: argparse.Namespace
T_START = 0.0

if __name__ == "__main__":
    main()
