"""The bucket that the fused kernels share: per-tensor statistics read through a table of addresses.

:class:`~gradflow.quantities.ForeachBucket` needs no per-shape work, but each ``_foreach_norm``
returns one 0-d tensor per parameter tensor, which ``stack`` then joins: about 4 µs of host time
per tensor and statistic on a GPU (``reports/bench_launches_cuda.md``), more than a launch-bound
step can hide. :class:`FusedBucket` reads every tensor in place through a table of raw addresses
instead, and computes each phase with a few compiled calls whatever the tensors; its subclasses
hold the kernels:

* :class:`~gradflow.fused_triton.TritonFusedBucket`: two Triton kernels per phase (GPUs; on a CPU
  in Triton's interpreter, which is how the tests check them without a GPU);
* :class:`~gradflow.fused_cpu.CpuFusedBucket`: one Numba-compiled loop per phase (CPUs).

This module imports neither compiler, so that a CPU never loads Triton.

Phases (``MODE``): ``GRAD`` (‖g‖, max|g|, count of NaN/±Inf in g), ``SNAPSHOT`` (‖w‖, copying w
into the Δw snapshot, raw elements in the parameters' own dtype and memory order), ``AFTER``
(‖w‖ and, with d = w − w_snapshot: ‖d‖, Σ|d|, max|d|) and ``NORM`` (‖w‖ only). The host work per
phase is one Python pass over the tensors (their addresses, re-sent only when they change, after
:meth:`FusedBucket._check`) and the kernels' calls; the figures reach the host with the step's
other parts in one copy (:func:`gradflow.quantities.to_host`).

A parameter that is not dense in memory (a slice ``w[:, ::2]``, at build time or assigned later) is
read through a dense copy made afresh in each phase (its table of addresses is then never reused).
A bucket whose dtype has no kernel, or whose kernels fail to compile
or fail :func:`self_test` (once per kind, device and dtype: every figure of every phase against
float64 references on tensors with NaN, ±Inf, a missing gradient and several chunks) is not built
(:class:`Unavailable`): :func:`gradflow.buckets.build` then warns and falls back to a torch-only
kind, so a compiler that builds the kernels differently can cost speed, never exactness.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import numpy as np
import torch

from gradflow.quantities import (GRAD_MAX_ABS, GRAD_NONFINITE, GRAD_NORM, PARAM_NORM_AFTER,
                                 PARAM_NORM_BEFORE, UPDATE_ABS_SUM, UPDATE_MAX_ABS, UPDATE_NORM,
                                 ForeachBucket, _local, check_same_shapes, compute_dtype, replaced,
                                 unscaled)

GRAD, SNAPSHOT, AFTER, NORM = range(4)
ROWS = {GRAD: 3, SNAPSHOT: 1, AFTER: 4, NORM: 1}  # per-tensor figures each phase writes


# Unbound methods, mapped over a bucket's tensors in C (no Python frame per tensor).
_DATA_PTR, _NUMEL, _STRIDE = torch.Tensor.data_ptr, torch.Tensor.numel, torch.Tensor.stride
_IS_CONTIGUOUS = torch.Tensor.is_contiguous
_GRAD_OF, _DTYPE, _DEVICE = (operator.attrgetter(a) for a in ("grad", "dtype", "device"))


class Unavailable(Exception):
    """This bucket cannot use the fused kernels (the reason is the message)."""


def dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one gap-free run of memory (contiguous, channels_last, any
    permutation): then its statistics can be read as ``numel`` consecutive elements."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


@dataclass
class FusedBucket(ForeachBucket):
    """A :class:`~gradflow.quantities.ForeachBucket` whose step statistics come from fused kernels
    that read the tensors in place (epoch statistics, once per epoch, stay with the multi-tensor
    ops and the host epoch copy, except on :class:`~gradflow.fused_cpu.CpuFusedBucket`, whose
    kernels compute them too). A subclass supplies the kernels: :meth:`missing`,
    :meth:`supports`, :meth:`chunking`, :meth:`_make_tables` and :meth:`_run`. Raises
    :class:`Unavailable` from :meth:`build`.
    """

    tables: dict = field(default_factory=dict)  # the kernels' work tables (:meth:`_make_tables`)
    # "grad"/"param" → (host key, device table, per tensor (shape, strides) when it was sent)
    addresses: dict = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)  # per tensor, the elements the tables assume

    @classmethod
    def build(cls, params: list[torch.Tensor], index: list[int], snapshot: bool = True,
              scratch_elements: int | None = None, verify: bool = True) -> FusedBucket:
        """As :meth:`ForeachBucket.build`; ``verify``: pass :func:`self_test` for this device and
        dtype first. Raises :class:`Unavailable`."""
        if cls.missing():
            raise Unavailable(cls.missing())
        bucket = super().build(params, index, snapshot, scratch_elements)
        data = bucket.data()
        if not cls.supports(bucket.dtype):
            raise Unavailable(f"no kernel for {bucket.dtype}")
        bucket._make_tables(data)
        if verify:
            self_test(bucket.device, bucket.dtype, cls)
        bucket._warm_up(data)
        return bucket

    @classmethod
    def missing(cls) -> str:
        """Why the kernels cannot run in this installation ("" when they can)."""
        return "no kernels (FusedBucket is the fused kinds' base)"

    @classmethod
    def supports(cls, dtype: torch.dtype) -> bool:
        """Whether the kernels read parameters of ``dtype``."""
        return False

    @classmethod
    def chunking(cls) -> tuple[int, ...]:
        """The sizes that cut the kernels' work, elements per chunk first: :func:`self_test`'s long
        tensor has that many elements plus 5 (two chunks), and its verdict holds for these sizes
        only (tests shrink them)."""
        raise NotImplementedError

    def _make_tables(self, data: list[torch.Tensor]) -> None:
        """Set :attr:`sizes` (per tensor, ``numel``) and the kernels' :attr:`tables` for ``data``."""
        raise NotImplementedError

    def _run(self, mode: int, addresses: torch.Tensor) -> torch.Tensor:
        """One phase over the tensors at ``addresses`` (:meth:`_addresses`); returns a fresh
        ``(ROWS[mode], T)`` float64 tensor on the bucket's device."""
        raise NotImplementedError

    def _take_every_path(self) -> None:
        """Make the self-test's bucket take the code paths its small tensors would not (here: none;
        its long tensor already spans two chunks)."""

    def _warm_up(self, data: list[torch.Tensor]) -> None:
        """Compile this bucket's kernels now, not inside the first recorded step (reads only)."""
        try:
            addresses = self._addresses("param", data)
            self._run(GRAD, addresses)
            self._run(NORM, addresses)
        except Exception as err:  # a Triton compile or launch failure, whatever its class
            raise Unavailable(f"the kernels failed: {err!r}") from err

    def _addresses(self, kind: str, tensors: list[torch.Tensor | None]) -> torch.Tensor:
        """The device table of ``tensors``' addresses (0 for None), re-sent only when one moved,
        changed size or (a parameter) changed strides. A change is checked first
        (:meth:`_check`): the kernels read :attr:`sizes` elements of the bucket's dtype, densely,
        at each address; a parameter that a ``p.data = ...`` left gapped in memory is read through
        a dense copy, made afresh at every call (such a table is never reused). ``kind``:
        ``"param"`` (their layouts are kept, for :meth:`_relaid_updates`) or ``"grad"``. Raises
        :class:`~gradflow.errors.GradflowError`.

        This runs up to three times per recorded step, so it makes a few C-level passes over the
        tensors (``map`` of unbound methods), not a Python loop: about 60 ns per tensor and pass.
        """
        # The size is in the key: p.data = p.data[:4] keeps the address (the table would be reused).
        try:
            key = (list(map(_DATA_PTR, tensors)), list(map(_NUMEL, tensors)))
        except TypeError:  # a missing gradient (None): address 0
            key = ([0 if t is None else t.data_ptr() for t in tensors],
                   [n if t is None else t.numel() for t, n in zip(tensors, self.sizes)])
        if kind == "param":
            # So are the strides: p.data = p.data.t() (a square weight) keeps address and size but
            # pairs each element with another, and the layouts kept for _relaid_updates must be
            # those of the snapshot. (Gradients' statistics do not depend on their layout.)
            key += (list(map(_STRIDE, tensors)),)
        held = self.addresses.get(kind)
        if held is not None and held[0] == key:
            return held[1]
        gapped = self._check(kind, tensors, key[1])
        pointers, copies = key[0], []
        if gapped:  # read in logical order through dense copies, kept until the next call
            tensors, pointers = list(tensors), list(pointers)
            for j in gapped:
                tensors[j] = tensors[j].contiguous()
                pointers[j] = tensors[j].data_ptr()
                copies.append(tensors[j])
        host = torch.from_numpy(np.array(pointers, dtype=np.int64))  # torch.tensor(list) is slow
        if self.device.type == "cuda":
            host = host.pin_memory()  # the caching host allocator keeps it until the copy is done
        table = held[1] if held is not None else torch.empty(len(tensors), dtype=torch.int64,
                                                             device=self.device)
        table.copy_(host, non_blocking=True)
        layouts = [None if t is None else (t.shape, t.stride()) for t in tensors] \
            if kind == "param" else None
        self.addresses[kind] = (None if gapped else key, table, layouts, copies)
        return table

    def _check(self, kind: str, tensors: list[torch.Tensor | None], sizes: list[int]) -> list[int]:
        """Raise :class:`~gradflow.errors.GradflowError` unless every tensor (None: a missing
        gradient) holds as many elements as at build time (``sizes``: theirs now), in the bucket's
        dtype, on its device: what a ``p.data = ...`` (a slice, a cast, a move) may have changed.
        Read otherwise, the kernels would measure the wrong memory. Returns the positions of the
        parameters that are not dense in memory (``p.data = w[:, ::2]``), which must be read
        through dense copies.

        Gradients (which move every step where ``zero_grad`` frees them) are checked by size and
        dtype in the common case: torch keeps a gradient on its parameter's device, and
        :meth:`gradient_parts` has made them dense. The error is the other kinds' (:func:`replaced`)."""
        try:
            regular = sizes == self.sizes and set(map(_DTYPE, tensors)) == {self.dtype} and (
                kind == "grad" or all(map(_IS_CONTIGUOUS, tensors))
                and set(map(_DEVICE, tensors)) == {self.device})
        except AttributeError:  # a missing gradient (None)
            regular = False
        if regular:
            return []  # the common case, in a few C-level passes
        gapped = []
        for j, (t, size) in enumerate(zip(tensors, self.sizes)):
            if t is None:
                continue
            if not (t.numel() == size and t.dtype == self.dtype and t.device == self.device):
                raise replaced(t, size, self.dtype, self.device)
            if not dense(t):
                gapped.append(j)
        return gapped

    def gradient_parts(self, present: np.ndarray, grad_scale: torch.Tensor | None) -> list:
        """As :meth:`Bucket.gradient_parts`; non-finite entries are counted every recorded step."""
        grads = list(map(_GRAD_OF, self.params))
        if self.local:
            grads = [None if g is None else _local(g) for g in grads]
        try:
            regular = all(map(_IS_CONTIGUOUS, grads))  # one C-level pass in the common case
        except TypeError:  # a missing gradient
            regular = False
        for j in [] if regular else [j for j, g in enumerate(grads)
                                     if g is None or not g.is_contiguous()]:
            g = grads[j]
            if g is None:
                present[self.index[j]] = False
            elif g.layout != torch.strided or not dense(g):  # sparse, or a gapped user assignment
                grads[j] = g.to_dense().contiguous()
        out = self._run(GRAD, self._addresses("grad", grads))
        norm, max_abs = unscaled(grad_scale, self.device, out[0], out[1])
        return [(GRAD_NONFINITE, self.index, out[2]), (GRAD_NORM, self.index, norm),
                (GRAD_MAX_ABS, self.index, max_abs)]

    def snapshot(self) -> list:
        """‖w‖ before the step, copying the parameters into the Δw snapshot (in their own dtype)."""
        out = self._run(SNAPSHOT if self.keeps_snapshot else NORM, self._params())
        return [(PARAM_NORM_BEFORE, self.index, out[0])]

    def after_step(self) -> list:
        """‖w‖ after the step and the update statistics, from the snapshot taken by :meth:`snapshot`."""
        if not self.keeps_snapshot:
            return [(PARAM_NORM_AFTER, self.index, self._run(NORM, self._params())[0])]
        at_snapshot = self.addresses["param"]
        out = self._run(AFTER, self._params())
        if self.addresses["param"] is not at_snapshot:  # a parameter moved during the step
            self._relaid_updates(out, at_snapshot[2], self.addresses["param"][2])
        return [(row, self.index, out[r]) for r, row in
                enumerate((PARAM_NORM_AFTER, UPDATE_NORM, UPDATE_ABS_SUM, UPDATE_MAX_ABS))]

    def _relaid_updates(self, out: torch.Tensor, before: list[tuple], after: list[tuple],
                        saved_flat: torch.Tensor | None = None,
                        during: str = "optimizer step") -> None:
        """Recompute, in ``out`` (the ``(4, T)`` AFTER figures), ‖d‖, Σ|d| and max|d| of the
        tensors whose memory layout (``before``/``after``: per tensor (shape, strides) at the
        copy and now) changed since ``saved_flat`` (default the Δw snapshot; a CPU bucket's
        epoch-start copy, ``during="epoch"``) was taken: an optimizer that assigned ``p.data`` a
        copy laid out otherwise (channels_last in, contiguous out). The kernel paired elements by
        memory position; the copy is read here through the old layout, with the multi-tensor ops
        (one tensor-sized difference at a time). Raises :class:`~gradflow.errors.GradflowError`
        for a tensor that changed shape."""
        data, work = self.data(), compute_dtype(self.dtype)
        saved_flat = self.snapshot_flat if saved_flat is None else saved_flat
        offsets = np.cumsum([0] + self.sizes)
        check_same_shapes([old[0] for old in before], [new[0] for new in after], [], during)
        for j, (old, new) in enumerate(zip(before, after)):
            if old == new:
                continue
            saved = saved_flat[offsets[j]:offsets[j + 1]].as_strided(*old)
            d = [data[j].detach().to(work) - saved.to(work)]
            out[1:, j] = torch.stack(self._norms(d) + self._norms(d, 1) + self._norms(d, math.inf))

    def not_stepped(self) -> list:
        norm = self._run(NORM, self._params())[0]
        return [(PARAM_NORM_BEFORE, self.index, norm), (PARAM_NORM_AFTER, self.index, norm)]

    def _params(self) -> torch.Tensor:
        return self._addresses("param", self.data())


