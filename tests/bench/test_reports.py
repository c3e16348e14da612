"""Every benchmark keeps an existing report: ``--out`` to a file that exists is refused before any work."""

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
