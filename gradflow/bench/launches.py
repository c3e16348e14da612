"""Dispatches (kernel launches) and CPU time the Recorder adds per recorded step, and the step-time ratio.

For each model, in one child process (so a ``--compare`` checkout can be imported instead of this
one): two *arms* built from the same initial weights, ``plain`` (no recording) and ``gradflow``
(``Recorder(..., every=1)``), trained on one fixed batch in interleaved blocks of ``block`` steps,
the order alternating each round, so machine-load drift hits both alike. Reported:

* **ops / step**: ``torch.profiler`` events directly under the Recorder's optimizer hooks (marked
  with ``record_function``): each is one dispatch from Python, i.e. one kernel launch or more on a
  GPU (a multi-tensor ``_foreach_*`` op launches one kernel per ~100 tensors); on CUDA the CUDA
  kernel launches are counted too;
* **hooks ms / step**: training-thread CPU time inside the Recorder's hooks (median);
* **step ratio**: median wall time per step, gradflow over plain, and the same for thread CPU time.

Models: ``mlp`` 200 × Linear(32→32) + ReLU, batch 32 (400 tensors); ``conv`` 25 × Conv2d(16→16, 3×3)
+ ReLU, batch 4 × 1×32×32 (50 tensors); ``gpt2`` a GPT-2-small shape (124M parameters: tied
50257×768 embedding, 1024×768 positions, 12 pre-norm layers of width 768 / 12 heads / 3072), batch
1 × 32 tokens; ``table1`` the Table 1 model of Drozdzal et al. 2016 (11.5M parameters, batch norm,
short and long skips), batch 4 × 1×512×512 (GPU only: a CPU step takes minutes). Goals: on a CPU,
``mlp`` ≤ 1.05× step time recording every step; on a GPU (``--device cuda``), ``table1`` and
``gpt2`` ≤ 1.02×. On a GPU the step time is timed per block of steps between two
``torch.cuda.synchronize()`` calls (the queue runs ahead of Python inside a block, as in training).

Usage: ``python -m gradflow.bench.launches [--models mlp,conv,gpt2] [--strategies auto,foreach,fused]
[--device cpu|cuda] [--compare PATH] [--out reports/bench_launches.md [--force]]``
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from gradflow.errors import GradflowError

GOAL = {"cpu": {"mlp": 1.05}, "cuda": {"table1": 1.02, "gpt2": 1.02}}


def deep_mlp(depth: int = 200, width: int = 32, in_features: int = 16) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(in_features, width)]
    for _ in range(depth - 2):
        layers += [nn.ReLU(), nn.Linear(width, width)]
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(width, 1))


def deep_convnet(depth: int = 25, width: int = 16) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1)]
    for _ in range(depth - 2):
        layers += [nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)]
    return nn.Sequential(*layers, nn.ReLU(), nn.Conv2d(width, 1, 3, padding=1))


class GPT2Shape(nn.Module):
    """GPT-2 small's parameter shapes (tied embedding/head) on torch's encoder layers, causal."""

    def __init__(self, vocab: int = 50257, context: int = 1024, width: int = 768, depth: int = 12,
                 heads: int = 12):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        h = self.tokens(idx) + self.positions(torch.arange(t, device=idx.device))
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


CASES = {
    "mlp": ("200 × Linear(32→32) + ReLU, batch 32", deep_mlp, lambda: torch.randn(32, 16)),
    "conv": ("25 × Conv2d(16→16, 3×3) + ReLU, batch 4 × 1×32×32", deep_convnet,
             lambda: torch.randn(4, 1, 32, 32)),
    "gpt2": ("GPT-2-small shape (124M), batch 1 × 32 tokens", GPT2Shape,
             lambda: torch.randint(0, 50257, (1, 32))),
    "table1": ("Table 1 model (11.5M), batch 4 × 1×512×512", lambda: table1(),
               lambda: torch.randn(4, 1, 512, 512)),
}


def table1() -> nn.Module:
    from gradflow.models.fcn import paper_fcn

    return paper_fcn()


def loss_of(name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if name == "gpt2":
        return nn.functional.cross_entropy(out[0, :-1], x[0, 1:])
    if name == "table1":
        return nn.functional.binary_cross_entropy_with_logits(out, (x > 0).float())
    return out.square().mean()


class Arm:
    """A model and SGD optimizer, maybe with a Recorder whose hooks are timed and marked."""

    def __init__(self, name: str, model: nn.Module, record: bool, store: str):
        self.name, self.model = name, model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        self.marks = dict.fromkeys(("a", "b", "c", "d"), 0.0)
        self.ranges: list = []
        self.optimizer.register_step_pre_hook(self._enter("a"))
        self.optimizer.register_step_post_hook(self._enter("c"))
        self.recorder = None
        if record:
            import gradflow

            self.recorder = gradflow.Recorder(model, self.optimizer, store, every=1)
        self.optimizer.register_step_pre_hook(self._leave("b"))
        self.optimizer.register_step_post_hook(self._leave("d"))

    def _enter(self, key):
        def hook(*args):
            self.marks[key] = time.thread_time()
            marker = torch.autograd.profiler.record_function("gradflow.hooks")
            marker.__enter__()
            self.ranges.append(marker)
        return hook

    def _leave(self, key):
        def hook(*args):
            self.ranges.pop().__exit__(None, None, None)
            self.marks[key] = time.thread_time()
        return hook

    def step(self, x: torch.Tensor) -> tuple[float, float, float]:
        wall, cpu = time.perf_counter(), time.thread_time()
        self.optimizer.zero_grad()
        loss_of(self.name, self.model, x).backward()
        self.optimizer.step()
        m = self.marks
        return (time.perf_counter() - wall, time.thread_time() - cpu,
                (m["b"] - m["a"]) + (m["d"] - m["c"]))

    def block(self, x: torch.Tensor, steps: int) -> list[tuple[float, float, float]]:
        """``steps`` steps; on a GPU each gets the block's mean wall and CPU time (one sync per block)."""
        if x.device.type != "cuda":
            return [self.step(x) for _ in range(steps)]
        torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.thread_time()
        hooks = [self.step(x)[2] for _ in range(steps)]
        torch.cuda.synchronize()
        wall, cpu = (time.perf_counter() - wall) / steps, (time.thread_time() - cpu) / steps
        return [(wall, cpu, h) for h in hooks]


