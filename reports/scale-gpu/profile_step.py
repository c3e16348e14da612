"""Where a recorded GPU step's time goes, on the training benchmark's model (diagnostic, not a test).

simple_fcn(depth 7, levels 4, width 32) at 128², batch 4, BCE, RMSprop (the paper's optimizer):
plain and recorded arms interleaved (per-block times between two syncs), the cost of end_epoch,
and a torch.profiler table of one recorded step's CPU-side operations (self time). Prints only.
Usage: ``python reports/scale-gpu/profile_step.py [--device cuda] [--steps 60]``
"""

import argparse
import copy
import statistics
import tempfile
import time

import torch
from torch import nn

import gradflow
from gradflow.models.fcn import simple_fcn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    base = simple_fcn(depth=7, levels=4, width=32).to(args.device)
    x = torch.randn(4, 1, 128, 128, device=args.device)
    y = (torch.rand_like(x) > 0.5).float()
    arms = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("plain", "recorded"):
            model = copy.deepcopy(base)
            opt = torch.optim.RMSprop(model.parameters(), lr=1e-4, alpha=0.9)
            rec = gradflow.Recorder(model, opt, f"{tmp}/run.zarr", every=1) if name == "recorded" else None
            arms[name] = (model, opt, rec)

        def step(name):
            model, opt, _ = arms[name]
            opt.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
            opt.step()

        for name in arms:
            for _ in range(5):
                step(name)
        times = {name: [] for name in arms}
        for r in range(6):
            for name in (arms if r % 2 == 0 else list(arms)[::-1]):
                sync()
                t = time.perf_counter()
                for _ in range(args.steps // 6):
                    step(name)
                sync()
                times[name].append((time.perf_counter() - t) / (args.steps // 6) * 1e3)
        plain, recorded = statistics.median(times["plain"]), statistics.median(times["recorded"])
        print(f"{sum(p.numel() for p in base.parameters()):,} parameters, "
              f"{sum(1 for _ in base.parameters())} tensors")
        print(f"step ms: plain {plain:.2f}, recorded {recorded:.2f}, ratio {recorded / plain:.3f}")
        rec = arms["recorded"][2]
        epoch_ms = []
        for _ in range(5):
            step("recorded")
            sync()
            t = time.perf_counter()
            rec.end_epoch()
            sync()
            epoch_ms.append((time.perf_counter() - t) * 1e3)
        print(f"end_epoch ms (synced): {[round(v, 2) for v in epoch_ms]}")
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                step("recorded")
            sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        rec.close()


if __name__ == "__main__":
    main()
