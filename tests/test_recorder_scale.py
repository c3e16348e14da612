"""Recorder options for large models: the multi-tensor (foreach) path, bounded scratch, snapshot=False.

Every figure is compared with first-principles references (tests/reference.py) computed from the
gradients and weights the test saves itself; training must stay bit-identical with recording on.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import fused_kernels_on
from reference import layer_reference
from test_recorder import NET_LAYERS, batches, check_steps, grads, make_net, weights
from torch import nn

import gradflow
from gradflow import buckets, quantities
from gradflow.errors import GradflowError

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
                   and not getattr(b, "epoch", None) and getattr(b, "epoch_flat", None) is None
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


# A model whose tensors fill each kind's structures: "big" is a shape class of the stack kind (two
# 70×60 weights, 8,400 elements), "small" its ragged class (a square weight and a vector).
LAYERS = {"big": ["big.w", "big.v"], "small": ["small.s", "small.b"]}


def four_tensors() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.big, model.small = nn.Module(), nn.Module()
    model.big.w, model.big.v = (nn.Parameter(torch.randn(70, 60)) for _ in range(2))
    model.small.s, model.small.b = nn.Parameter(torch.randn(5, 5)), nn.Parameter(torch.randn(3))
    return model


def random_step(model: nn.Module, optimizer, gen: torch.Generator) -> tuple:
    """One step on random gradients; returns (gradients, weights before, weights after)."""
    optimizer.zero_grad()
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    g, before = grads(model), weights(model)
    optimizer.step()
    return g, before, weights(model)


def parameter(model: nn.Module, name: str) -> nn.Parameter:
    return model.get_parameter(name)


CHANGES = {  # p.data = ... of another size or dtype
    "one element": ("small.b", lambda w: w[:1]),  # the stack kind broadcast it into 3 elements
    "slice": ("big.w", lambda w: w[:35]),
    "bigger": ("small.s", lambda w: torch.randn(6, 6)),
    "float64 in a shape class": ("big.v", lambda w: w.double()),  # the stack kind rounded it
    "float64 in the ragged class": ("small.b", lambda w: w.double()),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("change", CHANGES)
def test_a_parameter_given_another_size_or_dtype_is_refused_and_earlier_rows_kept(
        tmp_path, monkeypatch, strategy, change):
    """Every kind refuses a ``p.data = ...`` of another size or dtype with the same one-line
    GradflowError naming the fix, before the step it would misread; the rows recorded before stay
    readable and exact."""
    use(monkeypatch, strategy, torch.float32)
    model, gen = four_tensors(), torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = gradflow.Recorder(model, optimizer, tmp_path / "run.zarr")
    records = [random_step(model, optimizer, gen) for _ in range(2)]
    name, new = CHANGES[change]
    parameter(model, name).data = new(parameter(model, name).data)
    with pytest.raises(GradflowError, match=r"^a recorded parameter or its gradient changed size, "
                       r"dtype or device .*create the Recorder after changing parameters$") as err:
        random_step(model, optimizer, gen)
    assert "\n" not in str(err.value)
    rec.close()
    check_steps(gradflow.open(tmp_path / "run.zarr"), records, LAYERS)


def relayout(model: nn.Module) -> None:
    """Same shapes, elements moved: a column-major copy (same values by index) and a square
    transpose (values move to other indices; paired by memory position nothing would change)."""
    w, s = parameter(model, "big.w"), parameter(model, "small.s")
    w.data = w.data.t().contiguous().t()
    s.data = s.data.t()


def reshape(model: nn.Module) -> None:
    """As many elements in another shape."""
    v, b = parameter(model, "big.v"), parameter(model, "small.b")
    v.data = v.data.reshape(60, 70)
    b.data = b.data.view(1, 3)


class Relaying(torch.optim.SGD):
    """SGD that changes its parameters' layout or shape (``how``) at the end of its step."""

    def __init__(self, params, model, how, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.model, self.how = model, how

    def step(self, closure=None):
        loss = super().step(closure)
        if self.how is not None:
            self.how(self.model)
        return loss


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_layouts_changed_during_steps_and_epochs_are_measured_by_index(tmp_path, monkeypatch, strategy):
    """A parameter relaid in memory (same shape) before a step, during one (by the optimizer) or
    within an epoch: Δw and W_end − W_start pair elements by index, as the reference does."""
    use(monkeypatch, strategy, torch.float32)
    model, gen = four_tensors(), torch.Generator().manual_seed(1)
    optimizer = Relaying(model.parameters(), model, None, lr=0.1)
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr") as rec:
        start = weights(model)
        records = [random_step(model, optimizer, gen)]
        relayout(model)  # between two steps
        records.append(random_step(model, optimizer, gen))
        optimizer.how = relayout  # during a step
        records.append(random_step(model, optimizer, gen))
        rec.end_epoch()
    check_steps(gradflow.open(tmp_path / "run.zarr"), records, LAYERS)
    epochs = gradflow.open(tmp_path / "run.zarr", group="epochs")
    end = weights(model)
    for layer, names in LAYERS.items():
        d = np.concatenate([(end[n] - start[n]).ravel() for n in names])
        got = epochs.sel(epoch=0, layer=layer)
        np.testing.assert_allclose(float(got.update_norm), np.sqrt(np.sum(d**2)), rtol=2e-6)
        np.testing.assert_allclose(float(got.update_mean_abs), np.abs(d).mean(), rtol=2e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_epochs_measure_from_their_own_start_with_a_group_joining_and_weights_relaid(
        tmp_path, monkeypatch, strategy):
    """Three epochs: each W_end − W_start is from the end of the epoch before; a param group added
    mid-epoch counts from the step it joined (its weights then); weights relaid within an epoch
    (a transpose in place, a column-major copy) pair by index."""
    use(monkeypatch, strategy, torch.float32)
    model, gen = four_tensors(), torch.Generator().manual_seed(1)
    model.late = nn.Module()
    model.late.u, model.late.c = nn.Parameter(torch.randn(40, 30)), nn.Parameter(torch.randn(7))
    layers = {**LAYERS, "late": ["late.u", "late.c"]}
    optimizer = torch.optim.SGD([*model.big.parameters(), *model.small.parameters()], lr=0.1)
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr") as rec:
        starts = [weights(model)]
        records = [random_step(model, optimizer, gen) for _ in range(2)]
        with torch.no_grad():
            model.late.u.mul_(2.0)  # before it joins: in no epoch's figures
        optimizer.add_param_group({"params": list(model.late.parameters()), "lr": 0.3})
        joined = weights(model)
        records.append(random_step(model, optimizer, gen))
        rec.end_epoch()
        starts.append(weights(model))
        records.append(random_step(model, optimizer, gen))
        relayout(model)
        records.append(random_step(model, optimizer, gen))
        rec.end_epoch()
        starts.append(weights(model))
        records += [random_step(model, optimizer, gen) for _ in range(2)]
        with torch.no_grad():
            parameter(model, "big.v").add_(1.0)  # outside a step: in the epoch's figures only
        rec.end_epoch()
        starts.append(weights(model))
    check_steps(gradflow.open(tmp_path / "run.zarr").sel(layer=list(LAYERS)), records, LAYERS)
    epochs = gradflow.open(tmp_path / "run.zarr", group="epochs")
    assert epochs.sizes["epoch"] == 3
    for epoch in range(3):
        start, end = starts[epoch], starts[epoch + 1]
        if epoch == 0:
            start = {**start, **{n: joined[n] for n in layers["late"]}}
        for layer, names in layers.items():
            d = np.concatenate([(end[n] - start[n]).ravel() for n in names])
            got = epochs.sel(epoch=epoch, layer=layer)
            np.testing.assert_allclose(float(got.update_norm), np.sqrt(np.sum(d**2)), rtol=2e-6,
                                       err_msg=f"epoch {epoch} {layer}")
            np.testing.assert_allclose(float(got.update_mean_abs), np.abs(d).mean(), rtol=2e-6,
                                       err_msg=f"epoch {epoch} {layer}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shapes_changed_between_steps_are_measured_and_within_a_step_or_epoch_refused(
        tmp_path, monkeypatch, strategy):
    """A parameter given another shape of as many elements between two steps: the steps after it are
    measured exactly (Δw within one step pairs by index); across an epoch, and during a step,
    W_end − W_start and Δw pair no elements: a one-line GradflowError, rows before kept."""
    use(monkeypatch, strategy, torch.float32)
    model, gen = four_tensors(), torch.Generator().manual_seed(1)
    optimizer = Relaying(model.parameters(), model, None, lr=0.1)
    rec = gradflow.Recorder(model, optimizer, tmp_path / "run.zarr")
    start = weights(model)
    records = [random_step(model, optimizer, gen)]
    rec.end_epoch()
    reshape(model)
    records += [random_step(model, optimizer, gen) for _ in range(2)]
    with pytest.raises(GradflowError, match=r"^a recorded parameter changed shape during the epoch "
                       r"\(\(70, 60\) to \(60, 70\)\).*create the Recorder after changing "
                       r"parameters$"):
        rec.end_epoch()
    optimizer.how = lambda model: setattr(parameter(model, "small.s"), "data",
                                          parameter(model, "small.s").data.reshape(25))
    with pytest.raises(GradflowError, match=r"^a recorded parameter changed shape during the "
                       r"optimizer step \(\(5, 5\) to \(25,\)\).*create the Recorder after "
                       r"changing parameters$"):
        random_step(model, optimizer, gen)
    rec.close()
    check_steps(gradflow.open(tmp_path / "run.zarr"), records, LAYERS)
    epochs = gradflow.open(tmp_path / "run.zarr", group="epochs")
    assert epochs.sizes["epoch"] == 1
    end = records[0][2]
    for layer, names in LAYERS.items():
        d = np.concatenate([(end[n] - start[n]).ravel() for n in names])
        np.testing.assert_allclose(float(epochs.update_norm.sel(epoch=0, layer=layer)),
                                   np.sqrt(np.sum(d**2)), rtol=2e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_zero_element_layer_has_nan_gradient_figures_without_a_gradient(tmp_path, monkeypatch,
                                                                            strategy):
    """A layer of no elements takes no part in the buckets; its gradient figures follow ``.grad``
    as every other layer's: NaN where it has none, 0 (an empty sum) where it has an empty one. Its
    mean |Δw| and ratio are 0/0: NaN, without numpy warnings."""
    use(monkeypatch, strategy, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "Initializing zero-element tensors is a no-op"
        model = nn.ModuleDict({"a": nn.Linear(3, 2), "empty": nn.Linear(0, 0)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
            records = [random_step(model, optimizer, gen)]  # empty gradients: present
            optimizer.zero_grad()
            model["a"].weight.grad = torch.ones(2, 3)
            g, before = grads(model), weights(model)
            optimizer.step()  # no gradient for "empty"
            records.append((g, before, weights(model)))
        ds = gradflow.open(tmp_path / "run.zarr")
    check_steps(ds.sel(layer=["a"]), records, {"a": ["a.weight", "a.bias"]})
    empty = ds.sel(layer="empty")
    for var, want in (("grad_norm", [0, np.nan]), ("grad_max_abs", [0, np.nan]),
                      ("nonfinite", [0, np.nan]), ("param_norm", [0, 0]), ("update_norm", [0, 0]),
                      ("update_max_abs", [0, 0]), ("update_mean_abs", [np.nan, np.nan]),
                      ("update_ratio", [np.nan, np.nan])):
        np.testing.assert_array_equal(empty[var].values, want, err_msg=var)


@pytest.mark.parametrize("strategy", ["stack", "foreach", "auto"])
def test_adams_equal_updates_of_a_large_layer_are_recorded_to_an_ulp(tmp_path, monkeypatch,
                                                                      strategy):
    """Adam's first steps move nearly every weight of a 2.1M-element layer by lr: equal entries, where
    float32 accumulation is worst (the stacked ops recorded update_norm 390 ulps off). Every norm
    matches a float64 reference from the saved tensors to 2 float32 ulps (the store's float32 takes
    half of one)."""
    use(monkeypatch, strategy, torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2048))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = [(torch.randn(2, 1024), torch.randn(2, 2048)) for _ in range(2)]
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
        records = train(model, optimizer, data)
    ds = gradflow.open(tmp_path / "run.zarr").sel(layer="0")
    eps = float(np.finfo(np.float32).eps)
    for k, (g, before, after) in enumerate(records):
        names = ["0.weight", "0.bias"]
        d = np.concatenate([(after[n] - before[n]).ravel() for n in names])
        want = {"grad_norm": np.sqrt(sum(np.sum(g[n] ** 2) for n in names)),
                "update_norm": np.sqrt(np.sum(d ** 2)),
                "param_norm": np.sqrt(sum(np.sum(after[n] ** 2) for n in names))}
        for name, value in want.items():
            got = float(ds[name].isel(step=k))
            assert abs(got - value) <= 2 * eps * value, (k, name, (got - value) / value / eps)
