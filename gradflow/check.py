"""Store invariants: what ``gradflow.open`` checks, ``gradflow check`` reports and ``--repair`` fixes.

A run's committed state (what the consolidated metadata at the store root publishes) must have:

- every ``step`` array (figures and coordinates) of one length, every ``epoch`` array of one length;
- strictly increasing ``step`` and ``epochs/epoch`` coordinates;
- every chunk stored up to the committed length (gradflow writes even chunks that hold only the
  fill value, so a missing chunk means lost data: without this check a deleted ``grad_norm`` chunk
  reads as 1,024 NaN rows and a deleted ``step`` chunk as 1,024 rows of step 0). Stores written
  before gradflow stored every chunk (no ``all_chunks_stored`` attr) are checked for ``step`` only.
  What a lost chunk held is known exactly for the coordinates the writer numbers itself
  (:func:`derived_coordinate`: row i is step i·every, epoch row i is epoch i), for the steps'
  ``epoch`` labels where ``num_steps`` gives them (:func:`epoch_labels`: every=1) and for
  ``num_steps`` where the step rows count it exactly (:func:`count_steps`).
  The derived summary (``summary/<b>``, :mod:`gradflow.summary`) is held to the same rule up to
  its committed number of blocks; a hole there loses nothing (the raw rows recompute it).
- every chunk stored of the arrays whose length is fixed at creation (first dimension not in
  :data:`GROWING`: the layer coordinates ``layer``, ``module_type``, ``depth``, ``num_params`` at
  the run and in ``epochs/``, ``param_group``, the summary's ``stat`` and ``layer``), in runs marked
  ``fixed_chunks_stored``. They are written once, at creation, so a lost chunk cannot be recounted
  from the step rows: its values are known only from an intact source that holds them
  (:func:`_fixed_values`: the run's ``fixed_coordinates`` attribute, ``depth`` i = i, the same array's
  other copies, e.g. ``epochs/layer``), and only when every source agrees with every stored row;
  else it is lost, and no repair makes the run whole. Older runs stored no chunk equal to the fill
  value (the ``depth`` [0] of a one-layer model): a missing chunk there is reported only when it
  cannot have held the fill value (a label: gradflow writes no empty one; values a source gives
  that are not all the fill value), so a healthy old store is never called damaged.

A stored chunk whose bytes do not decode (truncated, empty, garbage) is lost like a missing one:
``gradflow check`` and ``--repair`` decode every chunk (:func:`inspect_run` with ``decode``; about
4 s for a 0.9 GB store of 200,000 steps × 200 layers, 20× the listing, in 32 MiB reads); a
resumed Recorder decodes the last chunk row of each growing array (the one it appends to) and
the fixed arrays; ``gradflow.open`` only lists them. A repair moves such files out of the store
(:func:`gradflow.repair._set_aside`) and repairs them as missing chunks.

Apart from these, :func:`damaged_metadata` finds node metadata files (``<node>/zarr.json``) that are
missing or unreadable. Readers of the consolidated metadata (``gradflow.open``, xarray by default)
do not see that damage, so ``gradflow.open`` does not check it; a resumed Recorder, ``zarr.open_array``
and xarray with ``consolidated=False`` read those files, and ``gradflow check`` reports them.

:func:`gradflow.repair.repair_run` writes the lost chunks of float figures (:attr:`RunState.lost`) as NaN,
rebuilds the lost chunks of :func:`derived_coordinate` coordinates and of fixed-length arrays whose
values a source holds, recounts ``num_steps`` (or marks it lost: :data:`LOST_COUNT`), leaves a
fixed-length chunk that no source holds missing (:attr:`RunState.unrecoverable`: the run stays
damaged), truncates what else is damaged
to its longest consistent prefix (the last consistent commit),
republishes the run and deletes ``*.partial`` files that an interrupted atomic write left; it
rewrites damaged metadata files from their committed copy and trims the summary to before a hole.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from gradflow.errors import GradflowError


@dataclass
class RunState:
    """One run's committed lengths and the longest consistent prefix of each dimension."""

    where: str
    problems: list[str] = field(default_factory=list)
    num_steps: int = 0
    num_epochs: int = 0
    good_steps: int = 0
    good_epochs: int = 0
    good_summary: int = 0  # raw rows the summary covers before its first missing chunk
    # Epochs whose step rows are kept but whose epoch rows are not (a repair cut them): not damage,
    # a resumed Recorder gives them their rows (gradflow.store.RunStore._close_interrupted_epoch).
    rowless_epochs: range = range(0)
    # Chunks of float figures (NaN fill) that are missing: (array path, dimension, first row, end
    # row). Zarr reads them as NaN, so they cost only their own figures: repair writes them as NaN.
    lost: list[tuple[str, str, int, int]] = field(default_factory=list)
    # Missing chunks whose values are known all the same (the coordinates' numbering, num_steps
    # recounted; LOST_COUNT where not exact): (array path, dimension, first row, values).
    rebuilt: list[tuple[str, str, int, np.ndarray]] = field(default_factory=list)
    # Missing chunks of fixed-length arrays that no intact source holds ("./layer rows 0-1"): no
    # repair restores them (it leaves them missing and says the run is still damaged).
    unrecoverable: list[str] = field(default_factory=list)
    # Stored chunk files that do not decode (keys in the store): the repair moves them aside (to
    # gradflow.repair.damaged_folder) before it writes, and treats them as missing.
    damaged_files: list[str] = field(default_factory=list)
    set_aside: str = ""  # where the repair moved them


