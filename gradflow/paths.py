"""Where a store lives: a local path or an fsspec URL (used by the store, its summary and sweeps)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

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


def _metadata(fs, path: str) -> dict | None:
    """The Zarr metadata in the file ``path``; None when it is missing or does not parse."""
    try:
        meta = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def gradflow_kind(meta: dict | None) -> str | None:
    """The ``gradflow_kind`` of a group's Zarr metadata (``"run"``, ``"epochs"``, …); None for an
    array, another tool's group or no metadata (:func:`_metadata` gave None)."""
    attributes = meta.get("attributes") if isinstance(meta, dict) and meta.get("node_type") == "group" else None
    return attributes.get("gradflow_kind") if isinstance(attributes, dict) else None


def own_store(fs, folder: str, name: str, meta: dict | None) -> bool:
    """Whether the gradflow run in the folder ``folder/name`` (its ``zarr.json`` parsed: ``meta``)
    is a store of its own, not a group of a sweep in ``folder``: its ``zarr.json`` holds
    consolidated metadata (gradflow publishes a commit only at a store's root; a sweep's groups
    never hold one, :func:`gradflow.store.consolidate`), or its writer's lock folder
    ``.<name>.gradflow`` lies in ``folder`` (a sweep's lie beside the sweep, not in it)."""
    return gradflow_kind(meta) == "run" and (isinstance(meta.get("consolidated_metadata"), dict)
                                             or fs.exists(f"{folder}/.{name}.gradflow"))


def folder_runs(url: str) -> dict[str, bool]:
    """The folders in ``url`` that hold a gradflow run (``<name>/zarr.json``), each with whether it
    is a store of its own (:func:`own_store`) rather than a sweep's group."""
    fs, path = filesystem(url)
    path = path.rstrip("/")
    runs = {file.rsplit("/", 2)[-2]: _metadata(fs, file) for file in fs.glob(f"{path}/*/zarr.json")}
    return {name: own_store(fs, path, name, meta) for name, meta in sorted(runs.items())
            if gradflow_kind(meta) == "run"}


def folder_kind(url: str) -> str | None:
    """What a folder holds when its own ``zarr.json`` is missing or does not parse: ``"sweep"`` (a
    sweep's run groups: its root file was lost), ``"run"`` (a run's arrays, ``epochs/``),
    ``"runs"`` (runs that are stores of their own, :func:`own_store`: a plain folder of runs, never
    a sweep, whatever else it holds), None (nothing of gradflow's)."""
    runs = folder_runs(url)
    if any(runs.values()):
        return "runs"
    if runs:
        return "sweep"
    fs, path = filesystem(url)
    return "run" if gradflow_kind(_metadata(fs, f"{path.rstrip('/')}/epochs/zarr.json")) == "epochs" \
        else None


def _committed(meta: dict | None) -> dict:
    """The node metadata a store root's ``zarr.json`` (parsed: ``meta``) holds as its last commit
    (its consolidated metadata, keyed by path); empty where it holds none or is no dict."""
    found = meta.get("consolidated_metadata") if isinstance(meta, dict) else None
    found = found.get("metadata") if isinstance(found, dict) else None
    return found if isinstance(found, dict) else {}


def no_store_error(url: str, each: str = "") -> GradflowError:
    """``no gradflow store at URL``; for a folder of runs that are stores of their own, which run
    to name instead (``each``: what to do with it, ``"check each run: gradflow check"``)."""
    own = [name for name, alone in folder_runs(url).items() if alone]
    if own:
        run = f"{url.rstrip('/')}/{own[0]}"
        return GradflowError(f"no gradflow store at {url} (a folder of {len(own)} separate run "
                             f"store(s), not a sweep); " + (f"{each} {run}" if each else
                                                           f"name one run, e.g. {run}"))
    return GradflowError(f"no gradflow store at {url}")


def store_kind(url: str) -> str | None:
    """What the Zarr store at ``url`` is to gradflow, from its metadata files:

    ``"run"`` (a run at its root), ``"sweep"`` (its members are gradflow runs, or runs being
    created), ``"empty"`` (a group with no members), ``"foreign"`` (anything else: another tool's
    store, a Zarr array); None when ``url`` holds no Zarr store or its root ``zarr.json`` does not
    parse (:func:`gradflow.check.damaged_root` tells). A member whose ``zarr.json`` does not parse is
    left to ``gradflow check``.

    Reads the root ``zarr.json``, lists the root folder and reads the ``zarr.json`` of only the
    members the root's consolidated metadata (the last commit) does not list: its copy gives the
    others' kind, so a Recorder opening one group of a sweep of N runs reads no N files."""
    from gradflow.lock import lock_dir

    fs, path = filesystem(url)
    path = path.rstrip("/")
    root = _metadata(fs, f"{path}/zarr.json")
    if root is None:
        return None
    if gradflow_kind(root) == "run":
        return "run"
    if root.get("node_type") != "group":
        return "foreign"
    listed = _committed(root)
    names = [m.rstrip("/").rsplit("/", 1)[-1] for m in fs.ls(path, detail=False)]
    names = [n for n in names if n != "zarr.json" and not n.startswith(".") and not n.endswith(".partial")]
    members = {name: listed.get(name) or _metadata(fs, f"{path}/{name}/zarr.json") for name in names}
    if not any(meta is not None for meta in members.values()):
        return "empty"
    for name, meta in members.items():
        if meta is not None and gradflow_kind(meta) != "run" \
                and not fs.exists(f"{lock_dir(path, name)}/creating"):
            return "foreign"
    return "sweep"


