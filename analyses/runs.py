"""One view of whatever a user opened: a single run, a sweep, or a bare Dataset, as ``{name: Dataset}``.

Every analysis takes "an xarray object": ``gradflow.open(store)`` of a sweep (an ``xarray.DataTree``
whose children are variants, each with an ``epochs`` child), a single-run store opened as a tree
(root = step-level data, child ``epochs``), or one ``xarray.Dataset`` with a ``step`` or ``epoch``
dimension. :func:`runs` maps all of them to the same ``{run name: Dataset}`` dictionary so the
analyses never care which one they got.

Step-level arrays can be large (10⁵ steps × 300 layers), so :func:`segment_mean` reads them in
blocks of whole steps, never all at once.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator

import numpy as np
import xarray as xr

from gradflow.errors import GradflowError
from gradflow.models.naming import stage_of

LEVELS = ("epoch", "step")


def natural_key(name: str) -> list:
    """Sort key that puts ``d3`` before ``d11`` (digits compare as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def runs(data: xr.Dataset | xr.DataTree, level: str = "epoch") -> dict[str, xr.Dataset]:
    """Return ``{run name: Dataset}`` at ``level`` ("epoch": dims (epoch, layer); "step": (step, layer)).

    A DataTree node is a run when it holds step-level data or has an ``epochs`` child; runs lacking
    the requested level (e.g. a variant interrupted before its first epoch) are left out. Names are
    the group paths (the root run is called ``"run"``), in natural sort order.
    """
    if level not in LEVELS:
        raise GradflowError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    if isinstance(data, xr.Dataset):
        if level not in data.dims:
            hint = " (open the store's 'epochs' group for epoch-level data)" if level == "epoch" else ""
            raise GradflowError(f"this dataset has no '{level}' dimension{hint}")
        return {"run": data}
    if not isinstance(data, xr.DataTree):
        raise GradflowError(f"expected an xarray Dataset or DataTree, got {type(data).__name__}")
    found = {}
    for node in data.subtree:
        has_steps = any("step" in var.dims for var in node.data_vars.values())
        if not has_steps and "epochs" not in node.children:
            continue
        if level == "epoch":
            if "epochs" not in node.children:
                continue
            # A child group inherits its parent's indexes (``step``, ``layer``); keep ``layer`` only.
            ds = node["epochs"].to_dataset().drop_dims("step", errors="ignore")
        else:
            ds = node.to_dataset()
        if level in ds.dims:
            found[node.path.strip("/") or "run"] = ds
    return {name: found[name] for name in sorted(found, key=natural_key)}


def run_attrs(data: xr.Dataset | xr.DataTree) -> dict[str, dict]:
    """``{run name: attrs}`` of every run :func:`runs` finds (the step-level group's attrs, where the
    Recorder writes ``optimizers`` and the user ``metadata``; a bare Dataset: its own attrs)."""
    if isinstance(data, xr.Dataset):
        return {"run": dict(data.attrs)}
    if not isinstance(data, xr.DataTree):
        raise GradflowError(f"expected an xarray Dataset or DataTree, got {type(data).__name__}")
    names = {*runs(data, "epoch"), *runs(data, "step")}
    found = {node.path.strip("/") or "run": dict(node.attrs) for node in data.subtree}
    return {name: found[name] for name in sorted(names, key=natural_key)}


def optimizer_of(attrs: dict) -> tuple[str, float]:
    """(optimizer class, learning rate) recorded by the Recorder, e.g. ``("SGD", 0.01)``; several
    optimizers are joined with ``+``; ``("", nan)`` when the store does not say."""
    recorded = attrs.get("optimizers") or []
    names = "+".join(str(o.get("class", "")) for o in recorded)
    rates = [g.get("lr") for o in recorded for g in o.get("param_groups", [])]
    rates = [r for r in rates if isinstance(r, (int, float))]
    return names, float(rates[0]) if rates and len(set(rates)) == 1 else float("nan")


def select_layers(ds: xr.Dataset, layers: str | list[str] = "auto", module_type: str | None = None) -> xr.Dataset:
    """Keep the layers to plot, in input-to-output order (the ``depth`` coordinate).

    ``layers``: ``"auto"`` (for an FCN store, whose layer names follow the ``down``/``across``/``up``
    scheme, only the convolutions, like the paper's Fig. 4; for any other model every layer),
    ``"all"``, a list of exact layer names, or a name pattern: comma-separated shell globs matched
    against the whole qualified name (``"layer3.*"``, ``"blocks.*.attn.*,lm_head"``).
    ``module_type``: comma-separated module class names (``"Linear"``, ``"Conv2d,Linear"``), exact.
    A filter that keeps no layer is a :class:`GradflowError` naming what there is.
    """
    names = [str(n) for n in ds["layer"].values.tolist()]
    if isinstance(layers, list):
        missing = sorted(set(layers) - set(names))
        if missing:
            raise GradflowError(f"unknown layer(s): {', '.join(missing)}")
        ds = ds.sel(layer=layers)
    elif not isinstance(layers, str) or not layers.strip():
        raise GradflowError(f"layers must be 'auto', 'all', a name pattern or a list of names, got {layers!r}")
    elif layers == "auto":
        is_fcn = any(stage_of(name) != "other" for name in names)
        if is_fcn and "module_type" in ds.coords and module_type is None:
            is_conv = np.array(["Conv" in str(t) for t in ds["module_type"].values])
            ds = ds.isel(layer=np.flatnonzero(is_conv))
    elif layers != "all":
        patterns = [p.strip() for p in layers.split(",") if p.strip()]
        keep = [i for i, name in enumerate(names) if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
        if not keep:
            raise GradflowError(f"--layers {layers!r} matches none of the {len(names)} layers "
                                f"(e.g. {', '.join(names[:4])}); patterns are globs such as 'layer3.*'")
        ds = ds.isel(layer=keep)
    if module_type is not None:
        if "module_type" not in ds.coords:
            raise GradflowError("this store does not record module types; --module-type cannot filter it")
        wanted = {t.strip() for t in module_type.split(",") if t.strip()}
        types = [str(t) for t in ds["module_type"].values]
        keep = [i for i, t in enumerate(types) if t in wanted]
        if not keep:
            raise GradflowError(f"--module-type {module_type!r} matches no layer; the selected layers are of "
                                f"type(s) {', '.join(sorted(set(types))) or 'none'}")
        ds = ds.isel(layer=keep)
    if "depth" in ds.coords:
        ds = ds.isel(layer=np.argsort(ds["depth"].values, kind="stable"))
    return ds


def layer_groups(layer_names: list[str], max_groups: int = 24) -> list[tuple[str, int, int]]:
    """Contiguous runs of layers sharing a module prefix: ``[(prefix, first index, end index), ...]``.

    The prefix is the first ``k`` dotted components, with the smallest ``k`` (1 to 4) that splits the
    axis into at least 3 groups (at most ``max_groups``): ``layer3`` in a ResNet, ``transformer.h.7``
    in a GPT, ``down2`` in an FCN, ``blocks.7`` in a ViT. Falls back to ``k = 1`` (or one group).
    """
    best = None
    for k in range(1, 5):
        groups: list[tuple[str, int, int]] = []
        for i, name in enumerate(layer_names):
            prefix = ".".join(name.split(".")[:k])
            if groups and groups[-1][0] == prefix:
                groups[-1] = (prefix, groups[-1][1], i + 1)
            else:
                groups.append((prefix, i, i + 1))
        if best is None:
            best = groups
        if 3 <= len(groups) <= max_groups and len(groups) < len(layer_names):
            return groups
        if len(groups) > max_groups:
            break
    return best or []


def stages(layer_names: list[str], fold_skips: bool = False) -> list[tuple[str, int, int]]:
    """Contiguous runs of one stage along the layer axis: ``[(stage, first index, end index), ...]``.

    ``fold_skips``: count long-skip merge layers (``skip<i>``, registered between decoder levels) as
    decoder, so an axis reads encoder | centre | decoder instead of alternating decoder | skip.
    """
    out: list[tuple[str, int, int]] = []
    for i, name in enumerate(layer_names):
        stage = stage_of(name)
        stage = "decoder" if fold_skips and stage == "skip" else stage
        if out and out[-1][0] == stage:
            out[-1] = (stage, out[-1][1], i + 1)
        else:
            out.append((stage, i, i + 1))
    return out


def step_chunks(da: xr.DataArray, max_elements: int = 1 << 22) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first step position, float64 array (steps, layer))`` blocks of a (step, layer) array.

    Blocks are whole multiples of the store's step chunk, about ``max_elements`` values each, so a
    10⁵ × 300 array is read in a handful of contiguous reads and never held in memory at once.
    """
    da = da.transpose("step", ...)
    n_steps = da.sizes["step"]
    per_step = max(1, int(np.prod([da.sizes[d] for d in da.dims if d != "step"])))
    chunk = da.encoding.get("preferred_chunks", {}).get("step") or (da.encoding.get("chunks") or (1,))[0]
    block = max(int(chunk), (max_elements // per_step) // int(chunk) * int(chunk))
    for start in range(0, n_steps, block):
        yield start, np.asarray(da.isel(step=slice(start, start + block)).values, dtype=np.float64)


def segment_mean(da: xr.DataArray, labels: np.ndarray, max_elements: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Mean over steps sharing a label, ignoring non-finite values, read block by block.

    ``labels`` gives each step's segment (one value per step, non-decreasing: an epoch index or a bin
    index). Returns ``(unique labels, means of shape (segments, layers))``; a segment with no finite
    value is NaN.
    """
    labels = np.asarray(labels)
    if len(labels) != da.sizes["step"]:
        raise ValueError("one label per step is needed")
    if len(labels) and np.any(np.diff(labels) < 0):
        raise ValueError("labels must be non-decreasing along step")
    keys, segment = np.unique(labels, return_inverse=True)
    width = int(np.prod([da.sizes[d] for d in da.dims if d != "step"]))
    sums = np.zeros((len(keys), width))
    counts = np.zeros((len(keys), width))
    for start, values in step_chunks(da, max_elements):
        values = values.reshape(len(values), width)
        seg = segment[start : start + len(values)]
        starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
        finite = np.isfinite(values)
        sums[seg[starts]] += np.add.reduceat(np.where(finite, values, 0.0), starts, axis=0)
        counts[seg[starts]] += np.add.reduceat(finite, starts, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return keys, np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
