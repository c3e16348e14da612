"""The layer table and the other arrays whose length is fixed at creation (``layer``,
``module_type``, ``depth``, ``num_params``, ``param_group``, the summary's labels): every chunk is
stored and the run keeps a copy of them, so a lost chunk is damage that a repair rebuilds; a store
written before that (no ``fixed_chunks_stored``) is not called damaged for a chunk its writer left
out because it held the fill value.

Expected values come from the model itself (torch's ``named_modules`` and parameter sizes).
(The one-line reports and exit codes of ``gradflow check``: tests/cli/test_check.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import gradflow
from gradflow.repair import check_store
from gradflow.store import ALL, consolidate

COPY = "the run's fixed_coordinates attribute"


def table_of(model: nn.Module) -> dict[str, list]:
    """The modules owning parameters, in registration order, as torch sees them."""
    rows = [(name, type(m).__name__, sum(p.numel() for p in m.parameters(recurse=False)))
            for name, m in model.named_modules() if list(m.parameters(recurse=False))]
    return {"layer": [r[0] for r in rows], "module_type": [r[1] for r in rows],
            "num_params": [r[2] for r in rows], "depth": list(range(len(rows)))}


def layered_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def train(store, model: nn.Module, group: str | None = None, mode: str = "w-", steps: int = 3) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradflow.Recorder(model, optimizer, store, group=group, mode=mode) as rec:
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            optimizer.step()
        rec.end_epoch(train_loss=1.0)


def layer_coords(store, group: str | None = None) -> dict[str, list]:
    ds = gradflow.open(store, group=group)
    return {name: ds[name].values.tolist() for name in ("layer", "module_type", "num_params", "depth")}


def make_old_style(store) -> None:
    """What a gradflow before fixed_chunks_stored wrote: no marker, no copy of the coordinates."""
    root = zarr.open_group(store, mode="r+", use_consolidated=False)
    attrs = root.attrs.asdict()
    del attrs["fixed_chunks_stored"], attrs["fixed_coordinates"]
    root.attrs.put(attrs)
    consolidate(str(store), fresh=ALL)


def test_every_chunk_of_the_layer_table_is_stored_and_copied(tmp_path):
    """A one-layer model's depth is [0], the fill value: its chunk is stored all the same."""
    store = tmp_path / "run.zarr"
    model = nn.Linear(3, 2)
    train(store, model)
    for chunk in ("depth/c/0", "epochs/depth/c/0", "layer/c/0", "num_params/c/0", "param_group/c/0",
                  "summary/256/stat/c/0", "summary/4096/layer/c/0"):
        assert (store / chunk).exists(), chunk
    attrs = zarr.open_group(store, mode="r").attrs
    assert attrs["fixed_chunks_stored"] is True
    expected = table_of(model)  # the root module: "" to torch, "(root)" in gradflow's layer names
    assert attrs["fixed_coordinates"] == {
        "layer": ["(root)"], "module_type": expected["module_type"], "num_params": expected["num_params"],
        "param_group": ["group0"], "stat": ["mean", "min", "max", "nonfinite"]}


def test_old_style_one_layer_store_is_not_damaged(tmp_path):
    """Before fixed_chunks_stored, the one-layer depth [0] (all fill value) had no chunk."""
    store = tmp_path / "run.zarr"
    train(store, nn.Linear(3, 2))
    make_old_style(store)
    (store / "depth/c/0").unlink()
    (store / "epochs/depth/c/0").unlink()
    assert check_store(str(store)) == (["(run): ok, 3 steps, 1 epochs"], False)
    assert gradflow.open(store).depth.values.tolist() == [0]
    train(store, nn.Linear(3, 2), mode="a")  # a resume accepts it too
    assert check_store(str(store)) == (["(run): ok, 6 steps, 2 epochs"], False)


