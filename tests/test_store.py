"""The store: buffered background writes, crash safety, resumption, layout, and ``gradflow.open``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from torch import nn

import gradflow
from gradflow import GradflowError

REPO = Path(__file__).resolve().parents[1]


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def train(model, optimizer, steps: int, seed: int = 0) -> list[float]:
    """``steps`` plain steps; returns the first layer's reference gradient norm at each step."""
    gen, norms = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 3, generator=gen)).square().mean().backward()
        g = np.concatenate([p.grad.double().numpy().ravel() for p in model[0].parameters()])
        norms.append(float(np.sqrt(np.sum(g**2))))
        optimizer.step()
    return norms


def run_child(code: str, store: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that has ``model``, ``optimizer``, ``train`` and ``rec``."""
    import inspect

    prelude = "\n".join([
        "import os", "import numpy as np", "import torch", "from torch import nn", "import gradflow",
        inspect.getsource(tiny), inspect.getsource(train), "model, optimizer = tiny()",
        f"rec = gradflow.Recorder(model, optimizer, {str(store)!r})", ""])
    path = [str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def test_crash_loses_only_the_unflushed_buffer(tmp_path):
    store = tmp_path / "run.zarr"
    child = run_child("""
        train(model, optimizer, 3)
        rec.flush()              # committed
        train(model, optimizer, 2, seed=1)  # still in the buffer
        os._exit(1)              # no close, no atexit
    """, store)
    assert child.returncode == 1, child.stderr
    model, optimizer = tiny()
    expected = train(model, optimizer, 3)
    ds = xr.open_zarr(store)  # plain xarray reads what was flushed
    assert ds.step.values.tolist() == [0, 1, 2]
    np.testing.assert_allclose(ds.grad_norm.sel(layer="0").values, expected, rtol=2e-6)
    # Resuming continues after the last committed step.
    with gradflow.Recorder(model, optimizer, store, mode="a") as rec:
        assert rec.step == 3
        train(model, optimizer, 1, seed=3)
    assert gradflow.open(store).step.values.tolist() == [0, 1, 2, 3]


def test_unhandled_exception_flushes_at_exit(tmp_path):
    store = tmp_path / "run.zarr"
    child = run_child("""
        train(model, optimizer, 4)
        rec.end_epoch(train_loss=0.5)
        train(model, optimizer, 1, seed=1)
        raise RuntimeError("training crashed")   # rec is never closed
    """, store)
    assert child.returncode == 1 and "training crashed" in child.stderr
    ds = gradflow.open(store)
    assert ds.step.values.tolist() == [0, 1, 2, 3, 4]
    assert ds.epoch.values.tolist() == [0, 0, 0, 0, 1]
    assert gradflow.open(store, group="epochs").train_loss.values.tolist() == [0.5]


def test_exception_inside_with_block_flushes(tmp_path):
    model, optimizer = tiny()
    with pytest.raises(KeyboardInterrupt):
        with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
            expected = train(model, optimizer, 3)
            raise KeyboardInterrupt
    ds = gradflow.open(tmp_path / "run.zarr")
    np.testing.assert_allclose(ds.grad_norm.sel(layer="0").values, expected, rtol=2e-6)


def test_rows_are_buffered_and_written_off_the_training_thread(tmp_path, monkeypatch):
    from gradflow import recorder as recorder_module
    from gradflow import store as store_module

    writers = []
    original = store_module.RunStore.write
    monkeypatch.setattr(store_module.RunStore, "write",
                        lambda self, rows=None: writers.append(threading.current_thread().name)
                        or original(self, rows))
    monkeypatch.setattr(recorder_module, "FLUSH_ROWS", 2)
    model, optimizer = tiny()
    store = tmp_path / "run.zarr"
    rec = gradflow.Recorder(model, optimizer, store)
    expected = train(model, optimizer, 1)
    time.sleep(0.2)
    assert gradflow.open(store).sizes["step"] == 0  # one row: still buffered
    expected += train(model, optimizer, 4, seed=1)  # 5 rows: two hand-offs of 2
    deadline = time.monotonic() + 10
    while gradflow.open(store).sizes["step"] < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gradflow.open(store).sizes["step"] == 4
    rec.close()
    ds = gradflow.open(store)
    assert ds.step.values.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(ds.grad_norm.sel(layer="0").values, expected, rtol=2e-6)
    assert writers and all(name.startswith("gradflow-writer") for name in writers)
    assert threading.current_thread().name not in writers


def test_hand_offs_end_on_chunk_boundaries_after_a_short_one(tmp_path, monkeypatch):
    """Count-driven hand-offs end where the store's rows reach a multiple of FLUSH_ROWS (which the
    step chunk divides): after an explicit flush of 5 rows, or resuming at 13, the next one takes
    only the rows up to the boundary, so no later hand-off rewrites a partly filled chunk."""
    from gradflow import recorder as recorder_module
    from gradflow import store as store_module

    appended = []  # (first row, number of rows) of each step append
    original = store_module.RunStore.write

    def spy(self, rows=None):
        n = 0 if rows is None else rows.num_steps
        if n:
            appended.append((self.n_steps, n))
        return original(self, rows)

    monkeypatch.setattr(store_module.RunStore, "write", spy)
    monkeypatch.setattr(recorder_module, "FLUSH_ROWS", 8)
    model, optimizer = tiny()
    store = tmp_path / "run.zarr"
    with gradflow.Recorder(model, optimizer, store) as rec:
        train(model, optimizer, 5)
        rec.flush()  # a short hand-off, as the timed one in a slow run
        train(model, optimizer, 8, seed=1)
    assert appended == [(0, 5), (5, 3), (8, 5)]  # the last one: close
    appended.clear()
    with gradflow.Recorder(model, optimizer, store, mode="a"):
        train(model, optimizer, 12, seed=2)
    assert appended == [(13, 3), (16, 8), (24, 1)]
    assert gradflow.open(store).sizes["step"] == 25


def test_layout_is_plain_chunked_zarr(tmp_path):
    model, optimizer = tiny()
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr") as rec:
        train(model, optimizer, 2)
        rec.end_epoch(train_loss=1.0)
    group = zarr.open_group(tmp_path / "run.zarr", mode="r")
    assert group.metadata.zarr_format == 3
    grad_norm = group["grad_norm"]
    assert grad_norm.metadata.dimension_names == ("step", "layer")
    assert grad_norm.chunks == (1024, 2) and grad_norm.shape == (2, 2)
    assert group["epochs/update_mean_abs"].metadata.dimension_names == ("epoch", "layer")
    assert group["layer"][:].tolist() == ["0", "2"]
    assert group.attrs["gradflow_schema"] == 1 and group.attrs["steps_seen"] == 2


def test_interrupted_flush_is_invisible_and_trimmed_on_resume(tmp_path):
    store = tmp_path / "run.zarr"
    model, optimizer = tiny()
    with gradflow.Recorder(model, optimizer, store) as rec:
        expected = train(model, optimizer, 3)
        rec.end_epoch(train_loss=1.0)
    # A flush that resized and wrote some arrays but died before committing:
    group = zarr.open_group(store, mode="a", use_consolidated=False)
    for name in ("grad_norm", "step"):
        array = group[name]
        array.resize((5,) + array.shape[1:])
        array[3:] = 99
    group["epochs/train_loss"].resize((2,))
    plain = xr.open_zarr(store)
    assert plain.sizes["step"] == 3 and gradflow.open(store).sizes["step"] == 3
    assert xr.open_zarr(store, group="epochs").sizes["epoch"] == 1

    with gradflow.Recorder(model, optimizer, store, mode="a") as rec:
        assert (rec.step, rec.epoch) == (3, 1)
        expected += train(model, optimizer, 2, seed=1)
    ds = gradflow.open(store)
    assert ds.step.values.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(ds.grad_norm.sel(layer="0").values, expected, rtol=2e-6)
    assert gradflow.open(store, group="epochs").train_loss.values.tolist() == [1.0]


def test_open_errors(tmp_path):
    with pytest.raises(GradflowError, match=f"no gradflow store at {tmp_path / 'missing.zarr'}"):
        gradflow.open(tmp_path / "missing.zarr")
    with pytest.raises(GradflowError, match="no gradflow store"):
        gradflow.open("memory://gradflow-test/missing.zarr")
    other = zarr.open_group(tmp_path / "other.zarr", mode="w")
    other.create_array("x", shape=(2,), dtype="float32")
    with pytest.raises(GradflowError, match="other.zarr is not a gradflow store"):
        gradflow.open(tmp_path / "other.zarr")
    with pytest.raises(GradflowError, match="is an array"):
        gradflow.open(tmp_path / "other.zarr", group="x")

    model, optimizer = tiny()
    store = tmp_path / "run.zarr"
    gradflow.Recorder(model, optimizer, store).close()
    with pytest.raises(GradflowError, match="has no group 'nope'"):
        gradflow.open(store, group="nope")
    for group in ("..", "epochs/..", "a//b", 3):  # the argument, not the store: no "damaged"
        with pytest.raises(GradflowError, match="group must be a group's path"):
            gradflow.open(store, group=group)
    with pytest.raises(GradflowError, match="single run"):
        gradflow.Recorder(model, optimizer, store, group="variant")
    group = zarr.open_group(store, mode="a")
    group.attrs["gradflow_schema"] = 99
    zarr.consolidate_metadata(store)
    with pytest.raises(GradflowError, match="newer gradflow"):
        gradflow.open(store)
    with pytest.raises(GradflowError, match="newer gradflow"):
        gradflow.Recorder(model, optimizer, store)
    with pytest.raises(GradflowError, match="not a gradflow store"):
        gradflow.Recorder(model, optimizer, tmp_path / "other.zarr")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_reading_while_the_recorder_commits_never_fails(tmp_path, monkeypatch):
    # Each commit rewrites the root metadata; a reader that catches it half-way must wait it out.
    from gradflow import recorder as recorder_module

    monkeypatch.setattr(recorder_module, "FLUSH_ROWS", 1)  # commit after every step
    model, optimizer = tiny()
    store = tmp_path / "run.zarr"
    rec = gradflow.Recorder(model, optimizer, store)
    train(model, optimizer, 1)
    rec.flush()
    writer = threading.Thread(target=lambda: (train(model, optimizer, 40, seed=1), rec.flush()))
    writer.start()
    seen = []
    while writer.is_alive():
        seen.append(gradflow.open(store).sizes["step"])  # raised ~1 in 70 reads before the retry
    writer.join()
    rec.close()
    assert len(seen) > 10 and seen == sorted(seen) and gradflow.open(store).sizes["step"] == 41


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden lock folders included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_path_inside_a_store_is_refused_before_anything_is_written(tmp_path):
    """A store recorded at a path inside another store's folder bypasses that store's root metadata
    (its commit point): `sweep.zarr/v1` with mode "w" left v1 reading as damaged, a new
    `sweep.zarr/v3` never appeared in the sweep. Every such path is refused, naming the right call,
    and nothing (not even a lock file) is written; another tool's Zarr store is never written into."""
    import xarray as xr

    model, optimizer = tiny()
    sweep, run, theirs = tmp_path / "sweep.zarr", tmp_path / "run.zarr", tmp_path / "theirs.zarr"
    expected = {}
    for group, steps in (("v1", 3), ("v2", 2)):
        with gradflow.Recorder(model, optimizer, sweep, group=group) as rec:
            expected[group] = train(model, optimizer, steps)
            rec.end_epoch()
    with gradflow.Recorder(model, optimizer, run) as rec:
        expected["run"] = train(model, optimizer, 2)
        rec.end_epoch()
    xr.Dataset({"a": ("x", np.arange(3.0))}, attrs={"owner": "someone else"}).to_zarr(theirs)
    before = _files(tmp_path)

    refused = [(sweep / "v1", "w", "group='v1'"), (sweep / "v2", "a", "group='v2'"),
               (sweep / "v3", "w-", "group='v3'"), (sweep / "v1" / "epochs", "w", "group='v1'"),
               (sweep / "new" / "deeper.zarr", "w-", "group='new'"),
               (run / "extra", "w-", f"record into a new store outside {run}"),
               (run / "epochs", "a", f"record into a new store outside {run}")]
    for path, mode, advice in refused:
        with pytest.raises(GradflowError) as err:
            gradflow.Recorder(model, optimizer, path, mode=mode)
        assert f"{path} is a path inside the gradflow" in str(err.value) and advice in str(err.value)
        assert "\n" not in str(err.value)
    with pytest.raises(GradflowError, match=r"Recorder\(\.\.\., '[^']*sweep.zarr', group='v1'\)"):
        gradflow.Recorder(model, optimizer, sweep / "v1", mode="w")
    with pytest.raises(GradflowError, match="inside the Zarr store .*theirs.zarr, which is not a gradflow"):
        gradflow.Recorder(model, optimizer, theirs / "mine.zarr")
    for mode in ("w-", "w", "a"):  # its root was refused in every mode; a group of it is too
        with pytest.raises(GradflowError, match="theirs.zarr is not a gradflow store"):
            gradflow.Recorder(model, optimizer, theirs, group="v1", mode=mode)
    assert _files(tmp_path) == before

    tree = gradflow.open(sweep)
    assert {name: node.ds.sizes["step"] for name, node in tree.children.items()} == {"v1": 3, "v2": 2}
    for group in ("v1", "v2"):
        np.testing.assert_allclose(tree[group].ds.grad_norm.sel(layer="0").values, expected[group],
                                   rtol=2e-6)
    assert xr.open_zarr(theirs).a.values.tolist() == [0.0, 1.0, 2.0]
    # A new group of the sweep and a store beside the others are still welcome.
    with gradflow.Recorder(model, optimizer, sweep, group="v3"):
        train(model, optimizer, 1)
    with gradflow.Recorder(model, optimizer, tmp_path / "plain" / "run2.zarr"):
        train(model, optimizer, 1)
    assert sorted(gradflow.open(sweep).children) == ["v1", "v2", "v3"]


