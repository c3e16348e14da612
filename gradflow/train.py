"""Train one FCN variant end to end, with the gradflow Recorder attached.

The loop is deliberately the plain PyTorch loop (shuffle, augment, forward, loss, backward, step)
plus bookkeeping that stays on the device: losses and correct-pixel counts are accumulated as
tensors and read back once per epoch, so the loop does not stall the GPU with per-step host syncs
and keeps within a few percent of a hand-written loop (``gradflow bench train`` measures this).

Defaults follow Drozdzal et al. 2016 (RMSprop, weight decay 1e-3, flips / rotations / shear /
elastic warping on the fly) but for two settings without which nets without batch norm do not train:
``init="scaled"`` and RMSprop's lr 1e-4 (the paper: He init, 1e-3; see :class:`TrainConfig`). ``optimizer="sgd"`` trains with SGD instead (momentum 0.9, no
Nesterov, the same weight decay): its update is proportional to the gradient, so a starved layer
shows as a small |ΔW|, while RMSprop divides each gradient by its running RMS and turns a tiny
gradient into an ordinary-sized update (see the README's Results). The weights with the lowest validation loss are kept, saved
with safetensors when ``checkpoint`` is given (rewritten at each new best epoch, so a crash keeps the best so far),
and loaded back into the model at the end.

Per epoch the store (``rec.end_epoch``) and ``TrainResult.history`` get ``train_loss`` (mean loss
over the epoch's training batches as they were trained: augmented, dropout on, weights moving
within the epoch; without the SAT sparsity penalty, so that it compares with ``val_loss``),
``val_loss`` (eval mode, after the epoch), and ``train_accuracy`` / ``val_accuracy`` (fraction of
pixels where sigmoid(logit) > 0.5 agrees with the membrane label).

On CPU, denormal floats (below ~1.2e-38, e.g. the squared tiny gradients in RMSprop's running average
for the starved centre of a deep plain net) are flushed to zero while training
(``torch.set_flush_denormal``): without that, such runs were up to ~18× slower per epoch on this
2-core x86 CPU, with the same losses and updates to the printed digits. The setting is switched off again at the end.

Everything random is derived from ``config.seed``: model initialisation and dropout (global torch
RNG, seeded here), the data split and synthetic data (``load_data(seed=...)``), the batch order
(a CPU ``torch.Generator``) and augmentation (a ``torch.Generator`` on the training device). The
same config therefore gives the same weights, with or without the Recorder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from gradflow.errors import GradflowError
from gradflow.losses import LOSSES
from gradflow.models.blocks import BLOCKS
from gradflow.models.fcn import INITS, nearest_side
from gradflow.models.skips import LONG_SKIPS
from gradflow.progress import Progress

OPTIMIZERS = ("rmsprop", "sgd")
DEFAULT_LR = {"rmsprop": 1e-4, "sgd": 1e-2}  # per optimizer, when no lr is given
SGD_MOMENTUM = 0.9
ARCHS = ("simple", "table1")
WEIGHT_DECAY_MODES = ("torch", "l2", "decoupled")


INT64_MAX = 2**63 - 1  # the largest integer setting: it goes into int64 arrays, torch and numpy seeds


@dataclass(frozen=True)
class Range:
    """The values a numeric setting takes: ``low`` … ``high`` (``None``: unbounded), ends closed unless
    ``open_low`` / ``open_high``; an ``int`` setting takes integers only, a ``float`` one finite numbers."""

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is out of range (``"must be a non-negative integer up to 2**63 − 1, got -1"``),
        or None."""
        ok = isinstance(value, self.kind if self.kind is int else (int, float)) and not isinstance(value, bool)
        ok = ok and (self.kind is int or math.isfinite(value))
        ok = ok and (self.low is None or (value > self.low if self.open_low else value >= self.low))
        ok = ok and (self.high is None or (value < self.high if self.open_high else value <= self.high))
        return None if ok else f"must be {self.text()}, got {value!r}"

    def text(self) -> str:
        """``"a positive integer up to 2**63 − 1"``, ``"a number in [0, 1)"``, ``"a positive number"``."""
        if self.kind is float and self.low is not None and self.high is not None:
            return (f"a number in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.open_high else ']'}")
        noun = "integer" if self.kind is int else "number"
        smallest = self.low + 1 if self.kind is int and self.open_low else self.low
        if self.kind is int:
            adjective = {0: "non-negative", 1: "positive"}.get(smallest)
        else:
            adjective = {(0, False): "non-negative", (0, True): "positive"}.get((self.low, self.open_low))
        if self.low is None:
            text = f"an {noun}" if noun == "integer" else "a number"
        elif adjective:
            text = f"a {adjective} {noun}"
        else:
            text = f"an {noun} ≥ {smallest:g}" if noun == "integer" else f"a number {'>' if self.open_low else '≥'} {self.low:g}"
        if self.high is not None:
            text += " up to 2**63 − 1" if self.high == INT64_MAX else f" up to {self.high}"
        return text


