"""The gradflow store: a plain Zarr v3 group that ``xarray.open_zarr`` opens without gradflow.

Layout of one run (at the store root, or at ``STORE/<group>`` for sweeps)::

    zarr.json                 attrs: gradflow_schema, gradflow_kind="run", versions, model, optimizers
                              (class and param groups' settings; a group added with add_param_group is
                              appended at the next commit; a resume must match its classes and counts),
                              every, per_parameter, metadata, steps_seen, step_restarts (after a
                              repair cut step rows: gradflow.check.derived_coordinate), all_chunks_stored,
                              fixed_chunks_stored, fixed_coordinates (below)
    grad_norm … nonfinite     (step, layer) float32, chunks of step_chunk(layers) steps × all layers
    step, epoch               (step,) int64: optimizer step index, epoch index
    wall_time                 (step,) float64, Unix time in seconds when the step finished
    skipped                   (step,) bool, the optimizer skipped the step (e.g. GradScaler on inf)
    lr                        (step, param_group) float64: each param group's learning rate at the step
    param_group               (param_group,) str: ``group<j>`` (one optimizer) or ``opt<i>/group<j>``
    layer, module_type        (layer,) str;  depth, num_params (layer,) int64
    epochs/                   attrs: gradflow_kind="epochs"
        update_mean_abs, update_norm    (epoch, layer) float32
        epoch, num_steps                (epoch,) int64
        train_loss, val_loss, …         (epoch,) float64, one per scalar passed to end_epoch
        layer, module_type, depth, num_params

Appending: arrays grow along ``step``/``epoch``; a flush (one hand-off of the Recorder) resizes and
writes every array once, steps and epochs together, then rewrites the consolidated metadata at the
store root. That consolidated metadata is the commit point: readers (xarray uses it by default)
always see the state of the last complete flush, even while a flush is under way or after a crash
in the middle of one, and a Recorder reopening the store trims whatever an interrupted flush left
beyond it. A flush that fails (disk full) commits nothing; its rows are kept and written again,
from the same committed lengths, by the next flush. A commit of one group of a sweep store
republishes only that group (other groups keep their last committed state), under a short
store-wide lock, so variants written side by side (Ray) never publish each other's half-written
arrays. Every chunk up to the committed length is stored (``write_empty_chunks``), so a missing chunk
means damage (:mod:`gradflow.check`); runs that do say so: ``all_chunks_stored`` (the step, epoch
and summary block arrays) and ``fixed_chunks_stored`` (the arrays whose length is fixed at creation:
``layer``, ``module_type``, ``depth``, ``num_params`` here and in ``epochs/``, ``param_group``, the
summary's ``stat`` and ``layer``; before it a chunk equal to the fill value, such as the ``depth``
[0] of a one-layer model, was not stored). ``fixed_coordinates``, written once at creation, is a
copy of those arrays' values (``{"layer": [...], "module_type": [...], "num_params": [...],
"param_group": [...], "stat": [...]}``; ``depth`` i is i) from which ``gradflow check --repair``
rebuilds a lost chunk of them: nothing else could, they are not recounted from the step rows.

One writer per run: :class:`gradflow.lock.WriterLock` (a lock file per group, broken automatically
when its owner dies) refuses a second writer, in another process or this one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.group import ConsolidatedMetadata, GroupMetadata
from zarr.core.sync import sync

from gradflow import schema
from gradflow.check import _quiet_zarr, damaged_root, every_chunk_stored, refuse_damaged, root_error
from gradflow.errors import GradflowError
from gradflow.paths import no_store_error, path_exists, refuse_inside_store, store_kind, store_url
from gradflow.summary import STATS, SummaryWriter
from gradflow.lock import (WriterLock, creating_marker, filesystem, group_is_locked, lock_root,
                           node_path, store_lock)

SCHEMA = schema.VERSION
CHUNK_STEPS = 1024  # rows per chunk of the step coordinates; the Recorder flushes this many rows
CHUNK_BYTES = 2**22  # a step variable's chunk holds at most this many bytes (≥ 16 rows)
# zstd level 1 behind a byte shuffle (float32 exponent bytes side by side): 13% smaller than zarr's
# default zstd on recorded figures and faster to encode; higher levels save ≤ 6% more at 3-10× the
# writer time (reports/bench_store_longrun.md).
CODEC = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=4)
# Every chunk of every array gradflow writes ends in a CRC-32C of its stored bytes (zarr's standard
# `crc32c` codec, which xarray and zarr check on every read): without it a flipped bit decodes to
# other numbers silently (197 of 200 single-bit flips in a blosc/zstd chunk of recorded figures
# did; the "bitflip" damage of tests/test_check.py), and `gradflow check` could not tell. 4 bytes
# per chunk.
CHECKSUM = Crc32cCodec()
OTHER_CODECS = (ZstdCodec(level=0), CHECKSUM)  # zarr's default compressor, then the checksum
CHUNK_EPOCHS = 256
STEP_VARIABLES = schema.names(schema.STEP_VARIABLES)
EPOCH_VARIABLES = schema.names(schema.EPOCH_VARIABLES)
LAYER_COORDS = schema.names(schema.LAYER_COORDS)
STEP_COORDS = {v.name: v.dtype for v in schema.STEP_COORDS}
# The run's own dimensions too: open_tree's epochs node inherits their coordinates, which would
# hide a scalar of that name.
RESERVED_EPOCH_NAMES = (set(EPOCH_VARIABLES) | set(LAYER_COORDS) | set(schema.names(schema.EPOCH_COORDS))
                        | {"step", "param_group"})


def node_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name one array or group of a run (None when it can): Zarr takes ``/``
    and ``\\`` as path separators, refuses ``.``, ``..`` and an empty name, and keeps its metadata
    in ``zarr.json``; ``*.partial`` is what an interrupted atomic write leaves (``gradflow check``
    reports it, ``--repair`` deletes it); a file system refuses names over 255 bytes."""
    if not name:
        return "is empty"
    if "/" in name or "\\" in name:
        return "contains '/' or '\\' (a Zarr path, not one name)"
    if name in (".", "..", "zarr.json"):
        return "is a name Zarr reserves"
    if name.endswith(".partial"):
        return "ends in '.partial' (an interrupted write's leftover, which repair deletes)"
    if len(name.encode()) > 255:
        return "is longer than 255 bytes"
    return None

