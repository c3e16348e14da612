"""Fig. 3 of Drozdzal et al. 2016: training and validation loss per epoch.

Up to :data:`MAX_OVERLAID` runs: two panels side by side (train, validation), one colour per run in
both, so a variant that trains well but generalises badly (or does not train at all) stands out. More
runs: small multiples, one panel per run (train and validation in it, one shared y axis), placed like
the heatmaps when a panel layout is given. Epoch ticks are integers. A store without a validation
loss gets one panel and a note instead of an empty one. The y label names the loss and its sign
convention (the paper's Dice loss is −Dice, from −1 (perfect) to 0).
"""

from __future__ import annotations

import textwrap

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gradflow.analyses.panel_grid import PanelLayout
from gradflow.analyses.runs import run_attrs, runs
from gradflow.errors import GradflowError

LOSSES = ("train_loss", "val_loss")
TITLES = {"train_loss": "training loss", "val_loss": "validation loss"}
MAX_OVERLAID = 6
LOSS_NAMES = {"bce": "BCE (≥ 0, lower is better)", "dice": "−Dice (−1 perfect … 0, lower is better)"}


def has_losses(data: xr.Dataset | xr.DataTree) -> bool:
    """Whether any run recorded a train or validation loss (a bare Recorder store may not)."""
    epoch_runs = runs(data, "epoch") if isinstance(data, xr.DataTree) or "epoch" in data.dims else {}
    return any(loss in ds and ds.sizes["epoch"] > 0 for ds in epoch_runs.values() for loss in LOSSES)


def loss_name(data: xr.Dataset | xr.DataTree) -> str:
    """The loss the runs were trained with and its sign convention (from the recorded config), or ``"loss"``."""
    names = {(attrs.get("metadata") or {}).get("loss") for attrs in run_attrs(data).values()}
    names.discard(None)
    if len(names) == 1:
        name = names.pop()
        return f"loss: {LOSS_NAMES.get(name, name)}"
    return "loss" if not names else "loss (" + ", ".join(LOSS_NAMES.get(n, n) for n in sorted(names)) + ")"


def loss_curves(data: xr.Dataset | xr.DataTree, log: bool = True, grid: PanelLayout | None = None,
                max_overlaid: int = MAX_OVERLAID) -> Figure:
    """Train and validation loss against epoch.

    At most ``max_overlaid`` runs: a training and a validation panel (or one panel and a note when no
    run recorded a validation loss), one labelled line per run in each (``get_label()`` = run name,
    ``get_xdata()`` / ``get_ydata()`` = the store's ``epoch`` and loss). More runs: one panel per run
    (``ax.get_label()`` = run name) with lines labelled ``train_loss`` / ``val_loss``. ``log`` uses a
    log y axis when every plotted loss is positive.
    """
    epoch_runs = runs(data, "epoch")
    if not has_losses(data):
        raise GradflowError("no train_loss or val_loss recorded in the store; nothing to plot")
    values = [np.asarray(ds[loss].values, dtype=float) for ds in epoch_runs.values() for loss in LOSSES if loss in ds]
    finite = np.concatenate(values)[np.isfinite(np.concatenate(values))]
    use_log = log and bool(np.all(finite > 0))
    ylabel = loss_name(data)
    if len(epoch_runs) > max_overlaid:
        return _small_multiples(epoch_runs, use_log, ylabel, grid)
    present = [loss for loss in LOSSES if any(loss in ds for ds in epoch_runs.values())]
    fig = Figure(figsize=(5 * len(present) + 2.5, 3.8), layout="constrained")
    axes = fig.subplots(1, len(present), sharey=True, squeeze=False)[0]
    n = len(epoch_runs)
    colours = [f"C{i}" for i in range(n)]
    for colour, (name, ds) in zip(colours, epoch_runs.items()):
        for ax, loss in zip(axes, present):
            if loss in ds:
                y = np.asarray(ds[loss].values, dtype=float)
                ax.plot(ds["epoch"].values, y, color=colour, label=name, marker="." if len(y) < 30 else None)
    for ax, loss in zip(axes, present):
        _style(ax, TITLES[loss], use_log)
    axes[0].set_ylabel(ylabel)
    if "val_loss" not in present:
        axes[0].annotate("no validation loss recorded", xy=(0.98, 0.96), xycoords="axes fraction",
                         ha="right", va="top", fontsize=8, color="0.4")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    return fig


def _style(ax, title: str, use_log: bool) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if use_log:
        ax.set_yscale("log")


def _small_multiples(epoch_runs: dict[str, xr.Dataset], use_log: bool, ylabel: str, grid: PanelLayout | None) -> Figure:
    """One panel per run, train (solid) and validation (dashed), shared axes; laid out like ``grid``."""
    if grid is not None and {n for row in grid.rows for n in row if n} >= set(epoch_runs):
        rows = grid.rows
    else:
        names = list(epoch_runs)
        rows = [names[i : i + 4] for i in range(0, len(names), 4)]
    nrows, ncols = len(rows), max(len(r) for r in rows)
    fig = Figure(figsize=(3.2 * ncols + 1.5, 2.3 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    styles = {"train_loss": ("C0", "-"), "val_loss": ("C1", "--")}
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            name = row[c] if c < len(row) else None
            if name not in epoch_runs:
                ax.set_axis_off()
                continue
            ds = epoch_runs[name]
            ax.set_label(name)
            for loss in LOSSES:
                if loss in ds:
                    colour, style = styles[loss]
                    ax.plot(ds["epoch"].values, np.asarray(ds[loss].values, dtype=float), color=colour,
                            linestyle=style, label=loss)
            _style(ax, name if grid is None or rows is not grid.rows else "", use_log)
            if "val_loss" not in ds:
                ax.annotate("no val loss", xy=(0.97, 0.95), xycoords="axes fraction", ha="right", va="top",
                            fontsize=7, color="0.4")
    if grid is not None and rows is grid.rows:
        for c, text in enumerate(grid.column_labels):
            axes[0, c].set_title(text, fontsize=9, fontweight="bold")
        for r, text in enumerate(grid.row_labels):
            axes[r, 0].set_ylabel(text, fontsize=8, fontweight="bold")
        fig.suptitle(textwrap.fill(grid.key, width=int(24 * ncols + 20)), fontsize=9)
    for ax in axes.ravel():
        if ax.get_label() in epoch_runs:
            ax.label_outer()  # epoch label and ticks under the bottom row only
    fig.supylabel(ylabel, fontsize=9)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8,
               frameon=False)
    return fig
