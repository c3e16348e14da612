"""The Lightning adapter: closures, accumulation, clipping, validation losses, manual optimization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from capture import capture_steps, layers_of
from reference import layer_reference
from torch import nn

import gradflow
from gradflow.errors import GradflowWarning

pl = pytest.importorskip("lightning.pytorch")
from gradflow.integrations.lightning import GradflowCallback  # noqa: E402

VARIABLES = ("grad_norm", "grad_max_abs", "update_norm", "update_mean_abs", "update_max_abs",
             "param_norm", "update_ratio", "nonfinite")


def loader(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    data = [(torch.randn(4, generator=gen), torch.randn(3, generator=gen)) for _ in range(n)]
    return torch.utils.data.DataLoader(data, batch_size=5)


class Regressor(pl.LightningModule):
    def __init__(self, records: list):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.records = records

    def training_step(self, batch, _):
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, _):
        self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        capture_steps(optimizer, self, self.records)
        return optimizer


class EpochMetrics(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def trainer(callbacks, **kwargs):
    options = dict(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(callbacks=callbacks, **{**options, **kwargs})


def check(ds, records, layers):
    assert ds.sizes["step"] == len(records) and not ds.skipped.values.any()
    for k, (g, w0, w1) in enumerate(records):
        for layer, names in layers.items():
            expected = layer_reference(g, w0, w1, names)
            for var in VARIABLES:
                np.testing.assert_allclose(float(ds[var].sel(layer=layer).values[k]),
                                           expected[var], rtol=2e-6, err_msg=f"{var} {layer} {k}")


def test_closure_accumulation_clipping_and_epoch_losses(tmp_path):
    records, metrics = [], EpochMetrics()
    model = Regressor(records)
    trainer([GradflowCallback(tmp_path / "run.zarr"), metrics], accumulate_grad_batches=2,
            gradient_clip_val=0.05).fit(model, loader(40, 1), loader(10, 2))
    assert len(records) == 2 * 4  # 8 batches per epoch, one step per 2 batches
    ds = gradflow.open(tmp_path / "run.zarr")
    check(ds, records, layers_of(model))
    total = np.sqrt((ds.grad_norm.values.astype(np.float64) ** 2).sum(1))
    np.testing.assert_allclose(total, 0.05, rtol=1e-5)  # the clipped gradient was recorded
    ep = gradflow.open(tmp_path / "run.zarr", group="epochs")
    assert ep.num_steps.values.tolist() == [4, 4]
    np.testing.assert_allclose(ep.val_loss.values, [m["val_loss"] for m in metrics.seen])
    np.testing.assert_allclose(ep.train_loss.values, [m["train_loss"] for m in metrics.seen])


class TwoOptimizers(Regressor):
    """Manual optimization: the head steps first, then the body, each on its own loss."""

    def __init__(self, records):
        super().__init__(records)
        self.automatic_optimization = False

    def training_step(self, batch, _):
        head, body = self.optimizers()
        for opt in (head, body):
            opt.zero_grad()
            self.manual_backward(nn.functional.mse_loss(self.net(batch[0]), batch[1]))
            opt.step()

    def configure_optimizers(self):
        head = torch.optim.SGD(self.net[2].parameters(), lr=0.1)
        body = torch.optim.Adam(self.net[0].parameters(), lr=0.01)
        self.head_records, self.body_records = [], []
        capture_steps(head, self, self.head_records)
        capture_steps(body, self, self.body_records)
        return head, body


def test_manual_optimization_with_two_optimizers(tmp_path):
    model = TwoOptimizers([])
    trainer([GradflowCallback(tmp_path / "run.zarr")], max_epochs=1).fit(model, loader(15, 1))
    ds = gradflow.open(tmp_path / "run.zarr")
    assert ds.sizes["step"] == 3 == len(model.head_records) == len(model.body_records)
    records = []
    for (g_head, w0, _), (g_body, _, w1) in zip(model.head_records, model.body_records):
        records.append(({n: (g_head if n.startswith("net.2") else g_body)[n] for n in g_head}, w0, w1))
    check(ds, records, layers_of(model))


def test_exception_closes_the_recorder(tmp_path):
    class Crash(Regressor):
        def training_step(self, batch, index):
            if index == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, index)

    callback = GradflowCallback(tmp_path / "run.zarr")
    with pytest.raises(RuntimeError, match="boom"):
        trainer([callback]).fit(Crash([]), loader(20, 1))
    assert callback.recorder is None
    assert gradflow.open(tmp_path / "run.zarr").sizes["step"] == 2


def test_logged_scalars_map_names_one_to_one_and_say_what_they_leave_out():
    from gradflow.integrations.lightning import logged_scalars

    metrics = {"val/loss": torch.tensor(0.5), "..": 1.0, "": 2.0, "epoch": 3.0,
               "acc": torch.tensor([1.0, 2.0]), "x" * 300: 4.0, "grad/inf": float("inf")}
    with pytest.warns(GradflowWarning) as caught:
        assert logged_scalars(metrics) == {"val_loss": 0.5, "grad_inf": float("inf")}  # Inf stays Inf, not NaN
    said = " ".join(str(w.message) for w in caught)
    for name in ("'..'", "''", "'epoch'", repr("x" * 300)):
        assert f"logged metric {name} is not recorded" in said
    with pytest.raises(gradflow.GradflowError, match="'train/loss' and 'train_loss' would both be stored as 'train_loss'"):
        logged_scalars({"train/loss": 1.0, "train_loss": 2.0})
    with pytest.raises(gradflow.GradflowError, match="'a/b' and 'a\\\\\\\\b' would both be stored as 'a_b'"):
        logged_scalars({"a/b": 1.0, "a\\b": 2.0})
    sources = {}
    assert logged_scalars({"train/loss": 1.0}, sources) == {"train_loss": 1.0}
    assert logged_scalars({"train/loss": 2.0}, sources) == {"train_loss": 2.0}  # the same metric, next epoch
    with pytest.raises(gradflow.GradflowError, match="'train/loss' and 'train_loss'"):
        logged_scalars({"train_loss": 3.0}, sources)  # another metric, a later epoch: same stored name


def test_two_logged_names_for_one_stored_name_stop_the_fit_in_one_line(tmp_path):
    """'train/loss' became 'train_loss' and overwrote the module's own 'train_loss': one metric lost."""
    class TwoLosses(Regressor):
        def training_step(self, batch, index):
            loss = super().training_step(batch, index)
            self.log("train/loss", 2 * loss, on_step=False, on_epoch=True)
            return loss

    callback = GradflowCallback(tmp_path / "run.zarr")
    with pytest.raises(gradflow.GradflowError, match="'train_loss' and 'train/loss' would both be stored as 'train_loss'"):
        trainer([callback]).fit(TwoLosses([]), loader(20, 1))
    assert callback.recorder is None
    assert gradflow.open(tmp_path / "run.zarr").sizes["step"] == 4  # the epoch's rows are kept


