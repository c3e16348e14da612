"""Repairs and the ``gradflow check`` report: a damaged run truncated to its last consistent commit,
its damaged metadata files rewritten from their committed copy, its lost float chunks written as NaN
(only those figures are lost, never the other variables' rows), the lost chunks of coordinates whose
values the writer's numbering fixes (``step``, ``epochs/epoch``, ``depth``) rebuilt, and those
of the steps' ``epoch`` labels where ``num_steps`` gives them (every=1), a lost
``num_steps`` chunk recounted from the step rows where that is exact and marked lost (-1, NaN to
xarray) where not, a lost chunk of the layer table (or another fixed-length array) rebuilt from an
intact source that agrees with every stored row (the run's ``fixed_coordinates`` attribute, another copy);
where none is left the chunk stays missing and the run is reported still damaged: its values are
never guessed, and the layer dimension cannot be cut like the steps.

The invariants themselves are in :mod:`gradflow.check`, which the store also uses when it opens a run;
this module writes (it needs the store), so it sits above both and neither imports it.
"""

from __future__ import annotations

import dataclasses
import datetime

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata
from zarr.core.sync import sync

from gradflow.check import (RunState, _quiet_zarr, damaged_metadata, damaged_root,
                            every_chunk_stored, inspect_run, lost_ranges, runs_of,
                            unreadable_metadata)
from gradflow.errors import GradflowError
from gradflow.summary import trim


def repair_run(url: str, group: str | None, state: RunState | None = None) -> RunState:
    """Rewrite its damaged metadata files from their committed copy, truncate one run to its longest
    consistent prefix (and its summary to before a missing chunk), write its missing float figure
    chunks as NaN, rebuild the missing chunks of ``step`` and ``epochs/epoch`` from their numbering
    (:func:`gradflow.check.derived_coordinate`), of the steps' ``epoch`` labels from ``num_steps``
    (:func:`gradflow.check.epoch_labels`) and of ``num_steps`` from the step rows
    (:func:`gradflow.check.count_steps`: exact, or marked lost) and of the layer table and other
    fixed-length arrays from an intact copy (:func:`gradflow.check._fixed_values`; one that no copy
    holds stays missing: :attr:`RunState.unrecoverable`), republish it; delete ``*.partial``.
    ``state``: the run's :func:`~gradflow.check.inspect_run` already taken (``gradflow check
    --repair``: it decodes every chunk, so it is not taken twice); it reads the committed view,
    which rewriting node metadata files leaves as it is."""
    from gradflow.lock import filesystem, group_is_locked

    fs, path = filesystem(url)
    where = url if not group else f"{url} (group {group!r})"
    if group_is_locked(fs, path, group):
        raise GradflowError(f"{where} is being written by a live Recorder; repair it after that "
                            f"Recorder finished")
    with _quiet_zarr():  # listing a folder that holds a *.partial file warns
        return _repair(url, group, where, fs, path, state)


def _repair(url: str, group: str | None, where: str, fs, path: str,
            state: RunState | None) -> RunState:
    from gradflow.lock import node_path, store_lock
    from gradflow.store import ALL, _remove_partial_files, consolidate, note_lost

    zstore = zarr.open_group(url, mode="r+", use_consolidated=False).store
    for key, (_, meta) in damaged_metadata(zstore, group).items():
        if isinstance(meta, GroupMetadata):  # only the root holds consolidated metadata
            meta = dataclasses.replace(meta, consolidated_metadata=None)
        sync(zstore.set(key, meta.to_buffer_dict(default_buffer_prototype())["zarr.json"]))
    state = state or inspect_run(zstore, group, where)
    node = zarr.open_group(zstore, mode="r+", path=group or "", use_consolidated=False)
    with store_lock(fs, path):
        if state.damaged_files:  # from here on they are missing chunks, their bytes kept
            state.set_aside = _set_aside(fs, path, state.damaged_files)
        for parent, dim, length in ((node, "step", state.good_steps),
                                    (node["epochs"], "epoch", state.good_epochs)):
            for _, array in parent.arrays():
                if array.metadata.dimension_names[0] == dim and array.shape[0] != length:
                    array.resize((length,) + array.shape[1:])
        good = {"step": state.good_steps, "epoch": state.good_epochs}
        for path, dim, first, end in state.lost:  # missing float chunks: NaN, as zarr reads them
            stop = min(end, good[dim])  # rows the truncation keeps
            if first < stop:
                array = zarr.open_array(zstore, path=path, mode="r+")
                array = every_chunk_stored(array)  # stored, even all NaN
                array[first:stop] = np.nan
                note_lost(array, [[first, stop]])  # readers can tell lost figures from recorded NaN
        for path, dim, first, values in state.rebuilt:  # numbers, counts, the layer table
            stop = min(first + len(values), good.get(dim, first + len(values)))  # (layers: all)
            if first < stop:
                array = zarr.open_array(zstore, path=path, mode="r+")
                every_chunk_stored(array)[first:stop] = values[:stop - first]
                if values.dtype.kind == "i" and (lost := lost_ranges(first, values[:stop - first])):
                    note_lost(array, lost)
        summary = node.get("summary")
        if isinstance(summary, zarr.Group) and summary.attrs.get("gradflow_kind") == "summary":
            trim(summary, state.good_summary)  # no block may describe rows the repair removed,
            # nor follow a missing chunk (the next Recorder recomputes them from the raw rows)
        attrs = {}
        if state.good_steps < state.num_steps:  # a resume must not number steps again: restarts
            attrs = _restart_steps(node, state)
        if group:
            node.attrs.update(attrs)
            consolidate(zstore, fresh={group.split("/")[0]})
        else:
            consolidate(zstore, fresh=ALL, root_attrs=attrs)
    removed = _remove_partial_files(fs, node_path(path, group))
    if removed:
        state.problems.append(f"{len(removed)} leftover *.partial file(s) (deleted)")
    return state


