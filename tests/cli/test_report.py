import re
from pathlib import Path

import numpy as np
import pytest
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
    # a 0 gradient ratio is explained where it is shown: one exactly-0 centre step makes it 0, and counted
    assert "exactly-zero gradient norm in a centre layer" in text
    assert "centre_zero_grad_steps" in next(line for line in text.splitlines() if "centre_to_end_grad_ratio |" in line)


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


@pytest.mark.parametrize("command", ["report", "plot"])
def test_out_that_cannot_be_written_is_one_line_exit_2(tmp_path, run_main, monkeypatch, command):
    store = tmp_path / "run.zarr"
    _recorder_store(store)

    def refused(self, *args, **kwargs):  # a read-only folder (the tests may run as root)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    code, out, err = run_main(command, store, "--out", tmp_path / "locked" / "out")
    assert code == 2 and err.startswith("error: --out ") and "Permission denied" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in out + err


def _recorder_store(path, nan_step: int = 3):
    """A plain Recorder run (not a sweep): an MLP with a scheduler, one step with a NaN gradient."""
    import torch
    from torch import nn

    import gradflow

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    rec = gradflow.Recorder(model, optimizer, path)
    g = torch.Generator().manual_seed(1)
    for step in range(8):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(torch.randn(8, 4, generator=g)), torch.randn(8, 1, generator=g)).backward()
        kept = model[2].weight.detach().clone()
        if step == nan_step:
            model[2].weight.grad[0, 1] = float("nan")
            model[2].weight.grad[0, 2] = float("inf")
        optimizer.step()
        if step == nan_step:  # undo the poisoned update, so later steps are clean again
            with torch.no_grad():
                model[2].weight.copy_(kept)
        scheduler.step()
        if step % 4 == 3:
            rec.end_epoch(train_loss=1.0 / (step + 1), val_accuracy=step / 10)
    rec.close()