_VERDICTS: dict[tuple, str] = {}  # (kind, device, dtype, chunking) → "" (passed) or what failed


def self_test(device: torch.device, dtype: torch.dtype, kind: type) -> None:
    """Check every figure of every phase of ``kind``'s kernels (a :class:`FusedBucket` subclass:
    :class:`~gradflow.fused_triton.TritonFusedBucket`, :class:`~gradflow.fused_cpu.CpuFusedBucket`)
    on ``device`` and ``dtype`` against float64
    references computed by torch on the host, once per process (one host sync): gradients with
    NaN, +Inf and −Inf entries and one missing, two tensors of two chunks (one with finite
    figures), a transposed one, and an update. Raises :class:`Unavailable` naming the first disagreement."""
    key = (kind.__name__, device, dtype, kind.chunking())
    if key not in _VERDICTS:
        try:
            _VERDICTS[key] = _disagreement(device, dtype, kind)
        except Unavailable as err:
            _VERDICTS[key] = str(err)
        except Exception as err:  # a compile or launch failure, whatever its class
            _VERDICTS[key] = f"the kernels failed: {err!r}"
    if _VERDICTS[key]:
        raise Unavailable(f"self-test on {device} {dtype}: {_VERDICTS[key]}")


def _disagreement(device: torch.device, dtype: torch.dtype, kind: type) -> str:
    """What :func:`self_test` found wrong ("" when nothing)."""
    make = torch.Generator().manual_seed(0)
    chunk = kind.chunking()[0]
    # Two tensors of two chunks: one with NaN and Inf in its gradient (the non-finite figures
    # across chunks), one finite (its norms and maxima across chunks: NaN would hide them).
    shapes = [(3,), (chunk + 5,), (7, 33), (1,), (chunk + 9,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=make).to(device=device, dtype=dtype))
              for s in shapes]
    params[2].data = params[2].data.t()  # dense, transposed
    grads = [torch.randn(s, generator=make).to(device=device, dtype=dtype) for s in shapes]
    grads[1][[5, chunk + 1]] = torch.tensor([float("nan"), float("inf")], dtype=dtype, device=device)
    grads[2][0, 1] = -float("inf")
    grads[3] = None
    grads[4][chunk + 3] = 50.0  # the largest |g|, in the second chunk
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.view(p.shape) if g.shape == p.shape else g.t()
    bucket = kind.build(params, list(range(len(params))), verify=False)
    bucket._take_every_path()
    got = [bucket.gradient_parts(np.ones(len(params), bool), None), bucket.snapshot()]
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.mul_(1.5).add_(0.25)
        params[0][1] = float("nan")
        params[4][chunk + 2] += 7.0  # the largest |Δw|, in the second chunk
    got.append(bucket.after_step())
    work = compute_dtype(dtype)
    want = {GRAD_NORM: [], GRAD_MAX_ABS: [], GRAD_NONFINITE: [], PARAM_NORM_BEFORE: [],
            PARAM_NORM_AFTER: [], UPDATE_NORM: [], UPDATE_ABS_SUM: [], UPDATE_MAX_ABS: []}
    for p, w in zip(params, before):
        g = torch.zeros(p.shape) if p.grad is None else p.grad.detach().cpu().double()
        d = (p.detach().to(work) - w.to(work)).cpu().double()
        want[GRAD_NORM].append(g.square().sum().sqrt())
        want[GRAD_MAX_ABS].append(g.abs().max() if not g.isnan().any() else torch.tensor(math.nan))
        want[GRAD_NONFINITE].append((~g.isfinite()).sum().double())
        want[PARAM_NORM_BEFORE].append(w.cpu().double().square().sum().sqrt())
        want[PARAM_NORM_AFTER].append(p.detach().cpu().double().square().sum().sqrt())
        want[UPDATE_NORM].append(d.square().sum().sqrt())
        want[UPDATE_ABS_SUM].append(d.abs().sum())
        want[UPDATE_MAX_ABS].append(d.abs().max() if not d.isnan().any() else torch.tensor(math.nan))
    for row, index, values in (part for parts in got for part in parts):
        expected = torch.stack(want[row]).double()
        if not torch.allclose(values.cpu().double(), expected, rtol=1e-9, atol=0, equal_nan=True):
            return f"figure row {row}: {values.cpu().tolist()} instead of {expected.tolist()}"
    return ""
