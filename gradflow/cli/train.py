"""``gradflow train``: train one FCN variant with the Recorder attached, showing progress with ETA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gradflow.cli import app
from gradflow.cli._options import config_options
from gradflow.train import TrainConfig


@app.command("train")
@config_options(TrainConfig)
def train_command(
    *,
    out: Annotated[str, typer.Option(help="Zarr store to record into (path or fsspec URL).")] = "run.zarr",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT (and CHECKPOINT) if they hold a gradflow run (checkpoint); nothing else is ever deleted.")] = False,
    checkpoint: Annotated[Optional[str], typer.Option(help="Safetensors file for the best-validation weights.")] = None,
    options: dict,
) -> None:
    """Train one variant end to end, recording gradient flow into OUT."""

    from gradflow.cli._progress import ProgressBars
    from gradflow.errors import GradflowError
    from gradflow.lock import filesystem
    from gradflow.paths import refuse_inside_store
    from gradflow.train import train

    config = TrainConfig(**options)
    fs, path = filesystem(out)  # an unknown protocol (foo://) is one error line
    refuse_inside_store(out, lambda root, inner, kind: "choose an --out outside it" + (
        "" if kind == "run" else f" (`gradflow sweep --out {root}` adds variants to it)"), writing=True)
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
    with ProgressBars(transient=True) as progress:
        result = train(config, out, checkpoint=checkpoint, progress=progress, mode="w" if overwrite else "w-")
    best = result.history.loc[result.best_epoch]
    saved = f", checkpoint {result.checkpoint}" if result.checkpoint else ""
    typer.echo(f"trained {config.epochs} epochs; best epoch {result.best_epoch}: val loss {result.best_val_loss:.4f} "
               f"(train {result.train_loss_at_best:.4f}), val accuracy {best['val_accuracy']:.4f}; "
               f"store {out}{saved}")
    if config.score_passes:
        from gradflow.sweep import score_segmentation
        from gradflow.train import config_data

        data = config_data(config)
        scores = score_segmentation(result.model, data.val_images, data.val_labels, config.score_passes,
                                    seed=config.seed, batch_size=config.batch_size)
        typer.echo(f"validation images, {config.score_passes} dropout passes: V_rand {scores['v_rand']:.4f}, "
                   f"V_info {scores['v_info']:.4f}, pixel error {scores['pixel_error']:.4f}")
