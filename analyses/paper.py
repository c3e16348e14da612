"""Our runs beside the paper's numbers (Drozdzal et al. 2016), for stores made by ``gradflow sweep --preset``.

- Fig. 4 (``fig4``): the paper shows heatmaps, not numbers; its claim is that with short skips the
  whole network updates, while without them the deep centre barely moves. Ours, per panel: the
  centre-to-end ratio of mean |ΔW| (``gradflow.analyses.flow_summary``), and the same for the gradient norm.
- Table 3 (``table3``): best validation loss, long + short 0.162 < long only 0.188 < short only 0.202.
- Table 2 (``table2``): V_rand 0.969 and V_info 0.986 on the challenge's hidden test set; ours on the
  validation images the run held out (the hidden labels are not public).
- Optimizer settings: for a store whose runs differ in RMSprop's ``rmsprop_alpha`` or in weight decay,
  one row per run with those settings beside its ratios (the README's RMSprop question).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import xarray as xr

from gradflow.analyses.flow_summary import flow_summary
from gradflow.analyses.runs import run_attrs
from gradflow.analyses.tables import best_val_table

TABLE3_VAL_LOSS = {"long + short": 0.162, "long only": 0.188, "short only": 0.202}
TABLE2_SCORES = {"v_rand": 0.969, "v_info": 0.986}
FIG4_CLAIM = {"(a)": "the whole network updates", "(b)": "the centre barely updates",
              "(c)": "the centre barely updates", "(d)": "the centre barely updates"}
SETTINGS = ["data", "short_skip", "batch_norm", "rmsprop_alpha", "weight_decay_mode", "weight_decay"]


def _metadata(attrs: dict) -> dict:
    metadata = attrs.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def preset_of(metadata: dict) -> str:
    """The preset a run came from: its ``preset`` field, else ``--preset NAME`` in its command; '' if none."""
    if metadata.get("preset"):
        return str(metadata["preset"])
    found = re.search(r"--preset[ =](\w+)", str(metadata.get("command", "")))
    return found.group(1) if found else ""


def _runs_by_preset(tree: xr.DataTree) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, attrs in run_attrs(tree).items():
        preset = preset_of(_metadata(attrs))
        if preset:
            out.setdefault(preset, []).append(name)
    return out


def _panel(attrs: dict) -> str:
    return str(_metadata(attrs).get("panel", ""))


def fig4_table(tree: xr.DataTree) -> pd.DataFrame:
    """Per fig4 run (index ``panel``): variant, centre-to-end |ΔW| ratio, that ratio over panel (a)'s,
    the gradient-norm ratio with its ``centre_zero_grad_steps``, and the paper's claim for the panel."""
    names = _runs_by_preset(tree).get("fig4", [])
    attrs = run_attrs(tree)
    summary = flow_summary(tree).loc[names] if names else flow_summary(tree).iloc[:0]
    rows = [{"panel": _panel(attrs[n]), "variant": n, "centre_to_end_ratio": summary.loc[n, "centre_to_end_ratio"],
             "centre_to_end_grad_ratio": summary.loc[n, "centre_to_end_grad_ratio"],
             "centre_zero_grad_steps": summary.loc[n, "centre_zero_grad_steps"]} for n in names]
    table = pd.DataFrame(rows, columns=["panel", "variant", "centre_to_end_ratio", "centre_to_end_grad_ratio",
                                        "centre_zero_grad_steps"])
    table = table.sort_values("panel").set_index("panel")
    first = table[table.index.str.startswith("(a)")]["centre_to_end_ratio"]
    reference = float(first.iloc[0]) if len(first) else np.nan
    table.insert(2, "ratio_over_panel_a", table["centre_to_end_ratio"] / reference)
    table["paper_fig4"] = [FIG4_CLAIM.get(str(p)[:3], "") for p in table.index]
    return table


def table3_table(tree: xr.DataTree) -> pd.DataFrame:
    """Per table3 run (index ``panel``): best validation loss, training loss then, best epoch, the
    paper's validation loss, and both rankings (1 = lowest loss)."""
    names = _runs_by_preset(tree).get("table3", [])
    attrs = run_attrs(tree)
    best = best_val_table(tree)
    rows = [{"panel": _panel(attrs[n]), "variant": n, "best_val_loss": best.loc[n, "best_val_loss"],
             "train_loss_at_best": best.loc[n, "train_loss_at_best"], "best_epoch": best.loc[n, "best_epoch"],
             "paper_val_loss": TABLE3_VAL_LOSS.get(_panel(attrs[n]), np.nan)} for n in names]
    table = pd.DataFrame(rows, columns=["panel", "variant", "best_val_loss", "train_loss_at_best", "best_epoch",
                                        "paper_val_loss"]).set_index("panel")
    order = {panel: i for i, panel in enumerate(TABLE3_VAL_LOSS)}  # rows in the paper's order
    table = table.iloc[sorted(range(len(table)), key=lambda i: order.get(table.index[i], len(order)))]
    table["our_rank"] = table["best_val_loss"].rank(method="min").astype("Int64")
    table["paper_rank"] = table["paper_val_loss"].rank(method="min").astype("Int64")
    return table


