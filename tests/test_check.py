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


@pytest.mark.parametrize("array, rows_kept", [("epoch", 1024), ("skipped", 2048)])
def test_missing_chunk_is_reported_and_repaired(tmp_path, array, rows_kept):
    """A missing chunk of ``skipped`` (whose fill values would pass for data, and which no
    numbering rebuilds), or of the steps' epoch labels where the epochs' num_steps do not give them
    (here every row says epoch 0, though each epoch counted 10 steps), cuts the run to the rows
    before it. (A lost ``step`` chunk, and epoch labels that num_steps gives, are rebuilt:
    tests/test_repair_epochs.py.)"""
    store = tmp_path / "run.zarr"
    make_store(store)
    chunk = {"epoch": "c/1", "skipped": "c/2"}[array]
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
    attrs = zarr.open_group(store, mode="r").attrs  # a resume numbers steps after all 2500 it took
    assert attrs["steps_seen"] == 2500 and attrs["step_restarts"] == [[rows_kept, 2500]]


def test_a_lost_figure_chunk_costs_only_its_own_figures(tmp_path, small_summary):
    """A missing chunk of a float figure reads as NaN: repair writes it as NaN (stored, so the run
    checks ok again) and keeps every row of every other variable, and of that figure's other chunks;
    the summary is cut to before it (the next Recorder recomputes it from the raw rows)."""
    store = tmp_path / "run.zarr"
    make_store(store)
    (store / "grad_norm" / "c/1/0").unlink()
    (store / "epochs" / "update_norm" / "c/0/0").unlink()
    lines, damaged = check_store(str(store))
    assert damaged and lines == [
        "(run): ./grad_norm: chunk of rows 1024-2047 is missing (its figures are lost: NaN)",
        "(run): epochs/update_norm: chunk of rows 0-2 is missing (its figures are lost: NaN)"]
    lines, _ = check_store(str(store), repair=True)
    assert lines[-1] == "(run): repaired, kept 2500 of 2500 steps and 3 of 3 epochs"
    assert check_store(str(store)) == (["(run): ok, 2500 steps, 3 epochs"], False)
    ds = gradflow.open(store)
    assert ds.step.values.tolist() == list(range(2500))
    lost = np.zeros(2500, bool)
    lost[1024:2048] = True
    assert np.isnan(ds.grad_norm.values[lost]).all()
    assert ds.grad_norm.attrs["lost_rows"] == [[1024, 2048]] and "lost_rows" not in ds.update_norm.attrs
    np.testing.assert_array_equal(ds.grad_norm.values[~lost, 0], np.arange(2500)[~lost])
    np.testing.assert_array_equal(ds.update_norm.values, np.tile(np.arange(2500.0)[:, None], (1, 2)))
    epochs = gradflow.open(store, group="epochs")
    assert np.isnan(epochs.update_norm.values).all() and epochs.epoch.values.tolist() == [0, 1, 2]
    assert zarr.open_group(store, mode="r")["summary"].attrs["rows"] == 1024


def test_repair_trims_the_summary_to_the_rows_it_keeps(tmp_path, small_summary):
    """Summary blocks past the repaired end are dropped (plain xarray readers of summary/<b> see
    them too); the blocks kept still match the raw rows they summarise."""
    store = tmp_path / "run.zarr"
    make_store(store)
    levels = zarr.open_group(store, mode="r")["summary"]
    assert levels.attrs["rows"] == 2496 and levels["8"]["grad_norm"].shape[0] == 312
    (store / "epoch" / "c/1").unlink()
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
    lines, damaged = check_store(str(store))  # damage (exit 1), not "no store"; nothing rebuilds it
    assert damaged and lines[0].startswith("zarr.json: damaged (JSONDecodeError); the folder holds a "
                                           "gradflow run's arrays") and "--repair" not in lines[0]


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


def resume(path, group: str | None = None) -> RunStore:
    return RunStore(str(path), group, LAYERS, {"every": 1, "per_parameter": False}, 1, False)


@pytest.mark.parametrize("group, file", [(None, "grad_norm/zarr.json"), (None, "summary/256/zarr.json"),
                                         (None, "epochs/zarr.json"), ("v1", "v1/zarr.json"),
                                         ("v1", "v1/summary/4096/grad_norm/zarr.json")])
