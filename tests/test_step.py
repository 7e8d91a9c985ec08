"""The training step: the loss module the CUDA graphs capture, when graphs are used, the optimizer's
device portability, and (on a GPU) graphed steps == eager steps, also through the trainer with accumulation."""
import csv
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from mal.cli import main
from mal.config import DecoderConfig, EncoderConfig, MaskConfig, ObjectiveConfig, load_run_config
from mal.distributed import DistInfo
from mal.objectives.mal import MALPretrain
from mal.engine.build import build_criterion
from mal.engine.optim import adapt_loaded_optimizer, make_optimizer, set_lr
from mal.engine import step as step_module
from mal.engine.step import LossStep, StepRunner, graphs_usable, restore, snapshot
from mal.models.vil import VisionLSTM

REPO = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ENC = dict(img_size=24, patch_size=4, dim=32, depth=2, cluster_size=2)
DEC = DecoderConfig(depth=1, dim=32, num_heads=4)


def test_graphs_on_cuda_and_under_ddp_only_without_its_hooks():
    assert graphs_usable(True, torch.device("cuda"), DistInfo())
    assert not graphs_usable(False, torch.device("cuda"), DistInfo())
    assert not graphs_usable(True, torch.device("cpu"), DistInfo())
    two = DistInfo(rank=0, world_size=2)
    assert graphs_usable(True, torch.device("cuda"), two) and graphs_usable(True, torch.device("cuda"), two, "flat")
    assert not graphs_usable(True, torch.device("cuda"), two, "ddp")       # DDP's hooks cannot run in a replay
    assert graphs_usable(True, torch.device("cuda"), DistInfo(), "ddp")     # one process: no hooks at all


def test_loss_step_is_the_model_loss():
    torch.manual_seed(0)
    pre = MALPretrain(EncoderConfig(**ENC), ObjectiveConfig(decoder=DEC))
    imgs = torch.randn(3, 3, 24, 24)
    draws = pre.sample_inputs(3, torch.Generator().manual_seed(1))
    assert len(draws) == 2                          # cluster sequences and the cluster mask
    runner = StepRunner(LossStep(pre), torch.device("cpu"), amp=True, graphs=False)
    assert torch.equal(runner(imgs, *draws), pre(imgs, *draws)["loss"])

    cfg = load_run_config("cifar10_supervised", ["aug.mixup=0", "aug.cutmix=0"])
    crit, mixup = build_criterion(cfg, 10)
    assert mixup is None
    clf = VisionLSTM(EncoderConfig(**ENC), num_classes=10)
    y = torch.tensor([1, 2, 3])
    loss = StepRunner(LossStep(clf, crit), torch.device("cpu"), True, False)(imgs, y)
    assert torch.equal(loss, crit(clf(imgs).float(), y))
    with pytest.raises(Exception):      # labels are checked by the criterion, not silently ignored
        StepRunner(LossStep(clf, crit), torch.device("cpu"), True, False)(imgs, y[:2])


def test_optimizer_state_from_a_fused_gpu_run_resumes_on_cpu():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = make_optimizer([{"params": list(model.parameters())}], 1e-2, (0.9, 0.999), torch.device("cpu"))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:                  # what a fused CUDA run writes
        g["fused"], g["foreach"] = True, None
    opt2 = make_optimizer([{"params": list(model.parameters())}], 1e-2, (0.9, 0.999), torch.device("cpu"))
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["fused"] is True
    adapt_loaded_optimizer(opt2, torch.device("cpu"))
    assert opt2.param_groups[0]["fused"] is False
    before = model.weight.detach().clone()
    model(torch.randn(2, 4)).sum().backward()
    opt2.step()                                     # would raise "fused=True requires CUDA" without the adapt
    assert not torch.equal(before, model.weight)
    assert opt2.state[model.weight]["step"].item() == 2


def _twin_classifiers() -> tuple[VisionLSTM, VisionLSTM]:
    """Two small ViL classifiers on the GPU with the same weights (seed 0), on the fast path."""
    torch.manual_seed(0)
    a = VisionLSTM(EncoderConfig(**ENC), num_classes=10).cuda().train()
    b = VisionLSTM(EncoderConfig(**ENC), num_classes=10).cuda().train()
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.fast_path()
    return a, b


def _steps(model, graphs: bool, batches, crit=None):
    """Three AdamW steps through StepRunner; returns the losses."""
    dev = torch.device("cuda")
    opt = make_optimizer([{"params": list(model.parameters())}], 1e-3, (0.9, 0.999), dev)
    runner = StepRunner(LossStep(model, crit), dev, amp=True, graphs=graphs)
    losses = []
    for args in batches:
        loss = runner(*args)
        loss.backward()
        opt.step()
        runner.zero_grad(opt)
        losses.append(loss.item())
    return losses


