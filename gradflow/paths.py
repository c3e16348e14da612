"""Where a store lives: a local path or an fsspec URL (used by the store, its summary and sweeps)."""

from __future__ import annotations

import os

from gradflow.errors import GradflowError
from gradflow.lock import filesystem


def store_url(store: str | os.PathLike) -> str:
    """A local path or fsspec URL as a string; anything else (``foo://``) is a user mistake."""
    if isinstance(store, os.PathLike):
        store = os.fspath(store)
    if not isinstance(store, str) or not store:
        raise GradflowError(f"store must be a path or URL string, got {store!r}")
    filesystem(store)  # an unknown protocol or a missing fsspec backend: one line
    return store


def path_exists(url: str) -> tuple[bool, bool]:
    """(exists, is a Zarr v3 node) for a local path or fsspec URL."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return False, False
    return True, fs.exists(path.rstrip("/") + "/zarr.json")