def _option(default: Any, help: str, choices: Iterable[str] | None = None, range: Range | None = None) -> Any:
    """A :class:`TrainConfig` field with its help text and allowed values (``choices``, or a numeric
    ``range``), from which the command line's options are made (``gradflow train``, ``gradflow sweep``,
    ``gradflow bench train``) and checked when parsed: each setting is declared here, once."""
    metadata = {"help": help, **({"choices": tuple(choices)} if choices else {}), **({"range": range} if range else {})}
    return field(default=default, metadata=metadata)


def _ints(low: int, high: int = INT64_MAX) -> Range:
    return Range(int, low, high)


def field_problem(spec: Field, value: Any, option: str | None = None) -> str | None:
    """Why ``value`` is not a value of the config field ``spec`` (outside its ``choices`` or ``range``
    metadata), one line naming the field (``init must be one of scaled, he, got 'x'``, ``seed must be
    a non-negative integer …, got -1``) or the command line's ``option`` that sets it (``--init:
    unknown value 'x'; choose from scaled, he``, ``--seed: must be …``); None when it is one."""
    choices, span = spec.metadata.get("choices"), spec.metadata.get("range")
    if choices and value not in choices:
        return (f"{option}: unknown value {value!r}; choose from {', '.join(choices)}" if option
                else f"{spec.name} must be one of {', '.join(choices)}, got {value!r}")
    why = span.problem(value) if span is not None else None
    return why and (f"{option}: {why}" if option else f"{spec.name} {why}")


def split_list(text: str, option: str, example: str) -> list[str]:
    """``"3, 7,9"`` → ``["3", "7", "9"]``; an empty list or item (``''``, ``3,,7``) is a one-line
    GradflowError naming the option (an empty ``--depths`` trained the whole default grid), and so
    is a value given twice (:func:`once`): the command line's and the benchmarks' list options."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise GradflowError(f"{option}: empty list; give one or more values, e.g. {option} {example}")
    if not all(parts):
        raise GradflowError(f"{option}: empty item in {text!r}; give e.g. {option} {example}")
    once(parts, option)
    return parts


def once(values: list, option: str) -> None:
    """A value given twice (``--depths 3,3``) would name two variants alike: a one-line error."""
    twice = next((v for k, v in enumerate(values) if v in values[:k]), None)
    if twice is not None:
        raise GradflowError(f"{option}: {twice!r} is given twice; give each value once")


def setting_range(name: str) -> Range | None:
    """The :class:`Range` of :class:`TrainConfig`'s numeric setting ``name`` (None for other settings)."""
    return {f.name: f for f in fields(TrainConfig)}[name].metadata.get("range")