DESCRIPTIONS = {v.name: v.meaning for v in schema.STEP_VARIABLES + schema.STEP_COORDS + schema.LAYER_COORDS
                + schema.EPOCH_COORDS + schema.OPTIMIZER_VARIABLES}
EPOCH_DESCRIPTIONS = {v.name: v.meaning for v in schema.EPOCH_VARIABLES}
UNITS = {v.name: v.unit for v in schema.STEP_VARIABLES + schema.STEP_COORDS + schema.LAYER_COORDS
         + schema.EPOCH_COORDS + schema.OPTIMIZER_VARIABLES + schema.EPOCH_VARIABLES if v.unit}


def _described(name: str, meaning: str) -> dict[str, str]:
    """An array's attributes: its meaning and, where the schema declares one, its ``units``
    (the CF name, which xarray's plots put on their axes)."""
    return {"description": meaning, **({"units": UNITS[name]} if name in UNITS else {})}


@dataclass
class LayerTable:
    """The recorded layers in registration order (what the ``layer`` coordinates hold)."""

    names: list[str]
    module_types: list[str]
    num_params: list[int]

    def arrays(self) -> dict[str, np.ndarray]:
        """The ``(layer,)`` coordinate arrays, by name."""
        return {"layer": np.array(self.names, dtype=str), "depth": np.arange(len(self.names)),
                "module_type": np.array(self.module_types, dtype=str),
                "num_params": np.array(self.num_params, dtype=np.int64)}

    def copy(self) -> dict[str, list]:
        """The layer coordinates as the run's ``fixed_coordinates`` attribute holds them (``depth``
        is not in it: layer i has depth i)."""
        return {"layer": list(self.names), "module_type": list(self.module_types),
                "num_params": [int(n) for n in self.num_params]}


def figure_codecs() -> tuple:
    """The float32 figures' compressors: :data:`CODEC` (read when called: the long-run benchmark
    swaps it), then :data:`CHECKSUM`."""
    return (CODEC, CHECKSUM)


def _check_schema(attrs, where: str) -> None:
    schema = attrs.get("gradflow_schema")
    if not isinstance(schema, int):
        raise GradflowError(f"{where} is not a gradflow store")
    if schema > SCHEMA:
        raise GradflowError(f"{where} was written by a newer gradflow (schema {schema}, this one "
                            f"reads up to {SCHEMA}); upgrade gradflow")


def _first_names(names: list) -> str:
    """``a, b, c, …``: the first three of ``names``, for a one-line error."""
    return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")


def _same_optimizers(stored, given: list[dict], where: str) -> list[dict]:
    """The run's ``optimizers`` attribute (returned) when the resumed optimizers have its classes,
    numbers of param groups and (where it names them) each group's parameters, else a one-line
    GradflowError: the ``lr`` columns are the stored groups,
    and another optimizer's group ``j`` is not the run's group ``j``. A store without the attribute
    (another writer), or a writer that names no optimizers, is not compared."""
    if not isinstance(stored, list) or not given:
        return stored if isinstance(stored, list) else given

    def shape(optimizers) -> list[tuple[str, int]]:
        return [(o.get("class"), len(o.get("param_groups", []))) for o in optimizers]

    def describe(optimizers) -> str:
        return ", ".join(f"{name} with {n} param group{'s' * (n != 1)}" for name, n in shape(optimizers))

    if shape(stored) != shape(given):
        raise GradflowError(f"{where} was recorded with {describe(stored)}; this Recorder has "
                            f"{describe(given)}: a resume (mode=\"a\") needs the same optimizers and "
                            f"param groups; record into a new store or group")
    for i, (old, new) in enumerate(zip(stored, given)):  # the same parameters in each group
        for j, (a, b) in enumerate(zip(old.get("param_groups", []), new.get("param_groups", []))):
            if isinstance(a, dict) and "params" in a and a["params"] != b.get("params"):
                raise GradflowError(f"{where}: param group {j} of optimizer {i} held other parameters "
                                    f"({_first_names(a['params'])}) than it holds now "
                                    f"({_first_names(b.get('params', []))}): its lr column would "
                                    f"change meaning, so a resume (mode=\"a\") needs the same "
                                    f"parameters in each group, optimizers in the same order; "
                                    f"record into a new store or group")
    return stored


def _record_instead(store: str, inner: str, kind: str) -> str:
    if kind == "run":
        return f"record into a new store outside {store}"
    return f"record into a group of it: Recorder(..., {store!r}, group={inner.split('/')[0]!r})"


def _open_instead(store: str, inner: str, kind: str) -> str:
    rest = inner.partition("/")[2]
    if (inner == "epochs") if kind == "run" else rest in ("", "epochs"):
        return f"open it as gradflow.open({store!r}, group={inner!r})"
    return f"open the store: gradflow.open({store!r})"


