"""Record a Hugging Face Trainer run: ``Trainer(..., callbacks=[GradflowCallback("run.zarr")])``.

At ``on_train_begin`` the callback attaches a :class:`gradflow.Recorder` to the model and the
Trainer's optimizer (accelerate's ``AcceleratedOptimizer`` is unwrapped; its GradScaler, if any, is
passed on so that the steps it skips are rows with ``skipped=True``). A row is one optimizer step:
with ``gradient_accumulation_steps`` the accumulated gradient, with ``max_grad_norm`` the clipped
one. The Trainer evaluates and logs after ``on_epoch_end``, so each epoch is closed when the next
begins (or at ``on_train_end``) with ``train_loss`` = the mean of the losses the Trainer logged in
that epoch (``logging_strategy="epoch"``: the epoch's mean loss) and ``val_loss`` = its last
``eval_loss`` (NaN when not logged). Rows are committed whenever the Trainer saves a checkpoint
(``on_save``, after that epoch's evaluation: an epoch that ended is closed first), so a run resumed
from that checkpoint after a crash continues the store from the same step. The Recorder closes at
``on_train_end``; after an exception it is closed by the next ``on_train_begin`` or at interpreter
exit.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

from gradflow.recorder import Recorder


class GradflowCallback(TrainerCallback):
    """A Hugging Face ``TrainerCallback`` recording gradient flow into ``store``.

    Args:
        store: path or fsspec URL of the Zarr store.
        every: record every ``every``-th optimizer step.
        **recorder_kwargs: passed to :class:`gradflow.Recorder` (``mode``, ``group``,
            ``per_parameter``, ``metadata``).
    """

    def __init__(self, store, every: int = 1, **recorder_kwargs) -> None:
        self.store, self.every, self.recorder_kwargs = store, every, recorder_kwargs
        self.recorder: Recorder | None = None
        self._losses: list[float] = []
        self._val_loss = math.nan
        self._epoch_open = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._close()
        scaler = getattr(optimizer, "scaler", None)  # accelerate's GradScaler under fp16
        self.recorder = Recorder(model, optimizer, self.store, every=self.every, scaler=scaler,
                                 **self.recorder_kwargs)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._end_epoch()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._epoch_open = True  # closed once this epoch's evaluation and logs are in

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if isinstance(logs.get("loss"), (int, float)):
            self._losses.append(float(logs["loss"]))
        if isinstance(logs.get("eval_loss"), (int, float)):
            self._val_loss = float(logs["eval_loss"])

    def on_save(self, args, state, control, **kwargs):
        self._end_epoch()  # a save at an epoch's end comes after its evaluation and logs
        if self.recorder is not None:  # the store holds every step the checkpoint holds
            self.recorder.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self._end_epoch()
        self._close()

    def _end_epoch(self) -> None:
        if self.recorder is None or not self._epoch_open:
            return
        train_loss = sum(self._losses) / len(self._losses) if self._losses else math.nan
        self.recorder.end_epoch(train_loss=train_loss, val_loss=self._val_loss)
        self._losses, self._val_loss, self._epoch_open = [], math.nan, False

    def _close(self) -> None:
        self._end_epoch()
        if self.recorder is not None:
            recorder, self.recorder = self.recorder, None
            recorder.close()
