"""Per-tensor statistics on the device, per-layer statistics on the host.

On a recorded step the Recorder needs, for every recorded parameter tensor, eight numbers: three about
its gradient, two parameter norms and three about its real update Δw = w_after − w_before. Asking
torch for them tensor by tensor costs a dispatch (and on a GPU a host sync) per tensor and statistic,
which dominates a deep narrow network. Two kinds of bucket (same optimizer, device and dtype)
avoid that (:func:`gradflow.buckets.build` picks one):

* :class:`Bucket` (CPUs): the tensors are split into *shape classes*; each class is stacked into one
  ``(k, numel)`` matrix and reduced row-wise, so a recorded step costs about 13 dispatches per shape
  class, independent of the number of tensors. Small shape classes share one zero-padded
  :class:`RaggedClass`; a class larger than the scratch is taken in runs, a tensor larger than it
  in blocks (:class:`BlockClass`, combined on the host through :class:`Split`).
* :class:`ForeachBucket` (GPUs without Triton): multi-tensor ``torch._foreach_*`` kernels over all
  the bucket's tensors, a fixed number of dispatches per bucket whatever the shapes (on a CPU those
  ops loop over the tensors one by one, which is slower than stacking);
* :class:`gradflow.fused.FusedBucket`: fused kernels over a table of the tensors' addresses, no
  per-tensor host work beyond reading the addresses: two Triton kernels per phase on GPUs
  (:mod:`gradflow.fused_triton`), one Numba-compiled loop on CPUs (:mod:`gradflow.fused_cpu`).

All statistics of a step are copied to the host once per device (:func:`to_host`; on the CPU the
concatenation happens on the writer thread).

Families of statistics (Cockpit/BackPACK style, one function each):

* :func:`gradient_stats` – ‖g‖, max|g|, and :func:`nonfinite_counts` – count of NaN/±Inf in g;
* :func:`norms` – ‖w‖ (parameter norms, before and after the step);
* :func:`update_stats` – ‖d‖, Σ|d|, max|d| of the update d (sign does not matter).

Statistics are computed in float32 (float64 for float64 parameters): bfloat16/float16 tensors are upcast
exactly before any arithmetic. Per-layer statistics (:func:`layer_step_stats`,
:func:`layer_epoch_stats`) combine a layer's tensors on the host in float64: norms are
sqrt(Σ‖·‖²), means Σ|·| / Σnumel, maxima the max over tensors.

Memory per bucket, for P bytes of parameters: the Δw snapshot in the parameters' own dtype (P),
written only on recorded steps; one scratch buffer in the compute dtype of at most
:data:`SCRATCH_FRACTION` · P; the ragged class's own small padded buffers; and the epoch-start copy
in host memory in the parameters' own dtype (P). ``snapshot=False`` keeps neither copy.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import numpy as np
import torch

from gradflow.errors import GradflowError

# Rows of the per-tensor statistic matrix (F × T) that one recorded step produces.
GRAD_NORM, GRAD_MAX_ABS, GRAD_NONFINITE, PARAM_NORM_BEFORE, UPDATE_NORM, UPDATE_ABS_SUM, \
    UPDATE_MAX_ABS, PARAM_NORM_AFTER = range(8)
NUM_STATS = 8
FOUND_INF = -1  # pseudo-row: GradScaler's found_inf flag handed to a fused optimizer (see recorder)
PRESENT = -2  # pseudo-row: a sharded step's global "had a gradient" flags (distributed.Reducer)

# A shape class this small (fewer than RAGGED_MAX_TENSORS tensors, at most RAGGED_MAX_ELEMENTS
# elements in all) joins the bucket's one RaggedClass: a dozen kernel launches per recorded step
# cost more than its zero padding (at most RAGGED_MAX_ELEMENTS elements per tensor).
RAGGED_MAX_TENSORS = 64
RAGGED_MAX_ELEMENTS = 4096

# A bucket's scratch buffer holds at most this fraction of its parameters' bytes (and at least
# SCRATCH_MIN_ELEMENTS elements): with the snapshot (1×) the device holds ≤ 1.125× the parameters.
SCRATCH_FRACTION = 0.125
SCRATCH_MIN_ELEMENTS = 1 << 18
# The multi-tensor bucket's pieces are at most this long: its non-finite counts are float32 sums of
# 0/1 entries per piece, exact up to 2**24.
PIECE_MAX_ELEMENTS = 1 << 24

# Rows of the per-tensor statistic matrix (2 × T) that one epoch produces.
EPOCH_ABS_SUM, EPOCH_NORM = range(2)

# How the statistics of one tensor's parts (blocks, shards) combine: norms as sqrt(Σ‖·‖²), sums
# added, maxima the max.
STEP_KINDS = ("norm", "max", "sum", "norm", "norm", "sum", "max", "norm")
EPOCH_KINDS = ("sum", "norm")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, bfloat16, float16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Elements per float32 partial norm on a CPU. torch accumulates a float32 norm in float32, in a few
# vector lanes, so its error grows with the length: on 65,536 equal entries (Adam's first step, |Δw|
# = lr everywhere) it was 391 ulps, on 1,024 none; partial norms of 1,024 are combined in float64.
NORM_BLOCK = 1 << 10


def l2_norm(rows: torch.Tensor, checked: bool = True) -> torch.Tensor:
    """Row-wise ‖·‖₂ of a ``(k, n)`` matrix, without overflow, to about one float32 ulp (on a CPU, float32
    partial norms of :data:`NORM_BLOCK` elements, combined in float64).

    In float32 the squares overflow for entries above ~1.8e19 (an exploding gradient: exactly where
    the number matters) and torch's kernels do not rescale, so ‖(1e20, 1e20)‖ would read as inf. On a
    CPU, where looking costs no sync, a row whose float32 norm came out infinite is recomputed with
    float64 accumulation; on other devices the norm is always accumulated in float64.
    ``checked=False`` (CPU): the float32 norm as it is; the caller looks for inf itself, once for
    many norms (:meth:`Bucket._recheck`).
    """
    if rows.dtype == torch.float64:
        return torch.linalg.vector_norm(rows, dim=1)
    if rows.device.type != "cpu":
        return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64).to(rows.dtype)
    k, n = rows.shape
    if n > NORM_BLOCK:  # float32 accumulation error grows with the row: blocks of it
        whole = n - n % NORM_BLOCK
        if rows.stride(1) != 1:
            rows = rows.contiguous()
        blocks = torch.linalg.vector_norm(
            rows.as_strided((k, whole // NORM_BLOCK, NORM_BLOCK), (rows.stride(0), NORM_BLOCK, 1)),
            dim=2)
        if whole < n:
            blocks = torch.cat([blocks, torch.linalg.vector_norm(rows[:, whole:], dim=1, keepdim=True)], 1)
        norm = torch.linalg.vector_norm(blocks.double(), dim=1).to(rows.dtype)
    else:
        norm = torch.linalg.vector_norm(rows, dim=1)
    if checked and bool(torch.isinf(norm).any()):
        norm = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64).to(rows.dtype)
    return norm


def unscaled(grad_scale: torch.Tensor | None, device: torch.device,
             *figures: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``figures`` (‖g‖, max|g| of gradients a fused optimizer still holds scaled) divided by the
    GradScaler's ``grad_scale`` (in float64); as they are where there is no scale."""
    if grad_scale is None:
        return figures
    inverse = grad_scale.to(device).double().reciprocal()
    return tuple(f * inverse for f in figures)


