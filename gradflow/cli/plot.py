"""``gradflow plot STORE``: heatmaps (any model; Fig. 4 style for sweeps) and loss curves as image files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gradflow.cli import app

STORE_HELP = "A gradflow store: one run or a sweep (path or fsspec URL)."
LAYERS_HELP = "Layers to draw: comma-separated globs on the layer name, e.g. 'layer3.*,fc' (default: all; for FCNs the convs)."
MODULE_TYPE_HELP = "Only layers of these module classes, comma-separated, e.g. Linear or Conv2d,Linear."


@app.command("plot")
def plot_command(
    store: Annotated[str, typer.Argument(help=STORE_HELP, metavar="STORE")],
    stat: Annotated[str, typer.Option(help="Per-layer variable to draw: update_mean_abs, grad_norm, update_ratio, ...")] = "update_mean_abs",
    per: Annotated[str, typer.Option(help="epoch (one row per epoch) or step (binned optimizer steps).")] = "epoch",
    layers: Annotated[str, typer.Option(help=LAYERS_HELP)] = "auto",
    module_type: Annotated[Optional[str], typer.Option(help=MODULE_TYPE_HELP)] = None,
    format: Annotated[str, typer.Option("--format", help="Comma-separated: png, svg, pdf.")] = "png",
    out: Annotated[Optional[str], typer.Option(help="Output folder (default reports/<store name>/).")] = None,
) -> None:
    """Draw the heatmaps (one panel per run, shared colour scale) and the loss curves; print the paths."""
    from gradflow.analyses.heatmaps import PER
    from gradflow.analyses.report import default_out_dir, figures, open_tree, parse_formats, save
    from gradflow.check import reading
    from gradflow.errors import GradflowError
    from gradflow.paths import refuse_inside_store

    refuse_inside_store(store, lambda root, inner, kind: f"give the store: gradflow plot {root} (it "
                        f"draws every run of it)", writing=False, members=True)
    formats = parse_formats(format)
    if per not in PER:
        raise GradflowError(f"--per must be one of {', '.join(PER)}, got {per!r}")
    with reading(store):  # a chunk that does not decode: damage, one line, as a missing one
        drawn = figures(open_tree(store), stat=stat, per=per, layers=layers, module_type=module_type)
    out_dir = Path(out) if out else default_out_dir(store)
    for stem, fig in drawn.items():
        for path in save(fig, out_dir, stem, formats):
            typer.echo(str(path))
