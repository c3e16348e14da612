"""The store schema (gradflow.schema) is what a recorded store holds: names, dims, dtypes, meanings."""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from torch import nn

import gradflow
from gradflow import quantities, schema


def _record(path) -> None:
    """Two recorded SGD steps of a small MLP, then one epoch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = gradflow.Recorder(model, optimizer, path)
    for x in torch.randn(2, 5, 3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    rec.end_epoch(train_loss=1.0)
    rec.close()


def _check(ds: xr.Dataset, declared: tuple[schema.Variable, ...]) -> None:
    for variable in declared:
        array = ds[variable.name]
        assert array.dims == variable.dims, variable.name
        assert array.attrs["description"] == variable.meaning, variable.name
        assert array.attrs.get("units", "") == variable.unit, variable.name  # xarray's plot labels
        if variable.dtype == "str":
            assert array.dtype.kind in "UTO", variable.name  # fixed-width, variable-width or object strings
        else:
            assert array.dtype == np.dtype(variable.dtype), variable.name


def test_a_recorded_store_holds_the_declared_variables(tmp_path):
    _record(tmp_path / "run.zarr")
    steps = xr.open_zarr(tmp_path / "run.zarr")
    epochs = xr.open_zarr(tmp_path / "run.zarr", group="epochs")
    _check(steps, schema.STEP_VARIABLES + schema.STEP_COORDS + schema.LAYER_COORDS + schema.OPTIMIZER_VARIABLES)
    _check(epochs, schema.EPOCH_VARIABLES + schema.EPOCH_COORDS + schema.LAYER_COORDS)
    layer_arrays = {name for name, array in steps.variables.items() if array.dims == ("step", "layer")}
    assert layer_arrays == set(schema.names(schema.STEP_VARIABLES))
    assert steps.attrs["gradflow_schema"] == epochs.attrs["gradflow_schema"] == schema.VERSION


def test_the_computation_produces_exactly_the_declared_figures():
    tensors, layers = 3, 2
    per_tensor = np.ones((1, quantities.NUM_STATS, tensors))
    present = np.ones((1, tensors), bool)
    starts, numel = np.array([0, 2]), np.array([5, 7])
    step = quantities.layer_step_stats(per_tensor, present, starts, numel)
    epoch = quantities.layer_epoch_stats(np.ones((2, tensors)), starts, numel)
    assert set(step) == set(schema.names(schema.STEP_VARIABLES))
    assert set(epoch) == set(schema.names(schema.EPOCH_VARIABLES))
    assert all(values.shape[-1] == layers for values in step.values())


def test_every_recorded_variable_has_a_unit_a_combination_rule_and_a_label():
    for variable in schema.STEP_VARIABLES + schema.EPOCH_VARIABLES:
        assert variable.unit and variable.combine and variable.label, variable.name
        assert schema.label(variable.name) == schema.LABELS[variable.name] == variable.label
    assert schema.label("train_loss") == "train_loss"