@cuda
@pytest.mark.parametrize("accum", [1, 2, 3])
def test_graphed_gradients_accumulate_like_eager(accum):
    """Gradients of `accum` micro-batches (loss/accum each), over two optimizer steps: graphs == eager."""
    torch.manual_seed(0)
    obj = ObjectiveConfig(decoder=DEC)
    models = [MALPretrain(EncoderConfig(**ENC), obj).cuda().train() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    g = torch.Generator().manual_seed(5)
    micro = []
    for _ in range(2 * accum):
        micro.append((torch.randn(4, 3, 24, 24, device="cuda"), *models[0].sample_inputs(4, g, "cuda")))
    grads = []
    for m, graphs in zip(models, (False, True)):
        m.fast_path()
        dev = torch.device("cuda")
        opt = make_optimizer([{"params": list(m.parameters())}], 1e-3, (0.9, 0.999), dev)
        runner = StepRunner(LossStep(m), dev, amp=True, graphs=graphs, accum_steps=accum)
        assert runner.keep_grads == (graphs and accum > 1)
        runner.zero_grad(opt)
        per_step = []
        for s in range(2):
            for a in range(accum):
                (runner(*micro[s * accum + a]) / accum).backward()
            per_step.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]).clone())
            opt.step()
            runner.zero_grad(opt)
        grads.append(per_step)
    for eager, graph in zip(*grads):
        assert eager.shape == graph.shape
        rel = (eager - graph).norm() / eager.norm()
        assert rel < 2e-2, rel.item()             # a wrong accumulation gives a relative error of order 1


@cuda
@pytest.mark.parametrize("unit", ["cluster", "pixel", "none"])
def test_graphed_pretraining_steps_match_eager_steps(unit):
    torch.manual_seed(0)
    obj = ObjectiveConfig(decoder=DEC, mask=MaskConfig(unit, 0.2 if unit != "none" else 0.0))
    a = MALPretrain(EncoderConfig(**ENC), obj).cuda().train()
    b = MALPretrain(EncoderConfig(**ENC), obj).cuda().train()
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.fast_path()
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        batches.append((torch.randn(8, 3, 24, 24, device="cuda"), *a.sample_inputs(8, g, "cuda")))
    init = [p.detach().clone() for p in a.parameters()]
    eager, graph = _steps(a, False, batches), _steps(b, True, batches)
    assert torch.allclose(torch.tensor(eager), torch.tensor(graph), rtol=2e-2, atol=1e-3), (eager, graph)
    assert eager[0] != eager[1]                     # the replays saw new inputs and new weights
    upd_a = torch.cat([(p - p0).flatten() for p, p0 in zip(a.parameters(), init)])
    upd_b = torch.cat([(p - p0).flatten() for p, p0 in zip(b.parameters(), init)])
    assert upd_a.norm() > 0
    rel = (upd_a - upd_b).norm() / upd_a.norm()     # 3 AdamW steps: same updates up to bf16 noise
    assert rel < 1e-1, rel.item()               # stale inputs or wrong gradients give order 1


def test_graphs_are_captured_thread_local_with_and_without_torchs_argument(monkeypatch):
    """`graphed_callables` asks for thread-local capture: through make_graphed_callables' capture_error_mode where
    torch has it, else (torch 2.11) through the graphs it creates, whose class is swapped for the call only."""
    seen = {}

    def with_mode(fn, static, num_warmup_iters=3, allow_unused_input=False, capture_error_mode="global"):
        seen["mode"] = capture_error_mode
        return fn

    def without_mode(fn, static, num_warmup_iters=3, allow_unused_input=False):
        seen["graph_class"] = torch.cuda.CUDAGraph
        return fn

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", with_mode)
    assert step_module.graphed_callables(len, (), 2) is len and seen["mode"] == "thread_local"
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", without_mode)
    original = torch.cuda.CUDAGraph
    assert step_module.graphed_callables(len, (), 2) is len
    assert seen["graph_class"] is step_module._ThreadLocalGraph and torch.cuda.CUDAGraph is original


