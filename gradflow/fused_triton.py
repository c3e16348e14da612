"""Fused per-tensor statistics with Triton: two kernel launches per phase, whatever the tensors.

:class:`TritonFusedBucket` is a :class:`~gradflow.fused.FusedBucket` (the table of addresses, the
checks, the phases, the self-test) whose phases run two Triton kernels:

1. :func:`_partials`, one program per *chunk* (at most :data:`CHUNK` elements of one tensor):
   Σx², Σd², Σ|d|, max|·| (NaN left out) and the counts of NaN and ±Inf of its chunk, accumulated
   in float64 (a 1e20 entry squares to 1e40: finite), into a ``(chunks, 6)`` float64 matrix;
2. :func:`_combine`, one program per tensor: adds its chunks in a fixed order (deterministic, no
   atomics) and writes the per-tensor figures, NaN where a NaN was counted.

The differences d = w − w_snapshot are computed in float32 (float64 for float64 parameters).

Availability: Triton (shipped with CUDA builds of PyTorch on Linux). ``TRITON_INTERPRET=1`` runs
the same kernels on a CPU with NumPy, which is how the tests check them on machines without a GPU.
Only this module imports Triton (about 70 MiB of resident memory): :mod:`gradflow.buckets` imports
it for a GPU's bucket, never for a CPU's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from gradflow.fused import AFTER, GRAD, ROWS, SNAPSHOT, FusedBucket

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs, macOS, Windows
    triton = None

COLUMNS = 6  # per chunk: Σx², Σd², Σ|d|, max|·| without NaN, NaN count, ±Inf count
CHUNK = 1 << 16  # elements of one tensor per program of _partials
BLOCK = 1024  # elements per loop iteration of a _partials program
COMBINE_BLOCK = 256  # chunks per loop iteration of a _combine program

if triton is not None:
    # Triton kernels may read only constexpr globals: the phases again, as such.
    _GRAD, _SNAPSHOT, _AFTER = tl.constexpr(GRAD), tl.constexpr(SNAPSHOT), tl.constexpr(AFTER)

    @triton.jit
    def _partials(pointers, snapshot, offsets, numel, chunk_tensor, chunk_start, partials,
                  MODE: tl.constexpr, ELEMENT: tl.constexpr, WORK: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        k = tl.program_id(0)
        j = tl.load(chunk_tensor + k)
        start = tl.load(chunk_start + k)
        address = tl.load(pointers + j)
        source = address.to(tl.pointer_type(ELEMENT))
        # A missing gradient (address 0) reads nothing: its figures are zeros.
        stop = tl.where(address != 0, tl.minimum(start + CHUNK, tl.load(numel + j)), start)
        saved = snapshot + tl.load(offsets + j)
        squares = tl.zeros([BLOCK], tl.float64)
        diff_squares = tl.zeros([BLOCK], tl.float64)
        diff_abs = tl.zeros([BLOCK], tl.float64)
        largest = tl.zeros([BLOCK], WORK)
        nans = tl.zeros([BLOCK], tl.int32)
        infs = tl.zeros([BLOCK], tl.int32)
        for s in range(start, stop, BLOCK):
            at = s + tl.arange(0, BLOCK)
            mask = at < stop
            raw = tl.load(source + at, mask=mask, other=0.0)
            x = raw.to(WORK)
            wide = x.to(tl.float64)
            squares += wide * wide
            if MODE == _SNAPSHOT:
                tl.store(saved + at, raw, mask=mask)
            if MODE == _GRAD:
                magnitude = tl.abs(x)
                is_nan = x != x
                nans += is_nan.to(tl.int32)
                infs += (magnitude == float("inf")).to(tl.int32)
                largest = tl.maximum(largest, tl.where(is_nan, 0.0, magnitude))
            if MODE == _AFTER:
                d = x - tl.load(saved + at, mask=mask, other=0.0).to(WORK)
                wide_d = d.to(tl.float64)
                diff_squares += wide_d * wide_d
                diff_abs += tl.abs(wide_d)
                is_nan = d != d
                nans += is_nan.to(tl.int32)
                largest = tl.maximum(largest, tl.where(is_nan, 0.0, tl.abs(d)))
        row = partials + k * 6
        tl.store(row, tl.sum(squares, 0))
        tl.store(row + 1, tl.sum(diff_squares, 0))
        tl.store(row + 2, tl.sum(diff_abs, 0))
        tl.store(row + 3, tl.max(largest, 0).to(tl.float64))
        tl.store(row + 4, tl.sum(nans, 0).to(tl.float64))
        tl.store(row + 5, tl.sum(infs, 0).to(tl.float64))

    @triton.jit
    def _combine(partials, first_chunk, chunk_count, out, tensors,
                 MODE: tl.constexpr, BLOCK: tl.constexpr):
        j = tl.program_id(0)
        first = tl.load(first_chunk + j)
        stop = first + tl.load(chunk_count + j)
        squares = tl.zeros([BLOCK], tl.float64)
        diff_squares = tl.zeros([BLOCK], tl.float64)
        diff_abs = tl.zeros([BLOCK], tl.float64)
        largest = tl.zeros([BLOCK], tl.float64)
        nans = tl.zeros([BLOCK], tl.float64)
        infs = tl.zeros([BLOCK], tl.float64)
        for c in range(first, stop, BLOCK):
            at = c + tl.arange(0, BLOCK)
            mask = at < stop
            row = partials + at * 6
            squares += tl.load(row, mask=mask, other=0.0)
            diff_squares += tl.load(row + 1, mask=mask, other=0.0)
            diff_abs += tl.load(row + 2, mask=mask, other=0.0)
            largest = tl.maximum(largest, tl.load(row + 3, mask=mask, other=0.0))
            nans += tl.load(row + 4, mask=mask, other=0.0)
            infs += tl.load(row + 5, mask=mask, other=0.0)
        sum_squares = tl.sum(squares, 0)
        nan_count = tl.sum(nans, 0)
        tl.store(out + j, tl.sqrt(sum_squares))
        if MODE == _GRAD:  # a NaN entry made Σx² NaN: max|g| is NaN too
            tl.store(out + tensors + j, tl.where(nan_count > 0, sum_squares, tl.max(largest, 0)))
            tl.store(out + 2 * tensors + j, nan_count + tl.sum(infs, 0))
        if MODE == _AFTER:
            sum_diff_squares = tl.sum(diff_squares, 0)
            tl.store(out + tensors + j, tl.sqrt(sum_diff_squares))
            tl.store(out + 2 * tensors + j, tl.sum(diff_abs, 0))
            tl.store(out + 3 * tensors + j,
                     tl.where(nan_count > 0, sum_diff_squares, tl.max(largest, 0)))


# Per parameter dtype with a kernel: (the elements' Triton type, the compute type of the differences).
ELEMENT_TYPES = {} if triton is None else {
    torch.float32: (tl.float32, tl.float32), torch.float64: (tl.float64, tl.float64),
    torch.bfloat16: (tl.bfloat16, tl.float32), torch.float16: (tl.float16, tl.float32)}


@dataclass
class TritonFusedBucket(FusedBucket):
    """A :class:`~gradflow.fused.FusedBucket` whose phases run this module's Triton kernels.

    Memory beyond the parent's (snapshot P, epoch copy P on the host): the tables (a few int64 per
    tensor and per chunk) and a ``(chunks, 6)`` float64 matrix, 48 bytes per :data:`CHUNK`
    elements (≈ 0.02 % of float32 parameters). The epoch figures stay with the parent's
    multi-tensor ops: the epoch copy lives in host memory (GPU memory kept free), which these
    kernels, launched on the GPU, do not read. Raises :class:`~gradflow.fused.Unavailable` from
    :meth:`build`.
    """

    chunk: int = 0  # elements per program of _partials: CHUNK when the tables were made

    @classmethod
    def missing(cls) -> str:
        return "" if triton is not None else "Triton is not installed"

    @classmethod
    def supports(cls, dtype: torch.dtype) -> bool:
        return dtype in ELEMENT_TYPES

    @classmethod
    def chunking(cls) -> tuple[int, ...]:
        return CHUNK, BLOCK, COMBINE_BLOCK

    def _make_tables(self, data: list[torch.Tensor]) -> None:
        self.chunk = CHUNK
        self.sizes = [d.numel() for d in data]
        numel = np.array(self.sizes, dtype=np.int64)
        counts = -(-numel // self.chunk)
        starts = [np.arange(0, n, self.chunk, dtype=np.int64) for n in numel]

        def table(values) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values, dtype=np.int64), device=self.device)

        self.tables = {
            "numel": table(numel), "offsets": table(np.cumsum(numel) - numel),
            "chunk_tensor": table(np.repeat(np.arange(len(numel)), counts)),
            "chunk_start": table(np.concatenate(starts) if starts else []),
            "first_chunk": table(np.cumsum(counts) - counts), "chunk_count": table(counts),
            "partials": torch.zeros(max(int(counts.sum()), 1), COLUMNS, dtype=torch.float64,
                                    device=self.device),
        }
        self.tables["chunks"] = int(counts.sum())

    def _run(self, mode: int, addresses: torch.Tensor) -> torch.Tensor:
        """Both kernels for one phase; returns a fresh ``(ROWS[mode], T)`` float64 tensor."""
        t = self.tables
        tensors = len(self.params)
        out = torch.empty(ROWS[mode], tensors, dtype=torch.float64, device=self.device)
        element, work = ELEMENT_TYPES[self.dtype]
        snapshot = self.snapshot_flat if self.keeps_snapshot else t["partials"]
        with _on(self.device):
            if t["chunks"]:
                _partials[(t["chunks"],)](addresses, snapshot, t["offsets"], t["numel"],
                                          t["chunk_tensor"], t["chunk_start"], t["partials"],
                                          MODE=mode, ELEMENT=element, WORK=work, CHUNK=self.chunk,
                                          BLOCK=BLOCK)
            _combine[(tensors,)](t["partials"], t["first_chunk"], t["chunk_count"], out, tensors,
                                 MODE=mode, BLOCK=COMBINE_BLOCK)
        return out


def _on(device: torch.device):
    """``torch.cuda.device(device)`` where it is not the current device (Triton launches on the
    current device's current stream); a no-op context elsewhere."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