def test_a_memory_store_inside_another_is_refused(tmp_path):
    model, optimizer = tiny()
    store = "memory://gradflow-test-inside/sweep.zarr"
    with gradflow.Recorder(model, optimizer, store, group="v1"):
        train(model, optimizer, 1)
    with pytest.raises(GradflowError, match="group='v2'"):
        gradflow.Recorder(model, optimizer, f"{store}/v2")
    assert sorted(gradflow.open(store).children) == ["v1"]


def test_opening_a_path_inside_a_store_names_the_store_and_group(tmp_path):
    """`gradflow.open("run.zarr/epochs")` raised TypeError; a path inside a gradflow store reads past
    its commit point: one line naming the call that reads it from the store."""
    model, optimizer = tiny()
    sweep, run = tmp_path / "sweep.zarr", tmp_path / "run.zarr"
    with gradflow.Recorder(model, optimizer, sweep, group="v1") as rec:
        train(model, optimizer, 2)
        rec.end_epoch(train_loss=1.5)
    with gradflow.Recorder(model, optimizer, run) as rec:
        train(model, optimizer, 2)
        rec.end_epoch(train_loss=2.5)
    cases = [(run / "epochs", run, "epochs"), (sweep / "v1", sweep, "v1"),
             (sweep / "v1" / "epochs", sweep, "v1/epochs")]
    for path, store, group in cases:
        for opener in (gradflow.open, gradflow.open_tree):
            with pytest.raises(GradflowError) as err:
                opener(path)
            assert str(err.value).endswith(f"gradflow.open({str(store)!r}, group={group!r})")
        assert gradflow.open(store, group=group).sizes  # the call it names works
    assert gradflow.open(run, group="epochs").train_loss.values.tolist() == [2.5]
    with pytest.raises(GradflowError, match=r"open the store: gradflow.open\("):
        gradflow.open(run / "grad_norm")


