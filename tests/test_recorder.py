"""Recorder: every recorded number against a reference computed here from raw tensors with numpy.

Each test runs an ordinary training loop, saves what the optimizer saw (the gradient at step time)
and the weights before and after every step with plain torch, recomputes each per-layer figure from
first principles in float64, and compares it with the store.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import xarray as xr
from reference import layer_reference
from torch import nn

import gradflow
from gradflow import GradflowError, schema

STEP_VARIABLES = schema.names(schema.STEP_VARIABLES)


class Net(nn.Module):
    """Conv → BatchNorm → ReLU → Dropout → Linear on (N, 2, 4, 4) inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(48, 2)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.norm(self.conv(x)))).flatten(1))


NET_LAYERS = {"conv": ["conv.weight", "conv.bias"], "norm": ["norm.weight", "norm.bias"],
              "head": ["head.weight", "head.bias"]}


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batches(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 2, 4, 4, generator=gen), torch.randn(4, 2, generator=gen))
            for _ in range(n)]


def weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().double().cpu().numpy().copy() for n, p in model.named_parameters()}


def grads(model: nn.Module) -> dict[str, np.ndarray | None]:
    return {n: None if p.grad is None else p.grad.double().cpu().numpy().copy()
            for n, p in model.named_parameters()}


def mse_steps(model: nn.Module, optimizer, data) -> list:
    """Plain steps on MSE loss; returns (gradients, weights before, weights after) per step."""
    records = []
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        g, w0 = grads(model), weights(model)
        optimizer.step()
        records.append((g, w0, weights(model)))
    return records


def check_steps(ds: xr.Dataset, records: list, layers: dict[str, list[str]], rtol=2e-6,
                unowned=()) -> None:
    """Compare every step variable of ``ds`` with references from ``records`` = [(grad, before, after)].

    ``unowned``: layers no optimizer owns (NaN gradient, parameter norm and ratio; zero update).
    """
    assert list(ds.layer.values) == list(layers)
    assert ds.sizes["step"] == len(records)
    for k, (grad, before, after) in enumerate(records):
        for layer, names in layers.items():
            expected = layer_reference(grad, before, after, names, owned=layer not in unowned)
            for var in STEP_VARIABLES:
                actual = float(ds[var].sel(layer=layer).values[k])
                np.testing.assert_allclose(actual, expected[var], rtol=rtol, atol=0,
                                           err_msg=f"{var} of {layer} at row {k}")


