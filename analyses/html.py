"""Interactive figures (Plotly) for ``gradflow report --html`` and ``gradflow watch``.

Why Plotly: it is one well-kept package with no server side; ``plotly.js`` is inlined once into the
page (about 4.7 MB), so the report opens offline from a file; its heatmap trace draws a
(bins × layers) grid on one canvas with built-in hover, box zoom and pan; and the same figure JSON
feeds the live view (``Plotly.react`` on a timer). Bokeh needs custom JS for per-cell hover text on
image glyphs; HoloViews/hvPlot would add Bokeh, Panel and Param for the same heatmap. The arrays come
from the same computing functions as the static figures (:func:`gradflow.analyses.heatmaps.heatmap_data`, ...),
so the HTML shows exactly the numbers of the PNGs.

Every heatmap cell's hover shows the layer name, its module type, the epoch or step range and the
value, plus the cell state (non-finite / no update / no data), which is also drawn in its own colour
on top of the colour scale, as in the static figures.
"""

from __future__ import annotations

import html as html_text
import json
import os
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from gradflow.analyses.heatmaps import LABELS, NO_DATA, NO_UPDATE, NONFINITE, STATE_COLOURS, STATE_NAMES, cell_states, heatmap_data, stat_label
from gradflow.analyses.panel_grid import panel_layout
from gradflow.analyses.runs import runs

CONFIG = {"displaylogo": False, "responsive": True, "scrollZoom": False}
HOVER = ("<b>%{x}</b> (%{customdata[0]})<br>%{customdata[1]}<br>value %{customdata[2]}%{customdata[3]}"
         "<extra>%{fullData.name}</extra>")


def _time_text(da: xr.DataArray) -> np.ndarray:
    time = da.dims[0]
    if "step_end" in da.coords:
        first, end = da[time].values, da["step_end"].values
        return np.array([f"step {a}" if b - a == 1 else f"steps {a}–{b - 1}" for a, b in zip(first, end)])
    return np.array([f"{time} {t}" for t in da[time].values])


