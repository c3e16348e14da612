"""The training-throughput benchmark compares like with like, and a tiny run writes its report."""

import dataclasses
import math

import torch

from gradflow.bench.train import plain_loop, report_text, run_benchmark, summarise
from gradflow.data import load_data
from gradflow.train import TrainConfig, train

TINY = TrainConfig(depth=1, levels=2, width=4, size=32, n_train=4, n_val=2, batch_size=2, epochs=2, device="cpu")


def test_plain_loop_trains_exactly_what_train_trains():
    config = dataclasses.replace(TINY, dropout=0.2)  # every random source in play
    data = load_data(config.data, size=config.size, seed=config.seed, n_train=config.n_train, n_val=config.n_val)
    plain = plain_loop(config, data).state_dict()
    ours = train(config, store=None, data=data).model.state_dict()
    assert plain.keys() == ours.keys()
    assert all(torch.equal(plain[k], ours[k]) for k in plain)


def test_tiny_benchmark_writes_report():
    config = dataclasses.replace(TINY, epochs=1)
    results = run_benchmark(config, reps=1)
    assert sorted(results["variant"]) == ["plain", "recorder off", "recorder on"]
    table = summarise(results)
    assert table.loc["plain", "ratio"] == 1.0 and table.loc["plain", "ratio (CPU time)"] == 1.0
    assert all(math.isfinite(r) and r > 0 for r in [*table["ratio"], *table["ratio (CPU time)"]])
    row = results[results["variant"] == "recorder on"].iloc[0]
    assert row["images_per_s"] == config.n_train * config.epochs / row["wall_s"]
    text = report_text(config, 1, results, table)
    assert f"| recorder on | {table.loc['recorder on', 'images/s']:.3f} | {table.loc['recorder on', 'ratio']:.3f} |" in text
