"""Shared test reference: per-layer recorder figures computed from first principles.

Tests that check the Recorder against weights and gradients they saved themselves (compiled, CUDA,
distributed runs) compare with :func:`layer_reference`, computed in float64 with numpy, never with
gradflow's own code.
"""

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def layer_reference(grads: dict, before: dict, after: dict, names: list[str]) -> dict[str, float]:
    """The eight step figures of one layer made of the tensors ``names`` (dicts name → array)."""
    grad = np.concatenate([np.asarray(grads[n]).ravel() for n in names]).astype(np.float64)
    w0 = np.concatenate([np.asarray(before[n]).ravel() for n in names]).astype(np.float64)
    w1 = np.concatenate([np.asarray(after[n]).ravel() for n in names]).astype(np.float64)
    update = w1 - w0
    return {
        "grad_norm": np.sqrt(np.sum(grad**2)),
        "grad_max_abs": np.max(np.abs(grad)),
        "nonfinite": float(np.sum(~np.isfinite(grad))),
        "update_norm": np.sqrt(np.sum(update**2)),
        "update_mean_abs": np.sum(np.abs(update)) / update.size,
        "update_max_abs": np.max(np.abs(update)),
        "param_norm": np.sqrt(np.sum(w1**2)),
        "update_ratio": np.sqrt(np.sum(update**2)) / np.sqrt(np.sum(w0**2)),
    }


@pytest.fixture
def reference():
    """:func:`layer_reference`, for tests (conftest modules are not importable by name)."""
    return layer_reference


def find_isbi() -> Path | None:
    """The ISBI 2012 folder: $GRADFLOW_ISBI, else ``shared/data/isbi2012`` in or beside the repo."""
    candidates = [os.environ.get("GRADFLOW_ISBI"), REPO / "shared/data/isbi2012",
                  REPO.parent / "shared/data/isbi2012"]
    return next((Path(p) for p in candidates if p and (Path(p) / "labels").is_dir()), None)


@pytest.fixture
def isbi_dir() -> Path:
    """The real ISBI 2012 data (never copied into the repo); the test skips cleanly without it."""
    path = find_isbi()
    if path is None:
        pytest.skip("ISBI 2012 data not present (set GRADFLOW_ISBI or put it in ../shared/data)")
    return path
