import numpy as np
import pytest
import xarray as xr

from gradflow.analyses.runs import natural_key, runs, segment_mean, select_layers, stages
from gradflow.errors import GradflowError


def test_runs_of_a_sweep_tree_in_natural_order(sweep_factory):
    tree = sweep_factory(names=["simple-d11-bn0-long_sum-short0", "simple-d3-bn0-long_sum-short0"])
    assert list(runs(tree, "epoch")) == ["simple-d3-bn0-long_sum-short0", "simple-d11-bn0-long_sum-short0"]
    assert all("step" in ds.dims for ds in runs(tree, "step").values())
    assert sorted(["a10", "a9"], key=natural_key) == ["a9", "a10"]


def test_runs_of_a_single_run_tree_and_of_datasets(run_factory):
    step, epoch = run_factory(0)
    tree = xr.DataTree.from_dict({"/": step, "/epochs": epoch})
    assert list(runs(tree, "epoch")) == ["run"]
    xr.testing.assert_identical(runs(tree, "epoch")["run"], epoch)
    xr.testing.assert_identical(runs(epoch, "epoch")["run"], epoch)
    with pytest.raises(GradflowError, match="no 'epoch' dimension"):
        runs(step, "epoch")


def test_select_layers_auto_keeps_fcn_convs_sorted_by_depth(run_factory):
    _, epoch = run_factory(1)
    names = list(select_layers(epoch)["layer"].values)
    assert names == ["down1.conv", "down1.block1.conv1", "across.block1.conv1", "skip1.conv", "up1.block1.conv1",
                     "classifier"]
    assert len(select_layers(epoch, "all")["layer"]) == 7
    with pytest.raises(GradflowError, match="unknown layer"):
        select_layers(epoch, ["nope"])


def test_stages_are_contiguous_runs():
    assert stages(["down1.conv", "down2.conv", "across.b", "up1.c", "classifier"]) == [
        ("encoder", 0, 2), ("centre", 2, 3), ("decoder", 3, 5)]
    names = ["across.b", "skip1.conv", "up1.c", "skip2.conv", "up2.c"]
    assert stages(names) == [("centre", 0, 1), ("skip", 1, 2), ("decoder", 2, 3), ("skip", 3, 4), ("decoder", 4, 5)]
    assert stages(names, fold_skips=True) == [("centre", 0, 1), ("decoder", 1, 5)]


def test_segment_mean_across_block_boundaries():
    values = np.arange(40, dtype=float).reshape(10, 4)
    values[2, 1] = np.nan
    da = xr.DataArray(values, dims=("step", "layer"))
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 5, 5, 5])
    keys, means = segment_mean(da, labels, max_elements=8)  # blocks of 2 steps split every segment
    np.testing.assert_array_equal(keys, [0, 1, 5])
    expected = np.stack([np.nanmean(values[0:3], axis=0), values[3:7].mean(axis=0), values[7:10].mean(axis=0)])
    np.testing.assert_allclose(means, expected)