def table2_table(tree: xr.DataTree) -> pd.DataFrame:
    """Per table2 run (index ``variant``): V_rand, V_info, pixel error on the validation images with the
    number of dropout passes, and the paper's test-set V_rand / V_info."""
    names = _runs_by_preset(tree).get("table2", [])
    rows = []
    for n in names:
        group = tree[n].attrs
        rows.append({"variant": n, "images": "validation (held out)", "v_rand": group.get("v_rand", np.nan),
                     "v_info": group.get("v_info", np.nan), "pixel_error": group.get("pixel_error", np.nan),
                     "dropout_passes": group.get("score_passes", np.nan)})
    if rows:
        rows.append({"variant": "paper (Table 2)", "images": "ISBI hidden test set", **TABLE2_SCORES,
                     "pixel_error": np.nan, "dropout_passes": np.nan})
    return pd.DataFrame(rows, columns=["variant", "images", "v_rand", "v_info", "pixel_error",
                                       "dropout_passes"]).set_index("variant")


def settings_table(tree: xr.DataTree) -> pd.DataFrame:
    """One row per run (index ``run``): data, short skips, BN, RMSprop alpha, weight-decay mode and value,
    centre-to-end |ΔW| and gradient ratios, best validation loss. Empty unless the runs differ in
    ``rmsprop_alpha``, ``weight_decay_mode`` or ``weight_decay``."""
    attrs = run_attrs(tree)
    metadata = {n: _metadata(a) for n, a in attrs.items()}
    varied = {key for key in ("rmsprop_alpha", "weight_decay_mode", "weight_decay")
              if len({str(m.get(key)) for m in metadata.values()}) > 1}
    if not varied:
        return pd.DataFrame(columns=["run", *SETTINGS]).set_index("run")
    summary, best = flow_summary(tree), best_val_table(tree)
    rows = []
    for n, m in metadata.items():
        row = {"run": n, **{key: m.get(key) for key in SETTINGS}}
        row["data"] = "synthetic" if m.get("data") == "synthetic" else "ISBI 2012"
        row["centre_to_end_ratio"] = summary.loc[n, "centre_to_end_ratio"] if n in summary.index else np.nan
        row["centre_to_end_grad_ratio"] = summary.loc[n, "centre_to_end_grad_ratio"] if n in summary.index else np.nan
        row["best_val_loss"] = best.loc[n, "best_val_loss"] if n in best.index else np.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


def run_conditions(tree: xr.DataTree) -> pd.DataFrame:
    """Per run (index ``run``): device, training wall time in seconds (as the sweep recorded it) and
    the reduced settings that a CPU run changes (size, crop, crops per image, width, epochs)."""
    rows = []
    for n, attrs in run_attrs(tree).items():
        m = _metadata(attrs)
        rows.append({"run": n, "device": m.get("device_name", m.get("device", "")),
                     "train_seconds": tree[n].attrs.get("train_seconds", np.nan), "size": m.get("size"),
                     "crop": m.get("crop"), "crops_per_image": m.get("crops_per_image"), "width": m.get("width"),
                     "levels": m.get("levels") if m.get("arch") != "table1" else 5, "epochs": m.get("epochs")})
    return pd.DataFrame(rows).set_index("run")


def paper_section(tree: xr.DataTree, markdown) -> list[str]:
    """Markdown lines comparing the store's preset runs with the paper (none for other stores);
    ``markdown(table, floatfmt)`` renders a DataFrame."""
    presets = _runs_by_preset(tree)
    lines: list[str] = []
    if "fig4" in presets:
        lines += ["## Fig. 4 beside the paper", "",
                  "The paper shows Fig. 4 as heatmaps, without numbers; its claim per panel is in `paper_fig4`. "
                  "Ours: `centre_to_end_ratio` = mean |ΔW| per epoch of the centre layers over that of the first "
                  "and last layer, averaged over epochs (≪ 1: the centre is starved); `ratio_over_panel_a` "
                  "compares each panel with the long + short net; `centre_to_end_grad_ratio`: the same for the "
                  "gradient norm, geometric mean over steps, 0 when a centre layer's gradient norm was exactly 0 "
                  "at any step (`centre_zero_grad_steps` of them).", "", markdown(fig4_table(tree), ".3g"), ""]
    if "table3" in presets:
        table = table3_table(tree)
        ours = " < ".join(table.sort_values("best_val_loss").index)
        paper = " < ".join(table.sort_values("paper_val_loss").index)
        lines += ["## Table 3 beside the paper", "", markdown(table, ".4f"), "",
                  f"Ordering by validation loss, ours: {ours}; the paper's: {paper} "
                  f"({'the same' if ours == paper else 'different'}).", ""]
    if "table2" in presets:
        lines += ["## Table 2 beside the paper", "",
                  "The paper's V_rand / V_info are on the challenge's hidden test set; ours on the validation "
                  "images this run held out (scored as the challenge does, after border thinning), with "
                  "test-time dropout averaging over `dropout_passes` passes.", "",
                  markdown(table2_table(tree), ".4f"), ""]
    settings = settings_table(tree)
    if len(settings):
        lines += ["## Optimizer settings", "",
                  "`rmsprop_alpha`: RMSprop's running-average factor (torch 0.99, Keras 1.x 0.9); "
                  "`weight_decay_mode`: torch (wd·w added to every gradient), l2 (Keras l2 regularizer on conv "
                  "kernels: 2·wd·W in the gradient), decoupled (kernels × (1 − lr·wd) after each step).", "",
                  markdown(settings, ".3g"), ""]
    if lines:
        lines += ["## Run conditions", "", markdown(run_conditions(tree), ".0f"), ""]
    return lines
