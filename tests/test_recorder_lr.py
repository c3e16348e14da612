"""The ``lr`` step variable: each param group's learning rate at each recorded step, as the scheduler
set it (checked against the rates the test reads off the optimizer itself right before each step)."""

from __future__ import annotations

import numpy as np
import torch
import zarr
from torch import nn

import gradflow


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def _train(model, optimizer, scheduler, steps: int, rec=None) -> list[list[float]]:
    """Plain loop; returns each step's group rates, read by hand just before ``optimizer.step()``."""
    g = torch.Generator().manual_seed(1)
    seen = []
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


def test_lr_per_step_and_param_group_follows_the_schedule(tmp_path):
    model = _model()
    optimizer = torch.optim.SGD([{"params": model[0].parameters()},
                                 {"params": model[2].parameters(), "lr": 0.05}], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[0.4, 0.2], total_steps=12)
    rec = gradflow.Recorder(model, optimizer, tmp_path / "run.zarr")
    seen = _train(model, optimizer, scheduler, 12)
    rec.close()
    ds = gradflow.open(tmp_path / "run.zarr")
    assert ds["lr"].dims == ("step", "param_group")
    assert ds["param_group"].values.tolist() == ["group0", "group1"]
    np.testing.assert_array_equal(ds["lr"].values, np.array(seen))
    assert len(set(ds["lr"].values[:, 0].tolist())) > 6  # the schedule really moves
    assert ds.attrs["optimizers"][0]["param_groups"][0]["lr"] != ds["lr"].values[-1, 0]


def test_lr_with_every_k_and_two_optimizers(tmp_path):
    model = _model()
    opt_a = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt_b = torch.optim.Adam(model[2].parameters(), lr=0.01)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.ExponentialLR(opt_b, gamma=0.9)
    rec = gradflow.Recorder(model, [opt_a, opt_b], tmp_path / "run.zarr", every=3)
    g = torch.Generator().manual_seed(1)
    seen = []
    for _ in range(9):
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
        opt_a.zero_grad()
        opt_b.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        seen.append([opt_a.param_groups[0]["lr"], opt_b.param_groups[0]["lr"]])
        opt_a.step()
        sched_a.step()  # opt_a's schedule moves before opt_b steps: opt_b's row must not see it
        opt_b.step()
        sched_b.step()
    rec.close()
    ds = gradflow.open(tmp_path / "run.zarr")
    assert ds["step"].values.tolist() == [0, 3, 6]
    assert ds["param_group"].values.tolist() == ["opt0/group0", "opt1/group0"]
    np.testing.assert_array_equal(ds["lr"].values, np.array(seen)[[0, 3, 6]])


def test_a_group_added_later_does_not_shift_another_optimizers_column(tmp_path):
    """Columns are (optimizer, group) pairs fixed when the store is made: a group added to the first
    optimizer later has no column, and the second optimizer's column keeps the second's rate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1))
    opt_a = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model[2].parameters(), lr=0.2)
    rec = gradflow.Recorder(model, [opt_a, opt_b], tmp_path / "run.zarr")
    g = torch.Generator().manual_seed(1)
    seen = []
    for step in range(4):
        opt_a.zero_grad()
        opt_b.zero_grad()
        model(torch.randn(5, 4, generator=g)).pow(2).mean().backward()
        seen.append([opt_a.param_groups[0]["lr"], opt_b.param_groups[0]["lr"]])
        opt_a.step()
        opt_b.step()
        if step == 1:
            opt_a.add_param_group({"params": model[1].parameters(), "lr": 0.05})
    rec.close()
    ds = gradflow.open(tmp_path / "run.zarr")
    assert ds["param_group"].values.tolist() == ["opt0/group0", "opt1/group0"]
    np.testing.assert_array_equal(ds["lr"].values, np.array(seen))


def test_resuming_a_store_without_lr_adds_it_with_nan_history(tmp_path):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    rec = gradflow.Recorder(model, optimizer, tmp_path / "run.zarr")
    _train(model, optimizer, scheduler, 3)
    rec.close()
    root = zarr.open_group(tmp_path / "run.zarr", mode="a")  # as written before lr was recorded
    del root["lr"], root["param_group"]
    zarr.consolidate_metadata(root.store)
    rec = gradflow.Recorder(model, optimizer, tmp_path / "run.zarr", mode="a")
    seen = _train(model, optimizer, scheduler, 2)
    rec.close()
    lr = gradflow.open(tmp_path / "run.zarr")["lr"].values
    assert lr.shape == (5, 1)
    assert np.isnan(lr[:3]).all()
    np.testing.assert_array_equal(lr[3:], np.array(seen))


def _steps(model, optimizer, n: int, seed: int = 2) -> list[list[float]]:
    """Plain steps; each step's group rates, read by hand before ``optimizer.step()``."""
    g = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(n):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(torch.randn(16, 4, generator=g)), torch.randn(16, 1, generator=g)).backward()
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
    return seen


