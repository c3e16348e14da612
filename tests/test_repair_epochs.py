"""Repairs of the values a lost chunk of a coordinate held: ``step`` and ``epochs/epoch``, and a
resume after them.

Every expected value comes from the loop the test runs itself: the steps it takes per epoch, the
``every`` it records with, the number of ``end_epoch`` calls.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradflow
from gradflow.repair import check_store
from gradflow.store import LayerTable, Rows, RunStore

EPOCH_STEPS = [3, 5, 2, 4]  # optimizer steps of each epoch of the first run


def train(store, epoch_steps: list[int], every: int, mode: str = "w-") -> None:
    """One epoch per entry of ``epoch_steps``, each logging train_loss = its step count."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradflow.Recorder(model, optimizer, store, every=every, mode=mode) as rec:
        for n in epoch_steps:
            for _ in range(n):
                optimizer.zero_grad()
                model(torch.randn(4, 3)).sum().backward()
                optimizer.step()
            rec.end_epoch(train_loss=float(n))


def test_lost_epoch_coordinate_chunk_is_rebuilt(tmp_path):
    """The n-th end_epoch writes epoch n (continued on resume), so the coordinate is 0…n−1 and a
    lost chunk of it is rebuilt, not every epoch after it dropped."""
    store = tmp_path / "run.zarr"
    train(store, EPOCH_STEPS, every=1)
    (store / "epochs/epoch/c/0").unlink()
    lines, damaged = check_store(str(store))
    assert damaged and lines == ["(run): epochs/epoch: chunk of rows 0-3 is missing (row i is "
                                 "epoch i: --repair rebuilds it)"]
    lines, _ = check_store(str(store), repair=True)
    assert lines[-1] == "(run): repaired, kept 14 of 14 steps and 4 of 4 epochs"
    ep = gradflow.open(store, group="epochs")
    assert ep.epoch.values.tolist() == [0, 1, 2, 3] and "lost_rows" not in ep.epoch.attrs
    assert ep.num_steps.values.tolist() == EPOCH_STEPS
    np.testing.assert_array_equal(ep.train_loss.values, EPOCH_STEPS)
    train(store, [1], every=1, mode="a")
    assert gradflow.open(store, group="epochs").epoch.values.tolist() == [0, 1, 2, 3, 4]


LAYERS = LayerTable(["a"], ["Linear"], [3])


def write_rows(path, steps: np.ndarray, epochs: np.ndarray, every: int = 1) -> None:
    """Step rows with the given ``step`` values and epoch rows with the given ``epoch`` values."""
    n, k = len(steps), len(epochs)
    step_rows = {name: np.ones((n, 1), np.float32) for name in gradflow.store.STEP_VARIABLES}
    step_rows.update(step=steps, epoch=np.zeros(n, np.int64), wall_time=np.zeros(n),
                     skipped=np.zeros(n, bool))
    epoch_rows = {"epoch": epochs, "num_steps": np.zeros(k, np.int64),
                  "update_mean_abs": np.ones((k, 1), np.float32),
                  "update_norm": np.ones((k, 1), np.float32), "val_loss": np.arange(k, dtype=float)}
    store = RunStore(str(path), None, LAYERS, {"every": every, "per_parameter": False}, every, False)
    store.write(Rows(step_rows, epoch_rows, int(steps[-1]) + 1))
    store.close()


def test_a_middle_chunk_of_epochs_is_rebuilt_and_one_not_0_to_n_is_cut(tmp_path):
    """600 epochs (chunks of 256): a lost middle chunk is rebuilt when the stored rows are 0…599;
    when they are not (not what gradflow writes), nothing proves the lost values: cut before it."""
    good, odd = tmp_path / "good.zarr", tmp_path / "odd.zarr"
    write_rows(good, np.arange(10), np.arange(600))
    write_rows(odd, np.arange(10), np.arange(0, 1200, 2))  # increasing, but not 0…n−1
    for store in (good, odd):
        (store / "epochs/epoch/c/1").unlink()
        check_store(str(store), repair=True)
    ep = gradflow.open(good, group="epochs")
    assert ep.epoch.values.tolist() == list(range(600))
    np.testing.assert_array_equal(ep.val_loss.values, np.arange(600))
    assert gradflow.open(odd, group="epochs").epoch.values.tolist() == list(range(0, 512, 2))


@pytest.mark.parametrize("every", [1, 3])
def test_lost_step_chunk_is_rebuilt(tmp_path, every):
    """Row i is step i·every (steps are counted from 0 and continued on resume, a row is recorded
    when step % every == 0): a lost chunk of ``step`` is rebuilt and every row kept."""
    store = tmp_path / "run.zarr"
    steps = np.arange(0, 2500 * every, every)
    write_rows(store, steps, np.arange(3), every)
    (store / "step/c/1").unlink()
    lines, damaged = check_store(str(store))
    assert damaged and lines == [f"(run): ./step: chunk of rows 1024-2047 is missing (row i is step "
                                 f"i·{every}: --repair rebuilds it)"]
    lines, _ = check_store(str(store), repair=True)
    assert lines[-1] == "(run): repaired, kept 2500 of 2500 steps and 3 of 3 epochs"
    assert gradflow.open(store).step.values.tolist() == steps.tolist()


def test_a_step_chunk_that_no_rule_fixes_is_cut(tmp_path):
    """Stored steps that are not i·every (here every=1 but steps 0, 2, 4, …): cut as before."""
    store = tmp_path / "run.zarr"
    write_rows(store, np.arange(0, 5000, 2), np.arange(3), every=1)
    (store / "step/c/1").unlink()
    lines, _ = check_store(str(store))
    assert lines == ["(run): ./step: chunk of rows 1024-2047 is missing"]
    check_store(str(store), repair=True)
    assert gradflow.open(store).step.values.tolist() == list(range(0, 2048, 2))