def every_chunk_stored(array: zarr.Array) -> zarr.Array:
    """``array`` with every chunk it writes stored, even one that holds only the fill value: what
    this module's checks take a missing chunk to mean damage by."""
    return array.with_config({"write_empty_chunks": True})


def open_root(url: str, **options) -> zarr.Group:
    """``zarr.open_group(url, **options)``; a root ``zarr.json`` that does not parse, or one missing
    from a folder that holds gradflow's groups, is a one-line :class:`~gradflow.errors.GradflowError`
    saying what is true (:func:`damaged_root`)."""
    damage = damaged_root(url)  # before zarr: mode "a" would write an empty root over the run
    if damage:
        raise root_error(url, damage)
    try:
        return zarr.open_group(url, **options)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise GradflowError(f"{url}: its zarr.json is damaged ({type(err).__name__}) and the "
                            f"folder holds no gradflow run or sweep") from None


def damaged_root(url: str) -> tuple[str, str, list[str]] | None:
    """``(problem, what to do, what no repair rebuilds)`` when the store's root ``zarr.json`` is
    missing or does not parse but its folder holds gradflow's groups: the store is damaged, not
    absent. A sweep's root (its folder holds run groups) is rewritten by ``gradflow check
    --repair`` (nothing lost), unless a metadata file of its runs is damaged too: its committed
    copy was in the root, and publishing the runs without it would hide that run's arrays. A run's
    own root held the run's settings and its last commit, which no repair rebuilds. None when the
    root is intact or the folder holds nothing of gradflow's, or holds runs that are stores of
    their own (:func:`gradflow.paths.folder_kind` ``"runs"``: a folder of runs, never a sweep,
    which nothing may turn into one)."""
    from gradflow.lock import filesystem
    from gradflow.paths import folder_kind

    fs, path = filesystem(url)
    path = path.rstrip("/")
    try:
        json.loads(fs.cat_file(f"{path}/zarr.json"))
        return None
    except FileNotFoundError:
        problem = "missing"
    except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError
        problem = f"damaged ({type(err).__name__})"
    kind = folder_kind(url)
    if kind == "sweep":
        unreadable = unreadable_metadata(fs, path)
        if not unreadable:
            return (problem, f"the folder holds a sweep's runs: `gradflow check {url} --repair` "
                             f"rewrites it", [])
        key, why = next(iter(unreadable.items()))
        return (problem, f"the folder holds a sweep's runs, but {key} is {why} too and its "
                         f"committed copy was in that file, so no repair rebuilds it: move "
                         f"{key.split('/')[0]}/ out of the store, then `gradflow check {url} "
                         f"--repair` rewrites the root for the other runs", list(unreadable))
    if kind == "run":
        return (problem, "the folder holds a gradflow run's arrays, but that file held the run's "
                         "settings and its last commit, which no repair rebuilds: restore it from a "
                         "backup, or read the arrays one by one with zarr.open_array", ["zarr.json"])
    return None


def unreadable_metadata(fs, path: str) -> dict[str, str]:
    """The node metadata files below the store's root (``<node>/zarr.json``, keys from the root)
    that do not parse as Zarr metadata, each with its problem (``damaged (JSONDecodeError)``)."""
    from zarr.core.group import GroupMetadata
    from zarr.core.metadata.v3 import ArrayV3Metadata

    found = {}
    for file in sorted(fs.glob(f"{path}/*/**/zarr.json")):
        try:
            document = json.loads(fs.cat_file(file))
            {"array": ArrayV3Metadata, "group": GroupMetadata}[document["node_type"]].from_dict(document)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            found[file.split(f"{path}/", 1)[-1]] = f"damaged ({type(err).__name__})"
    return found


def root_error(url: str, damage: tuple[str, str, list[str]]) -> GradflowError:
    """The one-line error for a :func:`damaged_root`."""
    return GradflowError(f"{url} is a damaged gradflow store: its root zarr.json is {damage[0]}; "
                         f"{damage[1]}")


def _committed(zstore, group: str | None):
    root = zarr.open_group(zstore, mode="r")  # the consolidated view when there is one
    return root[group] if group else root


def _keys(zstore, prefix: str) -> set[str]:
    async def collect():
        return {key async for key in zstore.list_prefix(prefix)}

    return sync(collect())


class Hole(NamedTuple):
    """A chunk row (the chunks of the same rows across the other dimensions) that lost its values:
    rows ``[first, end)``, what happened (``says``: "is missing", "is damaged (…)") and the keys of
    its chunk files that exist but do not decode (``files``: a repair moves them aside)."""

    first: int
    end: int
    says: str
    files: tuple[str, ...] = ()


DECODE_BYTES = 2**25
"""How many bytes of chunks the decoding check reads at a time (32 MiB: 8 chunk rows of the
step figures at 1,024 layers): what it holds in memory, whatever the store's size."""


