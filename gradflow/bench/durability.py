"""Durability trials: kill -9 / SIGTERM at random moments, two writers on one store, concurrent groups.

Run: ``python -m gradflow.bench.durability --trials 20 [--out reports/bench_durability.md]``.
Each trial forks a child process that records a small MLP into a fresh store and is interrupted
at a random moment; the parent then opens the store and counts the steps the child
finished but the store does not hold (*lost*). The Recorder promises: a crash loses at most the
buffer (1,024 steps or 10 s, whichever is less) plus the commit in flight; SIGTERM loses at most the
step under way; the store always opens intact; epoch rows agree with the steps' epoch labels.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path




def _child(store: str, epoch_steps: int, flush_rows: int, user_handler: bool, start_at: float,
           steps: int, group: str | None, ready, done) -> None:
    """Forked child: record a small MLP until killed (or ``steps`` steps), counting in ``done``."""
    import torch
    from torch import nn

    import gradflow
    from gradflow import recorder

    recorder.FLUSH_ROWS = flush_rows

    def handler(signum, frame):
        os._exit(0)  # no atexit: what the store holds now, the SIGTERM flush wrote

    # As a fresh process: no handler inherited from the parent (a test runner may have one).
    signal.signal(signal.SIGTERM, handler if user_handler else signal.SIG_DFL)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    while time.time() < start_at:
        time.sleep(0.005)
    try:
        rec = gradflow.Recorder(model, optimizer, store, group=group)
    except gradflow.GradflowError as err:
        print(f"refused: {err}", file=sys.stderr, flush=True)
        os._exit(3)
    ready.set()
    x = torch.randn(8, 16)
    step = 0
    while not steps or step < steps:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        step += 1
        if step % epoch_steps == 0:
            rec.end_epoch(train_loss=float(step))
        done.value = step
    rec.close()
    os._exit(0)


def _spawn(store: Path, epoch_steps: int, flush_rows: int, user_handler: bool = False,
           start_at: float = 0.0, steps: int = 0, group: str | None = None):
    """A forked child process (starts in milliseconds: torch is already imported here)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.RawValue("q", 0)
    child = ctx.Process(target=_child, args=(str(store), epoch_steps, flush_rows, user_handler, start_at,
                                             steps, group, ready, done))
    child.start()
    return child, ready, done


@dataclass
class TrialResult:
    """One interrupted child: what it finished, what the store holds, and whether it is consistent."""

    returncode: int | None
    done: int = 0  # steps the child finished
    committed: int = 0  # steps the store holds
    lost: int = 0
    epochs_consistent: bool = False
    error: str | None = None  # the store did not open (or was inconsistent): what was wrong


def inspect_store(store: Path, result: TrialResult) -> TrialResult:
    """Open the store as a reader would and check its steps and epochs against each other."""
    import numpy as np

    import gradflow

    try:
        tree = gradflow.open_tree(store)
    except gradflow.GradflowError as err:
        result.error = str(err)
        return result
    steps = tree.ds.step.values
    labels = tree.ds.epoch.values
    epochs = tree["epochs"] if "epochs" in tree.children else None
    result.committed = len(steps)
    result.lost = result.done - result.committed
    if not np.array_equal(steps, np.arange(len(steps))):
        result.error = "steps are not 0, 1, 2, ..."
        return result
    n_epochs = epochs.sizes.get("epoch", 0) if epochs is not None else 0
    top = int(labels.max()) if labels.size else 0
    counts = np.bincount(labels, minlength=n_epochs)[:n_epochs] if labels.size else np.zeros(0)
    result.epochs_consistent = (n_epochs in (top, top + 1) if labels.size else n_epochs == 0) and (
        n_epochs == 0 or np.array_equal(epochs.num_steps.values, counts))
    return result


def run_trial(store: Path, epoch_steps: int, kill_after: float, flush_rows: int = 1024,
              sig: int = signal.SIGKILL, user_handler: bool = False) -> TrialResult:
    """One child recording into ``store``, sent ``sig`` ``kill_after`` seconds after it started
    training; then the store is inspected."""
    child, ready, done = _spawn(store, epoch_steps, flush_rows, user_handler)
    if not ready.wait(120):
        child.kill()
        child.join()
        return TrialResult(child.exitcode, error="child did not start")
    time.sleep(kill_after)
    os.kill(child.pid, sig)
    child.join(120)
    return inspect_store(store, TrialResult(child.exitcode, done=done.value))


def two_writers(store: Path) -> str | None:
    """Two processes start recording into one store at the same moment: exactly one may write."""
    start = time.time() + 0.5
    children = [_spawn(store, 50, 1024, start_at=start, steps=300) for _ in range(2)]
    for child, _, _ in children:
        child.join(120)
    codes = sorted(child.exitcode for child, _, _ in children)
    if codes != [0, 3]:
        return f"exit codes {codes}"
    winner = next(done.value for child, _, done in children if child.exitcode == 0)
    result = inspect_store(store, TrialResult(0, done=winner))
    if result.error or result.committed != 300 or not result.epochs_consistent:
        return result.error or f"store holds {result.committed} steps"
    return None


