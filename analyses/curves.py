"""Fig. 3 of Drozdzal et al. 2016: training and validation loss per epoch, one line per run.

Two panels side by side (train, validation) with one colour per run in both, so a variant that
trains well but generalises badly (or does not train at all) stands out.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from analyses.runs import runs
from gradflow.errors import GradflowError

LOSSES = ("train_loss", "val_loss")


def has_losses(data: xr.Dataset | xr.DataTree) -> bool:
    """Whether any run recorded a train or validation loss (a bare Recorder store may not)."""
    epoch_runs = runs(data, "epoch") if isinstance(data, xr.DataTree) or "epoch" in data.dims else {}
    return any(loss in ds and ds.sizes["epoch"] > 0 for ds in epoch_runs.values() for loss in LOSSES)


def loss_curves(data: xr.Dataset | xr.DataTree, log: bool = True) -> Figure:
    """Train and validation loss against epoch, one labelled line per run in each panel.

    Each line's ``get_xdata()`` / ``get_ydata()`` are the store's ``epoch`` and loss values. ``log``
    uses a log y axis when every plotted loss is positive.
    """
    epoch_runs = runs(data, "epoch")
    if not has_losses(data):
        raise GradflowError("no train_loss or val_loss recorded in the store; nothing to plot")
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    n = len(epoch_runs)  # up to 10 runs: the default colour cycle; up to 20: tab20's 20 distinct colours
    colours = [f"C{i}" for i in range(n)] if n <= 10 else [matplotlib.colormaps["tab20"](i % 20) for i in range(n)]
    all_positive = True
    for colour, (name, ds) in zip(colours, epoch_runs.items()):
        for ax, loss in zip(axes, LOSSES):
            if loss not in ds:
                continue
            y = np.asarray(ds[loss].values, dtype=float)
            all_positive &= bool(np.all(y[np.isfinite(y)] > 0))
            ax.plot(ds["epoch"].values, y, color=colour, label=name, marker="." if len(y) < 30 else None)
    for ax, loss in zip(axes, LOSSES):
        ax.set_title({"train_loss": "training loss", "val_loss": "validation loss"}[loss])
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if log and all_positive:
            ax.set_yscale("log")
    axes[0].set_ylabel("loss")
    handles, labels = axes[0].get_legend_handles_labels() if axes[0].lines else axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    return fig
