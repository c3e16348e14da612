"""The Recorder: optimizer hooks that record per-layer gradients and real updates into a store.

Attach it to a model and its optimizer(s); nothing else in the training loop changes::

    rec = gradflow.Recorder(model, optimizer, "run.zarr", every=1)
    ...                                  # zero_grad / backward (any number of times) / step
    rec.end_epoch(train_loss=..., val_loss=...)
    rec.close()

How a step is recorded. A *step* (one row of the store) is one optimizer step of every optimizer
passed in. On a recorded step (``step % every == 0``) the optimizer's step pre-hook computes the
gradient figures from the gradient the optimizer is about to use (accumulated, clipped, unscaled:
whatever ``.grad`` holds) and copies the parameters into the Δw snapshot; the post-hook compares
the parameters with the snapshot. All figures of the step go to the host in one copy per device
(:mod:`gradflow.quantities`); the background writer turns them into per-layer rows and appends
them to Zarr (:mod:`gradflow.store`). Steps that are not recorded cost two Python calls.

Several optimizers. A step closes once every optimizer has stepped (or skipped), or when one of
them steps a second time; an optimizer that did not step in a step (a GAN generator stepping once
per k discriminator steps) shows NaN gradient figures and zero update for its layers there.

Buffering. Rows are handed to the writer thread every 1024 recorded steps or, at a step or an
``end_epoch``, when 10 s have passed since the last hand-off; at ``flush()`` and ``close()``; and at
interpreter exit (also after an unhandled exception). Each hand-off is one Zarr commit (~0.1 s of
writer-thread CPU), so many short epochs are batched into one. A hard crash (``os._exit``,
SIGKILL, power) loses only what was not yet committed; everything committed stays readable.

Skipped steps. ``GradScaler.step`` does not call ``optimizer.step()`` when the gradients hold Inf or
NaN, so no step hook fires. A gradient hook on one parameter per optimizer notices when a new round
of gradients starts (``.grad`` was cleared by ``zero_grad()``) although the previous round never
reached ``optimizer.step()``: that round is recorded as a skipped step (``skipped=True``, zero
update; its gradient figures are NaN because the gradients were already cleared when the skip came
to light). A round still waiting for its step at ``end_epoch()`` counts as skipped too; at
``close()`` it does not (training ended, or an exception interrupted the step).
Fused optimizers (``fused=True``) step even when skipping; GradScaler then hands them ``found_inf``,
which marks the step skipped, and ``grad_scale``, by which the recorded gradient is unscaled.
Limitation: with ``zero_grad(set_to_none=False)`` gradients are never cleared to None, so skipped
steps of non-fused optimizers are not detected (they are simply not rows).

Epochs. The weights at the start of each epoch are kept on the host (one copy of the recorded
parameters in CPU memory, so GPU memory stays free); ``end_epoch`` compares them with the current
weights. A user who never calls ``end_epoch`` gets epoch 0 on every step and an empty ``epochs``
group.
"""

from __future__ import annotations

import atexit
import datetime
import json
import math
import threading
import time
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from gradflow import quantities
from gradflow.errors import GradflowError
from gradflow.store import RESERVED_EPOCH_NAMES, BackgroundWriter, LayerTable, RunStore, store_url

FLUSH_ROWS = 1024  # hand buffered rows to the writer after this many recorded steps ...
FLUSH_SECONDS = 10.0  # ... or after this long, whichever comes first (checked at every step and epoch)


@dataclass
class _StepRow:
    step: int
    epoch: int
    wall_time: float
    skipped: bool
    present: np.ndarray  # (tensors,) bool: which tensors had a gradient
    figures: quantities.HostFigures


@dataclass
class _EpochRow:
    epoch: int
    num_steps: int
    scalars: dict[str, float]
    figures: quantities.HostFigures


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_writer_rank() -> bool:
    """Rank 0 writes; other ranks of a torch.distributed job record nothing."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _jsonable(value):
    """Optimizer hyperparameters as JSON (tuples as lists, tensors as numbers, the rest as text)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _optimizer_attrs(optimizer: torch.optim.Optimizer) -> dict:
    groups = [{k: _jsonable(v) for k, v in group.items() if k != "params"}
              for group in optimizer.param_groups]
    return {"class": type(optimizer).__name__, "param_groups": groups}


