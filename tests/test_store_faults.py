"""Fault injection (kept to seconds; longer trials: ``python -m gradflow.bench.durability``).

The trials fork a child process (``gradflow.bench.durability.run_trial``) and kill it.

kill -9 at random moments with short and long epochs, SIGTERM with and without a user handler, a
full disk (a small tmpfs, or an injected OSError), readers in a loop during writes, and a writer
slower than training (bounded: training waits instead of a backlog growing).
"""

from __future__ import annotations

import errno
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import gradflow
from gradflow import recorder as recorder_module
from gradflow import store as store_module
from gradflow.bench.durability import run_trial
from gradflow.errors import GradflowWarning
from test_store import tiny, train  # the same tiny model and reference loop

REPO = Path(__file__).resolve().parents[1]


def gradflow_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, GradflowWarning)]


@pytest.mark.parametrize("epoch_steps", [3, 400])
def test_kill_9_loses_at_most_the_buffer_and_one_commit(tmp_path, epoch_steps):
    """Killed at a random moment (0.5-2.5 s of training): the store opens intact and holds every
    step but at most the last hand-off's buffer and the commit in flight."""
    rng = random.Random(epoch_steps)
    result = run_trial(tmp_path / "run.zarr", epoch_steps=epoch_steps, kill_after=rng.uniform(0.5, 2.5),
                       flush_rows=256, sig=signal.SIGKILL)
    assert result.error is None, result.error
    assert result.done > 0 and result.lost <= 2 * 256, result
    assert result.epochs_consistent, result


def test_sigterm_without_a_handler_flushes_and_terminates(tmp_path):
    result = run_trial(tmp_path / "run.zarr", epoch_steps=7, kill_after=1.0, flush_rows=100_000,
                       sig=signal.SIGTERM)
    assert result.returncode == -signal.SIGTERM  # the default action still happens
    assert result.error is None and result.done > 0
    assert result.lost <= 1, result  # only the step running when the signal came
    assert result.epochs_consistent


def test_sigterm_chains_to_the_users_handler(tmp_path):
    result = run_trial(tmp_path / "run.zarr", epoch_steps=7, kill_after=1.0, flush_rows=100_000,
                       sig=signal.SIGTERM, user_handler=True)
    assert result.returncode == 0  # the user's handler ran (it exits 0) and decided
    assert result.error is None and result.lost <= 1, result