def _is_run(node) -> bool:
    return isinstance(node, zarr.Group) and node.attrs.get("gradflow_kind") == "run"


@dataclass
class Rows:
    """Rows of one hand-off: step columns ``(n,)`` / ``(n, layers)`` and epoch columns ``(k,)`` /
    ``(k, layers)`` (``epoch``, ``num_steps``, the figures and one float64 column per scalar)."""

    steps: dict[str, np.ndarray]
    epochs: dict[str, np.ndarray]
    steps_seen: int
    attrs: dict = dataclasses.field(default_factory=dict)  # run attributes the commit updates

    @property
    def num_steps(self) -> int:
        return len(self.steps["step"]) if self.steps else 0

    @property
    def num_epochs(self) -> int:
        return len(self.epochs["epoch"]) if self.epochs else 0

    def merge(self, later: Rows) -> Rows:
        """These rows followed by ``later``'s (scalars missing on one side are NaN there)."""
        steps = _concat(self.steps, later.steps, self.num_steps, later.num_steps)
        epochs = _concat(self.epochs, later.epochs, self.num_epochs, later.num_epochs)
        return Rows(steps, epochs, later.steps_seen, {**self.attrs, **later.attrs})


def _concat(a: dict, b: dict, n_a: int, n_b: int) -> dict:
    if not n_a:
        return b
    if not n_b:
        return a
    out = {}
    for name in dict.fromkeys([*a, *b]):
        first = a.get(name, np.full(n_a, np.nan))
        second = b.get(name, np.full(n_b, np.nan))
        out[name] = np.concatenate([first, second])
    return out