def test_every_array_the_recorder_writes_ends_in_a_crc32c_checksum(tmp_path):
    """Every chunk of every array (step figures and coordinates, lr, layer table, epochs, an epoch
    scalar, the summary) ends in zarr's crc32c codec, so a flipped bit fails its read instead of
    decoding to other numbers (tests/test_check.py, "bitflip"); xarray still opens the store."""
    import zarr

    model, optimizer = tiny()
    rec = gradflow.Recorder(model, optimizer, str(tmp_path / "run.zarr"))
    train(model, optimizer, 3)
    rec.end_epoch(val_loss=0.5)
    rec.close()
    root = zarr.open_group(tmp_path / "run.zarr", mode="r")
    arrays = [(name, a) for name, a in root.members(max_depth=None) if isinstance(a, zarr.Array)]
    assert {"grad_norm", "lr", "layer", "epochs/val_loss", "epochs/num_steps",
            "summary/256/grad_norm", "summary/256/layer"} <= {name for name, _ in arrays}, [n for n, _ in arrays]
    unchecked = [name for name, a in arrays if a.metadata.codecs[-1].to_dict()["name"] != "crc32c"]
    assert not unchecked
    import xarray as xr
    assert float(xr.open_zarr(tmp_path / "run.zarr", consolidated=False).grad_norm.count()) > 0