def test_generic_report_for_a_recorder_store(tmp_path, cli):
    store = tmp_path / "mlp.zarr"
    _recorder_store(store)
    result = cli("report", store, "--out", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Fig. 4" not in text and "Table 3" not in text and "Fig. 3" not in text  # paper headings: sweeps only
    assert "3 layers (2 Linear, 1 LayerNorm)" in text
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (tmp_path / "rep" / image).is_file()
    for stem in ("heatmap-update_ratio-step", "heatmap-grad_norm-step", "update_ratio", "gradient_bars", "lr"):
        assert f"({stem}.png)" in text
    ds = xr.open_zarr(str(store), consolidated=False)
    events = np.argwhere(np.nan_to_num(ds["nonfinite"].values) > 0)
    assert len(events) == 1
    step, layer = int(ds["step"].values[events[0][0]]), str(ds["layer"].values[events[0][1]])
    assert "1 (step, layer) cell(s) had NaN/Inf gradient values" in text
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    assert [str(step), "0", layer, "Linear", "2"] in rows  # step, epoch, layer, type, NaN/Inf values
    ratios = ds["update_ratio"].values.astype(float)
    typical = {str(n): np.exp(np.mean(np.log(r[np.isfinite(r) & (r > 0)]))) for n, r in zip(ds["layer"].values, ratios.T)}
    largest = max(typical, key=typical.get)
    assert [largest, "Linear", f"{typical[largest]:.3g}", "7", "largest"] in rows  # 7 finite steps of 8
    # Every scalar the loop logged per epoch is shown (val_accuracy was in no figure or table).
    assert ["epoch", "train_loss", "val_accuracy"] in rows
    assert ["0", f"{1 / 4:.4g}", f"{3 / 10:.4g}"] in rows and ["1", f"{1 / 8:.4g}", f"{7 / 10:.4g}"] in rows


def test_sweep_report_names_the_loss_and_drops_updatable_depth(tiny_sweep, tmp_path, cli):
    result = cli("report", tiny_sweep, "--out", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "updatable_depth" not in text
    assert "Loss: BCE (≥ 0, lower is better)." in text and "lr_at_best" in text


def test_report_html_is_written_next_to_the_markdown(tiny_sweep, tmp_path, cli):
    result = cli("report", tiny_sweep, "--out", tmp_path / "rep", "--html")
    assert result.exit_code == 0, result.output
    paths = result.output.split()
    assert paths == [str(tmp_path / "rep" / "report.md"), str(tmp_path / "rep" / "report.html")]
    text = (tmp_path / "rep" / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>") and "Plotly.newPlot" in text and "<script src" not in text


def test_generic_report_of_epochs_without_steps_and_a_pipe_in_a_name(tmp_path, cli):
    """A loop that logs epochs before its first step: the epochs are counted from the epochs group
    (it said "0 epoch(s)" above a table of three); a scalar named 'acc|top1' is escaped, not a
    column separator that shifts every cell of the Markdown table."""
    import torch

    import gradflow

    store = tmp_path / "eval.zarr"
    model = torch.nn.Linear(2, 2)
    with gradflow.Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), store) as rec:
        for epoch in range(3):
            rec.end_epoch(val_loss=1.0 / (epoch + 1), **{"acc|top1": epoch / 4})
    result = cli("report", store, "--out", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "0 recorded steps" in text and "3 epoch(s)" in text
    rows = [re.split(r"(?<!\\)\|", line.strip().strip("|")) for line in text.splitlines() if line.startswith("|")]
    assert [cell.strip() for cell in rows[0]] == ["epoch", "val_loss", "acc\\|top1"]
    assert all(len(row) == 3 for row in rows)
    assert [cell.strip() for cell in rows[-1]] == ["2", f"{1 / 3:.4g}", f"{2 / 4:.4g}"]


def test_a_chunk_that_does_not_decode_is_one_line_exit_2(tmp_path, run_main):
    """gradflow.open lists chunks without decoding them (opening costs the same at any length), so
    a garbage chunk file is met when a figure is read: one line naming the damage and `check`,
    exit 2 as for a missing chunk (tests/cli/test_check.py)."""
    import gradflow
    from gradflow.repair import check_store

    store = tmp_path / "run.zarr"
    _recorder_store(store)
    (store / "grad_norm" / "c" / "0" / "0").write_bytes(b"garbage")
    gradflow.open(store)  # lazily opened: nothing decoded yet
    assert check_store(str(store))[1] is True  # check decodes every chunk: it finds the damage
    code, out, err = run_main("report", store, "--out", tmp_path / "rep")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err == (f"error: {store} is damaged: ./grad_norm: a chunk does not match its CRC-32C "
                   f"checksum (changed on disk); `gradflow check {store}` names it and `gradflow "
                   f"check {store} --repair` repairs it\n")  # not the checksums as raw bytes


def test_a_snapshot_false_run_with_a_guarded_nan_step_reads_as_no_data_not_red(tmp_path, cli):
    """snapshot=False stores NaN update figures: "not recorded". The per-epoch |ΔW| heatmap drew them red
    ("non-finite") and the report summarised empty tables, while it said every gradient was finite.
    Red only where a gradient was NaN/Inf (counted here from p.grad); the guarded step is "skipped" as
    the README words it, not "by the optimizer" (the store cannot tell who skipped)."""
    import torch
    from torch import nn

    import gradflow
    from gradflow.analyses.heatmaps import NO_DATA, NONFINITE, cell_states, heatmap_data
    from gradflow.analyses.html import figures

    store = tmp_path / "nosnap.zarr"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    bad = {}  # (epoch, layer index) -> NaN/Inf gradient values, counted by hand
    with gradflow.Recorder(model, optimizer, store, snapshot=False) as rec:
        for epoch in range(3):
            for step in range(4):
                optimizer.zero_grad()
                model(torch.randn(3, 4)).pow(2).mean().backward()
                if (epoch, step) == (1, 2):
                    model[2].weight.grad[0, 0] = float("nan")
                for j, layer in enumerate((model[0], model[2])):
                    n = sum(int((~torch.isfinite(p.grad)).sum()) for p in layer.parameters())
                    if n:
                        bad[epoch, j] = bad.get((epoch, j), 0) + n
                if bad and not all(torch.isfinite(p.grad).all() for p in model.parameters()):
                    rec.skip_step()
                    continue
                optimizer.step()
            rec.end_epoch(train_loss=1.0)
    assert bad == {(1, 1): 1}
    tree = gradflow.open_tree(store)
    expected = np.full((3, 2), NO_DATA)
    expected[1, 1] = NONFINITE
    da = heatmap_data(tree, "update_mean_abs", "epoch")["run"]
    np.testing.assert_array_equal(cell_states(da), expected)
    np.testing.assert_array_equal(cell_states(heatmap_data(tree, "update_norm", "epoch", layers="all")["run"]), expected)
    custom = np.asarray(figures(tree)["heatmap-update_mean_abs-epoch"].data[0].customdata)
    assert custom[0, 0, 3] == " (no data)" and custom[1, 1, 3] == " (non-finite gradient (NaN/Inf))"
    per_step = cell_states(heatmap_data(tree, "update_ratio", "step", layers="all", bins=12)["run"])
    assert per_step[6, 1] == NONFINITE and (np.delete(per_step.ravel(), 6 * 2 + 1) == NO_DATA).all()

    result = cli("report", store, "--out", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "12 recorded steps (steps 0–11, every 1), 3 epoch(s), 1 skipped (a real skip signal:" in text
    assert "by the optimizer" not in text
    assert "1 (step, layer) cell(s) had NaN/Inf gradient values" in text
    assert text.count("No finite, non-zero ‖ΔW‖") == 2  # the shares and the ratio extremes: no data, said so


@pytest.mark.parametrize("command", ["report", "plot"])
def test_two_stores_of_one_name_never_draw_into_one_default_folder(tmp_path, run_main, monkeypatch,
                                                                  command):
    """``a/run.zarr`` and ``b/run.zarr`` both default to ``reports/run/``: the second is refused in
    one line naming the first and ``--out`` (its figures would replace the first's), the first's
    files are kept, and drawing the first again, or the second with --out, works."""
    monkeypatch.chdir(tmp_path)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        _recorder_store(tmp_path / folder / "run.zarr")
    assert run_main(command, "a/run.zarr")[0] == 0
    drawn = {p: p.read_bytes() for p in (tmp_path / "reports" / "run").iterdir()}
    code, out, err = run_main(command, "b/run.zarr")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"holds the report of {tmp_path / 'a' / 'run.zarr'}" in err and "--out" in err
    assert {p: p.read_bytes() for p in (tmp_path / "reports" / "run").iterdir()} == drawn
    assert run_main(command, str(tmp_path / "a" / "run.zarr"))[0] == 0  # the same store, absolute
    assert run_main(command, "b/run.zarr", "--out", "reports/run-b")[0] == 0
