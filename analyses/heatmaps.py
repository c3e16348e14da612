"""Where in the network the weights move, epoch by epoch (Fig. 4 of Drozdzal et al. 2016), for any model.

One panel per run: layers left to right in input-to-output order, epochs (or binned steps) bottom to
top, colour = the chosen statistic on a log scale. All panels share one colour scale, so a starved
centre in one variant reads as dark against a bright centre in its neighbour. The default statistic,
``update_mean_abs`` per epoch, is the paper's mean |W_end − W_start| over each epoch, read from the
store's ``epochs`` group.

Computing (:func:`heatmap_data`) is apart from drawing (:func:`heatmaps`). Three cell states are
never folded into the colour scale, and are drawn in their own colours on top of it:

- **non-finite** (red): some recorded step of the cell had a NaN/Inf gradient in that layer: the
  store's ``nonfinite`` count > 0, the only record of one. Binning never averages it away: a cell is
  marked when *any* of its steps is.
- **no update** (white): the statistic is exactly 0 (e.g. a frozen layer's |ΔW|).
- **no data** (light grey): no finite value of the statistic and no non-finite gradient: a layer
  without a gradient at those steps, the |ΔW| of a ``snapshot=False`` run or of an epoch a crash cut
  short (NaN by design), ‖ΔW‖/‖W‖ of a zero weight (±Inf). A NaN or ±Inf statistic is never red by
  itself: the store uses NaN for "not recorded", so only the counts tell a non-finite gradient.

Module-prefix groups of layers (``layer3``, ``down2``) are parted by thin black dashed lines, a colour
and a pattern no cell has (viridis runs dark purple → yellow; the states are white, light grey, red).
A cell that combines several steps says how in the colour-bar label (:func:`stat_label`).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.colors import ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from gradflow.analyses.panel_grid import PanelLayout
from gradflow.analyses.runs import layer_groups, runs, segment_mean, select_layers, step_chunks
from gradflow.errors import GradflowError
from gradflow.schema import LABELS
from gradflow.summary import read_steps

PER = ("epoch", "step")
# Cell states drawn over the colour scale (value → colour, legend text).
NO_DATA, NO_UPDATE, NONFINITE = 1, 2, 3
STATE_COLOURS = {NO_DATA: "#d4d4d4", NO_UPDATE: "#ffffff", NONFINITE: "#e31a1c"}
STATE_NAMES = {NO_DATA: "no data", NO_UPDATE: "no update (0)", NONFINITE: "non-finite gradient (NaN/Inf)"}
SEPARATOR = {"color": "black", "linewidth": 0.8, "linestyle": (0, (3, 2))}  # between layer groups
MEAN_OF_EPOCH = "mean of the epoch's recorded steps"  # how a step statistic becomes one epoch's cell
MEAN_OF_BIN = "mean of each bin of recorded steps"  # how binned steps become one cell
MAX_NAMED_LAYERS = 28  # above this, the layer axis is labelled by module-prefix groups


def _runs_per_dim(data: xr.Dataset | xr.DataTree) -> tuple[dict[str, xr.Dataset], dict[str, xr.Dataset]]:
    """(epoch-level runs, step-level runs); a bare Dataset fills only the level it has."""
    if isinstance(data, xr.Dataset):
        return (runs(data, "epoch") if "epoch" in data.dims else {}), (
            runs(data, "step") if "step" in data.dims else {}
        )
    return runs(data, "epoch"), runs(data, "step")


def per_layer_variables(data: xr.Dataset | xr.DataTree, per: str = "epoch") -> list[str]:
    """The variables a heatmap can draw at ``per``: those with a ``layer`` dimension (step-level ones
    count for ``per="epoch"`` too, averaged over each epoch)."""
    epoch_runs, step_runs = _runs_per_dim(data)
    levels = [*step_runs.values()] + ([*epoch_runs.values()] if per == "epoch" else [])
    return sorted({name for ds in levels for name, var in ds.data_vars.items() if "layer" in var.dims})


def check_stat(data: xr.Dataset | xr.DataTree, stat: str, per: str) -> None:
    """A one-line :class:`GradflowError` unless ``stat`` is a per-layer variable at ``per``."""
    if per not in PER:
        raise GradflowError(f"--per must be one of {', '.join(PER)}, got {per!r}")
    valid = per_layer_variables(data, per)
    if stat in valid:
        return
    epoch_runs, step_runs = _runs_per_dim(data)
    where = {"train_loss": "the loss curves", "val_loss": "the loss curves", "lr": "the learning-rate plot",
             "skipped": "the report's step counts"}
    known = any(stat in ds.variables for ds in [*epoch_runs.values(), *step_runs.values()])
    if known and stat not in valid:
        why = f"{stat!r} has no layer dimension, so it has no heatmap"
        why += f" (it is drawn in {where[stat]})" if stat in where else ""
        if per == "step" and stat in per_layer_variables(data, "epoch"):
            why = f"{stat!r} is recorded per epoch only; use --per epoch"
    else:
        why = f"no variable {stat!r} in the store"
    raise GradflowError(f"--stat: {why}; per-{per} heatmaps draw one of: {', '.join(valid) or 'nothing'}")


def _segment_any(st: xr.Dataset, labels: np.ndarray) -> np.ndarray:
    """(segments, layers) bool: some step of the segment had a NaN/Inf gradient value in the layer
    (``nonfinite`` > 0; a NaN count, no gradient, is none), read block by block; segments are the
    sorted unique ``labels``. All False for a store without ``nonfinite``."""
    keys, segment = np.unique(labels, return_inverse=True)
    out = np.zeros((len(keys), st.sizes["layer"]), dtype=bool)
    if "nonfinite" not in st:
        return out
    for start, count in step_chunks(st["nonfinite"].transpose("step", "layer")):
        seg = segment[start : start + len(count)]
        starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
        out[seg[starts]] |= np.logical_or.reduceat(count > 0, starts, axis=0)
    return out


def _layer_coords(st: xr.Dataset) -> dict:
    coords = {"layer": st["layer"].values}
    if "module_type" in st.coords:
        coords["module_type"] = ("layer", st["module_type"].values)
    return coords


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
        coords={"step": steps[first], "step_end": ("step", steps[last] + 1), **_layer_coords(ds),
                "nonfinite_event": (("step", "layer"), _segment_any(ds, labels))},
        name=stat,
        attrs={"combined": MEAN_OF_BIN} if n_bins < n else {},
    )


def _summary_bins(data: xr.Dataset | xr.DataTree, name: str, stat: str, layers, module_type: str | None,
                  bins: int) -> xr.DataArray | None:
    """Bin means from the run's step summary (:mod:`gradflow.summary`), with ``nonfinite_event`` where
    a step of the bin had a NaN/Inf gradient (``nonfinite`` > 0); None without enough summary blocks."""
    if not isinstance(data, xr.DataTree):
        return None
    names = list(dict.fromkeys([stat, "nonfinite"]))
    binned = read_steps(data if name == "run" else data[name], bins, names, raw_fallback=False)
    if binned is None or (module_type is not None and "module_type" not in binned.coords):
        return None
    binned = select_layers(binned, layers, module_type)
    da = binned[stat].sel(stat="mean", drop=True).transpose("step", "layer")
    event = binned["nonfinite"].sel(stat="max", drop=True).transpose("step", "layer").values > 0
    return da.assign_coords(nonfinite_event=(("step", "layer"), event)).assign_attrs(combined=MEAN_OF_BIN)


def heatmap_data(
    data: xr.Dataset | xr.DataTree,
    stat: str = "update_mean_abs",
    per: str = "epoch",
    layers: str | list[str] = "auto",
    bins: int = 200,
    module_type: str | None = None,
) -> dict[str, xr.DataArray]:
    """The arrays :func:`heatmaps` draws: ``{run: DataArray (epoch|step, layer)}``.

    ``per="epoch"`` takes ``stat`` from the epoch group when it is there (``update_mean_abs``,
    ``update_norm``), otherwise averages the step-level ``stat`` over each epoch's steps.
    ``per="step"`` averages the step-level ``stat`` over ``bins`` equal runs of steps (a 10⁵-step
    store becomes ``bins`` rows, read block by block; a run with a step summary of at least ``bins``
    blocks is read from it instead, :func:`gradflow.summary.read_steps`). Means ignore non-finite
    values; the bool coordinate ``nonfinite_event`` (same dims) marks the cells where some recorded
    step had a NaN/Inf gradient in the layer (``nonfinite`` > 0), on every path alike: a NaN or ±Inf
    statistic alone is no event (see the module docstring). ``attrs["combined"]`` says how a cell
    combines steps (``MEAN_OF_EPOCH``, ``MEAN_OF_BIN``); absent where a cell is one recorded figure
    (an epoch-group variable, or one step per row). ``layers`` / ``module_type`` select layers (:func:`gradflow.analyses.runs.select_layers`).
    Raises :class:`GradflowError` for a ``stat`` without a layer dimension or a bad ``per``.
    """
    check_stat(data, stat, per)
    epoch_runs, step_runs = _runs_per_dim(data)
    out: dict[str, xr.DataArray] = {}
    for name in dict.fromkeys([*epoch_runs, *step_runs]):
        ep, st = epoch_runs.get(name), step_runs.get(name)
        st = select_layers(st, layers, module_type) if st is not None and stat in st and st.sizes["step"] > 0 else None
        if per == "epoch" and ep is not None and stat in ep:
            ep = select_layers(ep, layers, module_type)
            da = ep[stat].transpose("epoch", "layer")
            event = np.zeros(da.shape, dtype=bool)  # the epoch group has no counts: its steps' counts
            full = step_runs.get(name)
            if full is not None and "epoch" in full.coords and full.sizes["step"] > 0:
                full = select_layers(full, layers, module_type)
                keys = np.unique(full["epoch"].values).tolist()
                hit = _segment_any(full, full["epoch"].values)
                row_of = {e: i for i, e in enumerate(ep["epoch"].values.tolist())}
                for k, epoch in enumerate(keys):
                    if epoch in row_of:
                        event[row_of[epoch]] |= hit[k]
            out[name] = da.assign_coords(nonfinite_event=(("epoch", "layer"), event))
        elif st is not None:
            if per == "step":
                binned = _summary_bins(data, name, stat, layers, module_type, bins)
                out[name] = binned if binned is not None else _step_bins(st, stat, bins)
            elif "epoch" in st.coords:
                keys, means = segment_mean(st[stat], st["epoch"].values)
                out[name] = xr.DataArray(
                    means, dims=("epoch", "layer"), name=stat, attrs={"combined": MEAN_OF_EPOCH},
                    coords={"epoch": keys, **_layer_coords(st),
                            "nonfinite_event": (("epoch", "layer"), _segment_any(st, st["epoch"].values))})
    out = {name: da for name, da in out.items() if da.sizes[da.dims[0]] > 0}
    if not out:
        raise GradflowError(f"no run in the store has {per}-level data for {stat!r} yet")
    return out


def stat_label(arrays: dict[str, xr.DataArray], stat: str, per: str) -> str:
    """What the colour of :func:`heatmap_data`'s ``arrays`` is: ``"‖W‖₂ per epoch (mean of the epoch's
    recorded steps)"``; the statistic alone where no cell combines steps."""
    how = list(dict.fromkeys(da.attrs["combined"] for da in arrays.values() if "combined" in da.attrs))
    return f"{LABELS.get(stat, stat)} per {per}" + (f" ({'; '.join(how)})" if how else "")


