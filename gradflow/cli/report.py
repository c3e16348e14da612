"""``gradflow report STORE``: a Markdown report (the paper's for sweeps, a generic one for any Recorder
store) and, with ``--html``, one self-contained interactive HTML page."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from gradflow.cli import app


@app.command("report")
def report_command(
    store: Annotated[str, typer.Argument(help="A gradflow store: one run or a sweep (path or fsspec URL).",
                                         metavar="STORE")],
    out: Annotated[Optional[str], typer.Option(help="Output folder (default reports/<store name>/).")] = None,
    format: Annotated[str, typer.Option("--format", help="Figure formats, comma-separated: png, svg, pdf.")] = "png",
    html: Annotated[bool, typer.Option("--html", help="Also write OUT/report.html: interactive, self-contained "
                                                      "(opens offline, no server).")] = False,
) -> None:
    """Write OUT/report.md and its figures (and OUT/report.html with --html); print the paths."""
    from gradflow.analyses.report import parse_formats, write_report
    from gradflow.check import reading
    from gradflow.paths import refuse_inside_store

    refuse_inside_store(store, lambda root, inner, kind: f"give the store: gradflow report {root}",
                        writing=False, members=True)
    formats = parse_formats(format)
    with reading(store):  # a chunk that does not decode: damage, one line, as a missing one
        for path in write_report(store, out, formats, html=html):
            typer.echo(str(path))
