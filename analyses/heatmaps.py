"""Fig. 4 of Drozdzal et al. 2016: where in the network the weights move, epoch by epoch.

One panel per run: layers left to right in input-to-output order (labelled encoder / centre /
decoder), epochs (or binned steps) bottom to top, colour = the chosen statistic on a log scale. All
panels share one colour scale, so a starved centre in one variant reads as dark against a bright
centre in its neighbour. The default statistic, ``update_mean_abs`` per epoch, is the paper's
mean |W_end − W_start| over each epoch, read from the store's ``epochs`` group.
"""

from __future__ import annotations


import matplotlib
import numpy as np
import xarray as xr
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analyses.runs import runs, segment_mean, select_layers, stages
from gradflow.errors import GradflowError
from gradflow.summary import read_steps

PER = ("epoch", "step")
LABELS = {
    "update_mean_abs": "mean |ΔW|",
    "update_norm": "‖ΔW‖₂",
    "update_max_abs": "max |ΔW|",
    "update_ratio": "‖ΔW‖ / ‖W‖",
    "grad_norm": "‖∇W‖₂",
    "grad_max_abs": "max |∇W|",
    "param_norm": "‖W‖₂",
    "nonfinite": "non-finite gradient values",
}


def _levels(data: xr.Dataset | xr.DataTree) -> tuple[dict[str, xr.Dataset], dict[str, xr.Dataset]]:
    """(epoch-level runs, step-level runs); a bare Dataset fills only the level it has."""
    if isinstance(data, xr.Dataset):
        return (runs(data, "epoch") if "epoch" in data.dims else {}), (
            runs(data, "step") if "step" in data.dims else {}
        )
    return runs(data, "epoch"), runs(data, "step")


def _step_bins(ds: xr.Dataset, stat: str, bins: int) -> xr.DataArray:
    """Mean of ``stat`` over ``bins`` equal runs of recorded steps; ``step`` = first step of each bin."""
    n = ds.sizes["step"]
    n_bins = max(1, min(bins, n))
    labels = (np.arange(n) * n_bins) // max(n, 1)
    keys, means = segment_mean(ds[stat], labels)
    steps = ds["step"].values
    first = np.searchsorted(labels, keys, side="left")
    last = np.searchsorted(labels, keys, side="right") - 1
    return xr.DataArray(
        means,
        dims=("step", "layer"),
        coords={"step": steps[first], "step_end": ("step", steps[last] + 1), "layer": ds["layer"].values},
        name=stat,
    )


def _summary_bins(data: xr.Dataset | xr.DataTree, name: str, stat: str, layers, bins: int) -> xr.DataArray | None:
    """Bin means from the run's step summary (:mod:`gradflow.summary`); None without enough summary blocks."""
    if not isinstance(data, xr.DataTree):
        return None
    binned = read_steps(data if name == "run" else data[name], bins, [stat], raw_fallback=False)
    if binned is None:
        return None
    return select_layers(binned, layers)[stat].sel(stat="mean", drop=True)


def heatmap_data(
    data: xr.Dataset | xr.DataTree,
    stat: str = "update_mean_abs",
    per: str = "epoch",
    layers: str | list[str] = "auto",
    bins: int = 200,
) -> dict[str, xr.DataArray]:
    """The arrays :func:`heatmaps` draws: ``{run: DataArray (epoch|step, layer)}``.

    ``per="epoch"`` takes ``stat`` from the epoch group when it is there (``update_mean_abs``,
    ``update_norm``), otherwise averages the step-level ``stat`` over each epoch's steps.
    ``per="step"`` averages the step-level ``stat`` over ``bins`` equal runs of steps (a 10⁵-step
    store becomes ``bins`` rows, read block by block); a run with a step summary of at least ``bins``
    blocks is read from it instead (bins of whole blocks, :func:`gradflow.summary.read_steps`).
    Non-finite values are ignored in means.
    """
    if per not in PER:
        raise GradflowError(f"per must be one of {', '.join(PER)}, got {per!r}")
    epoch_runs, step_runs = _levels(data)
    out: dict[str, xr.DataArray] = {}
    for name in dict.fromkeys([*epoch_runs, *step_runs]):
        ep, st = epoch_runs.get(name), step_runs.get(name)
        if per == "epoch" and ep is not None and stat in ep:
            out[name] = select_layers(ep, layers)[stat].transpose("epoch", "layer")
        elif st is not None and stat in st and st.sizes["step"] > 0:
            st = select_layers(st, layers)
            if per == "step":
                binned = _summary_bins(data, name, stat, layers, bins)
                out[name] = binned if binned is not None else _step_bins(st, stat, bins)
            elif "epoch" in st.coords:
                keys, means = segment_mean(st[stat], st["epoch"].values)
                out[name] = xr.DataArray(
                    means, dims=("epoch", "layer"), coords={"epoch": keys, "layer": st["layer"].values}, name=stat
                )
    out = {name: da for name, da in out.items() if da.sizes[da.dims[0]] > 0}
    if not out:
        names = sorted({v for ds in [*epoch_runs.values(), *step_runs.values()] for v in ds.data_vars})
        raise GradflowError(f"no {per}-level variable {stat!r} in the store (it has: {', '.join(names) or 'nothing'})")
    return out