class RunStore:
    """Creates or reopens one run's group and appends to it (called from the writer thread).

    Holds the group's :class:`~gradflow.lock.WriterLock` from creation to :meth:`close`.
    ``next_step``, ``next_epoch`` and ``steps_seen`` tell a resumed Recorder where to continue.
    """

    def __init__(self, url: str, group: str | None, layers: LayerTable, attrs: dict, every: int,
                 per_parameter: bool, mode: str = "a") -> None:
        """``mode``: ``"w-"`` refuses an existing run, ``"w"`` replaces it, ``"a"`` resumes it."""
        self.url, self.group = url, group
        self.where = url if not group else f"{url} (group {group!r})"
        self.fs, self.path = filesystem(url)
        refuse_inside_store(url, _record_instead, writing=True)  # before the lock files are made
        if not self.fs.exists(lock_root(self.path)):  # no gradflow writer is creating it now:
            self._refuse_no_store()  # no lock files beside a file or folder that is not a store
        if group and store_kind(url) == "foreign":
            raise GradflowError(f"{url} is not a gradflow store (another tool's Zarr store); record "
                                f"group {group!r} into another store")
        self.lock = WriterLock(url, group, self.fs, self.path)
        self._unwritten: Rows | None = None
        self._attrs_update: dict = {}  # attributes the next commit writes
        self._creating = creating_marker(self.fs, self.path, group)
        try:
            with store_lock(self.fs, self.path), _quiet_zarr():  # one creator at a time
                self._refuse_no_store()  # again: another process may have made it meanwhile
                self._open(layers, attrs, every, per_parameter, mode)
            if self._unwritten is not None:
                self.write()  # the row of an interrupted epoch (see _close_interrupted_epoch)
            else:
                self.commit()
        except BaseException:
            if self.fs.exists(self._creating):
                self.fs.rm_file(self._creating)
            self.lock.release()
            raise

    def _refuse_no_store(self) -> None:
        """Raise :class:`~gradflow.errors.GradflowError` where the path exists but holds no Zarr
        store: a file, a plain folder, or a store whose root metadata is damaged (named). A Zarr
        store's root is checked by ``open_root``."""
        exists, is_zarr = path_exists(self.url)
        if exists and not is_zarr:
            if damage := damaged_root(self.url):
                raise root_error(self.url, damage)
            raise GradflowError(f"{self.url} exists and is not a Zarr store; choose a new path")

    def _open(self, layers: LayerTable, attrs: dict, every: int, per_parameter: bool,
              mode: str) -> None:
        group, url = self.group, self.url
        stale = self.fs.exists(self._creating)  # its creator died half-way (we hold the lock)
        if not self.fs.exists(node_path(self.path, group) + "/zarr.json"):
            self.fs.touch(self._creating)  # readers wait instead of "not a gradflow store"
        from gradflow.check import open_root, refuse_damaged_metadata

        root = open_root(url, mode="a", use_consolidated=False)
        self.store = root.store

        # A run that is resumed must be whole (zarr reads these files); one that is made again
        # (mode "w", its creator died half-way, or its folder was deleted, as a sweep does with an
        # unfinished variant) may lack files its old commit listed.
        if mode != "w" and not stale and self.fs.exists(node_path(self.path, group)):
            refuse_damaged_metadata(self.store, group, self.where, url)
        if group and _is_run(root):
            raise GradflowError(f"{url} holds a single run at its root; record group {group!r} "
                                f"into another store")
        node = root.get(group) if group else root
        if node is not None and stale:
            _clear_node(node)  # start again
        if node is None or (isinstance(node, zarr.Group) and not list(node.keys())
                            and not node.attrs.asdict()):
            self.fs.touch(self._creating)
            self.node = root.require_group(group) if group else root
            self._create(layers, attrs)
        else:
            if not isinstance(node, zarr.Group):
                raise GradflowError(f"{self.where} is an array, not a gradflow store")
            if not _is_run(node):
                if any(_is_run(child) for _, child in node.groups()):
                    raise GradflowError(f"{self.where} is a sweep store holding several runs; pass "
                                        f"group=<variant> to record into one of them")
                raise GradflowError(f"{self.where} exists and is not a gradflow store")
            _check_schema(node.attrs, self.where)
            if mode == "w-":
                raise GradflowError(f"{self.where} already holds a gradflow run; pass mode=\"a\" to "
                                    f"resume it or mode=\"w\" to overwrite it")
            if mode == "w":  # under the writer lock: nobody writes it
                self.fs.touch(self._creating)
                root = _delete_run(root, group)
                self.node = root.require_group(group) if group else root
                self._create(layers, attrs)
            else:
                self.node = node
                self._resume(layers, every, per_parameter, attrs)
        self.epochs = self.node["epochs"]
        self._arrays = {name: every_chunk_stored(array) for name, array in self.node.arrays()}
        self._epoch_arrays = {name: every_chunk_stored(array) for name, array in self.epochs.arrays()}
        self.summary = SummaryWriter(self.node, self.n_steps, STEP_VARIABLES, figure_codecs(),
                                     OTHER_CODECS)

    # -- creation and resumption -------------------------------------------------------------

    def _create(self, layers: LayerTable, attrs: dict) -> None:
        node, n_layers = self.node, len(layers.names)
        chunk = step_chunk(n_layers)
        layer_coords = "depth module_type num_params"
        for name in STEP_VARIABLES:
            node.create_array(name, shape=(0, n_layers), chunks=(chunk, n_layers), dtype="float32",
                              fill_value=np.nan, dimension_names=("step", "layer"),
                              compressors=figure_codecs(),
                              attributes={**_described(name, DESCRIPTIONS[name]),
                                          "coordinates": f"epoch wall_time skipped {layer_coords}"})
        for name, dtype in STEP_COORDS.items():
            node.create_array(name, shape=(0,), chunks=(CHUNK_STEPS,), dtype=dtype,
                              fill_value=_fill(dtype), dimension_names=("step",),
                              compressors=OTHER_CODECS, attributes=_described(name, DESCRIPTIONS[name]))
        groups = param_group_names(attrs)
        self._create_lr(chunk, groups, 0)
        epochs = node.require_group("epochs")
        for name in EPOCH_VARIABLES:
            epochs.create_array(name, shape=(0, n_layers), chunks=(CHUNK_EPOCHS, n_layers),
                                dtype="float32", fill_value=np.nan, compressors=figure_codecs(),
                                dimension_names=("epoch", "layer"),
                                attributes={**_described(name, EPOCH_DESCRIPTIONS[name]),
                                            "coordinates": layer_coords})
        for name in ("epoch", "num_steps"):
            epochs.create_array(name, shape=(0,), chunks=(CHUNK_EPOCHS,), dtype="int64",
                                fill_value=0, dimension_names=("epoch",), compressors=OTHER_CODECS,
                                attributes=_described(name, DESCRIPTIONS[name]))
        for group in (node, epochs):
            for name, values in layers.arrays().items():
                dtype = str if values.dtype.kind == "U" else values.dtype
                array = group.create_array(name, shape=values.shape, dtype=dtype,
                                           dimension_names=("layer",), compressors=OTHER_CODECS,
                                           attributes=_described(name, DESCRIPTIONS[name]))
                every_chunk_stored(array)[:] = values  # depth [0] of one layer too (gradflow.check)
        # Marked as gradflow groups last: an interrupted creation leaves no half-made run behind.
        epochs.attrs.update({"gradflow_schema": SCHEMA, "gradflow_kind": "epochs"})
        node.attrs.update({**attrs, "gradflow_schema": SCHEMA, "gradflow_kind": "run",
                           "steps_seen": 0, "all_chunks_stored": True, "fixed_chunks_stored": True,
                           "fixed_coordinates": {**layers.copy(), "param_group": groups,
                                                 "stat": list(STATS)}})
        self.next_step = self.next_epoch = self.steps_seen = 0
        self.n_steps = self.n_epochs = 0
        self.optimizers = attrs.get("optimizers", [])

    def _create_lr(self, chunk: int, groups: list[str], n_steps: int) -> None:
        """The ``lr`` step variable (one column per param group) and its ``param_group`` labels."""
        self.node.create_array("lr", shape=(n_steps, len(groups)), chunks=(chunk, max(1, len(groups))),
                               dtype="float64", fill_value=np.nan, dimension_names=("step", "param_group"),
                               compressors=OTHER_CODECS,
                               attributes=_described("lr", DESCRIPTIONS["lr"]))
        labels = self.node.create_array("param_group", shape=(len(groups),), dtype=str,
                                        dimension_names=("param_group",), compressors=OTHER_CODECS,
                                        attributes=_described("param_group", DESCRIPTIONS["param_group"]))
        every_chunk_stored(labels)[:] = np.array(groups, dtype=str)

    def _resume(self, layers: LayerTable, every: int, per_parameter: bool, attrs: dict) -> None:
        node = self.node
        # First: a lost chunk of the layer table would read as another model's layers.
        refuse_damaged(self.store, self.group, self.where, self.url, resume=True)
        stored = [str(name) for name in node["layer"][:]]
        if stored != layers.names:
            extra = sorted(set(stored) ^ set(layers.names))[:3] or stored[:3]
            raise GradflowError(f"{self.where} holds a different model ({len(stored)} layers, this "
                                f"model has {len(layers.names)}; e.g. {', '.join(extra)}); use a "
                                f"new store or group")
        stored_types = [str(t) for t in node["module_type"][:]]
        stored_counts = [int(n) for n in node["num_params"][:]]
        for i, name in enumerate(stored):
            if (stored_types[i], stored_counts[i]) != (layers.module_types[i], layers.num_params[i]):
                raise GradflowError(
                    f"{self.where} holds a different model (layer {name!r} is "
                    f"{stored_types[i]} with {stored_counts[i]} parameters there, "
                    f"{layers.module_types[i]} with {layers.num_params[i]} in this model); use a "
                    f"new store or group")
        if node.attrs.get("every") != every or node.attrs.get("per_parameter") != per_parameter:
            raise GradflowError(f"{self.where} was recorded with every={node.attrs.get('every')}, "
                                f"per_parameter={node.attrs.get('per_parameter')}; resume it with "
                                f"the same settings")
        self.optimizers = _same_optimizers(node.attrs.get("optimizers"), attrs.get("optimizers", []),
                                           self.where)
        if "lr" not in node:  # a store written before lr was recorded: NaN for its earlier steps
            self._create_lr(node["step"].chunks[0], param_group_names(attrs), node["step"].shape[0])
        # What the last complete flush committed, from the consolidated metadata at the root
        # (without it, e.g. written by another tool: the shortest array of each dimension).
        cnode = _committed_node(self.store, self.group) or node
        lengths = {name: array.shape[0] for name, array in cnode.arrays()
                   if array.metadata.dimension_names[0] == "step"}
        epoch_lengths = {name: array.shape[0] for name, array in cnode["epochs"].arrays()
                         if array.metadata.dimension_names[0] == "epoch"}
        self.n_steps, self.n_epochs = min(lengths.values()), min(epoch_lengths.values())
        self.steps_seen = int(cnode.attrs.get("steps_seen", self.n_steps))
        for group, length in ((node, self.n_steps), (node["epochs"], self.n_epochs)):
            for _, array in group.arrays():
                if array.metadata.dimension_names[0] in ("step", "epoch") \
                        and array.shape[0] != length:
                    array.resize((length,) + array.shape[1:])
        _remove_partial_files(self.fs, node_path(self.path, self.group))
        if attrs.get("metadata") is not None:
            self._attrs_update["metadata"] = attrs["metadata"]
        self.next_step = self.steps_seen
        self.next_epoch = self._close_interrupted_epoch(node, len(layers.names), every)

    def _close_interrupted_epoch(self, node, n_layers: int, every: int) -> int:
        """A resumed run starts a new epoch. An epoch whose steps were committed but that has no
        epoch row gets it now, with NaN |ΔW| (its start weights died with the process): the one
        whose ``end_epoch`` never came (a crash, or ``close()`` mid-epoch), and any before it whose
        rows a repair cut (an older gradflow cut the epochs at a lost ``num_steps`` chunk).

        ``num_steps`` is exact or lost, never a guess: for the one open epoch, the committed steps
        after those of the epochs before it; with ``every=1``, its rows counted
        (:func:`gradflow.check.count_steps`); else LOST_COUNT, noted in ``lost_rows``.
        Returns the epoch index the resumed run starts with."""
        from gradflow.check import LOST_COUNT, count_steps, lost_ranges

        last_label = int(node["epoch"][self.n_steps - 1]) if self.n_steps else -1
        if last_label < self.n_epochs:
            return self.n_epochs
        labels = np.arange(self.n_epochs, last_label + 1)
        counts = count_steps(node["epoch"][:self.n_steps], labels, every, last_label + 1,
                             node.attrs.get("step_restarts", []))
        done = node["epochs/num_steps"][:self.n_epochs]
        if len(labels) == 1 and not np.any(done == LOST_COUNT):
            counts[0] = max(self.steps_seen - int(np.sum(done)), 0)
        if np.any(counts == LOST_COUNT):
            note_lost(node["epochs/num_steps"], lost_ranges(self.n_epochs, counts))
        nan = np.full((len(labels), n_layers), np.nan, dtype=np.float32)
        self._unwritten = Rows({}, {"epoch": labels, "num_steps": counts, "update_mean_abs": nan,
                                    "update_norm": nan}, self.steps_seen)
        return last_label + 1

    @functools.cached_property
    def lr_columns(self) -> list[tuple[int, int]]:
        """(optimizer, param group) of each column of the ``lr`` variable, from its ``param_group``
        labels (``group<j>``: optimizer 0; ``opt<i>/group<j>``); read once, asked every step."""
        columns = []
        for label in self.node["param_group"][:].tolist():
            optimizer, _, group = str(label).rpartition("/")
            columns.append((int(optimizer[3:]) if optimizer else 0, int(group[5:])))
        return columns

    # -- appending (writer thread) -----------------------------------------------------------

    def write(self, rows: Rows | None = None) -> None:
        """Append ``rows`` (after any rows a failed write left) and commit them.

        Every array is resized and written once, from the committed lengths. If anything fails,
        nothing is committed and the rows are kept: the next call writes them again, first.
        """
        if rows is not None:
            self._unwritten = rows if self._unwritten is None else self._unwritten.merge(rows)
        pending = self._unwritten
        if pending is None:
            return
        self.lock.check()
        if self.summary is None:  # a failed write left it ahead of the committed rows: rebuild
            self.summary = SummaryWriter(self.node, self.n_steps, STEP_VARIABLES, figure_codecs(),
                                     OTHER_CODECS)
        self._attrs_update.update(pending.attrs)
        try:
            self._write(pending)
        except BaseException:
            self.summary = None
            raise
        self.n_steps += pending.num_steps
        self.n_epochs += pending.num_epochs
        self._unwritten = None

    def _write(self, pending: Rows) -> None:
        for name, values in pending.steps.items():
            _put(self._arrays[name], self.n_steps, values)
        for name, array in self._arrays.items():  # a step variable the rows lack: its fill value
            if pending.num_steps and name not in pending.steps \
                    and array.metadata.dimension_names[0] == "step":
                _put(array, self.n_steps, np.full((pending.num_steps, *array.shape[1:]),
                                                  array.metadata.fill_value, dtype=array.dtype))
        if pending.num_epochs:
            for name in pending.epochs:
                if name not in self._epoch_arrays:  # a new scalar: NaN for the epochs before
                    array = every_chunk_stored(self.epochs.create_array(
                        name, shape=(self.n_epochs,), chunks=(CHUNK_EPOCHS,), dtype="float64",
                        fill_value=np.nan, dimension_names=("epoch",), compressors=OTHER_CODECS))
                    if self.n_epochs:
                        array[:] = np.nan  # stored, like every chunk (gradflow.check)
                    self._epoch_arrays[name] = array
            for name, array in self._epoch_arrays.items():
                if array.metadata.dimension_names[0] != "epoch":
                    continue
                values = pending.epochs.get(name)
                if values is None:
                    values = np.full(pending.num_epochs, np.nan)
                _put(array, self.n_epochs, values)
        if pending.num_steps:  # derived data, published by the same commit as its rows
            self.summary.append(pending.steps)
        self.commit(pending.steps_seen)

    @property
    def epoch_names(self) -> list[str]:
        """The names of the epochs group's arrays (its coordinates, figures and scalars so far)."""
        return list(self._epoch_arrays)

    @property
    def unwritten(self) -> Rows | None:
        """Rows a failed write left (written again, first, by the next :meth:`write`)."""
        return self._unwritten

    def commit(self, steps_seen: int | None = None) -> None:
        """Record the step count and republish this run's metadata: readers now see the flush.

        A run at the store root gets its attributes and the consolidated metadata in one write of
        the root ``zarr.json`` (two writes would let readers see the live, uncommitted arrays)."""
        attrs = dict(self._attrs_update)
        if steps_seen is not None and steps_seen != self.steps_seen:
            attrs["steps_seen"] = steps_seen
        if self.group and attrs:
            self.node.attrs.update(attrs)
        with store_lock(self.fs, self.path), _quiet_zarr():
            if self.group:
                consolidate(self.store, fresh={self.group.split("/")[0]})
            else:
                consolidate(self.store, fresh=ALL, root_attrs=attrs)
        self._attrs_update = {}
        if steps_seen is not None:
            self.steps_seen = steps_seen
        if self.fs.exists(self._creating):
            self.fs.rm_file(self._creating)

    def rollback(self) -> None:
        """Trim every array back to the committed lengths (after recording stopped on a failure)."""
        for arrays, length in ((self._arrays, self.n_steps), (self._epoch_arrays, self.n_epochs)):
            for array in arrays.values():
                if array.metadata.dimension_names[0] in ("step", "epoch") \
                        and array.shape[0] != length:
                    array.resize((length,) + array.shape[1:])

    def close(self) -> None:
        """Give up the writer lock (safe to call twice)."""
        self.lock.release()


