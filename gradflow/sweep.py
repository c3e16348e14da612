"""Sweeps: a Cartesian grid of FCN variants, each trained into its own group of one store.

``STORE/<variant>/`` holds a variant's step-level arrays and ``STORE/<variant>/epochs/`` its
epoch-level arrays, exactly what a single ``Recorder`` store has at its root, so every reader works
on both. A variant is *finished* when its group carries the ``finished`` attribute, written only after
its training returned; a rerun skips finished variants and retrains the rest from scratch (deleting
the partial group first), so Ctrl-C or a kill costs at most the variant in flight. Variants run one
after another in this process (``executor="local"``, reporting progress through a callback) or as Ray tasks,
one per GPU or CPU slot, each writing its own group (``executor="ray"``).

Readers see a store through the consolidated metadata at its root (``gradflow.store``), which every
Recorder flush rewrites. Sweep bookkeeping therefore reads the groups' own metadata
(``use_consolidated=False``) and re-consolidates after each change. Ray tasks flushing side by side
can overwrite each other's root snapshot with a slightly older one (writes are atomic per file, so
never a torn one), so the driver re-consolidates after each finished task and at the end, deletes
partial groups before any task starts, and any sweep re-consolidates before it starts (repairing a
store whose driver was killed).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr

from gradflow.errors import GradflowError
from gradflow.paths import path_exists, refuse_inside_store, store_kind
from gradflow.progress import Progress
from gradflow.train import TrainConfig, config_data

EXECUTORS = ("local", "ray")
# Settings a variant's name does not show; a finished variant recorded with other values is stale.
_SETTINGS_CHECKED = ("arch", "block", "levels", "width", "size", "crop", "crops_per_image", "n_train", "n_val",
                     "epochs", "batch_size", "loss", "lr", "data", "every", "dropout", "weight_decay", "weight_decay_mode", "rmsprop_alpha",
                     "augment", "init", "optimizer", "score_passes")
_TORCH_RMSPROP_ALPHA = TrainConfig.rmsprop_alpha  # names show alpha only when it is not torch's default


class StaleVariantError(GradflowError):
    """A finished variant in the store was trained with other settings than those asked for now."""


@dataclass(frozen=True)
class Variant:
    """One grid point: its group name in the store, the full training config and (presets) its panel label."""

    name: str
    config: TrainConfig
    label: str = ""
    preset: str = ""


def variant_name(config: TrainConfig, with_seed: bool = False) -> str:
    """Readable group name, e.g. ``simple-d7-bn0-long_sum-short0``.

    The optimizer shows only when it is not the paper's RMSprop (``-sgd``), whatever else the grid
    holds, so a variant's name never depends on its neighbours and RMSprop names stay as they always
    were. Likewise the optimizer settings show only when they differ from torch's defaults:
    ``-wd_l2`` / ``-wd_decoupled`` (weight-decay mode), ``-wd0`` (no weight decay), ``-alpha0.9``
    (RMSprop's averaging factor). A Table 1 model is ``table1-w<width>-…``. ``-s<seed>`` comes last,
    with several seeds.
    """
    model = f"table1-w{config.width}" if config.arch == "table1" else f"{config.block}-d{config.depth}"
    name = f"{model}-bn{int(config.batch_norm)}-long_{config.long_skip}-short{int(config.short_skip)}"
    if config.optimizer != "rmsprop":
        name = f"{name}-{config.optimizer}"
    if config.weight_decay == 0:
        name = f"{name}-wd0"
    elif config.weight_decay_mode != "torch":
        name = f"{name}-wd_{config.weight_decay_mode}"
    if config.optimizer == "rmsprop" and config.rmsprop_alpha != _TORCH_RMSPROP_ALPHA:
        name = f"{name}-alpha{config.rmsprop_alpha:g}"
    return f"{name}-s{config.seed}" if with_seed else name


# The paper's training settings (Drozdzal et al. 2016, Sec. 3, and the authors' Keras 1 code,
# veugene/fcn_maker): RMSprop lr 1e-3 with Keras 1.x's rho = 0.9 and epsilon = 1e-8 (added to the
# square root), weight decay 1e-3 as an l2 regularizer on the conv kernels, 25 training / 5 validation
# images at 512², batch 4, flips / rotations / shear / elastic warp, He init, best-validation weights.
PAPER_SETTINGS: dict[str, Any] = dict(size=512, crop=0, n_train=25, n_val=5, batch_size=4, optimizer="rmsprop",
                                      lr=1e-3, weight_decay=1e-3, weight_decay_mode="l2", rmsprop_alpha=0.9,
                                      init="he", augment=True, loss="bce", dropout=0.0, epochs=100)


@dataclass(frozen=True)
class Preset:
    """A paper experiment: settings shared by its variants and each variant's own (label, settings)."""

    description: str
    settings: dict[str, Any]
    panels: tuple[tuple[str, dict[str, Any]], ...]


_FIG4_NET = dict(arch="simple", block="simple", levels=5, width=32, long_skip="sum")
_TABLE1 = dict(arch="table1", width=32, batch_norm=True)
PRESETS: dict[str, Preset] = {
    "fig4": Preset(
        "Fig. 4: where the weights move, simple-block FCNs with long skips",
        {**PAPER_SETTINGS, **_FIG4_NET},
        (("(a) long + short skips, 9 blocks, BN", dict(depth=9, batch_norm=True, short_skip=True)),
         ("(b) long only, 9 blocks, BN", dict(depth=9, batch_norm=True, short_skip=False)),
         ("(c) long only, 3 blocks, BN", dict(depth=3, batch_norm=True, short_skip=False)),
         ("(d) long only, 7 blocks, no BN", dict(depth=7, batch_norm=False, short_skip=False)))),
    "table3": Preset(
        "Table 3: validation loss of the Table 1 model with long + short, short only and long only skips",
        {**PAPER_SETTINGS, **_TABLE1},
        (("long + short", dict(long_skip="sum", short_skip=True)),
         ("short only", dict(long_skip="none", short_skip=True)),
         ("long only", dict(long_skip="sum", short_skip=False)))),
    "table2": Preset(
        "Table 2: the Table 1 model with Dice loss and dropout 0.2, scored with test-time dropout averaging",
        {**PAPER_SETTINGS, **_TABLE1, "loss": "dice", "dropout": 0.2, "score_passes": 10},
        (("Dice, dropout 0.2, long + short", dict(long_skip="sum", short_skip=True)),)),
}


def preset_variants(preset: str, overrides: Mapping[str, Any] | None = None,
                    seeds: Iterable[int] = (0,)) -> list[Variant]:
    """The variants of ``PRESETS[preset]``: preset settings, then each panel's, then ``overrides``
    (any :class:`TrainConfig` field, applied to every variant), once per seed.

    Raises GradflowError for an unknown preset or field, or an override that would change what tells
    the panels apart (e.g. ``short_skip`` for ``fig4``: use a plain grid for that).
    """
    if preset not in PRESETS:
        raise GradflowError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    overrides = dict(overrides or {})
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise GradflowError(f"unknown setting(s) {', '.join(unknown)}")
    spec = PRESETS[preset]
    panel_keys = sorted({key for _, panel in spec.panels for key in panel} & set(overrides))
    if panel_keys:
        raise GradflowError(f"preset {preset} sets {', '.join(panel_keys)} per panel; drop the option or "
                            f"sweep a grid without a preset")
    seeds = list(dict.fromkeys(seeds))
    variants = []
    for label, panel in spec.panels:
        for seed in seeds:
            config = TrainConfig(**{**spec.settings, **panel, **overrides, "seed": seed})
            variants.append(Variant(variant_name(config, len(seeds) > 1), config, label, preset))
    return variants


def expand_grid(base: TrainConfig, *, depths: Iterable[int], batch_norms: Iterable[bool] = (True,),
                long_skips: Iterable[str] = ("sum",), short_skips: Iterable[bool] = (False, True),
                optimizers: Iterable[str] | None = None, seeds: Iterable[int] = (0,),
                learning_rates: Mapping[str, float] | None = None) -> list[Variant]:
    """All combinations, depth-major (depth, batch norm, long skip, short skip, optimizer, seed),
    duplicates dropped.

    Every other setting comes from ``base``; ``optimizers`` defaults to ``base.optimizer``.
    ``learning_rates``: the lr of each optimizer (``{"rmsprop": 1e-4, "sgd": 1e-2}``); an optimizer
    not in it trains with ``base.lr``. Names carry the seed only when there are several seeds.
    """
    optimizers = (base.optimizer,) if optimizers is None else optimizers
    axes = [list(dict.fromkeys(axis)) for axis in (depths, batch_norms, long_skips, short_skips, optimizers, seeds)]
    if any(not axis for axis in axes):
        raise GradflowError("every grid axis needs at least one value")
    with_seed = len(axes[5]) > 1
    learning_rates = learning_rates or {}
    variants = []
    for depth, bn, long_skip, short, optimizer, seed in itertools.product(*axes):
        config = dataclasses.replace(base, depth=depth, batch_norm=bn, long_skip=long_skip, short_skip=short,
                                     optimizer=optimizer, lr=learning_rates.get(optimizer, base.lr), seed=seed)
        variants.append(Variant(variant_name(config, with_seed), config))
    return variants


def absolute_store(store: str | os.PathLike) -> str:
    """A local path made absolute (Ray workers may run elsewhere); URLs (``s3://…``) unchanged."""
    store = str(store)
    return store if "://" in store else str(Path(store).expanduser().resolve())


def _open_root(store: str, mode: str) -> zarr.Group | None:
    """The store's root group from its own (not consolidated) metadata; None if there is no store."""
    try:
        return zarr.open_group(store, mode=mode, use_consolidated=False)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        return None


def consolidate(store: str) -> None:
    """Rewrite the root's consolidated metadata from the groups' own, so readers see every change
    (a group a Recorder is writing keeps its last commit: :func:`gradflow.store.consolidate`)."""
    if _open_root(store, "r") is not None:
        from gradflow.lock import filesystem, store_lock
        from gradflow.store import consolidate as publish

        with store_lock(*filesystem(store)):
            publish(store)


def finished_variants(store: str) -> dict[str, dict[str, Any]]:
    """``{variant name: its group attrs}``, sorted by name, for every group with the ``finished`` marker."""
    root = _open_root(store, "r")
    if root is None:
        return {}
    found = {name: dict(group.attrs) for name, group in root.groups() if group.attrs.get("finished")}
    return dict(sorted(found.items()))


def refuse_damaged_runs(store: str) -> None:
    """Raise a one-line GradflowError if a finished variant (as the committed metadata has it) is
    damaged: a node metadata file missing or unreadable, or a chunk missing (gradflow.check)."""
    from gradflow.check import open_root, refuse_damaged, refuse_damaged_metadata

    root = open_root(store, mode="r")  # the committed (consolidated) view
    for name, group in root.groups():
        if not group.attrs.get("finished"):
            continue  # an unfinished variant is recorded again from step 0
        where = f"{store} (group {name!r})"
        refuse_damaged_metadata(root.store, name, where, store)
        refuse_damaged(root.store, name, where, store, resume=True)


def _clear_group(store: str, name: str) -> None:
    """Delete a variant's (partial) group so it can be recorded again from step 0."""
    root = _open_root(store, "a")
    if root is not None and name in root:
        del root[name]


def _mark_finished(store: str, name: str, summary: dict[str, Any], consolidated: bool) -> None:
    """Write the ``finished`` marker (and the run's outcome) into the variant's group attrs."""
    group = zarr.open_group(store, mode="r+", path=name, use_consolidated=False)
    group.attrs.update({"finished": True, "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
                        **summary})
    if consolidated:
        consolidate(store)


def train_variant(variant: Variant, store: str, command: str, progress: Progress | None = None, data=None,
                  consolidated: bool = True) -> dict[str, Any]:
    """Train one variant into ``STORE/<name>``, then mark it finished. Returns its outcome.

    The group's ``metadata`` attr gets the full config (``train`` records it), the variant name, its
    panel label (presets) and the exact ``command`` line, so every figure can be traced back to how it
    was made. With ``config.score_passes`` > 0 the best-validation model is then scored on the
    validation images (:func:`score_segmentation`) and the scores join the outcome.
    ``consolidated=False`` (Ray tasks) leaves re-consolidating the root to the driver.
    """
    from gradflow.train import resolve_device, train

    c = variant.config
    started = time.perf_counter()
    _clear_group(store, variant.name)
    if data is None:
        data = config_data(c)
    metadata = {"variant": variant.name, "command": command, "device_name": _device_name(resolve_device(c.device))}
    if variant.preset:
        metadata.update(preset=variant.preset, panel=variant.label)
    result = train(c, store, group=variant.name, progress=progress, data=data, metadata=metadata)
    summary = {"best_epoch": int(result.best_epoch), "best_val_loss": _json_float(result.best_val_loss),
               "train_loss_at_best": _json_float(result.train_loss_at_best),
               "train_seconds": round(time.perf_counter() - started, 3)}
    if c.score_passes:
        scored = time.perf_counter()
        summary.update(score_segmentation(result.model, data.val_images, data.val_labels, c.score_passes,
                                          seed=c.seed, batch_size=c.batch_size))
        summary["score_seconds"] = round(time.perf_counter() - scored, 3)
    _mark_finished(store, variant.name, summary, consolidated)
    return summary


def _device_name(device) -> str:
    """``cpu`` or the CUDA device's product name, for reports."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def score_segmentation(model, images, membrane, passes: int, seed: int = 0,
                       batch_size: int | None = None) -> dict[str, float]:
    """ISBI 2012 scores of ``model`` on ``images`` (N, 1, H, W) against membrane labels (same shape, 1 =
    membrane): the mean membrane probability over ``passes`` test-time dropout passes
    (:func:`gradflow.predict.predict`, seeded with ``seed``), turned into cell probability, then
    :func:`gradflow.metrics.isbi_scores`. Returns ``{"v_rand", "v_info", "pixel_error", "score_passes"}``.
    """
    import torch

    from gradflow.metrics import isbi_scores
    from gradflow.predict import predict

    torch.manual_seed(seed)
    prob = predict(model, images, passes=passes, batch_size=batch_size)
    cells = (1.0 - prob[:, 0]).cpu().numpy()
    labels = (membrane[:, 0] < 0.5).to(torch.uint8).cpu().numpy()
    return {**isbi_scores(cells, labels), "score_passes": passes}


def _json_float(value: float | None) -> float | None:
    """A loss for JSON attrs: NaN/Inf (a diverged run) become null."""
    return float(value) if value is not None and math.isfinite(value) else None


def _stale_settings(variant: Variant, attrs: dict[str, Any]) -> list[str]:
    """Settings whose recorded value differs from the requested one (the name does not show them)."""
    recorded = attrs.get("metadata") or {}
    requested = dataclasses.asdict(variant.config)
    return [f"{key} {recorded[key]!r} vs {requested[key]!r}" for key in _SETTINGS_CHECKED
            if key in recorded and recorded[key] != requested[key]]


def plan(variants: list[Variant], store: str, force: bool = False) -> tuple[list[Variant], list[Variant]]:
    """Split into (to train, already finished). Refuses to skip a finished variant with other settings."""
    if len({v.name for v in variants}) != len(variants):
        raise GradflowError("two variants of the sweep have the same name")
    done = {} if force else finished_variants(store)
    todo, skipped = [], []
    for variant in variants:
        if variant.name not in done:
            todo.append(variant)
            continue
        stale = _stale_settings(variant, done[variant.name])
        if stale:
            raise StaleVariantError(f"{store} already holds {variant.name} trained with other settings "
                                    f"({'; '.join(stale)})")
        skipped.append(variant)
    return todo, skipped


def validate(variants: list[Variant]) -> None:
    """Fail fast, before any training, on what would fail later: model options, device, data path."""
    from gradflow.train import build_model, resolve_device

    checked: set = set()
    for variant in variants:
        c = variant.config
        arch = (c.arch, c.block, c.depth, c.levels, c.width, c.batch_norm, c.short_skip, c.long_skip, c.dropout)
        if arch not in checked:
            build_model(c)
            checked.add(arch)
        resolve_device(c.device)
    for c in {(v.config.data, v.config.size, v.config.n_train, v.config.n_val): v.config for v in variants}.values():
        if c.data != "synthetic":
            config_data(c)


def run_sweep(variants: list[Variant], store: str | os.PathLike, *, force: bool = False, executor: str = "local",
              ray_address: str | None = None, command: str = "", progress: Progress | None = None,
              say: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Train every unfinished variant of the grid into ``store``. Returns ``{trained name: outcome}``.

    ``progress``: a :data:`gradflow.progress.Progress` callback (the variants, and each one's training);
    ``say``: called with a line for each variant skipped (finished before) or trained (its outcome).
    """
    say = say or (lambda line: None)
    if executor not in EXECUTORS:
        raise GradflowError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    store = absolute_store(store)
    validate(variants)
    from gradflow.check import damaged_root, root_error

    refuse_inside_store(store, lambda root, inner, kind: "sweep into a store outside it" if kind == "run"
                        else f"sweep into the store itself: {root}", writing=True)
    exists, is_zarr = path_exists(store)
    if exists and not is_zarr and (damage := damaged_root(store)):  # its root file lost
        raise root_error(store, damage)
    if exists and not is_zarr:  # a file or a folder of something else: never write into it
        raise GradflowError(f"{store} exists and is not a Zarr store; choose another store")
    kind = store_kind(store) if exists else None
    if kind == "run":
        raise GradflowError(f"{store} holds a single run at its root; sweep into another store")
    if kind == "foreign":  # never written into (nor its metadata consolidated)
        raise GradflowError(f"{store} is not a gradflow store (another tool's Zarr store); sweep into "
                            f"another store")
    if exists:
        refuse_damaged_runs(store)  # consolidating would drop what --repair restores from
    consolidate(store)  # repair the readers' view if an earlier (Ray) driver was killed
    todo, skipped = plan(variants, store, force)
    for variant in skipped:
        say(f"skip {variant.name} (finished)")
    if not todo:
        return {}
    zarr.open_group(store, mode="a", use_consolidated=False)  # one root before any variant writes
    if executor == "ray":
        if store.startswith("memory://"):
            raise GradflowError("a memory:// store lives in one process; sweep on Ray into a path or URL")
        return _run_ray(todo, store, command, ray_address, progress or _no_progress, say)
    return _run_local(todo, store, command, len(skipped), progress or _no_progress, say)


def _no_progress(task: str, done: int, total: int, status: str = "") -> None:
    pass


def _outcome(name: str, summary: dict[str, Any]) -> str:
    """One line per finished variant: best validation loss, the training loss then, time taken."""
    val, train = (float("nan") if v is None else v for v in (summary["best_val_loss"], summary["train_loss_at_best"]))
    return (f"{name}: best val {val:.4f} (train {train:.4f}) at epoch {summary['best_epoch']}, "
            f"{summary['train_seconds']:.0f} s")


def _run_local(todo: list[Variant], store: str, command: str, n_skipped: int, progress: Progress,
               say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """One variant after another in this process; data loaded once per distinct data setting."""
    outcomes: dict[str, dict[str, Any]] = {}
    cache: dict[tuple, Any] = {}
    total = len(todo) + n_skipped
    for done, variant in enumerate(todo, n_skipped):
        c = variant.config
        key = (c.data, c.size, c.seed, c.n_train, c.n_val)
        if key not in cache:
            cache[key] = config_data(c)
        progress("sweep: variants", done, total, variant.name)
        outcomes[variant.name] = train_variant(variant, store, command, progress=progress, data=cache[key])
        say(_outcome(variant.name, outcomes[variant.name]))
    progress("sweep: variants", total, total, "")
    return outcomes


def _ray_train(config: dict[str, Any], name: str, store: str, command: str, label: str = "",
               preset: str = "") -> dict[str, Any]:
    """Ray task body: rebuild the variant from plain data and train it (module-level so Ray can pickle it)."""
    return train_variant(Variant(name, TrainConfig(**config), label, preset), store, command, consolidated=False)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise GradflowError("the ray executor needs Ray: pip install 'gradflow[ray]'") from None
    return ray


def _run_ray(todo: list[Variant], store: str, command: str, address: str | None, progress: Progress,
             say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Variants as Ray tasks (1 GPU each when the cluster has GPUs, else 1 CPU), results as they finish.

    On a local instance the workers import gradflow from this checkout; on an existing cluster
    (``address``) gradflow must be installed on the workers. Ctrl-C cancels the tasks in flight;
    finished variants stay finished.
    """
    ray = _import_ray()
    for variant in todo:  # here, not in the tasks: no task deletes while another lists the store
        _clear_group(store, variant.name)
    consolidate(store)
    started_here = not ray.is_initialized()
    if started_here:
        source_root = str(Path(__file__).resolve().parent.parent)
        python_path = os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")]))
        runtime_env = None if address else {"env_vars": {"PYTHONPATH": python_path}}
        ray.init(address=address, runtime_env=runtime_env, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    outcomes: dict[str, dict[str, Any]] = {}
    pending: dict[Any, str] = {}
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=0)(_ray_train)
        pending = {task.remote(dataclasses.asdict(v.config), v.name, store, command, v.label, v.preset): v.name for v in todo}
        overall = f"sweep on Ray ({'GPU' if gpus else 'CPU'} tasks): variants"
        progress(overall, 0, len(todo), "")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(done[0])
            try:
                outcomes[name] = ray.get(done[0])
            except ray.exceptions.RayTaskError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, GradflowError):
                    raise GradflowError(f"{name}: {cause}") from None
                raise
            say(_outcome(name, outcomes[name]))
            progress(overall, len(outcomes), len(todo), "")
            consolidate(store)  # readers see the finished variant now, not only at the end
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
        consolidate(store)
    return outcomes
