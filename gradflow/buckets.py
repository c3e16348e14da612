"""Which bucket kind records a group of tensors (one optimizer, one device, one dtype).

Four kinds compute the same per-tensor statistics (:mod:`gradflow.quantities`):

* ``"stack"`` (:class:`~gradflow.quantities.Bucket`): shape classes stacked into matrices; the
  fastest torch-only kind on a CPU, where ``torch._foreach_*`` ops loop over the tensors one by one;
* ``"foreach"`` (:class:`~gradflow.quantities.ForeachBucket`): multi-tensor ``torch._foreach_*``
  kernels, a fixed number per bucket, but about 4 µs of host time per tensor and statistic;
* ``"fused"``: one pass per phase over the tensors, read in place through a table of their
  addresses (:class:`~gradflow.fused.FusedBucket`): two Triton kernels on a GPU
  (:class:`~gradflow.fused_triton.TritonFusedBucket`), one Numba-compiled loop on a CPU
  (:class:`~gradflow.fused_cpu.CpuFusedBucket`).

``"auto"`` (the default, :data:`STRATEGY`) takes ``"fused"`` where its compiler is installed
(Triton on a GPU, Numba on a CPU: ``pip install "gradflow[fused]"``), else ``"stack"`` on a CPU
and ``"foreach"`` elsewhere.

Every kind checks its tensors at each phase against their size, dtype, device (and shape) at build
time, in the common case with a few C-level passes (``map`` over the tensors), and treats a
``p.data = ...`` alike: another size, dtype or device raises the same one-line
:class:`~gradflow.errors.GradflowError` (:func:`~gradflow.quantities.replaced`); another layout of
the same shape is read by index; another shape of as many elements is read in the built shape
(row-major), but one that changed within a step or an epoch raises
(:func:`~gradflow.quantities.check_same_shapes`).
"""

from __future__ import annotations

import warnings

import torch

from gradflow.errors import GradflowWarning
from gradflow.quantities import Bucket, ForeachBucket, _local

# The kind the Recorder builds: "auto", "stack", "foreach" or "fused" (tests and benchmarks set it).
STRATEGY = "auto"


def build(params: list[torch.Tensor], index: list[int], snapshot: bool = True,
          strategy: str | None = None) -> Bucket | ForeachBucket:
    """A bucket of ``params`` (their global tensor indices ``index``, in layer order).

    ``strategy``: a kind named above; None means :data:`STRATEGY`. Where ``"fused"`` cannot be
    built (its compiler not installed, a dtype it has no kernel for, kernels that fail their
    self-test), a :class:`~gradflow.errors.GradflowWarning` says
    why and the torch-only kind of the device (``"stack"`` on a CPU, ``"foreach"`` elsewhere) is
    built instead; ``"auto"`` falls back without a warning where the compiler is not installed or
    the dtype has no kernel (a compiler that is installed but fails to import warns once).
    """
    strategy = strategy or STRATEGY
    first = _local(params[0])
    fallback = "stack" if first.device.type == "cpu" else "foreach"
    if strategy in ("auto", "fused"):  # (only these import the fused kinds and their compilers)
        kind = fused_kind(first.device)
    if strategy == "auto":
        strategy = fallback if kind.missing() or not kind.supports(first.dtype) else "fused"
    if strategy == "fused":
        from gradflow import fused

        try:
            return kind.build(params, index, snapshot)
        except fused.Unavailable as reason:
            warnings.warn(f"gradflow: no fused kernels for a bucket ({reason}); using {fallback}",
                          GradflowWarning, stacklevel=2)
            strategy = fallback
    return {"stack": Bucket, "foreach": ForeachBucket}[strategy].build(params, index, snapshot)


def fused_kind(device: torch.device) -> type:
    """The ``"fused"`` bucket class for ``device``: Numba's on a CPU, Triton's elsewhere (tests
    swap in Triton's on a CPU, where its interpreter runs it). A CPU never imports Triton."""
    from gradflow import fused

    if device.type != "cpu":
        from gradflow import fused_triton

        return fused_triton.TritonFusedBucket
    global _CPU_KIND
    if _CPU_KIND is None:
        try:
            from gradflow import fused_cpu
            _CPU_KIND = fused_cpu.CpuFusedBucket
        except Exception as err:  # a Numba that imports but refuses the kernels' definitions
            reason = f"gradflow.fused_cpu failed to import ({type(err).__name__}: {err})"
            warnings.warn(f"gradflow: {reason}; recording with the stacked torch ops instead",
                          GradflowWarning, stacklevel=3)

            class Unusable(fused.FusedBucket):  # "auto" then records with the stacked ops
                @classmethod
                def missing(cls) -> str:
                    return reason

            _CPU_KIND = Unusable
    return _CPU_KIND


_CPU_KIND: type | None = None  # the CPU's fused kind, once imported (or found unusable)
