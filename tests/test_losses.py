"""BCE and Dice losses against the formulas evaluated by hand / in float64 numpy."""

from math import log

import numpy as np
import pytest
import torch

from gradflow.errors import GradflowError
from gradflow.losses import bce_loss, dice_loss, get_loss


def test_bce_matches_the_formula_in_numpy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 4, 4, generator=generator) * 3
    target = (torch.rand(2, 1, 4, 4, generator=generator) > 0.5).float()
    x, y = logits.double().numpy(), target.double().numpy()
    sigmoid = 1 / (1 + np.exp(-x))
    expected = np.mean(-(y * np.log(sigmoid) + (1 - y) * np.log(1 - sigmoid)))
    assert bce_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_bce_by_hand():
    # logits 0 and ln 3: sigmoid 1/2 and 3/4; targets 1 and 0 -> (-ln 1/2 - ln 1/4) / 2 = 1.5 ln 2.
    logits = torch.tensor([0.0, log(3)])
    assert bce_loss(logits, torch.tensor([1.0, 0.0])).item() == pytest.approx(1.5 * log(2), rel=1e-6)


def test_dice_by_hand():
    # o = [1/2, 3/4], y = [1, 0]: sum(o y) = 1/2, sum(o) + sum(y) = 5/4 + 1 -> -2 (1/2) / (9/4) = -4/9.
    assert dice_loss(torch.tensor([0.0, log(3)]), torch.tensor([1.0, 0.0])).item() == pytest.approx(-4 / 9)
    # o = [3/4, 1/4, 1/2, 1/2], y = [1, 0, 1, 0]: sum(o y) = 5/4, sum(o) = 2, sum(y) = 2 -> -5/8.
    logits = torch.tensor([[log(3), -log(3)], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).reshape(1, 1, 2, 2)
    assert dice_loss(logits, target).item() == pytest.approx(-5 / 8)


def test_dice_sums_over_the_whole_batch():
    # Image 1: o = [1/2], y = [1]; image 2: o = [3/4], y = [0]: one sum, -4/9, not a per-image mean.
    logits = torch.tensor([0.0, log(3)]).reshape(2, 1, 1, 1)
    target = torch.tensor([1.0, 0.0]).reshape(2, 1, 1, 1)
    assert dice_loss(logits, target).item() == pytest.approx(-4 / 9)


def test_dice_gradient_matches_the_hand_derivative():
    # dL/do_k = -2 y_k / D + 2 S / D^2 with S = sum(o y), D = sum(o) + sum(y); do/dx = o (1 - o).
    logits = torch.tensor([0.3, -1.2, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    dice_loss(logits, target).backward()
    o = 1 / (1 + np.exp(-logits.detach().numpy()))
    y = target.numpy()
    s, d = np.sum(o * y), np.sum(o) + np.sum(y)
    expected = (-2 * y / d + 2 * s / d**2) * o * (1 - o)
    np.testing.assert_allclose(logits.grad.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 200.0])
def test_empty_masks_give_finite_values_and_gradients(scale):
    # scale 200: every sigmoid underflows to 0 in float32, the 0/0 case of the Dice formula.
    logits = (-scale * torch.ones(2, 1, 4, 4)).requires_grad_()
    empty = torch.zeros(2, 1, 4, 4)
    for loss_fn in (bce_loss, dice_loss):
        logits.grad = None
        loss = loss_fn(logits, empty)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert dice_loss(logits, empty).item() == 0.0


def test_dice_stays_in_minus_one_to_zero():
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        logits = torch.randn(2, 1, 8, 8, generator=generator) * 10
        target = (torch.rand(2, 1, 8, 8, generator=generator) > 0.7).float()
        assert -1.0 <= dice_loss(logits, target).item() <= 0.0
    target = (torch.rand(2, 1, 8, 8, generator=generator) > 0.5).float()
    assert dice_loss(40 * (2 * target - 1), target).item() == pytest.approx(-1.0)  # perfect overlap


def test_half_precision_logits_do_not_overflow_the_sums():
    logits = torch.full((4, 1, 128, 128), 5.0, dtype=torch.float16)  # sum(o) > 65504 (float16 max)
    target = torch.ones(4, 1, 128, 128, dtype=torch.float16)
    o = 1 / (1 + np.exp(-5.0))
    n = logits.numel()
    assert dice_loss(logits, target).item() == pytest.approx(-2 * o * n / (o * n + n), rel=1e-5)
    assert bce_loss(logits, target).item() == pytest.approx(-log(o), rel=1e-3)


def test_get_loss_and_user_mistakes():
    assert get_loss("bce") is bce_loss and get_loss("dice") is dice_loss
    with pytest.raises(GradflowError, match="unknown loss 'focal'"):
        get_loss("focal")
    for loss_fn in (bce_loss, dice_loss):
        with pytest.raises(GradflowError, match="same shape"):
            loss_fn(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
