import numpy as np
import pytest
import xarray as xr

from gradflow.analyses.curves import has_losses, loss_curves
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


def test_many_runs_become_small_multiples_with_integer_epoch_ticks(sweep_factory):
    names = [f"v{i}" for i in range(8)]
    tree = sweep_factory(names=names)
    fig = loss_curves(tree)
    panels = {ax.get_label(): ax for ax in fig.axes if ax.lines}
    assert sorted(panels) == names
    for name, ax in panels.items():
        epochs = tree[f"{name}/epochs"].to_dataset()
        lines = {line.get_label(): line for line in ax.lines}
        np.testing.assert_array_equal(lines["train_loss"].get_ydata(), epochs["train_loss"].values)
        np.testing.assert_array_equal(lines["val_loss"].get_ydata(), epochs["val_loss"].values)
        ticks = ax.xaxis.get_major_locator().tick_values(0, 2)
        assert np.all(ticks == np.round(ticks))


def test_no_validation_loss_gives_one_panel_and_a_note(run_factory):
    step, epoch = run_factory(0)
    tree = xr.DataTree.from_dict({"/": step, "/epochs": epoch.drop_vars("val_loss")})
    fig = loss_curves(tree)
    assert len([ax for ax in fig.axes if ax.lines]) == 1
    assert [t.get_text() for t in fig.axes[0].texts] == ["no validation loss recorded"]


def test_dice_losses_are_named_with_their_sign(run_factory):
    step, epoch = run_factory(0)
    epoch = epoch.assign(train_loss=-epoch["train_loss"], val_loss=-epoch["val_loss"])
    tree = xr.DataTree.from_dict({"/": step, "/epochs": epoch})
    tree.attrs["metadata"] = {"loss": "dice"}
    fig = loss_curves(tree)
    assert fig.axes[0].get_ylabel() == "loss: −Dice (−1 perfect … 0, lower is better)"
    assert fig.axes[0].get_yscale() == "linear"