def check_layer_coords(ds: xr.Dataset, model: nn.Module, layers: dict[str, list[str]]) -> None:
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    assert list(ds.depth.values) == list(range(len(layers)))
    assert list(ds.module_type.values) == [type(modules[n]).__name__ for n in layers]
    assert list(ds.num_params.values) == [sum(params[p].numel() for p in names)
                                          for names in layers.values()]


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.Adam(ps, lr=0.01),
], ids=["sgd-momentum", "adam"])
def test_every_variable_matches_reference(tmp_path, make_optimizer):
    model = make_net()
    optimizer = make_optimizer(model.parameters())
    store = tmp_path / "run.zarr"
    records, times, epoch_starts, epoch_ends = [], [], [], []
    rec = gradflow.Recorder(model, optimizer, store, metadata={"note": "test"})
    data = batches(5)
    for epoch, chunk in enumerate((data[:3], data[3:])):
        epoch_starts.append(weights(model))
        for x, y in chunk:
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            g, w0 = grads(model), weights(model)
            t0 = time.time()
            optimizer.step()
            times.append((t0, time.time()))
            records.append((g, w0, weights(model)))
        epoch_ends.append(weights(model))
        rec.end_epoch(train_loss=1.5 - epoch, val_loss=2.5 - epoch,
                      **({"val_accuracy": 0.75} if epoch else {}))
    rec.close()

    ds = gradflow.open(store)
    check_steps(ds, records, NET_LAYERS)
    check_layer_coords(ds, model, NET_LAYERS)
    assert ds.step.values.tolist() == [0, 1, 2, 3, 4]
    assert ds.epoch.values.tolist() == [0, 0, 0, 1, 1]
    assert not ds.skipped.values.any()
    for (t0, t1), t in zip(times, ds.wall_time.values):
        assert t0 <= t <= t1 + 1e-3
    assert all(ds[v].dtype == np.float32 for v in STEP_VARIABLES)
    assert ds.attrs["gradflow_schema"] == schema.VERSION and ds.attrs["every"] == 1
    assert ds.attrs["metadata"] == {"note": "test"}
    assert ds.attrs["torch_version"] == torch.__version__
    assert ds.attrs["model_class"].endswith("Net")
    assert ds.attrs["optimizers"][0]["class"] == type(optimizer).__name__
    assert ds.attrs["optimizers"][0]["param_groups"][0]["lr"] == optimizer.param_groups[0]["lr"]

    ep = gradflow.open(store, group="epochs")
    assert ep.epoch.values.tolist() == [0, 1] and ep.num_steps.values.tolist() == [3, 2]
    np.testing.assert_array_equal(ep.train_loss.values, [1.5, 0.5])
    np.testing.assert_array_equal(ep.val_loss.values, [2.5, 1.5])
    np.testing.assert_array_equal(ep.val_accuracy.values, [np.nan, 0.75])
    check_layer_coords(ep, model, NET_LAYERS)
    for e, (start, end) in enumerate(zip(epoch_starts, epoch_ends)):
        for layer, names in NET_LAYERS.items():
            d = np.concatenate([(end[n] - start[n]).ravel() for n in names])
            got = ep.sel(epoch=e, layer=layer)
            np.testing.assert_allclose(float(got.update_mean_abs), np.mean(np.abs(d)), rtol=2e-6)
            np.testing.assert_allclose(float(got.update_norm), np.sqrt(np.sum(d**2)), rtol=2e-6)

    # Plain xarray reads the same store, without gradflow.
    plain = xr.open_zarr(store)
    np.testing.assert_array_equal(plain.grad_norm.values, ds.grad_norm.values)
    assert list(plain.layer.values) == list(NET_LAYERS)
    np.testing.assert_array_equal(xr.open_zarr(store, group="epochs").update_mean_abs.values,
                                  ep.update_mean_abs.values)


def test_recording_does_not_change_training(tmp_path):
    def train(record: bool) -> dict[str, torch.Tensor]:
        model = make_net()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        rec = gradflow.Recorder(model, optimizer, tmp_path / "run.zarr") if record else None
        torch.manual_seed(5)  # dropout masks come from the global generator
        for x, y in batches(4):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        if rec:
            rec.end_epoch(train_loss=0.0)
            rec.close()
        return {**model.state_dict(), "rng": torch.get_rng_state()}

    plain, recorded = train(False), train(True)
    assert plain.keys() == recorded.keys()
    for name in plain:
        assert torch.equal(plain[name], recorded[name]), name


def test_two_param_groups_and_per_parameter(tmp_path):
    model = make_net().to(memory_format=torch.channels_last)  # non-contiguous conv weight
    assert not model.conv.weight.is_contiguous()
    optimizer = torch.optim.SGD([
        {"params": [model.conv.weight, model.head.weight], "lr": 0.1, "momentum": 0.5},
        {"params": [model.conv.bias, model.norm.weight, model.norm.bias, model.head.bias],
         "lr": 0.02},
    ])
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr", per_parameter=True):
        records = mse_steps(model, optimizer, batches(3))
    ds = gradflow.open(tmp_path / "run.zarr")
    per_tensor = {n: [n] for n, _ in model.named_parameters()}
    check_steps(ds, records, per_tensor)
    assert list(ds.module_type.values) == ["Conv2d", "Conv2d", "BatchNorm2d", "BatchNorm2d",
                                           "Linear", "Linear"]
    assert list(ds.num_params.values) == [p.numel() for p in model.parameters()]
    assert [g["lr"] for g in ds.attrs["optimizers"][0]["param_groups"]] == [0.1, 0.02]
    assert ds.attrs["per_parameter"] is True


