"""`gradflow bench` end to end with a tiny step count, and its usage errors."""

import re

from typer.testing import CliRunner

import gradflow.cli


def test_bench_command_writes_the_report(tmp_path):
    gradflow.cli._register()
    out = tmp_path / "bench.md"
    result = CliRunner().invoke(gradflow.cli.app, ["bench", "--steps", "2", "--block", "1", "--out", str(out),
                                                   "--note", "smoke test"])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    for model in ("mlp", "conv"):
        line = next(line for line in result.output.splitlines() if line.startswith(f"{model} "))
        printed = re.search(r"gradflow +[\d.]+ ms \(([\d.]+)×", line).group(1)
        assert f"| {printed}× [" in next(row for row in text.splitlines() if row.startswith(f"| {model}:"))
    assert "- **note**: smoke test" in text and f"wrote {out}" in result.output


def test_bench_rejects_zero_steps(tmp_path):
    gradflow.cli._register()
    result = CliRunner().invoke(gradflow.cli.app, ["bench", "--steps", "0", "--out", str(tmp_path / "x.md")])
    assert result.exit_code == 2
    assert not (tmp_path / "x.md").exists()
