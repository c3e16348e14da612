"""The Recorder: optimizer hooks that record per-layer gradients and real updates into a store.

Attach it to a model and its optimizer(s); nothing else in the training loop changes::

    rec = gradflow.Recorder(model, optimizer, "run.zarr", every=1)
    ...                                  # zero_grad / backward / step, or step(closure)
    rec.end_epoch(train_loss=..., val_loss=...)
    rec.close()

What a row is. A row of the store is one optimizer step: one ``step()`` call of every optimizer
passed in. Rows are made by the optimizers' step hooks only, never inferred from when gradients
arrive, so probe backward passes, GAN losses that backpropagate through the other network, LBFGS's
inner evaluations and gradient accumulation add no rows. With several optimizers a row closes when
each has stepped once, or when one steps a second time (a GAN generator stepping once per k
discriminator steps): an optimizer that did not step in a row shows NaN gradient statistics and zero
update for its layers there.

Which gradient. On a recorded step (``step % every == 0``) the step pre-hook copies the parameters
into the Δw snapshot and computes the gradient statistics from what ``.grad`` holds when the optimizer
takes it: at the pre-hook for ``step()``; for ``step(closure)`` right after the closure's first
evaluation (the closure computes the gradient: Lightning's default, LBFGS, SAM). LBFGS evaluates
its closure several times in one ``step()``: the recorded gradient is the first evaluation's, the
gradient at w_before from which the step starts; Δw is the change over the whole ``step()``. The
post-hook compares the parameters with the snapshot. All statistics of the step go to the host in one
copy per device (:mod:`gradflow.quantities`); the background writer turns them into per-layer rows
and appends them to Zarr (:mod:`gradflow.store`). Steps that are not recorded cost two Python calls.

Skipped steps come only from a real signal, never from a guess:

* a fused optimizer (``fused=True``) under GradScaler gets ``found_inf`` (the step is marked
  skipped) and ``grad_scale`` (the recorded gradient is unscaled by it);
* ``Recorder(..., scaler=scaler)``: when ``scaler.step(optimizer)`` returns without calling
  ``optimizer.step()`` (found Inf/NaN), the step is recorded as skipped with the (unscaled)
  gradients it refused, non-finite counts per layer included, and zero update;
* ``rec.skip_step()``: the training loop's own decision (``if not finite: continue``): the step is
  recorded as skipped with the gradients ``.grad`` holds at the call (non-finite counts per layer:
  which layer held the NaN) and zero update. Call it before the gradients are cleared.

A step the optimizer never takes and nobody reports (GradScaler without ``scaler=``, a guard without
``skip_step()``) is no row: the store holds the steps that were taken.

Parameters and layers. Every parameter of the model is a layer coordinate from the start (a layer is
a module that directly owns parameters, or a parametrized one: weight_norm's ``original0/1`` and any
parameter a parametrization learns). One that no optimizer owns (yet) has NaN gradient statistics,
``param_norm`` and ``update_ratio`` and zero update; a layer owned in part (a frozen weight, a
trained bias) has them over all its parameters. A param group added later
(``optimizer.add_param_group``, gradual unfreezing) is noticed at that optimizer's next step (one
``len(param_groups)`` check per step) and recorded from that step on.

Optimizer wrappers: accelerate's ``AcceleratedOptimizer`` and Lightning's ``LightningOptimizer`` are
unwrapped; SAM-style optimizers (a ``base_optimizer`` sharing their param groups, whose
``first_step``/``second_step`` move the weights) must be given as ``optimizer.base_optimizer``, whose
``step()`` is the real update. The hooks are excluded from ``torch.compile`` (``torch.compiler.disable``).

Buffering. Rows are handed to the writer thread every 1024 recorded steps or, at a step or an
``end_epoch``, when 10 s have passed since the last hand-off; at ``flush()`` and ``close()``; at
interpreter exit (also after an unhandled exception); and on SIGTERM (chained to the handler that
was there before). Each hand-off is one Zarr commit, one append per array, so many short epochs
cost one commit. A hand-off waits while the previous one is still being written (back-pressure), so
a hard crash (``os._exit``, SIGKILL, power) loses at most the buffer and the commit in flight;
everything committed stays readable. A failed write keeps its rows for the next hand-off and warns
once (:class:`~gradflow.errors.GradflowWarning`); ``WRITE_ATTEMPTS`` failures in a row stop recording,
never training.

Threads. Hooks and public methods run under one lock. ``end_epoch`` from another thread while a
step is under way takes effect when that step ends, so epoch boundaries fall between steps.

Epochs. The weights at the start of each epoch are kept on the host (one copy of the recorded
parameters in CPU memory, so GPU memory stays free); ``end_epoch`` compares them with the current
weights (parameters that joined mid-epoch: from the step they joined). A user who never calls
``end_epoch`` gets epoch 0 on every step and an empty ``epochs`` group.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import json
import math
import numbers
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from gradflow import buckets, distributed, quantities
from gradflow.errors import GradflowError, GradflowWarning
from gradflow.store import (RESERVED_EPOCH_NAMES, BackgroundWriter, LayerTable, Rows, RunStore,
                            node_name_problem, store_url)

FLUSH_ROWS = 1024  # hand buffered rows to the writer when the store's rows reach a multiple of this ...
FLUSH_SECONDS = 10.0  # ... or after this long, whichever comes first (checked at every step and epoch)
WRITE_ATTEMPTS = 8  # consecutive failed flushes (kept rows retried each time) before recording stops
MODES = ("w-", "w", "a")
# Optimizer wrappers handed out by frameworks: (module, class name) → attribute holding the optimizer.
WRAPPERS = {("accelerate.optimizer", "AcceleratedOptimizer"): "optimizer",
            ("lightning.pytorch.core.optimizer", "LightningOptimizer"): "_optimizer",
            ("pytorch_lightning.core.optimizer", "LightningOptimizer"): "_optimizer"}


@dataclass
class _StepRow:
    step: int
    epoch: int
    wall_time: float
    skipped: bool
    present: np.ndarray | None  # (tensors,) bool: which tensors had a gradient (None: in stats)
    owned: np.ndarray  # (tensors,) bool: which tensors an optimizer owned
    stats: quantities.HostStats
    lr: np.ndarray | None = None  # (param groups,) float64: each group's lr at this step


@dataclass
class _EpochRow:
    epoch: int
    num_steps: int
    scalars: dict[str, float]
    stats: quantities.HostStats


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel / FSDP1 / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif distributed.inner_module(model) is not None:
            model = distributed.inner_module(model)
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's / Lightning's wrappers (anything else: itself)."""
    while True:
        inner = next((getattr(optimizer, attr, None) for cls in type(optimizer).__mro__
                      for (module, name), attr in WRAPPERS.items()
                      if cls.__module__ == module and cls.__name__ == name), None)
        if inner is None:
            return optimizer
        optimizer = inner


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