def gradient_stats(grads: torch.Tensor, checked: bool = True) -> list[torch.Tensor]:
    """Row-wise ‖g‖ and max|g| of a ``(k, n)`` gradient matrix, which is overwritten by |g|.

    Both are NaN/Inf when a row holds NaN/Inf (|g| keeps them where they are). (On a CPU,
    ``abs_`` + ``amax`` is several times faster than ``vector_norm(ord=inf)``.)
    """
    magnitude = grads.abs_()
    return [l2_norm(magnitude, checked), magnitude.amax(1)]


def nonfinite_counts(grads: torch.Tensor) -> torch.Tensor:
    """Row-wise count of NaN and ±Inf entries of a ``(k, n)`` matrix (which is overwritten).

    0·x is 0 for finite x and NaN for NaN and ±Inf, so one multiply, one ``nan_to_num`` and one
    sum replace slow boolean kernels. Exact up to 2**24 per tensor in float32 (float64 above).
    """
    flags = torch.nan_to_num(grads.mul_(0), nan=1.0)
    return flags.sum(1, dtype=torch.float64 if grads.shape[1] > 2**24 else grads.dtype)


def norms(weights: torch.Tensor, checked: bool = True) -> torch.Tensor:
    """Row-wise ‖w‖ of a ``(k, n)`` matrix (:func:`l2_norm`)."""
    return l2_norm(weights, checked)


def update_stats(diff: torch.Tensor, checked: bool = True) -> list[torch.Tensor]:
    """Row-wise ‖d‖, Σ|d| and max|d| of a ``(k, n)`` update matrix, which is overwritten by |d|."""
    magnitude = diff.abs_()
    return [l2_norm(magnitude, checked), magnitude.sum(1), magnitude.amax(1)]


class Split:
    """The tensor index of a part computed from a block of one tensor (see :class:`BlockClass`).

    Several parts carry the same tensor; the host combines them (norms as sqrt(Σ‖·‖²), sums added,
    maxima the max) instead of assigning.
    """

    def __init__(self, index: np.ndarray) -> None:
        self.index = index

    def __len__(self) -> int:
        return len(self.index)


def _local(p: torch.Tensor) -> torch.Tensor:
    """The tensor a rank holds: a DTensor's local shard, any other tensor itself."""
    return getattr(p, "_local_tensor", p)


# Read from every tensor of a bucket by ``map`` (one C-level pass, no Python frame per tensor).
_SHAPE, _DTYPE, _DEVICE, _LAYOUT, _GRAD = (operator.attrgetter(a) for a in (
    "shape", "dtype", "device", "layout", "grad"))


def replaced(now: torch.Tensor, numel: int, dtype: torch.dtype,
             device: torch.device) -> GradflowError:
    """The error for a recorded parameter or gradient that no longer has the size (``numel``
    elements), ``dtype`` or ``device`` it had when the bucket was built (a ``p.data = ...``, a
    ``model.to(...)``): the same one line from every bucket kind."""
    return GradflowError(
        f"a recorded parameter or its gradient changed size, dtype or device after the Recorder "
        f"was created (now {tuple(now.shape)} {now.dtype} on {now.device}, was {numel} elements "
        f"{dtype} on {device}: assigned to p.data, or model.to(...)?); create the Recorder after "
        f"changing parameters")


def check_same_shapes(before: list | None, after: list | None, shapes: list, during: str) -> None:
    """Raise :class:`~gradflow.errors.GradflowError` where a tensor's shape ``before`` differs from
    ``after`` (lists of shapes, None meaning ``shapes``, those the bucket was built with):
    ``during`` the optimizer step its Δw, during the epoch its W_end − W_start, pairs no elements."""
    if before == after:
        return
    before, after = before or shapes, after or shapes
    j = next(j for j, (a, b) in enumerate(zip(before, after)) if a != b)
    what = "update" if during == "optimizer step" else "displacement W_end − W_start"
    raise GradflowError(f"a recorded parameter changed shape during the {during} "
                        f"({tuple(before[j])} to {tuple(after[j])}), so its {what} is undefined; "
                        f"create the Recorder after changing parameters")


def conform(tensors: list, shapes: list, dtype: torch.dtype, device: torch.device,
            present: np.ndarray | None = None, index=None) -> tuple[list, list | None]:
    """``tensors`` (one per recorded tensor, None for a missing gradient) as buffers built for
    ``shapes`` take them: the slow path, per tensor, when a C-level look found any of them unlike
    at build time (or a gradient missing or sparse).

    A missing gradient becomes zeros (an expanded 0-d tensor) and clears ``present`` at its global
    index (``index``: per tensor); a sparse one is made dense; a tensor with as many elements as
    its built shape but another shape (``p.data = w.view(-1)``, ``w.t()``) is reshaped to it, so
    elements pair by their row-major index in the current shape. Returns the tensors and their
    current shapes (None when every shape is as built). Raises :class:`~gradflow.errors.GradflowError`
    (:func:`replaced`) for another size, dtype or device.
    """
    out, now = list(tensors), None
    for j, (t, shape) in enumerate(zip(tensors, shapes)):
        if t is None:
            present[index[j]] = False
            out[j] = torch.zeros((), dtype=dtype, device=device).expand(shape)
            continue
        if t.layout != torch.strided:
            t = t.to_dense()
        if t.numel() != math.prod(shape) or t.dtype != dtype or t.device != device:
            raise replaced(t, math.prod(shape), dtype, device)
        if t.shape != shape:
            now = now or list(shapes)
            now[j] = t.shape
            t = t.reshape(shape)
        out[j] = t
    return out, now


