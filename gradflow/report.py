"""From a store to files: the figures of ``gradflow plot`` and the Markdown of ``gradflow report``.

Both commands open the store the same way (:func:`open_tree`: a sweep store is already a DataTree;
a single-run store becomes a tree with its step-level data at the root and ``epochs`` below), so the
analyses in ``analyses/`` see one shape of input.
"""

from __future__ import annotations

import os
from pathlib import Path

import xarray as xr
from matplotlib.figure import Figure

from gradflow.errors import GradflowError

FORMATS = ("png", "svg", "pdf")


def store_name(store: str | os.PathLike) -> str:
    """``runs/updates.zarr`` or ``s3://b/updates.zarr/`` → ``updates`` (the default report folder name)."""
    name = str(store).rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".zarr") or "store"


def open_tree(store: str | os.PathLike) -> xr.DataTree:
    """Open any gradflow store lazily as a DataTree (sweep: variants as children; single run: root),
    every group from one commit (:func:`gradflow.open_tree`)."""
    import gradflow

    return gradflow.open_tree(store)


def parse_formats(text: str) -> list[str]:
    """``"png,svg"`` → ``["png", "svg"]``, each one of :data:`FORMATS`."""
    formats = [part.strip().lower().lstrip(".") for part in text.split(",") if part.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise GradflowError(f"--format: unknown format {','.join(bad) or text!r}; choose from {', '.join(FORMATS)}")
    return formats


def make_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` (and parents); a path that exists and is not a folder is a user mistake."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise GradflowError(f"--out {out_dir} exists and is not a folder; choose another --out") from None


def save(fig: Figure, out_dir: Path, stem: str, formats: list[str]) -> list[Path]:
    """Write ``fig`` as ``out_dir/stem.<format>`` for each format; returns the paths."""
    make_out_dir(out_dir)
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        fig.savefig(path, dpi=150)
        paths.append(path)
    return paths


def figures(tree: xr.DataTree, stat: str = "update_mean_abs", per: str = "epoch") -> dict[str, Figure]:
    """``{file stem: figure}``: the heatmaps of ``stat`` per ``per``, and the loss curves when recorded.

    Heatmap panels of a sweep are laid out by :func:`analyses.panel_grid.panel_grid`: without / with
    short skips side by side, one row per other combination (depth × optimizer for the default sweep).
    """
    from analyses.curves import has_losses, loss_curves
    from analyses.heatmaps import heatmaps
    from analyses.panel_grid import panel_grid

    out = {f"heatmap-{stat}-{per}": heatmaps(tree, stat=stat, per=per, grid=panel_grid(tree))}
    if has_losses(tree):
        out["curves"] = loss_curves(tree)
    return out


def _run_settings(tree: xr.DataTree) -> str:
    """A Markdown line per run with the command that made it, when the sweep recorded one."""
    commands: dict[str, list[str]] = {}
    for node in tree.subtree:
        metadata = node.attrs.get("metadata")
        command = metadata.get("command") if isinstance(metadata, dict) else None
        if command:
            commands.setdefault(command, []).append(node.path.strip("/") or "run")
    return "\n".join(f"- `{command}` ({len(names)} run(s))" for command, names in commands.items())


def _unfinished(tree: xr.DataTree) -> list[str]:
    """Sweep variants without the ``finished`` marker (interrupted; a rerun of the sweep redoes them)."""
    out = []
    for name, node in tree.children.items():
        metadata = node.attrs.get("metadata")
        if isinstance(metadata, dict) and "variant" in metadata and not node.attrs.get("finished"):
            out.append(name)
    return sorted(out)


def _markdown(table, floatfmt: str) -> str:
    """A DataFrame as a Markdown table, missing values left blank."""
    return table.astype(object).where(table.notna(), "").to_markdown(floatfmt=floatfmt)


def write_report(store: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 formats: list[str] | None = None) -> Path:
    """Write ``out_dir/report.md`` (default ``reports/<store name>/``) with its figures; returns its path.

    Sections: how the store was made, Fig. 4-style heatmaps (mean |ΔW| per epoch, and the gradient
    norm over binned steps), Fig. 3-style loss curves, the Table 3-style best-validation table and the
    gradient-flow summary of ``analyses.flow_summary``.
    """
    from analyses.flow_summary import flow_summary
    from analyses.tables import best_val_table

    tree = open_tree(store)
    out_dir = Path(out_dir) if out_dir is not None else Path("reports") / store_name(store)
    formats = formats or ["png"]
    figs = figures(tree)
    step_runs_exist = any("step" in node.dims and "grad_norm" in node.data_vars for node in tree.subtree)
    if step_runs_exist:
        from analyses.heatmaps import heatmaps

        from analyses.panel_grid import panel_grid

        figs["heatmap-grad_norm-step"] = heatmaps(tree, stat="grad_norm", per="step", grid=panel_grid(tree))
    for stem, fig in figs.items():
        save(fig, out_dir, stem, formats)

    def image(stem: str, alt: str) -> str:
        return f"![{alt}]({stem}.{formats[0]})" if stem in figs else ""

    table = best_val_table(tree)
    summary = flow_summary(tree)
    settings = _run_settings(tree)
    unfinished = _unfinished(tree)
    lines = [
        f"# gradflow report: {store_name(store)}",
        "",
        f"Store: `{store}`. Produced by `gradflow report`; every number below is read from the store.",
        "",
        *(["Made by:", "", settings, ""] if settings else []),
        *([f"Unfinished (interrupted) variants, shown as far as they got: {', '.join(unfinished)}.", ""]
          if unfinished else []),
        "## Where the weights move (Fig. 4)",
        "",
        "Mean |W_end − W_start| of each layer over each epoch (layers in input-to-output order, one shared "
        "log colour scale across panels; grey = no update).",
        "",
        image("heatmap-update_mean_abs-epoch", "mean |ΔW| per epoch and layer"),
        "",
        *(["Gradient L2 norm per layer over binned optimizer steps:", "",
           image("heatmap-grad_norm-step", "gradient norm per step and layer"), ""] if step_runs_exist else []),
        "## Losses (Fig. 3)",
        "",
        image("curves", "training and validation loss per epoch") or "No losses were recorded.",
        "",
        "## Best validation loss (Table 3)",
        "",
        _markdown(table, ".4f"),
        "",
        "## Gradient-flow summary",
        "",
        "`updatable_depth`: layers whose mean |ΔW| per epoch is at least 0.1 × the median layer's; "
        "`centre_to_end_ratio`: mean |ΔW| of the centre layers over that of the first and last layer "
        "(≪ 1: the centre is starved); `centre_to_end_grad_ratio`: the same for the gradient norm, "
        "geometric mean over steps (adaptive optimizers such as RMSprop rescale small gradients into ordinary "
        "updates, so vanishing gradients can show here and not in |ΔW|); `nonfinite_*`: where NaN/Inf "
        "gradients appeared.",
        "",
        _markdown(summary, ".3g"),
        "",
    ]
    make_out_dir(out_dir)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
