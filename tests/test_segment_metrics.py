"""Segmentation metrics against a hand computation, and the ignore index in the loss and the metrics."""
import math

import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from mal.engine.evaluate import SegmentationEvaluator
from mal.segment import SegLoss
from mal.segment.loss import cross_entropy, soft_dice_loss
from mal.segment.metrics import confusion_matrix, scores_from_confusion

IGNORE = 255


def test_metrics_match_a_hand_computation():
    """4 classes on 2x4 pixels + 2 ignored; class 3 is neither in the truth nor predicted (no score)."""
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 2]])                      # the ignored pixels' predictions never count
    cm = confusion_matrix(4, IGNORE, "cpu")
    cm.update(pred[None], target[None])
    res = scores_from_confusion(cm.compute(), ["a", "b", "c", "d"])
    # class 0: tp 1, fp 1 (pixel (1,1)), fn 1 (pixel (0,1)) -> IoU 1/3, Dice 2/4
    # class 1: tp 2, fp 1, fn 0 -> IoU 2/3, Dice 4/5;   class 2: tp 1, fp 0, fn 1 -> IoU 1/2, Dice 2/3
    iou, dice = [1 / 3, 2 / 3, 1 / 2], [2 / 4, 4 / 5, 2 / 3]
    assert res["iou_a"] == pytest.approx(100 / 3) and res["dice_b"] == pytest.approx(80)
    assert math.isnan(res["iou_d"]) and math.isnan(res["dice_d"])
    assert res["miou"] == pytest.approx(100 * sum(iou) / 3) and res["mdice"] == pytest.approx(100 * sum(dice) / 3)
    assert res["acc"] == pytest.approx(100 * 4 / 6)
    tm = MulticlassJaccardIndex(4, average="none", ignore_index=IGNORE)(pred[None], target[None])
    assert torch.allclose(tm[:3].double(), torch.tensor(iou, dtype=torch.float64), atol=1e-6)


class _Fixed(torch.nn.Module):
    """A 'segmenter' whose logits are given, to test the evaluator end to end."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def predict(self, x, mode, crop, stride):
        return self.logits[: len(x)]


def test_evaluator_ignores_the_ignore_index():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 6, 6))
    target[:, :2] = IGNORE
    logits = torch.randn(2, 3, 6, 6)
    ev = SegmentationEvaluator(3, IGNORE, ["x", "y", "z"])
    a = ev(_Fixed(logits), [(torch.zeros(2, 3, 6, 6), target)], torch.device("cpu"))
    changed = logits.clone()
    changed[:, :, :2] = torch.randn(2, 3, 2, 6) * 10                         # only ignored pixels differ
    b = ev(_Fixed(changed), [(torch.zeros(2, 3, 6, 6), target)], torch.device("cpu"))
    assert a == pytest.approx(b, nan_ok=True)
    hand = (logits.argmax(1) == target)[:, 2:].float().mean().item() * 100
    assert a["acc"] == pytest.approx(hand)


@pytest.mark.parametrize("kind", ["ce", "ce_dice"])
def test_loss_ignores_the_ignore_index(kind):
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 5, 7))
    target[0, 1:3] = IGNORE
    logits = torch.randn(2, 3, 5, 7, requires_grad=True)
    loss = SegLoss(kind, IGNORE)
    value = loss(logits, target)
    value.backward()
    assert logits.grad[0, :, 1:3].abs().max() == 0                           # no gradient at ignored pixels
    other = logits.detach().clone()
    other[0, :, 1:3] = 100.0
    assert loss(other, target).item() == pytest.approx(value.item())
    # cross-entropy: the valid pixels' sum over all pixels (mmseg's avg_non_ignore=False)
    valid = target != IGNORE
    per_pixel = torch.nn.functional.cross_entropy(logits.detach(), target.masked_fill(~valid, 0), reduction="none")
    assert cross_entropy(logits.detach(), target, IGNORE).item() == pytest.approx(
        (per_pixel * valid).sum().item() / target.numel())


def test_loss_of_the_batch_is_the_mean_over_micro_batches():
    """Per-pixel and per-image means over fixed counts: splitting the batch (processes, accumulation) changes
    nothing."""
    torch.manual_seed(1)
    target = torch.randint(0, 2, (4, 8, 8))
    target[1, :3] = IGNORE
    logits = torch.randn(4, 2, 8, 8)
    loss = SegLoss("ce_dice", IGNORE, dice_weight=0.5)
    assert loss(logits, target).item() == pytest.approx((loss(logits[:2], target[:2]) + loss(logits[2:], target[2:]))
                                                        .item() / 2, rel=1e-6)


def test_dice_by_hand():
    """A perfect binary prediction has Dice loss ~0; p = 0.5 everywhere gives 1 - (2*0.5*n + 1) / (0.5*N + n + 1)."""
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 1                                                    # n = 4 foreground pixels of N = 16
    sharp = torch.stack([(target == 0).float(), (target == 1).float()], 1) * 50
    assert soft_dice_loss(sharp, target, IGNORE).item() == pytest.approx(0.0, abs=1e-6)
    flat = torch.zeros(1, 2, 4, 4)
    assert soft_dice_loss(flat, target, IGNORE).item() == pytest.approx(1 - (2 * 0.5 * 4 + 1) / (0.5 * 16 + 4 + 1))