@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_damaged_metadata_file_is_reported_and_rewritten(tmp_path, group, file, damage):
    """Readers of the consolidated metadata do not see it; zarr.open_array, xarray with
    consolidated=False and a resumed Recorder do. Repair rewrites it from the committed copy."""
    import json

    import xarray as xr

    store = tmp_path / "run.zarr"
    make_store(store, group=group)
    original = json.loads((store / file).read_bytes())
    if damage == "truncated":
        with open(store / file, "r+b") as f:  # truncate -s 20
            f.truncate(20)
    else:
        (store / file).unlink()
    problem = "damaged (JSONDecodeError)" if damage == "truncated" else "missing"
    lines, damaged = check_store(str(store))
    assert damaged and lines == [f"{group or '(run)'}: {file}: {problem}"]
    with pytest.raises(GradflowError) as err:
        resume(store, group)
    assert str(err.value) == (f"{store if not group else f'{store} (group {group!r})'} is damaged "
                              f"({file}: {problem}); run `gradflow check {store} --repair` first")
    lines, _ = check_store(str(store), repair=True)
    assert lines[-1] == f"{group or '(run)'}: repaired, kept 2500 of 2500 steps and 3 of 3 epochs"
    assert json.loads((store / file).read_bytes()) == original
    assert check_store(str(store)) == ([f"{group or '(run)'}: ok, 2500 steps, 3 epochs"], False)
    run = store / group if group else store
    assert zarr.open_array(run / "grad_norm", mode="r").shape == (2500, 2)
    ds = xr.open_zarr(store, group=group, consolidated=False)
    np.testing.assert_array_equal(ds.grad_norm.values[:, 1], np.arange(2500))
    assert xr.open_zarr(store, group=f"{group}/epochs" if group else "epochs",
                        consolidated=False).sizes["epoch"] == 3
    assert xr.open_zarr(store, group=f"{group}/summary/4096" if group else "summary/4096",
                        consolidated=False).sizes["block"] == 0
    resume(store, group).close()


def test_missing_summary_chunk_is_reported_and_recomputed(tmp_path, small_summary):
    """The summary is held to the raw arrays' rule; repair trims it to before the hole and the next
    writer recomputes the blocks from the raw rows."""
    store = tmp_path / "run.zarr"
    make_store(store)
    chunk = store / "summary/4/grad_norm/c/1/0/0"  # blocks 4-7: rows 16-31
    chunk.unlink()
    lines, damaged = check_store(str(store))
    assert damaged and lines == ["(run): summary/4/grad_norm: chunk of blocks 4-7 is missing"]
    with pytest.raises(GradflowError, match=r"damaged: summary/4/grad_norm: chunk of blocks 4-7"):
        gradflow.open(store)
    with pytest.raises(GradflowError, match=r"is damaged \(summary/4/grad_norm: chunk of blocks 4-7 "
                                            r"is missing\); run `gradflow check .* --repair` first"):
        resume(store)
    lines, _ = check_store(str(store), repair=True)
    assert lines[-1] == "(run): repaired, kept 2500 of 2500 steps and 3 of 3 epochs"  # raw rows all kept
    levels = zarr.open_group(store, mode="r")["summary"]
    assert levels.attrs["rows"] == 16
    assert [levels[str(b)][name].shape[0] for b in (4, 8) for name in ("grad_norm", "first_step")] \
        == [4, 4, 2, 2]
    assert check_store(str(store)) == (["(run): ok, 2500 steps, 3 epochs"], False)
    writer = resume(store)  # recomputes the summary from the raw rows, and goes on
    writer.write(rows(2500, 100))
    writer.close()
    assert chunk.exists()
    levels = zarr.open_group(store, mode="r")["summary"]
    assert levels.attrs["rows"] == 2592
    for level in (4, 8):
        group = levels[str(level)]
        first = np.arange(0, 2592, level)
        np.testing.assert_array_equal(group["first_step"][:], first)
        np.testing.assert_array_equal(group["last_step"][:], first + level - 1)
        for column in (0, 1):  # figure = step number: mean is the middle step, min first, max last
            np.testing.assert_array_equal(group["grad_norm"][:, :, column], np.stack(
                [first + (level - 1) / 2, first, first + level - 1, np.zeros(len(first))], axis=1))
    assert check_store(str(store)) == (["(run): ok, 2600 steps, 3 epochs"], False)


