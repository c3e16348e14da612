"""Which bucket kind records a group of tensors (one optimizer, one device, one dtype).

Three kinds compute the same per-tensor statistics (:mod:`gradflow.quantities`):

* ``"stack"`` (:class:`~gradflow.quantities.Bucket`): shape classes stacked into matrices; the
  fastest on a CPU, where ``torch._foreach_*`` ops loop over the tensors one by one;
* ``"foreach"`` (:class:`~gradflow.quantities.ForeachBucket`): multi-tensor ``torch._foreach_*``
  kernels, a fixed number per bucket, but about 4 µs of host time per tensor and statistic;
* ``"fused"`` (:class:`~gradflow.fused.FusedBucket`): two Triton kernels per phase, no per-tensor
  host work beyond reading the tensors' addresses.

``"auto"`` (the default, :data:`STRATEGY`) takes ``"stack"`` on a CPU and ``"fused"`` elsewhere
where Triton is installed, else ``"foreach"``.
"""

from __future__ import annotations

import importlib.util
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
    built (no Triton, a parameter not dense in memory, kernels that fail their self-test), a
    :class:`~gradflow.errors.GradflowWarning` says why and ``"foreach"`` is built instead.
    """
    strategy = strategy or STRATEGY
    if strategy == "auto":
        if _local(params[0]).device.type == "cpu":
            strategy = "stack"
        else:
            strategy = "fused" if importlib.util.find_spec("triton") is not None else "foreach"
    if strategy == "fused":
        from gradflow import fused

        try:
            return fused.FusedBucket.build(params, index, snapshot)
        except fused.Unavailable as reason:
            warnings.warn(f"gradflow: no fused kernels for a bucket ({reason}); using foreach",
                          GradflowWarning, stacklevel=2)
            strategy = "foreach"
    return {"stack": Bucket, "foreach": ForeachBucket}[strategy].build(params, index, snapshot)
