"""The gradflow store: a plain Zarr v3 group that ``xarray.open_zarr`` opens without gradflow.

Layout of one run (at the store root, or at ``STORE/<group>`` for sweeps)::

    zarr.json                 attrs: gradflow_schema, gradflow_kind="run", versions, model, optimizers,
                              every, per_parameter, metadata, steps_seen
    grad_norm … nonfinite     (step, layer) float32, chunks (1024 steps × all layers)
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

Appending: arrays grow along ``step``/``epoch``; a flush resizes and writes every array, then rewrites
the consolidated metadata at the store root. That consolidated metadata is the commit point: readers
(xarray uses it by default) always see the state of the last complete flush, even while a flush is
under way or after a crash in the middle of one, and a Recorder reopening the store trims whatever
an interrupted flush left beyond it. One writer per store at a time (sweeps write variants in turn).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import numpy as np
import xarray as xr
import zarr

from gradflow.errors import GradflowError

SCHEMA = 1
CHUNK_STEPS = 1024
CHUNK_EPOCHS = 256
STEP_VARIABLES = ("grad_norm", "grad_max_abs", "update_norm", "update_mean_abs", "update_max_abs",
                  "param_norm", "update_ratio", "nonfinite")
EPOCH_VARIABLES = ("update_mean_abs", "update_norm")
LAYER_COORDS = ("layer", "depth", "module_type", "num_params")
STEP_COORDS = {"step": "int64", "epoch": "int64", "wall_time": "float64", "skipped": "bool"}
RESERVED_EPOCH_NAMES = set(EPOCH_VARIABLES) | set(LAYER_COORDS) | {"epoch", "num_steps"}

DESCRIPTIONS = {
    "grad_norm": "L2 norm of the gradient the optimizer used at this step",
    "grad_max_abs": "largest |gradient| entry",
    "update_norm": "L2 norm of the real update w_after - w_before",
    "update_mean_abs": "mean |w_after - w_before| over the layer's parameters",
    "update_max_abs": "largest |w_after - w_before| entry",
    "param_norm": "L2 norm of the parameters after the step",
    "update_ratio": "update_norm / L2 norm of the parameters before the step",
    "nonfinite": "number of NaN or Inf entries in the gradient",
    "step": "optimizer step index (skipped steps included)",
    "epoch": "epoch index (number of end_epoch calls before this step)",
    "wall_time": "Unix time in seconds when the step finished",
    "skipped": "True when the optimizer skipped this step (e.g. GradScaler found Inf/NaN)",
    "layer": "qualified module name (or parameter name with per_parameter=True)",
    "depth": "layer index in module registration order",
    "module_type": "class name of the module owning the parameters",
    "num_params": "number of recorded parameters",
    "num_steps": "optimizer steps in the epoch",
    "lr": "learning rate of each param group when the optimizer stepped (NaN: no lr / group added later)",
    "param_group": "param group: group<j> of the one optimizer, or opt<i>/group<j>",
}
EPOCH_DESCRIPTIONS = {
    "update_mean_abs": "mean |W_end - W_start| over the epoch (Drozdzal et al. 2016, Fig. 4)",
    "update_norm": "L2 norm of W_end - W_start over the epoch",
}


@dataclass
class LayerTable:
    """The recorded layers in registration order (what the ``layer`` coordinates hold)."""

    names: list[str]
    module_types: list[str]
    num_params: list[int]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"layer": np.array(self.names, dtype=str), "depth": np.arange(len(self.names)),
                "module_type": np.array(self.module_types, dtype=str),
                "num_params": np.array(self.num_params, dtype=np.int64)}


def store_url(store: str | os.PathLike) -> str:
    """A local path or fsspec URL as a string; anything else is a user mistake."""
    if isinstance(store, os.PathLike):
        return os.fspath(store)
    if not isinstance(store, str) or not store:
        raise GradflowError(f"store must be a path or URL string, got {store!r}")
    return store


def _path_exists(url: str) -> tuple[bool, bool]:
    """(exists, is a Zarr v3 node) for a local path or fsspec URL."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return False, False
    return True, fs.exists(path.rstrip("/") + "/zarr.json")