def cell_states(da: xr.DataArray) -> np.ndarray:
    """(time, layer) int: 0 = drawn by the colour scale, else ``NO_DATA`` (a NaN or ±Inf value: not on
    the scale, and not a non-finite gradient by itself), ``NO_UPDATE`` (0) or ``NONFINITE`` (the
    ``nonfinite_event`` coordinate: a counted NaN/Inf gradient; see the module docstring)."""
    values = da.values
    states = np.zeros(values.shape, dtype=np.int8)
    states[~np.isfinite(values)] = NO_DATA
    states[values == 0] = NO_UPDATE
    if "nonfinite_event" in da.coords and da.name != "nonfinite":
        states[da["nonfinite_event"].values] = NONFINITE
    return states


@dataclass
class LayerAxis:
    """Tick positions and labels of the layer axis, and where group separators go."""

    ticks: list[float]
    labels: list[str]
    separators: list[float]
    rotation: int


def layer_axis(names: list[str], max_named: int = MAX_NAMED_LAYERS) -> LayerAxis:
    """Every layer's name when ``len(names) <= max_named``; otherwise one label per module-prefix group
    (``layer3``, ``transformer.h.7``, ``down2``) with separators between groups; a model without such
    groups (``layers.0`` … ``layers.199``) gets about 12 evenly spaced layer names."""
    if len(names) <= max_named:
        groups = layer_groups(names)
        seps = [a - 0.5 for _, a, _ in groups[1:]] if 1 < len(groups) < len(names) else []
        return LayerAxis(list(range(len(names))), names, seps, 90)
    groups = layer_groups(names)
    if 3 <= len(groups) <= 24:
        return LayerAxis([(a + b - 1) / 2 for _, a, b in groups], [g for g, _, _ in groups],
                         [a - 0.5 for _, a, _ in groups[1:]], 90)
    every = int(np.ceil(len(names) / 12))
    ticks = list(range(0, len(names), every))
    return LayerAxis(ticks, [names[i] for i in ticks], [], 90)


