"""`mal segment` end to end on CPU: train on synthetic shapes to a mIoU far above chance, evaluate, predict; resume
and gradient accumulation give the run's weights."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mal.cli import main
from segment_shapes import CLASSES, IGNORE, write_shapes

TINY = ["model.img_size=48", "model.patch_size=4", "model.dim=32", "model.depth=4", "model.cluster_size=2",
        "seg.channels=32", "seg.feature_scales=[2,1,0.5,0.25]", "seg.pool_scales=[1,2,3]", "seg.crop_size=[32,32]",
        "seg.scale_range=[0.75,1.5]", f"seg.ignore_index={IGNORE}", f"seg.class_names=[{','.join(CLASSES)}]",
        "num_classes=3", "data.train_split=train", "data.val_split=val", "data.num_workers=0", "amp=false",
        "optim.batch_size=16", "optim.warmup_epochs=1", "optim.lr=4e-3", "optim.weight_decay=0.01", "log_every=2",
        "seg.loss=ce_dice"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes"), {"train": 96, "val": 24})


def _train(data, out, *extra):
    return main(["segment", "train", "--output", str(out), "--no-progress", f"data.dataset={data}", *TINY, *extra])


def test_segment_train_eval_predict(shapes, tmp_path, capsys):
    """96 steps (~25 s on 2 idle cores) of a 4-block ViL + UperNet with CE + Dice reach a val mIoU far above
    chance (all background: ~28 %; about 95 % is usual)."""
    run = tmp_path / "run"
    assert _train(shapes, run, "optim.epochs=16", "eval_every=8", "ema_decay=0.9") == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "segment" and summary["steps"] == 96
    assert summary["val_miou"] > 70, summary
    assert {"val_iou_square", "val_dice_disc", "val_ema_miou", "val_acc"} <= set(summary)
    assert (run / "predictions.png").stat().st_size > 0 and summary["prediction_png"].endswith("predictions.png")
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "eval_miou" in header and "eval_ema_mdice" in header and "eval_top1" not in header
    capsys.readouterr()

    assert main(["segment", "eval", "--checkpoint", str(run / "ckpt_last"), "--json", str(tmp_path / "e.json"),
                 "--png", str(tmp_path / "e.png")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["miou"] == pytest.approx(summary["val_miou"], abs=1e-6) and (tmp_path / "e.png").exists()
    capsys.readouterr()
    assert main(["segment", "eval", "--checkpoint", str(run / "ckpt_last"), "--inference", "slide"]) == 0
    slide = json.loads(capsys.readouterr().out)
    assert slide["inference"] == "slide" and slide["miou"] > 60

    out = tmp_path / "pred"
    assert main(["segment", "predict", "--checkpoint", str(run / "ckpt_last"), "--input", str(shapes / "val"),
                 "--out", str(out)]) == 0
    masks = sorted(out.glob("0*.png"))
    assert len(masks) == 24 and (out / "overlays.png").exists()
    assert set(np.unique(np.asarray(Image.open(masks[0]))).tolist()) <= {0, 1, 2}
    assert main(["eval", "--checkpoint", str(run / "ckpt_last")]) == 2
    assert "mal segment eval" in capsys.readouterr().err


def _weights(run):
    return load_file(str(run / "ckpt_last/model.safetensors"))


def _same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), k


def test_segment_resume_and_accumulation_give_the_same_weights(shapes, tmp_path):
    common = ["max_steps=4", "seg.dropout=0", "eval_every=100", "seg.eval_split=val", "data.val_split="]
    ref = tmp_path / "ref"
    assert _train(shapes, ref, *common, "save_every=1", "keep_every=2") == 0
    again = tmp_path / "again"                                             # as if killed after step 2
    shutil.copytree(ref, again)
    shutil.rmtree(again / "ckpt_last")
    (again / "ckpt_0000002").rename(again / "ckpt_last")
    assert main(["segment", "train", "--resume", "--output", str(again), "--no-progress", f"data.dataset={shapes}",
                 *TINY, *common, "save_every=1", "keep_every=2"]) == 0
    _same(_weights(ref), _weights(again))
    acc = tmp_path / "acc"
    assert _train(shapes, acc, *common, "optim.accum_steps=2") == 0
    _same(_weights(ref), _weights(acc), atol=2e-5)