ALL = frozenset({"*"})  # consolidate(fresh=ALL): every member from its current metadata


def consolidate(store, fresh: frozenset | set[str] | None = None,
                root_attrs: dict | None = None) -> None:
    """Rewrite the root's consolidated metadata (what readers see), in one write of its zarr.json.

    ``fresh``: the top-level groups to publish from their own, current metadata; every other
    group keeps what the last commit published (``ALL``: everything fresh; None: every group
    without a live writer fresh, a group being written keeps its last commit, which is what a
    sweep driver wants). ``root_attrs``: attributes to update on the root in the same write.
    Call under :func:`gradflow.lock.store_lock`.
    """
    with _quiet_zarr():
        _consolidate(store, fresh, root_attrs)


def _consolidate(store, fresh, root_attrs) -> None:
    root = zarr.open_group(store, mode="r+", use_consolidated=False)
    old = _committed_root(root.store) if fresh is not ALL else None
    old_flat = old.metadata.consolidated_metadata.flattened_metadata if old is not None else {}
    if fresh is ALL:
        fresh = {name for name, _ in root.members()}
    elif fresh is None:
        fs, path = filesystem(_store_root_url(root.store))
        fresh = {name for name, child in root.members()
                 if not (isinstance(child, zarr.Group) and group_is_locked(fs, path, name))}
    members = {}
    for name, child in root.members(use_consolidated_for_children=False):
        if isinstance(child, zarr.Group) and name not in fresh:
            members.update({k: v for k, v in old_flat.items()
                            if k == name or k.startswith(f"{name}/")})
            continue
        members[name] = child.metadata
        if isinstance(child, zarr.Group):
            for key, node in child.members(max_depth=None, use_consolidated_for_children=False):
                members[f"{name}/{key}"] = node.metadata
    for key, meta in members.items():  # as zarr.consolidate_metadata: empty groups say so
        if isinstance(meta, GroupMetadata):
            members[key] = dataclasses.replace(meta, consolidated_metadata=ConsolidatedMetadata(
                metadata={}))
    ConsolidatedMetadata._flat_to_nested(members)
    group = root._async_group
    attributes = {**group.metadata.attributes, **(root_attrs or {})}
    metadata = dataclasses.replace(group.metadata, attributes=attributes,
                                   consolidated_metadata=ConsolidatedMetadata(metadata=members))
    sync(dataclasses.replace(group, metadata=metadata)._save_metadata())