def test_two_optimizers_make_one_step(tmp_path):
    model = make_net()
    body = torch.optim.SGD([*model.conv.parameters(), *model.norm.parameters()], lr=0.1)
    head = torch.optim.Adam(model.head.parameters(), lr=0.01)
    records = []
    with gradflow.Recorder(model, [body, head], tmp_path / "run.zarr") as rec:
        for x, y in batches(3):
            body.zero_grad()
            head.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            g, w0 = grads(model), weights(model)
            body.step()
            head.step()
            records.append((g, w0, weights(model)))
        assert rec.step == 3
    ds = gradflow.open(tmp_path / "run.zarr")
    check_steps(ds, records, NET_LAYERS)
    assert [o["class"] for o in ds.attrs["optimizers"]] == ["SGD", "Adam"]


def test_gradient_accumulation_records_the_accumulated_gradient(tmp_path):
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data, records = batches(6), []
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
        for step in range(2):
            optimizer.zero_grad()
            for x, y in data[3 * step:3 * step + 3]:  # three backward passes per step
                (nn.functional.mse_loss(model(x), y) / 3).backward()
            g, w0 = grads(model), weights(model)
            optimizer.step()
            records.append((g, w0, weights(model)))
    ds = gradflow.open(tmp_path / "run.zarr")
    check_steps(ds, records, NET_LAYERS)
    assert not ds.skipped.values.any()


class Branchy(nn.Module):
    """A frozen input layer, a branch used only on some steps, and a parameter-free module."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(3, 3)  # owned by the optimizer but requires_grad=False
        self.fixed = nn.Linear(3, 3)  # requires_grad=False and not in the optimizer: NaN, no update
        self.main = nn.Linear(3, 2)
        self.side = nn.Linear(3, 2)
        self.act = nn.Tanh()

    def forward(self, x, use_side: bool):
        h = self.act(self.fixed(self.frozen(x)))
        return self.main(h) + (self.side(h) if use_side else 0)


def test_frozen_and_missing_gradients_are_nan_with_zero_update(tmp_path):
    torch.manual_seed(0)
    model = Branchy()
    model.frozen.requires_grad_(False)
    model.fixed.requires_grad_(False)
    params = [*model.frozen.parameters(), *model.main.parameters(), *model.side.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.05)
    gen, records = torch.Generator().manual_seed(2), []
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
        for use_side in (True, False, True):
            optimizer.zero_grad()
            model(torch.randn(5, 3, generator=gen), use_side).square().mean().backward()
            g, w0 = grads(model), weights(model)
            optimizer.step()
            records.append((g, w0, weights(model)))
    ds = gradflow.open(tmp_path / "run.zarr")
    layers = {"frozen": ["frozen.weight", "frozen.bias"], "fixed": ["fixed.weight", "fixed.bias"],
              "main": ["main.weight", "main.bias"], "side": ["side.weight", "side.bias"]}
    check_steps(ds, records, layers, unowned={"fixed"})
    assert np.isnan(ds.grad_norm.sel(layer="frozen").values).all()
    assert (ds.update_norm.sel(layer="frozen").values == 0).all()
    fixed = ds.sel(layer="fixed")  # no optimizer owns it: not measured, no update
    assert np.isnan(fixed.param_norm.values).all() and (fixed.update_norm.values == 0).all()
    side = ds.sel(layer="side", step=1)
    assert np.isnan(float(side.grad_norm)) and np.isnan(float(side.nonfinite))
    assert float(side.update_norm) == 0 and float(side.param_norm) > 0


def test_partly_frozen_layer_norms_cover_all_its_parameters(tmp_path):
    """BitFit: a layer whose weight is frozen (in no optimizer) and whose bias trains; its
    param_norm and update_ratio are over weight and bias, also after the weight joins."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.Adam([model[0].bias, *model[2].parameters()], lr=0.05)
    data = [(torch.randn(5, 3), torch.randn(5, 2)) for _ in range(4)]
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
        records = mse_steps(model, optimizer, data[:2])
        model[0].weight.requires_grad_(True)
        optimizer.add_param_group({"params": [model[0].weight], "lr": 0.01})
        records += mse_steps(model, optimizer, data[2:])
    ds = gradflow.open(tmp_path / "run.zarr")
    check_steps(ds, records, {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]})


