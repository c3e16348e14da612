"""One writer per run: a second Recorder (this process or another) gets a clear GradflowError; a dead
owner's lock is broken automatically; distinct groups of one store can be created concurrently."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradflow
from gradflow import GradflowError
from gradflow.errors import GradflowWarning
from gradflow.lock import lock_dir

REPO = Path(__file__).resolve().parents[1]


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def train(model, optimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 3, generator=gen)).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_second_recorder_in_the_same_process_is_refused(tmp_path, where):
    """Issue 8, case 8: a notebook cell that creates the Recorder, run twice."""
    store = str(tmp_path / "run.zarr") if where == "local" else f"memory://lock-{tmp_path.name}/run.zarr"
    model, optimizer = tiny()
    first = gradflow.Recorder(model, optimizer, store)
    train(model, optimizer, 5)
    hooks = len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks)
    with pytest.raises(GradflowError, match="being written by an open Recorder in this process.*close"):
        gradflow.Recorder(model, optimizer, store)  # the cell again
    assert (len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks)) == hooks
    train(model, optimizer, 3)
    first.close()
    assert gradflow.open(store).step.values.tolist() == list(range(8))  # nothing overwritten
    with gradflow.Recorder(model, optimizer, store, mode="a") as again:  # closed: free again
        assert again.step == 8


def test_other_groups_of_the_store_stay_free(tmp_path):
    model, optimizer = tiny()
    with gradflow.Recorder(model, optimizer, tmp_path / "s.zarr", group="a"):
        with gradflow.Recorder(model, optimizer, tmp_path / "s.zarr", group="b"):
            train(model, optimizer, 2)
        with pytest.raises(GradflowError, match=r"group 'a'\) is being written"):
            gradflow.Recorder(model, optimizer, tmp_path / "s.zarr", group="a")
    tree = gradflow.open(tmp_path / "s.zarr")
    assert tree["a"].sizes["step"] == 2 and tree["b"].sizes["step"] == 2


HOLDER = """
import sys, time, torch
from torch import nn
import gradflow
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
rec = gradflow.Recorder(model, optimizer, sys.argv[1])
print("ready", flush=True)
time.sleep(120)
"""


def test_second_process_is_refused_until_the_owner_dies(tmp_path):
    store = tmp_path / "run.zarr"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "ready"
        model, optimizer = tiny()
        with pytest.raises(GradflowError, match=f"being written by pid {holder.pid} on host "
                                                f"{socket.gethostname()}") as err:
            gradflow.Recorder(model, optimizer, store)
        assert "\n" not in str(err.value)
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock
        holder.wait()
    with gradflow.Recorder(model, optimizer, store, mode="a") as rec:  # the kernel released its flock
        train(model, optimizer, 2)
        assert rec.step == 2
    assert gradflow.open(store).sizes["step"] == 2


def test_lock_without_flock_is_broken_when_its_owner_is_dead():
    """Non-local fsspec stores: the owner file is the lock; a dead owner on this host is broken."""
    import fsspec

    store = "memory://lock-owner/run.zarr"
    fs = fsspec.filesystem("memory")
    owner = f"{lock_dir('/lock-owner/run.zarr', None)}/writer.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    fs.pipe_file(owner, json.dumps({"pid": int(dead), "host": socket.gethostname(), "token": "x"}).encode())
    model, optimizer = tiny()
    gradflow.Recorder(model, optimizer, store).close()  # broken automatically
    fs.pipe_file(owner, json.dumps({"pid": 1, "host": "elsewhere", "token": "x"}).encode())
    with pytest.raises(GradflowError, match=r"pid 1 on host elsewhere.*if that process is gone, delete"):
        gradflow.Recorder(model, optimizer, store)
    fs.rm_file(owner)


def test_a_writer_that_lost_its_lock_stops_at_the_next_commit(tmp_path):
    store = tmp_path / "run.zarr"
    model, optimizer = tiny()
    rec = gradflow.Recorder(model, optimizer, store)
    train(model, optimizer, 2)
    rec.flush()
    owner = Path(lock_dir(str(store), None)) / "writer.json"
    owner.write_text(json.dumps({"pid": 12345, "host": "elsewhere", "token": "other"}))
    train(model, optimizer, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec.flush()
    messages = [str(w.message) for w in caught if issubclass(w.category, GradflowWarning)]
    assert any("another writer (pid 12345 on host elsewhere) took the store over" in m for m in messages)
    assert any("stopped" in m for m in messages)
    train(model, optimizer, 2)  # training goes on
    rec.close()
    assert gradflow.open(store).sizes["step"] == 2


def _create_group(store: str, group: str, barrier) -> None:
    model, optimizer = tiny()
    barrier.wait()
    with gradflow.Recorder(model, optimizer, store, group=group):
        train(model, optimizer, 3)


def test_distinct_groups_of_one_store_are_created_concurrently(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for trial in range(3):
        store = str(tmp_path / f"sweep{trial}.zarr")
        barrier = ctx.Barrier(4)
        workers = [ctx.Process(target=_create_group, args=(store, f"v{i}", barrier)) for i in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert [w.exitcode for w in workers] == [0, 0, 0, 0]
        tree = gradflow.open(store)
        assert sorted(tree.children) == ["v0", "v1", "v2", "v3"]
        assert all(tree[f"v{i}"].step.values.tolist() == [0, 1, 2] for i in range(4))


def test_readers_never_see_a_store_being_created(tmp_path):
    """A reader in a loop while a Recorder creates its store: "no store yet" or the store, never
    "not a gradflow store"."""
    store = tmp_path / "run.zarr"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    writer = ctx.Process(target=_create_root, args=(str(store), barrier))
    writer.start()
    barrier.wait()
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            seen.append(gradflow.open(store).sizes["step"])
        except GradflowError as err:
            assert str(err).startswith("no gradflow store"), err
            seen.append(None)
        if seen[-1] == 3:
            break
    writer.join(30)
    assert writer.exitcode == 0 and seen[-1] == 3
    assert np.all([s in (None, 0, 3) for s in seen])


def _create_root(store: str, barrier) -> None:
    model, optimizer = tiny()
    barrier.wait()
    time.sleep(0.05)
    with gradflow.Recorder(model, optimizer, store) as rec:
        train(model, optimizer, 3)
        rec.flush()
        time.sleep(0.2)


def test_meta_device_parameters_are_one_line():
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(GradflowError, match="'weight' is on the meta device"):
        gradflow.Recorder(model, optimizer, "memory://meta/run.zarr")

