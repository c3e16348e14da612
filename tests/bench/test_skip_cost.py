"""Skip cost: measured skip-path memory and parameter counts against hand arithmetic."""

from __future__ import annotations

import functools

import pytest

from gradflow.bench.skip_cost import skip_cost, to_markdown
from gradflow.models import simple_fcn


def test_skip_cost_against_hand_arithmetic():
    """simple_fcn(depth=1, levels=2, width=4) at 16²: skip1 carries down2's output (4 ch, 8²),
    skip2 carries down1's output (4 ch, 16²); SAT carries one channel at each instead."""
    build = functools.partial(simple_fcn, 1, 2, 4)
    table = skip_cost(build, size=16, long_skips=("sum", "concat", "sat", "at", "st", "none"))
    pixels = 8 * 8 + 16 * 16
    float32 = 4
    expected_bytes = {"sum": 4 * pixels * float32, "concat": 4 * pixels * float32, "st": 4 * pixels * float32,
                      "sat": 1 * pixels * float32, "at": 1 * pixels * float32, "none": 0}
    assert table["skip_activation_bytes"].to_dict() == expected_bytes
    assert table["transferred_channels"].to_dict() == {"sum": 8, "concat": 8, "st": 8, "sat": 2, "at": 2,
                                                      "none": 0}
    assert table.loc["sat", "skip_activation_mib"] == pytest.approx(pixels * float32 / 2**20)
    # skip parameters per skip (see tests/models/test_fcn.py): concat 36, sat 33, at 29, st 40, sum 0
    assert table["skip_params"].to_dict() == {"sum": 0, "concat": 72, "sat": 66, "at": 58, "st": 80, "none": 0}
    assert (table["params"] - table["skip_params"]).nunique() == 1  # the rest of the network is shared


def test_paper_model_small_input_and_markdown():
    """Table 1 model at 32² (its smallest input): skips carry down5 … down1 = 512, 256, 128, 32, 32
    channels at 2², 4², 8², 16², 32²."""
    table = skip_cost(size=32, long_skips=("sum", "sat"))
    sizes = [(512, 2), (256, 4), (128, 8), (32, 16), (32, 32)]
    assert table.loc["sum", "skip_activation_bytes"] == sum(c * s * s * 4 for c, s in sizes)
    assert table.loc["sat", "skip_activation_bytes"] == sum(1 * s * s * 4 for _, s in sizes)
    assert table.loc["sat", "params"] > table.loc["sum", "params"] - table.loc["sum", "skip_params"]
    text = to_markdown(table, 32)
    assert "| sat " in text and "32×32" in text
