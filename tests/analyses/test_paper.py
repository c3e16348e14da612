"""The paper-comparison tables of preset stores, on hand-made runs with known values."""

import numpy as np
import pytest
import xarray as xr

from gradflow.analyses.paper import fig4_table, paper_section, preset_of, settings_table, table2_table, table3_table

# centre = the layer named across.*; ends = first (down1.conv) and last (classifier) layer
LAYERS = [("down1.conv", "Conv2d"), ("down2.block0.conv", "Conv2d"), ("across.block0.conv", "Conv2d"),
          ("up1.block0.conv", "Conv2d"), ("classifier", "Conv2d")]


def preset_tree(run_factory, runs: dict) -> xr.DataTree:
    """runs: {name: (metadata, group attrs, per-layer |ΔW| in LAYERS order, val losses)}."""
    nodes = {}
    for i, (name, (metadata, attrs, update, val)) in enumerate(runs.items()):
        step, epoch = run_factory(i, layers=LAYERS, epochs=len(val), shuffle=False)
        epoch["update_mean_abs"][:] = np.tile(update, (len(val), 1))
        nodes[f"/{name}"] = step.assign_attrs(metadata=metadata, **attrs)
        nodes[f"/{name}/epochs"] = epoch.assign(val_loss=("epoch", val), train_loss=("epoch", np.full(len(val), 0.5)))
    return xr.DataTree.from_dict(nodes)


def test_fig4_ratio_per_panel_against_the_hand_ratio(run_factory):
    runs = {"a": ({"preset": "fig4", "panel": "(a) long + short"}, {}, [1, 5, 2, 5, 3], [0.3]),
            "b": ({"command": "gradflow sweep --preset fig4", "panel": "(b) long only"}, {}, [2, 5, 0.1, 5, 2], [0.3]),
            "other": ({}, {}, [1, 1, 1, 1, 1], [0.3])}
    table = fig4_table(preset_tree(run_factory, runs))
    assert list(table["variant"]) == ["a", "b"]  # the run without a preset is not a panel
    assert table.loc["(a) long + short", "centre_to_end_ratio"] == pytest.approx(2 / 2)   # 2 / mean(1, 3)
    assert table.loc["(b) long only", "centre_to_end_ratio"] == pytest.approx(0.1 / 2)    # 0.1 / mean(2, 2)
    assert table.loc["(b) long only", "ratio_over_panel_a"] == pytest.approx(0.05)
    assert table.loc["(b) long only", "paper_fig4"] == "the centre barely updates"
    assert "centre_zero_grad_steps" in table.columns  # beside the gradient ratio it explains


def test_table3_ranks_ours_and_the_papers(run_factory):
    runs = {name: ({"preset": "table3", "panel": panel}, {}, [1, 1, 1, 1, 1], val) for name, panel, val in [
        ("ls", "long + short", [0.5, 0.2]), ("s", "short only", [0.4, 0.25]), ("l", "long only", [0.19, 0.3])]}
    table = table3_table(preset_tree(run_factory, runs))
    assert table.loc["long + short", "best_val_loss"] == 0.2 and table.loc["long only", "best_epoch"] == 0
    assert list(table.index) == ["long + short", "long only", "short only"]  # the paper's order
    assert list(table["our_rank"]) == [2, 1, 3] and list(table["paper_rank"]) == [1, 2, 3]
    assert list(table["paper_val_loss"]) == [0.162, 0.188, 0.202]
    lines = "\n".join(paper_section(preset_tree(run_factory, runs), lambda t, f: t.to_string()))
    assert "ours: long only < long + short < short only" in lines and "(different)" in lines


def test_table2_scores_beside_the_papers_test_set_scores(run_factory):
    scores = {"v_rand": 0.9, "v_info": 0.95, "pixel_error": 0.1, "score_passes": 10}
    tree = preset_tree(run_factory, {"t": ({"preset": "table2"}, scores, [1, 1, 1, 1, 1], [0.3])})
    table = table2_table(tree)
    assert table.loc["t", ["v_rand", "v_info", "pixel_error", "dropout_passes"]].tolist() == [0.9, 0.95, 0.1, 10]
    assert table.loc["paper (Table 2)", ["v_rand", "v_info"]].tolist() == [0.969, 0.986]


def test_settings_table_only_when_optimizer_settings_differ(run_factory):
    same = {"preset": "fig4", "rmsprop_alpha": 0.9, "weight_decay_mode": "l2", "weight_decay": 1e-3, "data": "/d"}
    runs = {"k": (same, {}, [1, 1, 0.5, 1, 1], [0.3]), "k2": (same, {}, [1, 1, 1, 1, 1], [0.3])}
    assert len(settings_table(preset_tree(run_factory, runs))) == 0
    runs["t"] = ({**same, "rmsprop_alpha": 0.99, "weight_decay_mode": "torch", "data": "synthetic"}, {},
                 [1, 1, 4, 1, 1], [0.3])
    table = settings_table(preset_tree(run_factory, runs))
    assert table.loc["t", ["data", "rmsprop_alpha", "weight_decay_mode"]].tolist() == ["synthetic", 0.99, "torch"]
    assert table.loc["k", "data"] == "ISBI 2012" and table.loc["k", "centre_to_end_ratio"] == pytest.approx(0.5)
    assert table.loc["t", "centre_to_end_ratio"] == pytest.approx(4.0)


def test_preset_from_metadata_or_command():
    assert preset_of({"preset": "table2"}) == "table2"
    assert preset_of({"command": "gradflow sweep --preset fig4 --data x"}) == "fig4"
    assert preset_of({"command": "gradflow sweep --depths 3"}) == ""