def count_ops(arm: Arm, x: torch.Tensor, steps: int) -> dict:
    """Dispatches directly under the Recorder's hooks per step (and CUDA launches, if any)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            arm.step(x)
    ops, launches, names = 0, 0, {}

    def descendants(event):
        for child in event.cpu_children:
            yield child
            yield from descendants(child)

    for event in prof.events():
        if event.name != "gradflow.hooks":
            continue
        for child in event.cpu_children:
            ops += 1
            names[child.name] = names.get(child.name, 0) + 1
        launches += sum(1 for e in descendants(event) if "LaunchKernel" in e.name)
    top = sorted(names.items(), key=lambda kv: -kv[1])[:6]
    return {"ops": ops / steps, "launches": launches / steps,
            "top": [(n, c / steps) for n, c in top]}


def child(name: str, strategy: str, steps: int, block: int, profile_steps: int,
          device: str = "cpu", threads: int = 1) -> dict:
    import gradflow

    if strategy != "auto":
        try:
            from gradflow import buckets as choice
        except ImportError:  # a --compare checkout from before gradflow/buckets.py
            from gradflow import quantities as choice
        if not hasattr(choice, "STRATEGY"):
            raise GradflowError(f"this gradflow has no bucket strategy {strategy!r}")
        choice.STRATEGY = strategy
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    description, make, make_input = CASES[name]
    base = make().to(device)
    x = make_input().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        arms = [Arm(name, copy.deepcopy(base), False, ""),
                Arm(name, copy.deepcopy(base), True, os.path.join(tmp, "run.zarr"))]
        tensors = sum(1 for _ in arms[1].model.parameters())
        for arm in arms:
            for _ in range(3):
                arm.step(x)
        times = {arm.recorder is not None: [] for arm in arms}
        rounds = max(1, steps // block)
        for r in range(rounds):
            for arm in (arms if r % 2 == 0 else arms[::-1]):
                times[arm.recorder is not None] += arm.block(x, block)
        ops = count_ops(arms[1], x, profile_steps)
        arms[1].recorder.close()
    plain, rec = times[False], times[True]

    def med(values, k):
        return statistics.median(v[k] for v in values)

    return {"model": name, "description": description, "strategy": strategy, "tensors": tensors,
            "params": sum(p.numel() for p in base.parameters()),
            "plain_ms": med(plain, 0) * 1e3, "gradflow_ms": med(rec, 0) * 1e3,
            "wall_ratio": med(rec, 0) / med(plain, 0), "cpu_ratio": med(rec, 1) / med(plain, 1),
            "hooks_ms": med(rec, 2) * 1e3, "steps": len(rec), **ops,
            "gradflow_path": str(Path(gradflow.__file__).parent), "device": device,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else ""}


def run_child(name: str, strategy: str, args, pythonpath: str) -> dict:
    slow = name in ("gpt2", "table1") and args.device == "cpu"
    steps = args.gpt2_steps if slow or name == "table1" else args.steps
    block = 1 if slow else args.block
    from gradflow import bench

    return bench.run_child(str(Path(__file__).resolve()),
                           ["--child", name, "--strategy", strategy, "--steps", str(steps),
                            "--block", str(block), "--profile-steps", str(args.profile_steps),
                            "--device", args.device, "--threads", str(args.threads)], pythonpath,
                           f"{name}/{strategy}")


def child_main(argv: list[str]) -> None:
    """A child process: one model and bucket kind, its figures as one JSON line. Plain argparse: under
    ``--compare`` this file runs against another checkout's gradflow, which may lack gradflow.bench."""
    parser = argparse.ArgumentParser()
    for name, default in (("--child", ""), ("--strategy", "auto"), ("--device", "cpu")):
        parser.add_argument(name, default=default)
    for name in ("--steps", "--block", "--profile-steps"):
        parser.add_argument(name, type=int)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps(child(args.child, args.strategy, args.steps, args.block, args.profile_steps,
                           args.device, args.threads)))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--child" in argv:
        return child_main(argv)
    from gradflow import bench  # not at the top: a child may import another checkout's gradflow

    parser = bench.parser("launches", __doc__)
    parser.add_argument("--models", default="mlp,conv,gpt2", type=bench.names_from(list(CASES)),
                        help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--strategies", default="auto,foreach",
                        type=bench.names_from(["auto", "stack", "foreach", "fused"]),
                        help="comma-separated bucket kinds, of auto, stack, foreach, fused (Triton's on a "
                             "GPU, Numba's on a CPU)")
    parser.add_argument("--steps", type=bench.positive_int, default=300, help="timed steps per arm (mlp, conv)")
    parser.add_argument("--gpt2-steps", type=bench.positive_int, default=6,
                        help="timed steps per arm: gpt2 on a CPU, table1 everywhere")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--block", type=bench.positive_int, default=5, help="steps per timed block")
    parser.add_argument("--profile-steps", type=bench.positive_int, default=3)
    parser.add_argument("--threads", type=bench.threads, default=1,
                        help="torch intra-op threads in each run (the CPU's fused kernels use as many)")
    parser.add_argument("--compare", default=None, type=bench.checkout,
                        help="another checkout's root, measured as well")
    bench.add_report_options(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise GradflowError("--device cuda but torch sees no CUDA device")
    out = bench.check_out(args.out, args.force)
    root = str(Path(__file__).resolve().parents[2])
    rows = []
    for name in args.models.split(","):
        runs = [(f"gradflow ({s})", s, root) for s in args.strategies.split(",")]
        if args.compare:
            runs.insert(0, (f"gradflow@{Path(args.compare).name}", "auto", args.compare))
        for label, strategy, path in runs:
            row = run_child(name, strategy, args, path)
            row["label"] = label
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = render(rows, args)
    print(report)
    bench.write_report(out, report)


def render(rows: list[dict], args) -> str:
    lines = [
        "# Recorder launches benchmark", "",
        "Per recorded step (every=1): dispatches directly under the Recorder's optimizer hooks "
        "(`torch.profiler`; each is one kernel launch or more on a GPU), the training thread's CPU "
        "time inside the hooks, and the step time with recording over without (medians; plain and "
        "gradflow interleaved in one process, order alternating). `auto` is the default: the "
        "fused kernels where their compiler is installed (`fused`: on a CPU Numba's, "
        "`gradflow/fused_cpu.py`; on a GPU Triton's, `gradflow/fused_triton.py`; neither is a torch op, "
        "so they are counted only as CUDA launches), else on a CPU stacked shape classes "
        "(`stack`) and on a GPU multi-tensor `torch._foreach_*` kernels (`foreach`). "
        "Produced by `python -m gradflow.bench.launches`.", "",
        "| model | tensors | recorder | ops / step | top ops | hooks ms / step | plain ms / step | "
        "wall ratio | CPU ratio | goal | met |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        goal = GOAL[args.device].get(r["model"])
        met = "-" if goal is None or r["strategy"] != "auto" else ("yes" if r["wall_ratio"] <= goal else "no")
        top = ", ".join(f"{n.replace('aten::', '')} {c:g}" for n, c in r["top"][:4])
        lines.append(f"| {r['model']} | {r['tensors']} | {r['label']} | {r['ops']:g} | {top} | "
                     f"{r['hooks_ms']:.2f} | {r['plain_ms']:.1f} | {r['wall_ratio']:.3f}× | "
                     f"{r['cpu_ratio']:.3f}× | {'≤ %.2f×' % goal if goal else '-'} | {met} |")
    lines += [
        "", "## Conditions", "",
        f"- **date**: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- **machine**: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"{platform.system()} {platform.release()}; "
        f"{rows[0]['device_name'] if rows and rows[0]['device_name'] else 'no GPU'} ({args.device})",
        f"- **python / torch**: {platform.python_version()} / {torch.__version__}, {args.threads} torch "
        f"thread{'s' if args.threads > 1 else ''}",
        f"- **steps**: {args.steps} timed per arm (table1, and gpt2 on a CPU: {args.gpt2_steps}), blocks "
        f"of {args.block} (table1 and gpt2 on a CPU: 1), after 3 warm-up steps; ops counted over "
        f"{args.profile_steps} profiled steps" + ("; GPU wall time per block between syncs"
                                                 if args.device == "cuda" else ""),
        "- **optimizer**: SGD(lr=1e-4, momentum=0.9), fixed batch",
        f"- **load average at the end**: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- **note**: {args.note or '-'}",
    ]
    for r in rows:
        lines.append(f"- {r['model']} / {r['label']}: {r['params']:,} parameters, {r['steps']} steps, "
                     f"launches counted on CUDA: {r['launches']:g}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from gradflow import bench

    bench.run(main)
