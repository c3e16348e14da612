import pytest

from gradflow.errors import GradflowError
from gradflow.analyses.report import parse_formats, store_name


def test_store_name_is_the_last_path_part_without_zarr():
    assert store_name("updates.zarr") == "updates"
    assert store_name("runs/exp1.zarr/") == "exp1"
    assert store_name("s3://bucket/sweeps/big.zarr") == "big"
    assert store_name("memory://run") == "run"


def test_formats():
    assert parse_formats("png, SVG,.pdf") == ["png", "svg", "pdf"]
    with pytest.raises(GradflowError, match="gif"):
        parse_formats("png,gif")
