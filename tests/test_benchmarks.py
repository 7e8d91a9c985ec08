"""The benchmark scripts' own arithmetic (their speed numbers live in benchmarks/results/, not here)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_step_flops_is_three_forwards_of_the_model():
    """A supervised training step costs forward + backward = 3 forwards of the model's matmuls; torch's counter
    alone charges the depthwise causal conv's backward `groups` times over (56 % too much for ViL-T)."""
    from train_step import step_flops, synthetic_folder

    from mal.config import load_run_config
    from mal.engine.build import build_model
    over = [f"data.dataset={synthetic_folder(96, 8)}", "data.cache=false", "model.depth=4"]
    cfg = load_run_config("imagenette_supervised", over)
    model = build_model(cfg, 10, load_init=False)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 96, 96))
    forward = counter.get_total_flops() / 2 / 1e9
    assert abs(step_flops("imagenette_supervised", over) / (3 * forward) - 1) < 0.01


def test_fit_row_reads_the_loops_own_windows(image_folder):
    """A fit row runs the real loop for --fit-steps steps and reports its 10-step windows after the first 20 %:
    30 steps give the windows ending at steps 10, 20 and 30."""
    import argparse

    from train_step import measure_fit
    tiny = ["model.dim=32", "model.depth=2", "objective.decoder.depth=1", "objective.decoder.dim=32",
            "objective.decoder.num_heads=4", "data.cache=false", "optim.batch_size=8", f"data.dataset={image_folder}"]
    res = measure_fit("cifar10_pretrain", "fit", tiny, argparse.Namespace(fit_steps=30, fit_workers=0))
    assert res["windows"] == 3
    assert 0 < res["p10"] <= res["img_s"] <= res["p90"]
