"""``gradflow bench NAME [OPTIONS]``: run one benchmark of ``gradflow/bench/`` (its options: ``--help``)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Annotated, Optional

import typer

from gradflow.cli import app


def benchmarks() -> dict[str, str]:
    """``{name: first line of its docstring}`` for every module of ``gradflow.bench``."""
    import gradflow.bench

    found = {}
    for info in pkgutil.iter_modules(gradflow.bench.__path__):
        if not info.name.startswith("_"):
            doc = importlib.import_module(f"gradflow.bench.{info.name}").__doc__ or ""
            found[info.name] = doc.strip().splitlines()[0] if doc.strip() else ""
    return found


def _wiring(name: str) -> dict:
    """What a benchmark needs from outside the library: the plot benchmark times analyses' heatmaps."""
    if name != "plot":
        return {}
    from gradflow.analyses.heatmaps import heatmaps
    from gradflow import open_tree

    return {"draw": lambda store, **options: heatmaps(open_tree(store), **options)}


@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                        "help_option_names": []})
def bench_command(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Argument(help="The benchmark; without one, the list.")] = None,
) -> None:
    """Run benchmark NAME with its own options (``gradflow bench NAME --help``); a report only with --out."""
    from gradflow.cli._progress import ProgressBars
    from gradflow.errors import GradflowError

    known = benchmarks()
    if name in (None, "--help", "-h"):
        typer.echo("Usage: gradflow bench NAME [OPTIONS]   (gradflow bench NAME --help: its options)\n")
        typer.echo("\n".join(f"  {n:12s} {line}" for n, line in known.items()))
        return
    if name not in known:
        raise GradflowError(f"unknown benchmark {name!r}; choose from {', '.join(known)}")
    main = importlib.import_module(f"gradflow.bench.{name}").main
    with ProgressBars(transient=True) as progress:
        wiring = {"progress": progress, **_wiring(name)}
        main(ctx.args, **{key: value for key, value in wiring.items() if key in inspect.signature(main).parameters})
