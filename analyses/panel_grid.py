"""Where each run's heatmap panel goes: one setting across the columns, every other varying one down the rows.

A sweep of depths 3, 7, 9 × optimizers rmsprop, sgd × short skips off/on has 12 runs; laid out with
short skips as the columns and depth × optimizer as the rows, the paper's comparison (without vs with
short skips) sits side by side in every row and the two optimizers are neighbouring rows. The
settings are read from each run's recorded config (``attrs["metadata"]``, which ``gradflow sweep`` and
``gradflow train`` write), never parsed from names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import xarray as xr

from gradflow.analyses.runs import run_attrs

# Recorded per run but not a setting of the grid.
NOT_SETTINGS = ("variant", "command", "data_split", "data_source")


# How a setting reads in a row or column header.
# In this order in the headers; the key names only these shared settings (not device, amp, ...).
SETTING_NAMES = {"depth": "depth", "optimizer": "", "lr": "lr", "short_skip": "short skips", "long_skip": "long skip",
                 "batch_norm": "batch norm", "block": "block", "width": "width", "levels": "levels", "loss": "loss",
                 "init": "init", "dropout": "dropout", "weight_decay": "weight decay", "seed": "seed",
                 "epochs": "epochs", "size": "size"}


def describe(key: str, value) -> str:
    """``("short_skip", True)`` → ``"short skips on"``; ``("depth", 3)`` → ``"depth 3"``; ``("optimizer", "sgd")`` → ``"sgd"``."""
    name = SETTING_NAMES.get(key, key.replace("_", " "))
    text = ("on" if value else "off") if isinstance(value, bool) else str(value)
    return f"{name} {text}".strip()


@dataclass
class PanelLayout:
    """Where each run's panel goes and what the headers say.

    ``rows``: rows of run names (``None``: empty cell); ``row_labels`` / ``column_labels``: one header
    per row / column (``"depth 3, sgd"``, ``"short skips off"``); ``key``: one line naming what varies
    down, what varies across and the settings every run shares.
    """

    rows: list[list[str | None]]
    row_labels: list[str]
    column_labels: list[str]
    key: str


def panel_layout(data: xr.Dataset | xr.DataTree, columns: str = "short_skip") -> PanelLayout | None:
    """The grid of :func:`panel_grid` with its row and column headers and a key.

    Rows are the distinct combinations of the other settings that differ between runs, in the order
    their first run appears (runs in natural name order: depth, then optimizer). Returns ``None``
    when there is nothing to arrange: fewer than two runs, a run without a recorded config, or a
    ``columns`` setting that is the same for every run.
    """
    configs = {name: attrs.get("metadata") for name, attrs in run_attrs(data).items()}
    if len(configs) < 2 or not all(isinstance(c, dict) and columns in c for c in configs.values()):
        return None

    def value(config: dict, key: str) -> str:
        return json.dumps(config.get(key), sort_keys=True)

    order = list(SETTING_NAMES)
    keys = sorted({k for c in configs.values() for k in c} - {columns, *NOT_SETTINGS},
                  key=lambda k: (order.index(k) if k in order else len(order), k))
    varying = [k for k in keys if len({value(c, k) for c in configs.values()}) > 1]
    column_values = sorted({value(c, columns) for c in configs.values()})
    if len(column_values) < 2:
        return None
    rows: dict[tuple, list[str | None]] = {}
    for name, config in configs.items():
        row = rows.setdefault(tuple(value(config, k) for k in varying), [None] * len(column_values))
        row[column_values.index(value(config, columns))] = name
    row_labels = [", ".join(describe(k, json.loads(v)) for k, v in zip(varying, key)) or "all runs" for key in rows]
    column_labels = [describe(columns, json.loads(v)) for v in column_values]
    first = next(iter(configs.values()))
    shared = [describe(k, first.get(k)) for k in keys
              if k not in varying and k in SETTING_NAMES and isinstance(first.get(k), (bool, int, float, str))]
    down = " × ".join(SETTING_NAMES.get(k) or k for k in varying) or "nothing"
    key = (f"rows: {down}; columns: {SETTING_NAMES.get(columns) or columns}"
           + (f"; every run: {', '.join(shared)}" if shared else ""))
    return PanelLayout(list(rows.values()), row_labels, column_labels, key)


def panel_grid(data: xr.Dataset | xr.DataTree, columns: str = "short_skip") -> list[list[str | None]] | None:
    """Rows of run names (``None``: empty cell), one column per value of the ``columns`` setting
    (:func:`panel_layout` without the headers)."""
    layout = panel_layout(data, columns)
    return None if layout is None else layout.rows
