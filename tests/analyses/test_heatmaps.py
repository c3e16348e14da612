import numpy as np
import pytest
import xarray as xr
from matplotlib.colors import LogNorm

from gradflow.analyses.heatmaps import NO_DATA, NO_UPDATE, NONFINITE, cell_states, heatmap_data, heatmaps, layer_axis
from gradflow.errors import GradflowError

CONVS_IN_ORDER = ["down1.conv", "down1.block1.conv1", "across.block1.conv1", "skip1.conv", "up1.block1.conv1",
                  "classifier"]


def panels(fig):
    return {ax.get_label(): ax for ax in fig.axes if ax.collections and not ax.get_label().startswith("<")}


def plotted(ax):
    return np.ma.getdata(ax.collections[0].get_array())


def test_epoch_heatmaps_hold_the_epoch_group_values_in_depth_order(sweep):
    fig = heatmaps(sweep)
    axes = panels(fig)
    assert list(axes) == ["simple-d1-bn0-long_sum-short0", "simple-d1-bn0-long_sum-short1"]
    for name, ax in axes.items():
        expected = sweep[f"{name}/epochs"].to_dataset()["update_mean_abs"].sel(layer=CONVS_IN_ORDER).values
        np.testing.assert_array_equal(plotted(ax), expected)
        assert [t.get_text() for t in ax.get_xticklabels()] == CONVS_IN_ORDER  # named when they fit


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
    assert (np.ma.getdata(mesh.get_array())[0] == 0).all()  # zeros stay in the data ...
    states = panels(heatmaps(sweep))["simple-d1-bn0-long_sum-short0"].collections[1].get_array()
    assert (states[0] == NO_UPDATE).all()  # ... drawn as "no update", apart from "no data"
    # NaN |ΔW| alone is no data (no snapshot, a crash-cut epoch): no step of epoch 1 counted a NaN/Inf gradient
    assert states[1, CONVS_IN_ORDER.index("across.block1.conv1")] == NO_DATA


def test_a_nan_epoch_row_is_red_only_where_a_step_counted_a_nonfinite_gradient(sweep):
    name = "simple-d1-bn0-long_sum-short0"
    ep, step = sweep[f"{name}/epochs"].to_dataset(), sweep[name].to_dataset()
    values = ep["update_mean_abs"].values.copy()
    values[1, :] = np.nan  # every layer of epoch 1 NaN, as a crash-cut epoch's row
    count = step["nonfinite"].values.copy()
    hit = list(step.layer.values).index("skip1.conv")
    count[np.flatnonzero(step["epoch"].values == 1)[2], hit] = 3  # one step of epoch 1 had 3 NaN gradient values
    sweep[f"{name}/epochs"] = xr.DataTree(ep.assign(update_mean_abs=(("epoch", "layer"), values)))
    sweep[name] = xr.DataTree(step.assign(nonfinite=(("step", "layer"), count)), children=sweep[name].children)
    states = panels(heatmaps(sweep))[name].collections[1].get_array()
    expected = np.where(np.array(CONVS_IN_ORDER) == "skip1.conv", NONFINITE, NO_DATA)
    np.testing.assert_array_equal(states[1], expected)
    assert np.ma.getmaskarray(states)[[0, 2]].all()  # the other epochs: on the colour scale


