"""Training losses on logits: binary cross-entropy and the paper's Dice loss.

Both take raw logits (N, 1, H, W) and a binary target of the same shape (membrane = 1, cell = 0 in
the gradflow data loaders) and return a scalar tensor. Both are computed in float32 even under
autocast, so a float16 forward pass cannot overflow the sums (a 4 x 128 x 128 batch already sums to
more than float16's 65504).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from gradflow.errors import GradflowError

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DICE_MIN_DENOMINATOR = 1e-6
"""Floor for sum(o) + sum(y) in the Dice loss: only reached when the target is empty *and* every
sigmoid output underflows to 0, where the loss is then 0 instead of 0/0 = NaN."""


def _check_shapes(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise GradflowError(f"logits and target must have the same shape, got {tuple(logits.shape)} "
                            f"and {tuple(target.shape)}")


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over all pixels, -[y log s(x) + (1 - y) log(1 - s(x))], from logits
    (numerically stable log-sigmoid form)."""
    _check_shapes(logits, target)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Drozdzal et al. 2016's Dice loss L = -2 sum(o y) / (sum(o) + sum(y)), o = sigmoid(logits).

    Sums run over the whole batch (every pixel of every image), as in the paper's formula. The value
    lies in [-1, 0]: -1 for a perfect (binary) overlap, 0 for none. An empty target gives 0 with a
    finite (zero) gradient; the denominator is floored at ``DICE_MIN_DENOMINATOR`` so that the one
    0/0 case (empty target and all outputs underflowed to 0) is 0 too.
    """
    _check_shapes(logits, target)
    output = torch.sigmoid(logits.float())
    target = target.float()
    overlap = (output * target).sum()
    denominator = (output.sum() + target.sum()).clamp_min(DICE_MIN_DENOMINATOR)
    return -2.0 * overlap / denominator


LOSSES: dict[str, Loss] = {"bce": bce_loss, "dice": dice_loss}


def get_loss(name: str) -> Loss:
    """The loss function called ``name`` ("bce" or "dice")."""
    try:
        return LOSSES[name]
    except KeyError:
        raise GradflowError(f"unknown loss {name!r}; choose one of {', '.join(map(repr, LOSSES))}") from None