@dataclass
class TrainConfig:
    """One training run: model variant, data, optimiser and loop settings (all JSON-able).

    The defaults are those of ``gradflow train`` and ``gradflow sweep``: a small net on synthetic data
    that trains in minutes on a CPU, with two deviations from the paper so that nets without batch
    norm train too (``init="scaled"``, RMSprop lr 1e-4; see the README's Results).
    """

    arch: str = _option("simple", "simple (block × depth per level) or table1 (the paper's Table 1 net, "
                                  "stage widths × width/32).", ARCHS)
    block: str = _option("simple", "Residual block type.", BLOCKS)
    depth: int = _option(7, "Residual blocks per level.", range=_ints(1))
    levels: int = _option(3, "Down/up-sampling levels (size must divide by 2**levels).", range=_ints(1, 62))
    width: int = _option(16, "Channels of every conv, constant across levels (table1: of the first stage; "
                             "32 = Table 1).", range=_ints(1))
    batch_norm: bool = _option(True, "Batch normalisation.")
    short_skip: bool = _option(True, "Short (residual) skips.")
    long_skip: str = _option("sum", "Long skips.", LONG_SKIPS)
    dropout: float = _option(0.0, "Dropout probability in every residual block.", range=Range(float, 0.0, 1.0, open_high=True))
    init: str = _option("scaled", "Weight init: scaled (He init with each residual branch's last conv × L^-1/2, "
                                  "so that nets without BN train; a deviation from the paper) or he (the "
                                  "paper's).", INITS)
    data: str = _option("synthetic", "'synthetic' or a folder with ISBI 2012 images and labels (PNG/TIFF "
                                     "folders or train-volume.tif / train-labels.tif).")
    size: int = _option(64, "Image / tile side in pixels.", range=_ints(1))
    crop: int = _option(0, "Train on random crop×crop patches of the images (an epoch: (size/crop)² crops "
                           "per image); 0 = whole images.", range=_ints(0))
    crops_per_image: int = _option(0, "With crop: crops of each training image per epoch (0: (size/crop)²).", range=_ints(0))
    n_train: int = _option(24, "Training images: synthetic images, or ISBI slices, each cut into (512/size)² "
                               "size×size tiles (24 slices at size 128: 384 tiles).", range=_ints(1))
    n_val: int = _option(4, "Validation images: synthetic images, or ISBI slices, each cut into (512/size)² "
                            "tiles.", range=_ints(1))
    epochs: int = _option(15, "Training epochs.", range=_ints(1))
    batch_size: int = _option(4, "Images (or crops) per optimizer step.", range=_ints(1))
    loss: str = _option("bce", "Training loss.", LOSSES)
    optimizer: str = _option("rmsprop", "rmsprop (the paper's) or sgd (momentum 0.9, no Nesterov).", OPTIMIZERS)
    lr: float | None = _option(None, "Learning rate (default per optimizer: rmsprop 1e-4, sgd 1e-2; the paper's "
                                     "RMSprop lr 1e-3 blows up nets without BN).", range=Range(float, 0.0, open_low=True))
    weight_decay: float = _option(1e-3, "Weight decay (the paper's: 1e-3).", range=Range(float, 0.0))
    weight_decay_mode: str = _option("torch", "torch (wd·w added to every gradient), l2 (Keras l2 regularizer: "
                                              "2·wd·W on conv kernels, the paper's) or decoupled (conv kernels × "
                                              "(1 − lr·wd) after each step).", WEIGHT_DECAY_MODES)
    rmsprop_alpha: float = _option(0.99, "RMSprop's running-average factor (torch: 0.99; Keras 1.x rho, the "
                                         "paper's: 0.9).", range=Range(float, 0.0, 1.0, open_high=True))
    seed: int = _option(0, "Seed for weights, data, batch order, augmentation, dropout.", range=_ints(0))
    device: str = _option("auto", "auto (CUDA when present), cpu, cuda or cuda:N.")
    amp: bool = _option(False, "Mixed precision (CUDA only).")
    every: int = _option(1, "Record every N-th optimizer step.", range=_ints(1))
    augment: bool = _option(True, "Flips, rotations, shear, elastic warp.")
    sparsity: float = _option(1e-4, "Weight of the SAT channel-selection L1 penalty.", range=Range(float, 0.0))
    score_passes: int = _option(0, "Score the best model on the validation images (V_rand, V_info, pixel "
                                   "error) averaging N dropout passes; 0 = off.", range=_ints(0))

    def __post_init__(self) -> None:
        """Reject values no run could use, naming the field (the model checks its own); resolve lr.
        Each field's choices and range are those the command line checks its option against
        (:func:`field_problem`)."""
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.optimizer)  # (an unknown optimizer is refused first)
        for spec in fields(self):
            problem = field_problem(spec, getattr(self, spec.name))
            if problem:
                raise GradflowError(problem)
        if self.crops_per_image and not self.crop:
            raise GradflowError("crops_per_image needs crop > 0")
        if self.crop > self.size:
            raise GradflowError(f"crop {self.crop} is larger than the images (size {self.size})")
        for name in ("size", "crop") if self.crop else ("size",):
            value = getattr(self, name)
            nearest = nearest_side(value, self.model_levels)
            if nearest != value:
                raise GradflowError(f"{name} {value} is not divisible by 2**levels = {self.side_step}; "
                                    f"try {name} {nearest}")

    @property
    def model_levels(self) -> int:
        """The model's down/up-sampling levels: ``levels``, or table1's 5."""
        return 5 if self.arch == "table1" else self.levels

    @property
    def side_step(self) -> int:
        """2**levels of the model: size and crop must be multiples of it (px)."""
        return 2 ** self.model_levels


