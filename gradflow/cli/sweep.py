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
from gradflow.cli._options import config_options
from gradflow.models import LONG_SKIPS
from gradflow.errors import GradflowError
from gradflow.train import TrainConfig, once, setting_range, split_list



def parse_ints(text: str, option: str, setting: str) -> list[int]:
    """``"3,7,9"`` → ``[3, 7, 9]``, each in the range of :class:`TrainConfig`'s ``setting``
    (:func:`gradflow.train.setting_range`); anything else is a one-line GradflowError naming the option."""
    values = []
    for part in split_list(text, option, "3,7,9"):
        try:
            value = int(part)
        except ValueError:
            raise GradflowError(f"{option}: {part!r} is not an integer (expected e.g. {option} 3,7,9)") from None
        problem = setting_range(setting).problem(value)
        if problem:
            raise GradflowError(f"{option}: each value {problem}")
        values.append(value)
    once(values, option)  # (3 and 03)
    return values


def parse_choices(text: str, option: str, choices: tuple[str, ...]) -> list[str]:
    """``"sum,none"`` → ``["sum", "none"]``, each checked against ``choices``."""
    values = split_list(text, option, ",".join(choices[:2]))
    for value in values:
        if value not in choices:
            raise GradflowError(f"{option}: unknown value {value!r}; choose from {', '.join(choices)}")
    return values


# Grid axes whose default is a list; the others default to the TrainConfig field they vary, and every
# other option is a TrainConfig field with its default.
GRID_DEFAULTS = dict(depths="3,7,9", optimizer="rmsprop,sgd")
GRID_FIELDS = ("depth", "batch_norm", "long_skip", "short_skip", "optimizer", "seed")


@app.command("sweep")
@config_options(TrainConfig, exclude=GRID_FIELDS, unset=True,
                help={"lr": "Learning rate for every optimizer of the grid (default per optimizer: rmsprop 1e-4, "
                            "sgd 1e-2; the paper's RMSprop lr 1e-3 blows up nets without BN)."})
def sweep_command(
    *,
    preset: Annotated[Optional[str], typer.Option(help="A paper experiment: fig4, table3 or table2 (needs --data; "
                                                       "the other options override its settings).")] = None,
    depths: Annotated[Optional[str], typer.Option(help="Comma-separated residual blocks per level, e.g. 3,7,9 "
                                                       "(default: 3,7,9).")] = None,
    bn: Annotated[Optional[bool], typer.Option("--bn/--no-bn", help="Batch normalisation (default: bn).")] = None,
    long: Annotated[Optional[str], typer.Option(help="Comma-separated long skips: sum, concat, sat, at, st, none "
                                                     "(default: sum).")] = None,
    short: Annotated[Optional[bool], typer.Option("--short/--no-short",
                                                  help="Only with / only without short skips (default: both).")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="Comma-separated optimizers: rmsprop (the paper's), sgd "
                                                          "(momentum 0.9) (default: rmsprop,sgd).")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; several seeds add -s<seed> to names.")] = "0",
    out: Annotated[str, typer.Option(help="Store for the whole sweep (path or fsspec URL).")] = "updates.zarr",
    force: Annotated[bool, typer.Option("--force", help="Retrain finished variants too.")] = False,
    executor: Annotated[str, typer.Option(help="local (one after another, here) or ray.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="Existing Ray cluster (default: start a local one).")] = None,
    options: dict,
) -> None:
    """Train every depth × batch-norm × long-skip × short-skip × optimizer × seed variant into one store,
    or with --preset the variants of one of the paper's experiments."""
    given = {name: value for name, value in options.items() if value is not None}
    from gradflow.cli._progress import ProgressBars
    from gradflow.sweep import EXECUTORS, PRESETS, StaleVariantError, expand_grid, preset_variants, run_sweep, validate
    from gradflow.train import DEFAULT_LR, OPTIMIZERS

    seed_values = parse_ints(seeds, "--seeds", "seed")
    parse_choices(executor, "--executor", EXECUTORS)
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
        overrides = dict(given)
        if optimizer is not None:
            values = parse_choices(optimizer, "--optimizer", OPTIMIZERS)
            if len(values) > 1:
                raise GradflowError(f"--optimizer: a preset trains with one optimizer, got {optimizer}")
            overrides["optimizer"] = values[0]
        variants = preset_variants(preset, overrides, seeds=seed_values)
    else:
        depth_values = parse_ints(GRID_DEFAULTS["depths"] if depths is None else depths, "--depths", "depth")
        long_values = parse_choices(TrainConfig.long_skip if long is None else long, "--long", LONG_SKIPS)
        optimizer_values = parse_choices(GRID_DEFAULTS["optimizer"] if optimizer is None else optimizer,
                                         "--optimizer", OPTIMIZERS)
        batch_norm = TrainConfig.batch_norm if bn is None else bn
        base = TrainConfig(**{name: value for name, value in given.items() if name != "lr"}, batch_norm=batch_norm)
        variants = expand_grid(base, depths=depth_values, batch_norms=[batch_norm], long_skips=long_values,
                               short_skips=[False, True] if short is None else [short], optimizers=optimizer_values,
                               seeds=seed_values,
                               learning_rates={o: given.get("lr", DEFAULT_LR[o]) for o in optimizer_values})
    command = shlex.join(["gradflow", *sys.argv[1:]])  # as typed (argv[0] is the script's path)
    validate(variants)  # bad options fail here, before anything is printed or trained
    if executor == "ray" and out.startswith("memory://"):
        raise GradflowError("a memory:// store lives in one process; give --executor ray a path or URL")
    typer.echo(f"{len(variants)} variant(s) into {out}")
    with ProgressBars() as progress:
        try:
            outcomes = run_sweep(variants, out, force=force, executor=executor, ray_address=ray_address,
                                 command=command, progress=progress,
                                 say=lambda line: progress.console.print(line, soft_wrap=True, markup=False))
        except StaleVariantError as err:
            raise GradflowError(f"{err}; use --force to retrain or --out for a new store") from None
    typer.echo(f"trained {len(outcomes)}, skipped {len(variants) - len(outcomes)} finished; store {out}")
