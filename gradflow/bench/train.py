"""Training throughput (images/s): gradflow's loop vs a plain hand-written PyTorch loop.

Three variants train the same model on the same data with the same seed:

* ``plain``        – the loop anyone would write: shuffle, augment, forward, loss, backward, step,
                     device-side loss sum, validation each epoch, keep the best weights;
* ``recorder off`` – ``gradflow.train.train(config, store=None)``;
* ``recorder on``  – ``train(config, store=<fresh local zarr>)`` with the Recorder on every step.

Each repetition runs all three, in an order rotated per repetition, in one process, so that machine
load drifts hit all variants alike; the report gives medians and median-based ratios. Throughput is
training images per second for a whole run (model construction, every epoch with its validation
pass, best-weight bookkeeping; for ``recorder on`` also opening and closing the store), by wall time
(the figure that matters on a GPU or a quiet machine) and by process CPU time (what a shared CPU
machine disturbs least). The data are loaded once, outside the timings. Targets: recorder off ≥ 0.95 × plain, recorder on
≥ 0.92 × plain.

Usage: ``gradflow bench train [--reps 5] [--epochs 3] [--threads 1] [--device cuda] ...
[--out reports/bench_train.md]`` (or ``python -m gradflow.bench.train``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from gradflow import bench
from gradflow.progress import Progress
from gradflow.train import Range, TrainConfig, build_model, resolve_device, setting_range, train

VARIANTS = ("plain", "recorder off", "recorder on")
BENCH_CONFIG = TrainConfig(depth=7, levels=4, width=32, size=128, n_train=25, n_val=5, batch_size=4, epochs=3,
                           init="he", lr=1e-3)
"""The measured run (that of reports/bench_train.md: the paper's optimizer settings); options override it."""
TARGETS = {"recorder off": 0.95, "recorder on": 0.92}  # minimum throughput ratio to the plain loop


def plain_loop(config: TrainConfig, data) -> torch.nn.Module:
    """The reference: a plain PyTorch training loop doing the same work as ``train``.

    Same seeding, batch order and augmentation as ``train``, so it ends with the same weights
    (tests/bench/test_train.py checks it): the comparison is like for like.
    """
    from gradflow.data import augment_batch
    from gradflow.losses import get_loss

    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = get_loss(config.loss)
    x_train, y_train = data.train_images.to(device), data.train_labels.to(device)
    x_val, y_val = data.val_images.to(device), data.val_labels.to(device)
    order_generator = torch.Generator().manual_seed(config.seed)
    augment_generator = torch.Generator(device=device).manual_seed(config.seed)
    best_val, best_state = float("inf"), None
    for _ in range(config.epochs):
        model.train()
        train_loss = torch.zeros((), device=device)
        for index in torch.randperm(len(x_train), generator=order_generator).to(device).split(config.batch_size):
            x, y = x_train[index], y_train[index]
            if config.augment:
                x, y = augment_batch(x, y, augment_generator)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            train_loss += loss.detach() * len(index)
        model.eval()
        val_loss = torch.zeros((), device=device)
        with torch.no_grad():
            for start in range(0, len(x_val), config.batch_size):
                x, y = x_val[start:start + config.batch_size], y_val[start:start + config.batch_size]
                val_loss += loss_fn(model(x), y) * len(x)
        train_loss, val_loss = (torch.stack([train_loss / len(x_train), val_loss / len(x_val)])).tolist()
        if val_loss < best_val:
            best_val, best_state = val_loss, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model


def _sync(config: TrainConfig) -> None:
    if resolve_device(config.device).type == "cuda":
        torch.cuda.synchronize()


def time_variant(name: str, config: TrainConfig, data, scratch: Path) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for one whole run of variant ``name``.

    CPU time counts every thread of this process (torch's intra-op threads, the Recorder's writer),
    so on a CPU device it is the work done, which other jobs on a shared machine disturb far less
    than wall time.
    """
    _sync(config)
    wall, cpu = time.perf_counter(), time.process_time()
    if name == "plain":
        plain_loop(config, data)
    elif name == "recorder off":
        train(config, store=None, data=data)
    else:
        train(config, store=str(scratch / f"run-{time.monotonic_ns()}.zarr"), data=data)
    _sync(config)
    return time.perf_counter() - wall, time.process_time() - cpu


def run_benchmark(config: TrainConfig, reps: int, progress: Progress | None = None) -> pd.DataFrame:
    """Images/s per (repetition, variant), by wall and by CPU time; variants interleaved, order rotating.

    ``progress``: called after each timed run (:mod:`gradflow.progress`).
    """
    from gradflow.train import config_data

    data = config_data(config)
    images = len(data.train_images) * config.epochs
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        warmup = dataclasses.replace(config, epochs=1)
        for name in VARIANTS:  # warm-up: allocator, kernels, lazy imports, the zarr codecs
            time_variant(name, warmup, data, Path(scratch))
        for rep in range(reps):
            for name in VARIANTS[rep % 3:] + VARIANTS[:rep % 3]:
                wall, cpu = time_variant(name, config, data, Path(scratch))
                rows.append({"rep": rep, "variant": name, "wall_s": wall, "cpu_s": cpu,
                             "images_per_s": images / wall, "images_per_cpu_s": images / cpu})
                print(f"rep {rep} {name:>12}: {images / wall:8.2f} images/s, {images / cpu:8.2f} images/CPU-s")
                if progress is not None:
                    progress("train: timed runs", len(rows), reps * len(VARIANTS), "")
    return pd.DataFrame(rows)


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Median throughput per variant (wall and CPU time), ratios to the plain loop, targets met?"""
    wall = results.groupby("variant")["images_per_s"].median()
    cpu = results.groupby("variant")["images_per_cpu_s"].median()
    table = pd.DataFrame({"images/s": wall, "ratio": wall / wall["plain"],
                          "images/CPU-s": cpu, "ratio (CPU time)": cpu / cpu["plain"]})
    target = pd.Series(TARGETS).reindex(table.index)
    table["target"] = ["" if pd.isna(t) else f"≥ {t:.2f}" for t in target]
    for column, met in (("ratio", "met"), ("ratio (CPU time)", "met (CPU time)")):
        table[met] = ["" if pd.isna(t) else "yes" if r >= t else "NO" for r, t in zip(table[column], target)]
    return table.loc[list(VARIANTS)]


def markdown_table(frame: pd.DataFrame, digits: int) -> str:
    """A GitHub Markdown table of ``frame`` (index as first column), floats to ``digits`` decimals."""
    def cell(value) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    header = [str(frame.index.name or "")] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in frame.iterrows():
        lines.append("| " + " | ".join([cell(index)] + [cell(v) for v in row]) + " |")
    return "\n".join(lines)


def report_text(config: TrainConfig, reps: int, results: pd.DataFrame, table: pd.DataFrame,
                load_before: str = "n/a", note: str = "") -> str:
    """Markdown: the summary table, the conditions of the run, and every repetition."""
    device = resolve_device(config.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    per_rep = results.pivot(index="rep", columns="variant", values=["images_per_s", "images_per_cpu_s"])
    per_rep.columns = [f"{variant} ({'wall' if measure == 'images_per_s' else 'CPU'})" for measure, variant in per_rep.columns]
    text = [
        "# Training throughput: gradflow loop vs plain PyTorch loop",
        "",
        "Produced by `gradflow bench train`. Throughput = training images per second for a whole",
        "run (model construction, all epochs with validation, best-weight bookkeeping; recorder on also",
        "opens, fills and closes a local Zarr store), by wall time and by this process's CPU time (all its",
        "threads; the figure a shared CPU machine disturbs least). The three variants run interleaved in",
        "one process, order rotating per repetition; medians over repetitions; ratios are to the plain",
        "loop's median. `plain` is a hand-written loop that trains bit-identical weights to `train`.",
        "",
        "## Result",
        "",
        markdown_table(table, 3),
        "",
        "## Conditions",
        "",
        f"- device: {device} ({device_name}); torch {torch.__version__}; {os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} torch threads",
        f"- load average (1/5/15 min) before: {load_before}; after: {_load()}",
        f"- {reps} repetitions of {config.epochs} epochs (+1 warm-up epoch per variant)",
        f"- model: simple_fcn depth {config.depth}, levels {config.levels}, width {config.width}, "
        f"block {config.block}, batch norm {config.batch_norm}, short skips {config.short_skip}, "
        f"long skips {config.long_skip}",
        f"- data: {config.data} {config.size}², {config.n_train} train / {config.n_val} val, batch "
        f"{config.batch_size}, augment {config.augment}, loss {config.loss}, amp {config.amp}, "
        f"recorder every {config.every} step(s)",
        *([f"- note: {note}"] if note else []),
        "",
        "## Every repetition (images/s)",
        "",
        markdown_table(per_rep, 2),
        "",
    ]
    return "\n".join(text)


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main(argv: list[str] | None = None, progress: Progress | None = None) -> pd.DataFrame:
    """Measure the three variants' throughput, print the table and, given ``--out``, write the report."""
    parser = bench.parser("train", __doc__)
    parser.add_argument("--reps", type=bench.positive_int, default=5, help="timed repetitions of each variant")
    parser.add_argument("--epochs", type=bench.positive_int, default=3, help="epochs per timed run")
    for name in ("depth", "levels", "width", "size", "n_train", "n_val", "batch_size"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=bench.in_range(setting_range(name)),
                            default=getattr(BENCH_CONFIG, name))
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=BENCH_CONFIG.augment)
    parser.add_argument("--device", default=BENCH_CONFIG.device)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=BENCH_CONFIG.amp)
    parser.add_argument("--threads", type=bench.in_range(Range(int, 0, bench.MAX_THREADS)), default=0,
                        help="torch intra-op threads (0: torch's default)")
    bench.add_report_options(parser)
    args = parser.parse_args(argv)
    out = bench.check_out(args.out, args.force)
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = ("epochs", "depth", "levels", "width", "size", "n_train", "n_val", "batch_size", "augment", "device", "amp")
    config = dataclasses.replace(BENCH_CONFIG, **{name: getattr(args, name) for name in fields})
    load_before = _load()
    results = run_benchmark(config, args.reps, progress)
    table = summarise(results)
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))
    bench.write_report(out, report_text(config, args.reps, results, table, load_before, args.note))
    return results


if __name__ == "__main__":
    bench.run(main)
