"""A multi-resolution summary of a run's step statistics, kept while recording, so that long runs plot fast.

A 10⁶-step × 1,000-layer run holds 8·10⁹ step statistics; a per-step heatmap needs a few hundred rows.
Next to the raw rows the store keeps, for each block of ``b`` recorded rows (``b`` in :data:`LEVELS`)
and each statistic and layer, four statistics (:data:`STATS`)::

    summary/                      attrs: gradflow_kind="summary", rows (rows summarised so far)
        256/, 4096/               one group per block size b (rows per block)
            grad_norm … nonfinite (block, stat, layer) float32, stat = mean, min, max, nonfinite
            first_step, last_step (block,) int64: step index of the block's first and last row
            stat, layer           (stat,), (layer,) str: labels (the other layer coordinates are
                                  the run's)

``mean``, ``min`` and ``max`` are over the block's finite values (NaN when it has none); ``nonfinite``
counts its NaN and ±Inf values, so a NaN in a block stays visible. Only complete blocks are stored:
the summary is written when a span of :data:`SPAN` rows is complete (one chunk per level and statistic,
never rewritten), so it trails the raw rows by less than ``SPAN`` rows; :func:`read_steps` summarises
that tail from the raw rows. A group opens with plain xarray::

    xr.open_zarr("run.zarr", group="summary/4096")["grad_norm"].sel(stat="max")

The summary is derived data: a Recorder reopening a store trusts the ``rows`` attribute (updated after
the chunks it counts are written, and capped at the committed raw rows) and recomputes the rest from
the raw rows, so a crash never leaves a wrong summary behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import xarray as xr
import zarr

from gradflow.check import every_chunk_stored
from gradflow.paths import store_url

# Rows per block, one group each. Two levels 16× apart: ``bins`` bins need at most 16·bins blocks.
# Every summary array costs each commit (which re-reads all metadata) some time, so they are few.
LEVELS = (256, 4096)
SPAN = 8192  # rows per written chunk of every level (a multiple of every level)
STATS = ("mean", "min", "max", "nonfinite")
LAYER_COORDS = ("layer", "depth", "module_type", "num_params")
STAT_DESCRIPTIONS = {
    "mean": "mean of the block's finite values (NaN if none)",
    "min": "smallest finite value in the block (NaN if none)",
    "max": "largest finite value in the block (NaN if none)",
    "nonfinite": "number of NaN or ±Inf values in the block",
}


@dataclass
class Blocks:
    """Reductions of statistics over consecutive row segments: arrays ``(segments, variables, layers)``.

    ``sum`` and ``count`` are over finite values (float64, int64); ``low``/``high`` are their min/max
    (±inf where a segment has no finite value); ``nonfinite`` counts NaN and ±Inf values.
    """

    sum: np.ndarray
    count: np.ndarray
    low: np.ndarray
    high: np.ndarray
    nonfinite: np.ndarray
    first_step: np.ndarray  # (segments,) int64
    last_step: np.ndarray
    rows: np.ndarray  # (segments,) int64: rows per segment

    @classmethod
    def of(cls, columns: list[np.ndarray], steps: np.ndarray, starts: np.ndarray) -> Blocks:
        """Reduce each ``(rows, layers)`` array of ``columns`` over the row segments beginning at
        ``starts`` (increasing, first 0): arrays ``(segments, len(columns), layers)``."""
        ends = np.r_[starts[1:], len(steps)]
        parts = [[_reduce(column[a:b]) for column in columns] for a, b in zip(starts, ends)]
        sums, counts, low, high = (np.array([[p[i] for p in segment] for segment in parts])
                                   for i in range(4))
        rows = (ends - starts).astype(np.int64)
        steps = np.asarray(steps)
        return cls(sums, counts, low, high, rows[:, None, None] - counts,
                   steps[starts].astype(np.int64), steps[ends - 1].astype(np.int64), rows)

    @classmethod
    def concat(cls, parts: list[Blocks]) -> Blocks:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))

    def merge(self, starts: np.ndarray) -> Blocks:
        """Combine consecutive segments into groups beginning at ``starts`` (exact: sums and counts)."""
        ends = np.r_[starts[1:], len(self.rows)]
        return Blocks(np.add.reduceat(self.sum, starts, axis=0),
                      np.add.reduceat(self.count, starts, axis=0),
                      np.minimum.reduceat(self.low, starts, axis=0),
                      np.maximum.reduceat(self.high, starts, axis=0),
                      np.add.reduceat(self.nonfinite, starts, axis=0),
                      self.first_step[starts], self.last_step[ends - 1],
                      np.add.reduceat(self.rows, starts))

    def stats(self) -> np.ndarray:
        """``(segments, 4, …)`` float64: mean, min, max over finite values (NaN if none), nonfinite."""
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self.count > 0, self.sum / np.maximum(self.count, 1), np.nan)
        none = self.count == 0
        return np.stack([mean, np.where(none, np.nan, self.low), np.where(none, np.nan, self.high),
                         self.nonfinite.astype(np.float64)], axis=1)


def _reduce(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sum, count, min, max) over the finite values of ``x (rows, layers)`` per layer (±inf if none)."""
    total = x.sum(0, dtype=np.float64)  # finite iff every value is (no float32 sum overflows float64)
    if np.isfinite(total).all():
        return total, np.full(total.shape, len(x), np.int64), x.min(0), x.max(0)
    finite = np.isfinite(x)
    return (np.where(finite, x, 0).sum(0, dtype=np.float64), finite.sum(0, dtype=np.int64),
            np.where(finite, x, np.inf).min(0), np.where(finite, x, -np.inf).max(0))


