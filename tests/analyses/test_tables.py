import numpy as np
import xarray as xr

from gradflow.analyses.tables import best_val_table


def test_best_val_loss_and_train_loss_at_that_epoch(run_factory):
    nodes = {}
    cases = {"a": ([0.9, 0.5, 0.3, 0.2], [0.8, 0.4, 0.6, 0.7]),   # best val at epoch 1
             "b": ([0.9, 0.8, 0.7, 0.6], [np.nan, 0.9, 0.9, 0.85])}  # NaN skipped; first of ties irrelevant
    for name, (train, val) in cases.items():
        step, epoch = run_factory(0, epochs=4)
        nodes[f"/{name}"] = step
        nodes[f"/{name}/epochs"] = epoch.assign(train_loss=("epoch", train), val_loss=("epoch", val))
    table = best_val_table(xr.DataTree.from_dict(nodes))
    assert list(table.index) == ["a", "b"]
    assert table.loc["a", "best_epoch"] == 1 and table.loc["b", "best_epoch"] == 3
    assert table.loc["a", "best_val_loss"] == 0.4 and table.loc["a", "train_loss_at_best"] == 0.5
    assert table.loc["b", "best_val_loss"] == 0.85 and table.loc["b", "train_loss_at_best"] == 0.6
    assert (table["epochs"] == 4).all()


def test_run_without_validation_loss_gets_missing_values(run_factory):
    _, epoch = run_factory(0)
    table = best_val_table(epoch.drop_vars("val_loss"))
    assert table.loc["run", "best_epoch"] is not None and np.isnan(table.loc["run", "best_val_loss"])


def test_optimizer_from_the_attrs_and_lr_at_best_from_the_recorded_schedule(run_factory):
    step, epoch = run_factory(0)  # 3 epochs of 4 steps; best val loss at epoch 1 below
    epoch = epoch.assign(val_loss=("epoch", [0.5, 0.2, 0.4]))
    schedule = 0.004 * 0.5 ** np.arange(12)  # OneCycle-like: the creation rate is not the rate used
    step = step.assign(lr=(("step", "param_group"), schedule[:, None])).assign_coords(param_group=["group0"])
    recorded = {"sgd": [{"class": "SGD", "param_groups": [{"lr": 0.01, "momentum": 0.9}]}],
                "rms": [{"class": "RMSprop", "param_groups": [{"lr": 1e-4}]}], "bare": None}
    nodes = {}
    for name, optimizers in recorded.items():
        nodes[f"/{name}"] = step.assign_attrs(optimizers=optimizers) if optimizers else step
        nodes[f"/{name}/epochs"] = epoch
    table = best_val_table(xr.DataTree.from_dict(nodes))
    assert table.loc["sgd", "optimizer"] == "SGD" and table.loc["rms", "optimizer"] == "RMSprop"
    assert table.loc["bare", "optimizer"] == ""
    assert (table["lr_at_best"] == schedule[7]).all()  # last step (7) of epoch 1
    assert "lr" not in table.columns
    no_lr = best_val_table(xr.DataTree.from_dict({"/r": step.drop_vars("lr"), "/r/epochs": epoch}))
    assert np.isnan(no_lr.loc["r", "lr_at_best"])


def test_every_other_scalar_a_run_logged_is_shown_at_the_best_epoch(run_factory):
    """end_epoch(val_accuracy=...) is a column (gradflow train logs train/val accuracy): its value
    at the best-validation epoch; NaN for a run that did not log it or has no validation loss."""
    nodes = {}
    for name, val, extra in (("a", [0.8, 0.4, 0.6], {"val_accuracy": [0.5, 0.9, 0.7], "bleu": [1, 2, 3]}),
                             ("b", [0.8, 0.7, 0.9], {"val_accuracy": [0.1, 0.2, 0.3]}),
                             ("c", [np.nan] * 3, {"val_accuracy": [0.1, 0.2, 0.3]})):
        step, epoch = run_factory(0)
        nodes[f"/{name}"] = step
        nodes[f"/{name}/epochs"] = epoch.assign(val_loss=("epoch", val),
                                                **{k: ("epoch", v) for k, v in extra.items()})
    table = best_val_table(xr.DataTree.from_dict(nodes))
    assert list(table.columns[-2:]) == ["bleu_at_best", "val_accuracy_at_best"]
    assert table.loc["a", "val_accuracy_at_best"] == 0.9 and table.loc["a", "bleu_at_best"] == 2
    assert table.loc["b", "val_accuracy_at_best"] == 0.2 and np.isnan(table.loc["b", "bleu_at_best"])
    assert np.isnan(table.loc["c", "val_accuracy_at_best"])
    assert "num_steps_at_best" not in table and "update_norm_at_best" not in table
