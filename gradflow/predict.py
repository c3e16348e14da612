"""Test-time dropout averaging: the mean sigmoid probability of N stochastic forward passes.

Drozdzal et al. 2016 average the outputs of several forward passes with dropout left on (Monte
Carlo dropout) to get smoother membrane probabilities. During those passes only the dropout
layers sample; batch norm stays in eval mode and uses its running statistics, so the passes differ
by the dropout masks alone. Dropout draws from the global torch RNG: seed it (``torch.manual_seed``)
for reproducible predictions.
"""

from __future__ import annotations

import torch
from torch import nn

from gradflow.errors import GradflowError

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, passes: int = 1,
            batch_size: int | None = None) -> torch.Tensor:
    """Mean membrane probability sigmoid(model(images)) over ``passes`` dropout samples.

    ``images``: (N, 1, H, W) float tensor on any device; the result has the same shape, float32,
    on the images' device. ``passes=1``, or a model without dropout, is one plain eval-mode pass.
    ``batch_size``: images per forward pass (``None``: all at once). The model's train/eval flags
    are restored afterwards.
    """
    if not isinstance(passes, int) or isinstance(passes, bool) or passes < 1:
        raise GradflowError(f"passes must be a positive integer, got {passes!r}")
    if batch_size is not None and batch_size < 1:
        raise GradflowError(f"batch_size must be a positive integer, got {batch_size!r}")
    dropouts = [m for m in model.modules() if isinstance(m, DROPOUT_TYPES)]
    if not dropouts:
        passes = 1
    device = next(model.parameters()).device
    modes = {module: module.training for module in model.modules()}
    model.eval()
    if passes > 1:
        for module in dropouts:
            module.train()
    try:
        chunks = []
        for batch in images.split(batch_size or max(len(images), 1)):
            batch = batch.to(device)
            total = torch.sigmoid(model(batch).float())
            for _ in range(passes - 1):
                total += torch.sigmoid(model(batch).float())
            chunks.append((total / passes).to(images.device))
        return torch.cat(chunks)
    finally:
        for module, training in modes.items():
            module.training = training
