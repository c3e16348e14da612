"""Every benchmark keeps an existing report: ``--out`` to a file that exists is refused before any work;
the shared child-process runner of the benchmarks that measure another checkout."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import gradflow.bench
from gradflow import GradflowError

NAMES = [m.name for m in pkgutil.iter_modules(gradflow.bench.__path__) if not m.name.startswith("_")]


@pytest.mark.parametrize("name", NAMES)
def test_existing_report_is_never_overwritten(tmp_path, monkeypatch, name):
    """From any folder, not only the checkout (a default once resolved against the working folder)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "report.md"
    out.write_text("kept")
    main = importlib.import_module(f"gradflow.bench.{name}").main
    with pytest.raises(GradflowError, match="exists"):
        main(["--out", str(out)])
    assert out.read_text() == "kept"


def test_run_child_returns_the_last_json_line_or_names_the_failure(tmp_path):
    """The launches and memory benchmarks' children: the last output line is the result; a child
    that fails is one GradflowError naming it, with the end of its stderr."""
    script = tmp_path / "child.py"
    script.write_text("import os, sys\nprint('noise')\nprint('{\"path\": \"%s\", \"x\": %s}' % "
                      "(os.environ['PYTHONPATH'].split(os.pathsep)[0], sys.argv[1]))\n"
                      "sys.exit(int(sys.argv[2]))\n")
    assert gradflow.bench.run_child(str(script), ["3", "0"], str(tmp_path), "arm a") == {"path": str(tmp_path), "x": 3}
    with pytest.raises(GradflowError, match="^arm a failed:"):
        gradflow.bench.run_child(str(script), ["3", "1"], str(tmp_path), "arm a")
