"""The training loop: determinism, recorder neutrality, recorded losses vs. independent recomputation."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradflow
from gradflow.data import load_data
from gradflow.errors import GradflowError
from gradflow.models import simple_fcn
from gradflow.train import TrainConfig, load_checkpoint, train

TINY = TrainConfig(depth=1, levels=2, width=4, size=32, n_train=4, n_val=2, batch_size=4, epochs=2, device="cpu")


def weights(result) -> dict[str, torch.Tensor]:
    return result.model.state_dict()


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def fresh_model(config: TrainConfig) -> torch.nn.Module:
    return simple_fcn(config.depth, config.levels, config.width, block=config.block, batch_norm=config.batch_norm,
                      short_skip=config.short_skip, long_skip=config.long_skip, dropout=config.dropout,
                      init=config.init)


def hand_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    return -2 * (prob * target).sum() / (prob.sum() + target.sum())


def hand_loss(name: str, logits: torch.Tensor, target: torch.Tensor) -> float:
    """Written out here, independently of gradflow.losses."""
    if name == "bce":
        z = logits.double()
        return float(-(target * F.logsigmoid(z) + (1 - target) * F.logsigmoid(-z)).mean())
    return float(hand_dice(logits.double(), target.double()))


def test_same_seed_same_weights_and_recorder_changes_nothing(tmp_path):
    # Dropout and augmentation on, so every random source (init, order, augmentation, dropout) is used.
    config = dataclasses.replace(TINY, dropout=0.2, augment=True)
    first = train(config, store=None)
    again = train(config, store=None)
    recorded = train(config, store=str(tmp_path / "run.zarr"))
    other_seed = train(dataclasses.replace(config, seed=1), store=None)

    assert_same_weights(weights(first), weights(again))
    assert_same_weights(weights(first), weights(recorded))
    columns = ["train_loss", "val_loss", "train_accuracy", "val_accuracy"]
    assert first.history[columns].equals(recorded.history[columns])
    assert not torch.equal(weights(first)["classifier.weight"], weights(other_seed)["classifier.weight"])


@pytest.mark.parametrize("loss", ["bce", "dice"])
def test_recorded_losses_match_recomputation_from_checkpoints(tmp_path, loss):
    # No augmentation and no dropout, one batch per epoch: every recorded number is reproducible by
    # hand from the weights. Epoch 0 of a 2-epoch run equals a 1-epoch run with the same seed, so the
    # 1-epoch run's checkpoint holds the weights the 2-epoch run starts its epoch 1 from.
    config = dataclasses.replace(TINY, augment=False, loss=loss)
    store = str(tmp_path / "run.zarr")
    result = train(config, store=store, checkpoint=tmp_path / "best.safetensors")
    train(dataclasses.replace(config, epochs=1), store=None, checkpoint=tmp_path / "one.safetensors")

    ep = gradflow.open(store, group="epochs")
    val_loss = ep["val_loss"].values
    assert len(val_loss) == 2
    assert result.best_epoch == int(np.argmin(val_loss))
    assert result.best_val_loss == pytest.approx(val_loss[result.best_epoch], rel=1e-6)
    np.testing.assert_allclose(ep["train_loss"].values, result.history["train_loss"].values, rtol=1e-6)

    data = load_data("synthetic", size=config.size, seed=config.seed, n_train=config.n_train, n_val=config.n_val)
    attrs = gradflow.open(store).attrs
    assert attrs["metadata"]["loss"] == loss and attrs["metadata"]["data_split"]["val"] == data.split["val"]
    optimizer = attrs["optimizers"][0]
    assert optimizer["class"] == "RMSprop"  # the paper's optimiser; lr: RMSprop's default without BN
    assert optimizer["param_groups"][0]["lr"] == 1e-4 and optimizer["param_groups"][0]["weight_decay"] == 1e-3
    with torch.no_grad():
        best = fresh_model(config).eval()
        load_checkpoint(tmp_path / "best.safetensors", best)
        logits = best(data.val_images)
        assert val_loss[result.best_epoch] == pytest.approx(hand_loss(loss, logits, data.val_labels), rel=1e-5)
        accuracy = float(((logits > 0).float() == data.val_labels).float().mean())
        assert ep["val_accuracy"].values[result.best_epoch] == pytest.approx(accuracy, abs=1e-6)

        start_of_epoch_1 = fresh_model(config).train()  # train mode: BN on batch statistics
        load_checkpoint(tmp_path / "one.safetensors", start_of_epoch_1)
        logits = start_of_epoch_1(data.train_images)
        assert ep["train_loss"].values[1] == pytest.approx(hand_loss(loss, logits, data.train_labels), rel=1e-5)
        accuracy = float(((logits > 0).float() == data.train_labels).float().mean())
        assert ep["train_accuracy"].values[1] == pytest.approx(accuracy, abs=1e-6)

    # the model handed back carries the best weights
    assert_same_weights(weights(result), load_checkpoint(tmp_path / "best.safetensors"))


def test_progress_reports_each_epoch_and_its_steps_through_the_callback():
    calls = []
    train(TINY, store=None, progress=lambda *call: calls.append(call))
    epochs = [call for call in calls if call[0] == "train: epochs"]
    steps = [call for call in calls if call[0] == "train: steps"]
    assert [(done, total) for _, done, total, _ in epochs] == [(0, 2), (1, 2), (1, 2), (2, 2)]
    assert epochs[1][3].startswith("train ") and ", val " in epochs[1][3]
    # 4 images in batches of 4: one step per epoch, each epoch's task starts at 0 and ends at its total
    assert steps == [("train: steps", 0, 1, "epoch 0"), ("train: steps", 1, 1, "epoch 0"),
                     ("train: steps", 0, 1, "epoch 1"), ("train: steps", 1, 1, "epoch 1")]


def test_sparsity_penalty_only_where_there_is_one():
    # SAT has a trainable channel selection: its L1 weight changes the weights. Other long skips
    # have no penalty at all: the weight must change nothing.
    sat = dataclasses.replace(TINY, long_skip="sat", augment=False)
    assert not torch.equal(weights(train(dataclasses.replace(sat, sparsity=0.0), store=None))["classifier.weight"],
                           weights(train(dataclasses.replace(sat, sparsity=0.5), store=None))["classifier.weight"])
    plain = dataclasses.replace(TINY, augment=False)
    assert_same_weights(weights(train(dataclasses.replace(plain, sparsity=0.0), store=None)),
                        weights(train(dataclasses.replace(plain, sparsity=0.5), store=None)))


@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("batch_size", 0), ("every", 0), ("lr", 0.0), ("lr", float("nan")),
    ("weight_decay", -1.0), ("dropout", 1.0), ("loss", "l2"), ("size", 30), ("n_train", 0), ("optimizer", "adam"),
])
def test_bad_config_values_raise(field, value):
    with pytest.raises(GradflowError, match=field if field != "size" else "size 32"):
        dataclasses.replace(TINY, **{field: value})


@pytest.mark.parametrize("device, amp, message", [("tpu", False, "device"), ("cpu", True, "CUDA")])
def test_bad_device_or_amp_raise(device, amp, message):
    with pytest.raises(GradflowError, match=message):
        train(dataclasses.replace(TINY, device=device, amp=amp), store=None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_trains_and_is_recorded(tmp_path):
    store = str(tmp_path / "run.zarr")
    result = train(dataclasses.replace(TINY, device="auto", amp=True), store=store)
    assert next(result.model.parameters()).device.type == "cuda"
    assert np.isfinite(gradflow.open(store, group="epochs")["val_loss"].values).all()


def test_config_init_reaches_the_model():
    from gradflow.train import build_model

    config = dataclasses.replace(TINY, init="scaled")
    torch.manual_seed(0)
    built = build_model(config).state_dict()
    torch.manual_seed(0)
    reference = simple_fcn(config.depth, config.levels, config.width, batch_norm=config.batch_norm,
                           init="scaled").state_dict()
    assert all(torch.equal(built[name], reference[name]) for name in reference)


def test_denormals_are_not_flushed_after_training():
    """Training flushes denormals on CPU for speed, then switches that off again."""
    train(TINY, store=None)
    assert (torch.tensor(1e-39) * 1.0).item() != 0.0  # 1e-39 is a float32 denormal


def test_sgd_is_recorded_and_its_two_steps_match_hand_sgd_with_momentum(tmp_path):
    # One full batch per epoch, no augmentation: step 0 and step 1 see the same 4 images (in another
    # order, which neither the mean loss nor batch norm's batch statistics notice).
    config = dataclasses.replace(TINY, optimizer="sgd", lr=0.05, weight_decay=0.01, augment=False)
    store = str(tmp_path / "run.zarr")
    train(config, store=store)
    ds = gradflow.open(store)
    (optimizer,) = ds.attrs["optimizers"]
    group = optimizer["param_groups"][0]
    assert optimizer["class"] == "SGD"
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"], group["dampening"]) == (
        0.05, 0.9, False, 0.01, 0)
    assert ds.attrs["metadata"]["optimizer"] == "sgd"

    # SGD written out: d = g + wd·w; buf = d (first step), buf = 0.9·buf + d after; w -= lr·buf.
    torch.manual_seed(config.seed)
    model = fresh_model(config).train()
    data = load_data("synthetic", size=config.size, seed=config.seed, n_train=config.n_train, n_val=config.n_val)
    params = dict(model.named_parameters())
    buffers, per_step = {}, []
    for step in range(2):
        z = model(data.train_images)
        y = data.train_labels
        loss = -(y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)).mean()
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        moved = {}
        with torch.no_grad():
            for name, w in params.items():
                d = grads[name] + 0.01 * w
                buffers[name] = d.clone() if step == 0 else 0.9 * buffers[name] + d
                before = w.clone()
                w -= 0.05 * buffers[name]
                moved[name] = (w - before).double()
        per_step.append({module: float(torch.sqrt(sum((moved[f"{module}.{p}"] ** 2).sum()
                                                      for p, _ in m.named_parameters(recurse=False))))
                         for module, m in model.named_modules() if list(m.parameters(recurse=False))})
    for step, expected in enumerate(per_step):
        recorded = ds["update_norm"].isel(step=step).to_series()
        assert set(recorded.index) == set(expected)
        for layer, norm in expected.items():
            assert recorded[layer] == pytest.approx(norm, rel=2e-3), (step, layer)
    # Without momentum the second step would differ (by 0.9·lr·buf): the test can tell.
    assert per_step[1]["classifier"] != pytest.approx(per_step[0]["classifier"], rel=0.05)


def test_optimizers_built_from_the_config():
    from gradflow.train import build_optimizer

    params = [torch.nn.Parameter(torch.ones(3))]
    sgd = build_optimizer(dataclasses.replace(TINY, optimizer="sgd", lr=0.2, weight_decay=0.0), params)
    rmsprop = build_optimizer(TINY, params)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9 and not sgd.defaults["nesterov"]
    assert type(rmsprop) is torch.optim.RMSprop and rmsprop.defaults["lr"] == TINY.lr


# ---------------------------------------------------------------- the paper's RMSprop (Keras 1.x) and weight decay

def tiny_net() -> torch.nn.Module:
    """Conv (no bias: before BN its gradient is ~0, and RMSprop would turn float rounding into O(lr)
    steps) → BN → ReLU → conv with bias."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1, bias=False), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                               torch.nn.Conv2d(3, 1, 1))


