"""The Recorder in the loops people really run (issue 8, cases 1-7 and 9-12).

Every test saves, with plain torch, the gradient the optimizer consumed and the weights before and
after each ``step()``, and compares row count, ``skipped`` and every step figure with
:func:`reference.layer_reference`. A row is one optimizer step; nothing else makes or skips rows.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import zarr
from reference import layer_reference
from torch import nn

import gradflow
from gradflow import GradflowError

VARIABLES = ("grad_norm", "grad_max_abs", "update_norm", "update_mean_abs", "update_max_abs",
             "param_norm", "update_ratio", "nonfinite")


def mlp(seed: int = 0, sizes=(4, 6, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def layers_of(model: nn.Module, prefix: str = "") -> dict[str, list[str]]:
    """{layer name: its parameter names}: modules that own parameters, in registration order."""
    out = {}
    for name, module in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if own:
            out[prefix + name] = [prefix + n for n in own]
    return out


def weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}


def grads(model: nn.Module) -> dict[str, np.ndarray | None]:
    return {n: None if p.grad is None else p.grad.double().numpy().copy()
            for n, p in model.named_parameters()}


def data(n: int, seed: int = 1, d_in: int = 4, d_out: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, d_in, generator=gen), torch.randn(5, d_out, generator=gen))
            for _ in range(n)]


def check(ds, records, layers, skipped=None, unowned=lambda k, layer: False, rtol=2e-6):
    """Rows of ``ds`` against ``records`` = [(grad consumed, w before, w after)], one per step."""
    assert ds.sizes["step"] == len(records)
    assert ds.step.values.tolist() == list(range(len(records)))
    assert ds.skipped.values.tolist() == (skipped or [False] * len(records))
    assert list(ds.layer.values) == list(layers)
    for k, (g, w0, w1) in enumerate(records):
        for layer, names in layers.items():
            expected = layer_reference(g, w0, w1, names, owned=not unowned(k, layer))
            for var in VARIABLES:
                np.testing.assert_allclose(float(ds[var].sel(layer=layer).values[k]), expected[var],
                                           rtol=rtol, atol=0, err_msg=f"{var} {layer} row {k}")


def mse(model, x, y):
    return nn.functional.mse_loss(model(x), y)


# -- case 1: closures ---------------------------------------------------------------------------

def closure_loop(model, optimizer, batches, records=None):
    for x, y in batches:
        seen = []

        def closure():
            optimizer.zero_grad()
            loss = mse(model, x, y)
            loss.backward()
            seen.append(grads(model))
            return loss

        w0 = weights(model)
        optimizer.step(closure)
        if records is not None:
            records.append((seen[0], w0, weights(model)))


def test_closure_steps_record_the_gradient_the_closure_computed(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    records = []
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr") as rec:
        closure_loop(model, optimizer, data(5), records)
        rec.end_epoch(train_loss=1.0)
        assert rec.step == 5
    check(gradflow.open(tmp_path / "run.zarr"), records, layers_of(model))


def test_closure_given_as_keyword(tmp_path):
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    records = []
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
        for x, y in data(3):
            optimizer.zero_grad()
            mse(model, x, y).backward()
            g, w0 = grads(model), weights(model)
            optimizer.step(closure=lambda: None)  # a closure that computes nothing: .grad as is
            records.append((g, w0, weights(model)))
    check(gradflow.open(tmp_path / "run.zarr"), records, layers_of(model))


def test_recording_closure_steps_does_not_change_training(tmp_path):
    def train(record: bool):
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        rec = gradflow.Recorder(model, optimizer, tmp_path / "run.zarr", mode="w") if record else None
        closure_loop(model, optimizer, data(4))
        lbfgs = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
        if rec:
            rec.close()
            rec = gradflow.Recorder(model, lbfgs, tmp_path / "lbfgs.zarr", mode="w")
        closure_loop(model, lbfgs, data(2, seed=3))
        if rec:
            rec.close()
        return model.state_dict()

    plain, recorded = train(False), train(True)
    for name in plain:
        assert torch.equal(plain[name], recorded[name]), name


# -- case 2: LBFGS ------------------------------------------------------------------------------

def test_lbfgs_one_row_per_step_with_the_first_evaluations_gradient(tmp_path):
    model = mlp()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    records, evaluations = [], []
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
        for x, y in data(3):
            seen = []

            def closure():
                optimizer.zero_grad()
                loss = mse(model, x, y)
                loss.backward()
                seen.append(grads(model))
                return loss

            w0 = weights(model)
            optimizer.step(closure)
            evaluations.append(len(seen))
            records.append((seen[0], w0, weights(model)))  # the gradient at w_before
    assert min(evaluations) > 1  # LBFGS really evaluated its closure several times per step
    check(gradflow.open(tmp_path / "run.zarr"), records, layers_of(model))


# -- case 3: a probe backward pass before the real one -------------------------------------------

def test_probe_backward_pass_adds_no_row(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    records = []
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
        for x, y in data(3):
            optimizer.zero_grad()
            model(x).square().sum().backward()  # probe (e.g. a gradient-norm diagnostic)
            optimizer.zero_grad()
            mse(model, x, y).backward()
            g, w0 = grads(model), weights(model)
            optimizer.step()
            records.append((g, w0, weights(model)))
    check(gradflow.open(tmp_path / "run.zarr"), records, layers_of(model))


# -- case 4: GAN, generator first ----------------------------------------------------------------

class GAN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gen = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))
        self.disc = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def test_gan_generator_first_one_row_per_iteration(tmp_path):
    gan = GAN()
    opt_g = torch.optim.Adam(gan.gen.parameters(), lr=0.01)
    opt_d = torch.optim.SGD(gan.disc.parameters(), lr=0.05)
    bce = nn.functional.binary_cross_entropy_with_logits
    gen = torch.Generator().manual_seed(3)
    records = []
    with gradflow.Recorder(gan, [opt_g, opt_d], tmp_path / "run.zarr"):
        for _ in range(4):
            z, real = torch.randn(6, 2, generator=gen), torch.randn(6, 3, generator=gen)
            w0 = weights(gan)
            opt_g.zero_grad()
            fake = gan.gen(z)
            bce(gan.disc(fake), torch.ones(6, 1)).backward()  # also fills D's .grad: discarded
            g_gen = grads(gan)
            opt_g.step()
            opt_d.zero_grad()
            loss_d = bce(gan.disc(real), torch.ones(6, 1)) + bce(gan.disc(fake.detach()),
                                                                torch.zeros(6, 1))
            loss_d.backward()
            g_disc = grads(gan)
            opt_d.step()
            used = {n: (g_gen if n.startswith("gen.") else g_disc)[n] for n in g_gen}
            records.append((used, w0, weights(gan)))
    check(gradflow.open(tmp_path / "run.zarr"), records, layers_of(gan))


# -- case 5: SAM ---------------------------------------------------------------------------------

class SAM(torch.optim.Optimizer):
    """davda54/sam (MIT), the reference SAM: first_step climbs, second_step calls base.step()."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for group in self.param_groups
                                       for p in group["params"] if p.grad is not None]), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()