@dataclass
class TrainResult:
    """What a run produced. ``model`` holds the best-validation weights, on the training device."""

    best_epoch: int
    best_val_loss: float
    train_loss_at_best: float
    history: pd.DataFrame  # one row per epoch: train_loss, val_loss, train_accuracy, val_accuracy, seconds
    checkpoint: str | None
    model: nn.Module | None = None


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when present, else CPU; anything else must name an available device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise GradflowError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GradflowError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise GradflowError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def build_model(config: TrainConfig) -> nn.Module:
    """The FCN variant the config describes (initialised from the current torch RNG state).

    ``arch="table1"``: the paper's Table 1 model with every stage width × ``width``/32 (``width`` 32:
    Table 1 itself; ``block``, ``depth`` and ``levels`` are not used).
    """
    from gradflow.models import paper_fcn, simple_fcn

    if config.arch == "table1":
        return paper_fcn(batch_norm=config.batch_norm, short_skip=config.short_skip, long_skip=config.long_skip,
                         dropout=config.dropout, init=config.init, width=config.width)
    return simple_fcn(config.depth, config.levels, config.width, block=config.block,
                      batch_norm=config.batch_norm, short_skip=config.short_skip,
                      long_skip=config.long_skip, dropout=config.dropout, init=config.init)