def test_shared_parameters_are_counted_once(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight  # tied: belongs to the first module that owns it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
        records = mse_steps(model, optimizer, [(torch.randn(3, 4), torch.randn(3, 4)) for _ in range(2)])
    ds = gradflow.open(tmp_path / "run.zarr")
    layers = {"0": ["0.weight", "0.bias"], "2": ["2.bias"]}
    check_steps(ds, records, layers)
    assert ds.num_params.values.tolist() == [20, 4]


def test_parametrized_modules_are_one_layer_each(tmp_path):
    """A weight-normed Linear and a spectral-normed conv (the GAN critic's usual) are one layer each,
    named as the module (typed as torch's Parametrized class of it), holding the parametrization's originals and the bias; figures
    over the tensors the optimizer really steps (the originals, never the computed weight)."""
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Conv2d(1, 2, 3)), nn.Flatten(), nn.Tanh(),
                          weight_norm(nn.Linear(8, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(torch.randn(2, 1, 4, 4), torch.randn(2, 1)) for _ in range(2)]
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
        records = mse_steps(model, optimizer, data)
    layers = {"0": ["0.parametrizations.weight.original", "0.bias"],
              "3": ["3.parametrizations.weight.original0", "3.parametrizations.weight.original1",
                    "3.bias"]}
    ds = gradflow.open(tmp_path / "run.zarr")
    check_steps(ds, records, layers)
    assert ds.module_type.values.tolist() == ["ParametrizedConv2d", "ParametrizedLinear"]  # torch's classes
    assert ds.num_params.values.tolist() == [2 * 9 + 2, 1 + 8 + 1]  # g (1×1) and v (1×8) of the Linear


def test_a_learnable_parametrization_belongs_to_its_module(tmp_path):
    """A parametrization with parameters of its own (a learnt scale, minLoRA's A and B) is part of
    the parametrized module's layer, like the originals: no layer named 'fc.parametrizations.weight.1';
    several parametrizations (weight and bias, two chained on the weight) still make one layer."""
    from torch.nn.utils import parametrize

    class Symmetric(nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).T

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, w):
            return w * self.scale

    class Shift(nn.Module):
        def forward(self, b):
            return b + 1.0

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    parametrize.register_parametrization(model[0], "weight", Scale())
    parametrize.register_parametrization(model[0], "bias", Shift())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
        records = mse_steps(model, optimizer, [(torch.randn(3, 4), torch.randn(3, 4)) for _ in range(3)])
    layers = {"0": ["0.parametrizations.weight.original", "0.parametrizations.weight.1.scale",
                    "0.parametrizations.bias.original"], "2": ["2.weight", "2.bias"]}
    ds = gradflow.open(tmp_path / "run.zarr")
    check_steps(ds, records, layers, rtol=1e-5)
    assert ds.num_params.values.tolist() == [16 + 1 + 4, 20]


