"""Stores for long runs: flush cost, codec, bytes per step·layer and plot time at 10⁵ and 10⁶ steps.

Three measurements, all through the store's real write path (:class:`gradflow.store.RunStore`, as the
Recorder's writer thread calls it):

* **flush cost** at ``--layers`` layers: median wall time of a 10-row flush into a partly filled chunk
  (what a 10-second flush of a slow run does) and of a 1,024-row flush (the Recorder's full buffer),
  each ``append_steps`` + ``commit``; arms run back to back in one process: ``main`` (chunks of 1,024
  steps, zarr's default zstd, no summary: the layout before this benchmark), ``small chunks`` (chunks
  of ≤ 1 MiB or ≤ 256 KiB, blosc zstd + shuffle, no summary) and ``this store`` (chunks of 1,024
  steps up to 1,024 layers, blosc, the step summary).
* **codec**: bytes per step·layer of the eight step figures under candidate codecs, on synthetic
  figures and (``--real STORE``) on a recorded store's figures; ``--record-real STORE`` records one
  (an MLP of 101 Linear layers trained with Adam for 3,072 steps, every step recorded).
* **long runs**: a store of ``steps`` × ``--layers`` synthetic figures (each layer a level between
  1e-4 and 1 with log-normal step noise; ``param_norm`` drifting slowly; ``nonfinite`` zero but for
  rare NaN rows), written in 1,024-row flushes with 100 epochs, streamed (one flush in memory); then
  its bytes on disk per step·layer, and the wall time of ``gradflow plot`` (per-step heatmap of
  ``grad_norm``, 200 bins, and the default per-epoch Fig. 4 heatmap, PNG at 150 dpi), with the
  per-step heatmap also drawn from the raw rows (no summary) for comparison.

Usage: ``python -m gradflow.bench.store_longrun [--steps 100000,1000000] [--layers 1000]
[--dir /tmp] [--real STORE] [--out reports/bench_store_longrun.md] [--note TEXT]``. The report is
written only with ``--out`` (never over an existing file without ``--force``).
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from gradflow import store as store_module
from gradflow.store import STEP_VARIABLES, LayerTable, RunStore

FLUSH = 1024
EPOCHS = 100


class _NoSummary:
    """Stands in for the step summary in the arms that measure a store without one."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def append(self, columns) -> None:
        pass


ARMS = {  # name: (CHUNK_BYTES, CODEC, summary writer)
    "main (1,024-row chunks, zarr's default zstd, no summary)": (2**22, ZstdCodec(level=0), _NoSummary),
    "1 MiB chunks, blosc zstd 1 + shuffle, no summary": (2**20, store_module.CODEC, _NoSummary),
    "256 KiB chunks, blosc zstd 1 + shuffle, no summary": (2**18, store_module.CODEC, _NoSummary),
    "this store (1,024-row chunks, blosc, summary)": (store_module.CHUNK_BYTES, store_module.CODEC,
                                                      store_module.SummaryWriter),
}
MAIN = next(iter(ARMS))


