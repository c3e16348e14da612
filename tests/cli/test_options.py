"""Options generated from a config dataclass: names, switches, defaults, help and choices from the fields."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from gradflow.cli._options import check_choices, config_options
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
    check_choices(Toy, {"loss": "dice", "depth": 3})
    with pytest.raises(GradflowError, match=r"^--loss: unknown value 'l2'; choose from bce, dice$"):
        check_choices(Toy, {"loss": "l2"})