def test_bfloat16_parameters_are_recorded_exactly(tmp_path):
    model = make_net().to(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    records = []
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
        for x, y in batches(3):
            optimizer.zero_grad()
            model.train()
            nn.functional.mse_loss(model(x.bfloat16()), y.bfloat16()).backward()
            g, w0 = grads(model), weights(model)
            optimizer.step()
            records.append((g, w0, weights(model)))
        records_updates = [np.abs(r[2]["head.weight"] - r[1]["head.weight"]).max() for r in records]
    assert min(records_updates) > 0  # the steps really moved the bf16 weights
    check_steps(gradflow.open(tmp_path / "run.zarr"), records, NET_LAYERS)


def test_every_k_records_and_snapshots_only_every_kth_step(tmp_path, monkeypatch):
    from gradflow import fused, quantities

    snapshots = []
    for kind in (quantities.Bucket, quantities.ForeachBucket, fused.FusedBucket):  # whichever is built
        # (FusedBucket: the base of Triton's and Numba's kinds)
        monkeypatch.setattr(kind, "snapshot", lambda self, *a, original=kind.snapshot:
                            snapshots.append(self) or original(self, *a))
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    records = []
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr", every=3) as rec:
        for step, (x, y) in enumerate(batches(7)):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            g, w0 = grads(model), weights(model)
            optimizer.step()
            if step % 3 == 0:
                records.append((g, w0, weights(model)))
            if step == 4:
                rec.end_epoch(train_loss=1.0)
        ours = rec._all_buckets()  # (not a fused kind's self-test bucket)
    assert len([b for b in snapshots if any(b is o for o in ours)]) == 3
    ds = gradflow.open(tmp_path / "run.zarr")
    assert ds.step.values.tolist() == [0, 3, 6]
    assert ds.epoch.values.tolist() == [0, 0, 1]
    check_steps(ds, records, NET_LAYERS)
    assert gradflow.open(tmp_path / "run.zarr", group="epochs").num_steps.values.tolist() == [5]


def scaler_loop(model, optimizer, scaler, data, bad_steps, rec=None, end_epoch_after=None):
    """AMP-style loop; returns [(grad the optimizer used, before, after, skipped)] per iteration."""
    records, device = [], next(model.parameters()).device
    for step, (x, y) in enumerate(data):
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        if step in bad_steps:
            x = x.clone()
            x[0, 0, 0, 0] = float("inf")
        scale = scaler.get_scale()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            g = {n: v / scale for n, v in grads(model).items()}  # still scaled at step time
        else:
            scaler.unscale_(optimizer)
            g = grads(model)
        w0 = weights(model)
        scaler.step(optimizer)
        scaler.update()
        records.append((g, w0, weights(model), step in bad_steps))
        if rec is not None and step == end_epoch_after:
            rec.end_epoch(train_loss=0.0)
    return records


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("strategy", ["auto", "stack"])  # the CPU's default (Numba's kernels) and stack
def test_gradscaler_skipped_steps(tmp_path, fused, device, strategy, monkeypatch):
    from gradflow import buckets

    monkeypatch.setattr(buckets, "STRATEGY", strategy)
    model = make_net().to(device)
    model.eval()  # keep BatchNorm statistics finite on the inf batch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused)
    scaler = torch.amp.GradScaler(device, init_scale=256.0)
    # The skip signal: found_inf handed to the fused optimizer, or (plain) scaler.step not stepping.
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr", scaler=scaler) as rec:
        records = scaler_loop(model, optimizer, scaler, batches(5), {1, 3}, rec, end_epoch_after=3)
    ds = gradflow.open(tmp_path / "run.zarr")
    assert ds.skipped.values.tolist() == [r[3] for r in records] == [False, True, False, True, False]
    assert ds.epoch.values.tolist() == [0, 0, 0, 0, 1]
    for k, (g, w0, w1, skipped) in enumerate(records):
        if skipped:
            for name in w0:
                np.testing.assert_array_equal(w0[name], w1[name])  # GradScaler really skipped
        check_steps(ds.isel(step=slice(k, k + 1)), [(g, w0, w1)], NET_LAYERS)
    # the refused gradients' Inf/NaN, per layer (the inf input reaches every layer's gradient)
    assert (ds.nonfinite.values[[1, 3]] > 0).all() and (ds.nonfinite.values[[0, 2, 4]] == 0).all()
    assert "step" not in scaler.__dict__  # the Recorder's wrapper is gone after close()


def test_resume_appends_and_continues_counters(tmp_path):
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    store, data, records = tmp_path / "run.zarr", batches(5), []

    def run(chunk):
        with gradflow.Recorder(model, optimizer, store, metadata={"part": len(records)},
                               mode="a") as rec:
            records.extend(mse_steps(model, optimizer, chunk))
            rec.end_epoch(train_loss=float(len(records)))
            return rec.step, rec.epoch

    assert run(data[:3]) == (3, 1)
    assert run(data[3:]) == (5, 2)
    ds = gradflow.open(store)
    check_steps(ds, records, NET_LAYERS)
    assert ds.step.values.tolist() == [0, 1, 2, 3, 4]
    assert ds.epoch.values.tolist() == [0, 0, 0, 1, 1]
    assert ds.attrs["metadata"] == {"part": 3}
    ep = gradflow.open(store, group="epochs")
    assert ep.train_loss.values.tolist() == [3.0, 5.0] and ep.num_steps.values.tolist() == [3, 2]

    with pytest.raises(GradflowError, match="different model"):
        other = nn.Linear(2, 2)
        gradflow.Recorder(other, torch.optim.SGD(other.parameters(), lr=0.1), store, mode="a")
    # Same layer names and types, other shapes: still a different model, and nothing is appended.
    wider = make_net()
    wider.head = nn.Linear(48, 3)
    with pytest.raises(GradflowError, match="different model.*parameters"):
        gradflow.Recorder(wider, torch.optim.SGD(wider.parameters(), lr=0.1), store, mode="a")
    assert gradflow.open(store).step.values.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(GradflowError, match="every=1"):
        gradflow.Recorder(model, optimizer, store, every=2, mode="a")


def test_memory_store_and_sweep_groups():
    stores = {}
    for variant, seed in (("a", 0), ("b", 1)):
        model = make_net(seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradflow.Recorder(model, optimizer, "memory://gradflow-test/sweep.zarr",
                               group=variant) as rec:
            records = mse_steps(model, optimizer, batches(2, seed=seed))
            rec.end_epoch(val_loss=float(seed))
        stores[variant] = records
    url = "memory://gradflow-test/sweep.zarr"
    for variant, records in stores.items():
        check_steps(gradflow.open(url, group=variant), records, NET_LAYERS)
        check_steps(xr.open_zarr(url, group=variant), records, NET_LAYERS)
        assert gradflow.open(url, group=f"{variant}/epochs").val_loss.values.tolist() == \
            [float(variant == "b")]
    tree = gradflow.open(url)
    assert isinstance(tree, xr.DataTree) and set(tree.children) == {"a", "b"}
    np.testing.assert_array_equal(tree["a"].to_dataset().grad_norm.values,
                                  gradflow.open(url, group="a").grad_norm.values)
    assert tree["b/epochs"].to_dataset().sizes["epoch"] == 1
    with pytest.raises(GradflowError, match="sweep store"):
        model = make_net()
        gradflow.Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), url)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch._dynamo's import-time warnings
