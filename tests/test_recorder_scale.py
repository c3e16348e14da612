"""Recorder options for large models: the multi-tensor (foreach) path, bounded scratch, snapshot=False.

Every figure is compared with first-principles references (tests/reference.py) computed from the
gradients and weights the test saves itself; training must stay bit-identical with recording on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fused_kernels_on
from reference import layer_reference
from test_recorder import NET_LAYERS, batches, check_steps, grads, make_net, weights
from torch import nn

import gradflow
from gradflow import buckets, quantities

# "auto": the CPU default (Numba's fused kernels for float32 where Numba is installed, else stack);
# "fused": Triton's fused kernels, interpreted on a CPU.
STRATEGIES = ["stack", "foreach", "auto", pytest.param("fused", marks=pytest.mark.skipif(
    not fused_kernels_on("cpu"), reason="needs Triton (interpreted on a CPU)"))]


def use(monkeypatch, strategy: str, dtype: torch.dtype) -> str:
    """Make the Recorder build ``strategy``'s buckets; returns the class name it must build."""
    from gradflow import fused_cpu, fused_triton

    monkeypatch.setattr(buckets, "STRATEGY", strategy)
    if strategy == "fused":
        monkeypatch.setattr(buckets, "fused_kind", lambda device: fused_triton.TritonFusedBucket)
    if strategy == "auto":
        numba = fused_cpu.numba is not None and fused_cpu.CpuFusedBucket.supports(dtype)
        return "CpuFusedBucket" if numba else "Bucket"
    return {"stack": "Bucket", "foreach": "ForeachBucket", "fused": "TritonFusedBucket"}[strategy]

GRADIENT_VARIABLES = ("grad_norm", "grad_max_abs", "nonfinite", "param_norm")
UPDATE_VARIABLES = ("update_norm", "update_mean_abs", "update_max_abs", "update_ratio")


def train(model, optimizer, data, rec=None, epoch_after=None):
    """Steps on MSE loss; returns (gradients, weights before, weights after) per step."""
    records = []
    torch.manual_seed(5)  # dropout masks come from the global generator
    for k, (x, y) in enumerate(data):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)),
                               y.to(next(model.parameters()).dtype)).backward()
        g, w0 = grads(model), weights(model)
        optimizer.step()
        records.append((g, w0, weights(model)))
        if rec is not None and k == epoch_after:
            rec.end_epoch(train_loss=0.0)
    return records


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strategies_and_a_tiny_scratch_record_exactly(tmp_path, monkeypatch, strategy, dtype):
    """Every bucket kind, with a scratch far smaller than the model (classes in runs, tensors in
    blocks): every step and epoch figure matches the reference, and training is unchanged."""
    expected = use(monkeypatch, strategy, dtype)
    monkeypatch.setattr(quantities, "SCRATCH_MIN_ELEMENTS", 16)
    monkeypatch.setattr(quantities, "SCRATCH_FRACTION", 0.01)
    model = make_net().to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr") as rec:
        kinds = {type(b).__name__ for b in rec._all_buckets()}
        assert kinds == {expected}
        start = weights(model)
        records = train(model, optimizer, batches(3), rec, epoch_after=2)
    check_steps(gradflow.open(tmp_path / "run.zarr"), records, NET_LAYERS)
    epochs = gradflow.open(tmp_path / "run.zarr", group="epochs")
    end = records[-1][2]
    for layer, names in NET_LAYERS.items():
        d = np.concatenate([(end[n] - start[n]).ravel() for n in names])
        got = epochs.sel(epoch=0, layer=layer)
        np.testing.assert_allclose(float(got.update_norm), np.sqrt(np.sum(d**2)), rtol=2e-6)
        np.testing.assert_allclose(float(got.update_mean_abs), np.abs(d).mean(), rtol=2e-6)

    plain = make_net().to(dtype)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.5, momentum=0.9)
    train(plain, plain_optimizer, batches(3))
    for name, p in plain.state_dict().items():
        assert torch.equal(p, model.state_dict()[name]), name