def _store_root_url(zstore) -> str:
    root = getattr(zstore, "root", None)
    if root is not None:
        return str(root)
    fs, path = getattr(zstore, "fs", None), getattr(zstore, "path", "")
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return f"{protocol}://{path}"


def _committed_root(zstore):
    """The root group as the last commit published it, or None (no consolidated metadata)."""
    try:
        root = zarr.open_group(zstore, mode="r", use_consolidated=True)
    except (ValueError, KeyError, FileNotFoundError, zarr.errors.NodeNotFoundError):
        return None
    return root if root.metadata.consolidated_metadata is not None else None


def _committed_node(zstore, group: str | None):
    root = _committed_root(zstore)
    if root is None:
        return None
    try:
        return root[group] if group else root
    except KeyError:
        return None


def _clear_node(node) -> None:
    """Delete a group's members and attributes in place (its lock files stay)."""
    for name in list(node.keys()):
        del node[name]
    if node.attrs.asdict():
        node.attrs.put({})


def _remove_partial_files(fs, node: str) -> list[str]:
    """Delete ``*.partial`` files (atomic writes a kill interrupted) under a run's group."""
    removed = []
    for path in fs.glob(f"{node}/**/*.partial") if fs.exists(node) else []:
        fs.rm_file(path)
        removed.append(path)
    return removed