def batch_loss(model: torch.nn.Module, step: int, params: dict | None = None) -> torch.Tensor:
    """The loss of batch ``step``; with ``params`` (float64 tensors) evaluated at those parameters."""
    g = torch.Generator().manual_seed(step)
    x, target = torch.randn(2, 1, 6, 6, generator=g), torch.randn(2, 1, 6, 6, generator=g)
    if params is None:
        return (model(x) - target).square().mean()
    out = torch.func.functional_call(model.double(), params, (x.double(),))
    return (out - target.double()).square().mean()


def keras_rmsprop_by_hand(steps: int, lr: float, rho: float, wd: float, mode: str) -> dict:
    """Keras 1.x RMSprop written out (a ← ρa + (1−ρ)g², p ← p − lr·g / (√a + 1e-8), a starts at 0), in
    float64, on ``tiny_net()``, with the l2 regularizer wd·Σ‖W‖² of the conv kernels in the loss (mode
    "l2") or the conv kernels multiplied by (1 − lr·wd) after each update (mode "decoupled")."""
    model = tiny_net()
    kernels = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    params = {n: p.detach().double().clone().requires_grad_() for n, p in model.named_parameters()}
    accum = {n: torch.zeros_like(p) for n, p in params.items()}
    for step in range(steps):
        loss = batch_loss(model, step, params)
        if mode == "l2":
            loss = loss + wd * sum(params[n].square().sum() for n in kernels)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        with torch.no_grad():
            for n in params:
                accum[n] = rho * accum[n] + (1 - rho) * grads[n].square()
                new = params[n] - lr * grads[n] / (accum[n].sqrt() + 1e-8)
                if mode == "decoupled" and n in kernels:
                    new = new * (1 - lr * wd)
                params[n] = new.requires_grad_()
    return {n: p.detach() for n, p in params.items()}


