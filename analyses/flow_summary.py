"""A few numbers per run that say whether gradients reach the whole network.

(An earlier ``updatable_depth`` column, the layers whose mean |ΔW| reached 0.1 × the median layer's,
was dropped: it equalled the layer count in all 12 runs of the default sweep, so it separated nothing;
the two centre-to-end ratios below are what differ between runs.)
- ``centre_to_end_ratio``: mean update of the centre layers (stage ``centre``; for other models the
  middle layer(s)) over the mean update of the two end layers (first and last). The paper's effect:
  ≪ 1 without short skips, near 1 with them.
- ``centre_to_end_grad_ratio``: the same ratio for the gradient L2 norm, each layer's norm averaged
  geometrically over steps (gradients span orders of magnitude; an arithmetic mean would be the first
  few steps' value). A layer whose gradient norm is exactly 0 at any recorded step has geometric mean
  0, so one such step in a lone centre layer makes the ratio 0 (an end layer's: larger, or Inf).
- ``centre_zero_grad_steps``: the recorded steps at which some centre layer's gradient norm was
  exactly 0 (each one pulls ``centre_to_end_grad_ratio`` to 0). With
  an adaptive optimizer (RMSprop, Adam) a starved layer's tiny gradient is rescaled into an ordinary
  update, so the gradient ratio is where vanishing gradients show even when the update ratio does not.
- ``optimizer``: the optimizer class the Recorder recorded (blank when the store does not say): the
  update ratio means different things under SGD (|ΔW| ∝ gradient) and RMSprop (|ΔW| ≈ lr per step).
- ``nonfinite_values`` / ``nonfinite_steps`` / ``first_nonfinite_step`` / ``nonfinite_layers``:
  where NaN/Inf gradients appeared (from the step-level ``nonfinite`` counts).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from gradflow.analyses.runs import optimizer_of, run_attrs, runs, select_layers, step_chunks
from gradflow.models.naming import stage_of

COLUMNS = [
    "optimizer",
    "layers",
    "centre_to_end_ratio",
    "centre_to_end_grad_ratio",
    "centre_zero_grad_steps",
    "nonfinite_values",
    "nonfinite_steps",
    "first_nonfinite_step",
    "nonfinite_layers",
]


def _mean_update(ep: xr.Dataset | None, st: xr.Dataset | None, layers) -> xr.DataArray | None:
    """Per-layer update averaged over epochs (epoch group), else over steps; None when unrecorded."""
    if ep is not None and "update_mean_abs" in ep and ep.sizes["epoch"] > 0:
        da = select_layers(ep, layers)["update_mean_abs"]
        return da.mean("epoch", skipna=True)
    return _mean_over_steps(st, "update_mean_abs", layers)


def _mean_over_steps(st: xr.Dataset | None, name: str, layers, geometric: bool = False) -> xr.DataArray | None:
    """Per-layer mean of a step-level variable over all steps (non-finite values ignored).

    ``geometric``: exp(mean(log x)), for non-negative quantities spanning orders of magnitude; a
    layer whose value is 0 at some step gets 0.
    """
    if st is None or name not in st or st.sizes["step"] == 0:
        return None
    da = select_layers(st, layers)[name].transpose("step", "layer")
    total = np.zeros(da.sizes["layer"])
    count = np.zeros(da.sizes["layer"])
    for _, block in step_chunks(da):
        if geometric:
            with np.errstate(divide="ignore", invalid="ignore"):
                block = np.log(block)
            block[block == -np.inf] = -1e300  # log 0: keep it, so the mean says "reached 0"
        finite = np.isfinite(block)
        total += np.where(finite, block, 0.0).sum(axis=0)
        count += finite.sum(axis=0)
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return xr.DataArray(np.exp(mean) if geometric else mean, coords={"layer": da["layer"]})


def _centre_to_end(per_layer: xr.DataArray | None) -> float:
    """Mean over the centre layers divided by the mean over the first and last layer."""
    if per_layer is None or per_layer.sizes["layer"] == 0:
        return np.nan
    values = per_layer.values.astype(float)
    centre = values[_centre([str(n) for n in per_layer["layer"].values])]
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.mean(centre) / np.mean(values[[0, -1]]))


def _centre_zero_steps(st: xr.Dataset | None, layers) -> float:
    """The steps at which some centre layer's ``grad_norm`` is exactly 0; NaN when unrecorded."""
    if st is None or "grad_norm" not in st or st.sizes["step"] == 0:
        return np.nan
    da = select_layers(st, layers)["grad_norm"].transpose("step", "layer")
    if da.sizes["layer"] == 0:
        return np.nan
    centre = _centre([str(n) for n in da["layer"].values])
    return sum(int((block[:, centre] == 0).any(axis=1).sum()) for _, block in step_chunks(da))


