"""The command line and training loops end to end on real images (CPU)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mal.cli import main
from mal.config import load_run_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.dim=32", "model.depth=2", "objective.decoder.depth=1", "objective.decoder.dim=32",
        "objective.decoder.num_heads=4", "data.num_workers=0", "data.cache=false", "log_every=1"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _pretrain_args(data, out, *extra):
    return ["pretrain", "--config", "cifar10_pretrain", "--output", str(out), "--no-progress",
            f"data.dataset={data}", "optim.batch_size=16", "optim.epochs=2", "optim.warmup_epochs=0.5", *TINY, *extra]


def test_pretrain_finetune_eval_end_to_end(image_folder, tmp_path, capsys):
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    assert main(_pretrain_args(image_folder, pre)) == 0
    out = capsys.readouterr().out
    assert "resolved config:" in out and "cluster_size: 4" in out
    summary = json.loads((pre / "summary.json").read_text())
    assert summary["steps"] == 2 * (192 // 16)
    assert ("peak_gpu_gib" in summary) == torch.cuda.is_available()      # a CPU run has no GPU peak to report
    assert 0 <= summary["knn_top1"] <= 100 and 0 <= summary["linprobe_top1"] <= 100
    assert (pre / "predictions.png").stat().st_size > 0 and (pre / "loss.png").exists()
    assert (pre / "tb").is_dir() and len((pre / "metrics.csv").read_text().splitlines()) == 1 + summary["steps"]
    weights = load_file(str(pre / "ckpt_last/model.safetensors"))
    assert "mask_token" in weights and any(k.startswith("decoder.") for k in weights)

    assert main(["finetune", "--config", "cifar10_finetune", "--init", str(pre / "ckpt_last"),
                 "--output", str(ft), "--no-progress", f"data.dataset={image_folder}", "optim.batch_size=16",
                 "optim.epochs=1", "ema_decay=0.9", "model.dim=32", "model.depth=2", "data.num_workers=0",
                 "data.cache=false"]) == 0
    ft_summary = json.loads((ft / "summary.json").read_text())
    assert 0 <= ft_summary["val_top1"] <= 100 and ft_summary["val_top5"] == 100.0   # 3 classes: top-5 is all
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ft / "ckpt_last"), "--knn", "--linprobe", "--json", str(tmp_path / "e.json"),
                 "data.num_workers=0"]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert abs(res["top1"] - ft_summary["val_top1"]) < 1e-6          # same weights, same data -> same number
    assert {"knn_top1", "linprobe_top1", "top5"} <= set(res)


def test_run_folder_is_never_overwritten_unless_asked(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = _pretrain_args(image_folder, out, "max_steps=1", "probe=false")
    assert main(args) == 0
    marker = out / "keep.txt"
    marker.write_text("mine")
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and marker.exists()
    assert main(args + ["--overwrite"]) == 0
    assert not marker.exists()


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="did you mean 'optim.epochs'"):
        load_run_config("cifar10_pretrain", ["optim.epoch=3"])
    with pytest.raises(ValueError, match="model.depth: expected an integer"):
        load_run_config(None, ["model.depth=deep"])
    with pytest.raises(ValueError, match="cluster size 5 does not divide the 12x12 patch grid"):
        load_run_config("cifar10_pretrain", ["model.cluster_size=5"])
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        load_run_config("cifar10_finetune", ["model.img_size=50"])
    with pytest.raises(ValueError, match="recompute_qkv=true needs fast_path=true"):
        load_run_config(None, ["fast_path=false", "recompute_qkv=true"])
    assert load_run_config(None, ["recompute_qkv=true"]).recompute_qkv
    cfg = load_run_config(None, ["optim.batch_size=12"])
    with pytest.raises(ValueError, match="not divisible by the 5 processes"):
        cfg.check_world(5)


def test_finetune_rejects_incompatible_checkpoint(image_folder, tmp_path, capsys):
    pre = tmp_path / "pre"
    assert main(_pretrain_args(image_folder, pre, "max_steps=1", "probe=false")) == 0
    code = main(["finetune", "--config", "cifar10_finetune", "--init", str(pre / "ckpt_last"),
                 "--output", str(tmp_path / "ft"), f"data.dataset={image_folder}", "model.dim=48", "model.depth=2",
                 "data.num_workers=0"])
    assert code == 2
    assert "model.dim: checkpoint 32 vs config 48" in capsys.readouterr().err


def _weights(run):
    return load_file(str(Path(run) / "ckpt_last/model.safetensors"))


def _assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), k


def _cli(*args):
    return [sys.executable, "-m", "mal", *args]


def test_killed_run_resumes_to_identical_weights(image_folder, tmp_path):
    """SIGKILL at a random step (checkpoint every step), --resume, same final weights as uninterrupted."""
    common = ["max_steps=10", "save_every=1", "probe=false", "objective.mask.unit=patch"]
    ref = tmp_path / "ref"
    subprocess.run(_cli(*_pretrain_args(image_folder, ref, *common)), check=True, env=_env(), capture_output=True)
    run = tmp_path / "killed"
    kill_at = int(torch.randint(2, 8, (1,)).item())
    proc = subprocess.Popen(_cli(*_pretrain_args(image_folder, run, *common)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = run / "ckpt_last/meta.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if json.loads(meta.read_text())["step"] >= kill_at:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = json.loads(meta.read_text())["step"] if meta.exists() else 0
    assert step_at_kill < 10, "the run finished before it could be killed"
    subprocess.run(_cli(*_pretrain_args(image_folder, run, *common), "--resume"), check=True, env=_env(),
                   capture_output=True)
    _assert_same_weights(_weights(ref), _weights(run))
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 11))
    ref_sum, run_sum = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    assert run_sum["final_loss"] == pytest.approx(ref_sum["final_loss"], rel=1e-6)
    # killed after its final checkpoint (e.g. during the probes): the resumed run trains no step, and its
    # summary still reports the run's last loss and whole training time
    (ref / "summary.json").unlink()
    subprocess.run(_cli(*_pretrain_args(image_folder, ref, *common), "--resume"), check=True, env=_env(),
                   capture_output=True)
    again = json.loads((ref / "summary.json").read_text())
    assert again["steps"] == 10 and again["final_loss"] == pytest.approx(ref_sum["final_loss"], rel=1e-6)
    assert again["train_time_s"] > 0.5 * ref_sum["train_time_s"]


def test_torchrun_two_and_four_processes_match_one(image_folder, tmp_path):
    """DDP (gloo, 2 CPU processes; 4 with the flat all-reduce) with the same global batch gives the same weights as
    one process."""
    common = ["max_steps=4", "probe=false", "optim.batch_size=8", "optim.blr=0.05", "optim.warmup_epochs=0"]
    one = tmp_path / "one"
    subprocess.run(_cli(*_pretrain_args(image_folder, one, *common)), check=True, env=_env(), capture_output=True)
    # the tolerance: Adam turns rounding noise in the ~0 gradient of attention's key bias into updates of ~2e-5
    # at this lr; the last step alone moves the weights by ~1e-3, a missing gradient average by ~8e-3
    atol = 5e-5
    short = tmp_path / "short"
    subprocess.run(_cli(*_pretrain_args(image_folder, short, *common, "max_steps=3")), check=True, env=_env(),
                   capture_output=True)
    assert max((_weights(one)[k] - w).abs().max().item() for k, w in _weights(short).items()) > 8 * atol
    torchrun = lambda n: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                          "-m", "mal"]
    # DDP's hooks; the flat all-reduce after the backward (what CUDA-graphed steps use), on 2 and on 4 processes
    for name, procs, sync in (("two", 2, []), ("flat", 2, ["grad_sync=flat"]), ("four", 4, ["grad_sync=flat"])):
        res = subprocess.run([*torchrun(procs), *_pretrain_args(image_folder, tmp_path / name, *common, *sync)],
                             env=_env(), capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        _assert_same_weights(_weights(one), _weights(tmp_path / name), atol=atol)
    # and accumulation: 1 process, 2 micro-batches of 4
    acc = tmp_path / "acc"
    subprocess.run(_cli(*_pretrain_args(image_folder, acc, *common, "optim.accum_steps=2")), check=True, env=_env(),
                   capture_output=True)
    _assert_same_weights(_weights(one), _weights(acc), atol=atol)


def test_probe_set_shares_the_decoded_cache_and_uses_the_eval_transform(image_folder, tmp_path, monkeypatch):
    from mal.engine.build import build_datasets
    cfg = load_run_config("cifar10_pretrain", [f"data.dataset={image_folder}",
                                               f"data.cache_dir={tmp_path / 'c'}"])
    data = build_datasets(cfg, progress=False)
    train, val, train_eval = data.train, data.val, data.train_eval
    assert train_eval.dataset is train and len(list((tmp_path / "c").glob("*.npy"))) == 2   # decoded once: train + test
    assert train_eval.transform is not train.transform

    def no_decoding(*a, **k):
        raise AssertionError("a later run decodes again instead of reusing the stored cache")
    monkeypatch.setattr("mal.data.folder.load_rgb_image", no_decoding)
    again = build_datasets(cfg, progress=False).train                         # a later run reuses the stored cache
    assert np.array_equal(np.asarray(again.read(0)), np.asarray(train.read(0)))
    a, b = train_eval[0][0], train_eval[0][0]
    assert torch.equal(a, b) and a.shape == (3, 48, 48)                        # deterministic eval transform
    assert torch.equal(a, val.transform(train.read(0)))                        # the val set's eval transform
    assert not torch.equal(train[0][0], train[0][0])                           # training set: random crops


def test_demo_prints_the_from_scratch_baseline_beside_the_fine_tuned_number(tmp_path, capsys):
    """`mal demo` (steps capped): pretraining, fine-tuning and the same classifier trained from scratch with the
    same recipe (without layer decay) and labelled steps, reported side by side."""
    assert main(["demo", "--output", str(tmp_path / "demo"), "max_steps=2", "data.num_workers=0"]) == 0
    out = capsys.readouterr().out
    assert "fine-tuned from the pretrained encoder: test top-1" in out
    assert "trained from scratch, same recipe and labelled epochs: test top-1" in out and "points" in out
    scratch = json.loads((tmp_path / "demo/scratch/summary.json").read_text())
    tuned = json.loads((tmp_path / "demo/finetune/summary.json").read_text())
    assert scratch["task"] == "supervised" and scratch["steps"] == tuned["steps"] == 2
    cfg = load_run_config(str(tmp_path / "demo/scratch/config.yaml"))
    assert cfg.optim.layer_decay == 1.0 and cfg.init == ""                # from scratch: no layer decay


def test_probe_every_logs_probe_curves_without_changing_the_run(image_folder, tmp_path):
    """probe_every=1 probes the held-out part after each epoch but the last (finish probes that one) and
    leaves the training itself untouched: the same weights as a run without probes."""
    common = ["data.holdout=0.25", "optim.epochs=3"]
    assert main(_pretrain_args(image_folder, tmp_path / "plain", *common)) == 0
    assert main(_pretrain_args(image_folder, tmp_path / "probed", *common, "probe_every=1")) == 0
    _assert_same_weights(_weights(tmp_path / "plain"), _weights(tmp_path / "probed"))
    import csv
    rows = list(csv.DictReader(open(tmp_path / "probed/metrics.csv")))
    probed = [r for r in rows if r["eval_knn_top1"]]
    spe = json.loads((tmp_path / "probed/summary.json").read_text())["steps"] // 3
    assert [int(r["step"]) for r in probed] == [spe, 2 * spe]
    assert all(0 <= float(r["eval_knn_top1"]) <= 100 and 0 <= float(r["eval_linprobe_top1"]) <= 100 for r in probed)
    assert not any(r["eval_knn_top1"] for r in csv.DictReader(open(tmp_path / "plain/metrics.csv")))


def test_pretraining_draws_its_masks_on_one_thread_and_restores_the_count(image_folder, tmp_path, monkeypatch):
    """The step's random draws run on one intra-op thread (their many small ops would each wait for busy cores);
    the run's own thread count is back in place around them and after the run."""
    from mal.objectives.mal import MALPretrain
    seen, draw = [], MALPretrain.sample_inputs

    def recording(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return draw(self, *args, **kwargs)

    monkeypatch.setattr(MALPretrain, "sample_inputs", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(_pretrain_args(image_folder, tmp_path / "pre", "optim.epochs=1")) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen[:192 // 16] == [1] * (192 // 16)                        # every training step's draw


@pytest.mark.parametrize("world", [1, 2, 4])
def test_one_pass_over_epochs_is_the_epochs_one_after_another(world):
    """The trainer reads a whole run through one loader pass: the samples are those of the epochs read one by one,
    resuming mid-epoch skips exactly the samples already trained on, the processes never share a sample, and
    optimizer step s of all processes together trains on positions [s*B, (s+1)*B) of the epoch's permutation."""
    from mal.engine.sampling import StepSampler
    n, B, epochs, seed = 21, 4, 3, 7                             # 5 steps per epoch, the last image dropped
    for rank in range(world):
        one = StepSampler(n, B, world, rank, seed)
        by_epoch = []
        for e in range(epochs):
            one.set_epoch(e)
            by_epoch += list(one)
        run = StepSampler(n, B, world, rank, seed)
        run.set_epoch(0, until=epochs)
        assert list(run) == by_epoch and len(run) == len(by_epoch) == epochs * 20 // world
        assert len({i for _, i in by_epoch[:20 // world]}) == 20 // world          # no repeat within an epoch
        run.set_epoch(1, start=3, until=epochs)                   # resumed: epoch 1 after 3 of its samples
        assert list(run) == by_epoch[20 // world + 3:] and len(run) == len(by_epoch) - 20 // world - 3
    shards = []
    for rank in range(world):
        s = StepSampler(n, B, world, rank, seed)
        s.set_epoch(0)
        shards.append([i for _, i in s])
    assert sum(map(len, shards)) == len(set().union(*shards)) == 20              # disjoint, all 20 usable images
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:20].tolist()   # epoch 0's order
    micro = B // world
    for step in range(20 // B):
        together = {i for shard in shards for i in shard[step * micro:(step + 1) * micro]}
        assert together == set(perm[step * B:(step + 1) * B]), step


def test_evaluations_between_steps_do_not_change_the_training(image_folder, tmp_path):
    """A supervised run that evaluates after every epoch (the model switched to eval mode and back) trains the
    same weights as one that evaluates only at the end: drop path is on again in the steps after each one."""
    common = ["supervised", "--config", "cifar10_supervised", "--no-progress", f"data.dataset={image_folder}",
              "optim.batch_size=16", "optim.epochs=3", "model.dim=32", "model.depth=2", "data.num_workers=0",
              "data.cache=false", "model.drop_path_rate=0.5", "ema_decay=0"]
    for name, every in (("each", 1), ("end", 100)):
        assert main([*common, "--output", str(tmp_path / name), f"eval_every={every}"]) == 0
    rows = [r for r in (tmp_path / "each/metrics.csv").read_text().splitlines()[1:] if r.split(",")[6:7] != [""]]
    assert len(rows) >= 3                                                    # an evaluation after every epoch
    _assert_same_weights(_weights(tmp_path / "each"), _weights(tmp_path / "end"))
