"""Repairs of the values a lost chunk of a coordinate or a count held: ``step``, ``epochs/epoch``,
``epochs/num_steps`` and the steps' ``epoch`` labels, and a resume after them.

Every expected value comes from the loop the test runs itself: the steps it takes per epoch, the
``every`` it records with, the number of ``end_epoch`` calls.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import gradflow
from gradflow.repair import check_store
from gradflow.store import ALL, LayerTable, Rows, RunStore, consolidate

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


def recorded_steps(epoch_steps: list[int], every: int) -> list[int]:
    return [s for s in range(sum(epoch_steps)) if s % every == 0]


def raw(store, path: str):
    return zarr.open_array(store / path, mode="r")


@pytest.mark.parametrize("every", [1, 2])
def test_lost_num_steps_chunk_keeps_every_epoch_and_a_resume_counts_right(tmp_path, every):
    """every=1: each step is a row, so the count of rows per epoch label is the count of steps.
    every=2: a row stands for 2 steps and an epoch may end between two recorded steps, so no
    count is exact: repair marks them lost (-1, NaN to xarray), never a guess. Either way no epoch
    row is dropped, and the epoch the resumed run records gets its own count."""
    store = tmp_path / "run.zarr"
    train(store, EPOCH_STEPS, every)
    (store / "epochs/num_steps/c/0").unlink()
    lines, damaged = check_store(str(store))
    assert damaged and len(lines) == 1 and lines[0].startswith(
        "(run): epochs/num_steps: chunk of rows 0-3 is missing (")
    assert ("recounts all 4 from the step rows" in lines[0]) == (every == 1)
    assert ("4 cannot be counted exactly" in lines[0]) == (every == 2)
    n_rows = len(recorded_steps(EPOCH_STEPS, every))
    lines, _ = check_store(str(store), repair=True)
    assert lines[-1] == f"(run): repaired, kept {n_rows} of {n_rows} steps and 4 of 4 epochs"
    assert check_store(str(store)) == ([f"(run): ok, {n_rows} steps, 4 epochs"], False)

    train(store, [1], every, mode="a")
    ep = gradflow.open(store, group="epochs")
    assert ep.epoch.values.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(ep.train_loss.values, [*EPOCH_STEPS, 1])  # nothing dropped
    counts = raw(store, "epochs/num_steps")
    if every == 1:
        assert ep.num_steps.values.tolist() == [*EPOCH_STEPS, 1]
        assert "lost_rows" not in counts.attrs
    else:
        np.testing.assert_array_equal(ep.num_steps.values, [np.nan] * 4 + [1])
        assert counts[:].tolist() == [-1, -1, -1, -1, 1] and counts.attrs["lost_rows"] == [[0, 4]]
    ds = gradflow.open(store)
    assert ds.step.values.tolist() == recorded_steps(EPOCH_STEPS + [1], every)


@pytest.mark.parametrize("every", [1, 2])
def test_resume_after_a_repair_cut_the_epochs(tmp_path, every):
    """A store whose epochs an earlier repair cut (as gradflow did for a lost num_steps chunk):
    the step rows of epochs 0-3 carry their labels, the epochs group is empty. The resume gives
    them their rows: with every=1 their exact counts, with every=2 marked lost; never 0 for the
    first ones and every step lumped into the last."""
    store = tmp_path / "run.zarr"
    train(store, EPOCH_STEPS, every)
    epochs = zarr.open_group(store / "epochs", mode="r+")
    for _, array in epochs.arrays():
        if array.metadata.dimension_names[0] == "epoch":
            array.resize((0,) + array.shape[1:])
    consolidate(str(store), fresh=ALL)
    n_rows = len(recorded_steps(EPOCH_STEPS, every))
    assert check_store(str(store)) == ([f"(run): ok, {n_rows} steps, 0 epochs; epochs 0-3 have step "
                                        f"rows but no epoch row (a repair cut them; a resumed Recorder "
                                        f"gives them rows)"], False)

    train(store, [1], every, mode="a")
    ep = gradflow.open(store, group="epochs")
    assert ep.epoch.values.tolist() == [0, 1, 2, 3, 4]
    if every == 1:
        assert ep.num_steps.values.tolist() == [*EPOCH_STEPS, 1]
    else:
        np.testing.assert_array_equal(ep.num_steps.values, [np.nan] * 4 + [1])
        assert raw(store, "epochs/num_steps").attrs["lost_rows"] == [[0, 4]]


def test_interrupted_epoch_after_lost_counts(tmp_path):
    """Counts lost before an epoch cut short: its count (steps seen minus those of the epochs
    before) is unknown too, and marked lost; the epochs after it count again."""
    store = tmp_path / "run.zarr"
    train(store, EPOCH_STEPS, every=2)
    (store / "epochs/num_steps/c/0").unlink()
    check_store(str(store), repair=True)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradflow.Recorder(model, optimizer, store, every=2, mode="a"):  # 3 steps, no end_epoch
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            optimizer.step()
    train(store, [2], every=2, mode="a")
    ep = gradflow.open(store, group="epochs")
    assert ep.epoch.values.tolist() == [0, 1, 2, 3, 4, 5]
    np.testing.assert_array_equal(ep.num_steps.values, [np.nan] * 5 + [2])
    assert raw(store, "epochs/num_steps").attrs["lost_rows"] == [[0, 4], [4, 5]]


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


def write_rows(path, steps: np.ndarray, epochs: np.ndarray, every: int = 1,
               labels: np.ndarray | None = None, counts: np.ndarray | None = None) -> None:
    """Step rows with the given ``step`` values (and epoch ``labels``, else 0) and epoch rows with
    the given ``epoch`` values (and ``num_steps`` ``counts``, else 0)."""
    n, k = len(steps), len(epochs)
    step_rows = {name: np.ones((n, 1), np.float32) for name in gradflow.store.STEP_VARIABLES}
    step_rows.update(step=steps, epoch=np.zeros(n, np.int64) if labels is None else labels,
                     wall_time=np.zeros(n), skipped=np.zeros(n, bool))
    epoch_rows = {"epoch": epochs, "num_steps": np.zeros(k, np.int64) if counts is None else counts,
                  "update_mean_abs": np.ones((k, 1), np.float32),
                  "update_norm": np.ones((k, 1), np.float32), "val_loss": np.arange(k, dtype=float)}
    store = RunStore(str(path), None, LAYERS, {"every": every, "per_parameter": False}, every, False)
    store.write(Rows(step_rows, epoch_rows, int(steps[-1]) + 1))
    store.close()


def test_num_steps_of_epochs_whose_step_rows_are_cut_are_lost(tmp_path):
    """every=1, epochs of 1000, 1000 and 500 steps; a lost `skipped` chunk cuts the step rows at
    row 1024 (inside epoch 1) and the num_steps chunk is lost too. Epoch 0's rows are all kept
    (epoch 1 follows it): 1000, exact. Epochs 1 and 2 lost rows: marked lost, not 24 and 0."""
    store = tmp_path / "run.zarr"
    counts = np.array([1000, 1000, 500])
    write_rows(store, np.arange(2500), np.arange(3), labels=np.repeat(np.arange(3), counts),
               counts=counts)
    (store / "skipped/c/1").unlink()
    (store / "epochs/num_steps/c/0").unlink()
    lines, _ = check_store(str(store))
    assert lines == ["(run): ./skipped: chunk of rows 1024-2047 is missing",
                     "(run): epochs/num_steps: chunk of rows 0-2 is missing (--repair recounts 1 from "
                     "the step rows; 2 cannot be counted exactly (their step rows are cut) and are "
                     "marked lost: NaN)"]
    check_store(str(store), repair=True)
    ep = gradflow.open(store, group="epochs")
    np.testing.assert_array_equal(ep.num_steps.values, [1000, np.nan, np.nan])
    assert raw(store, "epochs/num_steps").attrs["lost_rows"] == [[1, 3]]
    assert gradflow.open(store).sizes["step"] == 1024


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


@pytest.mark.parametrize("every", [1, 2])
def test_a_resume_after_a_cut_never_numbers_a_step_again(tmp_path, every):
    """A repair cut the step rows (a ``skipped`` chunk does not decode): the resumed run's steps are
    numbered after every step the first run took, so step s means one optimizer step; a later lost
    ``step`` chunk is still rebuilt from that numbering, and num_steps of the cut epochs is never
    recounted from the rows they lost."""
    store = tmp_path / "run.zarr"
    first = [1000, 1500]  # 2500 steps: rows 1024-2047 are chunk 1 of `skipped` (every=1)
    train(store, first, every)
    (store / "skipped/c/1" if every == 1 else store / "skipped/c/0").write_bytes(b"garbage")
    kept = 1024 if every == 1 else 0
    lines, damaged = check_store(str(store), repair=True)
    n_rows = len(recorded_steps(first, every))
    assert not damaged and lines[-1].startswith(
        f"(run): repaired, kept {kept} of {n_rows} steps and 2 of 2 epochs")
    train(store, [5], every, mode="a")
    taken = sum(first)  # the resumed run's steps are 2500, 2501, ...
    expected = [s for s in recorded_steps(first, every) if s < kept * every] + \
        [s for s in range(taken, taken + 5) if s % every == 0]
    assert gradflow.open(store).step.values.tolist() == expected
    assert gradflow.open(store, group="epochs").num_steps.values.tolist() == [*first, 5]
    (store / "step/c/0").unlink()
    (store / "epochs/num_steps/c/0").unlink()
    assert check_store(str(store), repair=True)[1] is False
    assert gradflow.open(store).step.values.tolist() == expected  # rebuilt across the restart
    counts = gradflow.open(store, group="epochs").num_steps.values
    if every == 1:  # epoch 0 kept all its rows; epoch 1 lost rows to the cut
        np.testing.assert_array_equal(counts, [1000, np.nan, 5])
    else:
        assert np.isnan(counts).all()



def session(store, ended: list[int], open_steps: int = 0, mode: str = "a") -> None:
    """One Recorder (every=1): an epoch per entry of ``ended``, then ``open_steps`` steps of an
    epoch that no end_epoch closes (closed mid-epoch, as a crash or a preemption leaves it)."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradflow.Recorder(model, optimizer, store, every=1, mode=mode) as rec:
        for i, n in enumerate([*ended, open_steps]):
            for _ in range(n):
                optimizer.zero_grad()
                model(torch.randn(4, 3)).sum().backward()
                optimizer.step()
            if i < len(ended):
                rec.end_epoch(train_loss=float(n))