def note_lost(array, ranges: list[list[int]]) -> None:
    """Add row ranges ``[first, stop)`` whose values are lost to the array's ``lost_rows``
    attribute; an integer array (``num_steps``, which holds :data:`gradflow.check.LOST_COUNT`
    there) also gets ``missing_value``, through which xarray reads those rows as NaN."""
    from gradflow.check import LOST_COUNT

    noted = array.attrs.get("lost_rows", [])
    attrs = {"lost_rows": [*noted, *(r for r in ranges if r not in noted)]}
    if np.dtype(array.dtype).kind == "i":
        attrs["missing_value"] = LOST_COUNT
    array.attrs.update(attrs)


def step_chunk(n_layers: int) -> int:
    """Rows per chunk of a (step, layer) variable: the largest power of two with at most
    CHUNK_BYTES per chunk, between 16 and CHUNK_STEPS (1,024 up to 1,024 layers). A power of two
    divides the Recorder's FLUSH_ROWS (1,024), and its count-driven hand-offs end where the store
    reaches a multiple of that, so they write whole chunks only. A short hand-off (a slow run's
    timed one every FLUSH_SECONDS, an explicit ``flush()``, ``close()``) leaves one chunk per figure
    partly filled, which the next hand-off completes (re-encoding it once) up to the boundary.
    Smaller chunks made that re-encoding 0.55× as long but full flushes 2.7×
    (reports/bench_store_longrun.md)."""
    rows = CHUNK_BYTES // (4 * max(n_layers, 1))
    return max(16, min(CHUNK_STEPS, 1 << max(rows, 1).bit_length() - 1))


def param_group_names(attrs: dict) -> list[str]:
    """``param_group`` labels from the Recorder's ``optimizers`` attrs, in optimizer then group order."""
    optimizers = attrs.get("optimizers") or []
    if len(optimizers) == 1:
        return [f"group{j}" for j in range(len(optimizers[0].get("param_groups", [])))]
    return [f"opt{i}/group{j}" for i, o in enumerate(optimizers) for j in range(len(o.get("param_groups", [])))]


def _fill(dtype: str):
    return {"float64": np.nan, "float32": np.nan, "bool": False}.get(dtype, 0)


def _put(array, start: int, values: np.ndarray) -> None:
    """Write ``values`` at rows ``start:`` (resizing the array to end there)."""
    end = start + len(values)
    if array.shape[0] != end:
        array.resize((end,) + array.shape[1:])
    array[start:end] = values


class BackgroundWriter:
    """Runs store jobs in order on one daemon thread, so Zarr I/O never blocks training.

    Bounded: :meth:`submit` first waits until the previous job finished, so at most one job is
    being written and none waits behind it. When Zarr is slower than training, training waits
    (back-pressure) instead of a backlog growing that a crash would lose.
    A job that raises stops the writer (later jobs would leave the store inconsistent); the error is
    re-raised by the next :meth:`wait` or :meth:`close`. (The Recorder's jobs handle write failures
    themselves and do not raise.)
    """

    def __init__(self, name: str) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    job()
            except BaseException as err:  # noqa: BLE001 - re-raised on the training thread
                self.error = err
            finally:
                self.jobs.task_done()

    def submit(self, job: Callable[[], None]) -> None:
        self.jobs.join()  # back-pressure: the previous job is committed first
        self.jobs.put(job)

    @property
    def busy(self) -> bool:
        return self.jobs.unfinished_tasks > 0

    def wait(self) -> None:
        """Block until every submitted job ran; re-raise the first failure."""
        self.jobs.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error


OPEN_RETRIES = 40  # × 50 ms: how long a reader waits out a commit or a creation under way


class _NotReady(GradflowError):
    """A run being created right now (retried by :func:`open`)."""