@pytest.mark.parametrize("style", ["first_second_step", "closure"])
def test_sam_recorded_through_its_base_optimizer(tmp_path, style):
    model = mlp()
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    records = []
    with gradflow.Recorder(model, sam.base_optimizer, tmp_path / "run.zarr"):
        for x, y in data(3):
            w0 = weights(model)
            mse(model, x, y).backward()
            if style == "closure":
                seen = []

                def closure():
                    loss = mse(model, x, y)
                    loss.backward()
                    seen.append(grads(model))
                    return loss

                sam.step(closure)
                sam.zero_grad()
                g = seen[0]
            else:
                sam.first_step(zero_grad=True)
                mse(model, x, y).backward()  # the gradient at w + e(w): what base.step() uses
                g = grads(model)
                sam.second_step(zero_grad=True)
            records.append((g, w0, weights(model)))
    check(gradflow.open(tmp_path / "run.zarr"), records, layers_of(model))
    with pytest.raises(GradflowError, match="pass optimizer.base_optimizer"):
        gradflow.Recorder(model, sam, tmp_path / "sam.zarr")
    assert not (tmp_path / "sam.zarr").exists()


# -- case 6: add_param_group after the Recorder exists (gradual unfreezing) ----------------------

def test_param_group_added_later_is_recorded_from_the_step_it_joins(tmp_path):
    model = mlp(sizes=(4, 6, 5, 3))  # layers 0, 2, 4
    model[0].requires_grad_(False)  # frozen, in no optimizer until unfrozen
    optimizer = torch.optim.SGD([*model[2].parameters(), *model[4].parameters()], lr=0.1,
                                momentum=0.9)
    records, starts = [], {}
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr") as rec:
        for k, (x, y) in enumerate(data(4)):
            if k == 2:
                model[0].requires_grad_(True)
                optimizer.add_param_group({"params": model[0].parameters(), "lr": 0.02})
                starts = weights(model)
            optimizer.zero_grad()
            mse(model, x, y).backward()
            g, w0 = grads(model), weights(model)
            optimizer.step()
            records.append((g, w0, weights(model)))
        end = weights(model)
        rec.end_epoch(train_loss=0.0)
    ds = gradflow.open(tmp_path / "run.zarr")
    check(ds, records, layers_of(model), unowned=lambda k, layer: layer == "0" and k < 2)
    assert np.isnan(ds.grad_norm.sel(layer="0").values[:2]).all()
    assert (ds.update_norm.sel(layer="0").values[:2] == 0).all()
    assert (ds.update_norm.sel(layer="0").values[2:] > 0).all()
    ep = gradflow.open(tmp_path / "run.zarr", group="epochs")  # displacement since it joined
    d = np.concatenate([(end[n] - starts[n]).ravel() for n in ("0.weight", "0.bias")])
    np.testing.assert_allclose(float(ep.update_mean_abs.sel(layer="0")[0]), np.abs(d).mean(),
                               rtol=2e-6)


