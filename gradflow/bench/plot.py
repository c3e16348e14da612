"""How long ``gradflow plot`` takes on a big store: 10⁵ steps × 300 layers, read lazily.

Writes a store in the gradflow layout (random values, chunks of 1024 steps as the Recorder writes
them), then times opening it and drawing the per-step heatmap (binned), the per-epoch heatmap of a
step variable (averaged per epoch) and the Fig. 4 heatmap from the epoch group, and prints the
timings (with ``--out``, also as Markdown).

    gradflow bench plot [--steps 100000] [--layers 300] [--out reports/bench_plot.md]

What it times is drawn by ``analyses`` (the figures of ``gradflow plot``), which the library does not
import: the CLI hands the drawing function in (``draw``), so this one runs only as ``gradflow bench plot``.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from gradflow import bench, schema
from gradflow.errors import GradflowError
from gradflow.progress import Progress

STEP_VARIABLES = schema.names(schema.STEP_VARIABLES)


def write_store(path: Path, steps: int, layers: int, epochs: int) -> None:
    """A single-run store with the Recorder's layout and chunking (random positive values)."""
    rng = np.random.default_rng(0)
    names = [f"down{i // 40}.block{i % 40}.conv" for i in range(layers)]
    layer_coords = {"layer": names, "depth": ("layer", np.arange(layers)),
                    "module_type": ("layer", ["Conv2d"] * layers), "num_params": ("layer", np.full(layers, 9216))}
    attrs = {"gradflow_schema": schema.VERSION, "gradflow_kind": "run"}
    shutil.rmtree(path, ignore_errors=True)
    first = True
    for start in range(0, steps, 8192):  # write in slabs so the generator itself stays small
        n = min(8192, steps - start)
        step = np.arange(start, start + n)
        ds = xr.Dataset({v: (("step", "layer"), rng.uniform(1e-6, 1, (n, layers)).astype("float32"))
                         for v in STEP_VARIABLES},
                        coords={"step": step, "epoch": ("step", step * epochs // steps),
                                "wall_time": ("step", step * 0.01), "skipped": ("step", np.zeros(n, bool)),
                                **layer_coords}, attrs=attrs)
        encoding = {v: {"chunks": (1024, layers)} for v in STEP_VARIABLES} if first else None
        ds.to_zarr(path, mode="w" if first else "a", append_dim=None if first else "step", encoding=encoding,
                   consolidated=False)
        first = False
    ep = xr.Dataset({"update_mean_abs": (("epoch", "layer"), rng.uniform(1e-5, 1e-2, (epochs, layers)).astype("float32")),
                     "update_norm": (("epoch", "layer"), rng.uniform(0.1, 1, (epochs, layers)).astype("float32")),
                     "train_loss": ("epoch", rng.uniform(0.2, 0.7, epochs)),
                     "val_loss": ("epoch", rng.uniform(0.2, 0.7, epochs))},
                    coords={"epoch": np.arange(epochs), **layer_coords},
                    attrs={"gradflow_schema": schema.VERSION, "gradflow_kind": "epochs"})
    ep.to_zarr(path, group="epochs", mode="w", consolidated=False)
    import zarr

    zarr.consolidate_metadata(str(path))


Draw = Callable[..., Figure]
"""``draw(store, stat=..., per=...)``: open ``store`` and draw its heatmaps (``gradflow plot``'s figure)."""
FIGURES = [("update_mean_abs per epoch (epoch group, Fig. 4)", {}),
           ("grad_norm per step (200 bins)", {"stat": "grad_norm", "per": "step"}),
           ("grad_norm per epoch (mean of each epoch's steps)", {"stat": "grad_norm"})]


def time_figures(scratch: Path, steps: int, layers: int, epochs: int, draw: Draw,
                 progress: Progress | None = None) -> list[str]:
    """Write the big store into ``scratch``, then time each of :data:`FIGURES`; one Markdown row each."""
    store = scratch / "bench_plot.zarr"
    started = time.perf_counter()
    write_store(store, steps, layers, epochs)
    print(f"wrote a store of {steps} steps × {layers} layers in {time.perf_counter() - started:.1f} s")
    rows = []
    for done, (label, kwargs) in enumerate(FIGURES):
        if progress is not None:
            progress("plot: heatmaps", done, len(FIGURES), label)
        started = time.perf_counter()
        draw(str(store), **kwargs).savefig(scratch / "bench_plot.png", dpi=150)
        seconds = time.perf_counter() - started
        rows.append(f"| {label} | {seconds:.2f} |")
        print(f"{label}: {seconds:.2f} s")
    if progress is not None:
        progress("plot: heatmaps", len(FIGURES), len(FIGURES), "")
    return rows


def main(argv: list[str] | None = None, progress: Progress | None = None, draw: Draw | None = None) -> list[str]:
    """Time the three heatmaps on a generated store; print the timings and, given ``--out``, write them."""
    parser = bench.parser("plot", __doc__)
    parser.add_argument("--steps", type=bench.positive_int, default=100_000)
    parser.add_argument("--layers", type=bench.positive_int, default=300)
    parser.add_argument("--epochs", type=bench.positive_int, default=100)
    bench.add_report_options(parser)
    args = parser.parse_args(argv)
    out = bench.check_out(args.out, args.force)
    if draw is None:
        raise GradflowError("the plot benchmark times analyses' heatmaps; run it as `gradflow bench plot`")
    warnings.filterwarnings("ignore", message="The data type")  # zarr: fixed-length strings not in the v3 spec
    with tempfile.TemporaryDirectory(prefix="gradflow-bench-plot-") as scratch:
        rows = time_figures(Path(scratch), args.steps, args.layers, args.epochs, draw, progress)
    bench.write_report(out, "\n".join([
        "# Plotting a big store",
        "",
        f"`gradflow bench plot`: a store of {args.steps} steps × {args.layers} layers "
        f"({args.epochs} epochs, chunks of 1024 steps), open + heatmap + PNG at 150 dpi, wall seconds.",
        f"Machine: {platform.processor() or platform.machine()}" + (f"; {args.note}" if args.note else "") + ".",
        "",
        "| figure | seconds |",
        "|---|---:|",
        *rows,
        "",
    ]))
    return rows
