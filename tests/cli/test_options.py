"""Options generated from a config dataclass: names, switches, defaults, help and choices from the fields."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from gradflow.cli._options import config_options
from gradflow.errors import GradflowError


@dataclasses.dataclass
class Toy:
    depth: int = dataclasses.field(default=7, metadata={"help": "Blocks per level."})
    batch_norm: bool = dataclasses.field(default=True, metadata={"help": "Batch normalisation."})
    loss: str = dataclasses.field(default="bce", metadata={"help": "Training loss.", "choices": ("bce", "dice")})
    lr: float = dataclasses.field(default=1e-3, metadata={"help": "Learning rate."})


def app_with(**kwargs) -> tuple[typer.Typer, list]:
    app, seen = typer.Typer(), []

    @app.command()
    @config_options(Toy, **kwargs)
    def run(out: Annotated[str, typer.Option(help="Where to.")] = "x", *, options) -> None:
        seen.append((out, options))

    return app, seen


def test_every_field_is_an_option_with_its_default_help_and_switch():
    app, seen = app_with()
    result = CliRunner().invoke(app, ["--depth", "3", "--no-bn", "--out", "y"])
    assert result.exit_code == 0, result.output
    assert seen == [("y", {"depth": 3, "batch_norm": False, "loss": "bce", "lr": 1e-3})]
    text = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "--bn" in text and "--no-bn" in text and "Blocks per level." in text and "One of: bce, dice." in text


def test_fields_excluded_or_left_unset():
    app, seen = app_with(exclude=("lr",), unset=True, help={"loss": "bce or dice."})
    assert CliRunner().invoke(app, ["--depth", "9"]).exit_code == 0
    assert seen == [("x", {"depth": 9, "batch_norm": None, "loss": None})]
    assert list(inspect.signature(app.registered_commands[0].callback).parameters) == ["out", "depth", "bn", "loss"]
    assert CliRunner().invoke(app, ["--lr", "1"]).exit_code == 2
    text = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "bce or dice. (default: bce)" in text and "Blocks per level. (default: 7)" in text


def test_a_value_outside_the_choices_names_the_option():
    app, seen = app_with()
    assert CliRunner().invoke(app, ["--loss", "dice"]).exit_code == 0 and seen[0][1]["loss"] == "dice"
    result = CliRunner().invoke(app, ["--loss", "l2"])
    assert isinstance(result.exception, GradflowError) and not seen[1:]
    assert str(result.exception) == "--loss: unknown value 'l2'; choose from bce, dice"


def _out_of_range(span) -> list[str]:
    """Values just outside a Range, and the non-numbers and non-finite numbers it must refuse."""
    from gradflow.train import INT64_MAX

    if span.kind is int:
        return [str(span.low - 1), str(span.high + 1), str(INT64_MAX + 1), "99999999999999999999", "1.5"]
    bad = [str(span.low) if span.open_low else str(span.low - 1), "nan", "inf", "-inf"]
    return bad + ([str(span.high) if span.open_high else str(span.high + 1)] if span.high is not None else [])


def _train_ranges():
    from gradflow.train import TrainConfig

    return [(f, f.metadata["range"]) for f in dataclasses.fields(TrainConfig) if "range" in f.metadata]


def test_every_numeric_setting_has_a_range_and_it_holds_its_default():
    from gradflow.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    numeric = {f.name for f in dataclasses.fields(TrainConfig)
               if {int, float} & {hints[f.name], *typing.get_args(hints[f.name])}}
    assert numeric == {f.name for f, _ in _train_ranges()}
    for field, span in _train_ranges():
        assert field.default is None or span.problem(field.default) is None, field.name


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_every_numeric_option_is_range_checked_as_it_is_parsed(command, tmp_path, run_main, monkeypatch):
    """--seed -1 and --seed 99999999999999999999 were raw tracebacks (numpy, torch) after the data was
    made; every numeric option of the config is now one `error:` line naming it, exit 2, nothing run."""
    import gradflow.sweep
    import gradflow.train
    from gradflow.cli._options import flag

    monkeypatch.setattr(gradflow.train, "train", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(gradflow.sweep, "run_sweep", lambda *a, **k: pytest.fail("swept"))
    store = tmp_path / "x.zarr"
    assert len(_train_ranges()) == 18
    for field, span in _train_ranges():
        if command == "sweep" and field.name in ("depth", "seed"):
            continue  # the grid's --depths / --seeds lists: below
        for value in _out_of_range(span):
            code, out, err = run_main(command, flag(field.name), value, "--out", store)
            assert code == 2, (field.name, value, out, err)
            assert err.startswith(f"error: ") and len(err.strip().splitlines()) == 1, (field.name, value, err)
            assert flag(field.name) in err and "Traceback" not in err, (field.name, value, err)
    assert not store.exists()


@pytest.mark.parametrize("option, values", [("--seeds", ["-1", "9223372036854775808", "99999999999999999999"]),
                                            ("--depths", ["0", "-3", "9223372036854775808"])])
def test_sweep_list_values_are_range_checked(option, values, tmp_path, run_main):
    for value in values:
        code, out, err = run_main("sweep", option, f"1,{value}", "--out", tmp_path / "s.zarr")
        assert code == 2 and err.startswith(f"error: {option}: each value must be") and value in err, err
        assert len(err.strip().splitlines()) == 1 and "variant(s)" not in out
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("option", ["--depths", "--seeds", "--long", "--optimizer"])
@pytest.mark.parametrize("value, says", [("", "empty list"), (" , ", "empty list"), ("1,,3", "empty item")])
def test_an_empty_list_option_is_refused_not_the_default_grid(option, value, says, tmp_path, run_main, monkeypatch):
    """`--depths ''` trained the whole default 12-variant grid."""
    import gradflow.sweep

    monkeypatch.setattr(gradflow.sweep, "run_sweep", lambda *a, **k: pytest.fail("swept"))
    code, out, err = run_main("sweep", option, value, "--out", tmp_path / "s.zarr")
    assert code == 2 and err.startswith(f"error: {option}: {says}") and len(err.strip().splitlines()) == 1, err
    assert "variant(s)" not in out and not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("option, value, twice", [("--depths", "3,3", "'3'"), ("--depths", "3,03", "3"),
                                                  ("--seeds", "1,2,1", "'1'"), ("--optimizer", "sgd,sgd", "'sgd'"),
                                                  ("--long", "sum,sum", "'sum'")])
def test_a_list_value_given_twice_is_refused(option, value, twice, tmp_path, run_main, monkeypatch):
    """`--depths 3,3` named two variants alike."""
    import gradflow.sweep

    monkeypatch.setattr(gradflow.sweep, "run_sweep", lambda *a, **k: pytest.fail("swept"))
    code, out, err = run_main("sweep", option, value, "--out", tmp_path / "s.zarr")
    assert code == 2 and err == f"error: {option}: {twice} is given twice; give each value once\n", err
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("args", [["bench", "durability", "--seed", "-1"],
                                  ["bench", "durability", "--seed", "99999999999999999999"],
                                  ["bench", "train", "--depth", "0"], ["bench", "train", "--levels", "63"],
                                  ["bench", "train", "--batch-size", "99999999999999999999"],
                                  ["bench", "train", "--threads", "-1"], ["bench", "recorder", "--threads", "100000"],
                                  ["bench", "store_longrun", "--steps", ""], ["bench", "store_longrun", "--steps", "10,,20"],
                                  ["bench", "store_longrun", "--layers", "0"],
                                  ["watch", "STORE", "--refresh", "inf"], ["watch", "STORE", "--refresh", "nan"],
                                  ["watch", "STORE", "--refresh", "1e308"], ["watch", "STORE", "--port", "-1"]])
def test_numeric_and_list_options_of_bench_and_watch_are_checked(args, tmp_path, run_main):
    code, out, err = run_main(*[tmp_path / "w.zarr" if a == "STORE" else a for a in args], *(
        ["--out", tmp_path / "r.md"] if args[0] == "bench" else []))
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (args, err)
    assert args[2] in err and "Traceback" not in err
    assert not (tmp_path / "r.md").exists()


@pytest.mark.parametrize("command", ["train", "sweep"])
@pytest.mark.parametrize("option, value", [("--seed", "-1"), ("--seed", "99999999999999999999"), ("--lr", "nan"),
                                           ("--dropout", "1"), ("--levels", "0"), ("--every", "0"), ("--width", "0"),
                                           ("--epochs", "99999999999999999999"), ("--weight-decay", "inf"),
                                           ("--score-passes", "-1"), ("--sparsity", "nan")])
def test_the_reported_bad_numbers_are_one_line_exit_2(command, option, value, tmp_path, run_main, monkeypatch):
    import gradflow.sweep
    import gradflow.train

    monkeypatch.setattr(gradflow.train, "train", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(gradflow.sweep, "run_sweep", lambda *a, **k: pytest.fail("swept"))
    if command == "sweep" and option == "--seed":
        option = "--seeds"
    code, out, err = run_main(command, option, value, "--depth" if command == "train" else "--depths", "1",
                              "--out", tmp_path / "x.zarr")
    assert code == 2 and err.startswith(f"error: {option}: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.zarr").exists()
