"""Shared fixtures: where the real ISBI 2012 data is (tests skip cleanly without it)."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Without a GPU, Triton's interpreter runs the fused kernels (gradflow/fused_triton.py) with NumPy,
# so that they are tested here; with one they are compiled for it (set before Triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def fused_kernels_on(device: str) -> bool:
    """Whether the fused Triton kernels can run on ``device`` here: Triton is installed, and a CPU
    is interpreted (no GPU) while a GPU is compiled for."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return interpreted if device == "cpu" else not interpreted and torch.cuda.is_available()


def find_isbi() -> Path | None:
    """The ISBI 2012 folder: $GRADFLOW_ISBI, else ``shared/data/isbi2012`` in or beside the repo."""
    candidates = [os.environ.get("GRADFLOW_ISBI"), REPO / "shared/data/isbi2012",
                  REPO.parent / "shared/data/isbi2012"]
    return next((Path(p) for p in candidates if p and (Path(p) / "labels").is_dir()), None)


@pytest.fixture
def isbi_dir() -> Path:
    """The real ISBI 2012 data (never copied into the repo); the test skips cleanly without it."""
    path = find_isbi()
    if path is None:
        pytest.skip("ISBI 2012 data not present (set GRADFLOW_ISBI or put it in ../shared/data)")
    return path


@pytest.fixture
def small_summary(monkeypatch) -> tuple[tuple[int, int], int]:
    """Summary levels of 4 and 8 rows written in spans of 16 (instead of 256/4096 and 8,192), so a
    test store of a few dozen rows has complete summary blocks. Returns (levels, span)."""
    from gradflow import summary

    monkeypatch.setattr(summary, "LEVELS", (4, 8))
    monkeypatch.setattr(summary, "SPAN", 16)
    return summary.LEVELS, summary.SPAN
