"""Record a Lightning run: ``Trainer(callbacks=[GradflowCallback("run.zarr")])``.

At ``on_fit_start`` the callback attaches a :class:`gradflow.Recorder` to the LightningModule and
every optimizer of ``configure_optimizers`` (and to the precision plugin's GradScaler, so the steps
it skips are rows with ``skipped=True``). A row is one ``optimizer.step`` of each optimizer, as
Lightning calls it (with its closure: the recorded gradient is the one after the closure ran,
accumulated over ``accumulate_grad_batches`` and clipped by ``gradient_clip_val``); manual
optimization works the same. Each training epoch closes with every scalar in
``trainer.callback_metrics`` (the logged ``train_loss``, ``val_loss``, …; a "/" in a name becomes
"_"). The Recorder closes at ``on_fit_end`` or on an exception.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

from gradflow.recorder import Recorder
from gradflow.store import RESERVED_EPOCH_NAMES, node_name_problem


def logged_scalars(metrics: dict) -> dict[str, float]:
    """The one-number metrics of a ``callback_metrics`` dict, as floats under Zarr-safe names."""
    out = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            key = str(name).replace("/", "_")
            if key not in RESERVED_EPOCH_NAMES and not node_name_problem(key):
                out[key] = float(value) if math.isfinite(value) else math.nan
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

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.recorder = Recorder(pl_module, list(trainer.optimizers), self.store, every=self.every,
                                 scaler=scaler, **self.recorder_kwargs)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is not None:
            self.recorder.end_epoch(**logged_scalars(trainer.callback_metrics))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.recorder is not None:
            recorder, self.recorder = self.recorder, None
            recorder.close()
