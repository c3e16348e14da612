"""Memory cost of recording: resident memory above the same training without a Recorder.

Each *arm* runs in a fresh child process (so allocations of one arm cannot hide in another's
free lists): it builds the model and an SGD optimizer (no state), trains ``warmup`` steps, notes
its resident set size (RSS), attaches the arm's Recorder (none for ``plain``), resets the peak RSS
counter (``/proc/self/clear_refs``), then trains ``steps`` steps, recording every step and closing
an epoch every ``epoch_every`` steps. It reports the RSS at the end (*steady*) and the peak RSS
(*peak*), both above the RSS before the Recorder; the benchmark divides each arm's excess over the
``plain`` arm's by the recorded parameters' bytes. On a CPU, device and host memory are one, so the
goal is ≤ 2.25× (Δw snapshot + epoch-start copy + scratch); on a GPU (``--device cuda``) it measures
``torch.cuda.max_memory_allocated`` instead, goal ≤ 1.25×.

Arms: ``plain``; ``gradflow`` (``Recorder(..., every=1)``); ``gradflow snapshot=False`` (gradient
figures and ‖w‖ only); and, with ``--compare PATH``, ``gradflow@PATH``: the same Recorder imported
from another checkout (e.g. an older version, for a before/after figure).

``--widths 512,1840`` measures the model at several widths (27 M and 274 M parameters): the
report then splits each arm's cost into a fixed part (MiB) and a per-parameter part (× the
parameters' bytes), from the two smallest sizes.

Usage: ``python -m gradflow.bench.memory [--dtype bfloat16] [--widths 512] [--steps 6] [--out reports/bench_memory.md]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from gradflow.errors import GradflowError

GOAL = {"cpu": 2.25, "cuda": 1.25}


def transformer(vocab: int = 8192, width: int = 512, depth: int = 6, heads: int = 8) -> nn.Module:
    """A GPT-shaped stack: token embedding, ``depth`` pre-norm encoder layers, an output head."""
    layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                       norm_first=True)
    return nn.Sequential(nn.Embedding(vocab, width), nn.TransformerEncoder(layer, depth,
                                                                           enable_nested_tensor=False),
                         nn.LayerNorm(width), nn.Linear(width, vocab))


def _rss() -> tuple[int, int]:
    """(current, peak) resident set size of this process, bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def child(arm: str, dtype: str, device: str, steps: int, warmup: int, epoch_every: int,
          width: int = 512) -> dict:
    """One arm in this process, on :func:`transformer` of ``width``; returns its memory figures
    (bytes)."""
    import gradflow  # imported in every arm before measuring (its import is not recording memory)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = transformer(width=width).to(device=device, dtype=getattr(torch, dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 8192, (4, 64), device=device)

    def step():
        optimizer.zero_grad()
        logits = model(tokens)
        nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        if device == "cuda":
            torch.cuda.synchronize()
            base_device = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        base, _ = _rss()
        recorder = None
        if arm != "plain":
            recorder = gradflow.Recorder(model, optimizer, os.path.join(tmp, "run.zarr"), every=1,
                                         **({"snapshot": False} if "snapshot=False" in arm else {}))
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS counter
        for k in range(steps):
            step()
            if recorder is not None and (k + 1) % epoch_every == 0:
                recorder.end_epoch()
        now, peak = _rss()
        out = {"steady": now - base, "peak": peak - base, "param_bytes": param_bytes,
               "params": sum(p.numel() for p in model.parameters())}
        if device == "cuda":
            torch.cuda.synchronize()
            out.update(device_steady=torch.cuda.memory_allocated() - base_device,
                       device_peak=torch.cuda.max_memory_allocated() - base_device)
        if recorder is not None:
            recorder.close()
    return out


def run_arm(arm: str, args, pythonpath: str, width: int) -> dict:
    from gradflow import bench

    # This file, by path, from a neutral folder: `import gradflow` finds the arm's checkout.
    return bench.run_child(str(Path(__file__).resolve()),
                           ["--child", arm, "--dtype", args.dtype, "--device", args.device,
                            "--steps", str(args.steps), "--warmup", str(args.warmup),
                            "--epoch-every", str(args.epoch_every), "--width", str(width)],
                           pythonpath, f"arm {arm}", MALLOC_MMAP_THRESHOLD_="131072")


