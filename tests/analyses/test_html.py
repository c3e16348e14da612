"""The self-contained HTML report: its figure data are the analysis arrays, and in headless Chromium it
loads offline without console errors, draws its heatmaps and names the layer under the mouse."""

import json
import re

import numpy as np
import xarray as xr
from browser import browser_page

from gradflow.analyses.heatmaps import heatmap_data
from gradflow.analyses.html import figures, write_html


def _run(run_factory):
    step, epoch = run_factory(0, epochs=4, steps_per_epoch=25)
    grad, count = step["grad_norm"].values.copy(), step["nonfinite"].values.copy()
    grad[30, 1], count[30, 1] = np.nan, 2
    rates = 0.1 * 0.9 ** np.arange(step.sizes["step"])
    step = step.assign(grad_norm=(("step", "layer"), grad), nonfinite=(("step", "layer"), count),
                       lr=(("step", "param_group"), rates[:, None])).assign_coords(param_group=["group0"])
    return xr.DataTree.from_dict({"/": step, "/epochs": epoch}), step


def test_html_figures_hold_the_analysis_arrays(run_factory):
    tree, step = _run(run_factory)
    figs = figures(tree, bins=20)
    assert list(figs) == ["heatmap-update_mean_abs-epoch", "heatmap-update_ratio-step", "heatmap-grad_norm-step",
                          "curves", "update_ratio", "lr"]
    trace = figs["heatmap-grad_norm-step"].data[0]
    da = heatmap_data(tree, stat="grad_norm", per="step", layers="all", bins=20)["run"]
    np.testing.assert_allclose(np.asarray(trace.z, dtype=float), np.log10(da.values), rtol=1e-12)
    assert list(trace.x) == [str(n) for n in da["layer"].values]
    custom = np.asarray(trace.customdata)
    assert (custom[0, :, 0] == da["module_type"].values).all()
    assert custom[6, 0, 1] == "steps 30–34"
    hit = list(trace.x).index(str(step["layer"].values[1]))
    assert custom[6, hit, 3] == " (non-finite gradient (NaN/Inf))"  # the blown-up step, marked in its bin
    np.testing.assert_array_equal(np.asarray(figs["lr"].data[0].y, dtype=float), step["lr"].values[:, 0])


def test_html_report_is_one_offline_file_and_works_in_chromium(run_factory, tmp_path):
    tree, step = _run(run_factory)
    path = write_html(tree, tmp_path / "report.html")
    text = path.read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", text)  # plotly.js and the data are inline
    assert json.loads(re.search(r"const FIGURES = (.*);\n", text).group(1)).keys() == figures(tree).keys()
    with browser_page() as browser:
        browser.page.goto(path.as_uri())
        label = browser.hover_heatmap("heatmap-grad_norm-step")
        layer = next(name for name in map(str, step["layer"].values) if name in label)
        module_type = str(step["module_type"].sel(layer=layer).values)
        assert f"({module_type})" in label and "step" in label and "value" in label
        assert browser.page.locator("#heatmap-update_mean_abs-epoch .heatmaplayer image").count() >= 1
        assert browser.errors == [] and browser.blocked == []
