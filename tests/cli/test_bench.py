"""`gradflow bench NAME` end to end with tiny sizes: the report only with --out, never over an existing one."""

import re

from typer.testing import CliRunner

import gradflow.cli


def bench(*args: str):
    gradflow.cli._register()
    return CliRunner().invoke(gradflow.cli.app, ["bench", *args])


def test_bench_recorder_writes_the_report_when_asked(tmp_path):
    out = tmp_path / "bench.md"
    result = bench("recorder", "--steps", "2", "--turn", "1", "--out", str(out), "--note", "smoke test")
    assert result.exit_code == 0, result.output
    text = out.read_text()
    for model in ("mlp", "conv"):
        line = next(line for line in result.output.splitlines() if line.startswith(f"{model} "))
        printed = re.search(r"gradflow +[\d.]+ ms \(([\d.]+)×", line).group(1)
        assert f"| {printed}× [" in next(row for row in text.splitlines() if row.startswith(f"| {model}:"))
    assert "- **note**: smoke test" in text and f"wrote {out}" in result.output


def test_bench_writes_nothing_without_out_and_keeps_an_existing_report(tmp_path, monkeypatch, run_main):
    tiny = ("plot", "--steps", "64", "--layers", "3", "--epochs", "2")
    monkeypatch.chdir(tmp_path)
    result = bench(*tiny)
    assert result.exit_code == 0, result.output
    assert "grad_norm per step" in result.output and list(tmp_path.iterdir()) == []
    report = tmp_path / "reports" / "bench_plot.md"
    report.parent.mkdir()
    report.write_text("committed")
    code, _, err = run_main("bench", *tiny, "--out", report)
    assert code == 2 and err.startswith("error: --out") and "exists" in err and report.read_text() == "committed"
    result = bench(*tiny, "--out", str(report), "--force")
    assert result.exit_code == 0 and "| grad_norm per step (200 bins) |" in report.read_text()


def test_bench_plot_times_the_heatmaps_drawn_by_analyses(tmp_path):
    out = tmp_path / "plot.md"
    result = bench("plot", "--steps", "64", "--layers", "3", "--epochs", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = [row for row in out.read_text().splitlines() if row.startswith("| ") and "seconds" not in row]
    assert len(rows) == 3 and all(re.search(r"\| [\d.]+ \|$", row) for row in rows)


def test_bench_lists_the_benchmarks_and_rejects_bad_input(tmp_path, run_main):
    result = bench()
    assert result.exit_code == 0 and all(name in result.output for name in ("recorder", "train", "plot", "skip_cost"))
    code, _, err = run_main("bench", "nope")
    assert code == 2 and err.startswith("error: unknown benchmark 'nope'")
    code, _, err = run_main("bench", "recorder", "--steps", "0", "--out", tmp_path / "x.md")
    assert code == 2 and err.count("\n") == 1 and "--steps" in err
    assert not (tmp_path / "x.md").exists()


def test_bench_launches_refuses_bad_options_in_one_line(tmp_path, run_main):
    """Unknown models or bucket kinds and counts below 1 are refused before anything runs: one
    line, exit 2, no report."""
    out = tmp_path / "launches.md"
    for args, named in ((["--models", "mlp,vgg"], "vgg"), (["--strategies", "auto,fancy"], "fancy"),
                        (["--steps", "0"], "--steps"), (["--threads", "0"], "--threads")):
        code, _, err = run_main("bench", "launches", *args, "--out", out)
        assert code == 2 and err.count("\n") == 1 and named in err, (args, err)
    assert not out.exists()


def test_bench_memory_widths_must_be_multiples_of_the_heads(tmp_path, run_main):
    """A width the 8 heads do not divide is refused before anything runs: one line, exit 2."""
    out = tmp_path / "memory.md"
    for widths in ("500", "512,x", "0"):
        code, _, err = run_main("bench", "memory", "--widths", widths, "--out", out)
        assert code == 2 and err.count("\n") == 1 and "multiples of 8" in err, (widths, err)
    assert not out.exists()