def test_old_style_store_reports_only_what_cannot_be_the_fill_value(tmp_path):
    """Without the marker: a lost label (gradflow writes no empty one) is damage; a lost count is
    damage when another copy shows it was not 0, and rebuilt from it; a lost count no copy holds
    is lost (every layer owns a parameter: the chunk was never all 0), never read as zeros."""
    store = tmp_path / "run.zarr"
    model = layered_model()
    train(store, model)
    make_old_style(store)
    (store / "module_type/c/0").unlink()
    (store / "num_params/c/0").unlink()
    (store / "depth/c/0").unlink()
    lines, damaged = check_store(str(store))
    assert damaged and lines == [
        "(run): ./depth: chunk of rows 0-2 is missing (--repair rebuilds it from its numbering: row i is i)",
        "(run): ./module_type: chunk of rows 0-2 is missing (--repair rebuilds it from epochs/module_type)",
        "(run): ./num_params: chunk of rows 0-2 is missing (--repair rebuilds it from epochs/num_params)"]
    assert check_store(str(store), repair=True)[1] is False
    assert check_store(str(store)) == (["(run): ok, 3 steps, 1 epochs"], False)
    assert layer_coords(store) == table_of(model)

    (store / "num_params/c/0").unlink()
    (store / "epochs/num_params/c/0").unlink()
    lines, damaged = check_store(str(store))
    assert damaged and lines == [
        f"(run): {label}: chunk of rows 0-2 is missing and lost (no intact copy holds it); --repair "
        f"cannot rebuild it" for label in ("./num_params", "epochs/num_params")]
    lines, damaged = check_store(str(store), repair=True)
    assert damaged and lines[-1].startswith(
        "(run): not repaired: ./num_params rows 0-2, epochs/num_params rows 0-2 cannot be rebuilt")
    with pytest.raises(gradflow.GradflowError, match=r"num_params: chunk of rows 0-2 is missing and lost"):
        gradflow.open(store)  # not zeros


def test_old_style_store_with_every_copy_of_a_label_lost(tmp_path):
    store = tmp_path / "run.zarr"
    train(store, layered_model())
    make_old_style(store)
    for chunk in ("layer/c/0", "epochs/layer/c/0", "summary/256/layer/c/0", "summary/4096/layer/c/0"):
        (store / chunk).unlink()
    lines, damaged = check_store(str(store))
    assert damaged and lines[0] == ("(run): ./layer: chunk of rows 0-2 is missing and lost (no intact "
                                    "copy holds it); --repair cannot rebuild it") and len(lines) == 4
    lines, damaged = check_store(str(store), repair=True)
    assert damaged and lines[-1].startswith("(run): not repaired: ./layer rows 0-2, epochs/layer rows 0-2")
    assert not (store / "layer/c/0").exists()


def test_a_resume_refuses_a_lost_layer_chunk_as_damage_not_as_another_model(tmp_path):
    store = tmp_path / "run.zarr"
    model = layered_model()
    train(store, model)
    (store / "layer/c/0").unlink()
    with pytest.raises(gradflow.GradflowError) as err:
        train(store, model, mode="a")
    assert str(err.value) == (f"{store} is damaged (./layer: chunk of rows 0-2 is missing (--repair "
                              f"rebuilds it from {COPY})); run `gradflow check {store} --repair` first")
    check_store(str(store), repair=True)
    train(store, model, mode="a")
    assert check_store(str(store)) == (["(run): ok, 6 steps, 2 epochs"], False)
    assert layer_coords(store) == table_of(model)
    np.testing.assert_array_equal(gradflow.open(store).step.values, np.arange(6))


def test_lost_layer_chunk_of_a_sweep_group(tmp_path):
    store = tmp_path / "sweep.zarr"
    model = layered_model()
    train(store, model, group="v1")
    train(store, layered_model(), group="v2")
    (store / "v1/epochs/module_type/c/0").unlink()
    (store / "v1/num_params/c/0").unlink()
    lines, damaged = check_store(str(store))
    assert damaged and lines == [
        f"v1: v1/epochs/module_type: chunk of rows 0-2 is missing (--repair rebuilds it from {COPY})",
        f"v1: v1/num_params: chunk of rows 0-2 is missing (--repair rebuilds it from {COPY})",
        "v2: ok, 3 steps, 1 epochs"]
    with pytest.raises(gradflow.GradflowError, match=r"\(group 'v1'\) is damaged: v1/epochs/module_type"):
        gradflow.open(store)
    assert check_store(str(store), repair=True)[1] is False
    assert check_store(str(store))[1] is False
    tree = gradflow.open_tree(store)
    for group in ("v1", "v1/epochs"):
        ds = tree[group].to_dataset()
        assert {name: ds[name].values.tolist() for name in table_of(model)} == table_of(model)
