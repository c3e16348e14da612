"""``gradflow sweep``: train a grid of FCN variants into one store, resumably, locally or on Ray.

``--preset fig4|table3|table2 --data PATH`` trains the variants of one of the paper's experiments
instead, with the paper's settings (:data:`gradflow.sweep.PRESETS`); every other option overrides a
setting for all of its variants (e.g. ``--crop 128 --width 8`` for a CPU-sized run), and the store records
the resulting config, the preset and the panel of each variant.

The defaults make ``gradflow sweep --depths 3,7,9 --no-bn`` a few-minute CPU run on synthetic data;
``--size 512 --data PATH`` on a GPU is the paper's experiment. Two defaults deviate from the paper so
that the no-BN grid trains at all (measured in the README's Results section):

- ``--init scaled``: He init with each residual branch's last conv × L^(-1/2) (L = blocks with a
  short skip). With the paper's ``--init he`` and no BN, each residual block doubles the activation
  variance (depth 9, 3 levels: logits of std ~2e5 at init, training losses ~1e4).
- RMSprop's lr 1e-4 (the paper: 1e-3). RMSprop's running mean of squared gradients starts at 0, so
  its first steps move every weight by ~10× lr; at 1e-3 this blows up every no-BN variant in the
  first epoch (training loss 1e2 to 1e9) and leaves dead networks.

And one addition: ``--optimizer rmsprop,sgd`` trains every variant with the paper's RMSprop *and*
with SGD (momentum 0.9, lr 1e-2), names of SGD variants ending in ``-sgd``. RMSprop divides each
gradient by its running RMS, so a starved centre still moves ~lr per step and Fig. 4's |ΔW| heatmap
hides the vanishing gradients that its gradient-norm heatmap shows; SGD's |ΔW| is proportional to the
gradient and shows the paper's picture. ``--lr`` sets one learning rate for every optimizer of the
grid; without it each optimizer takes its own default (:data:`DEFAULT_LR`). For other rates per
optimizer, run one sweep per optimizer into the same ``--out``.
"""

from __future__ import annotations

import shlex
import sys
from typing import Annotated, Optional

import typer

from gradflow.cli import app
from gradflow.errors import GradflowError

LONG_SKIPS = ("sum", "concat", "sat", "at", "st", "none")
DEFAULT_LR = {"rmsprop": 1e-4, "sgd": 1e-2}  # per optimizer, when --lr is not given


