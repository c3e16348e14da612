"""``gradflow sweep``: train a grid of FCN variants into one store, resumably, locally or on Ray.

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


@app.command("sweep")
def sweep_command(
    depths: Annotated[str, typer.Option(help="Comma-separated residual blocks per level, e.g. 3,7,9.")] = "3,7,9",
    bn: Annotated[bool, typer.Option("--bn/--no-bn", help="Batch normalisation.")] = True,
    long: Annotated[str, typer.Option(help="Comma-separated long skips: sum, concat, sat, at, st, none.")] = "sum",
    short: Annotated[Optional[bool], typer.Option("--short/--no-short",
                                                  help="Only with / only without short skips (default: both).")] = None,
    block: Annotated[str, typer.Option(help="Residual block: simple, basic or bottleneck.")] = "simple",
    width: Annotated[int, typer.Option(help="Channels of every conv (constant across levels).")] = 16,
    levels: Annotated[int, typer.Option(help="Down/up-sampling levels (size must divide by 2**levels).")] = 3,
    epochs: Annotated[int, typer.Option(help="Training epochs per variant.")] = 15,
    batch_size: Annotated[int, typer.Option(help="Images per optimizer step.")] = 4,
    loss: Annotated[str, typer.Option(help="bce or dice.")] = "bce",
    optimizer: Annotated[str, typer.Option(help="Comma-separated optimizers: rmsprop (the paper's), sgd (momentum 0.9).")] = "rmsprop,sgd",
    lr: Annotated[Optional[float], typer.Option(help="Learning rate for every optimizer of the grid "
                                                     "(default: rmsprop 1e-4, sgd 1e-2; the paper's RMSprop: 1e-3, too large without BN).")] = None,
    init: Annotated[str, typer.Option(help="he (the paper's) or scaled (residual branches × L^-1/2, for no-BN nets).")] = "scaled",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; several seeds add -s<seed> to names.")] = "0",
    data: Annotated[str, typer.Option(help="'synthetic' or a folder with ISBI 2012 images/labels or TIFF stacks.")] = "synthetic",
    size: Annotated[int, typer.Option(help="Image / tile side in pixels.")] = 64,
    n_train: Annotated[int, typer.Option(help="Training images (tiles for ISBI at size < 512).")] = 24,
    n_val: Annotated[int, typer.Option(help="Validation images.")] = 4,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")] = "auto",
    every: Annotated[int, typer.Option(help="Record every N-th optimizer step.")] = 1,
    out: Annotated[str, typer.Option(help="Store for the whole sweep (path or fsspec URL).")] = "updates.zarr",
    force: Annotated[bool, typer.Option("--force", help="Retrain finished variants too.")] = False,
    executor: Annotated[str, typer.Option(help="local (one after another, here) or ray.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="Existing Ray cluster (default: start a local one).")] = None,
) -> None:
    """Train every depth × batch-norm × long-skip × short-skip × optimizer × seed variant into one store."""
    from rich.console import Console

    from gradflow.sweep import EXECUTORS, expand_grid, run_sweep, validate
    from gradflow.train import OPTIMIZERS, TrainConfig

    depth_values = parse_ints(depths, "--depths", minimum=1)
    seed_values = parse_ints(seeds, "--seeds", minimum=0)
    long_values = parse_choices(long, "--long", LONG_SKIPS)
    optimizer_values = parse_choices(optimizer, "--optimizer", OPTIMIZERS)
    parse_choices(executor, "--executor", EXECUTORS)
    parse_choices(init, "--init", ("he", "scaled"))
    if ray_address and executor != "ray":
        raise GradflowError("--ray-address needs --executor ray")
    base = TrainConfig(block=block, width=width, levels=levels, batch_norm=bn, init=init, epochs=epochs, batch_size=batch_size,
                       loss=loss, data=data, size=size, n_train=n_train, n_val=n_val, device=device,
                       every=every)
    variants = expand_grid(base, depths=depth_values, batch_norms=[bn], long_skips=long_values,
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