@pytest.mark.parametrize("mode", ["l2", "decoupled"])
def test_keras_rmsprop_and_weight_decay_modes_match_the_hand_update(mode):
    from gradflow.train import build_optimizer

    config = dataclasses.replace(TINY, lr=1e-2, weight_decay=0.05, weight_decay_mode=mode, rmsprop_alpha=0.9)
    model = tiny_net()
    expected = keras_rmsprop_by_hand(3, lr=1e-2, rho=0.9, wd=0.05, mode=mode)
    optimizer = build_optimizer(config, model)
    for step in range(3):
        optimizer.zero_grad()
        batch_loss(model, step).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        assert torch.allclose(p.detach().double(), expected[name], rtol=1e-5, atol=1e-6), name
    # The decay matters at these settings: without it the kernels end elsewhere.
    no_decay = keras_rmsprop_by_hand(3, lr=1e-2, rho=0.9, wd=0.0, mode=mode)
    assert not torch.allclose(no_decay["0.weight"], expected["0.weight"], rtol=1e-5, atol=1e-6)


def test_torch_mode_decays_every_parameter_with_torch_rmsprop_defaults():
    from gradflow.train import build_optimizer

    rmsprop = build_optimizer(TINY, tiny_net())
    assert [g["weight_decay"] for g in rmsprop.param_groups] == [TINY.weight_decay]
    assert (rmsprop.defaults["alpha"], rmsprop.defaults["eps"]) == (0.99, 1e-8)
    l2 = build_optimizer(dataclasses.replace(TINY, weight_decay_mode="l2", weight_decay=0.25), tiny_net())
    assert [(len(g["params"]), g["weight_decay"]) for g in l2.param_groups] == [(2, 0.5), (3, 0.0)]
    with pytest.raises(GradflowError, match="needs the model"):
        build_optimizer(dataclasses.replace(TINY, weight_decay_mode="l2"), list(tiny_net().parameters()))


