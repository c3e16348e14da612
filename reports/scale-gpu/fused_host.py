"""Host time of the fused buckets' per-step Python, with the two Triton launches left out.

The fused kernels (gradflow/fused_triton.py) move all per-tensor arithmetic to the GPU; what stays on the
host per phase is one pass over the tensors (their gradients and addresses, checked against the
cached table) plus two kernel launches. This times that pass on CPU tensors of the real shapes, with
the kernels replaced by no-ops, so it runs without a GPU; a GPU run adds the launches (tens of µs
each on Triton's Python launcher) and measures the whole step (run.sh).

Usage: ``PYTHONPATH=. python reports/scale-gpu/fused_host.py`` (CPU, Triton installed).
"""

from __future__ import annotations

import os
import platform
import time

os.environ["TRITON_INTERPRET"] = "1"  # import the kernels without a GPU (they are not run)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gradflow import fused, fused_triton  # noqa: E402
from gradflow.bench.launches import GPT2Shape, deep_mlp, table1  # noqa: E402


class NoKernel:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    torch.set_num_threads(1)
    fused_triton._partials = fused_triton._combine = NoKernel()
    fused.FusedBucket._warm_up = lambda self, data: None
    fused.self_test = lambda device, dtype, kind: None
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, 1 thread; median of 200 calls after one warm-up call")
    print("| model | tensors | gradient µs | snapshot µs | after µs | total ms per step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, make in (("mlp", deep_mlp), ("gpt2", GPT2Shape), ("table1", table1)):
        params = list(make().parameters())
        bucket = fused_triton.TritonFusedBucket.build(params, list(range(len(params))))
        for p in params:
            p.grad = torch.zeros_like(p)
        present = np.ones(len(params), bool)
        times = []
        for phase in (lambda: bucket.gradient_parts(present, None), bucket.snapshot,
                      bucket.after_step):
            phase()
            samples = []
            for _ in range(200):
                start = time.perf_counter()
                phase()
                samples.append(time.perf_counter() - start)
            times.append(float(np.median(samples)) * 1e6)
        print(f"| {name} | {len(params)} | {times[0]:.0f} | {times[1]:.0f} | {times[2]:.0f} | "
              f"{sum(times) / 1e3:.2f} |")


if __name__ == "__main__":
    main()
