"""Fused per-tensor statistics on a CPU with Numba: one compiled call per phase, whatever the tensors.

On a CPU the ``stack`` bucket (:class:`~gradflow.quantities.Bucket`) makes about 20 passes over the
parameters per recorded step (stacking copies, ``abs_``, norms, maxima, each a separate torch op) and
``torch._foreach_*`` loops over the tensors one op at a time. :class:`CpuFusedBucket` reads every
tensor in place through a table of raw addresses (:class:`~gradflow.fused.FusedBucket`), as Triton's
kernels do on a GPU, with one Numba-compiled loop per phase that makes one pass over each tensor
(block by block of :data:`BLOCK` elements, so that the few statistics of a block read it from the
L1 cache):

* ``GRAD``: ‖g‖, max|g| and the count of NaN/±Inf entries of g (counted only where Σg² is not
  finite, which an entry that is not finite always makes it: float32 squares cannot overflow a
  float64 sum);
* ``SNAPSHOT``: ‖w‖, copying w into the Δw snapshot (raw elements, the parameters' own dtype);
* ``AFTER``: ‖w‖ and, with d = w − w_snapshot computed in the parameters' dtype (float32 or
  float64, as the other buckets do), ‖d‖, Σ|d| and max|d|;
* ``NORM``: ‖w‖ only.

The epoch figures come from the same kernels: ``SNAPSHOT`` copies W_start into the epoch-start
copy, a flat buffer laid out as the Δw snapshot, and ``AFTER`` reads W_end − W_start against it
(:meth:`CpuFusedBucket.end_epoch`), with no buffer or transient of the parameters' size.

Sums are accumulated in float64 (float32 inputs: every square is exact), in an order fixed by the
compiled code (deterministic). max|·| leaves NaN out and is NaN where the tensor holds a NaN, as
:func:`torch.amax` of ``abs`` is. The compiler may reassociate sums (to vectorize them) but not
assume finite values: ``fastmath`` is limited to :data:`FASTMATH`.

Availability: ``pip install "gradflow[fused]"`` (Numba, about 60 MB of wheels). Parameters in
float32 or float64 (bfloat16 / float16 use the ``stack`` bucket). Compiled once per dtype and cached
on disk by Numba (as ``cache=True``: next to this file, or in Numba's user cache directory where
that is read-only; where neither is writable, compiled in every process; a corrupt cache file is
compiled again and rewritten). A Numba that is installed but
fails to import gives one :class:`~gradflow.errors.GradflowWarning` and the ``stack`` bucket. A
bucket passes :func:`gradflow.fused.self_test` (every figure of every phase against float64
references) before it is used, else :func:`gradflow.buckets.build` warns and uses ``stack``.
Each kernel call is single-threaded and releases the GIL; a bucket of millions of elements is cut
into pieces (:data:`PIECE`) whose ranges run on a small pool of Python threads, one range per
torch intra-op thread (:meth:`CpuFusedBucket._splits`).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from gradflow.errors import GradflowWarning
from gradflow.fused import AFTER, GRAD, NORM, SNAPSHOT, FusedBucket
from gradflow.quantities import EPOCH_ABS_SUM, EPOCH_NORM, check_same_shapes

try:
    import numba
    from numba import njit, types
    from numba.core.caching import FunctionCache
    from numba.extending import intrinsic
except Exception as err:  # not installed, or installed but broken (its llvmlite library, NumPy)
    numba = None
    BROKEN = "" if isinstance(err, ModuleNotFoundError) and err.name == "numba" \
        else f"Numba is installed but failed to import ({type(err).__name__}: {err})"
    if BROKEN:  # say so once: the CPU records with the stacked ops, more slowly
        warnings.warn(f"gradflow: {BROKEN}; recording with the stacked torch ops instead",
                      GradflowWarning, stacklevel=2)
else:
    BROKEN = ""
NOT_INSTALLED = 'Numba is not installed (pip install "gradflow[fused]")'

BLOCK = 4096  # elements of one tensor per block: all of a block's statistics read it from L1
LANES = 8  # independent max|·| accumulators, so that the compiler vectorizes the maximum
# Sums may be reassociated (vectorized) and contracted (fused multiply-add); no flag that lets the
# compiler assume finite values ("nnan", "ninf"), which would break the NaN/Inf figures.
FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})
# The maxima may assume no NaN ("nnan" lets the compiler vectorize the comparisons): a maximum is
# only used where its tensor holds no NaN (Σx² is finite, or at least not NaN); otherwise the
# kernel writes NaN in its place.
MAX_FASTMATH = FASTMATH | {"nnan"}
NUMPY_TYPES = {torch.float32: np.float32, torch.float64: np.float64}

if numba is not None:
    class _RecoveringCache(FunctionCache):
        """Numba's on-disk cache of one kernel (what ``cache=True`` makes), except that a file that
        fails to load (corrupt: a write cut short, a full disk) means compiling the kernel again and
        writing the cache afresh, where Numba would raise in every process until the files were
        deleted (and the CPU recorded with the stacked ops)."""

        def load_overload(self, sig, target_context):
            try:
                return super().load_overload(sig, target_context)
            except Exception:  # unpickling or rebuilding a cached file, whatever its class
                try:
                    self.flush()  # an empty index: the kernel compiled now is saved in its place
                except OSError:
                    self.disable()
                return None

        def save_overload(self, sig, data):
            try:
                super().save_overload(sig, data)
            except Exception:  # the kernel is compiled in this process; the next compiles it again
                self.disable()

    def _jit(function):
        """Compiled, and cached on disk where Numba finds a writable place (beside this file, else
        its user cache directory; a corrupt cache is compiled again, :class:`_RecoveringCache`):
        where it finds none (a read-only install and home directory), compiled in each process."""
        kernel = njit(nogil=True, fastmath=set(FASTMATH), boundscheck=False)(function)
        try:
            kernel._cache = _RecoveringCache(function)  # as Dispatcher.enable_caching does
        except RuntimeError:  # "cannot cache function ...: no locator available for file ..."
            pass
        return kernel

    _inline = njit(nogil=True, fastmath=set(FASTMATH), boundscheck=False, inline="always")
    _maximum = njit(nogil=True, fastmath=set(MAX_FASTMATH), boundscheck=False)

    @intrinsic
    def _at(typingctx, address, like):
        """The typed pointer at an integer ``address``, of ``like``'s element type."""
        pointer = types.CPointer(like.dtype)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(pointer))
        return pointer(types.int64, like), codegen

    @intrinsic
    def _fabs(typingctx, x):
        """|x| as LLVM's ``fabs`` (Python's ``abs`` on a float calls libm, which is not vectorized)."""
        def codegen(context, builder, signature, args):
            fabs = builder.module.declare_intrinsic("llvm.fabs", [args[0].type])
            return builder.call(fabs, args)
        return x(x), codegen

    @_maximum
    def _larger(a, b):
        return a if a > b else b  # a NaN never replaces the maximum

    # The helpers take one block (a view) and index it from 0: numba then knows every index is
    # non-negative and leaves out its wrap-around check, which would stop the vectorization.

    @_inline
    def _square_sum(x):
        s = 0.0
        for i in range(x.shape[0]):
            v = np.float64(x[i])
            s += v * v
        return s

    @_maximum
    def _abs_max(x):
        """max|x| with NaN left out, over :data:`LANES` accumulators."""
        m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = x.dtype.type(0)
        n = x.shape[0]
        for k in range(n // LANES):
            i = LANES * k
            m0 = _larger(_fabs(x[i]), m0)
            m1 = _larger(_fabs(x[i + 1]), m1)
            m2 = _larger(_fabs(x[i + 2]), m2)
            m3 = _larger(_fabs(x[i + 3]), m3)
            m4 = _larger(_fabs(x[i + 4]), m4)
            m5 = _larger(_fabs(x[i + 5]), m5)
            m6 = _larger(_fabs(x[i + 6]), m6)
            m7 = _larger(_fabs(x[i + 7]), m7)
        for i in range(n - n % LANES, n):
            m0 = _larger(_fabs(x[i]), m0)
        return _larger(_larger(_larger(m0, m1), _larger(m2, m3)),
                       _larger(_larger(m4, m5), _larger(m6, m7)))

    @_inline
    def _difference_sums(w, s):
        """Σd² and Σ|d| of d = w − s (d in the parameters' dtype)."""
        squares = 0.0
        absolute = 0.0
        for i in range(w.shape[0]):
            d = np.float64(w[i] - s[i])
            squares += d * d
            absolute += _fabs(d)
        return squares, absolute

    @_maximum
    def _difference_max(w, s):
        """max|w − s| with NaN left out, over :data:`LANES` accumulators."""
        m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = w.dtype.type(0)
        n = w.shape[0]
        for k in range(n // LANES):
            i = LANES * k
            m0 = _larger(_fabs(w[i] - s[i]), m0)
            m1 = _larger(_fabs(w[i + 1] - s[i + 1]), m1)
            m2 = _larger(_fabs(w[i + 2] - s[i + 2]), m2)
            m3 = _larger(_fabs(w[i + 3] - s[i + 3]), m3)
            m4 = _larger(_fabs(w[i + 4] - s[i + 4]), m4)
            m5 = _larger(_fabs(w[i + 5] - s[i + 5]), m5)
            m6 = _larger(_fabs(w[i + 6] - s[i + 6]), m6)
            m7 = _larger(_fabs(w[i + 7] - s[i + 7]), m7)
        for i in range(n - n % LANES, n):
            m0 = _larger(_fabs(w[i] - s[i]), m0)
        return _larger(_larger(_larger(m0, m1), _larger(m2, m3)),
                       _larger(_larger(m4, m5), _larger(m6, m7)))

    # Each kernel reads pieces ``lo`` to ``hi`` (a piece: ``piece_numel[k]`` elements of tensor
    # ``piece_tensor[k]`` from element ``piece_start[k]``) and writes their raw partial sums into
    # row k of ``partial``; :meth:`CpuFusedBucket._run` combines a tensor's pieces.

    @_jit
    def _gradient_kernel(addresses, piece_tensor, piece_start, piece_numel, like, partial, lo, hi):
        """``partial[k]`` = Σg², max|g| (NaN left out), count of NaN/±Inf, 1 if a NaN (address 0:
        no gradient, zeros)."""
        for k in range(lo, hi):
            address = addresses[piece_tensor[k]]
            partial[k, :] = 0.0
            if address == 0:
                continue
            x = numba.carray(_at(address + piece_start[k] * like.itemsize, like), (piece_numel[k],))
            squares = 0.0
            largest = like.dtype.type(0)
            for b in range((x.shape[0] + BLOCK - 1) // BLOCK):
                block = x[b * BLOCK:(b + 1) * BLOCK]
                squares += _square_sum(block)
                largest = _larger(_abs_max(block), largest)
            partial[k, 0] = squares
            partial[k, 1] = largest
            if not np.isfinite(squares):
                for i in range(x.shape[0]):
                    if not np.isfinite(x[i]):
                        partial[k, 2] += 1.0
                        if x[i] != x[i]:
                            partial[k, 3] = 1.0

    @_jit
    def _norm_kernel(addresses, piece_tensor, piece_start, piece_numel, like, partial, lo, hi):
        """``partial[k, 0]`` = Σw²."""
        for k in range(lo, hi):
            x = numba.carray(_at(addresses[piece_tensor[k]] + piece_start[k] * like.itemsize, like),
                             (piece_numel[k],))
            partial[k, 0] = _square_sum(x)

    @_jit
    def _snapshot_kernel(addresses, piece_tensor, piece_start, piece_numel, offsets, snapshot,
                         partial, lo, hi):
        """``partial[k, 0]`` = Σw², copying w into the snapshot (``offsets``: per tensor)."""
        for k in range(lo, hi):
            start = piece_start[k]
            x = numba.carray(_at(addresses[piece_tensor[k]] + start * snapshot.itemsize, snapshot),
                             (piece_numel[k],))
            saved = snapshot[offsets[piece_tensor[k]] + start:]
            for i in range(x.shape[0]):
                saved[i] = x[i]
            partial[k, 0] = _square_sum(x)  # the copy left x in the cache

    @_jit
    def _after_kernel(addresses, piece_tensor, piece_start, piece_numel, offsets, snapshot,
                      partial, lo, hi):
        """``partial[k]`` = Σw², Σd², Σ|d|, max|d| (NaN left out) with d = w − (its snapshot)."""
        for k in range(lo, hi):
            start = piece_start[k]
            n = piece_numel[k]
            w = numba.carray(_at(addresses[piece_tensor[k]] + start * snapshot.itemsize, snapshot),
                             (n,))
            s = snapshot[offsets[piece_tensor[k]] + start:offsets[piece_tensor[k]] + start + n]
            weights = 0.0
            squares = 0.0
            absolute = 0.0
            largest = snapshot.dtype.type(0)
            for b in range((n + BLOCK - 1) // BLOCK):
                w_block = w[b * BLOCK:(b + 1) * BLOCK]
                s_block = s[b * BLOCK:(b + 1) * BLOCK]
                weights += _square_sum(w_block)
                block_squares, block_absolute = _difference_sums(w_block, s_block)
                squares += block_squares
                absolute += block_absolute
                largest = _larger(_difference_max(w_block, s_block), largest)
            partial[k, 0] = weights
            partial[k, 1] = squares
            partial[k, 2] = absolute
            partial[k, 3] = largest


class CpuFusedBucket(FusedBucket):
    """A :class:`~gradflow.fused.FusedBucket` on a CPU: the same tables of addresses and the same
    checks as Triton's on a GPU, with the phases computed by this module's Numba kernels.

    The epoch figures too come from the kernels: the epoch-start copy is one flat buffer laid out
    as the Δw snapshot (:attr:`epoch_flat`), filled by the ``SNAPSHOT`` kernel, and
    W_end − W_start is read by the ``AFTER`` kernel against it, so ``end_epoch`` makes no copy or
    difference of the parameters' size (the parent's go through its scratch, up to P/8).

    Memory: none per step beyond the figures (a ``(≤ 4, T)`` float64 array); the Δw snapshot (P)
    and the epoch copy (P), none with ``snapshot=False``; the parent's scratch is allocated but
    never written (no resident memory). Raises :class:`~gradflow.fused.Unavailable` from
    :meth:`build`.
    """

    epoch_flat: torch.Tensor | None = None  # W_start, laid out as snapshot_flat (None: not taken)
    layouts_at_epoch: list | None = None  # per tensor (shape, strides) when epoch_flat was filled

    @classmethod
    def missing(cls) -> str:
        return "" if numba is not None else BROKEN or NOT_INSTALLED

    @classmethod
    def supports(cls, dtype: torch.dtype) -> bool:
        return dtype in NUMPY_TYPES

    threads = 0  # kernel threads per call; 0: as many as torch's intra-op threads (_splits)

    def _make_tables(self, data: list[torch.Tensor], piece: int | None = None) -> None:
        """The pieces (at most ``piece`` elements, default :data:`PIECE`) and offsets of ``data``."""
        piece = piece or PIECE
        self.sizes = [d.numel() for d in data]
        numel = np.array(self.sizes, dtype=np.int64)
        pieces = -(-numel // piece)  # (0 for an empty tensor: its figures are 0)
        tensor = np.repeat(np.arange(len(numel)), pieces)
        start = np.concatenate([np.arange(0, n, piece, dtype=np.int64) for n in numel]) \
            if len(numel) else np.zeros(0, dtype=np.int64)
        snapshot = self.snapshot_flat.numpy() if self.keeps_snapshot else None
        self.tables = {
            "piece_tensor": tensor, "piece_start": start,
            "piece_numel": np.minimum(numel[tensor] - start, piece),
            "first_piece": np.cumsum(pieces) - pieces, "whole": bool(np.all(pieces == 1)),
            "offsets": np.cumsum(numel) - numel, "snapshot": snapshot, "elements": int(numel.sum()),
            "like": np.empty(0, dtype=NUMPY_TYPES[self.dtype]), "splits": {},
        }

    @classmethod
    def chunking(cls) -> tuple[int, ...]:
        """Two blocks (the self-test's long tensor, plus 5 elements), the self-test's pieces
        (:data:`TEST_PIECE`: that tensor's two pieces hold 62 % and 38 % of it) and the blocks."""
        return 2 * BLOCK, TEST_PIECE, BLOCK

    def _take_every_path(self) -> None:
        """The self-test's bucket: tensors in pieces of :data:`TEST_PIECE` elements on 2 threads,
        so that the test crosses blocks within a piece, crosses pieces, combines them and runs the
        thread split, which its small tensors would not."""
        self._make_tables(self.data(), piece=TEST_PIECE)
        self.threads = 2

    def _splits(self) -> list[tuple[int, int]]:
        """The piece ranges ``[lo, hi)`` the kernels run on, one per thread: torch's intra-op
        thread count (idle while the hooks run), where the bucket holds at least
        :data:`PARALLEL_MIN_ELEMENTS`; ranges of about equal elements."""
        t = self.tables
        threads = self.threads or max(1, min(torch.get_num_threads(), len(t["piece_numel"]),
                                             t["elements"] // PARALLEL_MIN_ELEMENTS))
        if threads not in t["splits"]:
            ends = np.cumsum(t["piece_numel"])
            cuts = np.searchsorted(ends, ends[-1] * np.arange(1, threads) / threads) + 1 \
                if threads > 1 else np.zeros(0, dtype=np.int64)
            bounds = [0, *np.unique(np.clip(cuts, 1, len(ends) - 1)).tolist(), len(ends)]
            t["splits"][threads] = list(zip(bounds[:-1], bounds[1:]))
        return t["splits"][threads]

    def start_epoch(self) -> None:
        """Copy the parameters (W_start) into :attr:`epoch_flat` with the ``SNAPSHOT`` kernel, in
        their own dtype and memory order, keeping their layouts; nothing with ``snapshot=False``.
        Raises :class:`~gradflow.errors.GradflowError` for a parameter of another size, dtype or
        device than at build time."""
        if not self.keeps_snapshot:
            return
        addresses = self._params()
        if self.epoch_flat is None:
            self.epoch_flat = torch.empty_like(self.snapshot_flat)  # written whole just below
        self._run(SNAPSHOT, addresses, self.epoch_flat)
        self.layouts_at_epoch = self.addresses["param"][2]

    def check_epoch(self) -> None:
        """Raise :class:`~gradflow.errors.GradflowError` where :meth:`end_epoch` would: a parameter
        of another size, dtype or device than at build time, or of another shape than at the
        epoch's start (a layout change alone is measured, elements paired by index)."""
        self._params()
        if self.keeps_snapshot:
            check_same_shapes([old[0] for old in self.layouts_at_epoch],
                              [new[0] for new in self.addresses["param"][2]], [], "epoch")

    def end_epoch(self) -> list:
        """‖W_end − W_start‖ and Σ|W_end − W_start| per tensor (float64 sums of differences taken
        in the parameters' dtype) by the ``AFTER`` kernel against :attr:`epoch_flat`, which then
        takes W_end; ``[]`` with ``snapshot=False``. Raises as :meth:`check_epoch`, before anything
        changes."""
        if not self.keeps_snapshot:
            return []
        self.check_epoch()
        out = self._run(AFTER, self._params(), self.epoch_flat)
        if self.addresses["param"][2] != self.layouts_at_epoch:  # relaid within the epoch
            self._relaid_updates(out, self.layouts_at_epoch, self.addresses["param"][2],
                                 self.epoch_flat, "epoch")
        self.start_epoch()
        return [(EPOCH_NORM, self.index, out[1]), (EPOCH_ABS_SUM, self.index, out[2])]

    def _run(self, mode: int, addresses: torch.Tensor,
             buffer: torch.Tensor | None = None) -> torch.Tensor:
        """One phase's kernel; ``buffer``: the copy that ``SNAPSHOT`` writes and ``AFTER`` reads
        (laid out as :attr:`snapshot_flat`, which it defaults to). Returns a fresh
        ``(ROWS[mode], T)`` float64 tensor."""
        t = self.tables
        table = addresses.numpy()
        partial = np.empty((len(t["piece_numel"]), COLUMNS[mode]), dtype=np.float64)
        pieces = (table, t["piece_tensor"], t["piece_start"], t["piece_numel"])
        if mode in (GRAD, NORM):
            kernel, args = (_gradient_kernel if mode == GRAD else _norm_kernel), (t["like"], partial)
        else:
            kernel = _snapshot_kernel if mode == SNAPSHOT else _after_kernel
            args = (t["offsets"], t["snapshot"] if buffer is None else buffer.numpy(), partial)
        splits = self._splits()
        work = [_threads(len(splits) - 1).submit(kernel, *pieces, *args, lo, hi)
                for lo, hi in splits[1:]]
        kernel(*pieces, *args, *splits[0])  # this thread takes the first range
        for done in work:
            done.result()
        return torch.from_numpy(_combine(mode, partial, t))


# A tensor's figures from its pieces' partial sums: sums add, maxima take the max.
COLUMNS = {GRAD: 4, NORM: 1, SNAPSHOT: 1, AFTER: 4}
PIECE = 1 << 18  # elements per piece: the unit of work split among threads
TEST_PIECE = BLOCK + 1000  # the self-test's pieces: a whole block and part of the next
PARALLEL_MIN_ELEMENTS = 1 << 20  # elements per thread, at least: below, handing off costs more
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _threads(workers: int) -> ThreadPoolExecutor:
    """This process's pool of ``workers`` threads (a forked child makes its own)."""
    key = (os.getpid(), workers)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="gradflow-kernels")
    return _POOLS[key]


def _combine(mode: int, partial: np.ndarray, tables: dict) -> np.ndarray:
    """The ``(ROWS[mode], T)`` figures of each tensor from its pieces' rows of ``partial``."""
    if tables["whole"]:
        sums = partial.T
    else:
        first = tables["first_piece"]
        sums = np.zeros((partial.shape[1], len(first)))
        present = np.flatnonzero(np.diff(np.r_[first, len(partial)]) > 0)  # not empty
        for c in range(partial.shape[1]):
            largest = (mode == GRAD and c == 1) or (mode == AFTER and c == 3)
            combine = np.maximum if largest else np.add
            sums[c, present] = combine.reduceat(partial[:, c], first[present])
    if mode == GRAD:
        return np.stack([np.sqrt(sums[0]), np.where(sums[3] > 0, np.nan, sums[1]), sums[2]])
    if mode == AFTER:  # Σd² is NaN exactly where d holds a NaN
        return np.stack([np.sqrt(sums[0]), np.sqrt(sums[1]), sums[2],
                         np.where(np.isnan(sums[1]), np.nan, sums[3])])
    return np.sqrt(sums)
