"""Where each run's heatmap panel goes: one setting across the columns, every other varying one down the rows.

A sweep of depths 3, 7, 9 × optimizers rmsprop, sgd × short skips off/on has 12 runs; laid out with
short skips as the columns and depth × optimizer as the rows, the paper's comparison (without vs with
short skips) sits side by side in every row and the two optimizers are neighbouring rows. The
settings are read from each run's recorded config (``attrs["metadata"]``, which ``gradflow sweep`` and
``gradflow train`` write), never parsed from names.
"""

from __future__ import annotations

import json

import xarray as xr

from analyses.runs import run_attrs

# Recorded per run but not a setting of the grid.
NOT_SETTINGS = ("variant", "command", "data_split", "data_source")


def panel_grid(data: xr.Dataset | xr.DataTree, columns: str = "short_skip") -> list[list[str | None]] | None:
    """Rows of run names (``None``: empty cell), one column per value of the ``columns`` setting.

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

    keys = sorted({k for c in configs.values() for k in c} - {columns, *NOT_SETTINGS})
    varying = [k for k in keys if len({value(c, k) for c in configs.values()}) > 1]
    column_values = sorted({value(c, columns) for c in configs.values()})
    if len(column_values) < 2:
        return None
    rows: dict[tuple, list[str | None]] = {}
    for name, config in configs.items():
        row = rows.setdefault(tuple(value(config, k) for k in varying), [None] * len(column_values))
        row[column_values.index(value(config, columns))] = name
    return list(rows.values())