def epochs_of(*sessions: tuple[list[int], int]) -> list[int]:
    """The epoch of each recorded step (every=1), from the loops: each end_epoch closes an epoch,
    and a resumed Recorder starts a new one after an epoch cut short."""
    labels, epoch = [], 0
    for ended, open_steps in sessions:
        for n in ended:
            labels += [epoch] * n
            epoch += 1
        labels += [epoch] * open_steps
        epoch += bool(open_steps)
    return labels


def test_lost_chunk_of_the_steps_epoch_labels_is_rebuilt_from_num_steps(tmp_path):
    """every=1: epoch e's num_steps are its step rows, in order, so a lost chunk of the steps'
    ``epoch`` labels is rebuilt, not every later step row cut: across a resume that gave an epoch
    cut short its row, and a chunk that does not decode too. Rows past the last epoch row (the
    unfinished epoch) are rebuilt up to the last stored row that names it; after it nothing says
    whether a later epoch began there (an earlier repair may have cut the epochs' rows): cut."""
    store = tmp_path / "run.zarr"
    loops = ([700, 900], 400), ([600], 500)  # rows 0-3099; the resumed run starts epoch 3 at row 2000
    session(store, *loops[0], mode="w-")
    session(store, *loops[1])
    expected = epochs_of(*loops)
    assert len(expected) == 3100 and expected[2000] == 3 and expected[2599:2601] == [3, 4]
    (store / "epoch/c/1").unlink()
    (store / "epoch/c/2").write_bytes(b"garbage")
    lines, damaged = check_store(str(store))
    assert damaged and len(lines) == 2
    assert lines[0] == ("(run): ./epoch: chunk of rows 1024-2047 is missing (epochs/num_steps give "
                        "each row's epoch: --repair rebuilds it)")
    assert lines[1].startswith("(run): ./epoch: chunk of rows 2048-3071 is damaged (epoch/c/2: 7 bytes")
    assert lines[1].endswith("(epochs/num_steps give each row's epoch: --repair rebuilds it)")
    lines, _ = check_store(str(store), repair=True)
    assert lines[-1].startswith("(run): repaired, kept 3100 of 3100 steps and 4 of 4 epochs")
    assert check_store(str(store)) == (["(run): ok, 3100 steps, 4 epochs"], False)
    assert gradflow.open(store).epoch.values.tolist() == expected
    assert "lost_rows" not in raw(store, "epoch").attrs
    (store / "epoch/c/3").unlink()  # rows 3072-3099: the unfinished epoch's last rows
    check_store(str(store), repair=True)
    assert gradflow.open(store).epoch.values.tolist() == expected[:3072]


