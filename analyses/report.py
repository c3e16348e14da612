"""From a store to files: the figures of ``gradflow plot`` and the report of ``gradflow report``.

A store made by ``gradflow sweep`` gets the paper's report (Fig. 4 heatmaps, Fig. 3 curves, Table 3,
the gradient-flow summary); any other Recorder store gets a generic report: what was recorded, where
the updates go, non-finite events with layer and step, the largest and smallest update ratios, the
update-ratio curves, the gradient-flow bars and the learning rate per step.

Both commands open the store the same way (:func:`open_tree`: a sweep store is already a DataTree;
a single-run store becomes a tree with its step-level data at the root and ``epochs`` below), so the
analyses in ``analyses/`` see one shape of input.
"""

from __future__ import annotations

import os
from pathlib import Path

import xarray as xr
from matplotlib.figure import Figure

import gradflow

from gradflow.errors import GradflowError

FORMATS = ("png", "svg", "pdf")
EPOCH_ROWS = 30  # rows of the generic report's per-epoch table (the last ones)
# What `skipped` means (README, "Recording"): the store keeps the signal, not who gave it.
SKIPPED = "a real skip signal: GradScaler found Inf/NaN, or the loop's guard called `skip_step()`"
# Why a run may have no update figure to summarise: NaN there is "not recorded", not a NaN update.
NO_UPDATES = ("its update figures are NaN where nothing was recorded (a run with `snapshot=False`) "
              "or 0 where no weight moved")


def store_name(store: str | os.PathLike) -> str:
    """``runs/updates.zarr`` or ``s3://b/updates.zarr/`` → ``updates`` (the default report folder
    name); a sweep's run group ``updates.zarr/v2`` → ``updates/v2`` (two stores' ``v2`` apart)."""
    from gradflow.paths import sweep_member

    try:
        member = sweep_member(os.fspath(store))
    except GradflowError:  # a URL whose filesystem is not installed: named by its text alone
        member = None
    name = str(member[0] if member else store).rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr") or "store"
    return f"{name}/{member[1]}" if member else name


SOURCE_FILE = ".gradflow-source"  # in a default report folder: the store it was drawn from


def default_out_dir(store: str | os.PathLike, name: str | None = None) -> Path:
    """``reports/<store name>/`` (``name``, default :func:`store_name`), made and claimed for ``store``: its full path
    (a URL as given) is written into :data:`SOURCE_FILE` there, and a folder that names another
    store is refused, so that two stores of one name (``a/run.zarr``, ``b/run.zarr``) never draw over
    each other's figures. Raises :class:`~gradflow.errors.GradflowError` (one line)."""
    name = name or store_name(store)
    out_dir = Path("reports") / name
    text = os.fspath(store).rstrip("/")
    source = text if "://" in text else os.path.abspath(text)
    claim = out_dir / SOURCE_FILE
    try:
        other = claim.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        other = None
    except (OSError, UnicodeDecodeError):
        other = ""
    if other is not None and other != source:
        raise GradflowError(f"{out_dir} holds the report of {other or 'another store'}; give "
                            f"--out DIR to draw {text} (two stores named {name!r})")
    make_out_dir(out_dir)
    if other is None:
        try:
            claim.write_text(source + "\n")
        except OSError as err:
            raise GradflowError(f"--out {out_dir}: cannot write into it ({err.strerror or err}); "
                                f"choose another --out") from None
    return out_dir


def open_tree(store: str | os.PathLike) -> xr.DataTree:
    """Open any gradflow store lazily as a DataTree (sweep: variants as children; single run: root),
    every group from one commit (:func:`gradflow.open_tree`). A run group's folder inside a sweep
    (``sweep.zarr/v1``) is that run, read through the sweep store's commit."""
    from gradflow.paths import sweep_member

    member = sweep_member(os.fspath(store))
    if member is not None:
        return gradflow.open_tree(member[0], group=member[1])  # that run only, as its own root
    return gradflow.open_tree(store)