def _norm(arrays: dict[str, xr.DataArray], log: bool) -> Normalize:
    values = np.concatenate([np.ravel(da.values) for da in arrays.values()])
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if log and positive.size:
        return LogNorm(vmin=positive.min(), vmax=max(positive.max(), positive.min() * (1 + 1e-6)))
    return Normalize(vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 1)


def _edges(centres: np.ndarray, ends: np.ndarray | None = None) -> np.ndarray:
    """Cell edges along y: epochs are unit cells around their index; step bins span [first, end)."""
    if ends is not None:
        return np.r_[centres, ends[-1]].astype(float)
    return np.r_[centres - 0.5, centres[-1] + 0.5].astype(float)


def draw_heatmap(ax, da: xr.DataArray, norm: Normalize, cmap) -> None:
    """One panel: the colour-scaled values (``ax.collections[0]``, exactly ``da.values``), then the
    state overlay (``ax.collections[1]``: no data / no update / non-finite), then a labelled layer axis."""
    time = da.dims[0]
    ends = da["step_end"].values if "step_end" in da.coords else None
    x = np.arange(da.sizes["layer"] + 1) - 0.5
    y = _edges(da[time].values, ends)
    ax.pcolormesh(x, y, da.values, norm=norm, cmap=cmap)
    states = cell_states(da)
    colours = ListedColormap([STATE_COLOURS[s] for s in (NO_DATA, NO_UPDATE, NONFINITE)])
    ax.pcolormesh(x, y, np.ma.masked_equal(states, 0), cmap=colours, vmin=0.5, vmax=3.5)
    axis = layer_axis([str(n) for n in da["layer"].values])
    fontsize = 7 if len(axis.labels) <= 16 else 5
    ax.set_xticks(axis.ticks, axis.labels, rotation=axis.rotation, fontsize=fontsize)
    for x_sep in axis.separators:
        ax.axvline(x_sep, **SEPARATOR)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_ylabel(time, fontsize=8)
    ax.tick_params(axis="y", labelsize=7)


