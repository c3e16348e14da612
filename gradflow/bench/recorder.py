"""Per-step overhead of ``gradflow.Recorder(every=1)``, against plain training and a naive recorder.

Two models, both dominated by per-layer work rather than by arithmetic, so that a recorder's
per-layer cost is as visible as it can be:

* ``mlp``  – a deep narrow MLP: 200 ``Linear`` layers (width 32, ReLU), batch 32 (400 parameter tensors);
* ``conv`` – a 25-layer conv net: 3×3 ``Conv2d`` layers (width 16, ReLU), batch 4 of 1×32×32 images.

Each model is trained by three *arms* built from the same initial weights, with the same optimizer
kind (SGD, momentum 0.9), on one fixed batch:

* ``plain``    – no recording;
* ``gradflow`` – ``gradflow.Recorder(model, optimizer, <local zarr in a temp dir>, every=1)``;
* ``naive``    – the obvious hand-written recorder: per parameter tensor, one small op and one
                 ``.item()`` per figure (grad norm and max, non-finite count, update norm, mean and max,
                 parameter norm), combined per layer in Python and kept in a list (it writes nothing,
                 which flatters it).

The arms take turns in one process: ``turn`` steps each, plain → gradflow → naive, the order
rotated each round, so machine-load drift hits all arms alike. A step is ``zero_grad`` + forward +
backward + ``optimizer.step()`` (the recorders do their work in optimizer step hooks; gradflow's store
writes happen off the training thread and are included only through the CPU and GIL time they take).
The headline is the median wall-clock step time per arm and the ratio of medians to ``plain``; the
spread of the per-round ratios shows how noisy the machine was. Supporting figures: the training
thread's CPU time per step (steadier on a shared machine) and the CPU time inside the recorders'
hooks. Torch runs on one thread (``torch.set_num_threads``) for stable timings.
Targets: gradflow ≤ 1.10 × plain for ``mlp``, ≤ 1.03 × plain for ``conv``.

Usage: ``gradflow bench recorder [--steps 200] [--turn 5] [--out reports/bench_recorder.md]``
(or ``python -m gradflow.bench.recorder``).
"""

from __future__ import annotations

import copy
import datetime
import itertools
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import gradflow
from gradflow import bench, schema
from gradflow.progress import Progress

TARGETS = {"mlp": 1.10, "conv": 1.03}
ARMS = ("plain", "gradflow", "naive")


def deep_mlp(depth: int = 200, width: int = 32, in_features: int = 16) -> nn.Sequential:
    """``depth`` Linear layers with ReLU between them; the last one maps to a single output."""
    layers: list[nn.Module] = [nn.Linear(in_features, width)]
    for _ in range(depth - 2):
        layers += [nn.ReLU(), nn.Linear(width, width)]
    layers += [nn.ReLU(), nn.Linear(width, 1)]
    return nn.Sequential(*layers)


def deep_convnet(depth: int = 25, width: int = 16) -> nn.Sequential:
    """``depth`` 3×3 convolutions (padding 1) with ReLU between them; 1 channel in, 1 channel out."""
    layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1)]
    for _ in range(depth - 2):
        layers += [nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)]
    layers += [nn.ReLU(), nn.Conv2d(width, 1, 3, padding=1)]
    return nn.Sequential(*layers)


@dataclass
class Case:
    """One benchmarked model: how to build it and its fixed input batch."""

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


CASES = {
    "mlp": Case("mlp", "200 × Linear(32→32) + ReLU, batch 32", deep_mlp, (32, 16)),
    "conv": Case("conv", "25 × Conv2d(16→16, 3×3) + ReLU, batch 4 × 1×32×32", deep_convnet, (4, 1, 32, 32)),
}