class SummaryWriter:
    """Keeps a run's ``summary/`` group up to date while rows are appended (writer thread).

    Created by :class:`gradflow.store.RunStore` on a run group holding ``rows`` committed raw rows:
    creates the summary group when missing, drops what a crash may have left past the last counted
    span, and summarises the raw rows not yet covered. :meth:`append` takes each flush's columns.
    """

    def __init__(self, node: zarr.Group, rows: int, variables: tuple[str, ...], compressors,
                 others) -> None:
        """``compressors``: the figures' (float32) codecs; ``others``: the other arrays'."""
        self.node, self.variables, self.compressors, self.others = node, variables, compressors, others
        group = node.get("summary")
        if not isinstance(group, zarr.Group) or group.attrs.get("gradflow_kind") != "summary":
            group = self._create()
        self.group = group
        covered = trim(group, rows)
        self.rows = covered  # rows summarised (written or pending in the base blocks below)
        self.done: list[Blocks] = []  # complete blocks of LEVELS[0] rows in the current span
        self.partial: Blocks | None = None  # the block in progress (one segment)
        for start in range(covered, rows, SPAN):  # catch up from the raw rows
            stop = min(start + SPAN, rows)
            self.append({name: node[name][start:stop] for name in (*variables, "step")})

    def _create(self) -> zarr.Group:
        group = self.node.require_group("summary")
        n_layers = self.node["layer"].shape[0]
        for level in LEVELS:
            sub = group.require_group(str(level))
            for name in self.variables:
                description = self.node[name].attrs.get("description", name)
                sub.create_array(name, shape=(0, len(STATS), n_layers), dtype="float32",
                                 chunks=(SPAN // level, len(STATS), n_layers), fill_value=np.nan,
                                 compressors=self.compressors,
                                 dimension_names=("block", "stat", "layer"),
                                 attributes={"description": f"{description}: per block of {level} "
                                                            f"rows, {', '.join(STATS)}",
                                             "coordinates": "first_step last_step"})
            for name, what in (("first_step", "first"), ("last_step", "last")):
                sub.create_array(name, shape=(0,), chunks=(SPAN // level,), dtype="int64",
                                 fill_value=0, dimension_names=("block",), compressors=self.others,
                                 attributes={"description": f"step index of the block's {what} row"})
            stat = sub.create_array("stat", shape=(len(STATS),), dtype=str, dimension_names=("stat",),
                                    compressors=self.others,
                                    attributes={"description": "; ".join(
                                        f"{k}: {v}" for k, v in STAT_DESCRIPTIONS.items())})
            every_chunk_stored(stat)[:] = np.array(STATS)
            layer = sub.create_array("layer", shape=(n_layers,), dtype=str, dimension_names=("layer",),
                                     compressors=self.others,
                                     attributes=dict(self.node["layer"].attrs))
            every_chunk_stored(layer)[:] = self.node["layer"][:]
            sub.attrs.update({"gradflow_kind": "summary_level", "block_rows": level})
        group.attrs.update({"gradflow_kind": "summary", "rows": 0, "levels": list(LEVELS),
                            "span_rows": SPAN})
        return group

    def append(self, columns: dict[str, np.ndarray]) -> None:
        """Summarise appended rows: ``columns`` holds ``step`` (n,) and each variable (n, layers)."""
        steps = np.asarray(columns["step"])
        values = [np.asarray(columns[name], dtype=np.float32) for name in self.variables]  # as stored
        base, pos = LEVELS[0], 0
        while pos < len(steps):
            take = min(base - self.rows % base, len(steps) - pos)
            piece = Blocks.of([v[pos:pos + take] for v in values], steps[pos:pos + take],
                              np.array([0]))
            self.partial = piece if self.partial is None else \
                Blocks.concat([self.partial, piece]).merge(np.array([0]))
            pos += take
            self.rows += take
            if self.rows % base == 0:
                self.done.append(self.partial)
                self.partial = None
                if len(self.done) == SPAN // base:
                    self._write_span(Blocks.concat(self.done))
                    self.done = []

    def _write_span(self, blocks: Blocks) -> None:
        """Write one chunk per level and statistic for the span just completed, then count it."""
        for level in LEVELS:
            group = self.group[str(level)]
            merged = blocks.merge(np.arange(0, len(blocks.rows), level // LEVELS[0]))
            stats = merged.stats()  # (blocks, stat, variable, layer)
            for v, name in enumerate(self.variables):
                _append(group[name], stats[:, :, v].astype(np.float32))
            _append(group["first_step"], merged.first_step)
            _append(group["last_step"], merged.last_step)
        self.group.attrs["rows"] = self.rows  # after the chunks: a crash before this re-does the span


def trim(group: zarr.Group, rows: int) -> int:
    """Cut a run's ``summary`` group to the whole spans within its first ``rows`` raw rows (what a
    crash, or a repair that truncated the raw rows, may have left beyond them); returns the rows
    it still covers. Every level's block arrays are resized and the ``rows`` attribute lowered."""
    covered = min(int(group.attrs.get("rows", 0)), rows) // SPAN * SPAN
    for level in group.attrs.get("levels", LEVELS):
        for _, array in group[str(level)].arrays():
            if array.metadata.dimension_names[0] == "block":
                array.resize((covered // level,) + array.shape[1:])
    group.attrs["rows"] = covered
    return covered


def _append(array, values: np.ndarray) -> None:
    array = every_chunk_stored(array)
    start = array.shape[0]
    array.resize((start + len(values),) + array.shape[1:])
    array[start:] = values


# -- reading ------------------------------------------------------------------------------------


def open_levels(store: str | os.PathLike, group: str | None = None) -> dict[str, xr.Dataset]:
    """``{"256": Dataset, …}``: the summary levels of the run at ``store`` (``group``), lazily opened.

    Empty when the run has no summary (a store written before gradflow kept one).
    """
    url = store_url(store)
    prefix = f"{group.strip('/')}/summary" if group else "summary"
    try:
        root = zarr.open_group(url, mode="r")
        node = root[prefix]
    except (KeyError, FileNotFoundError, zarr.errors.NodeNotFoundError):
        return {}
    if not isinstance(node, zarr.Group) or node.attrs.get("gradflow_kind") != "summary":
        return {}
    consolidated = root.metadata.consolidated_metadata is not None
    return {name: xr.open_dataset(url, engine="zarr", group=f"{prefix}/{name}", chunks=None,
                                  consolidated=consolidated)
            for name, _ in sorted(node.groups(), key=lambda item: int(item[0]))}


def _levels_of(run: xr.DataTree) -> dict[int, xr.Dataset]:
    node = run.children.get("summary")
    if node is None:
        return {}
    return {int(name): child.to_dataset() for name, child in node.children.items()
            if "block" in child.dims}


def read_steps(run: xr.DataTree | str | os.PathLike, bins: int = 200,
               variables: list[str] | None = None, group: str | None = None,
               raw_fallback: bool = True) -> xr.Dataset | None:
    """Step statistics in ``bins`` consecutive bins of recorded rows, from the summary where it can.

    ``run``: a run's node of a DataTree (``gradflow.open_tree``, a sweep's ``gradflow.open``)
    or a store path / URL (``group`` for a sweep's variant). Returns an ``xarray.Dataset`` with dims
    ``(step, stat, layer)``: one variable per statistic (default all), ``stat`` = mean, min, max,
    nonfinite as in the stored summary; coordinates ``step`` (first step of the bin), ``step_end``
    (last step + 1), ``num_rows`` and the layer coordinates; ``attrs["source"]`` says what was read
    (``"summary/<rows per block>"`` or ``"raw"``).

    Uses the coarsest summary level with at least ``bins`` complete blocks, grouping whole blocks
    into ``bins`` bins, and summarises the rows after its last stored block from the raw rows. When
    no level has enough blocks: with ``raw_fallback`` the raw rows in ``bins`` equal runs of rows
    (``min(bins, rows)`` bins, read a few thousand rows at a time); otherwise None.
    """
    if isinstance(run, xr.DataTree):
        raw, levels = run.to_dataset(), _levels_of(run)
    else:
        import gradflow

        raw = gradflow.open(run, group=group)
        levels = {int(k): v for k, v in open_levels(run, group).items()}
    if bins < 1:
        raise ValueError(f"bins must be positive, got {bins}")
    variables = list(variables or [v for v in raw.data_vars if raw[v].dims == ("step", "layer")])
    n = raw.sizes.get("step", 0)
    usable = [level for level in sorted(levels, reverse=True)
              if min(levels[level].sizes["block"], n // level) >= bins
              and all(v in levels[level] for v in variables)]
    if usable:
        level = usable[0]
        summary = levels[level]
        stored = min(summary.sizes["block"], n // level)
        blocks = _stored_blocks(summary.isel(block=slice(0, stored)), variables)
        tail = _raw_blocks(raw, variables, stored * level, n, level)
        if tail is not None:
            blocks = Blocks.concat([blocks, tail])
        binned = blocks.merge(_bin_starts(len(blocks.rows), bins))
        source = f"summary/{level}"
    elif raw_fallback and n:
        binned = _raw_segments(raw, variables, _bin_starts(n, bins))
        source = "raw"
    else:
        return None
    stats = binned.stats()
    layer_coords = {name: raw[name] for name in LAYER_COORDS if name in raw.coords}
    return xr.Dataset(
        {name: (("step", "stat", "layer"), stats[:, :, v].astype(np.float32))
         for v, name in enumerate(variables)},
        coords={"step": binned.first_step, "step_end": ("step", binned.last_step + 1),
                "num_rows": ("step", binned.rows), "stat": list(STATS), **layer_coords},
        attrs={"source": source})


def _bin_starts(n: int, bins: int) -> np.ndarray:
    """First index of each of ``min(bins, n)`` near-equal runs of ``n`` items (as ``i·bins // n``)."""
    labels = np.arange(n) * min(bins, n) // n
    return np.flatnonzero(np.r_[True, np.diff(labels) > 0])


def _stored_blocks(summary: xr.Dataset, variables: list[str]) -> Blocks:
    """Blocks from stored statistics (sums recovered as mean × finite count)."""
    stats = np.stack([np.asarray(summary[v].values, dtype=np.float64) for v in variables], axis=2)
    mean, low, high, nonfinite = (stats[:, i] for i in range(4))  # (blocks, variables, layers)
    block_rows = int(summary.attrs["block_rows"])
    rows = np.full(len(mean), block_rows, dtype=np.int64)
    count = block_rows - nonfinite.astype(np.int64)
    none = count == 0
    return Blocks(np.where(none, 0.0, mean * count), count, np.where(none, np.inf, low),
                  np.where(none, -np.inf, high), nonfinite.astype(np.int64),
                  summary["first_step"].values.astype(np.int64),
                  summary["last_step"].values.astype(np.int64), rows)


def _raw_values(raw: xr.Dataset, variables: list[str], start: int, stop: int) -> list[np.ndarray]:
    return [np.asarray(raw[v].isel(step=slice(start, stop)).transpose("step", "layer").values,
                       dtype=np.float32) for v in variables]


def _raw_blocks(raw: xr.Dataset, variables: list[str], start: int, stop: int,
                level: int) -> Blocks | None:
    """Rows ``[start, stop)`` in blocks of ``level`` rows (the last one may be shorter)."""
    if stop <= start:
        return None
    values = _raw_values(raw, variables, start, stop)
    steps = raw["step"].values[start:stop]
    return Blocks.of(values, steps, np.arange(0, stop - start, level))


def _raw_segments(raw: xr.Dataset, variables: list[str], starts: np.ndarray) -> Blocks:
    """All raw rows reduced over the segments beginning at ``starts``, read ~16 M values at a time."""
    n = raw.sizes["step"]
    steps = raw["step"].values
    max_rows = max(1, (1 << 24) // max(1, len(variables) * raw.sizes.get("layer", 1)))
    parts, piece_starts = [], []
    for start in range(0, n, max_rows):
        stop = min(start + max_rows, n)
        cut = np.r_[start, starts[(starts > start) & (starts < stop)]]
        parts.append(Blocks.of(_raw_values(raw, variables, start, stop), steps[start:stop], cut - start))
        piece_starts.append(cut)
    # A segment read in several pieces (it spans a read boundary) is merged back into one.
    segment = np.searchsorted(starts, np.concatenate(piece_starts), "right") - 1
    return Blocks.concat(parts).merge(np.flatnonzero(np.r_[True, np.diff(segment) > 0]))