def test_repair_with_a_partial_file_at_the_root_warns_nothing(tmp_path):
    import warnings

    store = tmp_path / "run.zarr"
    make_store(store, steps=10)
    (store / "zarr.json.partial").write_bytes(b"{")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lines, _ = check_store(str(store), repair=True)
    assert lines == ["(run): 1 leftover *.partial file(s)",
                     "(run): repaired, kept 10 of 10 steps and 3 of 3 epochs"]
    assert not (store / "zarr.json.partial").exists()


def test_recorder_on_a_store_whose_root_metadata_is_damaged_is_one_line(tmp_path):
    store = tmp_path / "run.zarr"
    make_store(store)
    (store / "zarr.json").write_bytes((store / "zarr.json").read_bytes()[:20])
    for mode in ("a", "w", "w-"):
        with pytest.raises(GradflowError, match=r"root zarr.json is damaged \(JSONDecodeError\); .*no "
                                                r"repair rebuilds: restore it from a backup"):
            RunStore(str(store), None, LAYERS, {"every": 1, "per_parameter": False}, 1, False, mode=mode)


# -- chunk files that exist but do not decode ------------------------------------------------------

DAMAGE = {"truncated": lambda data: data[:len(data) // 2], "empty": lambda data: b"",
          "garbage": lambda data: bytes(range(256)) * 4,
          # One bit flipped mid-file (bit rot): blosc/zstd would decode it to other numbers
          # silently; the chunk's CRC-32C (store.CHECKSUM) no longer matches.
          "bitflip": lambda data: data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0x10])
          + data[len(data) // 2 + 1:]}


def test_a_chunk_without_a_checksum_that_does_not_decode_keeps_the_codecs_words(tmp_path):
    """A store written before every array ended in crc32c: a garbage chunk is named by the codec's
    own error, as before (only a checksum mismatch is reworded)."""
    from zarr.codecs import BytesCodec, ZstdCodec

    from gradflow.check import _undecodable

    array = zarr.create_array(tmp_path / "old.zarr", shape=(4,), chunks=(4,), dtype="float32",
                              serializer=BytesCodec(), compressors=[ZstdCodec()])
    array[:] = np.arange(4, dtype=np.float32)
    (tmp_path / "old.zarr/c/0").write_bytes(b"garbage")
    why = _undecodable(array.store, array, (0,), "c/0")
    assert why.startswith("7 bytes that do not decode, ") and "CRC-32C" not in why, why


def damage(path, how: str) -> bytes:
    """Damage a chunk file in place (truncate / empty / overwrite); returns the damaged bytes."""
    data = DAMAGE[how](path.read_bytes())
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("how", sorted(DAMAGE))
@pytest.mark.parametrize("chunk, says, kept", [
    ("step/c/1", "(row i is step i·1: --repair rebuilds it)", 2500),
    ("grad_norm/c/1/0", "(its figures are lost: NaN)", 2500),
    ("skipped/c/1", "", 1024),
    ("layer/c/0", "(--repair rebuilds it from the run's fixed_coordinates attribute)", 2500),
    ("epochs/num_steps/c/0", "(--repair recounts all 3 from the step rows)", 2500)])
def test_a_chunk_that_does_not_decode_is_lost_like_a_missing_one(tmp_path, how, chunk, says, kept):
    """Check decodes every chunk: a truncated, empty or garbage chunk file is named with its bytes
    and takes the missing chunk's repair (rebuilt, NaN, recounted or cut); repair keeps its bytes
    beside the store, never deletes them."""
    store = tmp_path / "run.zarr"
    make_store(store)
    bad = damage(store / chunk, how)
    lines, damaged = check_store(str(store))
    array, _, key = chunk.partition("/c/")
    label = array if "/" in array else f"./{array}"
    rows = {"step": "1024-2047", "grad_norm": "1024-2047", "skipped": "1024-2047", "layer": "0-1",
            "epochs/num_steps": "0-2"}[array]
    # Every one fails the chunk's CRC-32C (the codec decoded first), said in words, not raw bytes.
    assert damaged and lines == [
        f"(run): {label}: chunk of rows {rows} is damaged ({chunk}: {len(bad)} bytes whose CRC-32C "
        f"checksum does not match (changed on disk))" + (f" {says}" if says else "")]
    lines, damaged = check_store(str(store), repair=True)
    assert not damaged and lines[-1].startswith(
        f"(run): repaired, kept {kept} of 2500 steps and 3 of 3 epochs; 1 chunk file(s) that do not "
        f"decode moved to {tmp_path}/.run.zarr.gradflow/damaged/")
    kept_files = list((tmp_path / ".run.zarr.gradflow/damaged").glob(f"*/{chunk}"))
    assert len(kept_files) == 1 and kept_files[0].read_bytes() == bad
    assert check_store(str(store)) == ([f"(run): ok, {kept} steps, 3 epochs"], False)
    ds = gradflow.open(store)
    assert ds.step.values.tolist() == list(range(kept))  # rows() wrote step i at row i
    assert ds.layer.values.tolist() == LAYERS.names
    figures = np.arange(kept, dtype=np.float32)
    if array == "grad_norm":
        figures[1024:2048] = np.nan
    np.testing.assert_array_equal(ds.grad_norm.values[:, 0], figures)
    assert gradflow.open(store, group="epochs").num_steps.values.tolist() == \
        ([2500] + [0, 0] if array == "epochs/num_steps" else [10, 10, 10])  # every label 0


def test_a_resume_decodes_the_chunks_and_says_what_is_true(tmp_path):
    """A resumed writer refuses a chunk it reads or appends to that does not decode (the rows its
    summary has not covered, and the last chunk, which a crash mid-write tears); where no repair
    rebuilds the damage, it says so instead of sending the user to --repair. Rows the summary
    covers are listed but not decoded (a resume costs the same at any length): ``gradflow check``
    finds a damaged one."""
    from gradflow.summary import SPAN

    store = tmp_path / "run.zarr"
    make_store(store, steps=SPAN + 808)  # the summary covers rows 0-8191
    intact = (store / "grad_norm/c/0/0").read_bytes()
    damage(store / "grad_norm/c/0/0", "truncated")
    resume(store).close()  # rows 0-1023 are neither read nor appended to: resumed as they are
    assert check_store(str(store))[1] is True  # check decodes every chunk: it finds the damage
    (store / "grad_norm/c/0/0").write_bytes(intact)
    for chunk, rows in (("grad_norm/c/8/0", "8192-8999"), ("grad_norm/c/7/0", "7168-8191")):
        saved = (store / chunk).read_bytes()
        damage(store / chunk, "truncated")
        if chunk.endswith("7/0"):  # summarised, so not decoded, unless the summary is behind
            resume(store).close()
            zarr.open_group(store / "summary", mode="r+", use_consolidated=False).attrs["rows"] = 0
            gradflow.store.consolidate(store, fresh=gradflow.store.ALL)
        with pytest.raises(GradflowError) as err:
            resume(store)
        assert str(err.value).startswith(f"{store} is damaged (./grad_norm: chunk of rows {rows} is "
                                         f"damaged ({chunk}: ") \
            and str(err.value).endswith(f"; run `gradflow check {store} --repair` first")
        (store / chunk).write_bytes(saved)
    root = zarr.open_group(store, mode="r+", use_consolidated=False)
    root.attrs.put({k: v for k, v in root.attrs.asdict().items() if k != "fixed_coordinates"})
    gradflow.store.consolidate(store, fresh=gradflow.store.ALL)
    for chunk in ("layer/c/0", "epochs/layer/c/0", "summary/256/layer/c/0", "summary/4096/layer/c/0"):
        damage(store / chunk, "garbage")
    with pytest.raises(GradflowError) as err:
        resume(store)
    assert "--repair` first" not in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"{store} is damaged (./layer: chunk of rows 0-1 is damaged")
    assert str(err.value).endswith("no repair rebuilds what it lost, so it cannot be resumed: record "
                                   f"into a new store or group (`gradflow check {store}` lists the damage)")
    assert check_store(str(store), repair=True)[1] is True  # still damaged: the layer names are lost
    with pytest.raises(GradflowError, match="cannot be resumed"):
        resume(store)


