"""The ``gradflow`` command line: one file per command, all registered on one typer app.

User mistakes (``GradflowError``) become one line on stderr and exit code 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="gradflow",
    help="Gradient-flow analysis for PyTorch: record, sweep, plot, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    """Import the command modules; each one adds its command(s) to ``app``."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def main() -> None:
    """Console entry point: typer handles usage errors (exit 2); we handle GradflowError the same way."""
    from gradflow.errors import GradflowError

    _register()
    try:
        app()
    except GradflowError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
