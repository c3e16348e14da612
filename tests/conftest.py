"""Shared test reference: per-layer recorder figures computed from first principles.

Tests that check the Recorder against weights and gradients they saved themselves (compiled, CUDA,
distributed runs) compare with :func:`layer_reference`, computed in float64 with numpy, never with
gradflow's own code.
"""

import numpy as np
import pytest


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