def test_random_crops_cut_image_and_label_at_one_place_and_cover_every_offset():
    from gradflow.train import random_crops

    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    y = x + 1000
    corners = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        cx, cy = random_crops(x, y, 5, generator)
        assert cx.shape == cy.shape == (2, 1, 5, 5) and torch.equal(cy, cx + 1000)
        for i in range(2):
            top, left = divmod(int(cx[i, 0, 0, 0] - i * 64), 8)
            assert torch.equal(cx[i], x[i, :, top:top + 5, left:left + 5])
            corners.add((top, left))
    assert corners == {(t, l) for t in range(4) for l in range(4)}


def test_crops_per_epoch_and_crop_settings(tmp_path):
    config = dataclasses.replace(TINY, size=32, crop=16, crops_per_image=3, n_train=2, batch_size=2, epochs=1)
    train(config, store=str(tmp_path / "run.zarr"))
    assert gradflow.open(str(tmp_path / "run.zarr")).sizes["step"] == 3  # 2 images × 3 crops / batch 2
    full = dataclasses.replace(config, crops_per_image=0)  # (32/16)² = 4 crops per image
    train(full, store=str(tmp_path / "full.zarr"))
    assert gradflow.open(str(tmp_path / "full.zarr")).sizes["step"] == 4
    for bad, message in [(dict(crop=10), "crop 10 is not divisible"), (dict(crop=64), "larger"),
                         (dict(size=0), r"size must be a positive integer up to 2\*\*63 − 1, got 0"),
                         (dict(crop=-8), r"crop must be a non-negative integer up to 2\*\*63 − 1, got -8"),
                         (dict(crop=0), "crops_per_image needs crop"), (dict(rmsprop_alpha=1.0), "rmsprop_alpha"),
                         (dict(weight_decay_mode="adamw"), "weight_decay_mode"), (dict(arch="unet"), "arch")]:
        with pytest.raises(GradflowError, match=message):
            dataclasses.replace(config, **bad)


def test_the_checkpoint_is_written_at_each_new_best_epoch(tmp_path):
    """A run stopped after its first epoch (here: interrupted at the second's start) keeps that
    epoch's weights in the checkpoint, bit for bit those the model had after it."""
    config = TrainConfig(depth=1, levels=2, width=4, size=32, n_train=4, n_val=2, epochs=3,
                         device="cpu")
    after_first = {}

    def progress(task, done, total, status):
        if task.endswith("epochs") and done == 1 and not after_first:
            after_first.update({k: v.clone() for k, v in model_of[0].state_dict().items()})
        if task.endswith("steps") and status == "epoch 1":
            raise KeyboardInterrupt

    import gradflow.train as train_module
    model_of = []
    build = train_module.build_model
    train_module.build_model = lambda config: model_of.append(build(config)) or model_of[0]
    try:
        with pytest.raises(KeyboardInterrupt):
            train(config, store=None, checkpoint=tmp_path / "best.safetensors", progress=progress)
    finally:
        train_module.build_model = build
    saved = load_checkpoint(tmp_path / "best.safetensors")
    assert saved.keys() == after_first.keys()
    for k in saved:
        assert torch.equal(saved[k], after_first[k]), k
