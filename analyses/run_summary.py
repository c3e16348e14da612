"""What a generic report says about any Recorder store: where the updates go, non-finite events,
the largest and smallest update ratios. One run (a step-level Dataset) in, a DataFrame out; step
arrays are read block by block.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from gradflow.analyses.runs import layer_groups, select_layers, step_chunks


def _per_layer_sum(da: xr.DataArray, transform=None) -> tuple[np.ndarray, np.ndarray]:
    """(sum over steps of finite values, count of finite values) per layer."""
    total = np.zeros(da.sizes["layer"])
    count = np.zeros(da.sizes["layer"])
    for _, block in step_chunks(da.transpose("step", "layer")):
        if transform is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                block = transform(block)
        finite = np.isfinite(block)
        total += np.where(finite, block, 0.0).sum(axis=0)
        count += finite.sum(axis=0)
    return total, count


def update_shares(st: xr.Dataset, layers: str | list[str] = "all") -> pd.DataFrame:
    """Where the updates go: per module-prefix group (:func:`gradflow.analyses.runs.layer_groups`, input → output),
    its ``layers``, its ``share`` of Σ over steps and layers of ‖ΔW‖² (the squared length of the whole
    trajectory's steps, so shares add up to 1), and its share of the parameters ``param_share``."""
    st = select_layers(st, layers)
    sq, _ = _per_layer_sum(st["update_norm"], np.square)
    names = [str(n) for n in st["layer"].values]
    params = st["num_params"].values.astype(float) if "num_params" in st.coords else np.ones(len(names))
    rows = []
    for group, a, b in layer_groups(names):
        rows.append({"group": group, "layers": b - a, "share": sq[a:b].sum() / sq.sum() if sq.sum() > 0 else np.nan,
                     "param_share": params[a:b].sum() / params.sum()})
    return pd.DataFrame(rows).set_index("group")


def nonfinite_events(st: xr.Dataset, limit: int = 20) -> tuple[pd.DataFrame, int]:
    """(the first ``limit`` (step, layer) cells with NaN/Inf gradient values, in step then depth order,
    columns ``step``, ``epoch``, ``layer``, ``module_type``, ``values``; the total number of such cells)."""
    st = select_layers(st, "all")
    rows, total = [], 0
    names = [str(n) for n in st["layer"].values]
    types = [str(t) for t in st["module_type"].values] if "module_type" in st.coords else [""] * len(names)
    if "nonfinite" not in st:
        return pd.DataFrame(columns=["step", "epoch", "layer", "module_type", "values"]), 0
    for start, block in step_chunks(st["nonfinite"].transpose("step", "layer")):
        hits = np.argwhere(np.nan_to_num(block) > 0)
        total += len(hits)
        for i, j in hits[: max(0, limit - len(rows))]:
            position = start + int(i)
            rows.append({"step": int(st["step"].values[position]),
                         "epoch": int(st["epoch"].values[position]) if "epoch" in st.coords else np.nan,
                         "layer": names[j], "module_type": types[j], "values": int(block[i, j])})
    return pd.DataFrame(rows, columns=["step", "epoch", "layer", "module_type", "values"]), total


def update_ratio_extremes(st: xr.Dataset, n: int = 5, layers: str | list[str] = "all") -> pd.DataFrame:
    """The ``n`` layers with the largest and the ``n`` with the smallest typical update ratio: the
    geometric mean over steps of ‖ΔW‖ / ‖W‖ (steps where it is 0, NaN or Inf left out), with the
    ``steps`` it is over. Rows ordered largest first; column ``rank`` says ``largest`` / ``smallest``."""
    st = select_layers(st, layers)
    logs, count = _per_layer_sum(st["update_ratio"], np.log)
    with np.errstate(invalid="ignore", divide="ignore"):
        typical = np.where(count > 0, np.exp(logs / np.maximum(count, 1)), np.nan)
    table = pd.DataFrame({"layer": [str(x) for x in st["layer"].values],
                          "module_type": [str(t) for t in st["module_type"].values] if "module_type" in st.coords else "",
                          "update_ratio": typical, "steps": count.astype(int)})
    table = table.dropna(subset=["update_ratio"]).sort_values("update_ratio", ascending=False)
    top = table.head(n).assign(rank="largest")
    bottom = table.tail(min(n, max(0, len(table) - n))).assign(rank="smallest")
    return pd.concat([top, bottom]).set_index("layer")
