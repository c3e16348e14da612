"""``gradflow train``: train one FCN variant with the Recorder attached, showing progress with ETA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gradflow.cli import app

@app.command("train")
def train_command(
    arch: Annotated[str, typer.Option(help="simple (--block × --depth per level) or table1 (the paper's Table 1 net, "
                                           "stage widths × --width/32).")] = "simple",
    depth: Annotated[int, typer.Option(help="Residual blocks per level.")] = 7,
    levels: Annotated[int, typer.Option(help="Down/up-sampling levels (size must divide by 2**levels).")] = 4,
    width: Annotated[int, typer.Option(help="Channels of every conv (constant across levels).")] = 32,
    block: Annotated[str, typer.Option(help="Residual block type.")] = "simple",
    bn: Annotated[bool, typer.Option("--bn/--no-bn", help="Batch normalisation.")] = True,
    short: Annotated[bool, typer.Option("--short/--no-short", help="Short (residual) skips.")] = True,
    long: Annotated[str, typer.Option(help="Long skips: sum, concat, sat, at, st or none.")] = "sum",
    dropout: Annotated[float, typer.Option(help="Dropout probability.")] = 0.0,
    init: Annotated[str, typer.Option(help="he (the paper's) or scaled (residual branches × L^-1/2, for no-BN nets).")] = "he",
    data: Annotated[str, typer.Option(help="'synthetic' or a folder with ISBI 2012 images and labels.")] = "synthetic",
    size: Annotated[int, typer.Option(help="Image / tile side in pixels.")] = 128,
    crop: Annotated[int, typer.Option(help="Train on random crop×crop patches (validation: whole images); 0 = off.")] = 0,
    crops_per_image: Annotated[int, typer.Option(help="With --crop: crops of each image per epoch (0: (size/crop)²).")] = 0,
    n_train: Annotated[int, typer.Option(help="Training images.")] = 25,
    n_val: Annotated[int, typer.Option(help="Validation images.")] = 5,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per optimizer step.")] = 4,
    loss: Annotated[str, typer.Option(help="bce or dice.")] = "bce",
    optimizer: Annotated[str, typer.Option(help="rmsprop (the paper's) or sgd (momentum 0.9, no Nesterov).")] = "rmsprop",
    lr: Annotated[float, typer.Option(help="Learning rate (the paper's RMSprop: 1e-3; SGD usually wants ~1e-2).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (L2 added to the gradient), either optimizer.")] = 1e-3,
    weight_decay_mode: Annotated[str, typer.Option(help="torch (wd·w on every gradient), l2 (Keras l2 on conv "
                                                        "kernels: 2·wd·W, the paper's) or decoupled.")] = "torch",
    rmsprop_alpha: Annotated[float, typer.Option(help="RMSprop's running-average factor (torch 0.99; Keras 1.x, "
                                                      "the paper's: 0.9).")] = 0.99,
    score_passes: Annotated[int, typer.Option(help="Score the best model on the validation images (V_rand, V_info, "
                                                   "pixel error), averaging N dropout passes; 0 = off.")] = 0,
    sparsity: Annotated[float, typer.Option(help="Weight of the SAT channel-selection L1 penalty.")] = 1e-4,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Flips, rotations, shear, elastic warp.")] = True,
    seed: Annotated[int, typer.Option(help="Seed for weights, data, batch order, augmentation, dropout.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")] = "auto",
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision (CUDA only).")] = False,
    every: Annotated[int, typer.Option(help="Record every N-th optimizer step.")] = 1,
    out: Annotated[str, typer.Option(help="Zarr store to record into (path or fsspec URL).")] = "run.zarr",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT (and CHECKPOINT) if they hold a gradflow run (checkpoint); nothing else is ever deleted.")] = False,
    checkpoint: Annotated[Optional[str], typer.Option(help="Safetensors file for the best-validation weights.")] = None,
) -> None:
    """Train one variant end to end, recording gradient flow into OUT."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from gradflow.errors import GradflowError
    from gradflow.lock import filesystem
    from gradflow.train import TrainConfig, train

    config = TrainConfig(arch=arch, crop=crop, crops_per_image=crops_per_image, weight_decay_mode=weight_decay_mode,
                         rmsprop_alpha=rmsprop_alpha, score_passes=score_passes, block=block, depth=depth,
                         levels=levels, width=width, batch_norm=bn,
                         short_skip=short, long_skip=long, dropout=dropout, init=init, data=data, size=size,
                         n_train=n_train, n_val=n_val, epochs=epochs, batch_size=batch_size, loss=loss,
                         optimizer=optimizer, lr=lr, weight_decay=weight_decay, seed=seed, device=device, amp=amp,
                         every=every, augment=augment, sparsity=sparsity)
    fs, path = filesystem(out)  # an unknown protocol (foo://) is one error line
    if fs.exists(path):
        if not overwrite:
            raise GradflowError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
        if not fs.exists(path.rstrip("/") + "/zarr.json"):
            raise GradflowError(f"{out} exists and is not a Zarr store; --overwrite replaces only a gradflow "
                                f"store: choose another --out")
    if checkpoint is not None:
        from gradflow.train import check_checkpoint_path

        check_checkpoint_path(checkpoint)  # never a file that is not a gradflow checkpoint
        if Path(checkpoint).exists() and not overwrite:
            raise GradflowError(f"checkpoint {checkpoint} already exists; pass --overwrite to replace it")
    # The store is replaced (mode "w": only a gradflow run) by the Recorder, after train() has checked
    # every other input (data, model, device): a bad input never costs the old store.
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        result = train(config, out, checkpoint=checkpoint, progress=progress, mode="w" if overwrite else "w-")
    best = result.history.loc[result.best_epoch]
    saved = f", checkpoint {result.checkpoint}" if result.checkpoint else ""
    typer.echo(f"trained {config.epochs} epochs; best epoch {result.best_epoch}: val loss {result.best_val_loss:.4f} "
               f"(train {result.train_loss_at_best:.4f}), val accuracy {best['val_accuracy']:.4f}; "
               f"store {out}{saved}")
    if config.score_passes:
        from gradflow.data import load_data
        from gradflow.sweep import score_segmentation

        data = load_data(config.data, size=config.size, seed=config.seed, n_train=config.n_train, n_val=config.n_val)
        scores = score_segmentation(result.model, data.val_images, data.val_labels, config.score_passes,
                                    seed=config.seed, batch_size=config.batch_size)
        typer.echo(f"validation images, {config.score_passes} dropout passes: V_rand {scores['v_rand']:.4f}, "
                   f"V_info {scores['v_info']:.4f}, pixel error {scores['pixel_error']:.4f}")
