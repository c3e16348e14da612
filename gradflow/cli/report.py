"""``gradflow report STORE``: a Markdown report with the figures, Table 3 and a gradient-flow summary."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from gradflow.cli import app


@app.command("report")
def report_command(
    store: Annotated[str, typer.Argument(help="A gradflow store: one run or a sweep (path or fsspec URL).")],
    out: Annotated[Optional[str], typer.Option(help="Output folder (default reports/<store name>/).")] = None,
    format: Annotated[str, typer.Option("--format", help="Figure formats, comma-separated: png, svg, pdf.")] = "png",
) -> None:
    """Write OUT/report.md and its figures; print the report's path."""
    from gradflow.report import parse_formats, write_report

    typer.echo(str(write_report(store, out, parse_formats(format))))
