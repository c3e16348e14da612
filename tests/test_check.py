"""Damaged stores: ``gradflow.open`` refuses them with what is damaged; ``check_store`` reports and repairs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

import gradflow
from gradflow import GradflowError
from gradflow.repair import check_store
from gradflow.store import LayerTable, Rows, RunStore

LAYERS = LayerTable(["a", "b"], ["Linear", "Linear"], [3, 5])
FIGURES = ("grad_norm", "grad_max_abs", "update_norm", "update_mean_abs", "update_max_abs",
           "param_norm", "update_ratio", "nonfinite")


def rows(start: int, n: int, epochs: range = range(0)) -> Rows:
    """``n`` step rows from step ``start`` (figure = step number) and the given epoch rows."""
    steps = {name: np.tile(np.arange(start, start + n, dtype=np.float32)[:, None], (1, 2))
             for name in FIGURES}
    steps.update(step=np.arange(start, start + n), epoch=np.zeros(n, dtype=np.int64),
                 wall_time=np.zeros(n), skipped=np.zeros(n, dtype=bool))
    k = len(epochs)
    ep = {} if not k else {"epoch": np.array(epochs), "num_steps": np.full(k, 10),
                           "update_mean_abs": np.ones((k, 2), np.float32),
                           "update_norm": np.ones((k, 2), np.float32), "val_loss": np.ones(k)}
    return Rows(steps, ep, start + n)


def make_store(path, steps: int = 2500, group: str | None = None) -> None:
    """A closed run of ``steps`` steps (chunks of 1024 steps) and 3 epochs, written as a Recorder would."""
    store = RunStore(str(path), group, LAYERS, {"every": 1, "per_parameter": False}, 1, False)
    store.write(rows(0, steps, range(3)))
    store.close()


def test_healthy_store_checks_ok(tmp_path):
    make_store(tmp_path / "run.zarr")
    lines, damaged = check_store(str(tmp_path / "run.zarr"))
    assert not damaged and lines == ["(run): ok, 2500 steps, 3 epochs"]
    # Every chunk is stored, even one holding only fill values (all-False `skipped`, epoch 0).
    assert (tmp_path / "run.zarr/skipped/c/2").exists() and (tmp_path / "run.zarr/epoch/c/0").exists()


@pytest.mark.parametrize("array, rows_kept", [("grad_norm", 1024), ("step", 1024), ("skipped", 2048)])
def test_missing_chunk_is_reported_and_repaired(tmp_path, array, rows_kept):
    store = tmp_path / "run.zarr"
    make_store(store)
    chunk = {"grad_norm": "c/1/0", "step": "c/1", "skipped": "c/2"}[array]
    (store / array / chunk).unlink()
    with pytest.raises(GradflowError, match=rf"damaged: ./{array}: chunk of rows \d+-\d+ is missing"):
        gradflow.open(store)
    lines, damaged = check_store(str(store))
    assert damaged and any("is missing" in line for line in lines)
    lines, _ = check_store(str(store), repair=True)
    assert lines[-1] == f"(run): repaired, kept {rows_kept} of 2500 steps and 3 of 3 epochs"
    ds = gradflow.open(store)
    assert ds.step.values.tolist() == list(range(rows_kept))
    np.testing.assert_array_equal(ds.grad_norm.values[:, 0], np.arange(rows_kept))
    assert check_store(str(store)) == ([f"(run): ok, {rows_kept} steps, 3 epochs"], False)
    assert zarr.open_group(store, mode="r").attrs["steps_seen"] == rows_kept


def test_repair_trims_the_summary_to_the_rows_it_keeps(tmp_path, monkeypatch):
    """Summary blocks past the repaired end are dropped (plain xarray readers of summary/<b> see
    them too); the blocks kept still match the raw rows they summarise."""
    from gradflow import summary

    monkeypatch.setattr(summary, "LEVELS", (4, 8))
    monkeypatch.setattr(summary, "SPAN", 16)
    store = tmp_path / "run.zarr"
    make_store(store)
    levels = zarr.open_group(store, mode="r")["summary"]
    assert levels.attrs["rows"] == 2496 and levels["8"]["grad_norm"].shape[0] == 312
    (store / "grad_norm" / "c/1/0").unlink()
    lines, _ = check_store(str(store), repair=True)
    assert lines[-1] == "(run): repaired, kept 1024 of 2500 steps and 3 of 3 epochs"
    levels = zarr.open_group(store, mode="r")["summary"]
    assert levels.attrs["rows"] == 1024
    for level in (4, 8):
        group = levels[str(level)]
        assert group["grad_norm"].shape[0] == group["last_step"].shape[0] == 1024 // level
        np.testing.assert_array_equal(group["last_step"][:], np.arange(level - 1, 1024, level))
        # figure = step number: a block's mean is its middle step, min its first, max its last
        stats = group["grad_norm"][:, :3, 0]
        first = np.arange(0, 1024, level)
        np.testing.assert_array_equal(stats, np.stack([first + (level - 1) / 2, first,
                                                       first + level - 1], axis=1))
    assert check_store(str(store)) == (["(run): ok, 1024 steps, 3 epochs"], False)


def test_unequal_lengths_and_steps_not_increasing(tmp_path):
    store = tmp_path / "run.zarr"
    make_store(store, steps=40)
    group = zarr.open_group(store, mode="r+")
    group["step"][30] = 3  # a second writer's rows interleaved
    group["grad_norm"].resize((35, 2))  # and an array of another length
    gradflow.store.consolidate(store, fresh=gradflow.store.ALL)
    lines, damaged = check_store(str(store))
    assert damaged
    assert any("step arrays of unequal length (grad_norm 35" in line for line in lines)
    assert any("step is not strictly increasing at row 30 (29 then 3)" in line for line in lines)
    with pytest.raises(GradflowError, match="damaged"):
        gradflow.open(store)
    check_store(str(store), repair=True)
    assert gradflow.open(store).step.values.tolist() == list(range(30))


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")
def test_leftover_partial_files_are_deleted_by_repair(tmp_path):
    store = tmp_path / "run.zarr"
    make_store(store, steps=10)
    (store / "zarr.0123abcd.partial").write_bytes(b"{")
    (store / "grad_norm/c/0/0.89ab.partial").write_bytes(b"xx")
    assert gradflow.open(store).sizes["step"] == 10  # harmless to readers
    lines, damaged = check_store(str(store))
    assert damaged and lines == ["(run): 2 leftover *.partial file(s)"]
    check_store(str(store), repair=True)
    assert not list(store.rglob("*.partial"))
    assert check_store(str(store)) == (["(run): ok, 10 steps, 3 epochs"], False)


def test_corrupt_root_metadata_is_one_line(tmp_path):
    store = tmp_path / "run.zarr"
    make_store(store, steps=5)
    (store / "zarr.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(GradflowError, match="damaged metadata") as err:
        gradflow.open(store)
    assert "\n" not in str(err.value)
    with pytest.raises(GradflowError, match="cannot be repaired"):
        check_store(str(store))


def test_corrupt_sweep_root_is_rebuilt(tmp_path):
    store = tmp_path / "sweep.zarr"
    make_store(store, steps=5, group="v1")
    make_store(store, steps=7, group="v2")
    (store / "zarr.json").write_text("{not json")
    lines, damaged = check_store(str(store))
    assert damaged and lines[0].startswith("zarr.json: damaged")
    check_store(str(store), repair=True)
    tree = gradflow.open(store)
    assert tree["v1"].sizes["step"] == 5 and tree["v2"].sizes["step"] == 7


def test_unknown_protocol_and_missing_store(tmp_path):
    for opener in (gradflow.open, gradflow.open_tree, check_store):
        with pytest.raises(GradflowError, match="foo://x.zarr: not a path or a known fsspec URL"):
            opener("foo://x.zarr")
    with pytest.raises(GradflowError, match="no gradflow store"):
        check_store(str(tmp_path / "missing.zarr"))


def test_repair_refuses_while_a_writer_holds_the_run(tmp_path):
    store = tmp_path / "run.zarr"
    make_store(store, steps=5)
    (store / "zarr.1.partial").write_bytes(b"")
    writer = RunStore(str(store), None, LAYERS, {"every": 1, "per_parameter": False}, 1, False)
    try:
        (store / "zarr.2.partial").write_bytes(b"")  # its own write in progress, say
        with pytest.raises(GradflowError, match="being written by a live Recorder"):
            check_store(str(store), repair=True)
    finally:
        writer.close()
    shutil.rmtree(store)