def _holes(zstore, keys: set[str], array, length: int, missing: bool = True, decode: bool = True,
           decode_from: int = 0) -> list[Hole]:
    """The chunk rows below ``length`` that lost a chunk: one ``missing`` (not in ``keys``, the
    run's listed files: :func:`_keys`; only when
    ``missing``: an older writer left out chunks of the fill value) or one stored whose bytes do
    not decode (``decode``: truncated, empty, garbage; every stored chunk holding rows from
    ``decode_from`` on is decoded, a few chunk rows at a time, :data:`DECODE_BYTES`). Empty when
    all are stored and intact."""
    if length == 0:
        return []
    chunks = array.metadata.chunk_grid.chunk_shape
    grid = [range(math.ceil(s / c)) for s, c in zip(array.shape[1:], chunks[1:])]
    n_rows = math.ceil(length / chunks[0])
    undecodable = {}
    if decode:
        row_bytes = chunks[0] * math.prod(array.shape[1:]) * np.dtype(array.dtype).itemsize
        step = max(1, DECODE_BYTES // max(row_bytes, 1))
        for i in range(min(decode_from // chunks[0], n_rows - 1), n_rows, step):
            try:
                array[i * chunks[0]:min((i + step) * chunks[0], length)]
            except OSError:  # cannot read it (permissions, I/O): not damage this check can name
                raise
            except Exception:  # noqa: BLE001 - a codec's error: find the chunks that caused it
                for coords in itertools.product(range(i, min(i + step, n_rows)), *grid):
                    key = f"{array.path}/{array.metadata.encode_chunk_key(coords)}"
                    if key in keys and (why := _undecodable(zstore, array, coords, key)):
                        undecodable.setdefault(coords[0], {})[key] = why
    holes = []
    for i in range(n_rows):
        absent = missing and any(f"{array.path}/{array.metadata.encode_chunk_key((i, *other))}"
                                 not in keys for other in itertools.product(*grid))
        damaged = undecodable.get(i, {})
        if absent or damaged:
            says = "is missing" if absent else "is damaged ({}: {})".format(*next(iter(damaged.items())))
            holes.append(Hole(i * chunks[0], min((i + 1) * chunks[0], length), says, tuple(damaged)))
    return holes


def _undecodable(zstore, array, coords: tuple[int, ...], key: str) -> str | None:
    """Why the stored chunk ``coords`` of ``array`` does not decode (its size and the codec's
    error; a checksum that does not match says so in words), or None when it does."""
    try:
        array.get_block_selection(coords)
    except OSError:  # cannot read it (permissions, I/O): not damage this check can name
        raise
    except Exception as err:  # noqa: BLE001 - any codec's error: the bytes are not a chunk
        size = sync(zstore.getsize(key))
        if checksum_failed(err):
            return f"{size} bytes whose CRC-32C checksum does not match (changed on disk)"
        return f"{size} bytes that do not decode, {type(err).__name__}: {err}"
    return None


def _frames(err: BaseException):
    """The frames ``err`` passed through, from where it was caught to where it was raised."""
    tb = err.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def checksum_failed(err: BaseException) -> bool:
    """Whether ``err`` is zarr's ``crc32c`` codec finding that a chunk's bytes no longer match the
    checksum stored with them (every array gradflow writes ends in it): the file changed on disk.
    Its message shows both checksums as raw bytes, which tell a person nothing."""
    return isinstance(err, ValueError) and any(
        frame.f_globals.get("__name__") == "zarr.codecs.crc32c_" for frame in _frames(err))


def undecodable_chunk(err: BaseException) -> bool:
    """Whether ``err`` was raised by a Zarr codec decoding a chunk's bytes (a truncated, empty,
    garbage or changed chunk file: ``gradflow.open`` lists chunks but does not decode them)."""
    return any(frame.f_globals.get("__name__", "").startswith(("numcodecs.", "zarr.codecs."))
               for frame in _frames(err))


def decode_error(err: BaseException, url: str | None = None) -> GradflowError | None:
    """The one-line error for a chunk of the store at ``url`` that exists but does not decode
    (:func:`undecodable_chunk`), met while reading it: damage, said as a missing chunk is
    (:func:`refuse_damaged`), naming the array where zarr's frames show it and ``gradflow check``,
    which names the chunk; None for any other ``err``."""
    if not undecodable_chunk(err):
        return None
    from gradflow.paths import sweep_member

    array = next((path for frame in _frames(err)  # zarr's selection frames hold its StorePath
                  if (path := getattr(frame.f_locals.get("store_path"), "path", None)) is not None), None)
    what = ("does not match its CRC-32C checksum (changed on disk)" if checksum_failed(err) else
            f"does not decode ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})")
    where = f"{_label_of(array)}: a chunk" if isinstance(array, str) and array else "a chunk"
    if url is None:
        return GradflowError(f"the store is damaged: {where} {what}; `gradflow check STORE` names "
                             f"it and `gradflow check STORE --repair` repairs it")
    url = (sweep_member(url) or (url,))[0]  # a sweep's group is checked through its sweep
    return GradflowError(f"{url} is damaged: {where} {what}; `gradflow check {url}` names it and "
                         f"`gradflow check {url} --repair` repairs it")


@contextlib.contextmanager
def reading(url: str):
    """Turn a chunk of the store at ``url`` that does not decode, met by the reads in the block,
    into :func:`decode_error`'s one-line GradflowError; any other error passes as it is."""
    try:
        yield
    except Exception as err:
        error = decode_error(err, url)
        if error is None:
            raise
        raise error from None


def _label_of(path: str) -> str:
    """:func:`_label` of the array at ``path`` in its store (``./grad_norm``, ``v1/grad_norm``)."""
    parent, _, name = path.rpartition("/")
    return f"{parent or '.'}/{name}"


GROWING = ("step", "epoch", "block")
"""The dimensions a run's arrays grow along (``block``: the summary's); an array whose first
dimension is another one (``layer``, ``param_group``, ``stat``) is written once, at creation."""


def _stored(length: int, holes: list[Hole]) -> np.ndarray:
    """Which of ``length`` rows are stored and intact, given the holes."""
    stored = np.ones(length, dtype=bool)
    for hole in holes:
        stored[hole.first:hole.end] = False
    return stored


def _label(array) -> str:
    """How a report names an array: its path in the store, ``./name`` at the root."""
    return _label_of(array.path)


def _fixed_copies(node) -> dict[tuple[str, int], list]:
    """The run's fixed-length arrays (first dimension not in :data:`GROWING`), in its group and its
    subgroups, by (name, length): the copies of one coordinate (``layer`` is stored at the run, in
    ``epochs/`` and in each summary level)."""
    copies: dict[tuple[str, int], list] = {}
    members = sorted(node.members(max_depth=None), key=lambda m: (m[0].count("/"), m[0]))  # run first
    for _, member in members:
        if isinstance(member, zarr.Array) and member.ndim \
                and (member.metadata.dimension_names or (None,))[0] not in GROWING:
            copies.setdefault((member.path.rsplit("/", 1)[-1], member.shape[0]), []).append(member)
    return copies


def _fixed_values(name: str, length: int, copies: list, holes: dict, table: dict,
                  every: object) -> tuple[np.ndarray, list[str], str]:
    """The values of a fixed-length coordinate from every source that holds them: its numbering
    (:func:`derived_coordinate`), the run's ``fixed_coordinates`` attribute, each copy's stored rows.

    Returns (values, source labels, why): ``values`` an object array, None where no source holds
    the row, and all None when two sources disagree on a row (nothing proves which is right; ``why``
    says where). ``source labels`` name the sources in the order that fills each row first.
    """
    everywhere = np.ones(length, dtype=bool)
    sources = []
    derived = derived_coordinate(name, length, every)
    if derived is not None:
        sources.append(("its numbering: row i is i", derived, everywhere))
    if isinstance(table.get(name), list) and len(table[name]) == length:
        sources.append(("the run's fixed_coordinates attribute", np.array(table[name], dtype=object),
                        everywhere))
    for array in copies:
        stored = _stored(length, holes[array.path])
        if stored.any():
            sources.append((_label(array), _read(array, length, holes[array.path]), stored))
    values, origin = np.full(length, None, dtype=object), np.full(length, -1)
    for i, (label, held, rows) in enumerate(sources):
        held = np.asarray(held).astype(object)
        both = np.flatnonzero(rows & (origin >= 0))
        clash = both[values[both] != held[both]] if len(both) else both
        if len(clash):
            row = int(clash[0])
            return (np.full(length, None, dtype=object), [],
                    f"{sources[origin[row]][0]} and {label} disagree at row {row}")
        fresh = rows & (origin < 0)
        values[fresh], origin[fresh] = held[fresh], i
    return values, [sources[i][0] if i >= 0 else "" for i in origin], "no intact copy holds it"


def _inspect_fixed(zstore, keys: set[str], node, state: RunState, decode: bool) -> None:
    """Report the missing chunks of the run's fixed-length arrays (module docstring), each with the
    values a repair writes (``state.rebuilt``) or as lost (``state.unrecoverable``)."""
    marked = bool(node.attrs.get("fixed_chunks_stored"))
    table = node.attrs.get("fixed_coordinates")
    table = table if isinstance(table, dict) else {}
    for (name, length), copies in _fixed_copies(node).items():
        holes = {array.path: _holes(zstore, keys, array, length, decode=decode) for array in copies}
        if not any(holes.values()):
            continue
        values, origins, why = _fixed_values(name, length, copies, holes, table,
                                             node.attrs.get("every"))
        for array in copies:
            label, dim = _label(array), array.metadata.dimension_names[0]
            for first, end, says, files in holes[array.path]:
                held = values[first:end]
                known = not any(v is None for v in held)
                # An older writer left out a chunk that held only the fill value, when its values
                # say so. Unknown values cannot be that: the labels are never empty and depth is
                # known; num_params is never all 0, since every layer owns a parameter.
                if not marked and not files and known \
                        and all(v == array.metadata.fill_value for v in held):
                    continue
                state.damaged_files += files
                if known:
                    used = " and ".join(dict.fromkeys(origins[first:end]))
                    state.problems.append(f"{label}: chunk of rows {first}-{end - 1} {says} "
                                          f"(--repair rebuilds it from {used})")
                    state.rebuilt.append((array.path, dim, first,
                                          np.array(held.tolist(), dtype=array.dtype)))
                else:
                    state.problems.append(f"{label}: chunk of rows {first}-{end - 1} {says} and "
                                          f"lost ({why}); --repair cannot rebuild it")
                    state.unrecoverable.append(f"{label} rows {first}-{end - 1}")


def _reads_as_unknown(array, dim: str) -> bool:
    """A float figure whose fill value is NaN: a missing chunk reads as "unknown", not as made-up
    values (unlike the coordinate, ``skipped`` or counts, whose fill values would pass for data)."""
    fill = array.metadata.fill_value
    return (array.path.rsplit("/", 1)[-1] != dim and np.dtype(array.dtype).kind == "f"
            and fill is not None and bool(np.isnan(fill)))


LOST_COUNT = -1
"""What ``epochs/num_steps`` holds for an epoch whose step count is lost (no exact recount): the
array's ``lost_rows`` attribute lists those rows and its ``missing_value`` attribute (the CF
convention) makes xarray read them as NaN."""


def count_steps(labels: np.ndarray, epochs: np.ndarray, every: object, complete: float,
                restarts: list = ()) -> np.ndarray:
    """``num_steps`` of ``epochs`` recounted from the recorded steps' epoch labels ``labels``.

    Exact only where every optimizer step is a row (``every=1``: the Recorder counts in num_steps
    exactly the steps it makes rows of) and all of the epoch's rows are at hand (epochs below
    ``complete``); LOST_COUNT elsewhere. With every=k>1 a row stands for k steps and an epoch may
    end anywhere between two recorded steps, so a count from rows would be off by up to k−1 steps:
    it is marked lost, never estimated. ``restarts`` (the run's ``step_restarts``: a repair cut the
    step rows from ``row`` on) makes the epochs from that of row ``row - 1`` up to that of row
    ``row`` lost too: their cut steps have no rows.
    """
    counts = np.full(len(epochs), LOST_COUNT, dtype=np.int64)
    if every == 1:
        ordered = np.sort(labels)
        exact = epochs < complete
        for row, _ in restarts:
            if 0 < row <= len(labels):
                exact &= ~((epochs >= labels[row - 1])
                           & (epochs < (labels[row] if row < len(labels) else math.inf)))
        counts[exact] = (np.searchsorted(ordered, epochs[exact], side="right")
                         - np.searchsorted(ordered, epochs[exact], side="left"))
    return counts


def lost_ranges(first: int, counts: np.ndarray) -> list[list[int]]:
    """The row ranges ``[a, b)`` where ``counts`` (rows ``first`` on) is LOST_COUNT."""
    lost = np.flatnonzero(counts == LOST_COUNT)
    if not len(lost):
        return []
    breaks = np.flatnonzero(np.diff(lost) > 1)
    starts, ends = np.r_[lost[0], lost[breaks + 1]], np.r_[lost[breaks], lost[-1]] + 1
    return [[first + int(a), first + int(b)] for a, b in zip(starts, ends)]


def epoch_labels(steps: np.ndarray, labels: np.ndarray, stored: np.ndarray, counts: np.ndarray,
                 restarts: list = ()) -> np.ndarray | None:
    """The steps' epoch labels with the lost rows (not ``stored``) filled in from the epochs' step
    counts, or None where those do not give every lost row or a stored row disagrees with them.

    With every=1 every optimizer step is a row and epoch e's ``num_steps`` (``counts[e]``; epoch row
    e is epoch e) are its steps, so epoch e holds steps ``[starts[e], starts[e+1])``, ``starts`` the
    running sum of ``counts`` from 0: a resumed run goes on from the steps it counted, and an epoch
    cut short gets its row on resume with the steps it had. ``steps``: the rows' step numbers (-1
    where unknown); ``labels``: the stored labels (read where not ``stored``); ``counts``: -1 where
    unknown (lost, or its chunk is). From the first epoch ``u`` whose count is unknown (past the
    last epoch row: the unfinished epoch) a row's label is only known to be ``u`` or later: a lost
    one is ``u`` when a stored row after it says ``u`` (labels never decrease; a repair may have cut
    the later epochs' rows). Where ``restarts`` (``step_restarts``: a repair cut the rows from
    ``row`` on, a resumed run went on at ``step``), the steps before ``step`` that have no row may
    belong to an epoch whose ``num_steps`` counts only the resumed ones, so the rows from ``row`` on
    are given only when the stored label of row ``row`` is an epoch that starts at ``step``.
    """
    unknown = np.flatnonzero(counts < 0)
    end = int(unknown[0]) if len(unknown) else len(counts)  # the first epoch of unknown length
    starts = np.r_[0, np.cumsum(counts[:end])]
    expected = np.searchsorted(starts, steps, side="right") - 1
    expected[steps < 0] = -1
    for (row, step), stop in zip(restarts, [row for row, _ in restarts[1:]] + [len(steps)]):
        label = int(labels[row]) if row < len(steps) and stored[row] else -1
        if not (0 <= label < len(starts) and starts[label] == step and expected[row] == label):
            expected[row:stop] = -1  # (its stored rows are not checked either)
    said = np.flatnonzero(stored & (labels == end))
    later = (expected == end) & (np.arange(len(steps)) > (said[-1] if len(said) else -1))
    exact = (expected >= 0) & ~later
    if np.any(~stored & ~exact) or np.any(stored & exact & (labels != expected)) \
            or np.any(stored & later & (labels < end)):
        return None
    return np.where(stored, labels, expected)


def derived_coordinate(name: str, length: int, every: object,
                       restarts: list = ()) -> np.ndarray | None:
    """The values the writer's own numbering gives a coordinate, or None for one it does not number.

    ``step``: row i is step i·every. The Recorder counts every optimizer step from 0, continues the
    count on resume (from ``steps_seen``: the steps counted when its rows were committed) and
    records a row when step % every == 0, so the rows are the multiples of ``every``, none left
    out, but where a repair cut rows: their step numbers are never given again (a step number
    means one step), the resumed rows go on from ``steps_seen``, and the run's ``step_restarts``
    attribute says so, [row, step] for each: from row ``row`` on, row i is step + (i − row)·every.
    ``epoch`` (of the ``epochs`` group): row i is
    epoch i, the i-th ``end_epoch`` (a resume continues after the last epoch row, and gives an epoch
    cut short by a crash its row first). ``depth``: row i is layer i (registration order). These
    hold for what gradflow writes; the caller checks them against the stored rows before it trusts
    them for a lost chunk.
    """
    if name == "step" and isinstance(every, int) and every >= 1:
        values = np.arange(length, dtype=np.int64) * every
        for row, step in restarts:
            values[row:] = step + np.arange(max(length - row, 0), dtype=np.int64) * every
        return values
    if name in ("epoch", "depth"):
        return np.arange(length, dtype=np.int64)
    return None


def _rebuilt_values(array, name: str, length: int, holes: list[Hole], every: object,
                    restarts: list) -> np.ndarray | None:
    """The coordinate's values, lost chunks included, when :func:`derived_coordinate` gives them and
    every stored row agrees with it (else None: nothing proves what the lost rows held)."""
    expected = derived_coordinate(name, length, every, restarts)
    if expected is None:
        return None
    stored = _stored(length, holes)
    return expected if np.array_equal(_read(array, length, holes)[stored], expected[stored]) else None


def _rebuilt_labels(zstore, keys: set[str], node, array, length: int, holes: list[Hole],
                    decode: bool) -> np.ndarray | None:
    """The steps' epoch labels, lost chunks included, when the epochs' step counts give them
    (:func:`epoch_labels`: ``every=1``, and ``epochs/epoch`` row i is epoch i) for every lost row
    and every stored row they give agrees (else None: nothing proves what the lost rows held)."""
    epochs = node["epochs"]
    if node.attrs.get("every") != 1 or "step" not in node or "num_steps" not in epochs:
        return None
    restarts = node.attrs.get("step_restarts", [])

    def known(array, length: int, name: str = "") -> np.ndarray:  # its rows, -1 where lost
        lost = _holes(zstore, keys, array, length, decode=decode)
        rebuilt = _rebuilt_values(array, name, length, lost, 1, restarts) if lost and name else None
        return rebuilt if rebuilt is not None else np.where(_stored(length, lost),
                                                            _read(array, length, lost), -1)

    n = min(a.shape[0] for _, a in epochs.arrays() if a.metadata.dimension_names[0] == "epoch")
    numbers = known(epochs["epoch"], n)
    if np.any((numbers >= 0) & (numbers != np.arange(n))):
        return None
    steps = np.full(length, -1, dtype=np.int64)
    stop = min(length, node["step"].shape[0])
    steps[:stop] = known(node["step"], stop, "step")
    return epoch_labels(steps, _read(array, length, holes), _stored(length, holes),
                        known(epochs["num_steps"], n), restarts)


def _read(array, length: int, holes: list[Hole]) -> np.ndarray:
    """The array's first ``length`` rows, its holes read as the fill value (zarr reads a missing
    chunk so; one that does not decode is not read)."""
    if not any(hole.files for hole in holes):
        return array[:length]
    parts, start = [], 0
    for hole in [*holes, Hole(length, length, "")]:
        parts.append(array[start:hole.first])
        parts.append(np.full((hole.end - hole.first, *array.shape[1:]), array.metadata.fill_value,
                             dtype=parts[0].dtype))
        start = hole.end
    return np.concatenate(parts)


def _recount(node, state: RunState, epochs: np.ndarray, every: object,
             labels: np.ndarray | None = None) -> np.ndarray:
    """:func:`count_steps` of ``epochs`` from the run's kept step rows (``state.good_steps``; their
    epoch ``labels`` where a lost chunk of them is rebuilt, else as stored). A committed epoch
    row's steps were committed with it or before, so with every step row kept each epoch has all
    of its rows; with rows cut, only the epochs before the last kept row's label."""
    if labels is None:
        labels = node["epoch"] if "epoch" in node else np.zeros(0, dtype=np.int64)
    labels = labels[:state.good_steps]
    complete = (math.inf if state.good_steps == state.num_steps
                else int(labels[-1]) if len(labels) else 0)
    return count_steps(labels, epochs, every, complete, node.attrs.get("step_restarts", []))


def _increasing_prefix(values: np.ndarray) -> int:
    """Length of the longest strictly increasing prefix."""
    if len(values) < 2:
        return len(values)
    bad = np.flatnonzero(np.diff(values) <= 0)
    return int(bad[0]) + 1 if len(bad) else len(values)


def inspect_run(zstore, group: str | None, where: str, decode: bool | str = True) -> RunState:
    """Check one run's committed state against the invariants (reads ``step``/``epoch`` values);
    ``decode``: decode every stored chunk too, a few at a time (a chunk whose bytes do not decode
    is lost like a missing one); ``"tail"``: only what a resumed writer reads or appends to (per
    growing array its last chunk row, and the step rows its summary has not covered: at most
    ``summary.SPAN``), and the fixed arrays (a few kB), whatever the run's length. Without it a
    chunk file that is truncated, empty or garbage passes (``gradflow.open`` checks so: it reads
    only the listing)."""
    node = _committed(zstore, group)
    summarised = 0  # with decode="tail": the step rows before it are not decoded
    summary = node.get("summary")
    if decode == "tail" and isinstance(summary, zarr.Group):
        try:  # the summary covers whole spans (gradflow.summary.SPAN): its chunks' rows, in steps
            level = summary.attrs["levels"][0]
            span = summary[str(level)]["first_step"].metadata.chunk_grid.chunk_shape[0] * level
            summarised = int(summary.attrs.get("rows", 0)) // span * span
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            summarised = 0  # a summary of unknown layout: decode every row
    state = RunState(where)
    keys = _keys(zstore, f"{node.path}/" if node.path else "")  # one listing of the run's files
    all_chunks = bool(node.attrs.get("all_chunks_stored"))
    every = node.attrs.get("every")
    labels = None  # the steps' epoch labels, when a lost chunk of them is rebuilt
    for dim, parent in (("step", node), ("epoch", node["epochs"])):
        arrays = {name: a for name, a in parent.arrays() if a.metadata.dimension_names[0] == dim}
        lengths = {name: a.shape[0] for name, a in arrays.items()}
        n = max(lengths.values(), default=0)
        good = min(lengths.values(), default=0)
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{k} {v}" for k, v in sorted(lengths.items(), key=lambda kv: kv[1]))
            state.problems.append(f"{dim} arrays of unequal length ({shown})")
        coord = arrays.get(dim)
        values = None  # the coordinate's values, when a lost chunk of it is rebuilt
        for name, array in arrays.items():
            # Before all_chunks_stored a missing chunk is damage only in the coordinate.
            listed = all_chunks or (name == dim and n > 1)
            if not (listed or decode):
                continue
            holes = _holes(zstore, keys, array, lengths[name], missing=listed, decode=bool(decode),
                           decode_from=(0 if decode is True else summarised if dim == "step"
                                        else lengths[name]))
            label = _label(array)
            for hole in holes:
                state.damaged_files += hole.files
            rebuilt = (_rebuilt_values(array, name, lengths[name], holes, every,
                                       node.attrs.get("step_restarts", []))
                       if holes and name == dim else
                       _rebuilt_labels(zstore, keys, node, array, lengths[name], holes, bool(decode))
                       if holes and name == "epoch" else None)  # (the steps' epoch labels)
            if holes and _reads_as_unknown(array, dim):
                for first, end, says, _ in holes:
                    state.problems.append(f"{label}: chunk of rows {first}-{end - 1} {says} "
                                          f"(its figures are lost: NaN)")
                    state.lost.append((array.path, dim, first, end))
            elif rebuilt is not None:
                if name == dim:
                    values = rebuilt
                    rule = "row i is " + ("epoch i" if dim == "epoch" else f"step i·{every}" + "".join(
                        f", from row {row} on step {step} + (i − {row})·{every}"
                        for row, step in node.attrs.get("step_restarts", [])))
                else:
                    labels = rebuilt
                    rule = "epochs/num_steps give each row's epoch"
                for first, end, says, _ in holes:
                    state.problems.append(f"{label}: chunk of rows {first}-{end - 1} {says} "
                                          f"({rule}: --repair rebuilds it)")
                    state.rebuilt.append((array.path, dim, first, rebuilt[first:end]))
            elif holes and name == "num_steps":
                for first, end, says, _ in holes:
                    counts = _recount(node, state, np.arange(first, end), every, labels)
                    lost = int(np.sum(counts == LOST_COUNT))
                    why = (f"every={every}: a row stands for {every} steps" if every != 1
                           else "their step rows are cut")
                    state.problems.append(
                        f"{label}: chunk of rows {first}-{end - 1} {says} (--repair recounts "
                        + (f"all {len(counts)} from the step rows)" if not lost else
                           f"{len(counts) - lost} from the step rows; {lost} cannot be counted "
                           f"exactly ({why}) and are marked lost: NaN)"))
                    state.rebuilt.append((array.path, dim, first, counts))
            elif holes:
                first, end, says, _ = holes[0]
                state.problems.append(f"{label}: chunk of rows {first}-{end - 1} {says}")
                good = min(good, first)
        if coord is not None and good > 1:
            values = coord[:good] if values is None else values[:good]
            prefix = _increasing_prefix(values)
            if prefix < good:
                state.problems.append(f"{dim} is not strictly increasing at row {prefix} "
                                      f"({values[prefix - 1]} then {values[prefix]})")
                good = prefix
        if dim == "step":
            state.num_steps, state.good_steps = n, good
        else:
            state.num_epochs, state.good_epochs = n, good
    if labels is None and "epoch" in node:
        labels = node["epoch"]
    last_label = int(labels[state.good_steps - 1]) if state.good_steps and labels is not None else -1
    if last_label > state.good_epochs:  # (only the last may be an epoch cut short by a crash)
        state.rowless_epochs = range(state.good_epochs, last_label + 1)
    _inspect_fixed(zstore, keys, node, state, bool(decode))
    # The summary of lost rows describes figures the raw rows no longer hold: trimmed there too.
    state.good_summary = min([state.good_steps] + [a for _, dim, a, _ in state.lost if dim == "step"])
    summary = node.get("summary") if all_chunks else None
    if isinstance(summary, zarr.Group) and summary.attrs.get("gradflow_kind") == "summary":
        for level in summary.attrs.get("levels", []):
            for name, array in summary[str(level)].arrays():
                if array.metadata.dimension_names[0] != "block":
                    continue
                holes = _holes(zstore, keys, array, array.shape[0], decode=bool(decode),
                               decode_from=0 if decode is True else array.shape[0])
                for first, end, says, files in holes[:1]:
                    state.problems.append(f"{array.path}: chunk of blocks {first}-{end - 1} {says}")
                    state.good_summary = min(state.good_summary, first * int(level))
                for hole in holes:
                    state.damaged_files += hole.files
    return state


def damaged_metadata(zstore, group: str | None) -> dict[str, tuple[str, object]]:
    """A run's node metadata files (``<node>/zarr.json``) that are missing or unreadable, each with
    its problem and the committed copy (from the consolidated metadata) that can replace it."""
    try:
        node = _committed(zstore, group)
    except KeyError:
        return {}
    consolidated = node.metadata.consolidated_metadata
    if consolidated is None:
        return {}
    nodes = {f"{node.path}/{key}".lstrip("/"): meta
             for key, meta in consolidated.flattened_metadata.items()}
    if group:
        nodes[node.path] = node.metadata
    keys = [f"{path}/zarr.json" for path in nodes]

    async def read():
        return await asyncio.gather(*(zstore.get(key, prototype=default_buffer_prototype())
                                      for key in keys))

    damaged = {}
    for key, meta, buffer in zip(keys, nodes.values(), sync(read())):
        problem = _metadata_problem(buffer, meta)
        if problem:
            damaged[key] = (problem, meta)
    return damaged


def _metadata_problem(buffer, meta) -> str | None:
    if buffer is None:
        return "missing"
    try:
        document = json.loads(buffer.to_bytes())
        if document.get("node_type") != meta.node_type:
            return f"damaged (not {meta.node_type} metadata)"
        type(meta).from_dict(document)
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # JSONDecodeError, Unicode…
        return f"damaged ({type(err).__name__})"
    return None


def refuse_damaged(zstore, group: str | None, where: str, url: str, resume: bool = False) -> None:
    """Raise a one-line GradflowError when the run is damaged, naming its first damage and what
    mends it: ``gradflow check URL --repair``, unless it lost values that no repair rebuilds (the
    layer table). Every chunk is listed; none is decoded when opening (``gradflow.open`` costs the
    same at any length; reading a chunk that does not decode fails with the codec's error, which
    the CLI says in one line); ``resume``: the chunks a resumed writer appends to are decoded too
    (``decode="tail"``: a crash mid-write tears those), and a run that lost what no repair
    rebuilds cannot be resumed at all. ``gradflow check`` decodes them all."""
    with _quiet_zarr():  # a run being written holds *.partial files, which zarr notes when listing
        state = inspect_run(zstore, group, where, decode="tail" if resume else False)
    if state.unrecoverable and resume:
        first = next(p for p in state.problems if "cannot rebuild" in p)
        raise GradflowError(f"{where} is damaged ({first}); no repair rebuilds what it lost, so it "
                            f"cannot be resumed: record into a new store or group (`gradflow check "
                            f"{url}` lists the damage)")
    if state.unrecoverable:
        raise GradflowError(f"{where} is damaged: {state.problems[0]}; `gradflow check {url}` lists "
                            f"what no repair can rebuild")
    if state.problems and resume:
        raise GradflowError(f"{where} is damaged ({state.problems[0]}); run `gradflow check {url} "
                            f"--repair` first")
    if state.problems:
        raise GradflowError(f"{where} is damaged: {state.problems[0]}; `gradflow check {url} --repair`"
                            f" repairs it (see `gradflow check --help`)")


def refuse_damaged_metadata(zstore, group: str | None, where: str, url: str) -> None:
    """Raise a one-line GradflowError when a node metadata file of the run is missing or unreadable
    (:func:`damaged_metadata`): zarr reads those files, so a run is not resumed before a repair."""
    for key, (problem, _) in damaged_metadata(zstore, group).items():
        raise GradflowError(f"{where} is damaged ({key}: {problem}); run `gradflow check {url} "
                            f"--repair` first")


@contextlib.contextmanager
def _quiet_zarr():
    """Silence zarr's note that consolidated metadata is not in the v3 spec, for one call.

    A local filter, not one set at import: test runners reset filters (and ``-W error`` would turn
    the note into an exception in the user's program). The filter matches only that message.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part",
                                category=UserWarning)
        # ... and listing a group whose folder holds a *.partial file that a kill left behind
        # (`gradflow check --repair` deletes them)
        warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component",
                                category=UserWarning)
        yield


def runs_of(root) -> list[str | None]:
    """The run groups of an opened store: [None] for a run at the root, else the sweep's groups."""
    if root.attrs.get("gradflow_kind") == "run":
        return [None]
    return sorted(name for name, child in root.groups() if child.attrs.get("gradflow_kind") == "run")