class EpochEndLogger(Regressor):
    """Logs in its own ``on_train_epoch_end`` (the torchmetrics ``compute()`` pattern), which Lightning
    calls after the callbacks' hook of the same name."""

    def on_train_epoch_end(self):
        self.log("epoch_metric", 100.0 + self.current_epoch)


class StoreOnDisk(pl.Callback):
    """What a reader of the store sees at each epoch's start (after the previous checkpoint)."""

    def __init__(self, store):
        self.store, self.seen = store, []

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch > 0:
            tree = gradflow.open_tree(self.store)
            self.seen.append((tree.ds.sizes["step"], tree["epochs"].ds.sizes["epoch"]))


def test_each_epoch_holds_what_was_logged_in_it_and_a_checkpoint_commits(tmp_path):
    """A metric logged in the module's on_train_epoch_end belongs to that epoch (it was one epoch
    late, the last lost); val_loss of an epoch without validation (every 2nd epoch) is NaN (it was
    the previous validation's value again); at each checkpoint the store on disk holds every step
    and epoch so far (they waited for the 10 s flush, so a crash left a resumed run relabelled)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    records, metrics = [], EpochMetrics()
    model, store = EpochEndLogger(records), tmp_path / "run.zarr"
    on_disk = StoreOnDisk(store)
    trainer([GradflowCallback(store), metrics, on_disk,
             ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_on_train_epoch_end=True)],
            max_epochs=4, check_val_every_n_epoch=2, enable_checkpointing=True
            ).fit(model, loader(20, 1), loader(10, 2))
    ep = gradflow.open(store, group="epochs")
    assert ep.epoch_metric.values.tolist() == [100.0, 101.0, 102.0, 103.0]
    validated = [m.get("val_loss") for m in metrics.seen]  # as Lightning holds it at each epoch's end
    np.testing.assert_array_equal(np.isnan(ep.val_loss.values), [True, False, True, False])
    np.testing.assert_allclose(ep.val_loss.values[[1, 3]], [validated[1], validated[3]])
    assert on_disk.seen == [(4, 1), (8, 2), (12, 3)]  # 4 steps per epoch, committed at each save
    check(gradflow.open(store), records, layers_of(model))


def test_a_store_that_continues_at_another_step_than_the_trainer_warns(tmp_path):
    """Resuming the store (mode="a") from a checkpoint at the same step: silent. Resuming it with
    a trainer that starts elsewhere (here: from scratch): one warning naming both step numbers,
    so the offset between the store's steps and global_step is not silent."""
    import warnings as warnings_module

    from lightning.pytorch.callbacks import ModelCheckpoint

    store, records = tmp_path / "run.zarr", []
    trainer([GradflowCallback(store), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
            max_epochs=1, enable_checkpointing=True).fit(Regressor(records), loader(20, 1))
    with warnings_module.catch_warnings(record=True) as caught:
        warnings_module.simplefilter("always")
        trainer([GradflowCallback(store, mode="a"), ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
                max_epochs=2, enable_checkpointing=True).fit(
            Regressor(records), loader(20, 1), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert not [w for w in caught if issubclass(w.category, GradflowWarning)]
    with pytest.warns(GradflowWarning, match=r"continues at step 8, but the trainer starts at "
                                              r"global step 0"):
        trainer([GradflowCallback(store, mode="a")], max_epochs=1).fit(Regressor(records),
                                                                          loader(20, 1))
    assert gradflow.open(store).sizes["step"] == 12
