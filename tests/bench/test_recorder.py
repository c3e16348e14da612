"""Smoke run of the Recorder overhead benchmark (not timed), and the naive baseline's figures."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from gradflow.bench.recorder import (ARMS, CASES, NaiveRecorder, deep_convnet, deep_mlp, owning_modules,
                                     render_report, run_benchmark)


def test_benchmark_models_have_the_promised_depth():
    assert len([m for m in deep_mlp().modules() if isinstance(m, nn.Linear)]) == 200
    assert len([m for m in deep_convnet().modules() if isinstance(m, nn.Conv2d)]) == 25
    assert deep_mlp()(torch.zeros(CASES["mlp"].input_shape)).shape == (32, 1)
    assert deep_convnet()(torch.zeros(CASES["conv"].input_shape)).shape == (4, 1, 32, 32)


def test_tiny_benchmark_run_reports_finite_ratios():
    results = run_benchmark(steps=3, turn=2)
    assert [r.name for r in results] == ["mlp", "conv"]
    for r in results:
        assert all(len(times[arm]) == 3 for times in (r.wall, r.cpu, r.hooks) for arm in ARMS)
        for kind in ("wall", "cpu"):
            assert all(math.isfinite(r.ratio(arm, kind)) and r.ratio(arm, kind) > 0 for arm in ARMS)
        plain_hooks = r.median_ms("plain", "hooks")  # just the clock's own hooks: ~1 µs
        assert plain_hooks < r.median_ms("gradflow", "hooks") and plain_hooks < r.median_ms("naive", "hooks")
        assert math.isfinite(r.mean_ratio("gradflow")) and r.close_seconds >= 0
        assert r.layers == {"mlp": 200, "conv": 25}[r.name]
    text = render_report(results, {"torch threads": "1"})
    for r in results:
        row = next(line for line in text.splitlines() if line.startswith(f"| {r.name}:"))
        assert f"{r.ratio('gradflow'):.3f}×" in row and f"{r.ratio('naive'):.2f}×" in row
    assert "- **torch threads**: 1" in text


def test_naive_recorder_figures_match_first_principles():
    """The baseline must compute the same figures as gradflow, or the comparison would be unfair."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    naive = NaiveRecorder(model, optimizer)
    assert [name for name, _ in owning_modules(model)] == ["0", "2"]
    x = torch.randn(5, 3)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        grads = [p.grad.double().clone() for p in model.parameters()]
        before = [p.detach().double().clone() for p in model.parameters()]
        optimizer.step()
        after = [p.detach().double().clone() for p in model.parameters()]
        row = naive.rows[-1]
        for layer, idx in enumerate([[0, 1], [2]]):  # parameter indices per layer
            g = torch.cat([grads[i].ravel() for i in idx])
            w0 = torch.cat([before[i].ravel() for i in idx])
            w1 = torch.cat([after[i].ravel() for i in idx])
            d = w1 - w0
            expected = {
                "grad_norm": g.square().sum().sqrt(), "grad_max_abs": g.abs().max(), "nonfinite": 0.0,
                "update_norm": d.square().sum().sqrt(), "update_mean_abs": d.abs().sum() / d.numel(),
                "update_max_abs": d.abs().max(), "param_norm": w1.square().sum().sqrt(),
                "update_ratio": d.square().sum().sqrt() / w0.square().sum().sqrt(),
            }
            for var, value in expected.items():
                np.testing.assert_allclose(row[var][layer], float(value), rtol=1e-5, err_msg=var)
    naive.close()
    optimizer.step()
    assert len(naive.rows) == 2  # detached: no more rows