@pytest.mark.parametrize("how", ["deleted", "garbage"])
def test_a_runs_root_metadata_lost_is_damage_not_no_store(tmp_path, how):
    store = tmp_path / "run.zarr"
    make_store(store, steps=5)
    if how == "deleted":
        (store / "zarr.json").unlink()
    else:
        (store / "zarr.json").write_bytes(b"\xff\xfe garbage")
    problem = "missing" if how == "deleted" else "damaged (JSONDecodeError)"
    advice = ("the folder holds a gradflow run's arrays, but that file held the run's settings and "
              "its last commit, which no repair rebuilds: restore it from a backup, or read the "
              "arrays one by one with zarr.open_array")
    assert check_store(str(store)) == ([f"zarr.json: {problem}; {advice}"], True)
    assert check_store(str(store), repair=True) == ([f"zarr.json: {problem}; {advice}"], True)
    assert not (store / "zarr.json").exists() or how == "garbage"  # nothing written over it
    message = f"{store} is a damaged gradflow store: its root zarr.json is {problem}; {advice}"
    for mode in ("a", "w"):
        with pytest.raises(GradflowError) as err:
            RunStore(str(store), None, LAYERS, {"every": 1, "per_parameter": False}, 1, False, mode=mode)
        assert str(err.value) == message
    if how == "deleted":
        with pytest.raises(GradflowError) as err:
            gradflow.open(store)
        assert str(err.value) == message
    assert (store / "grad_norm/c/0/0").exists()


