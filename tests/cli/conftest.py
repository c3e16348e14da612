"""Tiny sweeps for the CLI tests: 32² synthetic images, 2 levels, width 4, 1 epoch, 4 train images, RMSprop only."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

import gradflow.cli

TINY = ["--size", "32", "--levels", "2", "--width", "4", "--epochs", "1", "--n-train", "4", "--n-val", "2",
        "--batch-size", "2", "--device", "cpu", "--optimizer", "rmsprop"]
VARIANTS = ["simple-d1-bn0-long_sum-short0", "simple-d1-bn0-long_sum-short1"]


def invoke(*args: str):
    """Run a command in-process the way typer's test runner does (no GradflowError handling)."""
    gradflow.cli._register()
    return CliRunner().invoke(gradflow.cli.app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def tiny() -> list[str]:
    """Options for a seconds-long sweep (add --depths and --out)."""
    return list(TINY)


@pytest.fixture
def variants() -> list[str]:
    """Group names of ``--depths 1 --no-bn`` (with and without short skips)."""
    return list(VARIANTS)


@pytest.fixture
def cli():
    return invoke


@pytest.fixture
def run_main(monkeypatch, capsys):
    """Run the console entry point ``gradflow.cli.main`` with argv; return (exit code, stdout, stderr)."""

    def run(*args: str):
        monkeypatch.setattr(sys, "argv", ["gradflow", *[str(a) for a in args]])
        with pytest.raises(SystemExit) as exit_info:
            gradflow.cli.main()
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return run


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
    """A finished two-variant sweep store (depth 1, no BN, with and without short skips)."""
    store = tmp_path_factory.mktemp("sweep") / "tiny.zarr"
    args = ["sweep", "--depths", "1", "--no-bn", *TINY, "--out", str(store)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["/venv/bin/gradflow", *args])  # what the console script would see
        result = invoke(*args)
    assert result.exit_code == 0, result.output
    return store