def _check_schema(attrs, where: str) -> None:
    schema = attrs.get("gradflow_schema")
    if not isinstance(schema, int):
        raise GradflowError(f"{where} is not a gradflow store")
    if schema > SCHEMA:
        raise GradflowError(f"{where} was written by a newer gradflow (schema {schema}, this one "
                            f"reads up to {SCHEMA}); upgrade gradflow")


def _is_run(node) -> bool:
    return isinstance(node, zarr.Group) and node.attrs.get("gradflow_kind") == "run"


class RunStore:
    """Creates or reopens one run's group and appends to it (called from the writer thread).

    ``next_step``, ``next_epoch`` and ``steps_seen`` tell a resumed Recorder where to continue.
    """

    def __init__(self, url: str, group: str | None, layers: LayerTable, attrs: dict, every: int,
                 per_parameter: bool, mode: str = "a") -> None:
        with _quiet_zarr():
            self._open(url, group, layers, attrs, every, per_parameter, mode)

    def _open(self, url: str, group: str | None, layers: LayerTable, attrs: dict, every: int,
              per_parameter: bool, mode: str) -> None:
        """``mode``: ``"w-"`` refuses an existing run, ``"w"`` replaces it, ``"a"`` resumes it."""
        self.url, self.group = url, group
        self.where = url if not group else f"{url} (group {group!r})"
        exists, is_zarr = _path_exists(url)
        if exists and not is_zarr:
            raise GradflowError(f"{url} exists and is not a Zarr store; choose a new path")
        root = zarr.open_group(url, mode="a", use_consolidated=False)
        self.store = root.store
        if group and _is_run(root):
            raise GradflowError(f"{url} holds a single run at its root; record group {group!r} "
                                f"into another store")
        node = root.get(group) if group else root
        if node is None or (node is root and not list(root.keys()) and not root.attrs.asdict()):
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
            if mode == "w":
                root = _delete_run(root, group)
                self.node = root.require_group(group) if group else root
                self._create(layers, attrs)
                self.epochs = self.node["epochs"]
                return
            self.node = node
            self._resume(layers, every, per_parameter, attrs)
        self.epochs = self.node["epochs"]

    # -- creation and resumption -------------------------------------------------------------

    def _create(self, layers: LayerTable, attrs: dict) -> None:
        node, n_layers = self.node, len(layers.names)
        chunk = max(16, min(CHUNK_STEPS, 2**20 // max(n_layers, 1)))
        layer_coords = "depth module_type num_params"
        for name in STEP_VARIABLES:
            node.create_array(name, shape=(0, n_layers), chunks=(chunk, n_layers), dtype="float32",
                              fill_value=np.nan, dimension_names=("step", "layer"),
                              attributes={"description": DESCRIPTIONS[name],
                                          "coordinates": f"epoch wall_time skipped {layer_coords}"})
        for name, dtype in STEP_COORDS.items():
            node.create_array(name, shape=(0,), chunks=(chunk,), dtype=dtype,
                              fill_value=_fill(dtype), dimension_names=("step",),
                              attributes={"description": DESCRIPTIONS[name]})
        self._create_lr(chunk, param_group_names(attrs), 0)
        epochs = node.require_group("epochs")
        for name in EPOCH_VARIABLES:
            epochs.create_array(name, shape=(0, n_layers), chunks=(CHUNK_EPOCHS, n_layers),
                                dtype="float32", fill_value=np.nan,
                                dimension_names=("epoch", "layer"),
                                attributes={"description": EPOCH_DESCRIPTIONS[name],
                                            "coordinates": layer_coords})
        for name in ("epoch", "num_steps"):
            epochs.create_array(name, shape=(0,), chunks=(CHUNK_EPOCHS,), dtype="int64",
                                fill_value=0, dimension_names=("epoch",),
                                attributes={"description": DESCRIPTIONS[name]})
        for group in (node, epochs):
            for name, values in layers.arrays().items():
                dtype = str if values.dtype.kind == "U" else values.dtype
                array = group.create_array(name, shape=values.shape, dtype=dtype,
                                           dimension_names=("layer",),
                                           attributes={"description": DESCRIPTIONS[name]})
                array[:] = values
        # Marked as gradflow groups last: an interrupted creation leaves no half-made run behind.
        epochs.attrs.update({"gradflow_schema": SCHEMA, "gradflow_kind": "epochs"})
        node.attrs.update({**attrs, "gradflow_schema": SCHEMA, "gradflow_kind": "run",
                           "steps_seen": 0})
        self.next_step = self.next_epoch = self.steps_seen = 0
        self.n_steps = self.n_epochs = 0
        self.commit()

    def _create_lr(self, chunk: int, groups: list[str], n_steps: int) -> None:
        """The ``lr`` step variable (one column per param group) and its ``param_group`` labels."""
        self.node.create_array("lr", shape=(n_steps, len(groups)), chunks=(chunk, max(1, len(groups))),
                               dtype="float64", fill_value=np.nan, dimension_names=("step", "param_group"),
                               attributes={"description": DESCRIPTIONS["lr"]})
        labels = self.node.create_array("param_group", shape=(len(groups),), dtype=str,
                                        dimension_names=("param_group",),
                                        attributes={"description": DESCRIPTIONS["param_group"]})
        labels[:] = np.array(groups, dtype=str)

    def _resume(self, layers: LayerTable, every: int, per_parameter: bool, attrs: dict) -> None:
        node = self.node
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
        if "lr" not in node:  # a store written before lr was recorded: NaN for its earlier steps
            self._create_lr(node["step"].chunks[0], param_group_names(attrs), node["step"].shape[0])
        # What the last complete flush committed, from the consolidated metadata at the root
        # (without it, e.g. written by another tool: the shortest array of each dimension).
        try:
            committed = zarr.open_group(self.store, mode="r", use_consolidated=True)
            cnode = committed[self.group] if self.group else committed
        except (ValueError, KeyError):
            cnode = node
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
        update = {"steps_seen": self.steps_seen}
        if attrs.get("metadata") is not None:
            update["metadata"] = attrs["metadata"]
        node.attrs.update(update)
        self.next_step, self.next_epoch = self.steps_seen, self.n_epochs
        self.commit()

    @property
    def lr_columns(self) -> int:
        """How many param groups the ``lr`` variable has columns for."""
        return int(self.node["lr"].shape[1])

    # -- appending (writer thread) -----------------------------------------------------------

    def append_steps(self, columns: dict[str, np.ndarray]) -> None:
        """Append ``n`` rows: coordinate columns (n,) and variables (n, layers)."""
        n = len(columns["step"])
        for name, values in columns.items():
            _append(self.node[name], self.n_steps, values)
        self.n_steps += n

    def append_epoch(self, columns: dict[str, np.ndarray], scalars: dict[str, float]) -> None:
        """Append one epoch: per-layer figures, ``epoch``/``num_steps`` and the user's scalars."""
        existing = {name for name, _ in self.epochs.arrays()}
        for name, value in scalars.items():
            if name not in existing:
                self.epochs.create_array(name, shape=(self.n_epochs,), chunks=(CHUNK_EPOCHS,),
                                         dtype="float64", fill_value=np.nan,
                                         dimension_names=("epoch",))
        for name, _ in self.epochs.arrays():
            if name in columns:
                _append(self.epochs[name], self.n_epochs, columns[name][None])
            elif name not in LAYER_COORDS:
                _append(self.epochs[name], self.n_epochs,
                        np.array([scalars.get(name, np.nan)], dtype=np.float64))
        self.n_epochs += 1

    def commit(self, steps_seen: int | None = None) -> None:
        """Record the step count and rewrite the consolidated metadata: readers now see the flush."""
        if steps_seen is not None and steps_seen != self.steps_seen:
            self.steps_seen = steps_seen
            self.node.attrs["steps_seen"] = steps_seen
        with _quiet_zarr():
            zarr.consolidate_metadata(self.store)


@contextlib.contextmanager
def _quiet_zarr():
    """Silence zarr's note that consolidated metadata is not in the v3 spec, for one call.

    A local filter, not one set at import: test runners reset filters (and ``-W error`` would turn
    the note into an exception in the user's program). The filter matches only that message.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part",
                                category=UserWarning)
        yield


def _delete_run(root, group: str | None):
    """Delete the gradflow run at ``root`` (its whole store) or at ``root[group]``; returns the root.

    Called only after the node was checked to be a run gradflow wrote (``gradflow_kind="run"``).
    """
    if group:
        del root[group]
        return root
    return zarr.open_group(root.store, mode="w", use_consolidated=False)


def param_group_names(attrs: dict) -> list[str]:
    """``param_group`` labels from the Recorder's ``optimizers`` attrs, in optimizer then group order."""
    optimizers = attrs.get("optimizers") or []
    if len(optimizers) == 1:
        return [f"group{j}" for j in range(len(optimizers[0].get("param_groups", [])))]
    return [f"opt{i}/group{j}" for i, o in enumerate(optimizers) for j in range(len(o.get("param_groups", [])))]


def _fill(dtype: str):
    return {"float64": np.nan, "float32": np.nan, "bool": False}.get(dtype, 0)


def _append(array, start: int, values: np.ndarray) -> None:
    array.resize((start + len(values),) + array.shape[1:])
    array[start:start + len(values)] = values


class BackgroundWriter:
    """Runs store jobs in order on one daemon thread, so Zarr I/O never blocks training.

    A job that fails stops the writer (later jobs would leave the store inconsistent); the error is
    re-raised by the next :meth:`wait` or :meth:`close`.
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
        self.jobs.put(job)

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


OPEN_RETRIES = 40  # × 50 ms: how long a reader waits out a commit that is being written


def open(store: str | os.PathLike, group: str | None = None) -> xr.Dataset | xr.DataTree:  # noqa: A001
    """Open a gradflow store with xarray.

    ``group=None`` opens a run at the store root as an ``xarray.Dataset`` (dims step, layer);
    ``group="epochs"`` its epoch figures (dims epoch, layer); ``group="<variant>"`` /
    ``"<variant>/epochs"`` one run of a sweep store. A store (or group) whose children are runs opens
    as an ``xarray.DataTree`` with one node per run. Arrays are loaded lazily.

    A store may be read while a Recorder writes it: a commit rewrites the root's metadata, and a
    reader that catches it half-way (metadata not yet consolidated, or a partly written file)
    retries for up to two seconds and then sees the last complete flush.
    """
    for attempt in range(OPEN_RETRIES):
        try:
            return _open(store, group)
        except (ValueError, json.JSONDecodeError) as err:
            if isinstance(err, GradflowError) or attempt == OPEN_RETRIES - 1:
                raise
            time.sleep(0.05)


def _open(store: str | os.PathLike, group: str | None) -> xr.Dataset | xr.DataTree:
    url = store_url(store)
    group = group.strip("/") if group else None
    try:
        root = zarr.open_group(url, mode="r")
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        raise GradflowError(f"no gradflow store at {url}") from None
    node = root.get(group) if group else root
    if node is None:
        raise GradflowError(f"{url} has no group {group!r}")
    where = url if not group else f"{url} (group {group!r})"
    if not isinstance(node, zarr.Group):
        raise GradflowError(f"{where} is an array, not a gradflow store")
    consolidated = root.metadata.consolidated_metadata is not None
    options = {"engine": "zarr", "group": group, "consolidated": consolidated, "chunks": None}
    if node.attrs.get("gradflow_kind") in ("run", "epochs"):
        _check_schema(node.attrs, where)
        return xr.open_dataset(url, **options)
    runs = [child for _, child in node.groups() if _is_run(child)]
    if not runs:
        raise GradflowError(f"{where} is not a gradflow store")
    for child in runs:
        _check_schema(child.attrs, f"{url} (group {child.path!r})")
    return xr.open_datatree(url, **options)