def _find_layers(model: nn.Module, owner: dict[int, int], per_parameter: bool):
    """Layers (modules owning recorded parameters) in registration order, and their tensors.

    A recorded parameter is one an optimizer owns; a parameter shared by several modules belongs to
    the first. Returns the layer table and, in layer order, (parameter, optimizer index, layer index).
    """
    names, types, counts, tensors, seen = [], [], [], [], set()
    for module_name, module in model.named_modules():
        own = []
        for param_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            qualified = f"{module_name}.{param_name}" if module_name else param_name
            if id(p) not in owner:
                if p.requires_grad:
                    raise GradflowError(f"parameter {qualified!r} is trainable but no optimizer "
                                        f"passed to the Recorder owns it")
                continue
            if p.is_complex() or not p.is_floating_point():
                raise GradflowError(f"parameter {qualified!r} has dtype {p.dtype}; gradflow "
                                    f"records real floating-point parameters")
            own.append((qualified, p))
        groups = [[item] for item in own] if per_parameter else ([own] if own else [])
        for group in groups:
            layer = len(names)
            names.append(group[0][0] if per_parameter else (module_name or "(root)"))
            types.append(type(module).__name__)
            counts.append(sum(p.numel() for _, p in group))
            tensors += [(p, owner[id(p)], layer) for _, p in group]
    return LayerTable(names, types, counts), tensors


def _check_arguments(model, optimizers, every, group, metadata) -> None:
    if not isinstance(model, nn.Module):
        raise GradflowError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
        raise GradflowError("optimizer must be a torch.optim.Optimizer or a list of them")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise GradflowError(f"every must be a positive integer, got {every!r}")
    if group is not None and (not isinstance(group, str) or not group.strip("/")
                              or group.strip("/").split("/")[-1] == "epochs"):
        raise GradflowError(f"group must be a non-empty name other than 'epochs', got {group!r}")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise GradflowError("metadata must be a JSON-able dict")
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise GradflowError(f"metadata must be a JSON-able dict: {err}") from None


def _owners(optimizers: list[torch.optim.Optimizer]) -> dict[int, int]:
    """id(parameter) → index of the optimizer owning it (in any of its param groups)."""
    owner: dict[int, int] = {}
    for i, opt in enumerate(optimizers):
        for group in opt.param_groups:
            for p in group["params"]:
                if owner.setdefault(id(p), i) != i:
                    raise GradflowError("a parameter is owned by two of the optimizers")
    return owner


def _buckets(tensors: list, optimizer: int) -> list[quantities.Bucket]:
    """The optimizer's recorded tensors grouped by (device, dtype), with their layer-order index."""
    by_key: dict[tuple, tuple[list, list]] = {}
    for t, (p, o, _) in enumerate(tensors):
        if o == optimizer:
            params, index = by_key.setdefault((p.device, p.dtype), ([], []))
            params.append(p)
            index.append(t)
    return [quantities.Bucket.build(params, index) for params, index in by_key.values()]


_OPEN: set[Recorder] = set()  # recorders to flush at interpreter exit


def _close_open_recorders() -> None:
    for recorder in list(_OPEN):
        try:
            recorder.close()
        except Exception as err:  # noqa: BLE001 - report, keep closing the others
            warnings.warn(f"gradflow: flushing {recorder!r} at exit failed: {err!r}", stacklevel=1)


def _register_open(recorder: Recorder) -> None:
    """Flush ``recorder`` at interpreter exit unless it is closed before.

    The flush must run before ``concurrent.futures`` shuts its thread pools down (Zarr's local store
    does its file I/O through one), which happens at threading shutdown, before ``atexit``
    callbacks; so the hook goes where ``concurrent.futures`` puts its own.
    """
    if not _OPEN and not getattr(_register_open, "done", False):
        register = getattr(threading, "_register_atexit", atexit.register)
        register(_close_open_recorders)
        _register_open.done = True
    _OPEN.add(recorder)


