import numpy as np
import pytest
import xarray as xr

from analyses.curves import has_losses, loss_curves
from gradflow.errors import GradflowError


def test_one_line_per_run_holding_the_stored_losses(sweep):
    fig = loss_curves(sweep)
    train_ax, val_ax = fig.axes[:2]
    for ax, loss in [(train_ax, "train_loss"), (val_ax, "val_loss")]:
        lines = {line.get_label(): line for line in ax.lines}
        assert list(lines) == ["simple-d1-bn0-long_sum-short0", "simple-d1-bn0-long_sum-short1"]
        for name, line in lines.items():
            epochs = sweep[f"{name}/epochs"].to_dataset()
            np.testing.assert_array_equal(line.get_xdata(), epochs["epoch"].values)
            np.testing.assert_array_equal(line.get_ydata(), epochs[loss].values)
        assert ax.get_yscale() == "log"


def test_store_without_losses_is_a_user_error(run_factory):
    step, epoch = run_factory(0)
    epoch = epoch.drop_vars(["train_loss", "val_loss"])
    tree = xr.DataTree.from_dict({"/": step, "/epochs": epoch})
    assert not has_losses(tree)
    with pytest.raises(GradflowError, match="no train_loss or val_loss"):
        loss_curves(tree)
