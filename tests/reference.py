"""Test reference: a layer's recorder figures computed from first principles (numpy, float64).

Tests compare the Recorder with this, computed from weights and gradients they saved themselves,
never with gradflow's own code. Importable from any test (``pythonpath = ["tests"]`` in pyproject).
"""

import numpy as np


def layer_reference(grad, before, after, names: list[str], owned: bool = True) -> dict[str, float]:
    """One layer's step figures from raw tensors, in float64 (gradients that are None are left out).

    ``owned=False``: a layer no optimizer owns at that step: NaN gradient figures, parameter norm and
    update ratio; the update figures of its (unchanged) weights.
    """
    present = [grad[n].ravel() for n in names if grad is not None and grad[n] is not None]
    w0 = np.concatenate([before[n].ravel() for n in names])
    w1 = np.concatenate([after[n].ravel() for n in names])
    d = w1 - w0
    with np.errstate(divide="ignore", invalid="ignore"):  # zero-initialised biases: ratio inf/NaN
        ratio = np.sqrt(np.sum(d**2)) / np.sqrt(np.sum(w0**2))
    out = {"update_norm": np.sqrt(np.sum(d**2)), "update_mean_abs": np.sum(np.abs(d)) / d.size,
           "update_max_abs": np.max(np.abs(d)), "param_norm": np.sqrt(np.sum(w1**2)),
           "update_ratio": ratio}
    if present:
        g = np.concatenate(present)
        out.update(grad_norm=np.sqrt(np.sum(g**2)), grad_max_abs=np.max(np.abs(g)),
                   nonfinite=float(np.sum(~np.isfinite(g))))
    else:
        out.update(grad_norm=np.nan, grad_max_abs=np.nan, nonfinite=np.nan)
    if not owned:
        out.update(grad_norm=np.nan, grad_max_abs=np.nan, nonfinite=np.nan, param_norm=np.nan,
                   update_ratio=np.nan)
    return out
