"""Per-tensor figures on the device, per-layer figures on the host.

On a recorded step the Recorder needs, for every recorded parameter tensor, eight numbers: three about
its gradient, two parameter norms and three about its real update Δw = w_after − w_before. Asking
torch for them tensor by tensor costs a dispatch (and on a GPU a host sync) per tensor and figure,
which dominates a deep narrow network. Instead the tensors of one :class:`Bucket` (same optimizer,
device and dtype) are split into *shape classes*; each class is stacked into one ``(k, numel)``
matrix and reduced row-wise, so a recorded step costs a handful of fused kernels per shape class,
independent of the number of tensors. Small shape classes share one zero-padded :class:`RaggedClass`
(a 200-layer MLP has two shape classes, weights and biases, and one ragged class for the odd first
and last layers). All figures of a step are concatenated into one vector and copied to the host once
per device (:func:`to_host`; on the CPU the concatenation happens on the writer thread).

Families of figures (Cockpit/BackPACK style, one function each):

* :func:`gradient_figures` – ‖g‖, max|g|, and :func:`nonfinite_counts` – count of NaN/±Inf in g;
* :func:`norms` – ‖w‖ (parameter norms, before and after the step);
* :func:`update_figures` – ‖d‖, Σ|d|, max|d| of the update d (sign does not matter).

Figures are computed in float32 (float64 for float64 parameters): bfloat16/float16 tensors are upcast
exactly before any arithmetic. Per-layer figures (:func:`layer_step_figures`,
:func:`layer_epoch_figures`) combine a layer's tensors on the host in float64: norms are
sqrt(Σ‖·‖²), means Σ|·| / Σnumel, maxima the max over tensors.

Memory per bucket: the Δw snapshot, one copy of the recorded parameters (float32 for bfloat16 ones),
written only on recorded steps; a scratch buffer the size of the largest shape class, into which one
class of gradients or parameters at a time is stacked; the ragged class's own padded snapshot and
scratch (at most RAGGED_MAX_ELEMENTS elements per row); and the epoch-start copy in host memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

# Rows of the per-tensor figure matrix (F × T) that one recorded step produces.
GRAD_NORM, GRAD_MAX_ABS, GRAD_NONFINITE, PARAM_NORM_BEFORE, UPDATE_NORM, UPDATE_ABS_SUM, \
    UPDATE_MAX_ABS, PARAM_NORM_AFTER = range(8)
NUM_FIGURES = 8
FOUND_INF = -1  # pseudo-row: GradScaler's found_inf flag handed to a fused optimizer (see recorder)

# A shape class this small (fewer than RAGGED_MAX_TENSORS tensors, at most RAGGED_MAX_ELEMENTS
# elements in all) joins the bucket's one RaggedClass: a dozen kernel launches per recorded step
# cost more than its zero padding (at most RAGGED_MAX_ELEMENTS elements per tensor).
RAGGED_MAX_TENSORS = 64
RAGGED_MAX_ELEMENTS = 4096

# Rows of the per-tensor figure matrix (2 × T) that one epoch produces.
EPOCH_ABS_SUM, EPOCH_NORM = range(2)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, bfloat16, float16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gradient_figures(grads: torch.Tensor) -> list[torch.Tensor]:
    """Row-wise ‖g‖ and max|g| of a ``(k, n)`` gradient matrix, which is overwritten by |g|.

    Both are NaN/Inf when a row holds NaN/Inf (|g| keeps them where they are).
    """
    magnitude = grads.abs_()
    return [torch.linalg.vector_norm(magnitude, dim=1), magnitude.amax(1)]


def nonfinite_counts(grads: torch.Tensor) -> torch.Tensor:
    """Row-wise count of NaN and ±Inf entries of a ``(k, n)`` matrix (which is overwritten).

    0·x is 0 for finite x and NaN for NaN and ±Inf, so one multiply, one ``nan_to_num`` and one
    sum replace slow boolean kernels. Exact up to 2**24 per tensor in float32 (float64 above).
    """
    flags = torch.nan_to_num(grads.mul_(0), nan=1.0)
    return flags.sum(1, dtype=torch.float64 if grads.shape[1] > 2**24 else grads.dtype)


def norms(weights: torch.Tensor) -> torch.Tensor:
    """Row-wise ‖w‖ of a ``(k, n)`` matrix."""
    return torch.linalg.vector_norm(weights, dim=1)


def update_figures(diff: torch.Tensor) -> list[torch.Tensor]:
    """Row-wise ‖d‖, Σ|d| and max|d| of a ``(k, n)`` update matrix, which is overwritten by |d|."""
    norm = torch.linalg.vector_norm(diff, dim=1)
    magnitude = diff.abs_()
    return [norm, magnitude.sum(1), magnitude.amax(1)]


@dataclass
class ShapeClass:
    """Parameter tensors of one bucket with the same shape, reduced together as one matrix."""

    params: list[torch.Tensor]
    index: np.ndarray  # their global tensor indices (layer order), for the host-side scatter
    snapshot: torch.Tensor  # (k, *shape) view into the bucket's flat snapshot buffer
    scratch: torch.Tensor  # (k, *shape) view into the bucket's scratch buffer (shared by classes)
    zeros: dict = field(default_factory=dict)  # shape → zeros standing in for a missing gradient
    # The same buffers seen as (k, numel) matrices, made once: a view costs a dispatch per call.
    snapshot_rows: torch.Tensor = field(init=False)
    scratch_rows: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.snapshot_rows = self.snapshot.view(len(self.params), -1)
        self.scratch_rows = self.scratch.view(len(self.params), -1)

    def fill(self, tensors: list[torch.Tensor], into_snapshot: bool) -> None:
        """Copy ``tensors`` (one per member) into the snapshot or scratch buffer (exact upcast)."""
        torch.stack(tensors, out=self.snapshot if into_snapshot else self.scratch)

    def stack_params(self, into_snapshot: bool = False) -> torch.Tensor:
        """The parameters stacked into the scratch (or the snapshot) buffer, as a (k, numel) matrix."""
        self.fill(self.params, into_snapshot)
        return self.snapshot_rows if into_snapshot else self.scratch_rows

    def stack_grads(self, present: np.ndarray) -> torch.Tensor:
        """The gradients stacked into the scratch buffer, as a (k, numel) matrix.

        Zeros stand in for missing gradients (``present`` is cleared for those) and sparse ones
        (``nn.Embedding(sparse=True)``) are made dense; both are found by the stack failing, so the
        common case looks at each ``.grad`` once.
        """
        grads = [p.grad for p in self.params]
        try:
            self.fill(grads, into_snapshot=False)
        except (TypeError, RuntimeError):  # None does not stack (TypeError), sparse does not either
            for j, g in enumerate(grads):
                if g is None:
                    present[self.index[j]] = False
                    p = self.params[j]
                    if p.shape not in self.zeros:
                        self.zeros[p.shape] = torch.zeros_like(
                            p, memory_format=torch.contiguous_format)
                    grads[j] = self.zeros[p.shape]
                elif g.layout != torch.strided:
                    grads[j] = g.to_dense()
            self.fill(grads, into_snapshot=False)
        return self.scratch_rows


@dataclass
class RaggedClass(ShapeClass):
    """Small tensors of assorted shapes (small shape classes, see :data:`RAGGED_MAX_TENSORS`), one
    per row of a zero-padded ``(k, widest numel)`` matrix.

    A model's odd tensors (first and last layer, a lone bias of one element, a few biases) would
    each be a shape class of its own, costing a dozen kernel launches apiece per recorded step;
    here they cost a dozen together. The zero padding changes no figure (it adds 0 to every sum
    and norm, and max|·| ≥ 0). ``snapshot`` and ``scratch`` are this class's own zero-initialised
    ``(k, width)`` buffers, filled through per-tensor views of their rows.
    """

    snapshot_views: list[torch.Tensor] = field(init=False)
    scratch_views: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.snapshot_rows, self.scratch_rows = self.snapshot, self.scratch
        self.snapshot_views = [row[:p.numel()].view(p.shape)
                               for row, p in zip(self.snapshot, self.params)]
        self.scratch_views = [row[:p.numel()].view(p.shape)
                              for row, p in zip(self.scratch, self.params)]

    def fill(self, tensors: list[torch.Tensor], into_snapshot: bool) -> None:
        torch._foreach_copy_(self.snapshot_views if into_snapshot else self.scratch_views, tensors)


@dataclass
class Bucket:
    """The recorded tensors one optimizer owns on one device with one dtype.

    Owns the Δw snapshot: one flat buffer in the compute dtype holding a copy of these tensors,
    written only on recorded steps (so it costs one copy of the recorded parameters, float32 for
    bfloat16 parameters); a scratch buffer the size of the largest shape class, into which
    gradients and updated parameters are stacked; and the epoch-start copy kept on the host.
    """

    device: torch.device
    dtype: torch.dtype
    classes: list[ShapeClass] = field(default_factory=list)
    epoch_start: list[torch.Tensor] = field(default_factory=list)  # host copies, one per class

    @classmethod
    def build(cls, params: list[torch.Tensor], index: list[int]) -> Bucket:
        """Group ``params`` (all on one device with one dtype) into shape classes and a ragged one."""
        device, dtype = params[0].device, params[0].dtype
        work = compute_dtype(dtype)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        ragged = [i for shape, members in by_shape.items()
                  if len(members) < RAGGED_MAX_TENSORS
                  and len(members) * math.prod(shape) <= RAGGED_MAX_ELEMENTS for i in members]
        if len(ragged) < 2:
            ragged = []  # nothing to merge
        by_shape = {shape: members for shape, members in by_shape.items()
                    if members[0] not in ragged}
        bucket = cls(device, dtype)
        if by_shape:
            sizes = {shape: len(members) * math.prod(shape) for shape, members in by_shape.items()}
            flat = torch.empty(sum(sizes.values()), dtype=work, device=device)
            scratch = torch.empty(max(sizes.values()), dtype=work, device=device)
            offset = 0
            for shape, members in by_shape.items():
                size = sizes[shape]
                bucket.classes.append(ShapeClass(
                    [params[i] for i in members], np.array([index[i] for i in members]),
                    flat[offset:offset + size].view(len(members), *shape),
                    scratch[:size].view(len(members), *shape)))
                offset += size
        if ragged:
            width = max(params[i].numel() for i in ragged)
            bucket.classes.append(RaggedClass(
                [params[i] for i in ragged], np.array([index[i] for i in ragged]),
                torch.zeros(len(ragged), width, dtype=work, device=device),
                torch.zeros(len(ragged), width, dtype=work, device=device)))
        return bucket

    def check_device(self) -> bool:
        """False when the parameters moved to another device or dtype after the Recorder was built."""
        p = self.classes[0].params[0]
        return p.device == self.device and p.dtype == self.dtype

    def before_step(self, present: np.ndarray, grad_scale: torch.Tensor | None) -> list:
        """:meth:`gradient_parts` and :meth:`snapshot` together (a step without a closure)."""
        return self.gradient_parts(present, grad_scale) + self.snapshot()

    def gradient_parts(self, present: np.ndarray, grad_scale: torch.Tensor | None) -> list:
        """Gradient figures of the current ``.grad``; returns ``(row, index, values)`` parts.

        ``present`` (host, per global tensor) is cleared where a tensor has no gradient; its figures
        are then computed on zeros and the host turns them into NaN. ``grad_scale`` is the loss scale
        a GradScaler hands to a fused optimizer, whose gradients are still scaled at this point.
        Non-finite entries are counted on the GPU always; on the CPU, where looking at a value costs
        no sync, only when the sum of the max|g| is not finite (otherwise every count is exactly 0).
        """
        parts, seen = [], []
        count_now = self.device.type != "cpu"
        inv_scale = None if grad_scale is None else grad_scale.to(self.device).double().reciprocal()
        for c in self.classes:
            matrix = c.stack_grads(present)
            norm, max_abs = gradient_figures(matrix)
            if count_now:
                parts.append((GRAD_NONFINITE, c.index, nonfinite_counts(matrix)))
            else:
                seen.append((c, max_abs))
            if inv_scale is not None:
                norm, max_abs = norm * inv_scale, max_abs * inv_scale
            parts += [(GRAD_NORM, c.index, norm), (GRAD_MAX_ABS, c.index, max_abs)]
        if seen and not math.isfinite(sum(max_abs.sum().item() for _, max_abs in seen)):
            parts += [(GRAD_NONFINITE, c.index, nonfinite_counts(c.stack_grads(present)))
                      for c, _ in seen]
        return parts

    def snapshot(self) -> list:
        """‖w‖ before the step, copying the parameters into the Δw snapshot."""
        return [(PARAM_NORM_BEFORE, c.index, norms(c.stack_params(into_snapshot=True)))
                for c in self.classes]

    def after_step(self) -> list:
        """‖w‖ after the step and the update figures, from the snapshot taken by :meth:`before_step`."""
        parts = []
        for c in self.classes:
            after = c.stack_params()
            diff = c.snapshot_rows.sub_(after)  # w_before − w_after, in place
            norm, abs_sum, max_abs = update_figures(diff)
            parts += [(PARAM_NORM_AFTER, c.index, norms(after)), (UPDATE_NORM, c.index, norm),
                      (UPDATE_ABS_SUM, c.index, abs_sum), (UPDATE_MAX_ABS, c.index, max_abs)]
        return parts

    def idle(self) -> list:
        """‖w‖ for a recorded step in which this bucket's optimizer did not step (no update)."""
        parts = []
        for c in self.classes:
            norm = norms(c.stack_params())
            parts += [(PARAM_NORM_BEFORE, c.index, norm), (PARAM_NORM_AFTER, c.index, norm)]
        return parts

    def start_epoch(self) -> None:
        """Keep a host copy of the current weights: the epoch start W_start (host memory, not GPU)."""
        pinned = self.device.type == "cuda"
        self.epoch_start = []
        for c in self.classes:
            now = c.stack_params()
            host = torch.empty(now.shape, dtype=now.dtype, pin_memory=pinned)
            self.epoch_start.append(host.copy_(now, non_blocking=pinned))

    def end_epoch(self) -> list:
        """Σ|W_end − W_start| and ‖W_end − W_start‖ per tensor; then W_end becomes the new start."""
        parts = []
        for c, start in zip(self.classes, self.epoch_start):
            now = c.stack_params()
            diff = now - start.to(self.device, non_blocking=True)
            parts += [(EPOCH_NORM, c.index, norms(diff)),
                      (EPOCH_ABS_SUM, c.index, diff.abs_().sum(1))]
            start.copy_(now, non_blocking=start.is_pinned())
        return parts