def test_wrappers_are_looked_through(tmp_path):
    model = make_net()
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.1)
    with gradflow.Recorder(nn.DataParallel(compiled), optimizer, tmp_path / "run.zarr") as rec:
        assert rec.layers == list(NET_LAYERS)
    assert list(gradflow.open(tmp_path / "run.zarr").layer.values) == list(NET_LAYERS)


def test_names_zarr_or_the_tree_would_misread_are_refused(tmp_path):
    """Zarr takes a backslash for '/' ('val\\loss' was nested out of sight, '\\' named the epochs
    group itself and every write failed); '<name>.partial' is what an interrupted atomic write leaves
    (check called the run damaged forever and --repair crashed deleting it); 'step' and
    'param_group' are the run's dimensions, which open_tree's epochs node inherits in place of the
    logged scalar (it vanished from the tree and the reports)."""
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    store = tmp_path / "run.zarr"
    for group in ("a\\b", "\\", "v.partial"):
        with pytest.raises(GradflowError, match="group must be one name"):
            gradflow.Recorder(model, optimizer, store, group=group)
    assert not store.exists()
    with gradflow.Recorder(model, optimizer, store) as rec:
        for name in ("val\\loss", "\\", "acc.partial"):
            with pytest.raises(GradflowError, match="choose another"):
                rec.end_epoch(**{name: 1.0})
        for name in ("step", "param_group"):
            with pytest.raises(GradflowError, match="reserved"):
                rec.end_epoch(**{name: 1.0})
        optimizer.zero_grad()
        model(torch.randn(4, 2, 4, 4)).square().mean().backward()
        optimizer.step()
        rec.end_epoch(val_loss=0.5)
    tree = gradflow.open_tree(store)
    assert tree.ds.sizes["step"] == 1 and tree["epochs"]["val_loss"].values.tolist() == [0.5]
    assert {path.name for path in store.iterdir() if path.is_dir()} == (
        set(tree.ds.variables) | {"epochs", "summary"})  # nothing nested elsewhere