def parse_ints(text: str, option: str, minimum: int) -> list[int]:
    """``"3,7,9"`` → ``[3, 7, 9]``; anything else is a one-line GradflowError naming the option."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise GradflowError(f"{option}: {part!r} is not an integer (expected e.g. {option} 3,7,9)") from None
        if value < minimum:
            raise GradflowError(f"{option}: {value} is out of range (each value must be >= {minimum})")
        values.append(value)
    return values


def parse_choices(text: str, option: str, choices: tuple[str, ...]) -> list[str]:
    """``"sum,none"`` → ``["sum", "none"]``, each checked against ``choices``."""
    values = [part.strip() for part in text.split(",")]
    for value in values:
        if value not in choices:
            raise GradflowError(f"{option}: unknown value {value!r}; choose from {', '.join(choices)}")
    return values


# Defaults of a plain grid sweep (without --preset); a preset brings its own (gradflow.sweep.PRESETS).
GRID_DEFAULTS = dict(depths="3,7,9", bn=True, long="sum", block="simple", width=16, levels=3, epochs=15,
                     batch_size=4, loss="bce", optimizer="rmsprop,sgd", init="scaled", data="synthetic", size=64,
                     n_train=24, n_val=4, device="auto", every=1, arch="simple", crop=0, crops_per_image=0, dropout=0.0,
                     weight_decay=1e-3, weight_decay_mode="torch", rmsprop_alpha=0.99, score_passes=0)
# Options that name a TrainConfig field directly (option name -> field).
FIELDS = dict(block="block", width="width", levels="levels", epochs="epochs", batch_size="batch_size", loss="loss",
              init="init", data="data", size="size", n_train="n_train", n_val="n_val", device="device", every="every",
              arch="arch", crop="crop", crops_per_image="crops_per_image", dropout="dropout", weight_decay="weight_decay",
              weight_decay_mode="weight_decay_mode", rmsprop_alpha="rmsprop_alpha", score_passes="score_passes",
              lr="lr")


@app.command("sweep")
def sweep_command(
    preset: Annotated[Optional[str], typer.Option(help="A paper experiment: fig4, table3 or table2 (needs --data; "
                                                       "the options below override its settings).")] = None,
    depths: Annotated[Optional[str], typer.Option(help="Comma-separated residual blocks per level, e.g. 3,7,9.")] = None,
    bn: Annotated[Optional[bool], typer.Option("--bn/--no-bn", help="Batch normalisation.")] = None,
    long: Annotated[Optional[str], typer.Option(help="Comma-separated long skips: sum, concat, sat, at, st, none.")] = None,
    short: Annotated[Optional[bool], typer.Option("--short/--no-short",
                                                  help="Only with / only without short skips (default: both).")] = None,
    arch: Annotated[Optional[str], typer.Option(help="simple (--block × --depths per level) or table1 (the paper's "
                                                     "Table 1 net, stage widths × --width/32).")] = None,
    block: Annotated[Optional[str], typer.Option(help="Residual block: simple, basic or bottleneck.")] = None,
    width: Annotated[Optional[int], typer.Option(help="Channels of every conv (table1: of the first stage; 32 = Table 1).")] = None,
    levels: Annotated[Optional[int], typer.Option(help="Down/up-sampling levels (size must divide by 2**levels).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs per variant.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images (or crops) per optimizer step.")] = None,
    loss: Annotated[Optional[str], typer.Option(help="bce or dice.")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout in every residual block.")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="Comma-separated optimizers: rmsprop (the paper's), sgd (momentum 0.9).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate for every optimizer of the grid "
                                                     "(default: rmsprop 1e-4, sgd 1e-2; the paper's RMSprop: 1e-3, too large without BN).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay (the paper's: 1e-3).")] = None,
    weight_decay_mode: Annotated[Optional[str], typer.Option(
        help="torch (wd·w added to every gradient), l2 (Keras l2 regularizer: 2·wd·W on conv kernels, the "
             "paper's) or decoupled (conv kernels × (1 − lr·wd) after each step).")] = None,
    rmsprop_alpha: Annotated[Optional[float], typer.Option(help="RMSprop's running-average factor (torch: 0.99; "
                                                                "Keras 1.x rho, the paper's: 0.9).")] = None,
    init: Annotated[Optional[str], typer.Option(help="he (the paper's) or scaled (residual branches × L^-1/2, for no-BN nets).")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; several seeds add -s<seed> to names.")] = "0",
    data: Annotated[Optional[str], typer.Option(help="'synthetic' or a folder with ISBI 2012 images/labels or TIFF stacks.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Image / tile side in pixels.")] = None,
    crop: Annotated[Optional[int], typer.Option(help="Train on random crop×crop patches of the images "
                                                     "(an epoch: (size/crop)² crops per image); 0 = whole images.")] = None,
    crops_per_image: Annotated[Optional[int], typer.Option(help="With --crop: crops of each training image per "
                                                                "epoch (default (size/crop)²).")] = None,
    n_train: Annotated[Optional[int], typer.Option(help="Training images (tiles for ISBI at size < 512).")] = None,
    n_val: Annotated[Optional[int], typer.Option(help="Validation images.")] = None,
    score_passes: Annotated[Optional[int], typer.Option(help="Score the best model on the validation images "
                                                             "(V_rand, V_info, pixel error) averaging N dropout passes; 0 = off.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")] = None,
    every: Annotated[Optional[int], typer.Option(help="Record every N-th optimizer step.")] = None,
    out: Annotated[str, typer.Option(help="Store for the whole sweep (path or fsspec URL).")] = "updates.zarr",
    force: Annotated[bool, typer.Option("--force", help="Retrain finished variants too.")] = False,
    executor: Annotated[str, typer.Option(help="local (one after another, here) or ray.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="Existing Ray cluster (default: start a local one).")] = None,
) -> None:
    """Train every depth × batch-norm × long-skip × short-skip × optimizer × seed variant into one store,
    or with --preset the variants of one of the paper's experiments."""
    given = {name: value for name, value in locals().items() if name in FIELDS and value is not None}
    from rich.console import Console

    from gradflow.sweep import EXECUTORS, PRESETS, expand_grid, preset_variants, run_sweep, validate
    from gradflow.train import ARCHS, OPTIMIZERS, WEIGHT_DECAY_MODES, TrainConfig

    seed_values = parse_ints(seeds, "--seeds", minimum=0)
    parse_choices(executor, "--executor", EXECUTORS)
    for option, choices in (("init", ("he", "scaled")), ("arch", ARCHS), ("weight_decay_mode", WEIGHT_DECAY_MODES)):
        if given.get(option) is not None:
            parse_choices(given[option], f"--{option.replace('_', '-')}", choices)
    if ray_address and executor != "ray":
        raise GradflowError("--ray-address needs --executor ray")
    if preset is not None:
        parse_choices(preset, "--preset", tuple(PRESETS))
        grid = [f"--{name}" for name, value in (("depths", depths), ("bn", bn), ("long", long), ("short", short))
                if value is not None]
        if grid:
            raise GradflowError(f"{', '.join(grid)}: --preset {preset} sets these per panel; "
                                f"run a grid without --preset to vary them")
        if given.get("data", "synthetic") == "synthetic":
            raise GradflowError(f"--preset {preset} runs the paper's experiment on ISBI 2012: give --data PATH")
        overrides = {FIELDS[name]: value for name, value in given.items()}
        if optimizer is not None:
            values = parse_choices(optimizer, "--optimizer", OPTIMIZERS)
            if len(values) > 1:
                raise GradflowError(f"--optimizer: a preset trains with one optimizer, got {optimizer}")
            overrides["optimizer"] = values[0]
        variants = preset_variants(preset, overrides, seeds=seed_values)
    else:
        settings = {**GRID_DEFAULTS, **given}
        depth_values = parse_ints(depths or GRID_DEFAULTS["depths"], "--depths", minimum=1)
        long_values = parse_choices(long or GRID_DEFAULTS["long"], "--long", LONG_SKIPS)
        optimizer_values = parse_choices(optimizer or GRID_DEFAULTS["optimizer"], "--optimizer", OPTIMIZERS)
        batch_norm = GRID_DEFAULTS["bn"] if bn is None else bn
        base = TrainConfig(**{FIELDS[name]: settings[name] for name in FIELDS if name != "lr"}, batch_norm=batch_norm)
        variants = expand_grid(base, depths=depth_values, batch_norms=[batch_norm], long_skips=long_values,
                               short_skips=[False, True] if short is None else [short], optimizers=optimizer_values,
                               seeds=seed_values,
                               learning_rates={o: DEFAULT_LR[o] if lr is None else lr for o in optimizer_values})
    command = shlex.join(["gradflow", *sys.argv[1:]])  # as typed (argv[0] is the script's path)
    validate(variants)  # bad options fail here, before anything is printed or trained
    if executor == "ray" and out.startswith("memory://"):
        raise GradflowError("a memory:// store lives in one process; give --executor ray a path or URL")
    console = Console(stderr=False)
    console.print(f"{len(variants)} variant(s) into {out}")
    outcomes = run_sweep(variants, out, force=force, executor=executor, ray_address=ray_address,
                         command=command, console=console)
    console.print(f"trained {len(outcomes)}, skipped {len(variants) - len(outcomes)} finished; store {out}")