@dataclass
class ShapeClass:
    """Parameter tensors of one bucket with the same shape, reduced together as one matrix.

    ``snapshot`` is in the parameters' own dtype (a copy, no rounding); ``scratch`` in the compute
    dtype, shared by all classes of the bucket, receives one class of gradients or parameters at a
    time (exact upcast). ``local``: the parameters are DTensors (FSDP2); their local shards are read.

    Every copy into a buffer (:meth:`fill`) checks the members against their shapes, dtype and
    device at build time: in the common case with the first member and one C-level pass over the
    dtypes (``torch.stack`` refuses unequal shapes and devices itself), else through
    :func:`conform` (another shape of as many elements is reshaped to the built one; another size,
    dtype or device raises :class:`~gradflow.errors.GradflowError`). :attr:`shapes_now` tells the
    bucket the shapes the parameters had at the last :meth:`stack_params` (None: as built).
    """

    params: list[torch.Tensor]
    index: np.ndarray | Split  # their global tensor indices (layer order), for the host-side scatter
    snapshot: torch.Tensor  # (k, *shape) view into the bucket's flat snapshot buffer (param dtype)
    scratch: torch.Tensor  # (k, *shape) view into the bucket's scratch buffer (compute dtype)
    local: bool = False
    epoch: torch.Tensor | None = None  # epoch-start copy (param dtype, host memory), like snapshot
    # The same buffers seen as (k, numel) matrices, made once: a view costs a dispatch per call.
    snapshot_rows: torch.Tensor = field(init=False)
    scratch_rows: torch.Tensor = field(init=False)
    # The members' shapes, dtype and device when built (what the buffers are laid out for).
    shapes: list = field(init=False)
    dtype: torch.dtype = field(init=False)
    device: torch.device = field(init=False)
    shapes_now: list | None = None  # the parameters' shapes at the last stack_params (None: built)
    shapes_at_snapshot: list | None = None  # ... when the Δw snapshot was taken
    shapes_at_epoch: list | None = None  # ... when the epoch-start copy was taken

    def __post_init__(self) -> None:
        self.snapshot_rows = self.snapshot.view(len(self.snapshot), -1)
        self.scratch_rows = self.scratch.view(len(self.scratch), -1)
        data = self.data()
        self.shapes = list(map(_SHAPE, data))
        self.dtype, self.device = data[0].dtype, data[0].device

    def rows(self, into: str) -> torch.Tensor:
        """A buffer (``"snapshot"``, ``"scratch"`` or ``"epoch"``) as a (k, numel) matrix."""
        if into == "scratch":
            return self.scratch_rows
        if into == "snapshot":
            return self.snapshot_rows
        return self.epoch.view(len(self.epoch), -1)

    def data(self) -> list[torch.Tensor]:
        return [_local(p) for p in self.params] if self.local else self.params

    def regular(self, tensors: list[torch.Tensor], grads: bool = False) -> bool:
        """Whether ``tensors`` are as built, as far as :meth:`copy` does not check it itself.
        ``grads``: the dtype of the first only (torch keeps each gradient in its parameter's dtype,
        and the parameters, checked in the same recorded step, refuse a change)."""
        first = tensors[0]
        return first.shape == self.shapes[0] and first.device == self.device and (
            first.dtype == self.dtype if grads else set(map(_DTYPE, tensors)) == {self.dtype})

    def copy(self, tensors: list[torch.Tensor], into: str) -> None:
        """Copy ``tensors`` (one per member, as built) into a buffer (exact: upcast or same dtype)."""
        torch.stack(tensors, out=getattr(self, into))

    def fill(self, tensors: list, into: str, present: np.ndarray | None = None) -> list | None:
        """Copy ``tensors`` (one per member; gradients: None where missing, see :func:`conform`
        for ``present``) into a buffer, checked; returns their shapes (None: as built)."""
        try:
            if self.regular(tensors, present is not None):
                self.copy(tensors, into)
                return None
        except (AttributeError, TypeError, RuntimeError):  # None, sparse, unequal shapes or devices
            pass
        tensors, shapes = conform(tensors, self.shapes, self.dtype, self.device, present,
                                  self.index_array)
        self.copy(tensors, into)
        return shapes

    def stack_params(self, into: str = "scratch") -> torch.Tensor:
        """The parameters copied into a buffer, as a (k, numel) matrix."""
        self.shapes_now = self.fill(self.data(), into)
        return self.rows(into)

    def stack_grads(self, present: np.ndarray) -> torch.Tensor:
        """The gradients stacked into the scratch buffer, as a (k, numel) matrix.

        Zeros stand in for missing gradients (``present`` is cleared for those) and sparse ones
        (``nn.Embedding(sparse=True)``) are made dense (:func:`conform`); both are found by the
        first look failing, so the common case looks at each ``.grad`` once.
        """
        grads = list(map(_GRAD, self.params))
        if self.local:
            grads = [None if g is None else _local(g) for g in grads]
        self.fill(grads, "scratch", present)
        return self.scratch_rows

    @property
    def index_array(self) -> np.ndarray:
        return self.index.index if isinstance(self.index, Split) else self.index


@dataclass
class RaggedClass(ShapeClass):
    """Small tensors of assorted shapes (small shape classes, see :data:`RAGGED_MAX_TENSORS`), one
    per row of a zero-padded ``(k, widest numel)`` matrix.

    A model's odd tensors (first and last layer, a lone bias of one element, a few biases) would
    each be a shape class of its own, costing a dozen kernel launches apiece per recorded step;
    here they cost a dozen together. The zero padding changes no statistic (it adds 0 to every sum
    and norm, and max|·| ≥ 0). ``snapshot``, ``scratch`` (and ``epoch``) are this class's own
    zero-initialised ``(k, width)`` buffers, filled through per-tensor views of their rows.
    """

    views: dict = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.views = {}

    def _views(self, into: str) -> list[torch.Tensor]:
        buffer = getattr(self, into)
        cached = self.views.get(into)
        if cached is None or cached[0] is not buffer:
            cached = (buffer, [row[:math.prod(s)].view(s) for row, s in zip(buffer, self.shapes)])
            self.views[into] = cached
        return cached[1]

    def regular(self, tensors: list[torch.Tensor], grads: bool = False) -> bool:
        # copy_ would broadcast one element into many, and convert dtypes and devices: look at all
        return list(map(_SHAPE, tensors)) == self.shapes \
            and set(map(_DTYPE, tensors)) == {self.dtype} \
            and set(map(_DEVICE, tensors)) == {self.device}

    def copy(self, tensors: list[torch.Tensor], into: str) -> None:
        torch._foreach_copy_(self._views(into), tensors)


@dataclass
class BlockClass(ShapeClass):
    """One block (a flat range ``[start, stop)``) of a tensor too large for the scratch buffer.

    A tensor larger than the bucket's scratch is read block by block, each a one-row matrix; the
    host combines the blocks' statistics (:class:`Split`), so no buffer larger than the scratch is
    ever needed.
    """

    start: int = 0
    stop: int = 0

    def _block(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, -1)[:, self.start:self.stop]

    def regular(self, tensors: list[torch.Tensor], grads: bool = False) -> bool:
        t = tensors[0]
        return t.shape == self.shapes[0] and t.dtype == self.dtype and t.device == self.device

    def copy(self, tensors: list[torch.Tensor], into: str) -> None:
        getattr(self, into).copy_(self._block(tensors[0]))