def owning_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that directly own trainable parameters, in registration order (the recorder's layers)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    ]


class NaiveRecorder:
    """The baseline gradflow has to beat: per-parameter ops and one ``.item()`` (host sync) per figure.

    Records the same per-layer figures as gradflow's step variables (grad_norm, grad_max_abs,
    nonfinite, update_norm, update_mean_abs, update_max_abs, param_norm, update_ratio) into
    ``self.rows``, one dict of per-layer lists per step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.layers = [
            (name, [p for p in module.parameters(recurse=False) if p.requires_grad])
            for name, module in owning_modules(model)
        ]
        self.rows: list[dict[str, list[float]]] = []
        self._before: list[list[torch.Tensor]] = []
        self._grad_figures: list[tuple[float, float, float, float]] = []
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    @torch.no_grad()
    def _pre_step(self, optimizer, args, kwargs) -> None:
        self._before, self._grad_figures = [], []
        for _, params in self.layers:
            grad_sq = grad_max = nonfinite = param_sq = 0.0
            for p in params:
                g = p.grad
                grad_sq += g.norm().item() ** 2
                grad_max = max(grad_max, g.abs().max().item())
                nonfinite += (~torch.isfinite(g)).sum().item()
                param_sq += p.norm().item() ** 2
            self._grad_figures.append((grad_sq, grad_max, nonfinite, param_sq))
            self._before.append([p.detach().clone() for p in params])

    @torch.no_grad()
    def _post_step(self, optimizer, args, kwargs) -> None:
        row: dict[str, list[float]] = {k: [] for k in schema.names(schema.STEP_VARIABLES)}
        for (_, params), before, (grad_sq, grad_max, nonfinite, param_sq_before) in zip(
                self.layers, self._before, self._grad_figures):
            update_sq = update_abs_sum = update_max = param_sq = 0.0
            count = 0
            for p, w0 in zip(params, before):
                delta = p - w0
                update_sq += delta.norm().item() ** 2
                update_abs_sum += delta.abs().sum().item()
                update_max = max(update_max, delta.abs().max().item())
                param_sq += p.norm().item() ** 2
                count += p.numel()
            row["grad_norm"].append(math.sqrt(grad_sq))
            row["grad_max_abs"].append(grad_max)
            row["nonfinite"].append(nonfinite)
            row["update_norm"].append(math.sqrt(update_sq))
            row["update_mean_abs"].append(update_abs_sum / count)
            row["update_max_abs"].append(update_max)
            row["param_norm"].append(math.sqrt(param_sq))
            row["update_ratio"].append(math.sqrt(update_sq) / math.sqrt(param_sq_before)
                                       if param_sq_before > 0 else math.nan)
        self.rows.append(row)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class Arm:
    """One model + optimizer, maybe with a recorder, and a clock on the recorder's step hooks.

    Optimizer hooks run in registration order, so a hook registered before the recorder's and one
    registered after it enclose the recorder's own (for the pre-step and the post-step hooks alike):
    ``hook_seconds()`` is the training thread's CPU time spent inside the recorder during the last
    ``optimizer.step()`` (0 for the plain arm).
    """

    def __init__(self, model: nn.Module, attach: Callable[[nn.Module, torch.optim.Optimizer], object]):
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self._marks = dict.fromkeys(("pre_start", "pre_end", "post_start", "post_end"), 0.0)
        self.optimizer.register_step_pre_hook(self._mark("pre_start"))
        self.optimizer.register_step_post_hook(self._mark("post_start"))
        self.recorder = attach(model, self.optimizer)
        self.optimizer.register_step_pre_hook(self._mark("pre_end"))
        self.optimizer.register_step_post_hook(self._mark("post_end"))

    def _mark(self, key: str):
        def hook(*args) -> None:
            self._marks[key] = time.thread_time()
        return hook

    def hook_seconds(self) -> float:
        m = self._marks
        return (m["pre_end"] - m["pre_start"]) + (m["post_end"] - m["post_start"])

    def step(self, x: torch.Tensor) -> tuple[float, float, float]:
        """One training step; returns (wall seconds, thread CPU seconds, recorder hook CPU seconds)."""
        wall, cpu = time.perf_counter(), time.thread_time()
        self.optimizer.zero_grad()
        self.model(x).square().mean().backward()
        self.optimizer.step()
        return time.perf_counter() - wall, time.thread_time() - cpu, self.hook_seconds()


@dataclass
class CaseResult:
    """Per-step timings (seconds) per arm for one case, plus what is needed to describe it.

    ``wall``: wall-clock step time (the headline); ``cpu``: the training thread's CPU time for the step
    (blind to time the OS gave other jobs, so steadier on a shared machine, but also blind to the
    writer thread and to waiting for the GIL); ``hooks``: CPU time inside the recorder's hooks.
    """

    name: str
    description: str
    layers: int
    parameters: int
    parameter_tensors: int
    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    hooks: dict[str, list[float]]
    round_medians: dict[str, list[float]] = field(default_factory=dict)  # wall, per arm and round
    close_seconds: float = math.nan  # gradflow's final flush at ``close()``, not in the step times

    def median_ms(self, arm: str, kind: str = "wall") -> float:
        return 1e3 * statistics.median(getattr(self, kind)[arm])

    def ratio(self, arm: str, kind: str = "wall") -> float:
        """Median step time of ``arm`` over that of ``plain``."""
        return self.median_ms(arm, kind) / self.median_ms("plain", kind)

    def mean_ratio(self, arm: str) -> float:
        """Mean wall time of ``arm`` over that of ``plain`` (counts rare slow steps, e.g. flushes)."""
        return statistics.fmean(self.wall[arm]) / statistics.fmean(self.wall["plain"])

    def round_ratio_range(self, arm: str) -> tuple[float, float]:
        """Smallest and largest per-round ratio of wall medians (a noise gauge)."""
        ratios = [a / p for a, p in zip(self.round_medians[arm], self.round_medians["plain"])]
        return min(ratios), max(ratios)


def bench_case(case: Case, steps: int, turn: int, store_dir: str | Path, warmup: int = 3,
               on_step: Callable[[], None] | None = None) -> CaseResult:
    """Time ``steps`` steps per arm for ``case``, the arms taking turns of ``turn`` steps.

    ``on_step`` is called after every timed step of any arm (for progress bars).
    """
    torch.manual_seed(0)
    reference = case.make_model()
    x = torch.randn(case.input_shape, generator=torch.Generator().manual_seed(1))
    store = str(Path(store_dir) / f"{case.name}.zarr")
    arms = {
        "plain": Arm(copy.deepcopy(reference), lambda model, optimizer: None),
        "gradflow": Arm(copy.deepcopy(reference),
                        lambda model, optimizer: gradflow.Recorder(model, optimizer, store, every=1)),
        "naive": Arm(copy.deepcopy(reference), NaiveRecorder),
    }
    wall: dict[str, list[float]] = {arm: [] for arm in ARMS}
    cpu: dict[str, list[float]] = {arm: [] for arm in ARMS}
    hooks: dict[str, list[float]] = {arm: [] for arm in ARMS}
    round_medians: dict[str, list[float]] = {arm: [] for arm in ARMS}
    try:
        for arm in arms.values():
            for _ in range(warmup):
                arm.step(x)
        for r in range(max(1, math.ceil(steps / turn))):
            for name in ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]:
                turn_wall = []
                for _ in range(min(turn, steps - len(wall[name]))):
                    seconds, cpu_seconds, hook_seconds = arms[name].step(x)
                    turn_wall.append(seconds)
                    cpu[name].append(cpu_seconds)
                    hooks[name].append(hook_seconds)
                    if on_step is not None:
                        on_step()
                wall[name] += turn_wall
                round_medians[name].append(statistics.median(turn_wall))
    finally:
        start = time.perf_counter()
        arms["gradflow"].recorder.close()
        close_seconds = time.perf_counter() - start
        arms["naive"].recorder.close()
    return CaseResult(
        name=case.name,
        description=case.description,
        layers=len(owning_modules(reference)),
        parameters=sum(p.numel() for p in reference.parameters()),
        parameter_tensors=len(list(reference.parameters())),
        wall=wall,
        cpu=cpu,
        hooks=hooks,
        round_medians=round_medians,
        close_seconds=close_seconds,
    )


def run_benchmark(steps: int = 200, turn: int = 5, threads: int = 1, cases: list[str] | None = None,
                  progress: Progress | None = None) -> list[CaseResult]:
    """Run every case (default: all of ``CASES``) and return its results.

    ``progress``: called after every timed step, one task per case (:mod:`gradflow.progress`).
    """
    names = list(CASES) if cases is None else cases
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="gradflow-bench-") as store_dir:
            for name in names:
                on_step = None
                if progress is not None:
                    task, total, done = f"{name}: plain / gradflow / naive", steps * len(ARMS), itertools.count(1)
                    progress(task, 0, total, "")
                    on_step = lambda: progress(task, next(done), total, "")  # noqa: E731
                results.append(bench_case(CASES[name], steps, turn, store_dir, on_step=on_step))
    finally:
        torch.set_num_threads(previous_threads)
    return results


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def conditions(steps: int, turn: int, threads: int) -> dict[str, str]:
    """The machine and settings a report's figures were measured under."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        "python / torch / gradflow": f"{platform.python_version()} / {torch.__version__} / {gradflow.__version__}",
        "torch threads": str(threads),
        "steps per arm": f"{steps} timed (after 3 warm-up steps), the arms taking turns of {turn} steps",
        "optimizer": "SGD(lr=1e-3, momentum=0.9), fixed batch, loss = mean(output²)",
        "gradflow store": "local Zarr directory in a temp dir, every=1",
        "load average (1, 5, 15 min) at the end": load,
    }


