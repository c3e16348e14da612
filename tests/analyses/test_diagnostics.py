import numpy as np
import pytest
import xarray as xr

from gradflow.analyses.diagnostics import (REFERENCE_BAND, gradient_bar_data, gradient_bars, lr_curves, lr_data,
                                  update_ratio_curves)
from gradflow.errors import GradflowError

MLP = [("fc1", "Linear"), ("norm", "LayerNorm"), ("fc2", "Linear")]


def test_update_ratio_curves_one_line_per_layer_on_a_log_axis_with_the_band(run_factory):
    step, _ = run_factory(0, layers=MLP, epochs=2, steps_per_epoch=5)
    fig = update_ratio_curves(step, bins=10)
    ax = next(ax for ax in fig.axes if ax.get_label() == "run")
    assert ax.get_yscale() == "log"
    lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    assert list(lines) == ["fc1", "norm", "fc2"]
    for name, line in lines.items():
        np.testing.assert_allclose(line.get_ydata(), step["update_ratio"].sel(layer=name).values, rtol=1e-6)
        np.testing.assert_array_equal(line.get_xdata(), step["step"].values)
    band = ax.patches[0]
    assert (band.get_y(), band.get_y() + band.get_height()) == pytest.approx(REFERENCE_BAND)


def test_gradient_bars_of_a_step_and_of_an_epoch(run_factory):
    step, _ = run_factory(0, layers=MLP, epochs=3, steps_per_epoch=4)
    grad = step["grad_norm"].values.astype(float)
    largest = step["grad_max_abs"].values.astype(float)
    n = step["num_params"].values.astype(float)
    order = np.argsort(step["depth"].values)
    last = gradient_bar_data(step, layers="all")
    assert last.attrs["when"] == "step 11"
    assert list(last.index) == [step["layer"].values[i] for i in order]
    np.testing.assert_allclose(last["rms_grad"].values, (grad[-1] / np.sqrt(n))[order], rtol=1e-6)
    np.testing.assert_allclose(last["max_abs_grad"].values, largest[-1][order], rtol=1e-6)
    grad[5, :] = np.nan  # a step without finite figures is ignored in the epoch's figures
    step = step.assign(grad_norm=(("step", "layer"), grad))
    ep1 = gradient_bar_data(step, epoch=1, layers="all")
    np.testing.assert_allclose(ep1["rms_grad"].values, (np.nanmean(grad[4:8], axis=0) / np.sqrt(n))[order], rtol=1e-6)
    np.testing.assert_allclose(ep1["max_abs_grad"].values, largest[4:8].max(axis=0)[order], rtol=1e-6)
    fig = gradient_bars(step, step=3, layers="all")
    ax = fig.axes[0]
    np.testing.assert_allclose([b.get_height() for b in ax.containers[0]], largest[3][order], rtol=1e-6)
    assert ax.get_yscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == list(last.index)
    with pytest.raises(GradflowError, match="step 99 was not recorded"):
        gradient_bar_data(step, step=99)
    with pytest.raises(GradflowError, match="epoch 7 has no recorded step"):
        gradient_bar_data(step, epoch=7)


def test_lr_curves_hold_the_recorded_rates(run_factory):
    step, _ = run_factory(0, layers=MLP)
    with pytest.raises(GradflowError, match="no learning rate recorded"):
        lr_curves(step)
    rates = np.stack([0.1 * 0.5 ** np.arange(12), np.full(12, 0.01)], axis=1)
    step = step.assign(lr=(("step", "param_group"), rates)).assign_coords(param_group=["group0", "group1"])
    assert list(lr_data(step)) == ["run"]
    ax = lr_curves(step).axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    np.testing.assert_array_equal(lines["group0"].get_ydata(), rates[:, 0])
    np.testing.assert_array_equal(lines["group1"].get_ydata(), rates[:, 1])
    assert ax.get_yscale() == "log"


def test_lr_curves_of_rates_never_recorded_warn_nothing(run_factory):
    """An lr column that is all NaN (a param group added after the store was made) draws on a plain
    axis without numpy's 'All-NaN slice' warning in the user's terminal."""
    import warnings

    step, _ = run_factory(0, layers=MLP)
    step = step.assign(lr=(("step", "param_group"), np.full((12, 1), np.nan))).assign_coords(
        param_group=["group0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ax = lr_curves(step).axes[0]
    assert ax.get_yscale() == "linear" and np.isnan(ax.lines[0].get_ydata()).all()