class Figures:
    """Synthetic step figures, ``n`` rows at a time: each layer a level between 1e-4 and 1 times
    log-normal noise (σ = 0.3, drawn once for 8,192 rows and reused shifted, so that making them
    costs little next to writing them), ``param_norm`` drifting slowly, ``nonfinite`` zero but for a
    rare NaN row."""

    POOL = 8192

    def __init__(self, n_layers: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.level = (10.0 ** rng.uniform(-4, 0, n_layers)).astype(np.float32)
        self.noise = np.exp(0.3 * rng.standard_normal((self.POOL + 8, n_layers), dtype=np.float32))
        self.n_layers = n_layers

    def rows(self, start: int, n: int, total: int) -> dict[str, np.ndarray]:
        shape = (n, self.n_layers)
        columns = {}
        for k, name in enumerate(STEP_VARIABLES):
            first = (start + 977 * k) % (self.POOL - n) if n < self.POOL else 0
            noise = np.resize(self.noise[first:first + n + k], (n + k, self.n_layers))[k:]
            columns[name] = self.level * noise
        drift = 1 + np.arange(start, start + n, dtype=np.float32)[:, None] / total
        columns["param_norm"] = 10 * self.level * drift
        columns["nonfinite"] = np.zeros(shape, np.float32)
        steps = np.arange(start, start + n)
        if start % (FLUSH * 97) == 0:  # a rare NaN row
            columns["grad_norm"][0] = np.nan
            columns["nonfinite"][0] = 1
        return {**columns, "step": steps, "epoch": steps * EPOCHS // total,
                "wall_time": 1.7e9 + steps * 0.1, "skipped": np.zeros(n, bool)}


def _with_arm(arm: str):
    chunk_bytes, codec, writer = ARMS[arm]
    saved = store_module.CHUNK_BYTES, store_module.CODEC, store_module.SummaryWriter
    store_module.CHUNK_BYTES, store_module.CODEC, store_module.SummaryWriter = chunk_bytes, codec, writer
    return saved


def _restore(saved) -> None:
    store_module.CHUNK_BYTES, store_module.CODEC, store_module.SummaryWriter = saved


def _table(n_layers: int) -> LayerTable:
    return LayerTable([f"block{i // 10}.layer{i % 10}" for i in range(n_layers)], ["Linear"] * n_layers,
                      [4096] * n_layers)


def _new(path: Path, n_layers: int) -> RunStore:
    shutil.rmtree(path, ignore_errors=True)
    return RunStore(str(path), None, _table(n_layers), {"every": 1, "per_parameter": False}, 1, False)


def flush_cost(directory: Path, n_layers: int, rounds: int = 8) -> list[dict]:
    """Median seconds per 10-row and per 1,024-row flush for each arm, the arms interleaved.

    Each round gives every arm, in turn, five 10-row flushes (into a partly filled chunk), a flush back
    to whole chunks and a 1,024-row flush; so load drift on a shared machine hits all arms alike.
    """
    figures, total = Figures(n_layers), 10**6
    stores = {}
    for arm in ARMS:
        saved = _with_arm(arm)
        try:
            stores[arm] = _new(directory / f"flush-{len(stores)}.zarr", n_layers)
        finally:
            _restore(saved)
    times = {arm: {"short": [], "full": [], "commit": []} for arm in ARMS}

    def flush(store: RunStore, n: int, arm: str | None = None) -> float:
        columns = figures.rows(store.n_steps, n, total)
        started = time.perf_counter()
        store.append_steps(columns)
        appended = time.perf_counter()
        store.commit(store.n_steps)
        if arm:
            times[arm]["commit"].append(time.perf_counter() - appended)
        return time.perf_counter() - started

    for store in stores.values():
        flush(store, 2 * FLUSH)
    for _ in range(rounds):
        for arm, store in stores.items():
            times[arm]["short"] += [flush(store, 10, arm) for _ in range(5)]
            flush(store, FLUSH - 50)  # back to whole chunks
            times[arm]["full"].append(flush(store, FLUSH))
    out = []
    for i, arm in enumerate(ARMS):
        chunk = zarr.open_group(str(directory / f"flush-{i}.zarr"), mode="r")["grad_norm"].chunks[0]
        out.append({"arm": arm, "chunk": chunk, "short": statistics.median(times[arm]["short"]),
                    "full": statistics.median(times[arm]["full"]),
                    "commit": statistics.median(times[arm]["commit"])})
        print(f"flush cost, {arm}: chunk {chunk} rows, 10 rows {out[-1]['short'] * 1e3:.1f} ms, "
              f"1024 rows {out[-1]['full'] * 1e3:.1f} ms", flush=True)
        shutil.rmtree(directory / f"flush-{i}.zarr", ignore_errors=True)
    return out


CODECS = {
    "zstd level 0 (zarr's default)": ZstdCodec(level=0),
    "zstd level 5": ZstdCodec(level=5),
    "blosc lz4 5 + shuffle": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=4),
    "blosc zstd 1 + shuffle": BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=4),
    "blosc zstd 2 + shuffle": BloscCodec(cname="zstd", clevel=2, shuffle="shuffle", typesize=4),
    "blosc zstd 3 + shuffle": BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=4),
    "blosc zstd 5 + shuffle": BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=4),
    "blosc zstd 5 + bitshuffle": BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle", typesize=4),
}