def _count_reads(monkeypatch) -> list[str]:
    """The files read through fsspec's local filesystem from now on (gradflow.paths reads metadata so)."""
    from fsspec.implementations.local import LocalFileSystem

    reads, cat_file = [], LocalFileSystem.cat_file

    def counted(self, path, *args, **kwargs):
        reads.append(str(path))
        return cat_file(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "cat_file", counted)
    return reads


def test_opening_one_group_of_a_sweep_reads_no_other_runs_metadata(tmp_path, monkeypatch):
    """Each Recorder(group=...) asked gradflow.paths.store_kind whether the store is another tool's,
    which read every other group's zarr.json: N² reads over a sweep of N runs. The root's
    consolidated metadata (the last commit) gives their kind; a group it does not list is read."""
    model, optimizer = tiny()
    sweep = tmp_path / "sweep.zarr"
    for group in ("v1", "v2", "v3"):
        with gradflow.Recorder(model, optimizer, sweep, group=group):
            train(model, optimizer, 1)
    reads = _count_reads(monkeypatch)
    for group, mode in (("v4", "w-"), ("v2", "a")):
        reads.clear()
        with gradflow.Recorder(model, optimizer, sweep, group=group, mode=mode):
            train(model, optimizer, 1)
        others = [p for p in reads if p.endswith("/zarr.json") and p.rsplit("/", 2)[-2] in {"v1", "v2", "v3", "v4"} - {group}]
        assert others == [], (group, others)
    # A group that another tool added after the last commit is still read, and refused.
    zarr.open_group(sweep / "theirs", mode="w").create_array("x", shape=(2,), dtype="float32")
    with pytest.raises(GradflowError, match="another tool's Zarr store"):
        gradflow.Recorder(model, optimizer, sweep, group="v5")
