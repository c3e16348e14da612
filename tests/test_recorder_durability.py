"""Recorder under threads and resumption: end_epoch from a validation thread, resuming mid-epoch.

References are computed here from weights the test saves itself (numpy, float64).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

import gradflow

REPO = Path(__file__).resolve().parents[1]


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def flat(model: nn.Module, layer: str) -> np.ndarray:
    return np.concatenate([p.detach().double().numpy().ravel()
                           for n, p in model.named_parameters() if n.startswith(layer + ".")])


def step(model, optimizer, gen) -> None:
    optimizer.zero_grad()
    model(torch.randn(5, 3, generator=gen)).square().mean().backward()
    optimizer.step()


def test_end_epoch_from_another_thread(tmp_path):
    """A validation thread ends epochs while the training thread steps: every row is a real step,
    no spurious skipped/NaN rows, and each epoch's |ΔW| spans exactly the steps labelled with it."""
    model, optimizer = tiny()
    store = tmp_path / "run.zarr"
    rec = gradflow.Recorder(model, optimizer, store)
    weights = [flat(model, "0")]  # after each step (index 0: initial)
    stop = threading.Event()

    def validate():
        while not stop.wait(0.003):
            rec.end_epoch(val_loss=0.5)

    gen = torch.Generator().manual_seed(0)
    validator = threading.Thread(target=validate)
    validator.start()
    for _ in range(200):
        step(model, optimizer, gen)
        weights.append(flat(model, "0"))
    stop.set()
    validator.join()
    rec.end_epoch(val_loss=0.25)
    rec.close()

    ds, ep = gradflow.open(store), gradflow.open(store, group="epochs")
    assert ds.step.values.tolist() == list(range(200))
    assert not ds.skipped.values.any() and np.isfinite(ds.grad_norm.values).all()
    labels = ds.epoch.values
    assert np.all(np.diff(labels) >= 0) and ep.sizes["epoch"] >= 2
    assert ep.num_steps.values.tolist() == np.bincount(labels, minlength=ep.sizes["epoch"]).tolist()
    first = 0
    for e, n in enumerate(ep.num_steps.values):
        if n:  # weights after the epoch's last step minus after the step before its first
            reference = np.mean(np.abs(weights[first + n] - weights[first]))
            np.testing.assert_allclose(ep.update_mean_abs.sel(layer="0").values[e], reference, rtol=1e-5)
        first += int(n)


def test_resuming_mid_epoch_starts_a_new_epoch(tmp_path):
    """Run 1 ends epoch 0 after 4 steps, then dies 3 steps into epoch 1 (after a flush). The resumed
    run starts epoch 2; epoch 1 gets its row with its 3 committed steps and NaN |ΔW|; epoch 2's |ΔW|
    is computed from the weights at the resume."""
    store = tmp_path / "run.zarr"
    child = f"""
import os, torch
from torch import nn
import gradflow
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
rec = gradflow.Recorder(model, optimizer, {str(store)!r})
gen = torch.Generator().manual_seed(0)
def step():
    optimizer.zero_grad()
    model(torch.randn(5, 3, generator=gen)).square().mean().backward()
    optimizer.step()
for _ in range(4):
    step()
rec.end_epoch(train_loss=1.0)
for _ in range(3):
    step()
rec.flush()
os._exit(1)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr

    model, optimizer = tiny(1)
    gen = torch.Generator().manual_seed(5)
    with gradflow.Recorder(model, optimizer, store, mode="a") as rec:
        assert (rec.step, rec.epoch) == (7, 2)
        start = flat(model, "0")
        for _ in range(5):
            step(model, optimizer, gen)
        rec.end_epoch(train_loss=3.0)
    ds, ep = gradflow.open(store), gradflow.open(store, group="epochs")
    assert ds.epoch.values.tolist() == [0] * 4 + [1] * 3 + [2] * 5
    assert ep.epoch.values.tolist() == [0, 1, 2]
    assert ep.num_steps.values.tolist() == [4, 3, 5]
    assert np.isnan(ep.update_mean_abs.values[1]).all() and np.isfinite(ep.update_mean_abs.values[[0, 2]]).all()
    np.testing.assert_allclose(ep.update_mean_abs.sel(layer="0").values[2],
                               np.mean(np.abs(flat(model, "0") - start)), rtol=1e-5)
    np.testing.assert_array_equal(ep.train_loss.values, [1.0, np.nan, 3.0])


def test_close_mid_epoch_then_resume(tmp_path):
    """close() without end_epoch, then a resume: same rule (a new epoch; the open one gets its row)."""
    model, optimizer = tiny()
    gen = torch.Generator().manual_seed(0)
    store = tmp_path / "run.zarr"
    with gradflow.Recorder(model, optimizer, store):
        for _ in range(2):
            step(model, optimizer, gen)
    with gradflow.Recorder(model, optimizer, store, mode="a") as rec:
        assert (rec.step, rec.epoch) == (2, 1)
        step(model, optimizer, gen)
        rec.end_epoch()
    ep = gradflow.open(store, group="epochs")
    assert ep.num_steps.values.tolist() == [2, 1]