def _measure(params: list[torch.Tensor], scratch_elements: int | None,
             cpu_upcast_transient: bool = False) -> tuple[list[torch.Tensor], bool, torch.device,
                                                          torch.dtype, torch.dtype, list[int], int]:
    """What a bucket is built from: the tensors a rank holds (DTensors' local shards), whether they
    are shards, their device, dtype and compute dtype, their sizes, and the scratch length in
    elements (``scratch_elements``, or :data:`SCRATCH_FRACTION` of the parameters' bytes, at least
    :data:`SCRATCH_MIN_ELEMENTS`; shared with a transient of the same size where
    ``cpu_upcast_transient`` and bfloat16/float16 parameters live on a CPU)."""
    data = [_local(p) for p in params]
    local = any(d is not p for d, p in zip(data, params))
    device, dtype = data[0].device, data[0].dtype
    work = compute_dtype(dtype)
    numel = [d.numel() for d in data]
    if scratch_elements is None:
        copies = 2 if cpu_upcast_transient and device.type == "cpu" and work != dtype else 1
        budget = SCRATCH_FRACTION * sum(numel) * dtype.itemsize / (work.itemsize * copies)
        scratch_elements = max(SCRATCH_MIN_ELEMENTS, int(budget))
    return data, local, device, dtype, work, numel, scratch_elements


def _epoch_buffer(like: torch.Tensor, pinned: bool) -> torch.Tensor:
    """A zeroed host tensor shaped like ``like`` in its dtype (pinned for fast copies from a GPU)."""
    return torch.zeros(like.shape, dtype=like.dtype, pin_memory=pinned)


