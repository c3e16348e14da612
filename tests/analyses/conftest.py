"""Hand-made runs in exactly the store schema (dims step/layer and epoch/layer), no training needed."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from gradflow import schema

STEP_VARS = schema.names(schema.STEP_VARIABLES)
# Registration (input-to-output) order of a tiny FCN: depth = index in this list.
FCN_LAYERS = [("down1.conv", "Conv2d"), ("down1.block1.conv1", "Conv2d"), ("down1.block1.bn1", "BatchNorm2d"),
              ("across.block1.conv1", "Conv2d"), ("skip1.conv", "Conv2d"), ("up1.block1.conv1", "Conv2d"),
              ("classifier", "Conv2d")]


def make_run(seed: int, layers=FCN_LAYERS, epochs: int = 3, steps_per_epoch: int = 4, shuffle: bool = True):
    """(step Dataset, epoch Dataset) with random positive values; the layer dim is stored shuffled
    (not in depth order) so tests see that readers sort by the ``depth`` coordinate."""
    rng = np.random.default_rng(seed)
    n_layers, n_steps = len(layers), epochs * steps_per_epoch
    order = rng.permutation(n_layers) if shuffle else np.arange(n_layers)
    layer_coords = {
        "layer": [layers[i][0] for i in order],
        "depth": ("layer", order),
        "module_type": ("layer", [layers[i][1] for i in order]),
        "num_params": ("layer", rng.integers(10, 1000, n_layers)),
    }
    step = xr.Dataset(
        {name: (("step", "layer"), rng.uniform(0.1, 10, (n_steps, n_layers)).astype("float32")) for name in STEP_VARS},
        coords={"step": np.arange(n_steps), "epoch": ("step", np.repeat(np.arange(epochs), steps_per_epoch)),
                "wall_time": ("step", np.arange(n_steps) * 0.5), "skipped": ("step", np.zeros(n_steps, bool)),
                **layer_coords},
    )
    step["nonfinite"][:] = 0
    epoch = xr.Dataset(
        {"update_mean_abs": (("epoch", "layer"), rng.uniform(1e-4, 1e-1, (epochs, n_layers)).astype("float32")),
         "update_norm": (("epoch", "layer"), rng.uniform(0.1, 1, (epochs, n_layers)).astype("float32")),
         "train_loss": ("epoch", rng.uniform(0.2, 0.7, epochs)), "val_loss": ("epoch", rng.uniform(0.2, 0.7, epochs)),
         "num_steps": ("epoch", np.full(epochs, steps_per_epoch))},
        coords={"epoch": np.arange(epochs), **layer_coords},
    )
    return step, epoch


def make_sweep(names=("simple-d1-bn0-long_sum-short0", "simple-d1-bn0-long_sum-short1"), **kwargs) -> xr.DataTree:
    """A sweep-shaped DataTree: one group per variant with its ``epochs`` child."""
    nodes = {}
    for i, name in enumerate(names):
        step, epoch = make_run(seed=i, **kwargs)
        nodes[f"/{name}"] = step
        nodes[f"/{name}/epochs"] = epoch
    return xr.DataTree.from_dict(nodes)


@pytest.fixture
def sweep() -> xr.DataTree:
    return make_sweep()


@pytest.fixture
def run_factory():
    return make_run


@pytest.fixture
def sweep_factory():
    return make_sweep
