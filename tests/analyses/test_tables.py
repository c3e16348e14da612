import numpy as np
import xarray as xr

from analyses.tables import best_val_table


def test_best_val_loss_and_train_loss_at_that_epoch(run_factory):
    nodes = {}
    cases = {"a": ([0.9, 0.5, 0.3, 0.2], [0.8, 0.4, 0.6, 0.7]),   # best val at epoch 1
             "b": ([0.9, 0.8, 0.7, 0.6], [np.nan, 0.9, 0.9, 0.85])}  # NaN skipped; first of ties irrelevant
    for name, (train, val) in cases.items():
        step, epoch = run_factory(0, epochs=4)
        nodes[f"/{name}"] = step
        nodes[f"/{name}/epochs"] = epoch.assign(train_loss=("epoch", train), val_loss=("epoch", val))
    table = best_val_table(xr.DataTree.from_dict(nodes))
    assert list(table.index) == ["a", "b"]
    assert table.loc["a", "best_epoch"] == 1 and table.loc["b", "best_epoch"] == 3
    assert table.loc["a", "best_val_loss"] == 0.4 and table.loc["a", "train_loss_at_best"] == 0.5
    assert table.loc["b", "best_val_loss"] == 0.85 and table.loc["b", "train_loss_at_best"] == 0.6
    assert (table["epochs"] == 4).all()


def test_run_without_validation_loss_gets_missing_values(run_factory):
    _, epoch = run_factory(0)
    table = best_val_table(epoch.drop_vars("val_loss"))
    assert table.loc["run", "best_epoch"] is not None and np.isnan(table.loc["run", "best_val_loss"])