def child_main(argv: list[str]) -> None:
    """A child process: one arm, its memory figures as one JSON line. Plain argparse: under
    ``--compare`` this file runs against another checkout's gradflow, which may lack gradflow.bench."""
    import gradflow

    parser = argparse.ArgumentParser()
    for name, default in (("--child", ""), ("--dtype", "bfloat16"), ("--device", "cpu")):
        parser.add_argument(name, default=default)
    for name in ("--steps", "--warmup", "--epoch-every"):
        parser.add_argument(name, type=int)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args(argv)
    out = child(args.child, args.dtype, args.device, args.steps, args.warmup, args.epoch_every,
                args.width)
    print(json.dumps({**out, "gradflow_path": str(Path(gradflow.__file__).parent)}))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--child" in argv:
        return child_main(argv)
    from gradflow import bench  # not at the top: a child may import another checkout's gradflow

    parser = bench.parser("memory", __doc__)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--widths", default=[512], type=widths,
                        help="comma-separated model widths, multiples of 8 (the heads); default 512 "
                             "(27 M parameters; 1840: 274 M)")
    parser.add_argument("--steps", type=bench.positive_int, default=6)
    parser.add_argument("--warmup", type=bench.positive_int, default=2)
    parser.add_argument("--epoch-every", type=bench.positive_int, default=3)
    parser.add_argument("--repeats", type=bench.positive_int, default=2,
                        help="runs per arm (alternating); median")
    parser.add_argument("--compare", default=None, type=bench.checkout,
                        help="another checkout's root: its Recorder as an arm")
    bench.add_report_options(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise GradflowError("--device cuda but torch sees no CUDA device")
    out = bench.check_out(args.out, args.force)
    root = str(Path(__file__).resolve().parents[2])
    arms = {"plain": root, "gradflow": root, "gradflow snapshot=False": root}
    if args.compare:
        arms[f"gradflow@{Path(args.compare).name}"] = args.compare
    results: dict[int, dict[str, list[dict]]] = {w: {arm: [] for arm in arms} for w in args.widths}
    for width in args.widths:
        for r in range(args.repeats):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for arm in order:
                results[width][arm].append(run_arm(arm, args, arms[arm], width))
                print(f"width {width} round {r + 1}/{args.repeats} {arm}: "
                      f"{results[width][arm][-1]}", flush=True)
    report = render(results, args)
    print(report)
    bench.write_report(out, report)


def widths(text: str) -> list[int]:
    """An argparse type: comma-separated positive multiples of 8, in increasing order."""
    try:
        values = [int(w) for w in text.split(",")]
    except ValueError:
        values = []
    if not values or any(w < 8 or w % 8 for w in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give widths that are multiples of 8 (8 heads), "
                                         f"e.g. 512,1840")
    return sorted(set(values))


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _excess(runs: dict[str, list[dict]], arm: str, key: str) -> float:
    """``arm``'s median figure ``key`` above the ``plain`` arm's (bytes)."""
    return _median([r[key] for r in runs[arm]]) - _median([r[key] for r in runs["plain"]])


def render(results: dict[int, dict[str, list[dict]]], args) -> str:
    """The report: per model width (``results[width][arm]``: the runs' figures), a table of each
    arm above ``plain``; with several widths, each arm's fixed and per-parameter cost."""
    key = ("device_steady", "device_peak") if args.device == "cuda" else ("steady", "peak")
    goal = GOAL[args.device]
    sizes = ", ".join(f"{runs['plain'][0]['params']:,} ({runs['plain'][0]['param_bytes'] / 2**20:,.1f} MiB)"
                      for runs in results.values())
    lines = [
        "# Recorder memory benchmark", "",
        f"Memory above the same training without a Recorder, in units of the recorded parameters' "
        f"bytes ({sizes} parameters, {args.dtype}). *Steady*: resident memory after {args.steps} "
        f"recorded steps; *peak*: the highest resident memory during them (medians of "
        f"{args.repeats} runs per arm, fresh process each). Goal on {args.device}: ≤ {goal}× "
        f"({'device and host are one memory: Δw snapshot + epoch copy + scratch' if args.device == 'cpu' else 'device memory'}). "
        f"Produced by `python -m gradflow.bench.memory`.",
    ]
    for width, runs in results.items():
        param_bytes = runs["plain"][0]["param_bytes"]
        if len(results) > 1:
            lines += ["", f"## Width {width}: {runs['plain'][0]['params']:,} parameters, "
                          f"{param_bytes / 2**20:,.1f} MiB"]
        lines += ["", "| arm | steady above plain (MiB) | steady × params | peak above plain (MiB) | peak × params | goal | met |",
                  "|---|---:|---:|---:|---:|---:|:-:|"]
        for arm in runs:
            if arm == "plain":
                continue
            steady, peak = _excess(runs, arm, key[0]), _excess(runs, arm, key[1])
            met = "yes" if max(steady, peak) / param_bytes <= goal else "no"
            lines.append(f"| {arm} | {steady / 2**20:.1f} | {steady / param_bytes:.2f}× | "
                         f"{peak / 2**20:.1f} | {peak / param_bytes:.2f}× | ≤ {goal}× | {met} |")
        if args.device == "cuda":  # the epoch-start copy lives in (pinned) host memory
            host = {arm: _excess(runs, arm, "steady") / param_bytes for arm in runs if arm != "plain"}
            lines += ["", "Host memory (RSS) above plain, steady, × params (the pinned epoch-start "
                      "copy lives there): " + ", ".join(f"{arm} {v:.2f}×" for arm, v in host.items())]
    if len(results) > 1:
        lines += ["", "## Fixed and per-parameter cost", "",
                  "Each arm's steady figure above plain as *fixed* + *per parameter* × the parameters' "
                  "bytes, the line through the two smallest widths:", "",
                  "| arm | fixed (MiB) | per parameter (× params) |", "|---|---:|---:|"]
        (small, a), (large, b) = list(results.items())[:2]
        size = {w: runs["plain"][0]["param_bytes"] for w, runs in ((small, a), (large, b))}
        for arm in a:
            if arm == "plain":
                continue
            slope = (_excess(b, arm, key[0]) - _excess(a, arm, key[0])) / (size[large] - size[small])
            fixed = _excess(a, arm, key[0]) - slope * size[small]
            lines.append(f"| {arm} | {fixed / 2**20:.1f} | {slope:.2f}× |")
    lines += ["", "Per-arm raw figures (bytes above the "
              + ("device memory" if args.device == "cuda" else "RSS") + " before the Recorder, per run):", ""]
    for width, runs in results.items():
        lines += [f"- {arm}{f' (width {width})' if len(results) > 1 else ''}: "
                  + "; ".join(f"steady {r[key[0]]:,}, peak {r[key[1]]:,}" for r in arm_runs)
                  for arm, arm_runs in runs.items()]
    shape = (f"embedding 8192×W, 6 pre-norm TransformerEncoderLayer(W, 8 heads, 4W), LayerNorm, "
             f"Linear(W→8192), W = {', '.join(map(str, results))}")
    if list(results) == [512]:
        shape = ("embedding 8192×512, 6 pre-norm TransformerEncoderLayer(512, 8 heads, 2048), "
                 "LayerNorm, Linear(512→8192)")
    lines += [
        "", "## Conditions", "",
        f"- **date**: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- **machine**: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"{platform.system()} {platform.release()}"
        + (f"; {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        f"- **python / torch**: {platform.python_version()} / {torch.__version__}",
        f"- **model**: {shape}; batch 4 × 64 tokens; SGD(lr=1e-3), no optimizer state",
        f"- **steps**: {args.warmup} warm-up, then {args.steps} recorded (every=1), end_epoch every "
        f"{args.epoch_every}",
        "- **allocator**: glibc with MALLOC_MMAP_THRESHOLD_=131072 (large blocks go back to the OS "
        "when freed, so RSS follows live memory), 1 torch thread",
        f"- **load average at the end**: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- **note**: {args.note or '-'}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from gradflow import bench

    bench.run(main)