def test_resume_with_other_optimizers_or_param_groups_is_refused_untouched(tmp_path):
    """Resumed with two param groups where the run had one, column ``group0`` took the new group 0's
    lr and group 1's was recorded nowhere, silently; another optimizer or group count is refused."""
    import pytest

    from gradflow import GradflowError

    model, store = _model(), tmp_path / "run.zarr"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradflow.Recorder(model, optimizer, store):
        seen = _steps(model, optimizer, 2)
    split = [{"params": model[0].parameters(), "lr": 0.3}, {"params": model[2].parameters(), "lr": 0.7}]
    others = {"SGD with 2 param groups": [torch.optim.SGD(split)],
              "Adam with 1 param group": [torch.optim.Adam(model.parameters(), lr=0.1)],
              "SGD with 1 param group, SGD with 1 param group": [
                  torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.SGD(model[2].parameters(), lr=0.1)]}
    for described, optimizers in others.items():
        with pytest.raises(GradflowError) as err:
            gradflow.Recorder(model, optimizers, store, mode="a")
        assert str(err.value) == (f"{store} was recorded with SGD with 1 param group; this Recorder has "
                                  f"{described}: a resume (mode=\"a\") needs the same optimizers and param "
                                  f"groups; record into a new store or group")
    ds = gradflow.open(store)
    assert ds.param_group.values.tolist() == ["group0"] and ds.lr.values.tolist() == seen
    assert len(ds.attrs["optimizers"][0]["param_groups"]) == 1
    # the same optimizer class and groups resume, at their current rate
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradflow.Recorder(model, optimizer, store, mode="a"):
        seen += _steps(model, optimizer, 2)
    assert gradflow.open(store).lr.values.tolist() == seen == [[0.1], [0.1], [0.05], [0.05]]


def test_a_group_added_during_the_run_is_in_the_optimizers_attribute_and_resumes(tmp_path):
    """Gradual unfreezing, then a restart that rebuilds the optimizer with the added group: the
    run's ``optimizers`` attribute lists the group from the commit after it joined, so the resume
    matches; its lr has no column (the groups of the store's creation), as during the run."""
    model, store = _model(), tmp_path / "run.zarr"
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)
    with gradflow.Recorder(model, optimizer, store) as rec:
        seen = _steps(model, optimizer, 2)
        model[0].requires_grad_(True)
        optimizer.add_param_group({"params": model[0].parameters(), "lr": 0.02})
        seen += _steps(model, optimizer, 2, seed=3)
        rec.end_epoch()
    ds = gradflow.open(store)
    assert [g["lr"] for g in ds.attrs["optimizers"][0]["param_groups"]] == [0.1, 0.02]
    assert ds.param_group.values.tolist() == ["group0"]
    assert ds.lr.values.tolist() == [[lrs[0]] for lrs in seen]
    restarted = torch.optim.SGD([{"params": model[2].parameters(), "lr": 0.05},
                                 {"params": model[0].parameters(), "lr": 0.01}])
    with gradflow.Recorder(model, restarted, store, mode="a"):
        seen += _steps(model, restarted, 2, seed=4)
    ds = gradflow.open(store)
    assert ds.lr.values.tolist() == [[lrs[0]] for lrs in seen] == [[0.1]] * 4 + [[0.05]] * 2
    assert [g["lr"] for g in ds.attrs["optimizers"][0]["param_groups"]] == [0.1, 0.02]
    assert np.isfinite(ds.grad_norm.sel(layer="0").values[2:]).all()


def test_resume_with_the_optimizers_in_another_order_or_groups_swapped_is_refused(tmp_path):
    """Same classes and group counts, but optimizer 0 now steps the other layer (or the groups
    swapped their parameters): column opt0/group0 would hold the other layer's rate from the resume
    on (0.1, 0.1, then 0.3), silently. Refused, the store untouched; the same order resumes."""
    import pytest

    from gradflow import GradflowError

    def step(optimizers):
        model(torch.ones(2, 4)).sum().backward()
        for o in optimizers:
            o.step()

    model = _model()
    for name, first, swapped in (
            ("two.zarr", lambda: [torch.optim.SGD(model[0].parameters(), lr=0.1),
                                  torch.optim.SGD(model[2].parameters(), lr=0.3)],
             lambda: [torch.optim.SGD(model[2].parameters(), lr=0.3),
                      torch.optim.SGD(model[0].parameters(), lr=0.1)]),
            ("groups.zarr", lambda: [torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                                                      {"params": model[2].parameters(), "lr": 0.3}])],
             lambda: [torch.optim.SGD([{"params": model[2].parameters(), "lr": 0.3},
                                       {"params": model[0].parameters(), "lr": 0.1}])])):
        store = tmp_path / name
        optimizers = first()
        with gradflow.Recorder(model, optimizers, store):
            step(optimizers)
            step(optimizers)
        stored = gradflow.open(store).lr.values.tolist()
        assert stored == [[0.1, 0.3], [0.1, 0.3]]
        with pytest.raises(GradflowError, match=r"param group 0 of optimizer 0 held other parameters "
                                                r"\(0\.weight, 0\.bias\) than it holds now "
                                                r"\(2\.weight, 2\.bias\)"):
            gradflow.Recorder(model, swapped(), store, mode="a")
        assert gradflow.open(store).lr.values.tolist() == stored
        optimizers = first()
        with gradflow.Recorder(model, optimizers, store, mode="a"):
            step(optimizers)
        assert gradflow.open(store).lr.values.tolist() == stored + [[0.1, 0.3]]