@cuda
def test_capture_survives_another_thread_allocating_pinned_memory():
    """The loader's pin-memory thread allocates pinned memory while the first step captures. In CUDA's global capture
    mode that call invalidates the capture ("operation failed due to a previous error during capture")."""
    empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
    if empty_host_cache is None:
        pytest.skip("torch has no _host_emptyCache: pinned blocks would be reused, not allocated")
    a, b = _twin_classifiers()
    crit = nn.CrossEntropyLoss()
    batches = [(torch.randn(8, 3, 24, 24, device="cuda"), torch.randint(0, 10, (8,), device="cuda")) for _ in range(3)]
    eager = _steps(a, False, batches, crit)
    stop, pinned, errors = threading.Event(), [0], []

    def pin_memory_thread():                        # cudaHostAlloc + cudaFreeHost, over and over
        try:
            while not stop.is_set():
                torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
                empty_host_cache()
                pinned[0] += 1
        except Exception as e:                      # noqa: BLE001 (reported by the assert below)
            errors.append(e)

    thread = threading.Thread(target=pin_memory_thread)
    thread.start()
    try:
        graph = _steps(b, True, batches, crit)
    finally:
        stop.set()
        thread.join()
    assert not errors and pinned[0] > 0, (errors, pinned)
    assert torch.allclose(torch.tensor(eager), torch.tensor(graph), rtol=2e-2, atol=1e-3), (eager, graph)


@cuda
def test_graphed_classification_step_with_mixup_targets_matches_eager():
    a, b = _twin_classifiers()
    cfg = load_run_config("cifar10_supervised")
    crit, mixup = build_criterion(cfg, 10)
    batches = []
    for _ in range(3):
        x, y = mixup(torch.randn(8, 3, 24, 24, device="cuda"), torch.randint(0, 10, (8,), device="cuda"))
        batches.append((x, y))
    eager, graph = _steps(a, False, batches, crit), _steps(b, True, batches, crit)
    assert torch.allclose(torch.tensor(eager), torch.tensor(graph), rtol=2e-2, atol=1e-3), (eager, graph)


@cuda
def test_graphed_step_draws_new_random_scan_orders_at_each_replay():
    """scan_order=random: the plan is drawn on the GPU inside the captured forward, so every replay scans new
    cluster sequences. A draw frozen into the graph would give one loss for the same batch and weights."""
    torch.manual_seed(0)
    m = VisionLSTM(EncoderConfig(**ENC, scan_order="random"), num_classes=10).cuda().train()
    m.fast_path()
    dev = torch.device("cuda")
    x, y = torch.randn(8, 3, 24, 24, device=dev), torch.randint(0, 10, (8,), device=dev)
    losses = {}
    for graphs in (True, False):                     # capture first: no autograd graph of an eager step alive
        runner = StepRunner(LossStep(m, torch.nn.CrossEntropyLoss()), dev, amp=True, graphs=graphs)
        losses[graphs] = []
        for _ in range(4):                           # no optimizer step: same weights every call
            loss = runner(x, y)
            loss.backward()
            m.zero_grad(set_to_none=True)
            losses[graphs].append(loss.item())
            del loss
    assert len(set(losses[False])) == 4 and len(set(losses[True])) == 4, losses


