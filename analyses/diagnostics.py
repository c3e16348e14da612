"""The diagnostics practitioners already look for, computed apart from drawn.

- **Update-to-weight ratio over steps** (:func:`update_ratio_curves`): ‖ΔW‖ / ‖W‖ per layer, log
  scale, with the common reference of ~1e-3 per step (CS231n's rule of thumb; a band of half a decade
  either side). Far below: the layer barely learns; far above: it is being rewritten every step.
- **Gradient-flow bars** (:func:`gradient_bars`): the classic per-layer bar chart of one step or
  epoch, the gradient's largest entry max |g| and its RMS ‖g‖₂ / √n. (The store keeps ‖g‖₂ and
  max |g|, not Σ|g|, so the "mean" bar is the RMS, which is ≥ mean |g|.)
- **Learning rate per step** (:func:`lr_curves`): each param group's rate as the optimizer used it
  (the store's ``lr`` step variable), so schedules show.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gradflow.analyses.heatmaps import heatmap_data, layer_axis
from gradflow.analyses.runs import runs, segment_mean, select_layers
from gradflow.errors import GradflowError

REFERENCE = 1e-3
REFERENCE_BAND = (10**-3.5, 10**-2.5)


def _pick_runs(data: xr.Dataset | xr.DataTree, run: str | None, level: str = "step") -> dict[str, xr.Dataset]:
    found = runs(data, level) if isinstance(data, xr.DataTree) or level in data.dims else {}
    if run is not None:
        if run not in found:
            raise GradflowError(f"no run {run!r} with {level}-level data (runs: {', '.join(found) or 'none'})")
        return {run: found[run]}
    return found


def update_ratio_data(data: xr.Dataset | xr.DataTree, layers: str | list[str] = "auto", module_type: str | None = None,
                      bins: int = 400) -> dict[str, xr.DataArray]:
    """``{run: DataArray (step, layer)}``: ‖ΔW‖/‖W‖ averaged over ``bins`` equal runs of steps
    (:func:`gradflow.analyses.heatmaps.heatmap_data` with ``stat="update_ratio", per="step"``)."""
    return heatmap_data(data, stat="update_ratio", per="step", layers=layers, bins=bins, module_type=module_type)


def update_ratio_curves(data: xr.Dataset | xr.DataTree, layers: str | list[str] = "auto",
                        module_type: str | None = None, bins: int = 400, max_runs: int = 12) -> Figure:
    """One panel per run (``ax.get_label()``): a line per layer (``get_label()`` = layer name, data =
    :func:`update_ratio_data`), coloured input (dark) → output (yellow), log y, the 1e-3 band shaded."""
    arrays = update_ratio_data(data, layers=layers, module_type=module_type, bins=bins)
    names = list(arrays)[:max_runs]
    ncols = min(len(names), 3)
    nrows = -(-len(names) // ncols)
    fig = Figure(figsize=(4.6 * ncols + 1.2, 3.0 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    cmap = matplotlib.colormaps["viridis"]
    for ax, name in zip(axes.ravel(), names):
        da = arrays[name]
        ax.set_label(name)
        n = da.sizes["layer"]
        ax.axhspan(*REFERENCE_BAND, color="0.85", zorder=0)
        ax.axhline(REFERENCE, color="0.5", linewidth=0.8, linestyle="--", zorder=0)
        for j in range(n):
            y = da.values[:, j]
            ax.plot(da["step"].values, np.where(y > 0, y, np.nan), color=cmap(j / max(n - 1, 1)),
                    linewidth=0.8, label=str(da["layer"].values[j]))
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="major")
    for ax in axes.ravel()[len(names):]:
        ax.remove()
    axes[0, 0].set_ylabel("‖ΔW‖ / ‖W‖ per step")
    mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=cmap)
    bar = fig.colorbar(mappable, ax=axes.ravel()[: len(names)].tolist(), ticks=[0, 1], fraction=0.04)
    bar.ax.set_yticklabels(["input", "output"])
    bar.set_label("layer")
    fig.suptitle(f"update-to-weight ratio (grey band: {REFERENCE:g} ± half a decade)", fontsize=9)
    return fig


def gradient_bar_data(data: xr.Dataset | xr.DataTree, run: str | None = None, step: int | None = None,
                      epoch: int | None = None, layers: str | list[str] = "auto",
                      module_type: str | None = None) -> pd.DataFrame:
    """Per layer (index ``layer``, input → output): ``module_type``, ``rms_grad`` = ‖g‖₂ / √numel and
    ``max_abs_grad`` = max |g| at recorded ``step`` (default: the last one), or over the steps of
    ``epoch`` (mean of the RMS, max of the max; non-finite values ignored). ``run`` picks one run of a
    sweep (default: the first). Gradient units. Errors: unknown run, step or epoch."""
    if step is not None and epoch is not None:
        raise GradflowError("give a step or an epoch, not both")
    found = _pick_runs(data, run)
    if not found:
        raise GradflowError("no step-level data in the store")
    ds = select_layers(next(iter(found.values())), layers, module_type)
    if ds.sizes["step"] == 0:
        raise GradflowError("no recorded step yet")
    size = np.sqrt(ds["num_params"].values.astype(float)) if "num_params" in ds.coords else np.nan
    if epoch is None:
        steps = ds["step"].values
        step = int(steps[-1]) if step is None else step
        if step not in steps:
            raise GradflowError(f"step {step} was not recorded (recorded: {steps[0]}..{steps[-1]}, every "
                                f"{ds.attrs.get('every', 1)})")
        row = ds.sel(step=step)
        rms, largest = row["grad_norm"].values / size, row["grad_max_abs"].values
    else:
        if "epoch" not in ds.coords or epoch not in ds["epoch"].values:
            raise GradflowError(f"epoch {epoch} has no recorded step")
        part = ds.isel(step=np.flatnonzero(ds["epoch"].values == epoch))
        _, norms = segment_mean(part["grad_norm"], np.zeros(part.sizes["step"]))
        rms = norms[0] / size
        largest = np.nanmax(np.where(np.isfinite(part["grad_max_abs"].values), part["grad_max_abs"].values, np.nan),
                            axis=0)
    table = pd.DataFrame({"layer": [str(n) for n in ds["layer"].values],
                          "module_type": [str(t) for t in ds["module_type"].values] if "module_type" in ds.coords else "",
                          "rms_grad": rms.astype(float), "max_abs_grad": np.asarray(largest, dtype=float)})
    table.attrs["when"] = f"epoch {epoch}" if epoch is not None else f"step {step}"
    return table.set_index("layer")


def gradient_bars(data: xr.Dataset | xr.DataTree, run: str | None = None, step: int | None = None,
                  epoch: int | None = None, layers: str | list[str] = "auto", module_type: str | None = None) -> Figure:
    """The classic gradient-flow bar chart of :func:`gradient_bar_data`: per layer a light bar for
    max |g| (``ax.containers[0]``) and a dark one for the RMS (``ax.containers[1]``), log y."""
    table = gradient_bar_data(data, run, step, epoch, layers, module_type)
    names = list(table.index)
    fig = Figure(figsize=(min(16, 3 + 0.18 * len(names)), 4.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    ax.bar(x, table["max_abs_grad"].values, width=0.9, color="#9ecae1", label="max |g|")
    ax.bar(x, table["rms_grad"].values, width=0.5, color="#08519c", label="RMS ‖g‖₂/√n")
    ax.set_yscale("log")
    axis = layer_axis(names)
    ax.set_xticks(axis.ticks, axis.labels, rotation=90, fontsize=6 if len(axis.labels) > 16 else 7)
    for sep in axis.separators:
        ax.axvline(sep, color="0.8", linewidth=0.6)
    ax.set_xlim(-0.6, len(names) - 0.4)
    run_name = run or next(iter(_pick_runs(data, None)))
    ax.set_title(f"gradient per layer, {table.attrs['when']} ({run_name})", fontsize=9)
    ax.set_ylabel("gradient")
    ax.set_xlabel("layer (input → output)")
    ax.legend(fontsize=8)
    return fig


def lr_data(data: xr.Dataset | xr.DataTree) -> dict[str, xr.DataArray]:
    """``{run: DataArray (step, param_group)}`` of the recorded learning rates (runs without ``lr``,
    from stores written before it was recorded, are left out)."""
    return {name: ds["lr"] for name, ds in _pick_runs(data, None).items() if "lr" in ds and ds.sizes["step"] > 0}


def lr_curves(data: xr.Dataset | xr.DataTree, max_runs: int = 12) -> Figure:
    """Learning rate against step, a line per run and param group (``get_label()`` = ``run: group``)."""
    arrays = lr_data(data)
    if not arrays:
        raise GradflowError("no learning rate recorded in the store (stores from before gradflow recorded lr)")
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax = fig.subplots()
    for name, da in list(arrays.items())[:max_runs]:
        for j, group in enumerate(da["param_group"].values):
            label = f"{name}: {group}" if len(arrays) > 1 else str(group)
            ax.plot(da["step"].values, da.values[:, j], label=label, linewidth=1)
    values = np.concatenate([da.values.ravel() for da in arrays.values()])
    values = values[np.isfinite(values)]  # all NaN: a plain axis, no log scale (and no warning)
    if len(values) and np.all(values > 0) and values.max() > 20 * values.min():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig
