from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from gradflow.analyses.report import figures, open_tree
from gradflow.train import TrainConfig, train


def stored(store, group, name):
    """A variable read with plain xarray + zarr (not gradflow), conv layers in recorded depth order."""
    ds = xr.open_zarr(str(store), group=group, consolidated=False)
    ds = ds.isel(layer=np.argsort(ds["depth"].values))
    convs = ["Conv" in str(t) for t in ds["module_type"].values]
    return ds[name].isel(layer=np.flatnonzero(convs)).values


def panels(fig):
    return {ax.get_label(): ax for ax in fig.axes if ax.collections and not ax.get_label().startswith("<")}


def test_plot_writes_the_figures_and_prints_their_paths(tiny_sweep, tmp_path, cli, variants):
    result = cli("plot", tiny_sweep, "--out", tmp_path / "figs")
    assert result.exit_code == 0, result.output
    paths = [Path(line) for line in result.output.split()]
    assert sorted(p.name for p in paths) == ["curves.png", "heatmap-update_mean_abs-epoch.png"]
    assert all(p.is_file() and p.read_bytes()[:4] == b"\x89PNG" for p in paths)

    figs = figures(open_tree(tiny_sweep))
    heat = panels(figs["heatmap-update_mean_abs-epoch"])
    assert sorted(heat) == variants
    for name in variants:
        expected = stored(tiny_sweep, f"{name}/epochs", "update_mean_abs")
        np.testing.assert_array_equal(np.ma.getdata(heat[name].collections[0].get_array()), expected)
        val_line = [line for line in figs["curves"].axes[1].lines if line.get_label() == name][0]
        np.testing.assert_array_equal(val_line.get_ydata(), xr.open_zarr(str(tiny_sweep), group=f"{name}/epochs",
                                                                          consolidated=False)["val_loss"].values)


def test_per_step_stat_and_several_formats(tiny_sweep, tmp_path, cli, variants):
    result = cli("plot", tiny_sweep, "--stat", "grad_norm", "--per", "step", "--format", "png,svg,pdf",
                 "--out", tmp_path)
    assert result.exit_code == 0, result.output
    names = sorted(Path(line).name for line in result.output.split())
    assert names == sorted(f"{stem}.{fmt}" for stem in ("heatmap-grad_norm-step", "curves")
                           for fmt in ("png", "svg", "pdf"))
    heat = panels(figures(open_tree(tiny_sweep), stat="grad_norm", per="step")["heatmap-grad_norm-step"])
    for name in variants:  # 2 steps, fewer than the 200 bins: one row per recorded step
        expected = stored(tiny_sweep, name, "grad_norm")
        np.testing.assert_allclose(np.ma.getdata(heat[name].collections[0].get_array()), expected, rtol=1e-6)


def test_single_run_store_from_train(tmp_path, cli):
    store = tmp_path / "run.zarr"
    config = TrainConfig(depth=1, levels=2, width=4, size=32, n_train=4, n_val=2, epochs=2, batch_size=2,
                         batch_norm=False, device="cpu")
    train(config, store)
    result = cli("plot", store, "--out", tmp_path / "figs")
    assert result.exit_code == 0, result.output
    heat = panels(figures(open_tree(store))["heatmap-update_mean_abs-epoch"])
    assert list(heat) == ["run"]
    np.testing.assert_array_equal(np.ma.getdata(heat["run"].collections[0].get_array()),
                                  stored(store, "epochs", "update_mean_abs"))


@pytest.mark.parametrize("make_store, message", [
    (lambda path: None, "no gradflow store"),
    (lambda path: zarr.open_group(str(path), mode="w").create_array("x", shape=(2,), dtype="f4"), "not a gradflow store"),
])
def test_missing_or_foreign_store_is_one_line_exit_2(make_store, message, tmp_path, run_main):
    store = tmp_path / "other.zarr"
    make_store(store)
    code, out, err = run_main("plot", store, "--out", tmp_path / "figs")
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in out + err


def test_store_from_a_newer_schema_is_refused(tiny_sweep, tmp_path, run_main, variants):
    store = tmp_path / "newer.zarr"
    import shutil

    shutil.copytree(tiny_sweep, store)
    group = zarr.open_group(str(store), mode="a", use_consolidated=False)[variants[0]]
    group.attrs["gradflow_schema"] = 999
    zarr.consolidate_metadata(str(store))
    code, _, err = run_main("plot", store, "--out", tmp_path / "figs")
    assert code == 2 and "newer gradflow" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--format", "gif"], "--format"), (["--per", "hour"], "--per must be"), (["--per", "steps"], "--per must be"),
    (["--stat", "nope"], "'nope'"),
    (["--stat", "train_loss"], "'train_loss' has no layer dimension"),
    (["--stat", "val_loss", "--per", "step"], "'val_loss' has no layer dimension"),
    (["--stat", "lr"], "'lr' has no layer dimension"),
    (["--stat", "skipped"], "'skipped' has no layer dimension"),
    (["--layers", "nothing.*"], "matches none of the"),
    (["--module-type", "Linear"], "--module-type 'Linear' matches no layer"),
])
def test_bad_plot_options(args, message, tiny_sweep, tmp_path, run_main):
    code, out, err = run_main("plot", tiny_sweep, "--out", tmp_path / "figs", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in out + err and not (tmp_path / "figs").exists()
    if "--stat" in args:  # the list of valid names never offers a name that has no heatmap
        offered = err.split("draw one of:")[1]
        assert not any(bad in offered for bad in ("train_loss", "val_loss", "lr,", "skipped"))


def test_layer_filters_pick_panels_columns(tiny_sweep, tmp_path, cli, variants):
    fig = figures(open_tree(tiny_sweep), layers="down*", module_type="Conv2d")["heatmap-update_mean_abs-epoch"]
    heat = {ax.get_label(): ax for ax in fig.axes if ax.get_label() in variants}
    for name in variants:
        names = [t.get_text() for t in heat[name].get_xticklabels()]
        assert names and all(n.startswith("down") for n in names)
        ds = xr.open_zarr(str(tiny_sweep), group=f"{name}/epochs", consolidated=False)
        expected = ds["update_mean_abs"].sel(layer=names).values
        np.testing.assert_array_equal(np.ma.getdata(heat[name].collections[0].get_array()), expected)
    result = cli("plot", tiny_sweep, "--layers", "down*", "--module-type", "Conv2d", "--out", tmp_path)
    assert result.exit_code == 0, result.output


def test_out_that_is_a_file_is_one_line_exit_2_and_kept(tiny_sweep, tmp_path, run_main):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    code, out, err = run_main("plot", tiny_sweep, "--out", taken)
    assert code == 2 and err.startswith("error: ") and "not a folder" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in out + err
    assert taken.read_text() == "mine"