@dataclass
class Bucket:
    """The recorded tensors one optimizer owns on one device with one dtype.

    Memory, for P bytes of recorded parameters: the Δw snapshot, one copy of them in their own
    dtype (P), written only on recorded steps; one scratch buffer in the compute dtype of at most
    :data:`SCRATCH_FRACTION` · P (at least :data:`SCRATCH_MIN_ELEMENTS` elements), into which
    gradients and parameters are copied class by class (a class larger than it is split into
    blocks); on a CPU, a transient of the same size when a bfloat16/float16 difference is upcast;
    and the epoch-start copy in host memory in the parameters' own dtype (P). With
    ``snapshot=False`` there is no snapshot and no epoch copy (gradient statistics and ‖w‖ only).
    """

    device: torch.device
    dtype: torch.dtype
    classes: list[ShapeClass] = field(default_factory=list)
    keeps_snapshot: bool = True

    @classmethod
    def build(cls, params: list[torch.Tensor], index: list[int], snapshot: bool = True,
              scratch_elements: int | None = None) -> Bucket:
        """Group ``params`` (all on one device with one dtype) into shape classes and a ragged one.

        DTensor parameters (FSDP2) are read through their local shards. ``scratch_elements`` caps
        the scratch buffer (default: from :data:`SCRATCH_FRACTION`).
        """
        data, local, device, dtype, work, numel, scratch_elements = _measure(
            params, scratch_elements, cpu_upcast_transient=True)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, d in enumerate(data):
            by_shape.setdefault(tuple(d.shape), []).append(i)
        ragged = [i for shape, members in by_shape.items()
                  if len(members) < RAGGED_MAX_TENSORS
                  and len(members) * math.prod(shape) <= RAGGED_MAX_ELEMENTS for i in members]
        if len(ragged) < 2:
            ragged = []  # nothing to merge
        by_shape = {shape: members for shape, members in by_shape.items()
                    if members[0] not in ragged}
        # Each class (a run of same-shape members, or one block of a big tensor) fits the scratch.
        plan: list[tuple[tuple, list[int], int, int]] = []  # (row shape, members, start, stop)
        for shape, members in by_shape.items():
            size = math.prod(shape)
            if size > scratch_elements:
                for i in members:
                    plan += [((1, min(size, a + scratch_elements) - a), [i], a,
                              min(size, a + scratch_elements))
                             for a in range(0, size, scratch_elements)]
            else:
                per = max(1, scratch_elements // max(size, 1))
                plan += [(shape, members[a:a + per], 0, 0) for a in range(0, len(members), per)]
        bucket = cls(device, dtype, keeps_snapshot=snapshot)
        if plan:
            sizes = [len(m) * math.prod(s) if a == b else b - a for s, m, a, b in plan]
            flat = torch.empty(sum(sizes) if snapshot else 0, dtype=dtype, device=device)
            scratch = torch.empty(max(sizes), dtype=work, device=device)
            offset = 0
            for (shape, members, a, b), size in zip(plan, sizes):
                rows = (len(members), *shape) if a == b else shape
                snap = flat[offset:offset + size].view(rows) if snapshot else scratch[:size].view(rows)
                args = ([params[i] for i in members],
                        np.array([index[i] for i in members]) if a == b
                        else Split(np.array([index[members[0]]])),
                        snap, scratch[:size].view(rows), local)
                bucket.classes.append(ShapeClass(*args) if a == b
                                      else BlockClass(*args, start=a, stop=b))
                offset += size if snapshot else 0
        if ragged:
            width = max(data[i].numel() for i in ragged)
            bucket.classes.append(RaggedClass(
                [params[i] for i in ragged], np.array([index[i] for i in ragged]),
                torch.zeros(len(ragged), width, dtype=dtype, device=device),
                torch.zeros(len(ragged), width, dtype=work, device=device), local))
        return bucket

    @property
    def looks_on_host(self) -> bool:
        """On a CPU, looking at a value costs no sync: float32 norms are taken unchecked and one look
        per phase finds an overflow (:meth:`_recheck`), non-finite entries are counted only when a
        look finds any. On other devices norms accumulate in float64 and counts are always taken."""
        return self.device.type == "cpu"

    def before_step(self, present: np.ndarray, grad_scale: torch.Tensor | None) -> list:
        """:meth:`gradient_parts` and :meth:`snapshot` together (a step without a closure)."""
        return self.gradient_parts(present, grad_scale) + self.snapshot()

    def gradient_parts(self, present: np.ndarray, grad_scale: torch.Tensor | None) -> list:
        """Gradient statistics of the current ``.grad``; returns ``(row, index, values)`` parts.

        ``present`` (host, per global tensor) is cleared where a tensor has no gradient; its statistics
        are then computed on zeros and the host turns them into NaN. ``grad_scale`` is the loss scale
        a GradScaler hands to a fused optimizer, whose gradients are still scaled at this point.
        Non-finite entries are counted on the GPU always; on the CPU, where looking at a value costs
        no sync, only when the sum of the max|g| is not finite (otherwise every count is exactly 0).
        """
        parts, seen, again = [], [], []
        count_now = not self.looks_on_host
        for c in self.classes:
            matrix = c.stack_grads(present)
            norm, max_abs = gradient_stats(matrix, checked=count_now)
            if count_now:
                parts.append((GRAD_NONFINITE, c.index, nonfinite_counts(matrix)))
            else:
                seen += [norm, max_abs]
                again.append((len(parts), lambda c=c: unscaled(grad_scale, self.device, l2_norm(
                    c.stack_grads(present).abs_()))[0]))
            norm, max_abs = unscaled(grad_scale, self.device, norm, max_abs)
            parts += [(GRAD_NORM, c.index, norm), (GRAD_MAX_ABS, c.index, max_abs)]
        # One host look (CPU) at every norm and max|g|: all finite, or count and recheck.
        if seen and not math.isfinite(torch.cat(seen).sum().item()):
            parts = self._recheck(parts, again, looked=True)
            parts += [(GRAD_NONFINITE, c.index, nonfinite_counts(c.stack_grads(present)))
                      for c in self.classes]
        return parts

    def _recheck(self, parts: list, again: list, looked: bool = False) -> list:
        """CPU: the float32 norms at ``again``'s part positions were taken unchecked; one look at all
        of them (unless the caller ``looked`` already) finds an overflow (inf), and only those parts
        are recomputed by ``again``'s functions, with float64 accumulation (:func:`l2_norm`)."""
        if not again or not looked and not bool(
                torch.isinf(torch.cat([parts[i][2] for i, _ in again])).any()):
            return parts
        for i, recompute in again:
            if bool(torch.isinf(parts[i][2]).any()):
                parts[i] = (*parts[i][:2], recompute())
        return parts

    def snapshot(self) -> list:
        """‖w‖ before the step, copying the parameters into the Δw snapshot (in their own dtype)."""
        checked = not self.looks_on_host
        parts = [(PARAM_NORM_BEFORE, c.index, self._snapshot_norms(c, checked)) for c in self.classes]
        return self._recheck(parts, [] if checked else [
            (i, lambda c=c: norms(c.stack_params())) for i, c in enumerate(self.classes)])

    def _snapshot_norms(self, c: ShapeClass, checked: bool = True) -> torch.Tensor:
        """Take the Δw snapshot of ``c`` (in the parameters' dtype) and return ‖w‖ per member."""
        if not self.keeps_snapshot:
            return norms(c.stack_params(), checked)
        if c.snapshot.dtype == c.scratch.dtype:
            weights = norms(c.stack_params("snapshot"), checked)  # float32/64: the snapshot is the matrix
        else:
            weights = norms(c.stack_params(), checked)  # upcast copy in the scratch, for the norms
            c.fill(c.data(), "snapshot")
        c.shapes_at_snapshot = c.shapes_now
        return weights

    def after_step(self) -> list:
        """‖w‖ after the step and the update statistics, from the snapshot taken by :meth:`before_step`.

        Δw pairs elements by index: a parameter that an optimizer relaid in memory (``p.data =``
        a copy in another layout, same shape) is measured exactly; one that changed shape raises
        :class:`~gradflow.errors.GradflowError` (:func:`check_same_shapes`).
        """
        parts, again = [], []
        checked = not self.looks_on_host
        for c in self.classes:
            after = c.stack_params()
            if not checked:
                again.append((len(parts), lambda c=c: norms(c.stack_params())))
            parts.append((PARAM_NORM_AFTER, c.index, norms(after, checked)))
            if not self.keeps_snapshot:
                continue
            check_same_shapes(c.shapes_at_snapshot, c.shapes_now, c.shapes, "optimizer step")
            in_place = c.snapshot.dtype == after.dtype
            if in_place:
                diff = c.snapshot_rows.sub_(after)  # w_before − w_after, in place
            else:
                diff = after.sub_(c.snapshot_rows)  # w_after − w_before, upcast while subtracting
            if not checked:  # |Δw| stays in the snapshot; else the snapshot still holds w_before
                again.append((len(parts), lambda c=c, in_place=in_place: norms(
                    c.snapshot_rows if in_place else c.stack_params().sub_(c.snapshot_rows))))
            norm, abs_sum, max_abs = update_stats(diff, checked)
            parts += [(UPDATE_NORM, c.index, norm), (UPDATE_ABS_SUM, c.index, abs_sum),
                      (UPDATE_MAX_ABS, c.index, max_abs)]
        return self._recheck(parts, again)

    def not_stepped(self) -> list:
        """‖w‖ for a recorded step in which this bucket's optimizer did not step (no update)."""
        parts = []
        for c in self.classes:
            norm = norms(c.stack_params())
            parts += [(PARAM_NORM_BEFORE, c.index, norm), (PARAM_NORM_AFTER, c.index, norm)]
        return parts

    def _keep_epoch_start(self, c: ShapeClass) -> None:
        if self.device.type == "cpu":
            c.shapes_at_epoch = c.fill(c.data(), "epoch")  # same dtype, no scratch
        else:
            c.rows("epoch").copy_(c.stack_params(), non_blocking=True)  # exact: back to the own dtype
            c.shapes_at_epoch = c.shapes_now

    def start_epoch(self) -> None:
        """Keep a host copy of the current weights (the epoch start W_start) in their own dtype."""
        if not self.keeps_snapshot:
            return
        pinned = self.device.type == "cuda"
        for c in self.classes:
            c.epoch = _epoch_buffer(c.snapshot, pinned)
            if isinstance(c, RaggedClass):
                c.views.pop("epoch", None)
            self._keep_epoch_start(c)

    def check_epoch(self) -> None:
        """Raise :class:`~gradflow.errors.GradflowError` where :meth:`end_epoch` would: a parameter
        of another size, dtype or device than when built (:func:`replaced`), or of another shape
        than at the epoch's start (:func:`check_same_shapes`; a layout change alone is measured,
        elements paired by index). Changes nothing."""
        if not self.keeps_snapshot:
            return
        for c in self.classes:
            shapes = conform(c.data(), c.shapes, c.dtype, c.device)[1]
            check_same_shapes(c.shapes_at_epoch, shapes, c.shapes, "epoch")

    def end_epoch(self) -> list:
        """Σ|W_end − W_start| and ‖W_end − W_start‖ per tensor; then W_end becomes the new start.
        Raises as :meth:`check_epoch`, before anything changes."""
        if not self.keeps_snapshot:
            return []
        self.check_epoch()
        parts = []
        for c in self.classes:
            now = c.stack_params()
            diff = now.sub_(c.rows("epoch").to(self.device, non_blocking=True))
            parts += [(EPOCH_NORM, c.index, norms(diff)),
                      (EPOCH_ABS_SUM, c.index, diff.abs_().sum(1))]
            self._keep_epoch_start(c)
        return parts


@dataclass
class ForeachBucket:
    """The recorded tensors of one optimizer, device and dtype, reduced with multi-tensor kernels.

    Where :class:`Bucket` stacks each shape class into a matrix (few, large dispatches: fastest on
    a CPU), this computes every statistic with ``torch._foreach_norm`` / ``_foreach_copy_`` /
    ``_foreach_sub_`` over all the bucket's tensors at once: on a GPU each is one multi-tensor
    kernel launch per ~100 tensors, so a recorded step costs a fixed handful of launches per
    bucket whatever the number of shapes, with no stacking copies and one ``stack`` of the results.
    Statistics are the same as :class:`Bucket`'s (float32 accumulation, float64 for float64).

    Memory: the Δw snapshot in the parameters' own dtype (for float32/float64 the update is taken
    in place in it, no scratch); for bfloat16/float16 parameters, and for the epoch statistics, a
    scratch of at most :data:`SCRATCH_FRACTION` of the parameters' bytes, used block by block;
    the epoch-start copy in host memory in the parameters' own dtype. One host sync per recorded
    step on a CPU (whether any max|g| is non-finite; only then are non-finite entries counted); none
    on a GPU, where the non-finite entries are counted every recorded step (:meth:`_nonfinite_counts`).
    """

    device: torch.device
    dtype: torch.dtype
    params: list[torch.Tensor]
    index: np.ndarray
    local: bool
    keeps_snapshot: bool
    snaps: list[torch.Tensor]  # per tensor, in the parameters' dtype
    pieces: list[tuple[int, int, int]]  # (tensor, start, stop) flat ranges of at most one scratch
    chunks: list[list[int]]  # piece numbers, each chunk fitting the scratch
    scratch_views: list[list[torch.Tensor]]  # per chunk, 1-D compute-dtype views, one per piece
    piece_index: list[Split]  # per chunk, the pieces' tensor indices
    epoch: list[torch.Tensor] = field(default_factory=list)  # host, per tensor, own dtype
    classes: list = field(default_factory=list)  # (Bucket's; unused here)
    scratch_flat: list[torch.Tensor] = field(default_factory=list)  # per chunk, its span of the scratch
    snapshot_flat: torch.Tensor | None = None  # the buffer ``snaps`` are views of
    # Count non-finite entries every recorded step instead of after a host look (GPUs: no sync).
    count_always: bool = False
    shapes: list = field(default_factory=list)  # per tensor, its shape when built (as ``snaps``)
    shapes_at_snapshot: list | None = None  # the shapes at the Δw snapshot (None: as built)
    shapes_at_epoch: list | None = None  # the shapes at the epoch-start copy (None: as built)

    @classmethod
    def build(cls, params: list[torch.Tensor], index: list[int], snapshot: bool = True,
              scratch_elements: int | None = None) -> ForeachBucket:
        data, local, device, dtype, work, numel, scratch_elements = _measure(params, scratch_elements)
        scratch_elements = min(scratch_elements, PIECE_MAX_ELEMENTS)
        flat = torch.empty(sum(numel) if snapshot else 0, dtype=dtype, device=device)
        snaps, offset = [], 0
        for d, n in zip(data, numel):
            snaps.append(flat[offset:offset + n].view(d.shape) if snapshot else None)
            offset += n if snapshot else 0
        pieces = [(j, a, min(n, a + scratch_elements)) for j, n in enumerate(numel)
                  for a in range(0, n, scratch_elements)]
        chunks, used = [[]], 0
        for k, (_, a, b) in enumerate(pieces):
            if used + b - a > scratch_elements and chunks[-1]:
                chunks.append([])
                used = 0
            chunks[-1].append(k)
            used += b - a
        scratch = torch.empty(max(sum(pieces[k][2] - pieces[k][1] for k in c) for c in chunks),
                              dtype=work, device=device)
        views, flats, piece_index = [], [], []
        for c in chunks:
            offsets = np.cumsum([0] + [pieces[k][2] - pieces[k][1] for k in c])
            # A whole tensor's piece is viewed in its own shape, so its source needs no reshape.
            views.append([scratch[offsets[i]:offsets[i + 1]].view(
                data[pieces[k][0]].shape if pieces[k][2] - pieces[k][1] == numel[pieces[k][0]] else -1)
                for i, k in enumerate(c)])
            flats.append(scratch[:offsets[-1]])
            piece_index.append(Split(np.array([index[pieces[k][0]] for k in c])))
        return cls(device, dtype, list(params), np.array(index), local, snapshot, snaps, pieces,
                   chunks, views, piece_index, scratch_flat=flats, snapshot_flat=flat,
                   count_always=device.type != "cpu", shapes=list(map(_SHAPE, data)))

    def data(self) -> list[torch.Tensor]:
        return [_local(p) for p in self.params] if self.local else self.params

    def _conformed(self, tensors: list, present: np.ndarray | None = None) -> tuple[list, list | None]:
        """``tensors`` (one per bucket tensor) checked against their shapes, dtype and device at
        build time; in the common case with C-level passes only, else through :func:`conform`
        (which reshapes, raises, or fills in missing gradients). Returns the tensors, shaped as
        built, and their shapes (None: as built)."""
        try:
            if list(map(_SHAPE, tensors)) == self.shapes and set(map(_DTYPE, tensors)) == {
                    self.dtype} and set(map(_DEVICE, tensors)) == {self.device} and (
                    present is None or set(map(_LAYOUT, tensors)) == {torch.strided}):
                return tensors, None
        except AttributeError:  # a missing gradient (None)
            pass
        return conform(tensors, self.shapes, self.dtype, self.device, present, self.index)

    def _norms(self, tensors: list[torch.Tensor], ord: float = 2) -> list[torch.Tensor]:
        """Per-tensor norms accumulated in float64: float32 squares overflow above ~1.8e19."""
        return list(torch._foreach_norm(tensors, ord, dtype=torch.float64))

    def before_step(self, present: np.ndarray, grad_scale: torch.Tensor | None) -> list:
        """:meth:`gradient_parts` and :meth:`snapshot` together (a step without a closure)."""
        return self.gradient_parts(present, grad_scale) + self.snapshot()

    def gradient_parts(self, present: np.ndarray, grad_scale: torch.Tensor | None) -> list:
        """As :meth:`Bucket.gradient_parts`; the one host look of a recorded step is here."""
        grads = list(map(_GRAD, self.params))
        if self.local:
            grads = [None if g is None else _local(g) for g in grads]
        grads = self._conformed(grads, present)[0]
        norm, max_abs = torch.stack(self._norms(grads) + self._norms(grads, math.inf)).split(len(grads))
        parts = []
        if self.count_always:  # on a GPU a host look would cost a sync per step
            parts += self._nonfinite_counts(grads)
        elif not math.isfinite(max_abs.sum().item()):  # count non-finite entries only if any
            counts = [(~torch.isfinite(g)).sum() for g in grads]
            parts.append((GRAD_NONFINITE, self.index, torch.stack(counts).to(norm.dtype)))
        norm, max_abs = unscaled(grad_scale, self.device, norm, max_abs)
        return parts + [(GRAD_NORM, self.index, norm), (GRAD_MAX_ABS, self.index, max_abs)]

    def _nonfinite_counts(self, grads: list[torch.Tensor]) -> list:
        """Per tensor, the number of NaN and ±Inf entries, without looking at any value on the host.

        Chunk by chunk through the scratch (no gradient-sized temporary): 0·g is 0 where g is
        finite and NaN where it is not; NaN becomes 1, and the ord-1 norm of each piece is its
        count (pieces are at most :data:`PIECE_MAX_ELEMENTS` long, so it is exact). Four kernels
        per chunk, multi-tensor and flat ones (``_foreach_norm`` has no multi-tensor kernel for
        ord 0).
        """
        parts, flattened = [], {}
        for c, views in enumerate(self.scratch_views):
            torch._foreach_copy_(views, self._blocks(c, grads, flattened))
            flat = self.scratch_flat[c]
            torch.nan_to_num_(flat.mul_(0.0), nan=1.0)
            counts = torch.stack(torch._foreach_norm(views, 1))
            parts.append((GRAD_NONFINITE, self.piece_index[c], counts))
        return parts

    def snapshot(self) -> list:
        """‖w‖ before the step, copying the parameters into the Δw snapshot (in their own dtype)."""
        data, self.shapes_at_snapshot = self._conformed(self.data())
        if self.keeps_snapshot:
            torch._foreach_copy_(self.snaps, data)
        return [(PARAM_NORM_BEFORE, self.index, torch.stack(self._norms(data)))]

    def _blocks(self, chunk: int, tensors: list[torch.Tensor],
                flattened: dict | None = None) -> list[torch.Tensor]:
        """The chunk's pieces of ``tensors`` (one per bucket tensor), shaped as the scratch views:
        a whole tensor as itself, a block of a larger one as a flat slice. ``flattened`` (one dict
        per pass over the chunks) keeps the last split tensor's flat form: a non-contiguous one
        (transposed, channels_last) is copied once for all its pieces, not once per piece."""
        out = []
        for k, view in zip(self.chunks[chunk], self.scratch_views[chunk]):
            j, a, b = self.pieces[k]
            t = tensors[j]
            if view.dim() != 1 or b - a == t.numel() and t.dim() == 1:
                out.append(t)
                continue
            flat = None if flattened is None else flattened.get(j)
            if flat is None:
                flat = t.reshape(-1)
                if flattened is not None:
                    flattened.clear()  # pieces of one tensor are consecutive: keep one at a time
                    flattened[j] = flat
            out.append(flat[a:b])
        return out

    def _chunked_difference(self, start: list[torch.Tensor], data: list[torch.Tensor],
                            rows: tuple) -> list:
        """Statistics ``rows`` (ord 2, 1[, inf]) of (``data`` − ``start``), upcast block by block;
        both shaped as built (:meth:`_conformed`)."""
        parts, start_flat, data_flat = [], {}, {}
        for c, views in enumerate(self.scratch_views):
            # start may be the pinned host epoch copy: stream-ordered before the copy that refills it
            torch._foreach_copy_(views, self._blocks(c, start, start_flat), non_blocking=True)
            torch._foreach_sub_(views, self._blocks(c, data, data_flat))
            values = torch.stack([v for ord in (2, 1, math.inf)[:len(rows)]
                                  for v in self._norms(views, ord)]).split(len(views))
            parts += [(row, self.piece_index[c], v) for row, v in zip(rows, values)]
        return parts

    def after_step(self) -> list:
        """As :meth:`Bucket.after_step` (Δw pairs elements by index; raises where a shape changed)."""
        data, shapes = self._conformed(self.data())
        after = self._norms(data)
        if not self.keeps_snapshot:
            return [(PARAM_NORM_AFTER, self.index, torch.stack(after))]
        check_same_shapes(self.shapes_at_snapshot, shapes, self.shapes, "optimizer step")
        if compute_dtype(self.dtype) == self.dtype:  # float32/64: the update in place, exactly
            torch._foreach_sub_(self.snaps, data)
            values = torch.stack(after + self._norms(self.snaps) + self._norms(self.snaps, 1)
                                 + self._norms(self.snaps, math.inf)).split(len(data))
            rows = (PARAM_NORM_AFTER, UPDATE_NORM, UPDATE_ABS_SUM, UPDATE_MAX_ABS)
            return [(row, self.index, v) for row, v in zip(rows, values)]
        return [(PARAM_NORM_AFTER, self.index, torch.stack(after))] + self._chunked_difference(
            self.snaps, data, (UPDATE_NORM, UPDATE_ABS_SUM, UPDATE_MAX_ABS))

    def not_stepped(self) -> list:
        norm = torch.stack(self._norms(self._conformed(self.data())[0]))
        return [(PARAM_NORM_BEFORE, self.index, norm), (PARAM_NORM_AFTER, self.index, norm)]

    def start_epoch(self) -> None:
        if not self.keeps_snapshot:
            return
        pinned = self.device.type == "cuda"
        data, self.shapes_at_epoch = self._conformed(self.data())
        self.epoch = [_epoch_buffer(d, pinned) for d in data]
        torch._foreach_copy_(self.epoch, data, non_blocking=pinned)

    def check_epoch(self) -> list[torch.Tensor]:
        """As :meth:`Bucket.check_epoch`; returns the parameters shaped as built."""
        data, shapes = self._conformed(self.data())
        if self.keeps_snapshot:
            check_same_shapes(self.shapes_at_epoch, shapes, self.shapes, "epoch")
        return data

    def end_epoch(self) -> list:
        """As :meth:`Bucket.end_epoch`."""
        if not self.keeps_snapshot:
            return []
        data = self.check_epoch()
        parts = self._chunked_difference(self.epoch, data, (EPOCH_NORM, EPOCH_ABS_SUM))
        torch._foreach_copy_(self.epoch, data, non_blocking=self.device.type == "cuda")
        return parts


@dataclass
class HostStats:
    """Statistics of one step or epoch on their way to the host: one vector per device."""

    vectors: list  # per device: a host tensor, or on the CPU the parts' tensors, joined by resolve()
    layouts: list[list[tuple[int, np.ndarray]]]
    events: list  # CUDA events marking the end of each device→host copy (None on CPU)
    present: np.ndarray | None = None  # a PRESENT part's flags (bool, per tensor), set by resolve()

    def resolve(self, rows: int, tensors: int) -> tuple[np.ndarray, float]:
        """Wait for the copies; scatter into a zero ``(rows, tensors)`` float64 matrix.

        ``rows`` is :data:`NUM_STATS` (a step) or 2 (an epoch). Parts of one tensor's blocks
        (:class:`Split`) are combined: norms as sqrt(Σ‖·‖²), sums added, maxima the max.
        Returns the matrix and the sum of any :data:`FOUND_INF` flags; a :data:`PRESENT` part's
        flags are left in :attr:`present`.
        """
        out = np.zeros((rows, tensors))
        kinds = STEP_KINDS if rows == NUM_STATS else EPOCH_KINDS
        blocks, in_blocks = None, {}  # per row: split parts, combined apart (never overlapping)
        found_inf = 0.0
        for vector, layout, event in zip(self.vectors, self.layouts, self.events):
            if event is not None:
                event.synchronize()
            if isinstance(vector, list):
                vector = torch.cat(vector)
            values = vector.numpy().astype(np.float64, copy=False)
            offset = 0
            for row, index in layout:
                n = 1 if index is None else len(index)
                part = values[offset:offset + n]
                if row == FOUND_INF:
                    found_inf += float(part[0])
                elif row == PRESENT:
                    self.present = part > 0
                elif isinstance(index, Split):
                    if blocks is None:
                        blocks, nans = np.zeros((rows, tensors)), np.zeros((rows, tensors), bool)
                    in_blocks.setdefault(row, []).append(index.index)
                    if kinds[row] == "norm":
                        with np.errstate(over="ignore"):  # a float64 norm above 1e154: inf
                            np.add.at(blocks[row], index.index, part**2)
                    elif kinds[row] == "sum":
                        np.add.at(blocks[row], index.index, part)
                    else:  # max|·| ≥ 0, so 0 is the identity; NaN wins
                        np.fmax.at(blocks[row], index.index, part)
                        nans[row, index.index[np.isnan(part)]] = True
                else:
                    out[row, index] = part
                offset += n
        if blocks is not None:
            blocks[nans] = np.nan
            for row, indices in in_blocks.items():
                where = np.unique(np.concatenate(indices))
                out[row, where] = (np.sqrt(blocks[row, where]) if kinds[row] == "norm"
                                   else blocks[row, where])
        return out, found_inf


def to_host(parts: list) -> HostStats:
    """Concatenate ``(row, index, values)`` parts per device and start one device→host copy each.

    CPU parts are already on the host: they are kept as they are (fresh tensors nothing writes to
    again) and joined by :meth:`HostStats.resolve` on the writer thread, off the training thread.
    """
    by_device: dict[torch.device, list] = {}
    for part in parts:
        by_device.setdefault(part[2].device, []).append(part)
    vectors, layouts, events = [], [], []
    for device, group in by_device.items():
        event = None
        if device.type == "cpu":
            vector = [values for _, _, values in group]
        else:
            vector = torch.cat([values for _, _, values in group])  # all parts are 1-D
        if device.type == "cuda":
            host = torch.empty(vector.shape, dtype=vector.dtype, pin_memory=True)
            host.copy_(vector, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            vector = host
        elif device.type != "cpu":
            vector = vector.cpu()
        vectors.append(vector)
        layouts.append([(row, index) for row, index, _ in group])
        events.append(event)
    return HostStats(vectors, layouts, events)


def layer_step_stats(per_tensor: np.ndarray, present: np.ndarray, starts: np.ndarray,
                       numel: np.ndarray, owned: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-layer step statistics from per-tensor ones.

    ``per_tensor``: (n, NUM_STATS, T) float64; ``present``: (n, T) bool, whether a tensor had a
    gradient; ``starts``: (L,) index of each layer's first tensor (tensors are in layer order);
    ``numel``: (L,) element count per layer. Gradient statistics are over the tensors that had a
    gradient, NaN for a layer none of whose tensors had one. ``owned``: (n, T) bool, whether an
    optimizer owned the tensor at that step (default: all); a layer none of whose tensors an
    optimizer owned gets NaN ``param_norm`` and ``update_ratio`` (its update statistics are 0: no
    optimizer step changes it). Returns (n, L) float32 arrays.
    """
    def add(values):
        return np.add.reduceat(values, starts, axis=1)

    def norm(row):
        return np.sqrt(add(per_tensor[:, row] ** 2))

    def largest(row):
        return np.maximum.reduceat(per_tensor[:, row], starts, axis=1)

    has_grad = np.logical_or.reduceat(present, starts, axis=1)
    with np.errstate(all="ignore"):  # 0/0 of an empty layer, squares above 1e154, float32 casts
        update_norm = norm(UPDATE_NORM)
        statistics = {
            "grad_norm": norm(GRAD_NORM),
            "grad_max_abs": largest(GRAD_MAX_ABS),
            "update_norm": update_norm,
            "update_mean_abs": add(per_tensor[:, UPDATE_ABS_SUM]) / numel,
            "update_max_abs": largest(UPDATE_MAX_ABS),
            "param_norm": norm(PARAM_NORM_AFTER),
            "update_ratio": update_norm / norm(PARAM_NORM_BEFORE),
            "nonfinite": add(per_tensor[:, GRAD_NONFINITE]),
        }
        for name in ("grad_norm", "grad_max_abs", "nonfinite"):
            statistics[name][~has_grad] = np.nan
        if owned is not None:
            has_owner = np.logical_or.reduceat(owned, starts, axis=1)
            for name in ("param_norm", "update_ratio"):
                statistics[name][~has_owner] = np.nan
        return {name: values.astype(np.float32) for name, values in statistics.items()}


def layer_epoch_stats(per_tensor: np.ndarray, starts: np.ndarray,
                        numel: np.ndarray) -> dict[str, np.ndarray]:
    """Per-layer epoch statistics from a (2, T) matrix: mean |W_end − W_start| and ‖W_end − W_start‖
    (NaN mean for a layer of no elements; inf where a figure exceeds float32, without warnings)."""
    with np.errstate(all="ignore"):  # as in layer_step_stats
        abs_sum = np.add.reduceat(per_tensor[EPOCH_ABS_SUM], starts)
        norm = np.sqrt(np.add.reduceat(per_tensor[EPOCH_NORM] ** 2, starts))
        return {"update_mean_abs": (abs_sum / numel).astype(np.float32),
                "update_norm": norm.astype(np.float32)}