def test_lost_labels_in_a_run_whose_steps_a_repair_cut(tmp_path):
    """A repair cut the step rows at 1024 (a ``skipped`` chunk that does not decode), then the run
    was resumed. Where the epoch cut short was the last one, its row's num_steps counts the cut
    steps too, so the resumed epoch starts where num_steps says: its lost labels are rebuilt.
    Where it had already ended and more steps followed, the resumed run's first epoch also holds
    those steps (without rows), which its num_steps does not count: the sums put its last 400 rows
    in the next epoch, so nothing is rebuilt from the restart on, and the run is cut as before."""
    for name, first in (("exact", ([1000], 1500)), ("shifted", ([1000, 1100], 400))):
        store = tmp_path / f"{name}.zarr"
        session(store, *first, mode="w-")
        (store / "skipped/c/1").write_bytes(b"garbage")
        check_store(str(store), repair=True)
        assert zarr.open_group(store, mode="r").attrs["step_restarts"] == [[1024, 2500]]
        session(store, [1500], 900)
        # The resumed run's epochs are 2 and 3 either way: after epoch 1 cut short, or going on
        # with epoch 2, whose rows the cut took.
        expected = epochs_of(first)[:1024] + [2] * 1500 + [3] * 900
        (store / "epoch/c/2").unlink()  # rows 2048-3071
        lines, _ = check_store(str(store))
        assert lines[0].endswith("--repair rebuilds it)") == (name == "exact")
        check_store(str(store), repair=True)
        kept = 3424 if name == "exact" else 2048
        assert gradflow.open(store).epoch.values.tolist() == expected[:kept]


