"""What pyproject.toml installs: every package of gradflow/, and analyses/ only as gradflow.analyses."""

from __future__ import annotations

import tomllib
from pathlib import Path

import gradflow

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_installed_and_analyses_only_under_gradflow():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "gradflow").rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders | {"gradflow.analyses"}
    assert setuptools["package-dir"] == {"gradflow.analyses": "analyses"}
    assert not any(name == "analyses" or name.startswith("analyses.") for name in setuptools["packages"])


def test_gradflow_analyses_is_the_top_level_folder():
    import gradflow.analyses.heatmaps

    assert Path(gradflow.analyses.heatmaps.__file__).resolve() == REPO / "analyses" / "heatmaps.py"
    assert gradflow.__version__