def _optimizer_attrs(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict:
    """The optimizer's class and param groups (hyperparameters, and the names of the model's
    parameters each holds, ``names``: by ``id``; what a resume compares, :mod:`gradflow.store`)."""
    groups = [{**{k: _jsonable(v) for k, v in group.items() if k != "params"},
               "params": [names.get(id(p), "?") for p in group["params"]]}
              for group in optimizer.param_groups]
    return {"class": type(optimizer).__name__, "param_groups": groups}


def group_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The ``lr`` of each param group as the optimizer sees it now (NaN for a group without one)."""
    return [float(g["lr"]) if isinstance(g.get("lr"), (int, float, torch.Tensor)) else math.nan
            for g in optimizer.param_groups]


def _find_layers(model: nn.Module, owner: dict[int, int], per_parameter: bool, numel=None):
    """Layers (modules owning parameters) in registration order, and their tensors.

    Every real floating-point parameter of the model is recorded, owned by an optimizer or not
    (yet); a parameter shared by several modules belongs to the first. Returns the layer table and,
    in layer order, (parameter, optimizer index or -1, layer index). Names and module types are the
    unwrapped model's (no FSDP wrapper parts); ``numel(p)`` gives a parameter's unsharded size.
    """
    numel = numel or (lambda p: p.numel())
    names, types, counts, tensors, seen = [], [], [], [], set()
    for module_name, module in model.named_modules():
        module_name = distributed.clean_name(module_name)
        own = []
        for param_name, p in _own_parameters(module):
            if id(p) in seen:
                continue
            seen.add(id(p))
            qualified = f"{module_name}.{param_name}" if module_name else param_name
            if p.is_meta:
                raise GradflowError(f"parameter {qualified!r} is on the meta device (no data yet); "
                                    f"create the Recorder after the weights are materialised "
                                    f"(to_empty / load_state_dict)")
            if p.is_complex() or not p.is_floating_point():
                if id(p) in owner:
                    raise GradflowError(f"parameter {qualified!r} has dtype {p.dtype}; gradflow "
                                        f"records real floating-point parameters")
                continue
            own.append((qualified, p))
        groups = [[item] for item in own] if per_parameter else ([own] if own else [])
        for group in groups:
            layer = len(names)
            names.append(group[0][0] if per_parameter else (module_name or "(root)"))
            types.append(distributed.module_type(module))
            counts.append(sum(numel(p) for _, p in group))
            tensors += [(p, owner.get(id(p), -1), layer) for _, p in group]
    return LayerTable(names, types, counts), tensors


def _own_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters a layer owns: its direct ones and, for a parametrized module
    (``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm``, ``parametrize``), every
    parameter its parametrizations hold: the originals (``parametrizations.weight.original0``) and
    a parametrization's own (a learnt scale, minLoRA's A and B: ``parametrizations.weight.0.A``),
    so that a weight-normed ``fc`` is one layer, not ``fc`` (its bias), ``fc.parametrizations.weight``
    and ``fc.parametrizations.weight.0``."""
    own = []
    if parametrize.is_parametrized(module):
        own = [(f"parametrizations.{name}", p)
               for name, p in module.parametrizations.named_parameters()]
    return own + list(module.named_parameters(recurse=False))


def _check_optimizers(optimizers: list) -> list[torch.optim.Optimizer]:
    """The real torch optimizers behind ``optimizers``; a one-line error for anything else."""
    if not optimizers:
        raise GradflowError("optimizer must be a torch.optim.Optimizer or a list of them")
    real = []
    for i, given in enumerate(optimizers):
        opt = unwrap_optimizer(given)
        what = f"optimizer {i} ({type(given).__name__})" if len(optimizers) > 1 \
            else f"optimizer ({type(given).__name__})"
        if not isinstance(opt, torch.optim.Optimizer) \
                or not hasattr(opt, "_optimizer_step_pre_hooks"):
            raise GradflowError(f"{what} is not a torch.optim.Optimizer (nor an accelerate or "
                                f"Lightning wrapper of one); pass the torch optimizer it wraps")
        base = getattr(opt, "base_optimizer", None)
        if isinstance(base, torch.optim.Optimizer) and base.param_groups is opt.param_groups:
            raise GradflowError(f"{what} is SAM-style (its base_optimizer makes the real update); "
                                f"pass optimizer.base_optimizer to the Recorder")
        real.append(opt)
    return real


def _check_arguments(model, every, group, metadata, mode, scaler, flags: dict) -> None:
    if not isinstance(model, nn.Module):
        raise GradflowError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise GradflowError(f"{name} must be True or False, got {value!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise GradflowError(f"every must be a positive integer, got {every!r}")
    if group is not None and (not isinstance(group, str) or group.strip("/") == "epochs"
                              or node_name_problem(group.strip("/"))):
        raise GradflowError(f"group must be one name (a sweep's variant: no '/', not 'epochs', "
                            f"'.' or '..'), got {group!r}")
    if mode not in MODES:
        raise GradflowError(f"mode must be 'w-' (new store), 'w' (overwrite) or 'a' (resume), "
                            f"got {mode!r}")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise GradflowError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
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


def _buckets(tensors: list, index: list[int], snapshot: bool = True) -> list:
    """Tensors ``index`` (of ``tensors``) grouped by (device, dtype), each with its layer-order index.

    Tensors whose local shard is empty (FSDP) take no part here (their statistics are the other ranks').
    """
    by_key: dict[tuple, tuple[list, list]] = {}
    for t in index:
        p = tensors[t][0]
        local = quantities._local(p)
        if local.numel() == 0:
            continue
        params, indices = by_key.setdefault((local.device, local.dtype), ([], []))
        params.append(p)
        indices.append(t)
    return [buckets.build(params, indices, snapshot) for params, indices in by_key.values()]


# torch wraps every optimizer class's step() in this function (it runs the hooks); a subclass whose
# step() calls super().step() runs it twice, nested.
_STEP_WRAPPER = torch.optim.Optimizer.profile_hook_step(lambda self: None).__code__


def _step_frame():
    """The innermost frame of torch's step wrapper on the current stack (None if not found)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not _STEP_WRAPPER:
        frame = frame.f_back
    return frame


def _calls_from(frame, outer) -> bool:
    """Whether ``frame`` runs inside ``outer`` (a proper ancestor on the current stack)."""
    frame = None if frame is None else frame.f_back
    while frame is not None:
        if frame is outer:
            return True
        frame = frame.f_back
    return False


def _on_stack(frame) -> bool:
    """Whether ``frame`` is on the calling thread's stack (a call still running)."""
    current = sys._getframe(1)
    while current is not None:
        if current is frame:
            return True
        current = current.f_back
    return False


def _closure_of(args: tuple, kwargs: dict):
    """The closure passed to ``optimizer.step`` (args[0] is the optimizer itself), or None."""
    return args[1] if len(args) > 1 else kwargs.get("closure")


_OPEN: set[Recorder] = set()  # recorders to flush at interpreter exit and on SIGTERM


def _close_open_recorders() -> None:
    for recorder in list(_OPEN):
        try:
            recorder.close()
        except Exception as err:  # noqa: BLE001 - report, keep closing the others
            warnings.warn(f"gradflow: flushing {recorder!r} at exit failed: {err!r}", stacklevel=1)


def _register_open(recorder: Recorder) -> None:
    """Flush ``recorder`` at interpreter exit (and on SIGTERM) unless it is closed before.

    The flush must run before ``concurrent.futures`` shuts its thread pools down (Zarr's local store
    does its file I/O through one), which happens at threading shutdown, before ``atexit``
    callbacks; so the hook goes where ``concurrent.futures`` puts its own.
    """
    if not _OPEN and not getattr(_register_open, "done", False):
        register = getattr(threading, "_register_atexit", atexit.register)
        register(_close_open_recorders)
        _register_open.done = True
    _OPEN.add(recorder)
    _install_sigterm()


_previous_sigterm = None  # the handler ours replaced
_in_sigterm = False


def _forget_after_fork() -> None:
    """A forked child (a DataLoader worker) does not own its parent's recorders (their writer
    threads did not survive the fork): it must not flush them on SIGTERM or at exit."""
    _OPEN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _install_sigterm() -> None:
    """Flush open recorders on SIGTERM, then hand the signal on (see :func:`_on_sigterm`).

    Installed when a Recorder is created and SIGTERM's handler is not ours (it wraps the handler
    that is there). Only the main thread may install signal handlers: a Recorder created in another
    thread does not flush on SIGTERM.
    """
    global _previous_sigterm
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous is _on_sigterm:
            return
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError, AttributeError):  # no SIGTERM here, or not the main interpreter
        return
    _previous_sigterm = signal.SIG_DFL if previous is None else previous


def _on_sigterm(signum, frame) -> None:
    """Commit every open recorder's rows, then do what SIGTERM did before: call the handler that
    was installed before ours, ignore the signal if it was ignored, or terminate as by default.

    Recorders stay open (a handler that lets training go on keeps recording). A recorder whose
    own code the signal interrupted on this thread commits what it had already handed off.
    """
    global _in_sigterm
    if _in_sigterm:  # a handler we chained to chains back to us
        return
    _in_sigterm = True
    try:
        _flush_all_for_signal()
    finally:
        _in_sigterm = False
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _flush_all_for_signal() -> None:
    for recorder in list(_OPEN):
        try:
            recorder._flush_for_signal()
        except Exception as err:  # noqa: BLE001 - never stand between the user and the signal
            warnings.warn(f"gradflow: flushing {recorder!r} on SIGTERM failed: {err!r}",
                          GradflowWarning, stacklevel=1)


def _synchronized(method):
    """Run ``method`` under the recorder's lock: hooks and public methods may come from several
    threads (a validation thread calling ``end_epoch``)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


def _one_number(name: str, value) -> float:
    """``value`` as a float for :meth:`Recorder.end_epoch` (the rule in its docstring)."""
    if value is None:
        return math.nan
    number, shown = value, repr(value)
    if isinstance(value, torch.Tensor):
        real = not (value.dtype.is_complex or value.dtype == torch.bool)
        number = value.item() if value.numel() == 1 and real else None
        shown = f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    elif isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        number = array.item() if array.size == 1 and array.dtype.kind in "iuf" else None
        shown = f"a {array.dtype} array of shape {array.shape}" if isinstance(value, np.ndarray) else shown
    if isinstance(number, numbers.Real) and not isinstance(number, (bool, np.bool_)):
        try:
            return float(number)
        except OverflowError:
            pass
    raise GradflowError(f"end_epoch: {name}={shown[:80]} is not a number: give one real number (an int or "
                        f"float, or an array or tensor of exactly one element)")


class Recorder:
    """Record per-layer, per-step gradient and update statistics of ``model`` into a Zarr store.

    Args:
        model: the module being trained (DDP / torch.compile wrappers are looked through). Every
            parameter is a layer coordinate; those no optimizer owns (yet) are NaN / zero update.
        optimizer: one optimizer or a list of them (accelerate / Lightning wrappers are unwrapped;
            for SAM pass ``sam.base_optimizer``). A row is one ``step()`` of each.
        store: local path or fsspec URL (``"memory://run"``, ``"s3://bucket/run.zarr"``), not
            inside another Zarr store's folder (``"sweep.zarr/v1"``: pass ``group="v1"``). One
            writer per run: GradflowError while another Recorder (this process or another) writes
            it (:mod:`gradflow.lock`); a resumed run (``mode="a"``) starts a new epoch.
        every: record every ``every``-th optimizer step (steps 0, every, 2·every, …).
        group: sub-group of the store to write into (sweeps: one group per variant): one name,
            without ``/`` (``gradflow.open`` and the commands look one level down for runs); a
            store holding a single run or another tool's data is refused.
        per_parameter: one layer per parameter tensor (``conv1.weight``, ``conv1.bias``) instead
            of one per module.
        metadata: JSON-able dict stored in the store's attrs.
        mode: as xarray's ``to_zarr``: ``"w-"`` (default) creates the run and refuses an existing
            one; ``"w"`` overwrites an existing gradflow run (only a run gradflow wrote: anything
            else is refused, nothing is deleted); ``"a"`` resumes an existing run of the same
            model, ``every``, ``per_parameter``, optimizer classes and param group counts (step and
            epoch counters continue) or creates it.
        scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop, so that the steps it skips
            (Inf/NaN gradients) are recorded as skipped rows (fused optimizers need no scaler).
        snapshot: keep the Δw snapshot and the epoch-start copy (each one copy of the recorded
            parameters, in their own dtype). ``False`` records gradient statistics and ‖w‖ only:
            the update statistics and epoch statistics are NaN, and no parameter copy is kept.

    Raises:
        GradflowError: on any bad argument, before the store is created or touched.

    Under torch.distributed rank 0 writes. With DDP (whole parameters on every rank) the other
    ranks do nothing; with FSDP1/FSDP2/HSDP every rank computes statistics of its shards and they are
    combined over the shard group (:mod:`gradflow.distributed`), so every rank must create the
    Recorder, step, call ``end_epoch`` and ``close`` alike.
    """

    def __init__(self, model: nn.Module, optimizer, store, every: int = 1, group: str | None = None,
                 per_parameter: bool = False, metadata: dict | None = None, mode: str = "w-",
                 scaler: torch.amp.GradScaler | None = None, snapshot: bool = True) -> None:
        given = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        _check_arguments(model, every, group, metadata, mode, scaler,
                         {"per_parameter": per_parameter, "snapshot": snapshot})
        optimizers = _check_optimizers(given)
        url = store_url(store)
        wrapped, model = model, unwrap(model)
        if not any(p.requires_grad for p in model.parameters()):
            raise GradflowError(f"{type(model).__name__} has no trainable parameters to record")
        owners = _owners(optimizers)
        sharding = distributed.sharding(wrapped, [p for p in model.parameters() if id(p) in owners])
        table, tensors = _find_layers(model, owners, per_parameter,
                                      sharding.global_numel if sharding else None)
        for i, opt in enumerate(optimizers):
            if not any(o == i for _, o, _ in tensors):
                raise GradflowError(f"optimizer {i} ({type(opt).__name__}) owns none of the "
                                    f"model's parameters")

        self.layers: list[str] = table.names
        self.every = every
        self._closed = True
        self._lock = threading.RLock()  # hooks and public methods, whatever thread calls them
        self._writes = _is_writer_rank()
        self._active = self._writes or sharding is not None  # shards: every rank computes
        self._snapshot = bool(snapshot)
        # Epoch variable names by their case-folded form: two names one case apart are one array
        # on a case-insensitive file system (macOS, Windows), so end_epoch refuses the second
        # (on every rank: a replica checks the names its end_epoch calls give, as rank 0 does).
        self._epoch_names = {name.casefold(): name for name in sorted(RESERVED_EPOCH_NAMES)}
        if not self._active:
            return

        layer_of = np.array([layer for _, _, layer in tensors])
        self._starts = np.searchsorted(layer_of, np.arange(len(table.names)))
        self._numel = np.array(table.num_params, dtype=np.float64)
        self._num_tensors = len(tensors)
        self._tensors = tensors
        self._index = {id(p): t for t, (p, _, _) in enumerate(tensors)}
        self._owner = np.array([o for _, o, _ in tensors])
        self._owned = self._owner >= 0  # replaced (not changed in place) when a param group joins
        self._optimizers = optimizers
        n = len(optimizers)
        self._tensors_of = [np.flatnonzero(self._owner == i) for i in range(n)]
        self._num_groups = [len(opt.param_groups) for opt in optimizers]
        self._param_names = {id(p): distributed.clean_name(name)
                             for name, p in model.named_parameters()}

        import gradflow

        attrs = {"gradflow_version": gradflow.__version__, "torch_version": torch.__version__,
                 "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                 "optimizers": [_optimizer_attrs(o, self._param_names) for o in optimizers],
                 "every": every,
                 "per_parameter": bool(per_parameter), "metadata": metadata or {},
                 "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        self._store = self._writer = None
        try:
            if self._writes:
                try:
                    self._store = RunStore(url, group.strip("/") if group else None, table, attrs,
                                           every, bool(per_parameter), mode=mode)
                except OSError as err:  # a folder that cannot be made, no permission, disk full
                    doing = "open the store" if mode == "a" else "create the store"
                    raise GradflowError(f"cannot {doing} {url} for writing: "
                                        f"{err.strerror or err}") from None
                self._writer = BackgroundWriter(f"gradflow-writer:{url}")
        finally:  # under sharding, all ranks fail together (no rank left waiting in a collective)
            if sharding is not None:
                distributed.agree(self._store is not None or not self._writes,
                                  "rank 0 could not create the Recorder's store (see its error)")
        self._reducer = None
        # Zero-element tensors (local shards) take no part in the buckets (see _buckets).
        self._empty = np.array([quantities._local(p).numel() == 0 for p, _, _ in tensors], bool)
        if sharding is not None:
            self._reducer = distributed.Reducer(sharding.group, len(tensors), self._empty)
        # The run's `optimizers` attribute, kept current when param groups join (written at the next
        # hand-off), so that a resume with those groups matches it (RunStore._resume).
        self._described = json.loads(json.dumps(self._store.optimizers)) if self._writes else None
        self._described_due = False
        self._write_failures = 0  # consecutive failed flushes (their rows are kept and retried)
        self._error: BaseException | None = None  # the last write failure, None once written
        self._stopped = False  # recording stopped after WRITE_ATTEMPTS failed flushes
        self._deferred_epochs: list[dict[str, float]] = []  # end_epoch from another thread
        self._row_thread = threading.get_ident()  # the thread running the optimizer steps

        self._buckets = [_buckets(tensors, list(self._tensors_of[i]), self._snapshot)
                         for i in range(n)]
        self._frozen = self._frozen_buckets()
        self._lrs: list[list[float] | None] = [None] * n  # per optimizer, at its step

        self._step = self._store.next_step if self._writes else 0  # the open (or next) step
        self._epoch = self._store.next_epoch if self._writes else 0
        if self._writes:  # and the names of the run's epochs so far (a resume)
            self._epoch_names.update({name.casefold(): name for name in self._store.epoch_names})
        if sharding is not None:  # resuming: every rank continues rank 0's counters
            counters = torch.tensor([self._step, self._epoch], dtype=torch.float64)
            counters = counters.to(self._reducer.device)
            torch.distributed.broadcast(counters, 0)
            self._step, self._epoch = (int(v) for v in counters.tolist())
        self._epoch_steps = 0
        self._row_open = False
        self._recording = False
        # per optimizer: None, "step", "skip" or "raised" (its step() raised: _drop_unfinished)
        self._resolved: list[str | None] = [None] * n
        self._grad_due = [False] * n  # the step's gradient statistics are still to be taken
        self._grad_scale: list = [None] * n
        self._step_calls = [0] * n  # pre-hook calls, to see a GradScaler step that did not step
        self._outer: list = [None] * n  # frame of the step() call in progress (see _step_frame)
        self._mark = [0] * n  # len(self._parts) when that step() began (see _drop_unfinished)
        self._parts: list = []
        self._present: np.ndarray | None = None
        self._pending_steps: list[_StepRow] = []
        self._pending_epochs: list[_EpochRow] = []
        # Step rows handed to the writer (or already in the store): count-driven hand-offs end
        # where this reaches a multiple of FLUSH_ROWS, which every step chunk divides, so they
        # write whole chunks only, also after a short (timed, explicit, resumed) one.
        self._rows_handed = self._store.n_steps if self._writes else 0
        self._last_handoff = time.monotonic()
        self._ending_epoch = False
        self._in_handoff = False

        with torch.no_grad():
            for bucket in self._all_buckets():
                bucket.start_epoch()
        # Hooks run eagerly even when the step is compiled: Dynamo would trace (and graph-break on)
        # their Python bookkeeping.
        disable = torch.compiler.disable
        self._take_gradient_eagerly = disable(self._take_gradient)
        self._skip_eagerly = disable(self._skip)
        self._hooks = []
        for i, opt in enumerate(optimizers):
            self._hooks.append(opt.register_step_pre_hook(disable(partial(self._before_step, i))))
            self._hooks.append(opt.register_step_post_hook(disable(partial(self._after_step, i))))
        self._scaler = scaler
        self._scaler_step = None
        if scaler is not None:
            self._scaler_step = disable(partial(self._scaler_step_call, scaler.step),
                                        recursive=False)  # the optimizer's step may be compiled
            scaler.step = self._scaler_step  # the instance's step, removed again at close()
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

    @_synchronized
    def skip_step(self, optimizer=None) -> None:
        """Record that the training loop skips this step (e.g. ``if not finite: continue``).

        The step becomes a row with ``skipped=True``, zero update and the gradient statistics of what
        ``.grad`` holds now (non-finite counts per layer: where the NaN/Inf is), so call it before
        the gradients are cleared. ``optimizer``: the one that skips (default: every optimizer
        passed in that has not stepped in the current row). The step counter advances.
        """
        if self._closed:
            if self._active:
                raise GradflowError("skip_step called on a closed Recorder")
            return
        if optimizer is None:
            which = [i for i, r in enumerate(self._resolved) if not self._row_open or r is None]
        else:
            which = [self._optimizer_index(optimizer)]
            if which == [None]:
                raise GradflowError(f"skip_step: {type(optimizer).__name__} is not an optimizer "
                                    f"passed to this Recorder")
        for i in which:
            self._skip(i)

    def end_epoch(self, **scalars: float) -> None:
        """Close an epoch: store mean |W_end − W_start| per layer and the given scalars.

        Each keyword is stored as a per-epoch float64 variable (``train_loss``, ``val_loss``,
        ``val_accuracy`` …); an epoch that omits a scalar given in another epoch gets NaN there.
        A value is one real number: a Python ``int``/``float`` (any ``numbers.Real``), a NumPy
        scalar, or a NumPy array or torch tensor holding exactly one element of an integer or
        floating dtype (any shape: ``tensor(1.5)``, ``tensor([1.5])``, ``np.array([[1.5]])``);
        ``None`` is stored as NaN, and ±Inf and NaN are kept as given.

        Raises:
            GradflowError: a value that is not one real number: a string (``"1.0"``), a bool
                (``True``, ``np.True_``, a bool tensor), a complex number, an array or tensor of
                zero or more than one element, an integer too large for a float, any other
                object; a reserved name (``update_norm``,
                ``epoch`` …) or one that cannot name a Zarr array (``val/loss``, ``..``, empty);
                a name that differs only in case from another epoch variable of the run
                (``Val_Loss`` beside ``val_loss``: one array on a case-insensitive file system).
        """
        values = {}
        for name, value in scalars.items():
            if name in RESERVED_EPOCH_NAMES:
                raise GradflowError(f"end_epoch: {name!r} is a reserved name; choose another")
            problem = node_name_problem(name)
            if problem:
                raise GradflowError(f"end_epoch: the name {name!r} {problem}; choose another "
                                    f"(e.g. 'val_loss' for 'val/loss')")
            values[name] = _one_number(name, value)
        with self._lock:
            names = dict(self._epoch_names)
            for name in values:
                other = names.setdefault(name.casefold(), name)
                if other != name:
                    raise GradflowError(f"end_epoch: {name!r} and {other!r} differ only in case, which a "
                                        f"case-insensitive file system (macOS, Windows) stores as one "
                                        f"array; choose another name")
            if self._closed:
                if self._active:
                    raise GradflowError("end_epoch called on a closed Recorder")
                return
            self._epoch_names = names
            if self._row_open and threading.get_ident() != self._row_thread:
                self._deferred_epochs.append(values)  # at the end of the step under way
                return
            self._end_epoch(values)

    def _end_epoch(self, values: dict[str, float]) -> None:
        self._drop_unfinished()
        if self._row_open:
            self._ending_epoch = True
            try:
                self._close_row()
            finally:
                self._ending_epoch = False
        with torch.no_grad():
            for bucket in self._all_buckets():
                bucket.check_epoch()  # raises before any bucket takes its new epoch start
            parts = [part for bucket in self._all_buckets() for part in bucket.end_epoch()]
            if self._reducer is not None:
                parts = self._reducer.epoch(parts)
        if self._writes:
            self._pending_epochs.append(
                _EpochRow(self._epoch, self._epoch_steps, values, quantities.to_host(parts)))
        self._epoch += 1
        self._epoch_steps = 0
        if time.monotonic() - self._last_handoff > FLUSH_SECONDS:
            self._handoff()  # short epochs are batched: each hand-off costs a Zarr commit

    @property
    def error(self) -> BaseException | None:
        """The last failed store write, while its rows wait to be written again (or after recording
        stopped); None when everything handed to the writer is committed."""
        return self._error if self._active else None

    @_synchronized
    def flush(self) -> None:
        """Write everything recorded so far and wait until it is committed to the store.

        A failed write does not raise (training goes on): it is reported once as a
        :class:`~gradflow.errors.GradflowWarning` and kept in :attr:`error`.
        """
        if self._closed:
            return
        self._handoff()
        if self._writer is not None:
            self._writer.wait()

    @_synchronized
    def close(self) -> None:
        """Flush, detach the hooks, stop the writer and release the store. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        for hook in self._hooks:
            hook.remove()
        if self._scaler is not None and self._scaler.__dict__.get("step") is self._scaler_step:
            del self._scaler.step
        try:
            self._drop_unfinished()
            if self._row_open:
                self._close_row()
            self._run_deferred_epochs()
            self._handoff()
        finally:
            try:
                if self._writer is not None:
                    self._writer.close()
            finally:
                if self._store is not None:
                    self._store.close()

    def _flush_for_signal(self) -> None:
        """SIGTERM: commit the rows recorded so far (see :func:`_on_sigterm`)."""
        if self._closed or self._writer is None:
            return
        if self._in_handoff:  # the signal interrupted a hand-off on this thread: let it finish
            self._writer.wait()
            return
        with self._lock:  # reentrant: rows already closed are complete whatever was interrupted
            if not self._closed:
                self._handoff()
                self._writer.wait()


    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Recorder({len(self.layers)} layers, every={self.every}, step={self.step}, "
                f"epoch={self.epoch}{', closed' if self._closed else ''})")

    # -- hooks --------------------------------------------------------------------------------

    @_synchronized
    def _before_step(self, i: int, optimizer, args, kwargs):
        if self._closed:
            return None
        self._drop_unfinished()
        frame = _step_frame()
        if self._outer[i] is not None and _calls_from(frame, self._outer[i]):
            return None  # a subclass's step() calling super().step(): the outer call is the step
        self._outer[i] = frame
        self._step_calls[i] += 1
        self._mark[i] = len(self._parts)
        if len(optimizer.param_groups) != self._num_groups[i]:
            self._join_groups(i, optimizer)
        if self._row_open and self._resolved[i] is not None:
            self._close_row()  # this optimizer steps again: a new step starts
        if not self._row_open:
            self._open_row()
        if not self._recording:
            return None
        self._lrs[i] = group_lrs(optimizer)  # before the step: the rate this step uses
        self._grad_scale[i] = getattr(optimizer, "grad_scale", None)
        found_inf = getattr(optimizer, "found_inf", None)
        with torch.no_grad(), self._unless_refused():
            for bucket in self._buckets[i]:
                self._parts += bucket.snapshot()
            if isinstance(found_inf, torch.Tensor):
                flag = found_inf.reshape(1).float().clone()  # GradScaler's tensor: keep our own
                self._parts.append((quantities.FOUND_INF, None, flag))
        self._grad_due[i] = True
        closure = _closure_of(args, kwargs)
        if closure is None:
            self._take_gradient(i)
            return None
        # The closure computes the gradient the step uses: take it after the first evaluation.
        wrapped = torch.compiler.disable(partial(self._run_closure, i, closure), recursive=False)
        if len(args) > 1:
            return (args[0], wrapped, *args[2:]), kwargs
        return args, {**kwargs, "closure": wrapped}

    def _run_closure(self, i: int, closure):
        loss = closure()
        self._take_gradient_eagerly(i)
        return loss

    @_synchronized
    def _take_gradient(self, i: int) -> None:
        """The gradient statistics of optimizer ``i``'s step (once per step: LBFGS's first evaluation)."""
        if not self._grad_due[i] or self._closed:
            return
        self._grad_due[i] = False
        with torch.no_grad(), self._unless_refused():
            for bucket in self._buckets[i]:
                self._parts += bucket.gradient_parts(self._present, self._grad_scale[i])
        self._empty_gradients(i)

    @_synchronized
    def _after_step(self, i: int, optimizer, args, kwargs) -> None:
        if _step_frame() is not self._outer[i]:
            return  # the end of a nested super().step()
        self._outer[i] = None
        if self._closed or not self._row_open:
            return
        self._resolved[i] = "step"
        if self._recording:
            self._take_gradient(i)  # a closure that the optimizer never called
            with torch.no_grad(), self._unless_refused():
                for bucket in self._buckets[i]:
                    self._parts += bucket.after_step()
        if all(r is not None for r in self._resolved):
            self._close_row()

    def _scaler_step_call(self, step, optimizer, *args, **kwargs):
        """``GradScaler.step`` wrapper: a step it did not pass on to the optimizer was skipped."""
        i = self._optimizer_index(optimizer)
        calls = None if i is None else self._step_calls[i]
        out = step(optimizer, *args, **kwargs)
        if i is not None and not self._closed and self._step_calls[i] == calls \
                and self._scaler.is_enabled():
            self._skip_eagerly(i)
        return out

    # -- step bookkeeping ---------------------------------------------------------------------

    def _optimizer_index(self, optimizer) -> int | None:
        inner = unwrap_optimizer(optimizer)
        return next((i for i, o in enumerate(self._optimizers) if o is inner), None)

    def _all_buckets(self):
        return [bucket for buckets in self._buckets for bucket in buckets]

    def _frozen_buckets(self) -> list:
        """Buckets (no snapshot) of the tensors no optimizer owns in layers where one owns others
        (BitFit: frozen weight, trained bias): their ‖w‖ counts in the layer's ``param_norm`` and
        ``update_ratio`` like its other parameters'."""
        layer_of = np.array([layer for _, _, layer in self._tensors])
        partly_owned = np.isin(layer_of, layer_of[self._owned])
        return _buckets(self._tensors, list(np.flatnonzero(partly_owned & ~self._owned)), False)

    def _drop_unfinished(self) -> None:
        """Forget what the hooks took for a ``step()`` that raised (its post-hook never ran): its
        snapshot, gradient and found-inf parts, appended from :attr:`_mark` on (no other hook runs
        between its pre-hook and this call, the first thing every entry point does), and the
        missing gradients it marked. Left in the open row, they would reach the next step's row:
        parts of tensors read in blocks are added up there, and a gradient missing then would read
        as missing now. The step is not a row (:meth:`_close_row`); what it did to the weights
        counts in the next step's snapshot and in the epoch's displacement."""
        if self._row_open and threading.get_ident() != self._row_thread:
            return  # (a step under way on the training thread is not on this thread's stack)
        for j, frame in enumerate(self._outer):
            if frame is None or _on_stack(frame):
                continue
            self._outer[j], self._grad_due[j] = None, False
            if self._row_open and self._resolved[j] is None:
                self._resolved[j] = "raised"  # its part of the row is over: the row may close
                if self._recording:
                    del self._parts[self._mark[j]:]
                    self._present[self._tensors_of[j]] = True

    @contextlib.contextmanager
    def _unless_refused(self):
        """A bucket's GradflowError (a parameter changed size, dtype, device, or shape within the
        step: :func:`gradflow.quantities.conform`) ends the open row unrecorded, as an exception
        inside ``step()`` does: its figures would be partial. The rows before it are kept."""
        try:
            yield
        except GradflowError:
            self._discard_row()
            raise

    def _discard_row(self) -> None:
        """End the open row unrecorded (no step, no row): a refused step, or only steps that never
        finished. (:meth:`_open_row` resets the rest of a row's state.)"""
        self._row_open, self._parts, self._present = False, [], None
        self._resolved = [None] * len(self._resolved)
        self._grad_due = [False] * len(self._grad_due)

    def _empty_gradients(self, i: int) -> None:
        """Optimizer ``i``'s zero-element parameters had a gradient where torch holds one (figures
        0, an empty sum), else none (NaN), as the buckets tell for the others. Sharded, the
        :class:`~gradflow.distributed.Reducer` counts an empty shard as no gradient on its rank."""
        if self._reducer is None and self._empty.any():
            for t in self._tensors_of[i][self._empty[self._tensors_of[i]]]:
                self._present[t] = self._tensors[t][0].grad is not None

    def _join_groups(self, i: int, optimizer) -> None:
        """Param groups added to optimizer ``i``: record their parameters from this step on."""
        self._num_groups[i] = len(optimizer.param_groups)
        if self._described is not None:
            groups = self._described[i]["param_groups"]
            groups += _optimizer_attrs(optimizer, self._param_names)["param_groups"][len(groups):]
            self._described_due = True
        new = sorted({self._index[id(p)] for group in optimizer.param_groups
                      for p in group["params"]
                      if id(p) in self._index and self._owner[self._index[id(p)]] < 0})
        if not new:
            return  # parameters of other modules, or already recorded: nothing to add
        self._owner[new] = i
        self._owned = self._owner >= 0
        self._tensors_of[i] = np.flatnonzero(self._owner == i)
        self._frozen = self._frozen_buckets()
        buckets = _buckets(self._tensors, new, self._snapshot)
        with torch.no_grad():
            for bucket in buckets:
                bucket.start_epoch()  # their epoch displacement counts from here
        self._buckets[i] = self._buckets[i] + buckets

    def _open_row(self) -> None:
        self._row_open = True
        self._row_thread = threading.get_ident()
        self._recording = self._step % self.every == 0
        if self._recording:
            self._parts = []
            self._present = np.ones(self._num_tensors, dtype=bool)

    @_synchronized
    def _skip(self, i: int) -> None:
        """Optimizer ``i`` skips this step: its gradients as they are now, no update."""
        self._drop_unfinished()
        if self._row_open and self._resolved[i] is not None:
            self._close_row()
        if not self._row_open:
            self._open_row()
        self._resolved[i] = "skip"
        if self._recording:
            self._grad_due[i] = False
            with torch.no_grad(), self._unless_refused():
                for bucket in self._buckets[i]:
                    self._parts += bucket.gradient_parts(self._present, None) + bucket.not_stepped()
            self._empty_gradients(i)
        if all(r is not None for r in self._resolved):
            self._close_row()

    def _close_row(self) -> None:
        if all(r in (None, "raised") for r in self._resolved):
            # Only steps that never finished (an exception inside step()): not a step, not a row.
            self._discard_row()
            return
        self._grad_due = [False] * len(self._grad_due)
        skipped = "skip" in self._resolved
        if self._recording:
            with torch.no_grad():
                for i, state in enumerate(self._resolved):
                    if state in (None, "raised"):
                        for bucket in self._buckets[i]:
                            self._parts += bucket.not_stepped()
                        self._present[self._tensors_of[i]] = False
                        if state == "raised" and self._reducer is None:
                            # Its step() raised in this row (another optimizer's step made the
                            # row), perhaps after moving its weights: its update is unknown, NaN.
                            unknown = torch.full((len(self._tensors_of[i]),), math.nan,
                                                 dtype=torch.float64)
                            self._parts += [(row, self._tensors_of[i], unknown) for row in (
                                quantities.UPDATE_NORM, quantities.UPDATE_ABS_SUM,
                                quantities.UPDATE_MAX_ABS)]
                for bucket in self._frozen:
                    self._parts += bucket.not_stepped()
            self._present[~self._owned] = False
            if self._reducer is not None:
                with torch.no_grad():
                    self._parts, self._present = self._reducer.step(self._parts, self._present)
            if self._writes:
                self._pending_steps.append(_StepRow(self._step, self._epoch, time.time(), skipped,
                                                    self._present, self._owned,
                                                    quantities.to_host(self._parts), self._step_lr()))
            self._parts, self._present = [], None
        self._row_open = False
        self._resolved = [None] * len(self._resolved)
        self._step += 1
        self._epoch_steps += 1
        if self._pending_steps and ((self._rows_handed + len(self._pending_steps)) % FLUSH_ROWS == 0
                                    or time.monotonic() - self._last_handoff > FLUSH_SECONDS):
            self._handoff()
        if self._deferred_epochs and not self._ending_epoch:
            self._run_deferred_epochs()

    def _run_deferred_epochs(self) -> None:
        """End the epochs another thread asked for while a step was under way."""
        deferred, self._deferred_epochs = self._deferred_epochs, []
        for values in deferred:
            self._end_epoch(values)

    def _step_lr(self) -> np.ndarray:
        """This step's lr per param group (an optimizer that skipped: its current lr), in the store's
        column of that (optimizer, group); groups added after the store was made have no column."""
        lrs = [self._lrs[i] or group_lrs(o) for i, o in enumerate(self._optimizers)]
        self._lrs = [None] * len(self._optimizers)
        columns = self._store.lr_columns
        out = np.full(len(columns), np.nan)
        for k, (i, j) in enumerate(columns):
            if i < len(lrs) and j < len(lrs[i]):
                out[k] = lrs[i][j]
        return out

    # -- writing ------------------------------------------------------------------------------

    def _handoff(self) -> None:
        """Give the buffered rows to the writer thread. Waits only while the previous hand-off is
        still being committed (back-pressure), so a crash loses at most this buffer and the
        commit in flight."""
        if self._writer is None:  # a sharded run's other ranks: rank 0 writes
            return
        self._in_handoff = True
        try:
            steps, epochs = self._pending_steps, self._pending_epochs
            self._pending_steps, self._pending_epochs = [], []
            self._rows_handed += len(steps)
            self._last_handoff = time.monotonic()
            if self._stopped:
                return  # recording stopped after repeated write failures (warned once)
            seen = max(self._step, steps[-1].step + 1) if steps else self._step
            attrs = {"optimizers": json.loads(json.dumps(self._described))} if self._described_due else {}
            self._described_due = False
            self._writer.submit(partial(self._write, steps, epochs, seen, attrs))
        finally:
            self._in_handoff = False

    def _write(self, steps: list[_StepRow], epochs: list[_EpochRow], steps_seen: int,
               attrs: dict) -> None:
        """Writer thread: rows → one append per array → commit. A failure keeps the rows (the
        store retries them first at the next hand-off) and is reported once; after
        ``WRITE_ATTEMPTS`` failures in a row recording stops, the store keeps its last commit."""
        if self._stopped:
            return
        try:
            rows = self._columns(steps, epochs, steps_seen)
            rows.attrs = attrs
            self._store.write(rows)
        except Exception as err:  # noqa: BLE001 - training must survive a failing store
            self._error = err
            self._write_failures += 1
            kept = self._store.unwritten
            rows = (f"{kept.num_steps} step and {kept.num_epochs} epoch rows are"
                    if kept and (kept.num_steps or kept.num_epochs) else "its rows are")
            if self._closed:  # the last hand-off: there is no next flush to retry it
                warnings.warn(f"gradflow: writing {self._store.where} failed at close "
                              f"({type(err).__name__}: {err}); {rows} lost, the store keeps its "
                              f"{self._store.n_steps} committed steps", GradflowWarning, stacklevel=1)
                return
            if self._write_failures == 1:
                warnings.warn(f"gradflow: writing {self._store.where} failed ({type(err).__name__}: "
                              f"{err}); {rows} kept and written again at the next flush; "
                              f"training goes on", GradflowWarning, stacklevel=1)
            if self._write_failures >= WRITE_ATTEMPTS or isinstance(err, GradflowError):
                self._stopped = True
                try:
                    self._store.rollback()
                except Exception:  # noqa: BLE001,S110 - the store is unusable; readers see the last commit
                    pass
                warnings.warn(f"gradflow: recording into {self._store.where} stopped after "
                              f"{self._write_failures} failed write(s) ({type(err).__name__}: {err})"
                              f"; the store keeps its {self._store.n_steps} committed steps; "
                              f"training goes on", GradflowWarning, stacklevel=1)
            return
        if self._write_failures:
            warnings.warn(f"gradflow: writing {self._store.where} works again; the kept rows are "
                          f"committed", GradflowWarning, stacklevel=1)
        self._write_failures, self._error = 0, None

    def _columns(self, steps: list[_StepRow], epochs: list[_EpochRow], steps_seen: int) -> Rows:
        """Per-tensor host statistics → per-layer columns, all rows of the hand-off at once."""
        step_columns: dict[str, np.ndarray] = {}
        if steps:
            per_tensor = np.empty((len(steps), quantities.NUM_STATS, self._num_tensors))
            skipped = np.empty(len(steps), dtype=bool)
            for k, row in enumerate(steps):
                per_tensor[k], found_inf = row.stats.resolve(quantities.NUM_STATS,
                                                               self._num_tensors)
                skipped[k] = row.skipped or found_inf > 0
            present = np.stack([row.stats.present if row.present is None else row.present
                                for row in steps])
            owned = np.stack([row.owned for row in steps])
            step_columns = quantities.layer_step_stats(per_tensor, present, self._starts,
                                                         self._numel, owned)
            if not self._snapshot:  # no Δw snapshot: no update statistics
                for name in ("update_norm", "update_mean_abs", "update_max_abs", "update_ratio"):
                    step_columns[name][:] = np.nan
            step_columns.update(step=np.array([r.step for r in steps], dtype=np.int64),
                                epoch=np.array([r.epoch for r in steps], dtype=np.int64),
                                wall_time=np.array([r.wall_time for r in steps]), skipped=skipped,
                                lr=np.stack([r.lr for r in steps]))
        epoch_columns: dict[str, np.ndarray] = {}
        if epochs:
            statistics = [quantities.layer_epoch_stats(row.stats.resolve(2, self._num_tensors)[0],
                                                      self._starts, self._numel) for row in epochs]
            epoch_columns = {name: np.stack([f[name] for f in statistics]) for name in statistics[0]}
            if not self._snapshot:
                epoch_columns = {name: np.full_like(v, np.nan) for name, v in epoch_columns.items()}
            epoch_columns.update(epoch=np.array([r.epoch for r in epochs], dtype=np.int64),
                                 num_steps=np.array([r.num_steps for r in epochs], dtype=np.int64))
            for name in dict.fromkeys(n for r in epochs for n in r.scalars):
                epoch_columns[name] = np.array([r.scalars.get(name, np.nan) for r in epochs],
                                               dtype=np.float64)
        return Rows(step_columns, epoch_columns, steps_seen)