def _restart_steps(node, state: RunState) -> dict:
    """The run attributes after its step rows were cut to ``state.good_steps``: ``steps_seen`` kept
    (the steps it counted; a store without it: past the last committed row's number,
    ``(num_steps - 1)·every + 1``, at least), so a resumed Recorder numbers its steps after every
    step the run counted and a step number keeps meaning one step; and the row where those
    numbers restart in ``step_restarts`` (:func:`gradflow.check.derived_coordinate`)."""
    every = node.attrs.get("every")
    seen = node.attrs.get("steps_seen")
    if not isinstance(seen, int) or isinstance(seen, bool):
        kept = int(node["step"][state.good_steps - 1]) + 1 if state.good_steps else 0
        seen = max(kept, (state.num_steps - 1) * every + 1 if isinstance(every, int) else 0)
    first = -(-seen // every) * every if isinstance(every, int) and every >= 1 else seen
    restarts = [r for r in node.attrs.get("step_restarts", []) if r[0] < state.good_steps]
    return {"steps_seen": seen, "step_restarts": [*restarts, [state.good_steps, first]]}


def _set_aside(fs, path: str, keys: list[str]) -> str:
    """Move the chunk files ``keys`` (that do not decode) out of the store, into a new folder
    beside it, ``.<store name>.gradflow/damaged/<UTC time>/<key>``, which gradflow never deletes
    (their bytes may still mean something to a person); returns that folder."""
    from gradflow.lock import lock_root

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder, n = f"{lock_root(path)}/damaged/{stamp}", 1
    while fs.exists(folder):
        n += 1
        folder = f"{lock_root(path)}/damaged/{stamp}-{n}"
    for key in keys:
        target = f"{folder}/{key}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.mv(f"{path.rstrip('/')}/{key}", target)
    return folder


@dataclasses.dataclass
class Report:
    """What :func:`check_report` found (and did): its ``lines``, one or more per run; ``damaged``:
    damage was found; ``unrepairable``: the damage ``--repair`` cannot restore (what it says it
    leaves; with ``repair``, what it left); ``repairable``: damage that ``--repair`` restores."""

    lines: list[str] = dataclasses.field(default_factory=list)
    damaged: bool = False
    unrepairable: list[str] = dataclasses.field(default_factory=list)
    repairable: bool = False


def check_store(url: str, repair: bool = False) -> tuple[list[str], bool]:
    """Check (and with ``repair`` fix) every run of a store (:func:`check_report`). Returns (report
    lines, damaged); with ``repair``, damaged means damage is left that no repair restores."""
    report = check_report(url, repair)
    return report.lines, bool(report.unrepairable) if repair else report.damaged


def check_report(url: str, repair: bool = False) -> Report:
    """Check (and with ``repair`` fix) every run of a store; say which damage no repair restores.

    Raises GradflowError for what is not a gradflow store at all. A root ``zarr.json`` that is
    missing or damaged in a folder of gradflow's groups is damage (:func:`gradflow.check.damaged_root`):
    a sweep's is rewritten, a single run's is reported and left (nothing rebuilds it); so is a
    sweep's when a metadata file of its runs is damaged too (:func:`gradflow.check.damaged_root`).
    """
    from gradflow.lock import filesystem, group_is_locked
    from gradflow.paths import folder_runs, no_store_error, refuse_inside_store
    from gradflow.store import consolidate, store_url

    url = store_url(url)
    refuse_inside_store(url, lambda root, inner, kind: f"check the store: gradflow check {root}",
                        writing=False)  # --repair would rewrite that group as a store of its own
    fs, path = filesystem(url)
    report = Report()
    lines = report.lines
    damage = damaged_root(url)
    if damage:
        report.damaged = True
        lines.append(f"zarr.json: {damage[0]}; {damage[1]}")
        if damage[2]:  # a run's own root, or a sweep's whose runs' metadata it alone held
            report.unrepairable += damage[2]
            return report
        report.repairable = True
        if not repair:
            return report
        fs.pipe_file(f"{path.rstrip('/')}/zarr.json",
                     b'{"zarr_format": 3, "node_type": "group", "attributes": {}}')
        from gradflow.lock import store_lock

        with store_lock(fs, path):
            consolidate(url)
        lines.append("zarr.json: rewritten as a plain group holding the sweep's runs")
    try:
        root = zarr.open_group(url, mode="r")
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        raise no_store_error(url, "check each run: gradflow check") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise GradflowError(f"{url}: its zarr.json is damaged ({type(err).__name__}) and it "
                            f"holds no gradflow run or sweep groups; it cannot be repaired") from None
    if root.metadata.consolidated_metadata is None \
            and (unreadable := unreadable_metadata(fs, path.rstrip("/"))):  # zarr reads them all
        report.damaged = True
        report.unrepairable += list(unreadable)
        lines += [f"{key}: {problem}; the root zarr.json holds no committed copy of it (no "
                  f"consolidated metadata), so no repair rebuilds it" for key, problem in unreadable.items()]
        return report
    runs = runs_of(root)
    if not runs:
        raise GradflowError(f"{url} is not a gradflow store")
    if own := [group for group, alone in folder_runs(url).items() if alone and group in runs]:
        raise GradflowError(f"{url} is not a gradflow store but a folder of separate run stores "
                            f"({own[0]} has its own commit), and its zarr.json (written by an "
                            f"older `gradflow check --repair`) makes it look like a sweep: delete "
                            f"that file; check each run: gradflow check {url.rstrip('/')}/{own[0]}")
    for group in runs:
        name = group or "(run)"
        where = url if not group else f"{url} (group {group!r})"
        state = inspect_run(root.store, group, where)
        state.problems[:0] = [f"{key}: {problem}" for key, (problem, _)
                              in damaged_metadata(root.store, group).items()]
        partial = fs.glob(f"{path.rstrip('/')}/{group}/**/*.partial" if group
                          else f"{path.rstrip('/')}/**/*.partial")
        if partial and not state.problems:
            state.problems.append(f"{len(partial)} leftover *.partial file(s)")
        if not state.problems:
            cut = state.rowless_epochs
            lines.append(f"{name}: ok, {state.num_steps} steps, {state.num_epochs} epochs" + (
                f"; epochs {cut.start}-{cut.stop - 1} have step rows but no epoch row (a repair cut "
                f"them; a resumed Recorder gives them rows)" if cut else ""))
            continue
        report.damaged = True
        report.repairable |= len(state.problems) > len(state.unrecoverable)
        for problem in state.problems:
            lines.append(f"{name}: {problem}")
        report.unrepairable += [f"{name} {lost}" if group else lost for lost in state.unrecoverable]
        if repair:
            fixed = repair_run(url, group, state)
            kept = (f"kept {fixed.good_steps} of {fixed.num_steps} steps and {fixed.good_epochs} of "
                    f"{fixed.num_epochs} epochs")
            if fixed.set_aside:
                kept += (f"; {len(fixed.damaged_files)} chunk file(s) that do not decode moved to "
                         f"{fixed.set_aside}")
            if fixed.unrecoverable:
                lines.append(f"{name}: not repaired: {', '.join(fixed.unrecoverable)} cannot be "
                             f"rebuilt (no trusted copy holds them); the rest is repaired, {kept}")
            else:
                lines.append(f"{name}: repaired, {kept}")
    if repair and runs != [None] and not any(group_is_locked(fs, path, g) for g in runs):
        removed = fs.glob(f"{path.rstrip('/')}/*.partial")
        for p in removed:
            fs.rm_file(p)
        if removed:
            lines.append(f"deleted {len(removed)} leftover *.partial file(s) at the store root")
    return report

