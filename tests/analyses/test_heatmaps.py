import numpy as np
import pytest
import xarray as xr
from matplotlib.colors import LogNorm

from analyses.heatmaps import heatmap_data, heatmaps
from gradflow.errors import GradflowError

CONVS_IN_ORDER = ["down1.conv", "down1.block1.conv1", "across.block1.conv1", "skip1.conv", "up1.block1.conv1",
                  "classifier"]


def panels(fig):
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def plotted(ax):
    return np.ma.getdata(ax.collections[0].get_array())


def test_epoch_heatmaps_hold_the_epoch_group_values_in_depth_order(sweep):
    fig = heatmaps(sweep)
    axes = panels(fig)
    assert list(axes) == ["simple-d1-bn0-long_sum-short0", "simple-d1-bn0-long_sum-short1"]
    for name, ax in axes.items():
        expected = sweep[f"{name}/epochs"].to_dataset()["update_mean_abs"].sel(layer=CONVS_IN_ORDER).values
        np.testing.assert_array_equal(plotted(ax), expected)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["encoder", "centre", "decoder"]


def test_panels_share_one_log_colour_scale(sweep):
    fig = heatmaps(sweep)
    meshes = [ax.collections[0] for ax in panels(fig).values()]
    everything = np.concatenate([sweep[f"{n}/epochs"].to_dataset()["update_mean_abs"].sel(layer=CONVS_IN_ORDER)
                                 .values.ravel() for n in panels(fig)])
    for mesh in meshes:
        assert isinstance(mesh.norm, LogNorm)
        assert mesh.norm is meshes[0].norm
        assert mesh.norm.vmin == pytest.approx(everything.min())
        assert mesh.norm.vmax == pytest.approx(everything.max())


def test_zero_and_nan_updates_are_masked_not_fatal(sweep):
    ep = sweep["simple-d1-bn0-long_sum-short0/epochs"].to_dataset()
    values = ep["update_mean_abs"].values.copy()
    values[0, :] = 0.0
    values[1, list(ep.layer.values).index("across.block1.conv1")] = np.nan
    sweep["simple-d1-bn0-long_sum-short0/epochs"] = xr.DataTree(ep.assign(update_mean_abs=(("epoch", "layer"), values)))
    mesh = panels(heatmaps(sweep))["simple-d1-bn0-long_sum-short0"].collections[0]
    assert mesh.norm.vmin > 0
    assert np.ma.getmaskarray(mesh.get_array())[1, CONVS_IN_ORDER.index("across.block1.conv1")]
    assert (np.ma.getdata(mesh.get_array())[0] == 0).all()  # zeros stay in the data, drawn grey by the log norm


def test_step_bins_are_nan_aware_means_of_consecutive_steps(sweep):
    step = sweep["simple-d1-bn0-long_sum-short1"].to_dataset()
    values = step["update_ratio"].values.copy()
    values[5, :] = np.nan  # a step with no finite value must not drag its bin's mean
    step = step.assign(update_ratio=(("step", "layer"), values))
    # 12 steps into 5 bins: step positions * 5 // 12 -> bins [0..2], [3..4], [5..7], [8..9], [10..11]
    data = heatmap_data(step, stat="update_ratio", per="step", bins=5)["run"]
    reference = step["update_ratio"].sel(layer=CONVS_IN_ORDER).values
    expected = np.stack([np.nanmean(reference[a:b], axis=0) for a, b in [(0, 3), (3, 5), (5, 8), (8, 10), (10, 12)]])
    np.testing.assert_allclose(data.values, expected, rtol=1e-6)
    np.testing.assert_array_equal(data["step"].values, [0, 3, 5, 8, 10])
    np.testing.assert_array_equal(data["step_end"].values, [3, 5, 8, 10, 12])
    fig = heatmaps(step, stat="update_ratio", per="step", bins=5)
    np.testing.assert_allclose(plotted(panels(fig)["run"]), expected, rtol=1e-6)


def test_step_variable_per_epoch_is_the_mean_over_each_epochs_steps(sweep):
    fig = heatmaps(sweep, stat="grad_norm", per="epoch")
    for name, ax in panels(fig).items():
        step = sweep[name].to_dataset()
        reference = step["grad_norm"].sel(layer=CONVS_IN_ORDER).values.astype(float)
        epochs = step["epoch"].values
        expected = np.stack([reference[epochs == e].mean(axis=0) for e in range(3)])
        np.testing.assert_allclose(plotted(ax), expected, rtol=1e-6)


def test_layers_all_and_non_fcn_models_keep_every_layer(run_factory):
    _, epoch = run_factory(0, layers=[("fc1", "Linear"), ("bn", "BatchNorm1d"), ("fc2", "Linear")])
    data = heatmap_data(epoch)["run"]
    assert list(data["layer"].values) == ["fc1", "bn", "fc2"]
    np.testing.assert_array_equal(data.values, epoch["update_mean_abs"].sel(layer=["fc1", "bn", "fc2"]).values)


def test_unknown_stat_and_bad_per_are_user_errors(sweep):
    with pytest.raises(GradflowError, match="no epoch-level variable 'nope'"):
        heatmaps(sweep, stat="nope")
    with pytest.raises(GradflowError, match="per must be"):
        heatmaps(sweep, per="week")


def test_interrupted_variant_without_epochs_is_left_out(sweep_factory, run_factory):
    tree = sweep_factory()
    step, _ = run_factory(5)
    tree["simple-d3-bn0-long_sum-short0"] = xr.DataTree(step.isel(step=slice(0, 0)))
    assert list(panels(heatmaps(tree))) == ["simple-d1-bn0-long_sum-short0", "simple-d1-bn0-long_sum-short1"]


def test_grid_places_each_panel_in_its_row_and_column(sweep_factory):
    names = ["a-short0", "a-short1", "b-short1"]
    tree = sweep_factory(names=names)
    fig = heatmaps(tree, grid=[["a-short0", "a-short1"], ["gone", "b-short1"]])
    axes = panels(fig)
    assert sorted(axes) == names
    position = {name: ax.get_subplotspec().get_geometry()[2] for name, ax in axes.items()}  # index in a 2 × 2 grid
    assert position == {"a-short0": 0, "a-short1": 1, "b-short1": 3}  # "gone" (no data) leaves cell 2 empty
    meshes = [ax.collections[0] for ax in axes.values()]
    assert all(mesh.norm is meshes[0].norm for mesh in meshes)
    for name, ax in axes.items():
        expected = tree[f"{name}/epochs"].to_dataset()["update_mean_abs"].sel(layer=CONVS_IN_ORDER).values
        np.testing.assert_array_equal(plotted(ax), expected)
    with pytest.raises(GradflowError, match="leaves out run\\(s\\) b-short1"):
        heatmaps(tree, grid=[["a-short0", "a-short1"]])
