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
    report = memory.render(results, args)
    assert "| gradflow | 200.0 | 2.00× | 230.0 | 2.30× | ≤ 2.25× | no |" in report