def _edges(centres: np.ndarray, ends: np.ndarray | None = None) -> np.ndarray:
    """Cell edges along y: epochs are unit cells around their index; step bins span [first, end)."""
    if ends is not None:
        return np.r_[centres, ends[-1]].astype(float)
    return np.r_[centres - 0.5, centres[-1] + 0.5].astype(float)


def heatmaps(
    data: xr.Dataset | xr.DataTree,
    stat: str = "update_mean_abs",
    per: str = "epoch",
    layers: str | list[str] = "auto",
    bins: int = 200,
    log: bool | None = None,
    ncols: int | None = None,
    grid: list[list[str | None]] | None = None,
) -> Figure:
    """Fig. 4-style grid of layer × epoch (or step) heatmaps, one panel per run, one colour scale.

    Panels are titled with the run name; each panel's ``collections[0].get_array()`` is the plotted
    (time, layer) array, exactly :func:`heatmap_data`'s values. ``log`` defaults to a log colour scale
    for every statistic except the ``nonfinite`` counts; zero or negative cells show grey.
    Panels fill ``ncols`` columns (default 2) in run order, or sit where ``grid`` (rows of run names,
    e.g. :func:`analyses.panel_grid.panel_grid`) puts them; a named run without data leaves its cell empty.
    """
    arrays = heatmap_data(data, stat=stat, per=per, layers=layers, bins=bins)
    if grid is not None:
        left_out = sorted(set(arrays) - {name for row in grid for name in row})
        if left_out:
            raise GradflowError(f"the panel grid leaves out run(s) {', '.join(left_out)}")
    log = stat != "nonfinite" if log is None else log
    values = np.concatenate([np.ravel(da.values) for da in arrays.values()])
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if log and positive.size:
        norm = LogNorm(vmin=positive.min(), vmax=max(positive.max(), positive.min() * (1 + 1e-6)))
    else:
        norm = Normalize(vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 1)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")

    if grid is None:
        ncols = ncols or min(len(arrays), 2)
        names = list(arrays)
        grid = [names[i : i + ncols] for i in range(0, len(names), ncols)]
    nrows, ncols = len(grid), max(len(row) for row in grid)
    fig = Figure(figsize=(5.2 * ncols + 1.0, 2.6 * nrows + 0.6), layout="constrained")
    cells = fig.subplots(nrows, ncols, squeeze=False)
    placed = {name: cells[r, c] for r, row in enumerate(grid) for c, name in enumerate(row) if name in arrays}
    mesh = None
    for name, ax in placed.items():
        da = arrays[name]
        time = da.dims[0]
        ends = da["step_end"].values if "step_end" in da.coords else None
        x = np.arange(da.sizes["layer"] + 1) - 0.5
        mesh = ax.pcolormesh(x, _edges(da[time].values, ends), da.values, norm=norm, cmap=cmap)
        names = [str(n) for n in da["layer"].values]
        runs_of_stage = stages(names, fold_skips=True)
        if any(stage != "other" for stage, _, _ in runs_of_stage):
            ax.set_xticks([(a + b - 1) / 2 for _, a, b in runs_of_stage], [s for s, _, _ in runs_of_stage])
            for _, a, _ in runs_of_stage[1:]:
                ax.axvline(a - 0.5, color="white", linewidth=0.8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("layer (input → output)", fontsize=8)
        ax.set_ylabel(time, fontsize=8)
        ax.tick_params(labelsize=7)
    used = list(placed.values())
    for ax in cells.ravel():
        if not any(ax is u for u in used):
            ax.remove()
    label = f"{LABELS.get(stat, stat)} per {per}" + (" (log)" if isinstance(norm, LogNorm) else "")
    fig.colorbar(mesh, ax=used, label=label, fraction=0.15 / max(1, nrows / 3), aspect=20 * max(1, nrows / 3))
    return fig