def test_a_sweeps_deleted_root_metadata_is_rewritten(tmp_path):
    store = tmp_path / "sweep.zarr"
    make_store(store, steps=5, group="v1")
    make_store(store, steps=7, group="v2")
    (store / "zarr.json").unlink()
    lines, damaged = check_store(str(store))
    assert damaged and lines == [f"zarr.json: missing; the folder holds a sweep's runs: `gradflow "
                                 f"check {store} --repair` rewrites it"]
    with pytest.raises(GradflowError, match="damaged gradflow store: its root zarr.json is missing"):
        gradflow.open(store)
    assert check_store(str(store), repair=True)[1] is False
    tree = gradflow.open(store)
    assert tree["v1"].sizes["step"] == 5 and tree["v2"].sizes["step"] == 7


def _counted(monkeypatch, owner, name: str) -> list:
    """Replace ``owner.name`` by a wrapper that records each call's arguments (returned list)."""
    calls, real = [], getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("how", ["healthy", "deleted", "garbage"])
def test_an_open_reads_the_root_metadatas_damage_once(tmp_path, monkeypatch, how):
    """RunStore asked damaged_root whether a folder without a readable zarr.json is a damaged store,
    then open_root asked it again (each asking reads the root file and globs the groups' files)."""
    import gradflow.check
    import gradflow.store

    store = tmp_path / "run.zarr"
    make_store(store, steps=5)
    if how == "deleted":
        (store / "zarr.json").unlink()
    elif how == "garbage":
        (store / "zarr.json").write_bytes(b"\xff\xfe garbage")
    calls = _counted(monkeypatch, gradflow.check, "damaged_root")
    monkeypatch.setattr(gradflow.store, "damaged_root", gradflow.check.damaged_root)
    if how == "healthy":
        resume(store).close()
    else:
        with pytest.raises(GradflowError, match="damaged gradflow store"):
            resume(store)
    assert len(calls) == 1


def test_checking_a_run_lists_its_files_once(tmp_path, monkeypatch):
    """Every array's chunks were listed apart (a directory walk each: ~40 per run, at every
    gradflow.open, every `gradflow watch` poll and every resume); the run's files are listed once."""
    from zarr.storage import LocalStore

    sweep = tmp_path / "sweep.zarr"
    for group in ("v1", "v2"):
        make_store(sweep, steps=5, group=group)
    listed = _counted(monkeypatch, LocalStore, "list_prefix")
    gradflow.open_tree(sweep)
    assert sorted(prefix for _, prefix in listed) == ["v1/", "v2/"]
    listed.clear()
    gradflow.open(sweep, group="v1")
    resume(sweep, "v2").close()
    assert check_store(str(sweep)) == (["v1: ok, 5 steps, 3 epochs", "v2: ok, 5 steps, 3 epochs"], False)
    assert [prefix for _, prefix in listed] == ["v1/", "v2/", "v1/", "v2/"]