def test_bad_inputs(tmp_path):
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    store = tmp_path / "run.zarr"

    def fails(match, *args, **kwargs):
        with pytest.raises(GradflowError, match=match):
            gradflow.Recorder(*args, **kwargs)

    frozen = nn.Linear(2, 2).requires_grad_(False)
    fails("no trainable parameters", frozen, torch.optim.SGD(frozen.parameters(), lr=0.1), store)
    other = nn.Linear(2, 2)
    fails("optimizer 0 .* owns none", model, torch.optim.SGD(other.parameters(), lr=0.1), store)
    fails("optimizer 1 .* owns none", model,
          [optimizer, torch.optim.SGD(other.parameters(), lr=0.1)], store)
    fails("every must be a positive integer", model, optimizer, store, every=0)
    fails(r"optimizer \(str\) is not a torch.optim.Optimizer", model, "sgd", store)
    fails("model must be", "model", optimizer, store)
    fails("metadata must be", model, optimizer, store, metadata={"f": object()})
    fails("group must be", model, optimizer, store, group="x/epochs")
    for group in ("exp/seed0", "..", "zarr.json"):  # nested runs: open() and the commands miss them
        fails("group must be one name", model, optimizer, store, group=group)
    fails("mode must be 'w-'", model, optimizer, store, mode="r+")
    fails("scaler must be", model, optimizer, store, scaler="amp")
    fails("per_parameter must be True or False", model, optimizer, store, per_parameter="yes")
    fails("snapshot must be True or False", model, optimizer, store, snapshot="no")
    (tmp_path / "file").write_text("x")
    fails("cannot create the store", model, optimizer, tmp_path / "file" / "run.zarr")  # through a file
    fails("cannot open the store .* for writing", model, optimizer, tmp_path / "file" / "run.zarr",
          mode="a")  # resuming: nothing to create
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    fails("not a Zarr store", model, optimizer, tmp_path / "notes")
    fails("not a Zarr store", model, optimizer, tmp_path / "file")
    assert not store.exists()  # nothing was created by the failed attempts
    assert not (tmp_path / ".notes.gradflow").exists() and not (tmp_path / ".file.gradflow").exists()

    with gradflow.Recorder(model, optimizer, store) as rec:
        with pytest.raises(GradflowError, match="reserved"):
            rec.end_epoch(update_mean_abs=1.0)
        with pytest.raises(GradflowError, match="not a number"):
            rec.end_epoch(train_loss="low")
        for name in ("val/loss", "", "..", "zarr.json", "x" * 256):  # no Zarr array: every write failed
            with pytest.raises(GradflowError, match="choose another"):
                rec.end_epoch(**{name: 1.0})
    with pytest.raises(GradflowError, match="closed"):
        rec.end_epoch(train_loss=1.0)