def _centre(names: list[str]) -> list[int]:
    """Indices of the centre layers: stage ``centre`` if the model names one, else the middle one(s)."""
    centre = [i for i, name in enumerate(names) if stage_of(name) == "centre"]
    if centre:
        return centre
    n = len(names)
    return [n // 2] if n % 2 else [n // 2 - 1, n // 2]


def _nonfinite(st: xr.Dataset | None) -> dict:
    """Totals of the step-level ``nonfinite`` counts, block by block."""
    out = {"nonfinite_values": np.nan, "nonfinite_steps": np.nan, "first_nonfinite_step": np.nan}
    out["nonfinite_layers"] = ""
    if st is None or "nonfinite" not in st:
        return out
    da = select_layers(st, "all")["nonfinite"].transpose("step", "layer")  # layers in depth order
    per_layer = np.zeros(da.sizes["layer"])
    steps_hit: list[np.ndarray] = []
    for start, block in step_chunks(da):
        block = np.nan_to_num(block)
        per_layer += block.sum(axis=0)
        steps_hit.append(start + np.flatnonzero(block.sum(axis=1) > 0))
    hit = np.concatenate(steps_hit) if steps_hit else np.array([], dtype=int)
    out["nonfinite_values"] = int(per_layer.sum())
    out["nonfinite_steps"] = int(len(hit))
    if len(hit):
        out["first_nonfinite_step"] = int(st["step"].values[hit[0]])
        names = [str(n) for n in da["layer"].values[per_layer > 0]]
        out["nonfinite_layers"] = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
    return out


def flow_summary(data: xr.Dataset | xr.DataTree, layers: str | list[str] = "auto") -> pd.DataFrame:
    """One row per run (index ``run``) with the columns described in the module docstring."""
    if isinstance(data, xr.Dataset):
        epoch_runs = runs(data, "epoch") if "epoch" in data.dims else {}
        step_runs = runs(data, "step") if "step" in data.dims else {}
    else:
        epoch_runs, step_runs = runs(data, "epoch"), runs(data, "step")
    attrs = run_attrs(data)
    rows = []
    for name in dict.fromkeys([*epoch_runs, *step_runs]):
        ep, st = epoch_runs.get(name), step_runs.get(name)
        row = {"run": name, "optimizer": optimizer_of(attrs.get(name, {}))[0], "layers": 0}
        update = _mean_update(ep, st, layers)
        if update is not None and update.sizes["layer"] > 0:
            row["layers"] = int(update.sizes["layer"])
        row["centre_to_end_ratio"] = _centre_to_end(update)
        row["centre_to_end_grad_ratio"] = _centre_to_end(_mean_over_steps(st, "grad_norm", layers, geometric=True))
        row["centre_zero_grad_steps"] = _centre_zero_steps(st, layers)
        row.update(_nonfinite(st))
        rows.append(row)
    table = pd.DataFrame(rows, columns=["run", *COLUMNS])
    return table.astype({"centre_zero_grad_steps": "Int64", "nonfinite_values": "Int64", "nonfinite_steps": "Int64", "first_nonfinite_step": "Int64"}).set_index(
        "run"
    )