def _files(folder) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("how", ["recorded", "copied"])
def test_a_folder_of_separate_runs_is_no_store_and_never_written(tmp_path, how):
    """A plain folder holding runs that are stores of their own (recorded there, or copied there
    without their lock folders) was called a sweep that lost its root zarr.json, and --repair wrote
    one: each run was then "a path inside the gradflow store" and could no longer be opened, checked
    or resumed at its own path. Such a run's zarr.json holds its own commit (consolidated metadata),
    which a sweep's groups never do."""
    folder = tmp_path / "myruns"
    folder.mkdir()
    for name, steps in (("a.zarr", 5), ("b.zarr", 7)):
        make_store(folder / name if how == "recorded" else tmp_path / name, steps=steps)
        if how == "copied":
            shutil.copytree(tmp_path / name, folder / name)
    assert (folder / ".a.zarr.gradflow").exists() == (how == "recorded")
    before = _files(folder)
    message = (f"no gradflow store at {folder} (a folder of 2 separate run store(s), not a sweep); "
               f"check each run: gradflow check {folder}/a.zarr")
    for repair in (False, True):
        with pytest.raises(GradflowError) as err:
            check_store(str(folder), repair=repair)
        assert str(err.value) == message
    for opener in (gradflow.open, gradflow.open_tree):
        with pytest.raises(GradflowError, match=f"no gradflow store at {folder} .*e.g. {folder}/a.zarr"):
            opener(folder)
    with pytest.raises(GradflowError, match="exists and is not a Zarr store"):
        RunStore(str(folder), "c", LAYERS, {"every": 1, "per_parameter": False}, 1, False)
    assert _files(folder) == before  # nothing written into the folder, nor into its runs
    assert check_store(str(folder / "a.zarr")) == (["(run): ok, 5 steps, 3 epochs"], False)
    assert gradflow.open(folder / "b.zarr").sizes["step"] == 7
    writer = RunStore(str(folder / "a.zarr"), None, LAYERS, {"every": 1, "per_parameter": False}, 1,
                      False, mode="a")
    writer.write(rows(5, 2))
    writer.close()
    np.testing.assert_array_equal(gradflow.open(folder / "a.zarr")["step"], np.arange(7))


def test_a_root_written_over_a_folder_of_runs_is_named_and_the_runs_stay_usable(tmp_path):
    """A folder of separate runs that an older `gradflow check --repair` gave a root zarr.json
    (as a sweep's): check says so instead of checking (and repairing) the runs as its groups, and
    each run is used at its own path again."""
    from gradflow.store import consolidate

    folder = tmp_path / "myruns"
    for name in ("a.zarr", "b.zarr"):
        make_store(tmp_path / name, steps=5)
        shutil.copytree(tmp_path / name, folder / name)
    (folder / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    consolidate(str(folder))  # what that repair did
    before = _files(folder)
    for repair in (False, True):
        with pytest.raises(GradflowError, match=f"{folder} is not a gradflow store but a folder of "
                           f"separate run stores .*delete that file; check each run: gradflow "
                           f"check {folder}/a.zarr"):
            check_store(str(folder), repair=repair)
    assert _files(folder) == before
    assert check_store(str(folder / "a.zarr")) == (["(run): ok, 5 steps, 3 epochs"], False)
    assert gradflow.open(folder / "a.zarr").sizes["step"] == 5
    RunStore(str(folder / "b.zarr"), None, LAYERS, {"every": 1, "per_parameter": False}, 1,
             False, mode="a").close()


@pytest.mark.parametrize("how", ["deleted", "garbage"])
def test_a_group_of_a_sweep_that_lost_its_root_is_not_a_store_of_its_own(tmp_path, how):
    """With the sweep's root zarr.json missing (or unparseable), its group was checked as a store
    of its own, which --repair would have made one (its own root metadata); it is refused like any
    path inside the sweep, which --repair rebuilds as a whole."""
    sweep = tmp_path / "sweep.zarr"
    make_store(sweep, steps=5, group="v1")
    make_store(sweep, steps=7, group="v2")
    if how == "deleted":
        (sweep / "zarr.json").unlink()
    else:
        (sweep / "zarr.json").write_text("{not json")
    before = _files(sweep / "v1")
    for repair in (False, True):
        with pytest.raises(GradflowError, match=f"{sweep}/v1 is a path inside the gradflow store "
                           f"{sweep} .*check the store: gradflow check {sweep}$"):
            check_store(str(sweep / "v1"), repair=repair)
    with pytest.raises(GradflowError, match="path inside the gradflow store"):
        gradflow.open(sweep / "v1")
    with pytest.raises(GradflowError, match="path inside the gradflow store"):
        RunStore(str(sweep / "v1"), None, LAYERS, {"every": 1, "per_parameter": False}, 1, False)
    assert _files(sweep / "v1") == before
    assert check_store(str(sweep), repair=True)[1] is False
    assert gradflow.open(sweep, group="v1").sizes["step"] == 5