def test_lost_labels_and_lost_counts(tmp_path):
    """600 epochs of 5 steps (num_steps in chunks of 256 epochs). With the counts of epochs
    256-511 lost too, the labels of the rows before epoch 256 are still rebuilt (from the counts
    of epochs 0-255), and num_steps is recounted from them; labels in epochs 256-511 are not."""
    counts = np.full(600, 5)
    labels = np.repeat(np.arange(600), 5)
    for lost, kept in (("c/0", 3000), ("c/2", 2048)):  # rows 0-1023 (epochs 0-204), 2048-3071 (409-)
        store = tmp_path / f"{lost[-1]}.zarr"
        write_rows(store, np.arange(3000), np.arange(600), labels=labels, counts=counts)
        (store / "epoch" / lost).unlink()
        (store / "epochs/num_steps/c/1").unlink()
        check_store(str(store), repair=True)
        assert gradflow.open(store).epoch.values.tolist() == labels[:kept].tolist()
        cut = (np.arange(600) >= 409) & (np.arange(600) < 512) & (kept < 3000)
        np.testing.assert_array_equal(gradflow.open(store, group="epochs").num_steps.values,
                                      np.where(cut, np.nan, counts))  # epoch 409 lost rows


def test_lost_labels_that_the_counts_do_not_give_are_cut(tmp_path):
    """every=2 (an epoch may end between two recorded steps), and labels that num_steps does not
    give (1,000 rows say epoch 1, which counted 999 steps: not what gradflow writes): nothing
    proves the lost labels, the run is cut."""
    odd = tmp_path / "odd.zarr"
    write_rows(odd, np.arange(3000), np.arange(3), labels=np.repeat(np.arange(3), 1000),
               counts=np.array([1000, 999, 1000]))
    sparse = tmp_path / "sparse.zarr"
    write_rows(sparse, np.arange(0, 6000, 2), np.arange(3), every=2,
               labels=np.repeat(np.arange(3), 1000), counts=np.array([2000, 2000, 2000]))
    for store in (odd, sparse):
        (store / "epoch/c/1").unlink()
        assert check_store(str(store))[0] == ["(run): ./epoch: chunk of rows 1024-2047 is missing"]
        check_store(str(store), repair=True)
        assert gradflow.open(store).sizes["step"] == 1024