@pytest.mark.parametrize("resumed", [False, True])
def test_warm_up_updates_are_undone_before_the_whole_update_is_captured(resumed):
    """A whole-update graph warms up with real AdamW steps; `restore` takes the weights and the optimizer back to
    `snapshot`'s (a fresh optimizer's zero state, or a resumed one's), in place, so the run's next step is
    bitwise the step it would have taken without the capture."""
    def setup():
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        opt = make_optimizer([{"params": list(model.parameters())}], 1e-2, (0.9, 0.999), torch.device("cpu"))
        if resumed:                                   # one step already taken: state to keep
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
        return model, opt

    def step(model, opt, x):
        opt.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        opt.step()
    x = torch.randn(5, 4)
    ref_model, ref_opt = setup()
    step(ref_model, ref_opt, x)
    model, opt = setup()
    params = list(model.parameters())
    saved = snapshot(params, opt)
    addresses = [p.data_ptr() for p in params]
    for _ in range(3):                                # the warm-up's updates
        step(model, opt, torch.randn(5, 4))
    restore(params, opt, saved)
    assert [p.data_ptr() for p in params] == addresses                      # in place
    step(model, opt, x)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))
    st, ref_st = opt.state[model.weight], ref_opt.state[ref_model.weight]
    assert all(torch.equal(st[k], ref_st[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_a_captured_optimizers_checkpoint_steps_eagerly_after_loading():
    """A captured AdamW keeps its lr as a device tensor that `set_lr` fills in place; its checkpoint, loaded into
    an eager run, has a float lr again and is not capturable."""
    model = nn.Linear(4, 3)
    opt = make_optimizer([{"params": list(model.parameters()), "lr_scale": 0.5}], 1e-2, (0.9, 0.999),
                         torch.device("cpu"))
    lr = torch.tensor(1.0)
    opt.param_groups[0].update(lr=lr, capturable=True)        # what make_capturable leaves (on the GPU)
    set_lr(opt, 4e-3)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(2e-3)
    sd = opt.state_dict()
    opt2 = make_optimizer([{"params": list(model.parameters())}], 1e-2, (0.9, 0.999), torch.device("cpu"))
    opt2.load_state_dict(sd)
    adapt_loaded_optimizer(opt2, torch.device("cpu"))
    g = opt2.param_groups[0]
    assert g["capturable"] is False and isinstance(g["lr"], float) and g["lr"] == pytest.approx(2e-3)
    set_lr(opt2, 1e-3)
    assert g["lr"] == pytest.approx(5e-4)


def test_graph_optimizer_needs_one_micro_batch_and_the_stop_policy():
    assert load_run_config("cifar10_pretrain", ["graph_optimizer=true"]).graph_optimizer
    for bad in ("optim.accum_steps=2", "nan_policy=skip"):
        with pytest.raises(ValueError, match="graph_optimizer=true captures one whole update"):
            load_run_config("cifar10_pretrain", ["graph_optimizer=true", bad])


@cuda
@pytest.mark.parametrize("config", ["cifar10_pretrain", "cifar10_supervised"])
def test_whole_update_graph_trains_as_the_eager_optimizer(image_folder, tmp_path, config):
    """`graph_optimizer=true` (forward, backward, clip and AdamW in one graph; EMA eager) against eager steps: the
    same losses and, as a whole, the same weights within bf16 noise (relative L2 against the distance between
    the loss-graph run and the eager one), at an lr that moves them, with clipping on."""
    tiny = ["model.dim=32", "model.depth=2", "data.num_workers=0", "data.cache=false", "log_every=1",
            "max_steps=4", "optim.batch_size=32", "optim.warmup_epochs=0", "optim.clip_grad=0.5"]
    if config == "cifar10_pretrain":
        tiny += ["objective.decoder.depth=1", "objective.decoder.dim=32", "objective.decoder.num_heads=4",
                 "probe=false", "optim.blr=0.05"]
    task = "pretrain" if config == "cifar10_pretrain" else "supervised"
    runs = {}
    for name, extra in (("whole", ["graph_optimizer=true"]), ("loss", []), ("eager", ["cuda_graph=false"])):
        out = tmp_path / name
        assert main([task, "--config", config, "--output", str(out), "--no-progress", f"data.dataset={image_folder}",
                     *tiny, *extra]) == 0
        with open(out / "metrics.csv") as fh:
            losses = [float(r["loss"]) for r in csv.DictReader(fh) if r["loss"]]
        runs[name] = (losses, load_file(str(out / "ckpt_last/model.safetensors")))
    (lw, ww), (ll, wl), (le, we) = runs["whole"], runs["loss"], runs["eager"]
    assert len(lw) == len(le) == 4 and len(set(le)) == 4
    for a, b in zip(lw, le):
        assert abs(a - b) < 2e-2 * abs(b), (lw, le)
    keys = [k for k in we if not k.endswith("qkv.bias")]

    def rel(a: dict, b: dict) -> float:
        return (sum((a[k] - b[k]).pow(2).sum() for k in keys) / sum(b[k].pow(2).sum() for k in keys)).sqrt().item()
    noise = rel(wl, we)
    assert noise < 2e-2 and rel(ww, we) < 2 * noise + 1e-3, (rel(ww, we), noise)


@cuda
def test_training_run_with_graphs_and_accumulation_matches_eager(image_folder, tmp_path):
    """`mal pretrain` with cuda_graph on/off and accum_steps 2: same losses and weights within bf16 noise, at an lr
    that moves the weights (the decoder's qkv biases left out, as in the DDP test below)."""
    common = ["--config", "cifar10_pretrain", "--no-progress", f"data.dataset={image_folder}",
              "optim.batch_size=32", "optim.accum_steps=2", "max_steps=4", "probe=false", "model.dim=32",
              "model.depth=2", "objective.decoder.depth=1", "objective.decoder.dim=32", "objective.decoder.num_heads=4",
              "data.num_workers=0", "data.cache=false", "log_every=1", "optim.blr=0.05", "optim.warmup_epochs=0"]
    runs = {}
    for graph in (True, False):
        out = tmp_path / f"g{int(graph)}"
        assert main(["pretrain", "--output", str(out), *common, f"cuda_graph={str(graph).lower()}"]) == 0
        runs[graph] = (json.loads((out / "summary.json").read_text()),
                       load_file(str(out / "ckpt_last/model.safetensors")))
    (s1, w1), (s0, w0) = runs[True], runs[False]
    assert s1["steps"] == s0["steps"] == 4
    assert 0 < s1["peak_gpu_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30   # the run's peak
    assert abs(s1["final_loss"] - s0["final_loss"]) < 2e-2 * abs(s0["final_loss"])
    for k in w0:
        assert k.endswith("qkv.bias") or torch.allclose(w1[k], w0[k], atol=3e-3), k


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_graphed_ddp_steps_match_one_process_and_eager_ddp(image_folder, tmp_path):
    """Two GPUs (torchrun, NCCL): graphed steps with the flat gradient all-reduce (grad_sync=auto) give the losses
    and weights of one graphed process and of eager DDP (grad_sync=ddp), within bf16 noise. bf16 sums in another
    order flip the sign of near-zero gradients, and Adam turns such a flip into an lr-sized step, so single
    weights can differ by ~lr: the weights are compared as a whole (relative L2 distance), against the distance
    between eager DDP and one process (PyTorch's own reference pair). The decoder's qkv biases are left out: the
    key bias has a zero gradient (softmax ignores a shift), so its steps are pure rounding noise."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    common = ["--config", "cifar10_pretrain", "--no-progress", f"data.dataset={image_folder}", "optim.batch_size=32",
              "max_steps=4", "probe=false", "model.dim=32", "model.depth=2", "objective.decoder.depth=1",
              "objective.decoder.dim=32", "objective.decoder.num_heads=4", "data.num_workers=0", "data.cache=false",
              "optim.blr=0.05", "optim.warmup_epochs=0", "log_every=1"]        # steps that move the weights
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mal"]
    runs = {}
    for name, launcher, extra in (("one", [sys.executable, "-m", "mal"], []), ("flat", torchrun, []),
                                  ("ddp", torchrun, ["grad_sync=ddp"])):
        out = tmp_path / name
        res = subprocess.run([*launcher, "pretrain", "--output", str(out), *common, *extra], env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        with open(out / "metrics.csv") as fh:
            losses = [float(r["loss"]) for r in csv.DictReader(fh) if r["loss"]]
        runs[name] = (losses, load_file(str(out / "ckpt_last/model.safetensors")))
    (l1, w1), (lf, wf), (ld, wd) = runs["one"], runs["flat"], runs["ddp"]
    assert len(l1) == len(lf) == len(ld) == 4 and len(set(l1)) == 4
    for a, b, c in zip(lf, l1, ld):
        assert abs(a - b) < 2e-2 * abs(b) and abs(a - c) < 2e-2 * abs(c), (lf, l1, ld)
    keys = [k for k in w1 if not k.endswith("qkv.bias")]

    def rel(a: dict, b: dict) -> float:                 # ||a - b|| / ||b|| over all compared weights
        return (sum((a[k] - b[k]).pow(2).sum() for k in keys) / sum(b[k].pow(2).sum() for k in keys)).sqrt().item()

    noise = rel(wd, w1)                                  # eager DDP vs one process: bf16 noise only
    assert noise < 2e-2, noise
    assert rel(wf, w1) < 2 * noise + 1e-3 and rel(wf, wd) < 2 * noise + 1e-3, (rel(wf, w1), rel(wf, wd), noise)


@cuda
@pytest.mark.parametrize("graph_optimizer", [False, True])
def test_graphed_training_steps_never_wait_for_the_gpu(image_folder, tmp_path, graph_optimizer):
    """Between logs and checkpoints a graphed step makes no synchronizing CUDA call (torch's sync debug mode
    raises on one), so the host queues steps ahead of the GPU; uint8 pretraining batches included."""
    import itertools

    from mal.engine import Trainer
    cfg = load_run_config("cifar10_pretrain", [
        f"data.dataset={image_folder}", "data.cache=false", "data.num_workers=0", "optim.batch_size=32",
        "optim.epochs=3", "model.dim=32", "model.depth=2", "objective.decoder.depth=1", "objective.decoder.dim=32",
        "objective.decoder.num_heads=4", "log_every=1000", "save_every=1000", "probe=false",
        f"graph_optimizer={str(graph_optimizer).lower()}"])
    trainer = Trainer(cfg, tmp_path / "run", DistInfo(), progress=False)
    trainer.begin()
    size = cfg.model.img_size
    batch = (torch.randint(0, 256, (32, 3, size, size), dtype=torch.uint8, device="cuda"),
             torch.zeros(32, dtype=torch.long, device="cuda"))
    batches = itertools.repeat(batch)
    for _ in range(3):                                    # warm-up and capture may synchronize
        trainer.train_step(batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.train_step(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.step == 6