def codec_sizes(data: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """{codec: (bytes per step·layer of the eight figures, seconds to encode them)} in memory."""
    n, n_layers = data["grad_norm"].shape
    chunk = store_module.step_chunk(n_layers)
    out = {}
    for name, codec in CODECS.items():
        seconds = []
        for _ in range(3):  # the fastest of three: the least disturbed by other jobs
            group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
            started = time.perf_counter()
            for variable in STEP_VARIABLES:
                group.create_array(variable, shape=(n, n_layers), chunks=(chunk, n_layers),
                                   dtype="float32", compressors=codec)[:] = data[variable]
            seconds.append(time.perf_counter() - started)
        seconds = min(seconds)
        size = sum(len(value) for key, value in group.store._store_dict.items() if "/c/" in key)
        out[name] = (size / (n * n_layers), seconds)
    return out


def record_real(path: Path, steps: int = 3072, n_layers: int = 101) -> None:
    """A real recorded store: an MLP of ``n_layers`` Linear layers (width 32, tanh), Adam lr 1e-3,
    batch 16 of random inputs regressed onto 2·x₀, an epoch every 300 steps."""
    import torch
    from torch import nn

    import gradflow

    torch.manual_seed(0)
    torch.set_num_threads(1)
    layers = [module for _ in range(n_layers - 1) for module in (nn.Linear(32, 32), nn.Tanh())]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    shutil.rmtree(path, ignore_errors=True)
    with gradflow.Recorder(model, optimizer, path) as rec:
        for step in range(steps):
            x = torch.randn(16, 32)
            optimizer.zero_grad()
            (model(x) - x[:, :1] * 2).square().mean().backward()
            optimizer.step()
            if step % 300 == 299:
                rec.end_epoch()


def _du(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def fill(path: Path, steps: int, n_layers: int) -> float:
    """Write ``steps`` synthetic rows in 1,024-row flushes (and 100 epochs); returns seconds."""
    figures = Figures(n_layers)
    store = _new(path, n_layers)
    started = last = time.perf_counter()
    for start in range(0, steps, FLUSH):
        store.append_steps(figures.rows(start, min(FLUSH, steps - start), steps))
        while (store.n_epochs + 1) * steps // EPOCHS <= store.n_steps:  # epochs that ended
            epoch = store.n_epochs
            store.append_epoch({"update_mean_abs": figures.level * 1e-3 * (1 + epoch % 7),
                                "update_norm": figures.level * (1 + epoch % 7), "epoch": np.array(epoch),
                                "num_steps": np.array(steps // EPOCHS)},
                               {"train_loss": 1 / (1 + epoch), "val_loss": 1.2 / (1 + epoch)})
        store.commit(store.n_steps)
        now = time.perf_counter()
        if now - last > 30:
            done = store.n_steps / steps
            print(f"  filled {store.n_steps:,}/{steps:,} rows ({done:.0%}), "
                  f"ETA {(now - started) * (1 - done) / done:.0f} s", flush=True)
            last = now
    return time.perf_counter() - started


def _plot(path: Path, *options: str) -> float:
    """Wall seconds of ``gradflow plot STORE OPTIONS`` in a fresh interpreter (this checkout's gradflow)."""
    import gradflow
    from gradflow import bench

    root = str(Path(gradflow.__file__).resolve().parents[1])
    env = bench.child_env(root)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from gradflow.cli import main; main()", "plot", str(path),
                    "--out", str(path.parent / "plots"), *options], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def plot_times(path: Path) -> dict:
    """Seconds of ``gradflow plot`` per step and per epoch; seconds and rows of the 200 step bins
    read from the summary and from the raw rows (:func:`gradflow.summary.read_steps`)."""
    import gradflow
    from gradflow import open_tree
    from gradflow.summary import read_steps

    out = {"step": _plot(path, "--stat", "grad_norm", "--per", "step"), "epoch": _plot(path)}
    started = time.perf_counter()
    binned = read_steps(open_tree(path), bins=200, variables=["grad_norm"])
    out["bins"] = time.perf_counter() - started
    if binned.attrs["source"] == "raw":
        out["rows_read"] = "all raw rows (no level has 200 blocks)"
    else:
        level = int(binned.attrs["source"].split("/")[1])
        covered = zarr.open_group(str(path), mode="r")["summary"].attrs["rows"]
        n = binned["num_rows"].values.sum()
        out["rows_read"] = f"{covered // level} summary blocks of {level} rows + {n - covered:,} raw rows"
    started = time.perf_counter()
    read_steps(xr.DataTree(gradflow.open(path)), bins=200, variables=["grad_norm"])  # no summary: raw
    out["raw"] = time.perf_counter() - started
    return out


def longrun(directory: Path, steps: int, n_layers: int, keep: bool) -> dict:
    path = directory / f"longrun-{steps}.zarr"
    print(f"long run: {steps:,} steps × {n_layers:,} layers → {path}", flush=True)
    seconds = fill(path, steps, n_layers)
    total = _du(path)
    raw = sum(_du(path / name) for name in STEP_VARIABLES)
    summary = _du(path / "summary")
    result = {"steps": steps, "fill": seconds, "bytes": total, "raw": raw, "summary": summary,
              "per": total / (steps * n_layers), "raw_per": raw / (steps * n_layers),
              "files": sum(len(names) for _, _, names in os.walk(path))}
    print(f"  {total / 1e9:.2f} GB, {result['per']:.2f} B/step·layer ({result['raw_per']:.2f} raw figures, "
          f"summary {summary / total:.1%}), {result['files']:,} files, filled in {seconds:.0f} s", flush=True)
    result |= plot_times(path)
    print(f"  gradflow plot --per step {result['step']:.1f} s, per epoch {result['epoch']:.1f} s; 200 bins "
          f"from the summary {result['bins']:.2f} s ({result['rows_read']}), from the raw rows "
          f"{result['raw']:.1f} s", flush=True)
    if not keep:
        shutil.rmtree(path, ignore_errors=True)
    return result


def report(args, flushes, codecs, runs) -> str:
    import gradflow

    main_short = next(f for f in flushes if f["arm"] == MAIN)["short"]
    main_full = next(f for f in flushes if f["arm"] == MAIN)["full"]
    lines = [
        "# Stores for long runs",
        "",
        f"`python -m gradflow.bench.store_longrun {' '.join(sys.argv[1:])}`, "
        f"{datetime.date.today().isoformat()}.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs, {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}, zarr {zarr.__version__}, "
        f"xarray {xr.__version__}, gradflow {gradflow.__version__}. Local disk (page cache warm: "
        f"plot times are decode + draw, not cold I/O). {args.note}",
        "",
        f"## Flush cost ({args.layers:,} layers, `RunStore.append_steps` + `commit`, median wall time)",
        "",
        "| layout | step chunk (rows) | 10-row flush into a partly filled chunk | of which the commit "
        "| 1,024-row flush |",
        "|---|---:|---:|---:|---:|",
        *[f"| {f['arm']} | {f['chunk']} | {f['short'] * 1e3:.0f} ms ({f['short'] / main_short:.2f}× main) "
          f"| {f['commit'] * 1e3:.0f} ms "
          f"| {f['full'] * 1e3:.0f} ms ({f['full'] / main_full:.2f}×) |" for f in flushes],
        "",
        "A 1,024-row flush writes whole chunks only (the Recorder flushes 1,024 rows, a multiple of every "
        "step chunk); a shorter flush (every 10 s in a slow run) leaves one chunk per figure partly filled, "
        "which the next flush re-encodes: small chunks make that cheap. `this store` includes the summary.",
        "",
        "## Codec: bytes per step·layer of the eight float32 figures (32 raw)",
        "",
        "| codec | " + " | ".join(codecs) + " |",
        "|---|" + "---:|" * len(codecs),
        *[f"| {name} | " + " | ".join(f"{codecs[data][name][0]:.2f} B ({codecs[data][name][1]:.2f} s)"
                                      for data in codecs) + " |" for name in CODECS],
        "",
        "(seconds: encoding all rows of that data set into an in-memory store, fastest of three.)",
        "",
        f"## Long runs ({args.layers:,} layers, synthetic figures, 1,024-row flushes, {EPOCHS} epochs)",
        "",
        "| steps | on disk | bytes per step·layer (all / raw figures) | summary share | files | write time "
        "| `gradflow plot --stat grad_norm --per step` | `gradflow plot` (per epoch) "
        "| 200 bins from the summary | what they read | 200 bins from the raw rows |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        *[f"| {r['steps']:,} | {r['bytes'] / 1e9:.2f} GB | {r['per']:.2f} / {r['raw_per']:.2f} "
          f"| {r['summary'] / r['bytes']:.1%} | {r['files']:,} | {r['fill']:.0f} s | {r['step']:.1f} s "
          f"| {r['epoch']:.1f} s | {r['bins']:.2f} s | {r['rows_read']} | {r['raw']:.1f} s |" for r in runs],
        "",
        "`gradflow plot` times are whole commands in a fresh interpreter (start-up and imports included): "
        "open the store, draw the heatmap(s) and the loss curves, save PNGs at 150 dpi. The bin columns time "
        "`gradflow.summary.read_steps(…, bins=200)` for one figure in-process: from the summary, and from "
        "the raw rows as for a store without one (what the per-step heatmap read before).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from gradflow import bench

    parser = bench.parser("store_longrun", __doc__)
    parser.add_argument("--steps", default=[100_000, 1_000_000], help="comma-separated store lengths",
                        type=bench.list_of(bench.positive_int, "--steps", "100000,1000000"))
    parser.add_argument("--layers", type=bench.positive_int, default=1000)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the stores are written")
    parser.add_argument("--real", help="a recorded store whose figures the codec table also uses")
    parser.add_argument("--record-real", help="record a real store at this path first (then used as --real)")
    parser.add_argument("--keep", action="store_true", help="keep the long-run stores")
    bench.add_report_options(parser)
    args = parser.parse_args(argv)
    out = bench.check_out(args.out, args.force)
    steps = args.steps
    directory = Path(args.dir) / f"gradflow-bench-store-{os.getpid()}"
    directory.mkdir(parents=True, exist_ok=True)
    try:
        flushes = flush_cost(directory, args.layers)
        figures = Figures(args.layers, seed=1)
        codecs = {f"synthetic ({2 * FLUSH} steps × {args.layers} layers)":
                  codec_sizes({k: v for k, v in figures.rows(0, 2 * FLUSH, 10**6).items()})}
        if args.record_real:
            record_real(Path(args.record_real))
            args.real = args.real or args.record_real
        if args.real:
            real = xr.open_zarr(args.real)
            codecs[f"recorded ({real.sizes['step']} steps × {real.sizes['layer']} layers)"] = \
                codec_sizes({name: real[name].values for name in STEP_VARIABLES})
        for data, sizes in codecs.items():
            print(f"codec, {data}: " + ", ".join(f"{k} {v[0]:.2f} B" for k, v in sizes.items()), flush=True)
        runs = [longrun(directory, n, args.layers, args.keep) for n in steps]
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    bench.write_report(out, report(args, flushes, codecs, runs))


if __name__ == "__main__":
    from gradflow import bench

    bench.run(main)