def heatmaps(
    data: xr.Dataset | xr.DataTree,
    stat: str = "update_mean_abs",
    per: str = "epoch",
    layers: str | list[str] = "auto",
    bins: int = 200,
    log: bool | None = None,
    ncols: int | None = None,
    grid: list[list[str | None]] | PanelLayout | None = None,
    module_type: str | None = None,
) -> Figure:
    """Fig. 4-style grid of layer × epoch (or step) heatmaps, one panel per run, one colour scale.

    Each panel's ``get_label()`` is its run name and its ``collections[0].get_array()`` the plotted
    (time, layer) array, exactly :func:`heatmap_data`'s values; ``collections[1]`` is the state
    overlay (:func:`cell_states`). ``log`` defaults to a log colour scale for every statistic except
    the ``nonfinite`` counts. Panels fill ``ncols`` columns (default 2) in run order, titled with the
    run name, or sit where ``grid`` puts them: rows of run names, or a
    :class:`~gradflow.analyses.panel_grid.PanelLayout`, whose row and column headers and key are drawn too.
    A named run without data leaves its cell empty.
    """
    arrays = heatmap_data(data, stat=stat, per=per, layers=layers, bins=bins, module_type=module_type)
    layout = grid if isinstance(grid, PanelLayout) else None
    rows = layout.rows if layout is not None else grid
    if rows is not None:
        left_out = sorted(set(arrays) - {name for row in rows for name in row})
        if left_out:
            raise GradflowError(f"the panel grid leaves out run(s) {', '.join(left_out)}")
    log = stat != "nonfinite" if log is None else log
    norm = _norm(arrays, log)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=(0, 0, 0, 0))

    if rows is None:
        ncols = ncols or min(len(arrays), 2)
        names = list(arrays)
        rows = [names[i : i + ncols] for i in range(0, len(names), ncols)]
    nrows, ncols = len(rows), max(len(row) for row in rows)
    n_layers = max(da.sizes["layer"] for da in arrays.values())
    label_room = 0.9 if n_layers <= MAX_NAMED_LAYERS else 0.6
    fig = Figure(figsize=(5.2 * ncols + 1.6, (2.6 + label_room) * nrows + 1.0), layout="constrained")
    cells = fig.subplots(nrows, ncols, squeeze=False)
    placed = {name: (r, c) for r, row in enumerate(rows) for c, name in enumerate(row) if name in arrays}
    for name, (r, c) in placed.items():
        ax = cells[r, c]
        ax.set_label(name)
        draw_heatmap(ax, arrays[name], norm, cmap)
        if layout is None:
            ax.set_title(name, fontsize=9)
    if layout is not None:
        for c, text in enumerate(layout.column_labels):
            cells[0, c].set_title(text, fontsize=10, fontweight="bold")
        for r, text in enumerate(layout.row_labels):
            cells[r, 0].annotate(text, xy=(0, 0.5), xycoords="axes fraction", xytext=(-34, 0),
                                 textcoords="offset points", rotation=90, ha="right", va="center",
                                 fontsize=10, fontweight="bold")
        fig.suptitle(textwrap.fill(layout.key, width=int(38 * ncols + 20)), fontsize=9)
    for c in range(ncols):  # the layer-axis label under the lowest panel of each column
        lowest = max((r for r, cc in placed.values() if cc == c), default=None)
        if lowest is not None:
            cells[lowest, c].set_xlabel("layer (input → output)", fontsize=8)
    used = [cells[r, c] for r, c in placed.values()]
    for ax in cells.ravel():
        if not any(ax is u for u in used):
            ax.remove()
    label = stat_label(arrays, stat, per) + (", log scale" if isinstance(norm, LogNorm) else "")
    mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(mappable, ax=used, label=label, fraction=0.15 / max(1, nrows / 3), aspect=20 * max(1, nrows / 3))
    key = [Patch(facecolor=STATE_COLOURS[s], edgecolor="0.5", label=STATE_NAMES[s]) for s in STATE_NAMES]
    fig.legend(handles=key, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return fig
