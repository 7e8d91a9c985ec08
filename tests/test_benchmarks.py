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