def concurrent_groups(store: Path, groups: int = 4) -> str | None:
    """``groups`` processes create and fill distinct groups of one new store at the same moment."""
    import gradflow

    start = time.time() + 0.5
    children = [_spawn(store, 10, 1024, start_at=start, steps=50, group=f"v{i}") for i in range(groups)]
    for child, _, _ in children:
        child.join(120)
    codes = [child.exitcode for child, _, _ in children]
    if codes != [0] * groups:
        return f"exit codes {codes}"
    tree = gradflow.open(store)
    if sorted(tree.children) != [f"v{i}" for i in range(groups)] or any(
            tree[f"v{i}"].sizes["step"] != 50 for i in range(groups)):
        return f"store holds {sorted(tree.children)}"
    return None


KINDS = ("kill9-short-epochs", "kill9-long-epochs", "sigterm", "two-writers", "concurrent-groups")


def run(trials: int, seed: int = 0, progress: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """``trials`` of each kind; one summary row per kind."""
    rng = random.Random(seed)
    rows = []
    total, started = trials * len(KINDS), time.monotonic()
    for k, kind in enumerate(KINDS):
        lost, done, failures = [], [], []
        for t in range(trials):
            if progress:
                progress(k * trials + t, total, kind)
            with tempfile.TemporaryDirectory() as tmp:
                store = Path(tmp) / "run.zarr"
                if kind.startswith("kill9") or kind == "sigterm":
                    result = run_trial(store, epoch_steps=20 if "short" in kind else 2000,
                                       kill_after=rng.uniform(0.5, 12.0 if kind != "sigterm" else 5.0),
                                       sig=signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
                    lost.append(result.lost)
                    done.append(result.done)
                    bound = 1 if kind == "sigterm" else 2 * 1024
                    if result.error or not result.epochs_consistent or result.lost > bound:
                        failures.append(result.error or f"lost {result.lost}, epochs consistent: "
                                                        f"{result.epochs_consistent}")
                else:
                    failure = (two_writers if kind == "two-writers" else concurrent_groups)(store)
                    if failure:
                        failures.append(failure)
        rows.append({"kind": kind, "trials": trials,
                     "steps done (median)": int(statistics.median(done)) if done else None,
                     "steps lost (max)": max(lost) if lost else None,
                     "failures": len(failures), "first failure": failures[0] if failures else ""})
    if progress:
        progress(total, total, f"done in {time.monotonic() - started:.0f} s")
    return rows


def markdown(rows: list[dict], trials: int, seconds: float, note: str) -> str:
    lines = ["# Durability trials", "",
             f"`python -m gradflow.bench.durability --trials {trials}`: {trials} trials per kind, "
             f"{seconds / 60:.1f} min. {note}".strip(), "",
             "A child process records a 4-layer MLP (16 units, batch 8, SGD) into a fresh store: "
             "kill -9 at a random moment 0.5-12 s after training started (`end_epoch` every 20 steps: short "
             "epochs; every 2,000: long), SIGTERM at 0.5-5 s (no handler of its own); two processes "
             "starting on one store at the same moment (300 steps each); four processes creating four "
             "groups of one new store at the same moment (50 steps each). Lost = steps the child "
             "finished minus steps the store holds. A failure: the store does not open, its steps are "
             "not 0..n-1, its epoch rows disagree with the steps' labels, more lost than promised "
             "(kill -9: the 1,024-step buffer plus one commit in flight, 2,048; SIGTERM: the step under "
             "way, 1), or for two writers anything but one run and one clear refusal.", "",
             "| kind | trials | steps done (median) | steps lost (max) | failures |",
             "|---|---|---|---|---|"]
    for row in rows:
        cells = [row["kind"], row["trials"], row["steps done (median)"] or "", "" if row["steps lost (max)"] is None
                 else row["steps lost (max)"], row["failures"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    failures = [f"- {row['kind']}: {row['first failure']}" for row in rows if row["first failure"]]
    return "\n".join(lines + ([""] + failures if failures else []) + [""])


def main(argv: list[str] | None = None) -> None:
    from gradflow import bench

    parser = bench.parser("durability", __doc__)
    parser.add_argument("--trials", type=bench.positive_int, default=20, help="trials per kind")
    parser.add_argument("--seed", type=bench.seed, default=0)
    bench.add_report_options(parser)
    args = parser.parse_args(argv)
    out = bench.check_out(args.out, args.force)
    started = time.monotonic()

    def progress(i: int, total: int, what: str) -> None:
        elapsed = time.monotonic() - started
        eta = f", eta {elapsed / i * (total - i):.0f} s" if i else ""
        print(f"\r[{i}/{total}] {what}{eta}      ", end="", file=sys.stderr, flush=True)

    rows = run(args.trials, args.seed, progress)
    print(file=sys.stderr)
    text = markdown(rows, args.trials, time.monotonic() - started, args.note)
    print(text)
    bench.write_report(out, text)


if __name__ == "__main__":
    from gradflow import bench

    bench.run(main)
