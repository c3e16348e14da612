"""`gradflow train` end to end on a tiny config, its defaults, and its one-line errors."""

import dataclasses
import inspect
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import gradflow
import gradflow.cli
from gradflow.train import TrainConfig

TINY = ["--depth", "1", "--levels", "2", "--width", "4", "--size", "32", "--n-train", "4", "--n-val", "2",
        "--epochs", "2", "--device", "cpu"]
# CLI option (parameter name) → TrainConfig field, where the names differ.
RENAMED = {"bn": "batch_norm", "short": "short_skip", "long": "long_skip"}


def test_train_command_end_to_end(tmp_path):
    gradflow.cli._register()
    store, checkpoint = tmp_path / "run.zarr", tmp_path / "best.safetensors"
    result = CliRunner().invoke(gradflow.cli.app, ["train", *TINY, "--no-bn", "--out", str(store),
                                                   "--checkpoint", str(checkpoint)])
    assert result.exit_code == 0, result.output
    summary = result.output.strip().splitlines()[-1]
    epochs = gradflow.open(str(store), group="epochs")
    best = int(np.argmin(epochs["val_loss"].values))
    assert summary.startswith(f"trained 2 epochs; best epoch {best}: val loss {float(epochs['val_loss'][best]):.4f}")
    assert str(store) in summary and str(checkpoint) in summary
    assert epochs.sizes["epoch"] == 2
    assert checkpoint.is_file()
    assert "BatchNorm2d" not in gradflow.open(str(store))["module_type"].values.tolist()

    again = CliRunner().invoke(gradflow.cli.app, ["train", *TINY, "--out", str(store), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert gradflow.open(str(store), group="epochs").sizes["epoch"] == 2  # replaced, not appended to
    assert "BatchNorm2d" in gradflow.open(str(store))["module_type"].values.tolist()


def test_cli_defaults_are_the_config_defaults():
    from gradflow.cli.train import train_command

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name, parameter in inspect.signature(train_command).parameters.items():
        field = RENAMED.get(name, name)
        if field in fields:
            assert parameter.default == fields[field], name
    options = {RENAMED.get(name, name) for name in inspect.signature(train_command).parameters}
    assert set(fields) <= options  # every config field is settable from the command line


@pytest.mark.parametrize("option, value, word", [
    ("--epochs", "0", "epochs"), ("--loss", "l2", "loss"), ("--size", "30", "size"),
    ("--device", "tpu", "device"), ("--lr", "-1", "lr"), ("--optimizer", "adam", "optimizer"),
])
def test_bad_values_exit_2_with_one_line(tmp_path, monkeypatch, capsys, option, value, word):
    from gradflow.cli import main

    store = tmp_path / "run.zarr"
    monkeypatch.setattr(sys, "argv", ["gradflow", "train", *TINY, "--out", str(store), option, value])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and word in err
    assert not store.exists()  # nothing half-written


def test_existing_store_is_not_silently_appended_to(tmp_path, monkeypatch, capsys):
    from gradflow.cli import main

    store = tmp_path / "run.zarr"
    store.mkdir()
    monkeypatch.setattr(sys, "argv", ["gradflow", "train", *TINY, "--out", str(store)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "--overwrite" in err


def test_score_passes_prints_the_best_models_validation_scores(tmp_path):
    """The printed scores are those of the checkpointed best model on the validation images, averaged
    over the dropout passes (recomputed here from the checkpoint with predict and the metrics)."""
    import torch

    from gradflow.data import load_data
    from gradflow.metrics import isbi_scores
    from gradflow.predict import predict
    from gradflow.train import build_model, load_checkpoint

    gradflow.cli._register()
    checkpoint = tmp_path / "best.safetensors"
    result = CliRunner().invoke(gradflow.cli.app, ["train", *TINY, "--dropout", "0.2", "--score-passes", "3",
                                                   "--out", str(tmp_path / "run.zarr"), "--checkpoint", str(checkpoint)])
    assert result.exit_code == 0, result.output
    config = TrainConfig(depth=1, levels=2, width=4, size=32, n_train=4, n_val=2, dropout=0.2, device="cpu")
    model = build_model(config)
    load_checkpoint(checkpoint, model)
    data = load_data("synthetic", size=32, seed=0, n_train=4, n_val=2)
    torch.manual_seed(0)
    prob = predict(model, data.val_images, passes=3, batch_size=config.batch_size)
    expected = isbi_scores((1 - prob[:, 0]).numpy(), (data.val_labels[:, 0] < 0.5).numpy().astype(np.uint8))
    assert result.output.strip().splitlines()[-1] == (
        f"validation images, 3 dropout passes: V_rand {expected['v_rand']:.4f}, V_info {expected['v_info']:.4f}, "
        f"pixel error {expected['pixel_error']:.4f}")