def test_end_epoch_takes_one_real_number_and_refuses_anything_else(tmp_path):
    """The one rule of end_epoch's docstring: one real number in any container of exactly one
    element is stored as that float, None as NaN; a string, a bool, a complex number and a container
    of zero or several elements are refused in one line, and nothing of a refused epoch is stored.
    (Before: "1.0" was stored as 1.0, True as 1.0, np.array([2.0]) was refused beside tensor([2.0]).)"""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accepted = {"py_int": (3, 3.0), "py_float": (2.5, 2.5), "np_float32": (np.float32(0.25), 0.25),
                "np_int": (np.int64(-7), -7.0), "tensor_0d": (torch.tensor(1.5), 1.5),
                "tensor_1": (torch.tensor([4.0]), 4.0), "tensor_int": (torch.tensor([[5]]), 5.0),
                "array_1": (np.array([6.0]), 6.0), "array_11": (np.array([[0.5]]), 0.5),
                "none": (None, np.nan), "inf": (float("-inf"), -np.inf)}
    refused = {"str": "1.0", "bool": True, "np_bool": np.True_, "bool_tensor": torch.tensor(True),
               "complex": 1 + 0j, "np_complex": np.complex128(2), "complex_tensor": torch.tensor([1j]),
               "empty": np.array([]), "two": np.array([1.0, 2.0]), "two_tensor": torch.zeros(2),
               "huge": 10 ** 400, "str_array": np.array(["1"]), "list": [1.0]}
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr") as rec:
        optimizer.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        for name, value in refused.items():
            with pytest.raises(GradflowError, match="not a number") as raised:
                rec.end_epoch(ok=1.0, **{name: value})
            assert "\n" not in str(raised.value) and name in str(raised.value)
        rec.end_epoch(**{name: value for name, (value, _) in accepted.items()})
    epochs = gradflow.open(tmp_path / "run.zarr", group="epochs")
    assert epochs.sizes["epoch"] == 1 and "ok" not in epochs and not set(refused) & set(epochs.data_vars)
    for name, (_, expected) in accepted.items():
        assert epochs[name].dtype == np.float64
        np.testing.assert_array_equal(epochs[name].values, [expected], err_msg=name)


def test_epoch_names_one_case_apart_are_refused_as_one_array(tmp_path):
    """On a case-insensitive file system (macOS, Windows) 'Val_Loss' and 'val_loss' are one Zarr
    array, and 'Epoch' is the epoch coordinate's: two series written into one. end_epoch refuses the
    second name in one line, within a call, across epochs and after a resume; nothing is lost."""
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    store = tmp_path / "run.zarr"
    with gradflow.Recorder(model, optimizer, store) as rec:
        with pytest.raises(GradflowError, match="'Val_Loss' and 'val_loss' differ only in case"):
            rec.end_epoch(val_loss=1.0, Val_Loss=2.0)
        for name in ("Epoch", "NUM_STEPS", "Update_Norm", "Layer"):
            with pytest.raises(GradflowError, match=f"'{name}' and '{name.lower()}' differ only in case"):
                rec.end_epoch(**{name: 1.0})
        rec.end_epoch(val_loss=0.5)
        with pytest.raises(GradflowError, match="'VAL_LOSS' and 'val_loss'"):
            rec.end_epoch(VAL_LOSS=0.4)
    with gradflow.Recorder(model, optimizer, store, mode="a") as rec:
        with pytest.raises(GradflowError, match="'Val_loss' and 'val_loss'"):
            rec.end_epoch(Val_loss=0.3)
        rec.end_epoch(val_loss=0.25)
    ep = gradflow.open(store, group="epochs")
    assert [str(name) for name in ep.data_vars if name not in ("update_mean_abs", "update_norm", "num_steps")] == ["val_loss"]
    np.testing.assert_array_equal(ep["val_loss"].values, [0.5, 0.25])
