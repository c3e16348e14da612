"""Table 3 of Drozdzal et al. 2016: per run, the best validation loss and the training loss then.

The training loss at the best-validation epoch (not the lowest training loss) is what tells
over-fitting from under-fitting: a low value there with a high validation loss over-fits, two high
values under-fit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from gradflow import schema
from gradflow.analyses.runs import optimizer_of, run_attrs, runs


# 1-D per-epoch variables that are not the run's own other scalars: the losses (their own columns)
# and the epochs group's coordinates (num_steps).
NOT_SCALARS = {"train_loss", "val_loss", *schema.names(schema.EPOCH_COORDS)}


def best_val_table(data: xr.Dataset | xr.DataTree) -> pd.DataFrame:
    """One row per run (index ``run``): ``optimizer`` (as recorded by the Recorder; blank when the
    store does not say), ``epochs``, ``best_epoch``, ``best_val_loss``, ``train_loss_at_best`` and
    ``lr_at_best``: the learning rate the optimizer used at the last recorded step of the best epoch
    (the store's per-step ``lr``; NaN when it is not recorded or the param groups' rates differ);
    then ``<name>_at_best`` for every other scalar a run logged per epoch (``end_epoch(
    val_accuracy=...)``: ``val_accuracy_at_best``), sorted by name, NaN where a run lacks it.
    Runs without a finite validation loss get NaN from ``best_epoch`` on."""
    rows, scalars = [], set()
    attrs = run_attrs(data)
    step_runs = runs(data, "step") if isinstance(data, xr.DataTree) else {}
    for name, ds in runs(data, "epoch").items():
        optimizer, _ = optimizer_of(attrs.get(name, {}))
        row = {"run": name, "optimizer": optimizer, "epochs": int(ds.sizes["epoch"]), "best_epoch": np.nan,
               "lr_at_best": np.nan}
        row.update(best_val_loss=np.nan, train_loss_at_best=np.nan)
        val = np.asarray(ds["val_loss"].values, dtype=float) if "val_loss" in ds else np.array([])
        if np.isfinite(val).any():
            best = int(np.nanargmin(np.where(np.isfinite(val), val, np.nan)))
            row["best_epoch"] = ds["epoch"].values[best].item()
            row["best_val_loss"] = val[best]
            if "train_loss" in ds:
                row["train_loss_at_best"] = float(ds["train_loss"].values[best])
            row["lr_at_best"] = _lr_at_epoch(step_runs.get(name), row["best_epoch"])
        for scalar in epoch_scalars(ds):
            scalars.add(scalar)
            row[f"{scalar}_at_best"] = (float(ds[scalar].values[best]) if np.isfinite(row["best_val_loss"])
                                        else np.nan)
        rows.append(row)
    table = pd.DataFrame(rows, columns=["run", "optimizer", "epochs", "best_epoch", "best_val_loss",
                                        "train_loss_at_best", "lr_at_best"]
                         + [f"{scalar}_at_best" for scalar in sorted(scalars)])
    return table.astype({"best_epoch": "Int64"}).set_index("run")


def _lr_at_epoch(st: xr.Dataset | None, epoch) -> float:
    """The recorded lr at the last recorded step of ``epoch``, if all param groups share it."""
    if st is None or "lr" not in st or "epoch" not in st.coords:
        return np.nan
    where = np.flatnonzero(st["epoch"].values == epoch)
    if not len(where):
        return np.nan
    rates = np.asarray(st["lr"].isel(step=int(where[-1])).values, dtype=float)
    return float(rates[0]) if len(rates) and np.all(rates == rates[0]) else np.nan


def epoch_scalars(ds: xr.Dataset) -> list[str]:
    """Names of a run's own per-epoch numbers besides the losses (what ``end_epoch`` logged: 1-D over
    ``epoch``, numeric), in the order of ``ds``; ``ds`` is a run's epochs group."""
    return [str(name) for name, var in ds.data_vars.items()
            if name not in NOT_SCALARS and var.dims == ("epoch",) and var.dtype.kind in "fiu"]