def open(store: str | os.PathLike, group: str | None = None) -> xr.Dataset | xr.DataTree:  # noqa: A001
    """Open a gradflow store with xarray.

    ``group=None`` opens a run at the store root as an ``xarray.Dataset`` (dims step, layer);
    ``group="epochs"`` its epoch figures (dims epoch, layer); ``group="<variant>"`` /
    ``"<variant>/epochs"`` one run of a sweep store. A store (or group) whose children are runs opens
    as an ``xarray.DataTree`` with one node per run. Arrays are loaded lazily.

    A store may be read while a Recorder writes it: readers see the last complete commit. Two
    separate calls (steps, then epochs) may see two different commits; :func:`open_tree` reads a
    run's steps and epochs from one commit. A reader that catches a run being created waits for it
    (up to two seconds), as it does for a commit being written.

    Raises GradflowError (one line) for a missing store or group, a ``group`` that is no group's
    path (``..``, ``a//b``, not a string), a path that is not a gradflow store, a path inside a
    gradflow store's folder (``run.zarr/epochs``: the error names the ``gradflow.open(store,
    group=...)`` call), an unknown URL protocol, damaged metadata, and a damaged run (unequal array
    lengths, steps not strictly increasing, a chunk missing below the committed length; ``gradflow check
    STORE`` reports and ``--repair`` repairs: :mod:`gradflow.repair`).

    It lists chunks but does not decode them (so it costs the same at any length): a chunk file that
    exists but is truncated, garbage or changed on disk (its CRC-32C no longer matches) passes, and
    reading its values later (``.values``) raises zarr's ``ValueError``.
    ``gradflow check STORE`` decodes every chunk and names such a chunk; the CLI's readers say it
    in one line (:func:`gradflow.check.reading`).
    """
    return _retrying(store, lambda: _open(store, group, tree=False))


def open_tree(store: str | os.PathLike, group: str | None = None) -> xr.DataTree:
    """Open a store (or one run of it) as an ``xarray.DataTree``, every group from one commit.

    A run's step-level data sits at its node and its epoch figures in the ``epochs`` child; a sweep
    store has one child per run. Unlike two :func:`open` calls, the steps and the epochs (and all
    runs of a sweep) come from the same commit. Errors as :func:`open`.
    """
    return _retrying(store, lambda: _open(store, group, tree=True))


def _retrying(store, opener):
    for attempt in range(OPEN_RETRIES):
        try:
            return opener()
        except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as err:
            last = attempt == OPEN_RETRIES - 1
            if isinstance(err, GradflowError) and not isinstance(err, _NotReady):
                raise
            if last:
                if isinstance(err, GradflowError):
                    raise GradflowError(str(err)) from None
                raise GradflowError(f"{store}: damaged metadata "
                                    f"({type(err).__name__}: {err}); `gradflow check` tells more"
                                    ) from None
            time.sleep(0.05)


def _open(store: str | os.PathLike, group: str | None, tree: bool) -> xr.Dataset | xr.DataTree:
    url = store_url(store)
    if group is not None and (not isinstance(group, str) or any(
            node_name_problem(name) for name in group.strip("/").split("/") if group.strip("/"))):
        raise GradflowError(f"group must be a group's path in the store ('variant', "
                            f"'variant/epochs'), got {group!r}")
    group = group.strip("/") if group else None
    refuse_inside_store(url, _open_instead, writing=False)
    fs, path = filesystem(url)
    try:
        root = zarr.open_group(url, mode="r")
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        if fs.exists(creating_marker(fs, path, group)):
            raise _NotReady(f"{url} is being created (or its creation was interrupted)") from None
        if damage := damaged_root(url):
            raise root_error(url, damage) from None
        raise no_store_error(url) from None
    node = root.get(group) if group else root
    if node is None:
        raise GradflowError(f"{url} has no group {group!r}")
    where = url if not group else f"{url} (group {group!r})"
    if not isinstance(node, zarr.Group):
        raise GradflowError(f"{where} is an array, not a gradflow store")
    consolidated = root.metadata.consolidated_metadata is not None
    options = {"engine": "zarr", "group": group, "consolidated": consolidated, "chunks": None}
    kind = node.attrs.get("gradflow_kind")
    if kind in ("run", "epochs"):
        _check_schema(node.attrs, where)
        run = group if kind == "run" else (group.rsplit("/", 1)[0] if group and "/" in group else None)
        if fs.exists(creating_marker(fs, path, run)):
            raise _NotReady(f"{where} is being created (or its creation was interrupted)")
        refuse_damaged(root.store, run, where, url)
        return xr.open_datatree(url, **options) if tree else xr.open_dataset(url, **options)
    runs = [child for _, child in node.groups() if _is_run(child)]
    if not runs:
        from gradflow.lock import lock_dir

        if fs.glob(f"{lock_dir(path, group)}/**/creating") or fs.exists(
                creating_marker(fs, path, group)):
            raise _NotReady(f"{where} is being created (or its creation was interrupted)")
        raise GradflowError(f"{where} is not a gradflow store")
    for child in runs:
        run_where = f"{url} (group {child.path!r})"
        _check_schema(child.attrs, run_where)
        refuse_damaged(root.store, child.path, run_where, url)
    return xr.open_datatree(url, **options)


def _delete_run(root, group: str | None):
    """Delete the gradflow run at ``root`` (its whole store) or at ``root[group]``; returns the root.

    Called only after the node was checked to be a run gradflow wrote (``gradflow_kind="run"``).
    """
    if group:
        del root[group]
        return root
    return zarr.open_group(root.store, mode="w", use_consolidated=False)