def render_report(results: list[CaseResult], info: dict[str, str]) -> str:
    """The Markdown report: the headline table, the supporting figures, then the conditions."""
    lines = [
        "# Recorder overhead benchmark",
        "",
        "Median wall-clock time per training step (zero_grad + forward + backward + optimizer.step) "
        "with no recording (`plain`), with `gradflow.Recorder(..., every=1)` recording every step "
        "(`gradflow`), and with a naive recorder that takes one `.item()` per parameter tensor and "
        "figure (`naive`). Ratios are medians over the plain median; the bracket is the range of the "
        "per-round ratios (a gauge of machine noise). Produced by `gradflow bench recorder`.",
        "",
        "| model | layers | params (tensors) | plain ms/step | gradflow ms/step "
        "| gradflow ratio [round range] | target | met | naive ms/step | naive ratio |",
        "|---|---:|---:|---:|---:|---:|---:|:-:|---:|---:|",
    ]
    for r in results:
        low, high = r.round_ratio_range("gradflow")
        target = TARGETS.get(r.name)
        met = "—" if target is None else ("yes" if r.ratio("gradflow") <= target else "no")
        lines.append(
            f"| {r.name}: {r.description} | {r.layers} | {r.parameters:,} ({r.parameter_tensors}) "
            f"| {r.median_ms('plain'):.2f} | {r.median_ms('gradflow'):.2f} "
            f"| {r.ratio('gradflow'):.3f}× [{low:.3f}–{high:.3f}] "
            f"| {'—' if target is None else f'≤ {target:.2f}×'} | {met} "
            f"| {r.median_ms('naive'):.2f} | {r.ratio('naive'):.2f}× |"
        )
    lines += [
        "",
        "Supporting figures. *CPU* is the training thread's CPU time per step: blind to time the OS "
        "gave other jobs (steadier on a shared machine), but also to the background writer thread and "
        "to waiting for the GIL. *Hooks* is the CPU time spent inside the recorder's optimizer hooks "
        "per step (medians); *hooks / plain CPU* is the recorder's direct cost as a fraction of a plain "
        "step, the least noisy estimate of the overhead (it leaves out cache effects and the writer "
        "thread). The mean wall ratio also counts rare slow steps, such as those overlapping "
        "a background store write; *close* is gradflow's final flush, outside the step times.",
        "",
        "| model | plain CPU ms/step | gradflow CPU ratio | gradflow hooks ms/step "
        "| hooks / plain CPU | naive hooks ms/step | gradflow mean wall ratio | close s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.median_ms('plain', 'cpu'):.2f} | {r.ratio('gradflow', 'cpu'):.3f}× "
            f"| {r.median_ms('gradflow', 'hooks'):.3f} "
            f"| {r.median_ms('gradflow', 'hooks') / r.median_ms('plain', 'cpu'):.1%} "
            f"| {r.median_ms('naive', 'hooks'):.3f} "
            f"| {r.mean_ratio('gradflow'):.3f}× | {r.close_seconds:.2f} |"
        )
    lines += ["", "## Conditions", ""]
    lines += [f"- **{key}**: {value}" for key, value in info.items()]
    lines.append("")
    return "\n".join(lines)