def build_optimizer(config: TrainConfig, model) -> torch.optim.Optimizer:
    """The config's optimizer over ``model``'s parameters (a module; a plain parameter list only with
    ``weight_decay_mode="torch"``, which needs no layer types): RMSprop (``alpha=config.rmsprop_alpha``, eps
    1e-8 added to the square root as in Keras, no momentum) or SGD with momentum 0.9, no Nesterov.

    Weight decay ``wd = config.weight_decay``, by ``config.weight_decay_mode``:

    - ``"torch"``: torch's ``weight_decay=wd`` on every parameter (biases and BN too): the optimizer
      uses g + wd·w, so under RMSprop the decay passes through the RMS normalisation.
    - ``"l2"``: Keras' ``W_regularizer=l2(wd)`` as in the authors' code (``veugene/fcn_maker``): the
      loss gets wd·Σ‖W‖² over conv kernels only, i.e. the optimizer uses g + 2·wd·W for conv weights
      (inside RMSprop's normalisation, as Keras adds it to the loss) and g for biases and BN.
    - ``"decoupled"``: no decay in the gradient; after each step every conv kernel is multiplied by
      (1 − lr·wd) (AdamW-style, applied after the optimizer's update, in a step post-hook, so the
      recorded Δw includes it).
    """
    wd, mode = config.weight_decay, config.weight_decay_mode
    if mode == "torch":
        params = list(model.parameters() if isinstance(model, nn.Module) else model)
        groups = [{"params": params, "weight_decay": wd}]
    else:
        if not isinstance(model, nn.Module):
            raise GradflowError(f"weight_decay_mode {mode!r} needs the model (it decays conv kernels only)")
        kernels = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
        kernel_ids = {id(p) for p in kernels}
        others = [p for p in model.parameters() if id(p) not in kernel_ids and p.requires_grad]
        groups = [{"params": kernels, "weight_decay": 2 * wd if mode == "l2" else 0.0},
                  {"params": others, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=SGD_MOMENTUM, nesterov=False)
    else:
        optimizer = torch.optim.RMSprop(groups, lr=config.lr, alpha=config.rmsprop_alpha, eps=1e-8)
    if mode == "decoupled" and wd > 0:
        def decay(opt, args, kwargs) -> None:
            with torch.no_grad():
                torch._foreach_mul_(kernels, 1.0 - opt.param_groups[0]["lr"] * wd)

        optimizer.register_step_post_hook(decay)
    return optimizer


def random_crops(x: torch.Tensor, y: torch.Tensor, side: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One uniformly placed side×side crop of each image (N, C, H, W) and its label, same place in both."""
    n, _, height, width = x.shape
    corners = torch.rand(n, 2, generator=generator, device=generator.device).cpu()
    tops = (corners[:, 0] * (height - side + 1)).long().tolist()
    lefts = (corners[:, 1] * (width - side + 1)).long().tolist()
    xs = [x[i, :, t:t + side, l:l + side] for i, (t, l) in enumerate(zip(tops, lefts))]
    ys = [y[i, :, t:t + side, l:l + side] for i, (t, l) in enumerate(zip(tops, lefts))]
    return torch.stack(xs), torch.stack(ys)


def _correct_pixels(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Number of pixels where the prediction (logit > 0, i.e. p > 0.5) matches the binary target."""
    return ((logits > 0) == (target > 0.5)).sum()


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss_fn,
             batch_size: int, amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation loss and pixel accuracy in eval mode, as 0-d device tensors (no host sync).

    The loss is the mean of per-batch losses weighted by batch size (for BCE: the mean over all
    pixels; for Dice: the per-batch Dice losses averaged over images).
    """
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for start in range(0, len(images), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        with torch.autocast(images.device.type, dtype=torch.float16, enabled=amp):
            logits = model(x)
            loss_sum += loss_fn(logits, y).float() * len(x)
        correct += _correct_pixels(logits, y)
    return loss_sum / len(images), correct / labels.numel()


def _is_better(val_loss: float, best: float | None) -> bool:
    """Strictly lower validation loss; a finite loss always beats NaN, NaN never beats anything."""
    if best is None:
        return True
    if math.isnan(val_loss):
        return False
    return math.isnan(best) or val_loss < best


@dataclass
class Epochs:
    """What each epoch of :func:`train` works with, set up once: model, optimizer, data on the device, RNGs."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # disabled (a pass-through) without mixed precision
    loss_fn: Any
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    order_generator: torch.Generator  # batch order (CPU)
    augment_generator: torch.Generator  # crops and augmentation (training device)

    @property
    def samples(self) -> int:
        """Training samples per epoch: the images, or with crops (size/crop)² crops of each (by default),
        so that an epoch trains on as many pixels as the whole images."""
        c = self.config
        return len(self.train_images) * ((c.crops_per_image or (c.size // c.crop) ** 2) if c.crop else 1)

    @property
    def steps(self) -> int:
        """Optimizer steps per epoch."""
        return math.ceil(self.samples / self.config.batch_size)


def train_epoch(run: Epochs, on_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """One epoch: shuffled batches (cropped, augmented), forward, loss, backward, step; then validation.

    One code path with and without mixed precision (autocast and the GradScaler are switched off
    without it). ``on_step(i)`` is called after the i-th step (1-based). Returns ``train_loss``,
    ``val_loss``, ``train_accuracy`` and ``val_accuracy``, read back to the host once.
    """
    from gradflow.data import augment_batch

    c, model, optimizer, scaler = run.config, run.model, run.optimizer, run.scaler
    # The SAT channel-selection penalty is a constant 0 for every other model: skip it per step.
    use_sparsity = c.sparsity > 0 and model.sparsity_loss().requires_grad
    n_train, device = len(run.train_images), run.train_images.device
    model.train()
    losses, corrects = [], []
    batches = (torch.randperm(run.samples, generator=run.order_generator) % n_train).to(device).split(c.batch_size)
    for i, index in enumerate(batches, 1):
        x, y = run.train_images[index], run.train_labels[index]
        if c.crop:
            x, y = random_crops(x, y, c.crop, run.augment_generator)
        if c.augment:
            x, y = augment_batch(x, y, run.augment_generator)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=c.amp):
            logits = model(x)
            loss = run.loss_fn(logits, y).float()
            objective = loss + c.sparsity * model.sparsity_loss() if use_sparsity else loss
        scaler.scale(objective).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.detach())
        corrects.append(_correct_pixels(logits.detach(), y))
        if on_step is not None:
            on_step(i)

    batch_sizes = torch.tensor([len(index) for index in batches], device=device)
    train_loss = (torch.stack(losses) * batch_sizes).sum() / run.samples
    pixels = c.crop ** 2 if c.crop else run.train_labels[0].numel()
    train_accuracy = torch.stack(corrects).sum() / (pixels * run.samples)
    val_loss, val_accuracy = evaluate(model, run.val_images, run.val_labels, run.loss_fn, c.batch_size, c.amp)
    values = torch.stack([train_loss, val_loss, train_accuracy.float(), val_accuracy.float()]).tolist()
    return dict(zip(("train_loss", "val_loss", "train_accuracy", "val_accuracy"), values))


def train(config: TrainConfig, store: Any = "run.zarr", group: str | None = None, *,
          checkpoint: str | Path | None = None, progress: Progress | None = None, metadata: dict | None = None,
          data=None, mode: str = "w-") -> TrainResult:
    """Train ``config``'s model, recording gradient flow into ``store`` (``None``: no recording).

    ``group``: sub-group of the store to record into (sweeps use one group per variant).
    ``checkpoint``: safetensors file for the best-validation weights (``None``: kept in memory only).
    ``progress``: a :data:`gradflow.progress.Progress` callback; two tasks, ``"<group or train>:
    epochs"`` (status: the last train/val loss) and ``"…: steps"`` of the current epoch.
    ``metadata``: extra JSON-able attrs for the store; the config itself is always recorded.
    ``data``: an ``EMData`` already loaded for this config (sweeps reuse one); default: load it.
    ``mode``: the Recorder's store mode (``"w-"`` new, ``"w"`` replace a gradflow run, ``"a"``).
    Every input (config, data, checkpoint path) is checked before the store is created or replaced.
    """
    run, data = _set_up(config, checkpoint, data)
    rec = None
    if store is not None:
        from gradflow import Recorder

        attrs = {**dataclasses.asdict(config), "data_source": str(data.source),
                 "data_split": data.split, **(metadata or {})}
        rec = Recorder(run.model, run.optimizer, store, every=config.every, group=group, metadata=attrs,
                       mode=mode, scaler=run.scaler if config.amp else None)

    label = group or "train"
    epochs_task, steps_task = f"{label}: epochs", f"{label}: steps"
    rows, best_state, best_epoch, best_val = [], None, -1, None
    flushing = run.train_images.device.type == "cpu" and torch.set_flush_denormal(True)  # False where unsupported
    try:
        for epoch in range(config.epochs):
            started = time.perf_counter()
            on_step = None
            if progress is not None:
                progress(epochs_task, epoch, config.epochs, "")
                on_step = lambda i, epoch=epoch: progress(steps_task, i, run.steps, f"epoch {epoch}")  # noqa: E731
                on_step(0)
            row = train_epoch(run, on_step)
            if _is_better(row["val_loss"], best_val):
                best_epoch, best_val = epoch, row["val_loss"]
                best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
                if checkpoint is not None:  # at once: a crash later keeps the best weights so far
                    save_checkpoint(best_state, checkpoint, best_epoch=best_epoch)
            if rec is not None:
                rec.end_epoch(**row)
            rows.append({"epoch": epoch, **row, "seconds": time.perf_counter() - started})
            if progress is not None:
                progress(epochs_task, epoch + 1, config.epochs,
                         f"train {row['train_loss']:.4f}, val {row['val_loss']:.4f}")
    finally:
        if flushing:
            torch.set_flush_denormal(False)
        if rec is not None:
            rec.close()

    run.model.load_state_dict(best_state)
    history = pd.DataFrame(rows).set_index("epoch")
    return TrainResult(best_epoch=best_epoch, best_val_loss=best_val,
                       train_loss_at_best=float(history.loc[best_epoch, "train_loss"]),
                       history=history, checkpoint=None if checkpoint is None else str(checkpoint),
                       model=run.model)


def _set_up(config: TrainConfig, checkpoint: str | Path | None, data) -> tuple[Epochs, Any]:
    """Check the inputs, then build the model (seeded), the optimizer and the data on the device."""
    from gradflow.losses import get_loss

    device = resolve_device(config.device)
    if checkpoint is not None:
        check_checkpoint_path(checkpoint, writable=True)
    if config.amp and device.type != "cuda":
        raise GradflowError(f"mixed precision (amp) needs a CUDA device, not {device.type!r}")
    loss_fn = get_loss(config.loss)
    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    if data is None:
        data = config_data(config)
    run = Epochs(config, model, build_optimizer(config, model), torch.amp.GradScaler(device.type, enabled=config.amp),
                 loss_fn, data.train_images.to(device), data.train_labels.to(device), data.val_images.to(device),
                 data.val_labels.to(device), torch.Generator().manual_seed(config.seed),
                 torch.Generator(device=device).manual_seed(config.seed))
    return run, data


def config_data(config: TrainConfig):
    """The :class:`~gradflow.data.EMData` that ``config`` trains on: :func:`gradflow.data.load_data`
    of its ``data``, ``size``, ``seed``, ``n_train`` and ``n_val`` (a size that does not divide the
    ISBI slices is answered with the sizes its model's levels take). Raises
    :class:`~gradflow.errors.GradflowError`."""
    from gradflow.data import load_data

    return load_data(config.data, size=config.size, seed=config.seed, n_train=config.n_train,
                     n_val=config.n_val, side_step=config.side_step)


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors checkpoint that :func:`save_checkpoint` wrote."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("writer") == "gradflow"
    except Exception:  # noqa: BLE001 - not safetensors at all (text, another format, a folder)
        return False


def check_checkpoint_path(path: str | Path, writable: bool = False) -> None:
    """Refuse a checkpoint path that holds anything but a gradflow checkpoint (it would be replaced);
    ``writable``: also one whose folder cannot be made or written (a file on the way, no permission,
    a read-only file system), which is checked by making the folder and a probe file in it, so that
    a run does not train for hours and then fail to save. Raises
    :class:`~gradflow.errors.GradflowError`."""
    path = Path(path)
    if path.is_dir():
        raise GradflowError(f"checkpoint {str(path)!r} is a folder; give a file path (e.g. best.safetensors)")
    if path.exists() and not is_checkpoint(path):
        raise GradflowError(f"checkpoint {str(path)!r} exists and is not a gradflow checkpoint; "
                            f"choose another path")
    if writable:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path.parent):
                pass
        except OSError as err:
            raise GradflowError(f"cannot write checkpoint {str(path)!r}: "
                                f"{err.strerror or err}") from None


def save_checkpoint(state: dict[str, torch.Tensor], path: str | Path, **info: Any) -> None:
    """Write a state dict as safetensors (CPU, contiguous); ``info`` goes into its string metadata.

    Replaces only a gradflow checkpoint (``writer="gradflow"`` in its metadata), never another file.
    """
    from safetensors.torch import save_file

    check_checkpoint_path(path)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path),
                  metadata={**{k: str(v) for k, v in info.items()}, "writer": "gradflow"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)  # as any new file (safetensors' temporary file is 0600)
    except Exception as err:  # OSError, or safetensors' own error wrapping one
        if isinstance(err, GradflowError):
            raise
        raise GradflowError(f"cannot write checkpoint {str(path)!r}: "
                            f"{getattr(err, 'strerror', None) or err}") from None


def load_checkpoint(path: str | Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors checkpoint; when ``model`` is given, load the weights into it too."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise GradflowError(f"checkpoint {str(path)!r} does not exist")
    state = load_file(str(path))
    if model is not None:
        device = next(model.parameters()).device
        model.load_state_dict({k: v.to(device) for k, v in state.items()})
    return state
