"""`load_data`: the train/validation tensors every experiment starts from.

Images come out standardised per image (zero mean, unit standard deviation over each returned
size×size image, i.e. over each tile for ISBI), labels as membrane = 1.0, cell = 0.0. The image split
is seeded and recorded in `EMData.split`, so a run's store can say exactly which slices it saw.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradflow.data.isbi import load_isbi
from gradflow.data.synthetic import synthetic_em
from gradflow.errors import GradflowError

MIN_SIZE = 8  # px; smaller images cannot hold a cell and its walls


@dataclass
class EMData:
    """Train and validation images (N, 1, size, size) float32 and membrane labels (same shape, 0/1)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    source: str
    split: dict

    def __repr__(self) -> str:
        return (f"EMData(source={self.source!r}, train={tuple(self.train_images.shape)}, "
                f"val={tuple(self.val_images.shape)}, membrane_fraction={self.train_labels.mean().item():.3f})")


def load_data(source: str | Path = "synthetic", size: int = 128, seed: int = 0,
              n_train: int = 25, n_val: int = 5, side_step: int = 1) -> EMData:
    """Synthetic EM images (`source="synthetic"`) or the ISBI 2012 training slices in folder `source`.

    Synthetic: n_train + n_val images of size×size from `synthetic_em(seed=seed)`.
    ISBI: n_train + n_val of the slices, drawn with `seed`; each slice is cut into non-overlapping
    size×size tiles (size must divide the slice), tiles of a training slice only in training: n_train
    slices give n_train·(H/size)·(W/size) training tiles, e.g. 24 × (512/128)² = 384 for ISBI 2012.
    ``side_step``: what size must also be a multiple of for the model (2**levels), so that the error
    for a size that does not divide the slices suggests only sizes the model takes.

    Raises:
        GradflowError: n_train < 1 or n_val < 0; size below 8; more slices asked for than the folder
            holds; a size that does not divide the slices (naming the sizes that do).
    """
    if n_train < 1 or n_val < 0:
        raise GradflowError(f"need n_train >= 1 and n_val >= 0, got n_train={n_train}, n_val={n_val}")
    if size < MIN_SIZE:
        raise GradflowError(f"image size {size} is too small; use at least {MIN_SIZE}")
    if str(source) == "synthetic":
        images, labels = synthetic_em(n_train + n_val, size, seed)
        names = [f"synthetic[{i}]" for i in range(n_train + n_val)]
        train_index, val_index = list(range(n_train)), list(range(n_train, n_train + n_val))
    else:
        images, labels, names = load_isbi(source)
        if n_train + n_val > len(images):
            raise GradflowError(f"n_train + n_val = {n_train + n_val} but '{source}' has only {len(images)} images")
        height, width = images.shape[1:]
        if height % size or width % size:
            sizes = [d for d in range(MIN_SIZE, min(height, width) + 1)
                     if height % d == 0 and width % d == 0 and d % side_step == 0]
            hint = (f"use one of {sizes}" if sizes else
                    f"no size does at 2**levels = {side_step}: use fewer levels")
            raise GradflowError(f"size {size} does not divide the {height}×{width} ISBI images; {hint}")
        order = np.random.default_rng(seed).permutation(len(images))
        train_index, val_index = sorted(order[:n_train].tolist()), sorted(order[n_train:n_train + n_val].tolist())
    split = {
        "seed": seed,
        "train": [names[i] for i in train_index],
        "val": [names[i] for i in val_index],
        "train_index": train_index,
        "val_index": val_index,
        "tiles_per_image": (images.shape[1] // size) * (images.shape[2] // size),
    }
    return EMData(
        train_images=standardise(tiles(images[train_index], size)),
        train_labels=torch.from_numpy(tiles(labels[train_index], size).astype(np.float32)),
        val_images=standardise(tiles(images[val_index], size)),
        val_labels=torch.from_numpy(tiles(labels[val_index], size).astype(np.float32)),
        source=str(source),
        split=split,
    )


def tiles(stack: np.ndarray, size: int) -> np.ndarray:
    """Cut (N, H, W) into non-overlapping tiles (N·H/size·W/size, 1, size, size), image by image, rows first."""
    n, height, width = stack.shape
    grid = stack.reshape(n, height // size, size, width // size, size).transpose(0, 1, 3, 2, 4)
    return grid.reshape(-1, 1, size, size)


def standardise(images: np.ndarray) -> torch.Tensor:
    """Zero mean, unit standard deviation per image (a constant image becomes all zeros)."""
    x = torch.from_numpy(images.astype(np.float32))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True, correction=0)
    return (x - mean) / std.clamp_min(1e-6)