def _panel(da: xr.DataArray, log: bool) -> tuple[go.Heatmap, go.Heatmap, np.ndarray]:
    """(colour-scale trace, state overlay trace, z) of one run's (time, layer) array."""
    values = np.asarray(da.values, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(values > 0, np.log10(values), np.nan) if log else np.where(np.isfinite(values), values, np.nan)
    states = cell_states(da)
    names = [str(n) for n in da["layer"].values]
    types = [str(t) for t in da["module_type"].values] if "module_type" in da.coords else [""] * len(names)
    time = _time_text(da)
    state_text = np.array(["", f" ({STATE_NAMES[NO_DATA]})", f" ({STATE_NAMES[NO_UPDATE]})",
                           f" ({STATE_NAMES[NONFINITE]})"], dtype=object)[states]
    value_text = np.vectorize(lambda v: f"{v:.4g}", otypes=[object])(values)
    custom = np.stack(np.broadcast_arrays(np.array(types, dtype=object)[None, :], time.astype(object)[:, None],
                                          value_text, state_text), axis=-1)
    y = da[da.dims[0]].values  # epochs, or the first step of each bin
    main = go.Heatmap(z=z, x=names, y=y, customdata=custom, hovertemplate=HOVER, coloraxis="coloraxis",
                      name=str(da.attrs.get("run", "")))
    overlay = np.where(states > 0, states, np.nan).astype(float)
    scale = [[0, STATE_COLOURS[NO_DATA]], [0.33, STATE_COLOURS[NO_DATA]], [0.34, STATE_COLOURS[NO_UPDATE]],
             [0.66, STATE_COLOURS[NO_UPDATE]], [0.67, STATE_COLOURS[NONFINITE]], [1, STATE_COLOURS[NONFINITE]]]
    marks = go.Heatmap(z=overlay, x=names, y=y, zmin=1, zmax=3, colorscale=scale, showscale=False,
                       hoverinfo="skip", name="states")
    return main, marks, z


def heatmap_figure(data: xr.Dataset | xr.DataTree, stat: str = "update_mean_abs", per: str = "epoch",
                   layers: str | list[str] = "auto", module_type: str | None = None, bins: int = 200) -> go.Figure:
    """One subplot per run (placed like the static grid), one shared colour axis (log10 of the value for
    every statistic but ``nonfinite``); trace ``name`` = run name, ``x`` = layer names, ``customdata`` =
    [module type, epoch/step text, value, state] per cell."""
    arrays = heatmap_data(data, stat=stat, per=per, layers=layers, bins=bins, module_type=module_type)
    layout = panel_layout(data) if isinstance(data, xr.DataTree) else None
    if layout is not None and {n for row in layout.rows for n in row if n} >= set(arrays):
        rows = layout.rows
        titles = [f"{layout.row_labels[r]} · {layout.column_labels[c]}" if name else ""
                  for r, row in enumerate(rows) for c, name in enumerate(row)]
    else:
        names = list(arrays)
        ncols = 1 if len(names) == 1 else 2
        rows = [names[i : i + ncols] for i in range(0, len(names), ncols)]
        titles = [name or "" for row in rows for name in row]
    ncols = max(len(r) for r in rows)
    fig = make_subplots(rows=len(rows), cols=ncols, subplot_titles=titles, vertical_spacing=min(0.3 / len(rows), 0.12),
                        horizontal_spacing=0.06)
    log = stat != "nonfinite"
    zs = []
    for r, row in enumerate(rows):
        for c, name in enumerate(row):
            if name not in arrays:
                continue
            da = arrays[name].assign_attrs(run=name)
            main, marks, z = _panel(da, log)
            zs.append(z)
            fig.add_trace(main, row=r + 1, col=c + 1)
            fig.add_trace(marks, row=r + 1, col=c + 1)
            fig.update_xaxes(showticklabels=da.sizes["layer"] <= 60, tickfont={"size": 8}, row=r + 1, col=c + 1)
            time = da.dims[0]
            fig.update_yaxes(title_text=time, row=r + 1, col=c + 1)
    finite = np.concatenate([z[np.isfinite(z)] for z in zs]) if zs else np.array([])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    colorbar = {"title": {"text": ("log₁₀ " if log else "") + LABELS.get(stat, stat)}}
    if log:
        ticks = np.arange(np.floor(lo), np.ceil(hi) + 1)
        colorbar.update(tickvals=ticks.tolist(), ticktext=[f"1e{int(t)}" for t in ticks])
    fig.update_layout(coloraxis={"colorscale": "Viridis", "cmin": lo, "cmax": hi, "colorbar": colorbar},
                      height=260 * len(rows) + 120, margin={"t": 70, "l": 60, "r": 20, "b": 40},
                      title={"text": f"{stat_label(arrays, stat, per)} (red: a NaN/Inf gradient, white: no update, "
                                     f"grey: no data)" + (f"<br><sup>{layout.key}</sup>" if layout else ""),
                             "font": {"size": 14}})
    return fig


def loss_figure(data: xr.Dataset | xr.DataTree) -> go.Figure | None:
    """Train (solid) and validation (dashed) loss per epoch, one colour per run; None without losses."""
    fig = go.Figure()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf", "#393b79", "#637939"]
    epoch_runs = runs(data, "epoch") if isinstance(data, xr.DataTree) or "epoch" in data.dims else {}
    for k, (name, ds) in enumerate(epoch_runs.items()):
        for loss, dash in (("train_loss", "solid"), ("val_loss", "dash")):
            if loss in ds and ds.sizes["epoch"] > 0:
                fig.add_trace(go.Scatter(x=ds["epoch"].values, y=ds[loss].values, name=f"{name} {loss}",
                                         line={"color": palette[k % len(palette)], "dash": dash},
                                         hovertemplate="%{fullData.name}<br>epoch %{x}<br>%{y:.4g}<extra></extra>"))
    if not fig.data:
        return None
    fig.update_layout(title="loss per epoch (solid: train, dashed: validation)", height=380,
                      xaxis={"title": "epoch", "dtick": 1 if max(ds.sizes["epoch"] for ds in epoch_runs.values()) <= 20 else None},
                      yaxis={"title": "loss"})
    return fig


def line_figure(arrays: dict[str, xr.DataArray], title: str, ylabel: str, log: bool = True) -> go.Figure | None:
    """(step, X) arrays as lines, one per column (layer or param group), named ``run: column``."""
    fig = go.Figure()
    for name, da in arrays.items():
        other = da.dims[1]
        for j, label in enumerate(da[other].values):
            y = np.asarray(da.values[:, j], dtype=float)
            fig.add_trace(go.Scatter(x=da["step"].values, y=np.where(np.isfinite(y), y, None),
                                     name=f"{name}: {label}" if len(arrays) > 1 else str(label), mode="lines",
                                     line={"width": 1},
                                     hovertemplate="%{fullData.name}<br>step %{x}<br>%{y:.4g}<extra></extra>"))
    if not fig.data:
        return None
    fig.update_layout(title=title, height=380, xaxis={"title": "step"},
                      yaxis={"title": ylabel, "type": "log" if log else "linear"})
    return fig


def figures(data: xr.Dataset | xr.DataTree, bins: int = 200) -> dict[str, go.Figure]:
    """The interactive figures of a store, by id: heatmaps (per-epoch |ΔW| when there are epochs, the
    update ratio and gradient norm per step), losses, update-ratio lines (one run) and learning rates."""
    from gradflow.analyses.diagnostics import REFERENCE_BAND, lr_data, update_ratio_data
    from gradflow.analyses.heatmaps import per_layer_variables

    out: dict[str, go.Figure] = {}
    epoch_vars = per_layer_variables(data, "epoch")
    step_vars = per_layer_variables(data, "step")
    if "update_mean_abs" in epoch_vars and _has(data, "epoch"):
        out["heatmap-update_mean_abs-epoch"] = heatmap_figure(data, "update_mean_abs", "epoch")
    for stat in ("update_ratio", "grad_norm"):
        if stat in step_vars and _has(data, "step"):
            out[f"heatmap-{stat}-step"] = heatmap_figure(data, stat, "step", layers="all", bins=bins)
    losses = loss_figure(data)
    if losses is not None:
        out["curves"] = losses
    step_runs = runs(data, "step") if isinstance(data, xr.DataTree) or "step" in data.dims else {}
    if len(step_runs) == 1 and "update_ratio" in step_vars and _has(data, "step"):
        ratio = line_figure(update_ratio_data(data, layers="all", bins=bins), "update-to-weight ratio ‖ΔW‖/‖W‖ "
                            "per layer (grey band: 1e-3 ± half a decade)", "‖ΔW‖ / ‖W‖")
        ratio.add_hrect(y0=REFERENCE_BAND[0], y1=REFERENCE_BAND[1], fillcolor="grey", opacity=0.2, line_width=0)
        out["update_ratio"] = ratio
    rates = line_figure(lr_data(data), "learning rate per step", "learning rate", log=False)
    if rates is not None:
        out["lr"] = rates
    return out


def _has(data, level: str) -> bool:
    found = runs(data, level) if isinstance(data, xr.DataTree) or level in data.dims else {}
    return any(ds.sizes[level] > 0 for ds in found.values())


def page(title: str, body: str, script: str = "") -> str:
    """A complete HTML page with plotly.js inlined (no network access needed to open it)."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html_text.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}} h1{{font-size:1.4em}}
.figure{{margin:1em 0 2em}} .status{{color:#555;font-size:.9em}} .warn{{color:#b00}}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head>
<body><h1>{html_text.escape(title)}</h1>
{body}
<script type="text/javascript">{script}</script></body></html>
"""


def figures_json(figs: dict[str, go.Figure]) -> str:
    """``{id: {"data": ..., "layout": ...}}`` as JSON, what ``Plotly.react`` takes."""
    return json.dumps({key: json.loads(fig.to_json()) for key, fig in figs.items()})


def write_html(data: xr.Dataset | xr.DataTree, path: str | os.PathLike, title: str = "gradflow report") -> Path:
    """Write one self-contained interactive page of :func:`figures` to ``path``; returns the path."""
    figs = figures(data)
    body = "\n".join(f'<div class="figure" id="{key}"></div>' for key in figs)
    script = (f"const FIGURES = {figures_json(figs)};\nconst CONFIG = {json.dumps(CONFIG)};\n"
              "for (const [id, fig] of Object.entries(FIGURES)) Plotly.newPlot(id, fig.data, fig.layout, CONFIG);")
    path = Path(path)
    path.write_text(page(title, body, script), encoding="utf-8")
    return path
