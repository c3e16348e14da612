"""The step summary (gradflow/summary.py) and the long-run store layout: chunk-aligned flushes, codec.

Every summary value is checked against numpy over the raw rows read back from the store.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from torch import nn

import gradflow
from gradflow import summary
from gradflow.store import STEP_VARIABLES, LayerTable, Rows, RunStore, step_chunk


def new_store(path, n_layers: int) -> RunStore:
    table = LayerTable([f"layer{i}" for i in range(n_layers)], ["Linear"] * n_layers, [10] * n_layers)
    return RunStore(str(path), None, table, {"every": 1, "per_parameter": False}, 1, False)


def rows(start: int, n: int, n_layers: int, rng) -> dict[str, np.ndarray]:
    """``n`` rows of random figures (float64, as the Recorder hands them over) with NaN and ±Inf."""
    columns = {name: rng.lognormal(-3, 2, (n, n_layers)) for name in STEP_VARIABLES}
    grad = columns["grad_norm"]
    grad[rng.random(grad.shape) < 0.02] = np.nan
    grad[rng.random(grad.shape) < 0.01] = np.inf
    columns["update_ratio"][rng.random(grad.shape) < 0.01] = -np.inf
    steps = np.arange(start, start + n)
    return {**columns, "step": steps * 3, "epoch": steps // 100, "wall_time": steps * 0.1,
            "skipped": np.zeros(n, bool)}


def append(store: RunStore, sizes: list[int], n_layers: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for n in sizes:
        store.write(Rows(rows(store.n_steps, n, n_layers, rng), {}, store.n_steps + n))


def reference(values: np.ndarray) -> np.ndarray:
    """(4, layers): mean, min, max of the finite values of ``values (rows, layers)``, non-finite count."""
    out = np.full((4, values.shape[1]), np.nan)
    for j in range(values.shape[1]):
        column = values[:, j].astype(np.float64)
        finite = column[np.isfinite(column)]
        if finite.size:
            out[:3, j] = finite.mean(), finite.min(), finite.max()
        out[3, j] = column.size - finite.size
    return out


def check_against_raw(path, levels=summary.LEVELS, span=summary.SPAN) -> int:
    """Every stored block of every level equals numpy over the raw rows; returns the blocks checked."""
    raw = xr.open_zarr(path)
    n, checked = raw.sizes["step"], 0
    covered = zarr.open_group(str(path), mode="r")["summary"].attrs["rows"]
    assert covered == n // span * span
    for level in levels:
        ds = xr.open_zarr(path, group=f"summary/{level}")
        assert ds.sizes["block"] == covered // level
        assert list(ds["stat"].values) == list(summary.STATS)
        for name in STEP_VARIABLES:
            stored = ds[name].values
            values = raw[name].values
            for b in range(ds.sizes["block"]):
                expected = reference(values[b * level:(b + 1) * level])
                np.testing.assert_allclose(stored[b, 0], expected[0], rtol=1e-6)
                np.testing.assert_array_equal(stored[b, 1:], expected[1:].astype(np.float32))
                checked += 1
        steps = raw["step"].values
        np.testing.assert_array_equal(ds["first_step"].values, steps[:covered:level])
        np.testing.assert_array_equal(ds["last_step"].values, steps[level - 1:covered:level])
    return checked


def test_summary_matches_numpy_over_the_raw_rows(tmp_path):
    path = tmp_path / "run.zarr"
    store = new_store(path, 3)
    append(store, [10, 1000, 1024, 7000, 1, 9000, 555], 3)  # 18590 rows: two spans and a tail
    assert check_against_raw(path) > 0
    # A layer with no finite value in a block: NaN statistics, the whole block counted non-finite.
    ds = xr.open_zarr(path, group="summary/256")
    assert np.isinf(xr.open_zarr(path)["grad_norm"].values).any()
    assert (ds["grad_norm"].sel(stat="nonfinite").values > 0).all()


def test_small_levels_and_a_nan_only_block(tmp_path, small_summary):
    path = tmp_path / "run.zarr"
    store = new_store(path, 2)
    rng = np.random.default_rng(1)
    columns = rows(0, 37, 2, rng)
    columns["param_norm"][4:8, 1] = np.nan  # block 1 of layer 1: nothing finite
    store.write(Rows(columns, {}, 37))
    check_against_raw(path, levels=(4, 8), span=16)
    block = xr.open_zarr(path, group="summary/4")["param_norm"].isel(block=1, layer=1)
    assert np.isnan(block.sel(stat=["mean", "min", "max"]).values).all()
    assert block.sel(stat="nonfinite").item() == 4


def test_crash_mid_flush_leaves_no_wrong_summary(tmp_path, monkeypatch, small_summary):
    path = tmp_path / "run.zarr"
    store = new_store(path, 2)
    append(store, [20], 2, seed=2)
    # A flush that wrote raw rows and a summary span, then died before its commit:
    rng = np.random.default_rng(3)
    monkeypatch.setattr(store, "commit", lambda *args: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        store.write(Rows(rows(20, 30, 2, rng), {}, 50))
    written = zarr.open_group(str(path), mode="r", use_consolidated=False)["summary"]
    assert written.attrs["rows"] == 48  # spans up to row 48 written, only the first committed
    store.close()  # the process died: its writer lock is gone
    resumed = new_store(path, 2)  # trims the raw rows back to the 20 committed ones
    assert resumed.n_steps == 20 and resumed.summary.rows == 20
    assert zarr.open_group(str(path), mode="r")["summary"].attrs["rows"] == 16
    append(resumed, [13, 40], 2, seed=4)
    check_against_raw(path, levels=(4, 8), span=16)
    resumed.close()
    # A store without a summary (older gradflow) gets one, from its raw rows, when reopened.
    group = zarr.open_group(str(path), mode="a")
    del group["summary"]
    zarr.consolidate_metadata(str(path))
    new_store(path, 2)
    check_against_raw(path, levels=(4, 8), span=16)


def test_read_steps_bins_equal_numpy_over_the_bin_rows(tmp_path):
    path = tmp_path / "run.zarr"
    append(new_store(path, 3), [1024] * 20 + [300], 3)  # 20780 rows: summary covers 16384
    raw = xr.open_zarr(path)
    steps = raw["step"].values
    for bins, source in [(40, "summary/256"), (4, "summary/4096"), (300, "raw")]:
        binned = summary.read_steps(path, bins=bins, variables=["grad_norm", "update_ratio"])
        assert binned.attrs["source"] == source
        assert binned.sizes["step"] == bins and binned["num_rows"].sum() == raw.sizes["step"]
        assert binned["step"].values[0] == 0 and binned["step_end"].values[-1] == steps[-1] + 1
        for name in ("grad_norm", "update_ratio"):
            for i in range(bins):
                inside = (steps >= binned["step"].values[i]) & (steps < binned["step_end"].values[i])
                assert inside.sum() == binned["num_rows"].values[i]
                expected = reference(raw[name].values[inside])
                got = binned[name].isel(step=i).transpose("stat", "layer").values
                np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
                np.testing.assert_array_equal(got[1:], expected[1:].astype(np.float32))
    assert summary.read_steps(path, bins=300, raw_fallback=False) is None


def test_store_with_summary_opens_with_plain_xarray(tmp_path, monkeypatch):
    monkeypatch.setattr(summary, "LEVELS", (2, 4))
    monkeypatch.setattr(summary, "SPAN", 4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.zarr"
    with gradflow.Recorder(model, optimizer, path) as rec:
        for _ in range(10):
            optimizer.zero_grad()
            model(torch.randn(5, 3)).square().mean().backward()
            optimizer.step()
        rec.end_epoch(train_loss=1.0)
    ds = xr.open_zarr(path, group="summary/2")
    assert ds["grad_norm"].dims == ("block", "stat", "layer")
    assert ds.sizes["block"] == 4 and list(ds["layer"].values) == ["0", "2"]
    tree = xr.open_datatree(path, engine="zarr")  # summary groups align with the run's coordinates
    assert set(tree.children) == {"epochs", "summary"}
    assert gradflow.open(path).sizes["step"] == 10
    check_against_raw(path, levels=(2, 4), span=4)


def files(path, array: str) -> dict[str, tuple[int, int]]:
    """Chunk keys of ``array`` → (inode, mtime): a rewritten chunk gets a new inode (atomic write)."""
    out = {}
    for root, _, names in os.walk(path / array / "c"):
        for name in names:
            stat = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), path)] = (stat.st_ino, stat.st_mtime_ns)
    return out


def changed(before: dict, after: dict) -> set[str]:
    return {key for key in before if after.get(key) != before[key]}


def test_flushes_write_whole_chunks_and_rewrite_at_most_one(tmp_path):
    n_layers = 300
    chunk = step_chunk(n_layers)
    assert chunk == 1024 and step_chunk(2000) == 512 and step_chunk(10**5) == 16
    path = tmp_path / "run.zarr"
    store = new_store(path, n_layers)
    arrays = [*STEP_VARIABLES, "step", "wall_time"]
    append(store, [1024], n_layers)
    for sizes, rewritten in [([1024], 0), ([1024, 1024], 0), ([10], 0), ([10], 1), ([1024], 1)]:
        before = {a: files(path, a) for a in arrays}
        append(store, sizes, n_layers)
        for a in arrays:
            after = files(path, a)
            assert len(changed(before[a], after)) == rewritten, (a, sizes)
            assert len(after) > len(before[a]) or sizes == [10]
    assert zarr.open_group(str(path), mode="r")["grad_norm"].chunks == (1024, n_layers)


def test_summary_chunks_are_written_once(tmp_path):
    path = tmp_path / "run.zarr"
    store = new_store(path, 2)
    seen: dict[str, tuple[int, int]] = {}
    for _ in range(20):
        append(store, [1024], 2)
        now = {key: value for level in summary.LEVELS
               for key, value in files(path, f"summary/{level}/grad_norm").items()}
        assert not changed(seen, now)
        seen = now
    assert len(seen) == len(summary.LEVELS) * (20 * 1024 // summary.SPAN)


def test_codec_is_blosc_zstd_with_shuffle(tmp_path):
    new_store(tmp_path / "run.zarr", 2)
    codecs = zarr.open_group(str(tmp_path / "run.zarr"), mode="r")["grad_norm"].metadata.codecs
    blosc = [c for c in codecs if type(c).__name__ == "BloscCodec"]
    assert blosc and (blosc[0].cname.value, blosc[0].clevel, blosc[0].shuffle.value) == ("zstd", 1, "shuffle")


@pytest.mark.parametrize("bins", [0, -3])
def test_read_steps_rejects_bad_bins(tmp_path, bins):
    append(new_store(tmp_path / "run.zarr", 2), [5], 2)
    with pytest.raises(ValueError, match="bins must be positive"):
        summary.read_steps(tmp_path / "run.zarr", bins=bins)


def test_overwritten_run_gets_a_fresh_summary(tmp_path, small_summary):
    path = tmp_path / "run.zarr"
    old = new_store(path, 2)
    append(old, [40], 2, seed=5)
    old.close()
    table = LayerTable(["layer0", "layer1"], ["Linear"] * 2, [10] * 2)
    fresh = RunStore(str(path), None, table, {"every": 1, "per_parameter": False}, 1, False, mode="w")
    assert fresh.n_steps == 0 and fresh.summary.rows == 0
    append(fresh, [20], 2, seed=6)
    check_against_raw(path, levels=(4, 8), span=16)
