"""The Hugging Face adapter: one row per optimizer step with accumulation and clipping, epoch losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from capture import capture_steps, layers_of
from reference import layer_reference
from torch import nn

import gradflow

transformers = pytest.importorskip("transformers")
from gradflow.integrations.transformers import GradflowCallback  # noqa: E402

VARIABLES = ("grad_norm", "grad_max_abs", "update_norm", "update_mean_abs", "update_max_abs",
             "param_norm", "update_ratio", "nonfinite")


class Regressor(nn.Module):
    """A plain module with the Trainer's contract: forward(**batch) returns a dict with the loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x, labels):
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def dataset(n: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(4, generator=gen), "labels": torch.randn(3, generator=gen)}
            for _ in range(n)]


def test_accumulation_clipping_and_epoch_losses(tmp_path):
    model, records = Regressor(), []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    capture_steps(optimizer, model, records)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
        per_device_eval_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=0.05,
        num_train_epochs=2, logging_strategy="epoch", eval_strategy="epoch", save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, lr_scheduler_type="constant", seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(16, 1),
                                   eval_dataset=dataset(8, 2), optimizers=(optimizer, None),
                                   callbacks=[GradflowCallback(tmp_path / "run.zarr")])
    trainer.train()
    assert len(records) == 2 * 2  # 4 batches per epoch, one step per 2 batches
    ds = gradflow.open(tmp_path / "run.zarr")
    assert ds.sizes["step"] == len(records) and not ds.skipped.values.any()
    for k, (g, w0, w1) in enumerate(records):
        for layer, names in layers_of(model).items():
            expected = layer_reference(g, w0, w1, names)
            for var in VARIABLES:
                np.testing.assert_allclose(float(ds[var].sel(layer=layer).values[k]),
                                           expected[var], rtol=2e-6, err_msg=f"{var} {layer} {k}")
    total = np.sqrt((ds.grad_norm.values.astype(np.float64) ** 2).sum(1))
    np.testing.assert_allclose(total, 0.05, rtol=1e-5)  # the clipped gradient was recorded
    ep = gradflow.open(tmp_path / "run.zarr", group="epochs")
    assert ep.num_steps.values.tolist() == [2, 2]
    logged = [entry for entry in trainer.state.log_history]
    np.testing.assert_allclose(ep.train_loss.values, [e["loss"] for e in logged if "loss" in e])
    np.testing.assert_allclose(ep.val_loss.values, [e["eval_loss"] for e in logged
                                                    if "eval_loss" in e])


def test_each_checkpoint_commits_the_steps_it_holds(tmp_path):
    """Saving a checkpoint (every 3 steps, and at each epoch's end with its evaluation) commits
    the store: a reader sees every step so far at once (they waited for the 10 s flush, so a run
    resumed from the checkpoint after a crash was relabelled from step 0)."""
    store, seen = tmp_path / "run.zarr", []

    class Reader(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # after gradflow's (it comes first)
            tree = gradflow.open_tree(store)
            seen.append((state.global_step, tree.ds.sizes["step"], tree["epochs"].ds.sizes["epoch"]))

    model = Regressor()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=2,
        logging_strategy="epoch", eval_strategy="epoch", save_strategy="steps", save_steps=3,
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=dataset(16, 1),
                         eval_dataset=dataset(8, 2),
                         callbacks=[GradflowCallback(store), Reader()]).train()
    assert [(step, rows) for step, rows, _ in seen] == [(3, 3), (6, 6), (8, 8)]
    # epoch 0 is closed by the first save after its evaluation; the save at the last step comes
    # before the last epoch ends (its row is written at on_train_end)
    assert [epochs for _, _, epochs in seen] == [0, 1, 1]
