import re

import numpy as np
import xarray as xr


def test_report_has_figures_table_3_and_flow_summary(tiny_sweep, tmp_path, cli, variants):
    result = cli("report", tiny_sweep, "--out", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    report = tmp_path / "rep" / "report.md"
    assert result.output.strip() == str(report)
    text = report.read_text()
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (tmp_path / "rep" / image).is_file()
    assert "heatmap-update_mean_abs-epoch.png" in text and "curves.png" in text
    for name in variants:
        epochs = xr.open_zarr(str(tiny_sweep), group=f"{name}/epochs", consolidated=False)
        best = int(np.nanargmin(epochs["val_loss"].values))
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} ") and "best" not in line)
        assert f"{epochs['val_loss'].values[best]:.4f}" in row
        assert f"{epochs['train_loss'].values[best]:.4f}" in row
        assert "| RMSprop " in row  # the optimizer column (the tiny sweep is RMSprop only)
    assert "## Gradient-flow summary" in text and text.count("| simple-d1-bn0-long_sum-short") == 4


def test_report_defaults_to_reports_store_name(tiny_sweep, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("report", tiny_sweep)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "reports" / "tiny" / "report.md").is_file()


def test_out_that_is_a_file_is_one_line_exit_2_and_kept(tiny_sweep, tmp_path, run_main):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    code, out, err = run_main("report", tiny_sweep, "--out", taken)
    assert code == 2 and err.startswith("error: ") and "not a folder" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in out + err
    assert taken.read_text() == "mine"
