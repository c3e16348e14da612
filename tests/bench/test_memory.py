"""The memory benchmark's report (the measurement itself runs in child processes: see reports/)."""

from __future__ import annotations

import argparse

from gradflow.bench import memory


def test_report_divides_the_excess_over_plain_by_the_parameter_bytes():
    mib = 2**20
    run = {"param_bytes": 100 * mib, "params": 50 * mib}
    results = {"plain": [{**run, "steady": 10 * mib, "peak": 20 * mib}],
               "gradflow": [{**run, "steady": 210 * mib, "peak": 250 * mib}]}
    args = argparse.Namespace(device="cpu", dtype="bfloat16", steps=6, repeats=1, warmup=2,
                              epoch_every=3, note="")
    report = memory.render({512: results}, args)
    assert "| gradflow | 200.0 | 2.00× | 230.0 | 2.30× | ≤ 2.25× | no |" in report


def test_two_widths_split_each_arm_into_a_fixed_and_a_per_parameter_cost():
    """Steady excess over plain at two sizes: 100 MiB of parameters → 310 MiB, 1000 MiB → 2200 MiB:
    the line through them is 2.1 MiB per MiB of parameters plus 100 MiB."""
    mib = 2**20
    args = argparse.Namespace(device="cpu", dtype="float32", steps=6, repeats=1, warmup=2,
                              epoch_every=3, note="")

    def runs(param_mib: int, excess_mib: int) -> dict:
        size = {"param_bytes": param_mib * mib, "params": param_mib * mib // 4}
        return {"plain": [{**size, "steady": 5 * mib, "peak": 9 * mib}],
                "gradflow": [{**size, "steady": (5 + excess_mib) * mib, "peak": (9 + excess_mib) * mib}]}

    report = memory.render({512: runs(100, 310), 1840: runs(1000, 2200)}, args)
    assert "| gradflow | 310.0 | 3.10× | 310.0 | 3.10× | ≤ 2.25× | no |" in report
    assert "| gradflow | 2200.0 | 2.20× | 2200.0 | 2.20× | ≤ 2.25× | yes |" in report
    assert "| gradflow | 100.0 | 2.10× |" in report
    assert "W = 512, 1840" in report

