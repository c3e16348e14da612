"""Recorder on a ``torch.compile``d model: layer names without ``_orig_mod.``, exact figures.

One small model compiled once. The ``aot_eager`` backend runs the same Dynamo capture and AOT-autograd
backward graph as the default inductor backend, minus C++ code generation, which alone takes ~25 s on
a 2-core CPU; nothing the Recorder touches (module names, parameter hooks, ``.grad``, optimizer hooks)
differs between the two. Everything is checked on that one run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import layer_reference
from torch import nn

import gradflow

STEPS = 3
LAYERS = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}  # nn.Sequential(Linear, Tanh, Linear)


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    """Train a compiled model STEPS steps with a Recorder; return the store and the raw tensors."""
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = torch.optim.Adam(compiled.parameters(), lr=0.05)
    store = str(tmp_path_factory.mktemp("compile") / "run.zarr")
    data = torch.Generator().manual_seed(1)
    steps = []
    with gradflow.Recorder(compiled, optimizer, store, every=1):
        for _ in range(STEPS):
            x, y = torch.randn(6, 4, generator=data), torch.randn(6, 3, generator=data)
            optimizer.zero_grad()
            nn.functional.mse_loss(compiled(x), y).backward()
            grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
            before = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
            optimizer.step()
            after = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
            steps.append((grads, before, after))
    assert counters["aot_autograd"]["ok"] >= 1  # forward and backward really ran as compiled graphs
    return gradflow.open(store), steps


def test_compiled_model_layer_names_have_no_wrapper_prefix(compiled_run):
    ds, _ = compiled_run
    assert list(ds["layer"].values) == list(LAYERS)
    assert list(ds["module_type"].values) == ["Linear", "Linear"]
    assert list(ds["num_params"].values) == [4 * 8 + 8, 8 * 3 + 3]


def test_compiled_model_figures_match_reference(compiled_run):
    ds, steps = compiled_run
    assert ds.sizes["step"] == STEPS
    for step, (grads, before, after) in enumerate(steps):
        assert not all(np.array_equal(before[n], after[n]) for n in before)  # the step did move weights
        for layer, names in LAYERS.items():
            for var, value in layer_reference(grads, before, after, names).items():
                got = float(ds[var].isel(step=step).sel(layer=layer))
                np.testing.assert_allclose(got, value, rtol=2e-6, atol=0,
                                           err_msg=f"{var} step {step} layer {layer}")