def test_snapshot_false_records_gradient_figures_and_nan_updates(tmp_path):
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr", snapshot=False) as rec:
        records = train(model, optimizer, batches(2), rec, epoch_after=1)
        assert all(b.keeps_snapshot is False and not any(c.epoch is not None for c in b.classes)
                   for b in rec._all_buckets())  # no Δw snapshot, no epoch copy
    ds = gradflow.open(tmp_path / "run.zarr")
    for k, (g, before, after) in enumerate(records):
        for layer, names in NET_LAYERS.items():
            expected = layer_reference(g, before, after, names)
            for var in GRADIENT_VARIABLES:
                np.testing.assert_allclose(float(ds[var].sel(layer=layer)[k]), expected[var],
                                           rtol=2e-6, err_msg=f"{var} {layer} {k}")
            for var in UPDATE_VARIABLES:
                assert np.isnan(float(ds[var].sel(layer=layer)[k])), var
    epochs = gradflow.open(tmp_path / "run.zarr", group="epochs")
    assert np.isnan(epochs.update_norm.values).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lr", [1e-3, 1.0])  # Δw of 1e17 (fine) or 1e20 (its squares overflow too)
def test_huge_float32_values_do_not_overflow_the_norms(tmp_path, monkeypatch, strategy, dtype, lr):
    """Entries above ~1.8e19 overflow float32 squares; the norms (2e20, 2e21 here) fit in float32 and
    must be recorded exactly, not as inf, with nonfinite 0 (an exploding gradient, where it matters).
    Only some tensors overflow: the CPU looks once per phase and recomputes only those."""
    use(monkeypatch, strategy, dtype)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 1, bias=False)).to(dtype)
    with torch.no_grad():
        model[1].weight.fill_(1e21)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e20)
        before = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
        g = {n: p.grad.double().numpy().copy() for n, p in model.named_parameters()}
        optimizer.step()
        after = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
    ds = gradflow.open(tmp_path / "run.zarr")
    for layer, name in (("0", "0.weight"), ("1", "1.weight")):
        expected = layer_reference(g, before, after, [name])
        for var in ("grad_norm", "grad_max_abs", "param_norm", "update_norm", "nonfinite"):
            got = float(ds[var].sel(layer=layer)[0])
            assert np.isfinite(got), (var, layer, got)
            np.testing.assert_allclose(got, expected[var], rtol=2e-6, err_msg=f"{var} {layer}")


def test_stacked_norms_of_long_rows_are_within_a_few_ulps(tmp_path, monkeypatch):
    """The stack kind accumulates in float32 on a CPU; a 2.46M-element weight's ‖g‖, ‖w‖ and ‖Δw‖
    must still match float64 references to a few float32 ulps (torch's vector_norm alone was off
    by up to 51)."""
    monkeypatch.setattr(buckets, "STRATEGY", "stack")
    torch.manual_seed(0)
    model = nn.Linear(2460, 1000, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
        model.weight.grad = torch.randn_like(model.weight) * 1e-3 + 1e-2  # one sign: error adds up
        g = model.weight.grad.double().numpy().copy()
        before = model.weight.detach().double().numpy().copy()
        optimizer.step()
        d = (model.weight.detach() - torch.from_numpy(before).float()).double().numpy()
        after = model.weight.detach().double().numpy()
    ds = gradflow.open(tmp_path / "run.zarr").isel(step=0, layer=0)
    for var, ref in (("grad_norm", np.sqrt(np.sum(g * g))), ("param_norm", np.sqrt(np.sum(after**2))),
                     ("update_norm", np.sqrt(np.sum(d * d)))):
        np.testing.assert_allclose(float(ds[var]), ref, rtol=4 * 2.0**-24, err_msg=var)