def summary_lines(results: list[CaseResult]) -> list[str]:
    """One printable line per case."""
    return [
        f"{r.name:5s} plain {r.median_ms('plain'):7.2f} ms  gradflow {r.median_ms('gradflow'):7.2f} ms "
        f"({r.ratio('gradflow'):.3f}×, target ≤ {TARGETS.get(r.name, math.nan):.2f}×; "
        f"CPU {r.ratio('gradflow', 'cpu'):.3f}×, hooks {r.median_ms('gradflow', 'hooks'):.2f} ms)  "
        f"naive {r.median_ms('naive'):7.2f} ms ({r.ratio('naive'):.2f}×)"
        for r in results
    ]


def main(argv: list[str] | None = None, progress: Progress | None = None) -> list[CaseResult]:
    """Run the benchmark, print the summary and, given ``--out``, write the Markdown report."""
    parser = bench.parser("recorder", __doc__)
    parser.add_argument("--steps", type=bench.positive_int, default=200, help="timed steps per arm and model")
    parser.add_argument("--turn", type=bench.positive_int, default=5,
                        help="steps an arm runs before the next arm's turn")
    parser.add_argument("--threads", type=bench.threads, default=1,
                        help="torch CPU threads (1 gives the steadiest timings)")
    bench.add_report_options(parser)
    args = parser.parse_args(argv)
    out = bench.check_out(args.out, args.force)
    results = run_benchmark(steps=args.steps, turn=args.turn, threads=args.threads, progress=progress)
    info = conditions(args.steps, args.turn, args.threads) | ({"note": args.note} if args.note else {})
    for line in summary_lines(results):
        print(line)
    bench.write_report(out, render_report(results, info))
    return results


if __name__ == "__main__":
    bench.run(main)