# -- case 7: a NaN step the loop skips ----------------------------------------------------------

def test_skipped_nan_step_shows_which_layer_held_it(tmp_path):
    model = mlp(sizes=(4, 6, 5, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    records, skipped = [], []
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr") as rec:
        for k, (x, y) in enumerate(data(4)):
            optimizer.zero_grad()
            mse(model, x, y).backward()
            if k == 1:
                model[2].weight.grad[0, :2] = torch.tensor([float("nan"), float("inf")])
            g, w0 = grads(model), weights(model)
            if not all(torch.isfinite(p.grad).all() for p in model.parameters()):
                rec.skip_step()  # the guard's one extra line
                records.append((g, w0, weights(model)))
                skipped.append(True)
                continue
            optimizer.step()
            records.append((g, w0, weights(model)))
            skipped.append(False)
    ds = gradflow.open(tmp_path / "run.zarr")
    check(ds, records, layers_of(model), skipped=skipped)
    assert skipped == [False, True, False, False]
    assert ds.nonfinite.isel(step=1).values.tolist() == [0.0, 2.0, 0.0]  # layer "2" held them
    assert (ds.update_norm.isel(step=1).values == 0).all()


def test_skip_step_of_one_optimizer_in_a_row(tmp_path):
    gan = GAN()
    opt_g = torch.optim.SGD(gan.gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(gan.disc.parameters(), lr=0.1)
    with gradflow.Recorder(gan, [opt_g, opt_d], tmp_path / "run.zarr") as rec:
        for k in range(2):
            for opt in (opt_g, opt_d):
                opt.zero_grad()
            gan.disc(gan.gen(torch.randn(3, 2))).sum().backward()
            opt_g.step()
            if k == 0:
                rec.skip_step(opt_d)
            else:
                opt_d.step()
        with pytest.raises(GradflowError, match="not an optimizer passed"):
            rec.skip_step(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))
    ds = gradflow.open(tmp_path / "run.zarr")
    assert ds.skipped.values.tolist() == [True, False]
    disc = [layer for layer in ds.layer.values if layer.startswith("disc")]
    assert (ds.update_norm.sel(layer=disc).values[0] == 0).all()
    assert np.isfinite(ds.grad_norm.sel(layer=disc).values[0]).all()


# -- case 9: modes ------------------------------------------------------------------------------

def record(store, steps=2, seed=0, **kwargs):
    model = mlp(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradflow.Recorder(model, optimizer, store, **kwargs) as rec:
        for x, y in data(steps, seed=seed):
            optimizer.zero_grad()
            mse(model, x, y).backward()
            optimizer.step()
        rec.end_epoch(train_loss=float(seed))


def test_modes_w_minus_w_and_a(tmp_path):
    store = tmp_path / "run.zarr"
    record(store, steps=2)
    before = gradflow.open(store).grad_norm.values.copy()
    with pytest.raises(GradflowError, match=r'already holds a gradflow run; pass mode="a" to resume '
                                            r'it or mode="w" to overwrite it'):
        record(store, steps=3)
    np.testing.assert_array_equal(gradflow.open(store).grad_norm.values, before)  # untouched
    record(store, steps=1, seed=1, mode="a")  # resume: appended
    assert gradflow.open(store).step.values.tolist() == [0, 1, 2]
    record(store, steps=3, seed=2, mode="w")  # overwrite: a fresh run
    ds = gradflow.open(store)
    assert ds.step.values.tolist() == [0, 1, 2]
    assert gradflow.open(store, group="epochs").train_loss.values.tolist() == [2.0]
    record(tmp_path / "new.zarr", mode="a")  # "a" creates a missing store
    assert gradflow.open(tmp_path / "new.zarr").sizes["step"] == 2


def test_mode_w_overwrites_only_a_gradflow_run(tmp_path):
    sweep = tmp_path / "sweep.zarr"
    record(sweep, group="a")
    record(sweep, group="b", seed=1)
    record(sweep, group="a", steps=4, mode="w")  # replaces group a only
    assert gradflow.open(sweep, group="a").sizes["step"] == 4
    assert gradflow.open(sweep, group="b").sizes["step"] == 2
    foreign = zarr.open_group(tmp_path / "foreign.zarr", mode="w")
    foreign.create_array("precious", shape=(2,), dtype="float32")[:] = [1, 2]
    with pytest.raises(GradflowError, match="not a gradflow store"):
        record(tmp_path / "foreign.zarr", mode="w")
    zarr.open_group(sweep, use_consolidated=False).create_group("notes", attributes={"mine": 1})
    with pytest.raises(GradflowError, match="not a gradflow store"):
        record(sweep, group="notes", mode="w")
    assert zarr.open_group(tmp_path / "foreign.zarr")["precious"][:].tolist() == [1, 2]
    assert zarr.open_group(sweep, use_consolidated=False)["notes"].attrs["mine"] == 1
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(GradflowError, match="not a Zarr store"):
        record(tmp_path / "notes.txt", mode="w")
    assert (tmp_path / "notes.txt").read_text() == "keep"


# -- case 10: optimizer wrappers -----------------------------------------------------------------

def test_accelerate_and_lightning_wrappers_are_unwrapped(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapped = accelerate.Accelerator(cpu=True).prepare(optimizer)
    assert type(wrapped).__name__ == "AcceleratedOptimizer"
    records = []
    with gradflow.Recorder(model, wrapped, tmp_path / "acc.zarr"):
        for x, y in data(2):
            wrapped.zero_grad()
            mse(model, x, y).backward()
            g, w0 = grads(model), weights(model)
            wrapped.step()
            records.append((g, w0, weights(model)))
    check(gradflow.open(tmp_path / "acc.zarr"), records, layers_of(model))
    with gradflow.Recorder(model, LightningOptimizer(optimizer), tmp_path / "pl.zarr") as rec:
        assert rec.layers == list(layers_of(model))


def test_anything_else_is_a_one_line_error_and_no_store(tmp_path):
    class NotInitialised(torch.optim.Optimizer):
        def __init__(self, params):  # forgets super().__init__: no hooks
            self.param_groups = [{"params": list(params)}]

    model = mlp()
    for bad in (object(), NotInitialised(model.parameters())):
        with pytest.raises(GradflowError, match="is not a torch.optim.Optimizer") as err:
            gradflow.Recorder(model, bad, tmp_path / "run.zarr")
        assert "\n" not in str(err.value)
    assert not (tmp_path / "run.zarr").exists()


# -- case 11: torch.compile around the step ------------------------------------------------------

def compiled_training(store=None):
    """4 Adam steps whose ``optimizer.step()`` runs inside ``torch.compile``; returns what happened."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)

    @torch.compile(backend="eager")
    def step():
        optimizer.step()

    records = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = gradflow.Recorder(model, optimizer, store) if store else None
        for x, y in data(4):
            optimizer.zero_grad()
            mse(model, x, y).backward()
            g, w0 = grads(model), weights(model)
            step()
            records.append((g, w0, weights(model)))
        if rec:
            rec.close()
    breaks = {reason.split("\n")[0] for reason in counters["graph_break"]}
    messages = [str(w.message) for w in caught if "script_method" not in str(w.message)]
    return model, records, breaks, counters["stats"]["unique_graphs"], messages


def test_compiled_step_keeps_hooks_out_of_the_graph_silently(tmp_path):
    _, _, plain_breaks, plain_graphs, _ = compiled_training()
    model, records, breaks, graphs, messages = compiled_training(tmp_path / "run.zarr")
    assert messages == []  # e.g. no "Dynamo does not know how to trace the builtin time.time"
    # Dynamo calls the hooks eagerly (one skipped call) and traces nothing of them: no new graph
    # breaks (e.g. on .item()) and no recompiles beyond the plain compiled step.
    assert breaks - plain_breaks <= {"Skip calling `torch.compiler.disable()`d function"}
    assert graphs == plain_graphs
    check(gradflow.open(tmp_path / "run.zarr"), records, layers_of(model))


# -- case 12: no dependency warnings -------------------------------------------------------------

def test_no_warnings_leak_even_under_w_error(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record(tmp_path / "run.zarr")
        record(tmp_path / "run.zarr", mode="a")
        record(tmp_path / "run.zarr", mode="w")
        record(tmp_path / "sweep.zarr", group="a")
        assert gradflow.open(tmp_path / "run.zarr").sizes["step"] == 2


# -- optimizer subclasses: torch runs the hooks of step() and of super().step() -----------------

class ProjectedSGD(torch.optim.SGD):
    """SGD, then every weight clipped to [-0.2, 0.2]: the step is both, and it nests super().step()."""

    def step(self, closure=None):
        loss = super().step(closure)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.clamp_(-0.2, 0.2)
        return loss


def test_subclass_calling_super_step_is_one_step_with_its_whole_update(tmp_path):
    model = mlp()
    optimizer = ProjectedSGD(model.parameters(), lr=0.5)
    records = []
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
        closure_loop(model, optimizer, data(3), records)
        for x, y in data(2, seed=4):
            optimizer.zero_grad()
            mse(model, x, y).backward()
            g, w0 = grads(model), weights(model)
            optimizer.step()
            records.append((g, w0, weights(model)))
    assert any((np.abs(w1[n]) == np.float32(0.2)).any() for _, _, w1 in records for n in w1)  # clipped
    check(gradflow.open(tmp_path / "run.zarr"), records, layers_of(model))


def test_a_step_that_raised_is_no_row_and_recording_goes_on(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
        for k, (x, y) in enumerate(data(3)):
            def closure():
                optimizer.zero_grad()
                loss = mse(model, x, y)
                if k == 1:
                    raise FloatingPointError("bad batch")
                loss.backward()
                return loss

            w0 = weights(model)
            try:
                optimizer.step(closure)
            except FloatingPointError:
                continue
            records.append((grads(model), w0, weights(model)))
    check(gradflow.open(tmp_path / "run.zarr"), records, layers_of(model))


class FlakySGD(torch.optim.SGD):
    """SGD whose step raises after its update on chosen calls (an error in an optimizer wrapper
    after the update: a failed all-reduce, an OOM in a logging hook)."""

    def __init__(self, params, fail_on: set[int], **kwargs):
        super().__init__(params, **kwargs)
        self.calls, self.fail_on = 0, fail_on

    def step(self, closure=None):
        loss = super().step(closure)
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("simulated failure after the update")
        return loss


@pytest.mark.parametrize("strategy", ["stack", "foreach", "auto"])
def test_a_step_that_raised_after_its_gradient_and_update_leaves_no_trace(tmp_path, monkeypatch,
                                                                        strategy):
    """A step() that raised after the Recorder took its gradient and snapshot is no row, and
    nothing of it reaches the next rows: not its figures (a tensor read in blocks would add them
    to the next step's), not its missing gradients (the next step has them all)."""
    from gradflow import buckets, quantities

    monkeypatch.setattr(buckets, "STRATEGY", strategy)
    monkeypatch.setattr(quantities, "SCRATCH_MIN_ELEMENTS", 8)  # the stacked ops read in blocks
    monkeypatch.setattr(quantities, "SCRATCH_FRACTION", 0.01)
    model = mlp(sizes=(4, 16, 8, 3))
    optimizer = FlakySGD(model.parameters(), fail_on={2, 3}, lr=0.1, momentum=0.9)
    records, failures = [], 0
    with gradflow.Recorder(model, optimizer, tmp_path / "run.zarr"):
        for k, (x, y) in enumerate(data(6)):
            optimizer.zero_grad()
            mse(model, x, y).backward()
            if k in (1, 2):  # the failing steps: the first layer has no gradient
                model[0].weight.grad = model[0].bias.grad = None
            g, w0 = grads(model), weights(model)
            try:
                optimizer.step()
            except RuntimeError:
                failures += 1
                continue
            records.append((g, w0, weights(model)))
    assert failures == 2 and len(records) == 4
    check(gradflow.open(tmp_path / "run.zarr"), records, layers_of(model))


@pytest.mark.parametrize("strategy", ["stack", "foreach", "auto"])
def test_a_gan_step_that_raised_after_its_update_is_unknown_in_its_row(tmp_path, monkeypatch,
                                                                     strategy):
    """D's step makes the row; G's step moved G's weights, then raised: G's update in that row is
    unknown (NaN, not 0: 'no update' would be false), its gradient not recorded; every other
    figure, and every later row, matches the reference."""
    from gradflow import buckets

    monkeypatch.setattr(buckets, "STRATEGY", strategy)
    torch.manual_seed(0)
    model = nn.ModuleDict({"G": nn.Linear(3, 4), "D": nn.Linear(4, 1)})
    opt_d = torch.optim.SGD(model["D"].parameters(), lr=0.1)
    opt_g = FlakySGD(model["G"].parameters(), fail_on={3}, lr=0.1)
    real, records = torch.randn(8, 4), []
    with gradflow.Recorder(model, [opt_d, opt_g], tmp_path / "run.zarr"):
        for k in range(5):
            z = torch.randn(8, 3)
            opt_d.zero_grad()
            (nn.functional.softplus(-model["D"](real)).mean()
             + nn.functional.softplus(model["D"](model["G"](z).detach())).mean()).backward()
            g_d, w0 = grads(model), weights(model)
            opt_d.step()
            opt_g.zero_grad()
            nn.functional.softplus(-model["D"](model["G"](z))).mean().backward()
            g_g = grads(model)
            try:
                opt_g.step()
            except RuntimeError:
                assert k == 2
            records.append(({**g_d, "G.weight": g_g["G.weight"], "G.bias": g_g["G.bias"]},
                            w0, weights(model)))
    ds = gradflow.open(tmp_path / "run.zarr")
    assert ds.sizes["step"] == 5
    for k, (g, w0, w1) in enumerate(records):
        for layer, names in {"G": ["G.weight", "G.bias"], "D": ["D.weight", "D.bias"]}.items():
            expected = layer_reference(g, w0, w1, names)
            for var in VARIABLES:
                got = float(ds[var].sel(layer=layer).values[k])
                if k == 2 and layer == "G":
                    if var in ("update_norm", "update_mean_abs", "update_max_abs", "update_ratio",
                               "grad_norm", "grad_max_abs", "nonfinite"):
                        assert np.isnan(got), (var, got)
                        continue
                np.testing.assert_allclose(got, expected[var], rtol=2e-6, err_msg=f"{var} {layer} {k}")
    assert np.linalg.norm(records[2][2]["G.weight"] - records[2][1]["G.weight"]) > 0  # G moved


@pytest.mark.parametrize("strategy", ["stack", "foreach", "auto"])
def test_the_first_optimizer_of_a_row_raising_does_not_shift_later_rows(tmp_path, monkeypatch,
                                                                         strategy):
    """B steps first in each iteration and raises once (after its update): that row is A's step
    with B's figures NaN, and every later row pairs A's and B's steps of one iteration (B's next
    step had joined the open row, so B's figures sat one row early for the rest of the run)."""
    from gradflow import buckets

    monkeypatch.setattr(buckets, "STRATEGY", strategy)
    model = mlp(sizes=(4, 6, 3))
    opt_a = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt_b = FlakySGD(model[2].parameters(), fail_on={2}, lr=0.1)
    records = []
    with gradflow.Recorder(model, [opt_a, opt_b], tmp_path / "run.zarr"):
        for k, (x, y) in enumerate(data(5)):
            opt_a.zero_grad()
            opt_b.zero_grad()
            mse(model, x, y).backward()
            g, w0 = grads(model), weights(model)
            try:
                opt_b.step()
            except RuntimeError:
                assert k == 1
            opt_a.step()
            records.append((g, w0, weights(model)))
    ds = gradflow.open(tmp_path / "run.zarr")
    assert ds.sizes["step"] == 5
    for k, (g, w0, w1) in enumerate(records):
        for layer, names in layers_of(model).items():
            expected = layer_reference(g, w0, w1, names)
            for var in VARIABLES:
                got = float(ds[var].sel(layer=layer).values[k])
                if k == 1 and layer == "2" and var != "param_norm":
                    assert np.isnan(got), (var, got)
                    continue
                np.testing.assert_allclose(got, expected[var], rtol=2e-6, err_msg=f"{var} {layer} {k}")