def parse_formats(text: str) -> list[str]:
    """``"png,svg"`` → ``["png", "svg"]``, each one of :data:`FORMATS`."""
    formats = [part.strip().lower().lstrip(".") for part in text.split(",") if part.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise GradflowError(f"--format: unknown format {','.join(bad) or text!r}; choose from {', '.join(FORMATS)}")
    return formats


def make_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` (and parents). Raises GradflowError (a user mistake, one line) when it or a
    parent is a file, or when it cannot be created or written (no permission, read-only disk)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise GradflowError(f"--out {out_dir}: it or a parent exists and is not a folder; choose another "
                            f"--out") from None
    except OSError as err:
        raise GradflowError(f"--out {out_dir}: cannot create it ({err.strerror or err}); choose another "
                            f"--out") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise GradflowError(f"--out {out_dir}: no permission to write into it; choose another --out")


def save(fig: Figure, out_dir: Path, stem: str, formats: list[str]) -> list[Path]:
    """Write ``fig`` as ``out_dir/stem.<format>`` for each format; returns the paths."""
    make_out_dir(out_dir)
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        fig.savefig(path, dpi=150)
        paths.append(path)
    return paths


def is_sweep(tree: xr.DataTree) -> bool:
    """Whether the store was made by ``gradflow sweep`` (its runs carry a ``variant`` in their metadata)."""
    return any(isinstance(node.attrs.get("metadata"), dict) and "variant" in node.attrs["metadata"]
               for node in tree.subtree)


def has_steps(tree: xr.DataTree, name: str = "grad_norm") -> bool:
    return any("step" in node.dims and name in node.data_vars and node.sizes["step"] > 0 for node in tree.subtree)


def figures(tree: xr.DataTree, stat: str = "update_mean_abs", per: str = "epoch", layers: str = "auto",
            module_type: str | None = None) -> dict[str, Figure]:
    """``{file stem: figure}``: the heatmaps of ``stat`` per ``per``, and the loss curves when recorded.

    Heatmap panels of a sweep are laid out by :func:`gradflow.analyses.panel_grid.panel_layout`: without / with
    short skips side by side, one row per other combination (depth × optimizer for the default sweep),
    with row and column headers and a key.
    """
    from gradflow.analyses.curves import has_losses, loss_curves
    from gradflow.analyses.heatmaps import check_stat, heatmaps
    from gradflow.analyses.panel_grid import panel_layout

    check_stat(tree, stat, per)
    layout = panel_layout(tree)
    out = {f"heatmap-{stat}-{per}": heatmaps(tree, stat=stat, per=per, grid=layout, layers=layers,
                                             module_type=module_type)}
    if has_losses(tree):
        out["curves"] = loss_curves(tree, grid=layout)
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
    """A DataFrame as a Markdown table, missing values left blank; a ``|`` in a name or a cell (a
    logged scalar ``acc|top1``, a run's name) is escaped, not a column separator."""
    def escape(value):
        return value.replace("|", "\\|") if isinstance(value, str) else value

    table = table.astype(object).where(table.notna(), "").map(escape)
    table = table.rename(index=escape, columns=escape).rename_axis(
        [escape(name) for name in table.index.names])
    return table.to_markdown(floatfmt=floatfmt)


def write_report(store: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 formats: list[str] | None = None, html: bool = False) -> list[Path]:
    """Write ``out_dir/report.md`` (default ``reports/<store name>/``) with its figures, and with
    ``html`` also ``out_dir/report.html`` (:func:`gradflow.analyses.html.write_html`); returns the paths written
    (report.md first). A sweep store gets the paper's sections, any other store the generic ones."""
    tree, name = open_tree(store), store_name(store)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(store, name)
    formats = formats or ["png"]
    make_out_dir(out_dir)
    write = _sweep_report if is_sweep(tree) else _run_report
    lines = write(tree, store, name, out_dir, formats)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    paths = [path]
    if html:
        from gradflow.analyses.html import write_html

        paths.append(write_html(tree, out_dir / "report.html", title=f"gradflow report: {name}"))
    return paths


def _save_all(figs: dict[str, Figure], out_dir: Path, formats: list[str]) -> None:
    for stem, fig in figs.items():
        save(fig, out_dir, stem, formats)


def _image(figs: dict, stem: str, alt: str, formats: list[str]) -> str:
    return f"![{alt}]({stem}.{formats[0]})" if stem in figs else ""


def _sweep_report(tree: xr.DataTree, store, title: str, out_dir: Path, formats: list[str]) -> list[str]:
    from gradflow.analyses.curves import loss_name
    from gradflow.analyses.flow_summary import flow_summary
    from gradflow.analyses.heatmaps import heatmaps
    from gradflow.analyses.panel_grid import panel_layout
    from gradflow.analyses.paper import paper_section
    from gradflow.analyses.tables import best_val_table

    figs = figures(tree)
    if has_steps(tree):
        figs["heatmap-grad_norm-step"] = heatmaps(tree, stat="grad_norm", per="step", grid=panel_layout(tree))
    _save_all(figs, out_dir, formats)

    def image(stem: str, alt: str) -> str:
        return _image(figs, stem, alt, formats)

    settings = _run_settings(tree)
    unfinished = _unfinished(tree)
    return [
        f"# gradflow report: {title}",
        "",
        f"Store: `{store}`. Produced by `gradflow report`; every number below is read from the store.",
        "",
        *(["Made by:", "", settings, ""] if settings else []),
        *([f"Unfinished (interrupted) variants, shown as far as they got: {', '.join(unfinished)}.", ""]
          if unfinished else []),
        "## Where the weights move (Fig. 4)",
        "",
        "Mean |W_end − W_start| of each layer over each epoch (layers in input-to-output order, named on the axis "
        "or grouped by module prefix; one shared log colour scale across panels). Own colours, never averaged into "
        "the scale: red = a NaN/Inf gradient at some step of the cell, white = no update (exactly 0), "
        "light grey = no data (such as the |ΔW| of an epoch a crash cut short).",
        "",
        image("heatmap-update_mean_abs-epoch", "mean |ΔW| per epoch and layer"),
        "",
        *(["Gradient L2 norm per layer over binned optimizer steps:", "",
           image("heatmap-grad_norm-step", "gradient norm per step and layer"), ""] if has_steps(tree) else []),
        "## Losses (Fig. 3)",
        "",
        *([f"{loss_name(tree)[0].upper()}{loss_name(tree)[1:]}.", ""] if "curves" in figs else []),
        image("curves", "training and validation loss per epoch") or "No losses were recorded.",
        "",
        "## Best validation loss (Table 3)",
        "",
        f"{loss_name(tree)[0].upper()}{loss_name(tree)[1:]}. `lr_at_best`: the learning rate the optimizer used "
        "at the last step of the best epoch (the store's per-step `lr`); any other `*_at_best`: a scalar the "
        "training loop logged per epoch (`end_epoch`), at the best epoch.",
        "",
        _markdown(best_val_table(tree), ".4f"),
        "",
        "## Gradient-flow summary",
        "",
        "`centre_to_end_ratio`: mean |ΔW| of the centre layers over that of the first and last layer "
        "(≪ 1: the centre is starved); `centre_to_end_grad_ratio`: the same for the gradient norm, "
        "geometric mean over steps (adaptive optimizers such as RMSprop rescale small gradients into ordinary "
        "updates, so vanishing gradients can show here and not in |ΔW|); a step with an exactly-zero gradient "
        "norm in a centre layer makes that layer's geometric mean 0, and so the ratio 0 or near it: "
        "`centre_zero_grad_steps` counts those steps (0 ratio with a count > 0: some step's centre gradient "
        "was exactly 0, not a gradient that faded); `nonfinite_*`: where NaN/Inf gradients appeared.",
        "",
        _markdown(flow_summary(tree), ".3g"),
        "",
        *paper_section(tree, _markdown),  # presets only: the paper's numbers beside ours
    ]


def _run_report(tree: xr.DataTree, store, title: str, out_dir: Path, formats: list[str]) -> list[str]:
    """The generic report of any Recorder store (one run at the root, or several non-sweep groups)."""
    from gradflow.analyses.curves import has_losses, loss_curves, loss_name
    from gradflow.analyses.diagnostics import gradient_bars, lr_curves, lr_data, update_ratio_curves
    from gradflow.analyses.heatmaps import heatmaps
    from gradflow.analyses.run_summary import nonfinite_events, update_ratio_extremes, update_shares
    from gradflow.analyses.runs import optimizer_of, run_attrs, runs
    from gradflow.analyses.tables import epoch_scalars

    step_runs, epoch_runs = runs(tree, "step"), runs(tree, "epoch")
    figs: dict[str, Figure] = {}
    if has_steps(tree, "update_ratio"):
        figs["heatmap-update_ratio-step"] = heatmaps(tree, stat="update_ratio", per="step", layers="all")
        figs["update_ratio"] = update_ratio_curves(tree, layers="all")
    if has_steps(tree):
        figs["heatmap-grad_norm-step"] = heatmaps(tree, stat="grad_norm", per="step", layers="all")
        figs["gradient_bars"] = gradient_bars(tree, layers="all")
    if lr_data(tree):
        figs["lr"] = lr_curves(tree)
    if has_losses(tree):
        figs["curves"] = loss_curves(tree)
    _save_all(figs, out_dir, formats)

    def image(stem: str, alt: str) -> list[str]:
        return [_image(figs, stem, alt, formats), ""] if stem in figs else []

    attrs = run_attrs(tree)
    lines = [f"# gradflow report: {title}", "",
             f"Store: `{store}`. Produced by `gradflow report`; every number below is read from the store.", ""]
    for name, st in step_runs.items():
        a = attrs.get(name, {})
        types = st["module_type"].to_series().value_counts() if "module_type" in st.coords else None
        optimizer, _ = optimizer_of(a)
        steps = st["step"].values
        span = f"steps {steps[0]}–{steps[-1]}" if len(steps) else "no step yet"
        ep = epoch_runs.get(name)
        epochs = max(int(st["epoch"].values.max()) + 1 if len(steps) and "epoch" in st.coords else 0,
                     ep.sizes["epoch"] if ep is not None else 0)  # epochs may come before any step
        lines += [f"## Run `{name}`" if len(step_runs) > 1 else "## What was recorded", "",
                  f"- model `{a.get('model_class', '?')}`, optimizer {optimizer or '?'}; {st.sizes['layer']} layers"
                  + (f" ({', '.join(f'{n} {t}' for t, n in types.items())})" if types is not None else ""),
                  f"- {len(steps)} recorded steps ({span}, every {a.get('every', 1)}), {epochs} epoch(s)"
                  + (f", {int(st['skipped'].values.sum())} skipped ({SKIPPED})" if "skipped" in st.coords else ""),
                  ""]
        logged = [] if ep is None else [n for n in ("train_loss", "val_loss") if n in ep] + epoch_scalars(ep)
        if logged and ep.sizes["epoch"]:
            table = ep[logged].to_dataframe()[logged]
            lines += ["### Per epoch", "",
                      "What the loop logged at each epoch's end (`end_epoch`)"
                      + (f", the last {EPOCH_ROWS} of {len(table)} epochs:" if len(table) > EPOCH_ROWS else ":"),
                      "", _markdown(table.tail(EPOCH_ROWS), ".4g"), ""]
        if len(steps) == 0:
            continue
        shares, extremes = update_shares(st), update_ratio_extremes(st)
        lines += ["### Where the updates go", ""]
        if shares["share"].notna().any():
            lines += ["Share of Σ‖ΔW‖² (over steps and layers) per module-prefix group, against its share of the "
                      "parameters:", "", _markdown(shares, ".3g"), ""]
        else:
            lines += [f"No finite, non-zero ‖ΔW‖ in the store: {NO_UPDATES}.", ""]
        events, total = nonfinite_events(st)
        lines += ["### Non-finite gradients", ""]
        if total:
            lines += [f"{total} (step, layer) cell(s) had NaN/Inf gradient values"
                      + (f"; the first {len(events)}:" if total > len(events) else ":"), "",
                      _markdown(events.set_index("step"), ".3g"), ""]
        else:
            lines += ["None: every recorded gradient value was finite.", ""]
        lines += ["### Largest and smallest update ratios", ""]
        if len(extremes):
            lines += ["Typical ‖ΔW‖ / ‖W‖ per step (geometric mean over steps; the common reference is ~1e-3):", "",
                      _markdown(extremes, ".3g"), ""]
        else:
            lines += [f"No finite, non-zero ‖ΔW‖ / ‖W‖ in the store: {NO_UPDATES}.", ""]
    lines += ["## Figures", "",
              "Update-to-weight ratio and gradient norm per layer over binned steps (red: a NaN/Inf gradient at some "
              "step of the cell; white: no update; light grey: no data, such as the update figures of a run "
              "recorded with `snapshot=False`):", "",
              *image("heatmap-update_ratio-step", "update ratio per step and layer"),
              *image("heatmap-grad_norm-step", "gradient norm per step and layer"),
              *image("update_ratio", "update-to-weight ratio per layer over steps"),
              *image("gradient_bars", "gradient per layer at the last step"),
              *image("lr", "learning rate per step")]
    if "curves" in figs:
        named = loss_name(tree)
        lines += [f"Losses ({named}):" if named != "loss" else "Losses:", "", *image("curves", "loss per epoch")]
    return lines