def _groups(url: str) -> list[str]:
    """The groups of the store at ``url``: those its last commit lists and the folders that hold
    a ``zarr.json`` (a variant being recorded)."""
    fs, path = filesystem(url)
    path = path.rstrip("/")
    names = {key for key in _committed(_metadata(fs, f"{path}/zarr.json")) if "/" not in key}
    names |= {file.rsplit("/", 2)[-2] for file in fs.glob(f"{path}/*/zarr.json")}
    return sorted(names)


def enclosing_store(url: str) -> tuple[str, str, str] | None:
    """``(store, inner, kind)`` when ``url`` lies inside the folder of a Zarr store (an ancestor
    folder holds a ``zarr.json``, or is a sweep that lost it: :func:`folder_kind`), else None: the
    outermost such store as the user wrote it (``"sweep.zarr/v1/epochs"`` → ``"sweep.zarr"``), the
    path of ``url`` inside it (``"v1/epochs"``) and its :func:`store_kind` (a damaged root: its
    :func:`folder_kind`). Writing or reading there bypasses the store's root metadata (its commit
    point), which never lists what is written there. A run that is a store of its own
    (:func:`own_store`) is never inside another: a folder of such runs is no store."""
    fs, path = filesystem(url)
    parts = path.rstrip("/").split("/")
    rooted = [bool(folder) and fs.exists(f"{folder}/zarr.json")
              for folder in ("/".join(parts[:k]) for k in range(len(parts) + 1))]
    for k in range(1, len(parts)):
        ancestor = "/".join(parts[:k])
        if not ancestor or not (rooted[k] or rooted[k + 1]):
            continue
        child = _metadata(fs, f"{ancestor}/{parts[k]}/zarr.json") if rooted[k + 1] else None
        if own_store(fs, ancestor, parts[k], child):
            continue
        inner = "/".join(parts[k:])
        text = url.rstrip("/")
        store = text[:-len(inner) - 1] if text.endswith(f"/{inner}") else fs.unstrip_protocol(ancestor)
        if rooted[k]:
            kind = store_kind(store) or folder_kind(store)
            if kind == "runs":
                continue
            return store, inner, kind or "foreign"
        if gradflow_kind(child) == "run" and folder_kind(store) == "sweep":  # a sweep's lost root
            return store, inner, "sweep"
    return None


def sweep_member(url: str) -> tuple[str, str] | None:
    """``(store, group)`` when ``url`` is the folder of a run group of a sweep store
    (``"sweep.zarr/v1"`` → ``("sweep.zarr", "v1")``), which readers open through the store
    (``gradflow.open_tree(store)[group]``: from the store's commit); else None."""
    return _member(enclosing_store(url))


def _member(found: tuple[str, str, str] | None) -> tuple[str, str] | None:
    """:func:`sweep_member` from the :func:`enclosing_store` of the url."""
    if found is None or found[2] != "sweep" or "/" in found[1]:
        return None
    fs, path = filesystem(found[0])
    meta = _metadata(fs, f"{path.rstrip('/')}/{found[1]}/zarr.json")
    return (found[0], found[1]) if gradflow_kind(meta) == "run" else None


def refuse_inside_store(url: str, instead: Callable[[str, str, str], str], writing: bool,
                        members: bool = False) -> None:
    """Raise a one-line GradflowError when ``url`` lies inside the folder of a Zarr store
    (:func:`enclosing_store`): for writing, inside any Zarr store (a gradflow store would not see the
    run, or would see its own run damaged; another tool's store is never touched); for reading,
    inside a gradflow store (past its commit point). ``instead(store, inner, kind)`` says what to
    do instead about a gradflow store (``"record into a group of it: Recorder(...)"``).
    ``members``: reading a run group of a sweep (:func:`sweep_member`) is allowed."""
    found = enclosing_store(url)
    if found is None or (members and not writing and _member(found)):
        return
    store, inner, kind = found
    group = inner.split("/")[0]
    if not writing and kind in ("sweep", "empty") and group not in (groups := _groups(store)):
        raise GradflowError(f"{store} has no group {group!r}; its groups: "
                            f"{', '.join(groups) or '(none yet)'}")
    if kind == "foreign":
        if writing:
            raise GradflowError(f"{url} is inside the Zarr store {store}, which is not a gradflow "
                                f"store; choose a path outside it")
        return
    what = "the gradflow run" if kind == "run" else "the gradflow store"
    why = ("its root metadata, which readers see, would never follow what is written there"
           if writing else "that path reads past the store's last commit")
    raise GradflowError(f"{url} is a path inside {what} {store} ({why}); {instead(store, inner, kind)}")
