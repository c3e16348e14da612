"""Record a Lightning run: ``Trainer(callbacks=[GradflowCallback("run.zarr")])``.

At ``on_fit_start`` the callback attaches a :class:`gradflow.Recorder` to the LightningModule and
every optimizer of ``configure_optimizers`` (and to the precision plugin's GradScaler, so the steps
it skips are rows with ``skipped=True``). A row is one ``optimizer.step`` of each optimizer, as
Lightning calls it (with its closure: the recorded gradient is the one after the closure ran,
accumulated over ``accumulate_grad_batches`` and clipped by ``gradient_clip_val``); manual
optimization works the same. Each training epoch closes with the scalars of
``trainer.callback_metrics`` logged during that epoch (the logged ``train_loss``, ``val_loss``, …;
a "/" in a name becomes "_", and two logged names that would share one stored name are a
:class:`GradflowError`, see :func:`logged_scalars`). A metric that was not logged again since the
last epoch (``val_loss`` in an epoch without validation, ``check_val_every_n_epoch=2``) is NaN
there, not the old value Lightning keeps in ``callback_metrics``. Lightning calls callbacks'
``on_train_epoch_end`` before the LightningModule's, so the epoch is closed at the next hook (the
next epoch's start, or the end of training), and what the module logs in its own
``on_train_epoch_end`` (a torchmetrics ``compute()``) belongs to that epoch. Rows are committed
whenever Lightning saves a checkpoint (``on_save_checkpoint``), so a run resumed from that
checkpoint after a crash continues the store from the same step; where the store's next step is
not the trainer's ``global_step`` all the same, ``on_train_start`` warns. The Recorder closes at
``on_fit_end`` or on an exception.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import torch

from gradflow.errors import GradflowError, GradflowWarning
from gradflow.recorder import Recorder
from gradflow.store import RESERVED_EPOCH_NAMES, node_name_problem


def logged_scalars(metrics: dict, sources: dict[str, str] | None = None) -> dict[str, float]:
    """The one-number metrics of a ``callback_metrics`` dict, as floats (±Inf and NaN kept as logged)
    under Zarr-safe names: a "/" or "\\" becomes "_" (``train/loss`` → ``train_loss``).

    ``sources`` (stored name → logged name, updated in place) carries the names of earlier epochs, so
    that one stored variable never holds two metrics. Raises :class:`GradflowError` when two logged
    names, in this call or across ``sources``, would be stored under one name. A name the store
    cannot hold (reserved, such as ``epoch`` or ``num_steps``, empty, ``..``, over 255 bytes) is
    left out with a :class:`GradflowWarning` naming it."""
    sources = {} if sources is None else sources
    out = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name = str(name)
        key = name.replace("/", "_").replace("\\", "_")
        problem = "is reserved" if key in RESERVED_EPOCH_NAMES else node_name_problem(key)
        if problem:
            warnings.warn(f"gradflow: the logged metric {name!r} is not recorded: as an epoch variable "
                          f"{key!r} it {problem}; log it under another name", GradflowWarning, stacklevel=2)
            continue
        other = sources.setdefault(key, name)
        if other != name:
            raise GradflowError(f"the logged metrics {other!r} and {name!r} would both be stored as "
                                f"{key!r} (a '/' becomes '_'); rename one of them")
        out[key] = float(value)
    return out


class GradflowCallback(pl.Callback):
    """A Lightning ``Callback`` recording gradient flow into ``store``.

    Args:
        store: path or fsspec URL of the Zarr store.
        every: record every ``every``-th optimizer step.
        **recorder_kwargs: passed to :class:`gradflow.Recorder` (``mode``, ``group``,
            ``per_parameter``, ``metadata``).
    """

    def __init__(self, store, every: int = 1, **recorder_kwargs) -> None:
        self.store, self.every, self.recorder_kwargs = store, every, recorder_kwargs
        self.recorder: Recorder | None = None
        self._sources: dict[str, str] = {}  # stored epoch variable → the logged metric it holds
        self._epoch_due = False  # a training epoch ended; closed at the next hook (see module doc)
        # callback_metrics' values when the last epoch closed: an entry that is still the same object
        # was not logged since (Lightning keeps old values in callback_metrics)
        self._closed_with: dict = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.recorder = Recorder(pl_module, list(trainer.optimizers), self.store, every=self.every,
                                 scaler=scaler, **self.recorder_kwargs)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn where the store's next step is not the trainer's (restored) ``global_step``: rows
        committed after the checkpoint this run resumed from, or a resumed store with a fresh
        trainer. (Compared under automatic optimization with one optimizer, where ``global_step``
        counts optimizer steps as the store does.)"""
        recorder = self.recorder
        if (recorder is None or not trainer.is_global_zero or not pl_module.automatic_optimization
                or len(trainer.optimizers) != 1 or recorder.step == trainer.global_step):
            return
        warnings.warn(f"gradflow: {self.store} continues at step {recorder.step}, but the trainer "
                      f"starts at global step {trainer.global_step}, so the store's step numbers "
                      f"will differ from the trainer's by {recorder.step - trainer.global_step} "
                      f"(rows committed after the checkpoint this run resumed from, or another "
                      f"run's store); record into a new store or group to keep them equal",
                      GradflowWarning, stacklevel=2)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_due = self.recorder is not None  # the module's own hook logs after this one

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_epoch(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_epoch(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict) -> None:
        self._end_epoch(trainer)  # at an epoch's end (ModelCheckpoint), its row goes in too
        if self.recorder is not None:  # the store holds every step the checkpoint holds
            self.recorder.flush()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_epoch(trainer)
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        try:
            self._end_epoch(trainer)  # an epoch that ended before the exception keeps its row
        finally:
            self._close()

    def _end_epoch(self, trainer: pl.Trainer) -> None:
        if not self._epoch_due or self.recorder is None:
            return
        self._epoch_due = False
        metrics = dict(trainer.callback_metrics)
        fresh = {k: v for k, v in metrics.items() if self._closed_with.get(k) is not v}
        self._closed_with = metrics
        self.recorder.end_epoch(**logged_scalars(fresh, self._sources))

    def _close(self) -> None:
        if self.recorder is not None:
            recorder, self.recorder = self.recorder, None
            recorder.close()