@dataclass
class HostFigures:
    """Figures of one step or epoch on their way to the host: one vector per device."""

    vectors: list  # per device: a host tensor, or on the CPU the parts' tensors, joined by resolve()
    layouts: list[list[tuple[int, np.ndarray]]]
    events: list  # CUDA events marking the end of each device→host copy (None on CPU)

    def resolve(self, rows: int, tensors: int) -> tuple[np.ndarray, float]:
        """Wait for the copies; scatter into a zero ``(rows, tensors)`` float64 matrix.

        Returns the matrix and the sum of any :data:`FOUND_INF` flags.
        """
        out = np.zeros((rows, tensors))
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
                if row == FOUND_INF:
                    found_inf += float(values[offset])
                else:
                    out[row, index] = values[offset:offset + n]
                offset += n
        return out, found_inf


def to_host(parts: list) -> HostFigures:
    """Concatenate ``(row, index, values)`` parts per device and start one device→host copy each.

    CPU parts are already on the host: they are kept as they are (fresh tensors nothing writes to
    again) and joined by :meth:`HostFigures.resolve` on the writer thread, off the training thread.
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
    return HostFigures(vectors, layouts, events)


def layer_step_figures(per_tensor: np.ndarray, present: np.ndarray, starts: np.ndarray,
                       numel: np.ndarray, owned: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-layer step figures from per-tensor ones.

    ``per_tensor``: (n, NUM_FIGURES, T) float64; ``present``: (n, T) bool, whether a tensor had a
    gradient; ``starts``: (L,) index of each layer's first tensor (tensors are in layer order);
    ``numel``: (L,) element count per layer. Gradient figures are over the tensors that had a
    gradient, NaN for a layer none of whose tensors had one. ``owned``: (n, T) bool, whether an
    optimizer owned the tensor at that step (default: all); a layer none of whose tensors an
    optimizer owned gets NaN ``param_norm`` and ``update_ratio`` (its update figures are 0: no
    optimizer step changes it). Returns (n, L) float32 arrays.
    """
    def add(values):
        return np.add.reduceat(values, starts, axis=1)

    def norm(row):
        return np.sqrt(add(per_tensor[:, row] ** 2))

    def largest(row):
        return np.maximum.reduceat(per_tensor[:, row], starts, axis=1)

    has_grad = np.logical_or.reduceat(present, starts, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        figures = {
            "grad_norm": norm(GRAD_NORM),
            "grad_max_abs": largest(GRAD_MAX_ABS),
            "update_norm": norm(UPDATE_NORM),
            "update_mean_abs": add(per_tensor[:, UPDATE_ABS_SUM]) / numel,
            "update_max_abs": largest(UPDATE_MAX_ABS),
            "param_norm": norm(PARAM_NORM_AFTER),
            "update_ratio": norm(UPDATE_NORM) / norm(PARAM_NORM_BEFORE),
            "nonfinite": add(per_tensor[:, GRAD_NONFINITE]),
        }
    for name in ("grad_norm", "grad_max_abs", "nonfinite"):
        figures[name][~has_grad] = np.nan
    if owned is not None:
        has_owner = np.logical_or.reduceat(owned, starts, axis=1)
        for name in ("param_norm", "update_ratio"):
            figures[name][~has_owner] = np.nan
    return {name: values.astype(np.float32) for name, values in figures.items()}


def layer_epoch_figures(per_tensor: np.ndarray, starts: np.ndarray,
                        numel: np.ndarray) -> dict[str, np.ndarray]:
    """Per-layer epoch figures from a (2, T) matrix: mean |W_end − W_start| and ‖W_end − W_start‖."""
    abs_sum = np.add.reduceat(per_tensor[EPOCH_ABS_SUM], starts)
    norm = np.sqrt(np.add.reduceat(per_tensor[EPOCH_NORM] ** 2, starts))
    return {"update_mean_abs": (abs_sum / numel).astype(np.float32),
            "update_norm": norm.astype(np.float32)}