def test_nan_and_inf_statistics_without_a_counted_nonfinite_gradient_are_no_data(run_factory):
    step, _ = run_factory(0, epochs=2, steps_per_epoch=6, shuffle=False)
    ratio, count = step["update_ratio"].values.copy(), step["nonfinite"].values.copy()
    ratio[:, 0] = np.nan  # layer 0: never an update figure (snapshot=False)
    ratio[0, 1] = np.inf  # layer 1: ‖ΔW‖/‖W‖ of a zero weight at step 0, gradient finite
    ratio[7, 2], count[7, 2] = np.nan, 1  # layer 2: a NaN gradient at step 7
    step = step.assign(update_ratio=(("step", "layer"), ratio), nonfinite=(("step", "layer"), count))
    for per, kwargs in (("step", {"bins": 12}), ("step", {"bins": 3}), ("epoch", {})):
        da = heatmap_data(step, stat="update_ratio", per=per, layers="all", **kwargs)["run"]
        states = cell_states(da)
        hand = np.zeros(states.shape, dtype=int)  # rows: steps (bins of 1 or 4 steps) or epochs of 6 steps
        rows = 12 // states.shape[0]
        hand[:, 0] = NO_DATA
        hand[0, 1] = NO_DATA if rows == 1 else 0  # alone in its bin: no finite value; else the others' mean
        hand[7 // rows, 2] = NONFINITE
        np.testing.assert_array_equal(states, hand, err_msg=f"per={per} {kwargs}")


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
    with pytest.raises(GradflowError, match="no variable 'nope'"):
        heatmaps(sweep, stat="nope")
    with pytest.raises(GradflowError, match="--per must be"):
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


def test_one_nan_step_marks_its_bin_nonfinite_instead_of_vanishing(run_factory):
    step, _ = run_factory(0, epochs=10, steps_per_epoch=10, shuffle=False)
    grad = step["grad_norm"].values.copy()
    count = step["nonfinite"].values.copy()
    grad[37, 2], count[37, 2] = np.nan, 5  # one blown-up step of layer 2
    grad[:, 5], count[:, 5] = np.nan, np.nan  # layer 5 never had a gradient: no data
    step = step.assign(grad_norm=(("step", "layer"), grad), nonfinite=(("step", "layer"), count))
    da = heatmap_data(step, stat="grad_norm", per="step", bins=10, layers="all")["run"]
    assert np.isfinite(da.values[3, 2])  # the mean ignores the NaN step ...
    from gradflow.analyses.heatmaps import cell_states
    states = cell_states(da)
    assert states[3, 2] == NONFINITE and (np.delete(states[:, 2], 3) == 0).all()  # ... the mark does not
    assert (states[:, 5] == NO_DATA).all()
    per_epoch = cell_states(heatmap_data(step, stat="grad_norm", per="epoch", layers="all")["run"])
    assert per_epoch[3, 2] == NONFINITE  # step 37 is in epoch 3
    fig = heatmaps(step, stat="grad_norm", per="step", bins=10, layers="all")
    np.testing.assert_array_equal(panels(fig)["run"].collections[1].get_array()[3, 2], NONFINITE)


def test_layer_filters_by_pattern_and_module_type(run_factory):
    layers = [("conv1", "Conv2d"), ("bn1", "BatchNorm2d"), ("layer1.0.conv1", "Conv2d"),
              ("layer1.0.bn1", "BatchNorm2d"), ("layer2.0.conv1", "Conv2d"), ("fc", "Linear")]
    step, epoch = run_factory(0, layers=layers)
    picked = heatmap_data(epoch, layers="layer1.*,fc")["run"]
    assert list(picked["layer"].values) == ["layer1.0.conv1", "layer1.0.bn1", "fc"]
    convs = heatmap_data(step, stat="grad_norm", per="step", module_type="Conv2d")["run"]
    assert list(convs["layer"].values) == ["conv1", "layer1.0.conv1", "layer2.0.conv1"]
    np.testing.assert_allclose(convs.values, step["grad_norm"].sel(layer=list(convs["layer"].values)).values)
    both = heatmap_data(epoch, layers="layer*", module_type="BatchNorm2d")["run"]
    assert list(both["layer"].values) == ["layer1.0.bn1"]
    with pytest.raises(GradflowError, match="matches none of the 6 layers"):
        heatmap_data(epoch, layers="blocks.*")
    with pytest.raises(GradflowError, match="type\\(s\\) BatchNorm2d, Conv2d, Linear"):
        heatmap_data(epoch, module_type="LayerNorm")


def test_layer_axis_names_layers_that_fit_and_groups_the_rest():
    few = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]
    axis = layer_axis(few)
    assert axis.labels == few and axis.ticks == [0, 1, 2, 3]
    resnet = ["conv1"] + [f"layer{i}.{b}.conv{c}" for i in range(1, 5) for b in range(2) for c in range(1, 3)] * 3 + ["fc"]
    axis = layer_axis(resnet, max_named=10)
    assert axis.labels[:3] == ["conv1", "layer1", "layer2"] and axis.labels[-1] == "fc"
    assert len(axis.separators) == len(axis.labels) - 1
    gpt = [f"transformer.h.{i}.{m}" for i in range(12) for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2")]
    assert layer_axis(gpt).labels == [f"transformer.h.{i}" for i in range(12)]
    mlp = [f"layers.{i}" for i in range(200)]
    axis = layer_axis(mlp)
    assert 10 <= len(axis.labels) <= 14 and all(mlp[t] == label for t, label in zip(axis.ticks, axis.labels))


def test_layout_draws_row_and_column_headers_and_a_key(sweep_factory):
    from gradflow.analyses.panel_grid import PanelLayout
    tree = sweep_factory(names=["a-short0", "a-short1"])
    layout = PanelLayout([["a-short0", "a-short1"]], ["depth 3"], ["short skips off", "short skips on"],
                         "rows: depth; columns: short skips")
    fig = heatmaps(tree, grid=layout)
    axes = panels(fig)
    assert [axes[n].get_title() for n in ("a-short0", "a-short1")] == ["short skips off", "short skips on"]
    assert [t.get_text() for t in axes["a-short0"].texts] == ["depth 3"]
    assert fig.get_suptitle() == "rows: depth; columns: short skips"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["no data", "no update (0)", "non-finite gradient (NaN/Inf)"]


def test_stats_without_a_layer_dimension_get_an_error_listing_only_valid_ones(sweep):
    for stat in ("train_loss", "val_loss", "num_steps"):
        with pytest.raises(GradflowError, match="has no layer dimension") as info:
            heatmaps(sweep, stat=stat)
        assert "train_loss" not in info.value.args[0].split("draw one of:")[1]
    with pytest.raises(GradflowError, match="has no layer dimension.*the loss curves") as info:
        heatmaps(sweep, stat="train_loss", per="step")
    assert "loss" not in info.value.args[0].split("draw one of:")[1]
    with pytest.raises(GradflowError, match="recorded per epoch only; use --per epoch"):
        tree = sweep.copy()
        for name in ("simple-d1-bn0-long_sum-short0", "simple-d1-bn0-long_sum-short1"):
            tree[name] = xr.DataTree(tree[name].to_dataset().drop_vars("update_mean_abs"),
                                     children={"epochs": tree[f"{name}/epochs"]})
        heatmaps(tree, stat="update_mean_abs", per="step")


def test_the_nan_row_of_an_epoch_cut_short_is_no_data_after_resume(tmp_path):
    """close() (or a crash) within an epoch: the resumed Recorder writes that epoch's row with NaN |ΔW|
    (its start weights are gone); no gradient was non-finite, so it is "no data", not red."""
    import torch
    from torch import nn

    import gradflow

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def steps(n):
        for _ in range(n):
            optimizer.zero_grad()
            model(torch.randn(3, 4)).pow(2).mean().backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters())
            optimizer.step()

    store = tmp_path / "cut.zarr"
    with gradflow.Recorder(model, optimizer, store):
        steps(3)  # epoch 0, never ended
    with gradflow.Recorder(model, optimizer, store, mode="a") as rec:
        steps(3)
        rec.end_epoch()
    da = heatmap_data(gradflow.open_tree(store))["run"]
    assert np.isnan(da.values[0]).all() and np.isfinite(da.values[1]).all() and (da.values[1] > 0).all()
    np.testing.assert_array_equal(cell_states(da), [[NO_DATA, NO_DATA], [0, 0]])


