"""How long ``gradflow plot`` takes on a big store: 10⁵ steps × 300 layers, read lazily.

Writes a store in the gradflow layout (random values, chunks of 1024 steps as the Recorder writes
them), then times opening it and drawing the per-step heatmap (binned), the per-epoch heatmap of a
step variable (averaged per epoch) and the Fig. 4 heatmap from the epoch group, and writes the
figures as Markdown to ``reports/bench_plot.md``.

    python analyses/bench_plot.py [--steps 100000] [--layers 300] [--store /tmp/bench_plot.zarr]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

STEP_VARIABLES = ("grad_norm", "grad_max_abs", "update_norm", "update_mean_abs", "update_max_abs", "param_norm",
                  "update_ratio", "nonfinite")


def write_store(path: Path, steps: int, layers: int, epochs: int) -> None:
    """A single-run store with the Recorder's layout and chunking (random positive values)."""
    rng = np.random.default_rng(0)
    names = [f"down{i // 40}.block{i % 40}.conv" for i in range(layers)]
    layer_coords = {"layer": names, "depth": ("layer", np.arange(layers)),
                    "module_type": ("layer", ["Conv2d"] * layers), "num_params": ("layer", np.full(layers, 9216))}
    attrs = {"gradflow_schema": 1, "gradflow_kind": "run"}
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
                    attrs={"gradflow_schema": 1, "gradflow_kind": "epochs"})
    ep.to_zarr(path, group="epochs", mode="w", consolidated=False)
    import zarr

    zarr.consolidate_metadata(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--layers", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--store", default="/tmp/bench_plot.zarr")
    parser.add_argument("--out", default="reports/bench_plot.md")
    args = parser.parse_args()

    from analyses.heatmaps import heatmaps
    from analyses.report import open_tree

    warnings.filterwarnings("ignore", message="The data type")  # zarr: fixed-length strings not in the v3 spec
    store = Path(args.store)
    started = time.perf_counter()
    write_store(store, args.steps, args.layers, args.epochs)
    print(f"wrote {store} ({args.steps} steps × {args.layers} layers) in {time.perf_counter() - started:.1f} s")
    rows = []
    for label, kwargs in [("update_mean_abs per epoch (epoch group, Fig. 4)", {}),
                          ("grad_norm per step (200 bins)", {"stat": "grad_norm", "per": "step"}),
                          ("grad_norm per epoch (mean of each epoch's steps)", {"stat": "grad_norm"})]:
        started = time.perf_counter()
        fig = heatmaps(open_tree(store), **kwargs)
        fig.savefig("/tmp/bench_plot.png", dpi=150)
        seconds = time.perf_counter() - started
        rows.append(f"| {label} | {seconds:.2f} |")
        print(f"{label}: {seconds:.2f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join([
        "# Plotting a big store",
        "",
        f"`python analyses/bench_plot.py`: a store of {args.steps} steps × {args.layers} layers "
        f"({args.epochs} epochs, chunks of 1024 steps), open + heatmap + PNG at 150 dpi, wall seconds.",
        f"Machine: {platform.processor() or platform.machine()}, shared with other jobs while measured.",
        "",
        "| figure | seconds |",
        "|---|---:|",
        *rows,
        "",
    ]))
    shutil.rmtree(store, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