class Recorder:
    """Record per-layer, per-step gradient and update figures of ``model`` into a Zarr store.

    Args:
        model: the module being trained (DDP / torch.compile wrappers are looked through).
        optimizer: one optimizer or a list of them; together they must own every trainable
            parameter of the model.
        store: local path or fsspec URL (``"memory://run"``, ``"s3://bucket/run.zarr"``). An existing
            store of the same model is appended to (resumed); step and epoch counters continue.
        every: record every ``every``-th optimizer step (steps 0, every, 2·every, …).
        group: sub-group of the store to write into (sweeps: one group per variant).
        per_parameter: one layer per parameter tensor (``conv1.weight``, ``conv1.bias``) instead
            of one per module.
        metadata: JSON-able dict stored in the store's attrs.

    Under torch.distributed only rank 0 records; on other ranks the Recorder does nothing.
    """

    def __init__(self, model: nn.Module, optimizer, store, every: int = 1, group: str | None = None,
                 per_parameter: bool = False, metadata: dict | None = None) -> None:
        optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        _check_arguments(model, optimizers, every, group, metadata)
        url = store_url(store)
        model = unwrap(model)
        if not any(p.requires_grad for p in model.parameters()):
            raise GradflowError(f"{type(model).__name__} has no trainable parameters to record")
        table, tensors = _find_layers(model, _owners(optimizers), per_parameter)
        for i, opt in enumerate(optimizers):
            if not any(o == i for _, o, _ in tensors):
                raise GradflowError(f"optimizer {i} ({type(opt).__name__}) owns none of the "
                                    f"model's parameters")

        self.layers: list[str] = table.names
        self.every = every
        self._closed = True
        self._active = _is_writer_rank()
        if not self._active:
            return

        layer_of = np.array([layer for _, _, layer in tensors])
        self._starts = np.searchsorted(layer_of, np.arange(len(table.names)))
        self._numel = np.array(table.num_params, dtype=np.float64)
        self._num_tensors = len(tensors)
        self._tensors_of = [np.array([t for t, (_, o, _) in enumerate(tensors) if o == i])
                            for i in range(len(optimizers))]

        import gradflow

        attrs = {"gradflow_version": gradflow.__version__, "torch_version": torch.__version__,
                 "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                 "optimizers": [_optimizer_attrs(o) for o in optimizers], "every": every,
                 "per_parameter": bool(per_parameter), "metadata": metadata or {},
                 "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        self._store = RunStore(url, group.strip("/") if group else None, table, attrs, every,
                               bool(per_parameter))
        self._writer = BackgroundWriter(f"gradflow-writer:{url}")

        self._buckets = [_buckets(tensors, i) for i in range(len(optimizers))]

        n = len(optimizers)
        self._step = self._store.next_step  # index of the open (or next) step
        self._epoch = self._store.next_epoch
        self._epoch_steps = 0
        self._row_open = False
        self._recording = False
        self._resolved: list[str | None] = [None] * n  # per optimizer: None, "step" or "skip"
        self._awaiting = [False] * n  # a round of gradients arrived and was not stepped yet
        self._skips: list[int] = []  # optimizers whose previous round was skipped (seen in backward)
        self._parts: list = []
        self._present: np.ndarray | None = None
        self._pending_steps: list[_StepRow] = []
        self._pending_epochs: list[_EpochRow] = []
        self._last_handoff = time.monotonic()

        with torch.no_grad():
            for bucket in self._all_buckets():
                bucket.start_epoch()
        self._hooks = []
        for i, opt in enumerate(optimizers):
            self._hooks.append(opt.register_step_pre_hook(partial(self._before_step, i)))
            self._hooks.append(opt.register_step_post_hook(partial(self._after_step, i)))
            sentinel = next((p for p, o, _ in tensors if o == i and p.requires_grad), None)
            if sentinel is not None:  # an optimizer of frozen parameters never gets gradients
                self._hooks.append(sentinel.register_hook(partial(self._on_gradient, i, sentinel)))
        self._closed = False
        _register_open(self)

    # -- public API ---------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Index the next (or currently running) optimizer step will get."""
        return self._step if self._active else 0

    @property
    def epoch(self) -> int:
        """Index of the current epoch (number of ``end_epoch`` calls, continued on resume)."""
        return self._epoch if self._active else 0

    def end_epoch(self, **scalars: float) -> None:
        """Close an epoch: store mean |W_end − W_start| per layer and the given scalars.

        Any float keyword is stored as a per-epoch variable (``train_loss``, ``val_loss``,
        ``val_accuracy`` …); an epoch that omits a scalar given in another epoch gets NaN there.
        """
        values = {}
        for name, value in scalars.items():
            if name in RESERVED_EPOCH_NAMES:
                raise GradflowError(f"end_epoch: {name!r} is a reserved name; choose another")
            try:
                values[name] = math.nan if value is None else float(value)
            except (TypeError, ValueError):
                raise GradflowError(f"end_epoch: {name}={value!r} is not a number") from None
        if self._closed:
            if self._active:
                raise GradflowError("end_epoch called on a closed Recorder")
            return
        self._take_skips()
        self._close_boundary_row()
        with torch.no_grad():
            parts = [part for bucket in self._all_buckets() for part in bucket.end_epoch()]
        self._pending_epochs.append(
            _EpochRow(self._epoch, self._epoch_steps, values, quantities.to_host(parts)))
        self._epoch += 1
        self._epoch_steps = 0
        if time.monotonic() - self._last_handoff > FLUSH_SECONDS:
            self._handoff()  # short epochs are batched: each hand-off costs a Zarr commit

    def flush(self) -> None:
        """Write everything recorded so far and wait until it is committed to the store."""
        if self._closed:
            return
        self._handoff()
        self._writer.wait()

    def close(self) -> None:
        """Flush, detach the hooks and stop the writer. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        for hook in self._hooks:
            hook.remove()
        try:
            self._take_skips()
            if self._row_open:
                self._close_row()
            self._handoff()
        finally:
            self._writer.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Recorder({len(self.layers)} layers, every={self.every}, step={self.step}, "
                f"epoch={self.epoch}{', closed' if self._closed else ''})")

    # -- hooks --------------------------------------------------------------------------------

    def _before_step(self, i: int, optimizer, args, kwargs) -> None:
        if self._closed:
            return
        self._take_skips()
        if self._row_open and self._resolved[i] is not None:
            self._close_row()  # this optimizer steps again: a new step starts
        if not self._row_open:
            self._open_row()
        self._awaiting[i] = False
        if not self._recording:
            return
        grad_scale = getattr(optimizer, "grad_scale", None)
        found_inf = getattr(optimizer, "found_inf", None)
        with torch.no_grad():
            for bucket in self._buckets[i]:
                self._check_device(bucket)
                self._parts += bucket.before_step(self._present, grad_scale)
            if isinstance(found_inf, torch.Tensor):
                flag = found_inf.reshape(1).float().clone()  # GradScaler's tensor: keep our own
                self._parts.append((quantities.FOUND_INF, None, flag))

    def _after_step(self, i: int, optimizer, args, kwargs) -> None:
        if self._closed or not self._row_open:
            return
        self._resolved[i] = "step"
        if self._recording:
            with torch.no_grad():
                for bucket in self._buckets[i]:
                    self._parts += bucket.after_step()
        if all(r is not None for r in self._resolved):
            self._close_row()

    def _on_gradient(self, i: int, sentinel: torch.Tensor, grad: torch.Tensor) -> None:
        """Backward reached optimizer ``i``'s sentinel parameter; notice a skipped previous round."""
        if self._closed or sentinel.grad is not None:
            return  # accumulating into an existing gradient: same round
        if self._awaiting[i]:
            self._skips.append(i)  # handled on the training thread at the next step / epoch end
        self._awaiting[i] = True

    # -- step bookkeeping ---------------------------------------------------------------------

    def _all_buckets(self):
        return [bucket for buckets in self._buckets for bucket in buckets]

    def _check_device(self, bucket: quantities.Bucket) -> None:
        if not bucket.check_device():
            raise GradflowError("parameters changed device or dtype after the Recorder was created; "
                                "create the Recorder after model.to(...)")

    def _open_row(self) -> None:
        self._row_open = True
        self._recording = self._step % self.every == 0
        if self._recording:
            self._parts = []
            self._present = np.ones(self._num_tensors, dtype=bool)

    def _take_skips(self) -> None:
        """Record the rounds of gradients that never reached their optimizer's step."""
        skips, self._skips = self._skips, []
        for i in skips:
            if self._row_open and self._resolved[i] is not None:
                self._close_row()
            if not self._row_open:
                self._open_row()
            self._resolved[i] = "skip"
            if all(r is not None for r in self._resolved):
                self._close_row()

    def _close_boundary_row(self) -> None:
        """At end_epoch/close: gradients still waiting for a step mean that step was skipped."""
        waiting = [i for i, w in enumerate(self._awaiting) if w and self._resolved[i] is None]
        if waiting and not self._row_open:
            self._open_row()
        for i in waiting:
            self._resolved[i] = "skip"
            self._awaiting[i] = False
        if self._row_open:
            self._close_row()

    def _close_row(self) -> None:
        skipped = "skip" in self._resolved
        if self._recording:
            with torch.no_grad():
                for i, state in enumerate(self._resolved):
                    if state != "step":
                        for bucket in self._buckets[i]:
                            self._parts += bucket.idle()
                        self._present[self._tensors_of[i]] = False
            self._pending_steps.append(_StepRow(self._step, self._epoch, time.time(), skipped,
                                                self._present, quantities.to_host(self._parts)))
            self._parts, self._present = [], None
        self._row_open = False
        self._resolved = [None] * len(self._resolved)
        self._step += 1
        self._epoch_steps += 1
        if self._pending_steps and (len(self._pending_steps) >= FLUSH_ROWS
                                    or time.monotonic() - self._last_handoff > FLUSH_SECONDS):
            self._handoff()

    # -- writing ------------------------------------------------------------------------------

    def _handoff(self) -> None:
        """Give the buffered rows to the writer thread (non-blocking); surface a failed write."""
        if self._writer.error is not None:
            self._writer.wait()  # re-raises: the store cannot take more rows
        steps, epochs = self._pending_steps, self._pending_epochs
        self._pending_steps, self._pending_epochs = [], []
        self._last_handoff = time.monotonic()
        self._writer.submit(partial(self._write, steps, epochs, self._step))

    def _write(self, steps: list[_StepRow], epochs: list[_EpochRow], steps_seen: int) -> None:
        """Writer thread: per-tensor figures → per-layer rows → Zarr, then commit."""
        if steps:
            per_tensor = np.empty((len(steps), quantities.NUM_FIGURES, self._num_tensors))
            skipped = np.empty(len(steps), dtype=bool)
            for k, row in enumerate(steps):
                per_tensor[k], found_inf = row.figures.resolve(quantities.NUM_FIGURES,
                                                               self._num_tensors)
                skipped[k] = row.skipped or found_inf > 0
            present = np.stack([row.present for row in steps])
            columns = quantities.layer_step_figures(per_tensor, present, self._starts, self._numel)
            columns.update(step=np.array([r.step for r in steps], dtype=np.int64),
                           epoch=np.array([r.epoch for r in steps], dtype=np.int64),
                           wall_time=np.array([r.wall_time for r in steps]), skipped=skipped)
            self._store.append_steps(columns)
        for row in epochs:
            per_tensor, _ = row.figures.resolve(2, self._num_tensors)
            columns = quantities.layer_epoch_figures(per_tensor, self._starts, self._numel)
            columns.update(epoch=np.array(row.epoch), num_steps=np.array(row.num_steps))
            self._store.append_epoch(columns, row.scalars)
        self._store.commit(steps_seen)