def test_injected_oserror_keeps_and_retries_the_rows(tmp_path, monkeypatch):
    """Two failed flushes (disk full), then the disk has room again: no row lost, one warning."""
    failures = {"left": 2}
    original = store_module._put

    def flaky(array, start, values):
        if failures["left"] and array.basename == "update_norm":
            failures["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(array, start, values)

    monkeypatch.setattr(store_module, "_put", flaky)
    monkeypatch.setattr(recorder_module, "FLUSH_ROWS", 4)
    model, optimizer = tiny()
    store = tmp_path / "run.zarr"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = gradflow.Recorder(model, optimizer, store)
        expected = train(model, optimizer, 6)
        rec.end_epoch(train_loss=1.0)
        rec.flush()  # fails: no exception, the rows are kept
        assert isinstance(rec.error, OSError)
        expected += train(model, optimizer, 6, seed=1)
        rec.close()
    messages = gradflow_warnings(caught)
    assert len(messages) == 2, messages
    assert "No space left on device" in messages[0] and "kept and written again" in messages[0]
    assert "works again" in messages[1]
    assert rec.error is None
    ds = gradflow.open(store)
    assert ds.step.values.tolist() == list(range(12))
    np.testing.assert_allclose(ds.grad_norm.sel(layer="0").values, expected, rtol=2e-6)
    assert gradflow.open(store, group="epochs").train_loss.values.tolist() == [1.0]


def test_a_disk_that_stays_full_stops_recording_cleanly(tmp_path, monkeypatch):
    """Recording stops after WRITE_ATTEMPTS failed flushes; training goes on; the store keeps its
    last commit with arrays of equal length, and a resume continues at the last epoch label + 1."""
    monkeypatch.setattr(recorder_module, "FLUSH_ROWS", 2)
    monkeypatch.setattr(recorder_module, "WRITE_ATTEMPTS", 3)
    model, optimizer = tiny()
    store = tmp_path / "run.zarr"
    rec = gradflow.Recorder(model, optimizer, store)
    train(model, optimizer, 4)
    rec.end_epoch()
    rec.flush()
    original = store_module._put

    def full(array, start, values):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "_put", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, optimizer, 10)  # 5 hand-offs: 3 attempts, then stopped
        rec.end_epoch()
        rec.flush()
        rec.close()
    messages = gradflow_warnings(caught)
    assert len(messages) == 2 and "stopped after 3 failed write(s)" in messages[1], messages
    monkeypatch.setattr(store_module, "_put", original)
    ds = gradflow.open(store)
    assert ds.step.values.tolist() == [0, 1, 2, 3]
    import zarr

    live = zarr.open_group(store, mode="r", use_consolidated=False)  # rolled back, not just hidden
    assert {a.shape[0] for _, a in live.arrays() if a.metadata.dimension_names[0] == "step"} == {4}
    with gradflow.Recorder(model, optimizer, store, mode="a") as again:
        assert (again.step, again.epoch) == (4, 1)


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if sys.platform != "linux":
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def test_full_tmpfs(tmp_path, monkeypatch):
    """A real full disk: a 1 MiB tmpfs, filled up; recording warns once and keeps its rows; after
    space is freed, every row is written."""
    mount = tmp_path / "small"
    if not _tmpfs(mount, "1m"):
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        monkeypatch.setattr(recorder_module, "FLUSH_ROWS", 64)
        model, optimizer = tiny()
        store = mount / "run.zarr"
        rec = gradflow.Recorder(model, optimizer, store)
        filler = mount / "filler"
        try:  # leave (almost) no room
            with open(filler, "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError:
            pass
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            expected = train(model, optimizer, 200)
            rec.flush()
            assert rec.error is not None
            filler.unlink()
            expected += train(model, optimizer, 10, seed=1)
            rec.close()
        messages = gradflow_warnings(caught)
        assert "No space left" in messages[0] and "works again" in messages[-1], messages
        ds = gradflow.open(store)
        assert ds.step.values.tolist() == list(range(210))
        np.testing.assert_allclose(ds.grad_norm.sel(layer="0").values, expected, rtol=2e-6)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_slow_writer_applies_back_pressure(tmp_path, monkeypatch):
    """Zarr slower than training: at most one hand-off is ever being written (none waits)."""
    original = store_module.RunStore.write
    monkeypatch.setattr(store_module.RunStore, "write",
                        lambda self, rows=None: (time.sleep(0.1), original(self, rows))[1])
    monkeypatch.setattr(recorder_module, "FLUSH_ROWS", 2)
    model, optimizer = tiny()
    rec = gradflow.Recorder(model, optimizer, tmp_path / "run.zarr")
    backlog = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        optimizer.zero_grad()
        model(torch.randn(5, 3, generator=gen)).square().mean().backward()
        optimizer.step()
        backlog.append(rec._writer.jobs.unfinished_tasks)
    rec.close()
    assert max(backlog) == 1
    assert gradflow.open(tmp_path / "run.zarr").sizes["step"] == 20


def test_one_append_per_array_per_handoff(tmp_path, monkeypatch):
    """Many short epochs in one hand-off cost one write per array, not one per epoch."""
    calls = []
    original = store_module._put
    monkeypatch.setattr(store_module, "_put", lambda a, s, v: calls.append(a.path) or original(a, s, v))
    model, optimizer = tiny()
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr") as rec:
        for epoch in range(30):
            train(model, optimizer, 2)
            rec.end_epoch(train_loss=float(epoch))
    ds, ep = gradflow.open(tmp_path / "run.zarr"), gradflow.open(tmp_path / "run.zarr", group="epochs")
    appended = [n for n in ds.variables if ds[n].dims[:1] == ("step",)] + \
               [f"epochs/{n}" for n in ep.variables if ep[n].dims[:1] == ("epoch",)]
    assert len(appended) >= 17  # 8 figures, step, epoch, wall_time, skipped, lr; 5 epoch arrays
    assert sorted(calls) == sorted(set(calls)) and len(calls) == len(appended)  # once each
    assert ep.train_loss.values.tolist() == [float(e) for e in range(30)]
    assert ep.num_steps.values.tolist() == [2] * 30


def test_readers_see_steps_and_epochs_from_one_commit(tmp_path, monkeypatch):
    """open_tree in a loop while a Recorder commits every 2 steps and ends an epoch every 3."""
    monkeypatch.setattr(recorder_module, "FLUSH_ROWS", 2)
    model, optimizer = tiny()
    store = tmp_path / "run.zarr"
    rec = gradflow.Recorder(model, optimizer, store)

    def write():
        for _ in range(8):
            train(model, optimizer, 3)
            rec.end_epoch()
        rec.flush()

    writer = threading.Thread(target=write)
    writer.start()
    reads = 0
    while writer.is_alive() or reads < 5:
        tree = gradflow.open_tree(store)
        labels = tree.ds.epoch.values
        n_epochs = tree["epochs"].sizes["epoch"]
        if labels.size:  # steps labelled e+1 exist => epoch e's row exists, and no more than that
            assert n_epochs in (labels.max(), labels.max() + 1), (labels, n_epochs)
        assert int(tree["epochs"].num_steps.sum()) == int(np.sum(labels < n_epochs))
        reads += 1
    writer.join()
    rec.close()
    assert reads > 5



def test_a_write_failing_at_close_says_its_rows_are_lost(tmp_path, monkeypatch):
    """At close there is no next flush to retry: the warning says so instead of promising one."""
    from gradflow import store as store_module

    model, optimizer = tiny()
    store = tmp_path / "run.zarr"
    rec = gradflow.Recorder(model, optimizer, store)
    train(model, optimizer, 3)

    def full(array, start, values):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "_put", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec.close()
    messages = gradflow_warnings(caught)
    assert len(messages) == 1, messages
    assert "failed at close" in messages[0] and "3 step and 0 epoch rows are lost" in messages[0]
    assert "written again" not in messages[0]
    assert gradflow.open(store).sizes["step"] == 0
