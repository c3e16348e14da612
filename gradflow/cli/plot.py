"""``gradflow plot STORE``: Fig. 4-style heatmaps and Fig. 3-style loss curves as image files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gradflow.cli import app


@app.command("plot")
def plot_command(
    store: Annotated[str, typer.Argument(help="A gradflow store: one run or a sweep (path or fsspec URL).")],
    stat: Annotated[str, typer.Option(help="Variable to draw: update_mean_abs, grad_norm, update_ratio, ...")] = "update_mean_abs",
    per: Annotated[str, typer.Option(help="epoch (one row per epoch) or step (binned optimizer steps).")] = "epoch",
    format: Annotated[str, typer.Option("--format", help="Comma-separated: png, svg, pdf.")] = "png",
    out: Annotated[Optional[str], typer.Option(help="Output folder (default reports/<store name>/).")] = None,
) -> None:
    """Draw the heatmaps (one panel per run, shared colour scale) and the loss curves; print the paths."""
    from gradflow.report import figures, open_tree, parse_formats, save, store_name

    formats = parse_formats(format)
    out_dir = Path(out) if out else Path("reports") / store_name(store)
    for stem, fig in figures(open_tree(store), stat=stat, per=per).items():
        for path in save(fig, out_dir, stem, formats):
            typer.echo(str(path))
