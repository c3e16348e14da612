import numpy as np
import xarray as xr

from gradflow.analyses.flow_summary import flow_summary

LAYERS = [("down1.conv", "Conv2d"), ("down1.block1.conv1", "Conv2d"), ("across.block1.conv1", "Conv2d"),
          ("across.block1.bn1", "BatchNorm2d"), ("across.block2.conv1", "Conv2d"), ("up1.block1.conv1", "Conv2d"),
          ("classifier", "Conv2d")]


def test_centre_ratio_and_nonfinite_locations(run_factory):
    step, epoch = run_factory(0, layers=LAYERS, epochs=2, steps_per_epoch=3)
    # Per-layer epoch updates, in registration order; the conv layers' means over 2 epochs are
    # [2, 1, 0.01, 0.03, 1, 4] (BatchNorm is left out), median 1.0, ends 2 and 4, centre 0.01 and 0.03.
    per_layer = {"down1.conv": [1, 3], "down1.block1.conv1": [1, 1], "across.block1.conv1": [0.02, 0.0],
                 "across.block1.bn1": [9, 9], "across.block2.conv1": [0.03, 0.03], "up1.block1.conv1": [0.5, 1.5],
                 "classifier": [4, 4]}
    update = np.array([per_layer[str(name)] for name in epoch["layer"].values], dtype="float32").T
    epoch = epoch.assign(update_mean_abs=(("epoch", "layer"), update))
    nonfinite = np.zeros((6, 7), dtype="float32")
    layer_names = [str(n) for n in step["layer"].values]
    nonfinite[4, layer_names.index("classifier")] = 3
    nonfinite[5, layer_names.index("down1.conv")] = 1
    step = step.assign(nonfinite=(("step", "layer"), nonfinite))
    # Gradient norms, geometric means over 6 steps: first layer 2 (1 and 4 alternating), classifier 6,
    # centre 1e-4 and 3e-4 (one NaN step ignored), so the ratio is 2e-4 / 4.
    grad = np.ones((6, 7), dtype="float32")
    grad[:, layer_names.index("down1.conv")] = [1, 4, 1, 4, 1, 4]
    grad[:, layer_names.index("classifier")] = 6
    grad[:, layer_names.index("across.block1.conv1")] = 1e-4
    grad[:, layer_names.index("across.block2.conv1")] = 3e-4
    grad[2, layer_names.index("across.block2.conv1")] = np.nan
    step = step.assign(grad_norm=(("step", "layer"), grad))
    tree = xr.DataTree.from_dict({"/v": step, "/v/epochs": epoch})

    row = flow_summary(tree).loc["v"]
    assert row["optimizer"] == ""  # the hand-made store does not say
    tree["v"].attrs["optimizers"] = [{"class": "SGD", "param_groups": [{"lr": 0.01}]}]
    assert flow_summary(tree).loc["v", "optimizer"] == "SGD"
    assert row["layers"] == 6
    assert "updatable_depth" not in row.index  # dropped: it equalled the layer count in every default run
    np.testing.assert_allclose(row["centre_to_end_ratio"], (0.01 + 0.03) / 2 / ((2 + 4) / 2), rtol=1e-6)
    np.testing.assert_allclose(row["centre_to_end_grad_ratio"], (1e-4 + 3e-4) / 2 / ((2 + 6) / 2), rtol=1e-5)
    assert row["nonfinite_values"] == 4 and row["nonfinite_steps"] == 2 and row["first_nonfinite_step"] == 4
    assert row["nonfinite_layers"] == "down1.conv, classifier"


def test_without_nonfinite_values_and_for_non_fcn_models(run_factory):
    step, epoch = run_factory(0, layers=[("a", "Linear"), ("b", "Linear"), ("c", "Linear")])
    epoch = epoch.assign(update_mean_abs=(("epoch", "layer"),
                                          np.tile(np.array([{"a": 1.0, "b": 0.5, "c": 3.0}[str(n)]
                                                            for n in epoch["layer"].values]), (3, 1))))
    row = flow_summary(xr.DataTree.from_dict({"/": step, "/epochs": epoch})).loc["run"]
    assert row["centre_to_end_ratio"] == 0.5 / 2.0  # middle layer b over the mean of a and c
    assert row["nonfinite_values"] == 0 and row["nonfinite_steps"] == 0 and row["nonfinite_layers"] == ""


def test_one_step_with_a_zero_centre_gradient_makes_the_ratio_0_and_is_counted(run_factory):
    """The geometric mean of a layer that had gradient norm exactly 0 at one step is 0, so one such
    step zeroes the centre-to-end gradient ratio; the report says so, and counts those steps, so that
    a 0 is not read as a gradient that faded (found in a fig4 report: panel (d) showed 0)."""
    step, _ = run_factory(0, layers=[("a", "Linear"), ("b", "Linear"), ("c", "Linear")], epochs=2,
                          steps_per_epoch=3)
    names = [str(n) for n in step["layer"].values]
    grad = np.ones((6, 3), dtype="float32")
    grad[:, names.index("a")], grad[:, names.index("c")] = 2.0, 8.0
    grad[:, names.index("b")] = [0.5, 0.0, 0.5, 0.5, 0.0, 0.5]  # centre b: exactly 0 at steps 1 and 4
    grad[3, names.index("a")] = 0.0  # an end layer at 0 is no centre step
    row = flow_summary(xr.DataTree.from_dict({"/": step.assign(grad_norm=(("step", "layer"), grad))})).loc["run"]
    assert row["centre_to_end_grad_ratio"] == 0.0
    assert row["centre_zero_grad_steps"] == 2
    grad[[1, 4], names.index("b")] = 0.5  # without them: 0.5 / mean(geometric mean of a (0 at step 3), 8)
    row = flow_summary(xr.DataTree.from_dict({"/": step.assign(grad_norm=(("step", "layer"), grad))})).loc["run"]
    np.testing.assert_allclose(row["centre_to_end_grad_ratio"], 0.5 / ((0.0 + 8.0) / 2), rtol=1e-6)
    assert row["centre_zero_grad_steps"] == 0
