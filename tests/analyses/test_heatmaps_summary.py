"""Per-step heatmaps of long runs read the store's step summary (gradflow.summary) when it has enough blocks."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

import gradflow
from gradflow.analyses.heatmaps import heatmap_data
from gradflow import summary
from gradflow.analyses.report import open_tree
from gradflow.store import STEP_VARIABLES, LayerTable, Rows, RunStore


@pytest.fixture
def small_levels(monkeypatch):
    monkeypatch.setattr(summary, "LEVELS", (4, 8))
    monkeypatch.setattr(summary, "SPAN", 16)


def record(url: str, group: str | None, n_rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    table = LayerTable(["a", "b", "c"], ["Linear"] * 3, [4, 4, 4])
    store = RunStore(url, group, table, {"every": 1, "per_parameter": False}, 1, False)
    for start in range(0, n_rows, 50):
        n = min(50, n_rows - start)
        columns = {name: rng.lognormal(-2, 1, (n, 3)) for name in STEP_VARIABLES}
        columns["grad_norm"][rng.random((n, 3)) < 0.05] = np.nan
        store.write(Rows({**columns, "step": np.arange(start, start + n), "epoch": np.zeros(n, int),
                          "wall_time": np.zeros(n), "skipped": np.zeros(n, bool)}, {}, start + n))


def nan_mean_per_bin(raw: xr.Dataset, da: xr.DataArray) -> np.ndarray:
    steps = raw["step"].values
    out = []
    for first, end in zip(da["step"].values, da["step_end"].values):
        values = raw["grad_norm"].values[(steps >= first) & (steps < end)].astype(np.float64)
        values[~np.isfinite(values)] = np.nan
        out.append(np.nanmean(values, axis=0))
    return np.array(out)


def test_single_run_heatmap_bins_come_from_the_summary(tmp_path, small_levels):
    path = tmp_path / "run.zarr"
    record(str(path), None, 203, seed=0)  # 192 rows summarised: 24 blocks of 8, 48 of 4
    da = heatmap_data(open_tree(path), stat="grad_norm", per="step", layers="all", bins=10)["run"]
    raw = xr.open_zarr(path)
    assert da.sizes["step"] == 10 and da["step"].values[0] == 0 and da["step_end"].values[-1] == 203
    np.testing.assert_allclose(da.values, nan_mean_per_bin(raw, da), rtol=1e-5)
    # Read from the coarsest level with ≥ 10 blocks: change one stored block mean and the first bin moves.
    level = zarr.open_group(str(path), mode="a")["summary/8/grad_norm"]
    block = level[0]
    block[0] += 1000.0
    level[0] = block
    moved = heatmap_data(open_tree(path), stat="grad_norm", per="step", layers="all", bins=10)["run"]
    assert (moved.values[0] > da.values[0] + 10).any()
    np.testing.assert_array_equal(moved.values[1:], da.values[1:])


def test_sweep_runs_use_their_own_summary_and_short_runs_fall_back_to_raw(tmp_path, small_levels):
    path = tmp_path / "sweep.zarr"
    record(str(path), "long", 150, seed=1)
    record(str(path), "short", 30, seed=2)  # 16 summarised rows: 4 blocks < 10 bins → raw rows
    tree = gradflow.open(path)
    arrays = heatmap_data(tree, stat="grad_norm", per="step", layers="all", bins=10)
    for name, rows in (("long", 150), ("short", 30)):
        raw = tree[name].to_dataset()
        assert arrays[name].sizes["step"] == 10 and arrays[name]["step_end"].values[-1] == rows
        np.testing.assert_allclose(arrays[name].values, nan_mean_per_bin(raw, arrays[name]), rtol=1e-5)
    assert "num_rows" in arrays["long"].coords and "num_rows" not in arrays["short"].coords