def test_group_separators_have_a_colour_no_cell_has(run_factory):
    """The lines between layer groups were white, the colour of "no update (0)": a separator beside a
    frozen layer read as one more frozen column. Their colour must be far from every colour a cell
    can take: every colour of the colour map and the three state colours."""
    import matplotlib
    from matplotlib.colors import to_rgb

    from gradflow.analyses.heatmaps import STATE_COLOURS

    layers = [(f"layer{g}.{i}.conv", "Conv2d") for g in range(4) for i in range(10)]  # > 28: grouped
    step, epoch = run_factory(0, layers=layers)
    ax = panels(heatmaps(epoch))["run"]
    separators = ax.get_lines()
    assert len(separators) == 3  # between the 4 groups
    cells = [*matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3], *map(to_rgb, STATE_COLOURS.values())]
    for line in separators:
        nearest = min(np.linalg.norm(np.subtract(to_rgb(line.get_color()), cell)) for cell in cells)
        assert nearest > 0.25, (line.get_color(), nearest)


def colour_label(fig):
    return next(ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>")


def test_the_colour_label_says_how_a_cell_combines_steps(sweep):
    """A step statistic per epoch is the mean of each epoch's recorded steps (see the test above), and
    so is a bin of steps; the label said only "‖W‖₂ per epoch". An epoch-group variable, or one step
    per row, combines nothing and says nothing more."""
    from gradflow.analyses.html import heatmap_figure

    label = colour_label(heatmaps(sweep, stat="param_norm", per="epoch"))
    assert label.startswith("‖W‖₂ per epoch (mean of the epoch's recorded steps)"), label
    assert "mean of the epoch's recorded steps" in heatmap_figure(sweep, stat="param_norm", per="epoch").layout.title.text
    assert "(mean of each bin of recorded steps)" in colour_label(heatmaps(sweep, stat="grad_norm", per="step", bins=5))
    assert "mean of" not in colour_label(heatmaps(sweep, stat="grad_norm", per="step", bins=200))  # 12 steps: one a row
    assert colour_label(heatmaps(sweep)) == "mean |ΔW| per epoch, log scale"  # from the epoch group
