"""Recording sharded models under torch.distributed: FSDP1, FSDP2 and HSDP, with global statistics.

What each parallel layout needs:

* **DDP** (and FSDP1 ``NO_SHARD``): every rank holds the whole, identical parameters and gradients
  (after DDP's all-reduce), so rank 0 alone computes and writes; the other ranks do nothing.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``, DTensor parameters sharded on dim 0) and
  **HSDP** (a 2-D mesh, ``(Replicate(), Shard(0))``): each rank holds one shard of every parameter.
* **FSDP1** (``FullyShardedDataParallel(use_orig_params=True)``, ``FULL_SHARD``, ``SHARD_GRAD_OP``,
  ``HYBRID_SHARD``): each rank holds a flat slice of every parameter (possibly empty).

For the sharded layouts every rank runs the Recorder's hooks on its local shards
(:mod:`gradflow.quantities`), and :class:`Reducer` combines the per-tensor partial statistics over the
shard process group at the end of each recorded step: sums of squares (norms), absolute sums,
non-finite counts in one ``all_reduce(SUM)``, maxima and "had a gradient" in one
``all_reduce(MAX)`` (two collectives per recorded step, one per epoch); rank 0 writes. Layer
names, module types and ``num_params`` are those of the unsharded model (FSDP's
``_fsdp_wrapped_module.`` prefixes are dropped). Replicas of an HSDP shard hold the same shard and
are not summed.

Refused, with the same :class:`~gradflow.errors.GradflowError` on every rank (decided from the
model's structure, which all ranks share, so no rank waits in a collective): FSDP1 with
``use_orig_params=False`` (the optimizer then owns flattened parameters), DTensor placements other
than FSDP/HSDP's (tensor parallelism), and models mixing DTensor and plain parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gradflow import quantities as q
from gradflow.errors import GradflowError

WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")

# Per-tensor statistics summed over shards (norms travel as sums of squares) and maxed over shards.
SUM_ROWS = (q.GRAD_NORM, q.GRAD_NONFINITE, q.PARAM_NORM_BEFORE, q.UPDATE_NORM, q.UPDATE_ABS_SUM,
            q.PARAM_NORM_AFTER)
MAX_ROWS = (q.GRAD_MAX_ABS, q.UPDATE_MAX_ABS)


def _fsdp1():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return None
    return FullyShardedDataParallel


def _fsdp2_module():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def clean_name(name: str) -> str:
    """A module or parameter name without FSDP1 / checkpoint / compile wrapper components."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_NAMES)


def module_type(module: nn.Module) -> str:
    """The class name of the user's module (FSDP2 turns ``Linear`` into ``FSDPLinear``)."""
    cls, fsdp = type(module), _fsdp2_module()
    if fsdp is not None and isinstance(module, fsdp):
        cls = next(b for b in cls.__mro__[1:] if not issubclass(b, fsdp))
    return cls.__name__


def inner_module(model: nn.Module) -> nn.Module | None:
    """The module an FSDP1 wrapper wraps, or None when ``model`` is not one."""
    fsdp = _fsdp1()
    return model.module if fsdp is not None and isinstance(model, fsdp) else None


def is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "_local_tensor") and hasattr(t, "placements")


@dataclass
class Sharding:
    """How a model's recorded parameters are sharded: the process group shards are summed over,
    and each parameter's unsharded element count."""

    kind: str  # "fsdp1" or "fsdp2"
    group: object  # torch.distributed.ProcessGroup
    numel: dict[int, int]  # id(parameter) → unsharded element count

    def global_numel(self, p: torch.Tensor) -> int:
        return self.numel.get(id(p), p.numel())


def sharding(model: nn.Module, params: list[torch.Tensor]) -> Sharding | None:
    """The sharding of ``params`` (the recorded parameters of ``model``, FSDP1 wrapper included),
    or None when they are whole on every rank (plain, DDP, FSDP1 NO_SHARD)."""
    dtensors = [is_dtensor(p) for p in params]
    if any(dtensors):
        if not all(dtensors):
            raise GradflowError("some recorded parameters are DTensors and some are not; gradflow "
                                "records models sharded by fully_shard as a whole (apply "
                                "fully_shard to the root module too)")
        return _fsdp2_sharding(params)
    fsdp = _fsdp1()
    wrappers = [m for m in model.modules() if fsdp is not None and isinstance(m, fsdp)]
    if not wrappers:
        return None
    if not all(getattr(m, "_use_orig_params", False) for m in wrappers):
        raise GradflowError("FullyShardedDataParallel with use_orig_params=False: the optimizer "
                            "owns flattened parameters, so per-layer statistics are not defined; "
                            "wrap with use_orig_params=True")
    strategies = {m.sharding_strategy.name for m in wrappers}
    if strategies == {"NO_SHARD"}:
        return None
    if "NO_SHARD" in strategies or len({id(m.process_group) for m in wrappers}) > 1:
        raise GradflowError("FSDP1 wrappers with different sharding strategies or process groups "
                            "in one model are not supported by gradflow")
    numel: dict[int, int] = {}
    for m in wrappers:
        handle = getattr(m, "_handle", None)
        if handle is None:
            continue
        flat = handle.flat_param
        for p, shape in zip(flat._params, flat._shapes):
            numel[id(p)] = int(np.prod(shape))
    if any(id(p) not in numel for p in params):
        raise GradflowError("a recorded parameter is not managed by FSDP; gradflow records FSDP1 "
                            "models whose parameters are all in FSDP units")
    return Sharding("fsdp1", wrappers[0].process_group, numel)


def _fsdp2_sharding(params: list[torch.Tensor]) -> Sharding:
    from torch.distributed.tensor import Replicate, Shard

    first = params[0]
    mesh, placements = first.device_mesh, tuple(first.placements)
    fsdp_like = (len(placements) >= 1 and placements[-1] == Shard(0)
                 and all(p == Replicate() for p in placements[:-1]))
    for p in params:
        if p.device_mesh != mesh or tuple(p.placements) != placements:
            raise GradflowError("recorded DTensor parameters on different meshes or placements are "
                                "not supported by gradflow (FSDP2/HSDP only)")
    if not fsdp_like:
        raise GradflowError(f"DTensor placements {placements} are not FSDP2's (Shard(0)) or "
                            f"HSDP's (Replicate(), Shard(0)); tensor parallelism is not supported "
                            f"by gradflow")
    group = mesh.get_group(mesh.ndim - 1)
    return Sharding("fsdp2", group, {id(p): p.numel() for p in params})


class Reducer:
    """Combines per-tensor partial statistics of the local shards into global ones (see module doc).

    ``empty``: (T,) bool, tensors whose local shard is empty on this rank (they take no part in the
    local computation, and count as "no gradient here" so that another rank's gradient decides).
    """

    def __init__(self, group, num_tensors: int, empty: np.ndarray) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.num_tensors = num_tensors
        self.empty = empty
        backend = dist.get_backend(group)
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if "nccl" in str(backend) else torch.device("cpu"))
        self.all_index = np.arange(num_tensors)
        self._index: dict[int, torch.Tensor] = {}

    def _device_index(self, index) -> torch.Tensor:
        array = index.index if isinstance(index, q.Split) else index
        cached = self._index.get(id(array))
        if cached is None or cached[0] is not array:
            cached = (array, torch.as_tensor(array, dtype=torch.long, device=self.device))
            self._index[id(array)] = cached
        return cached[1]

    def step(self, parts: list, present: np.ndarray) -> tuple[list, None]:
        """Global per-tensor parts of one recorded step; the global "had a gradient" flags travel
        among them as a :data:`~gradflow.quantities.PRESENT` part (hence None for ``present``)."""
        sums = torch.zeros(len(SUM_ROWS) + len(MAX_ROWS), self.num_tensors, dtype=torch.float64,
                           device=self.device)  # the last rows count NaN maxima
        maxima = torch.zeros(len(MAX_ROWS) + 1, self.num_tensors, dtype=torch.float64,
                             device=self.device)
        local = torch.from_numpy((present & ~self.empty).astype(np.float64))
        if self.device.type == "cuda":  # from pinned memory: a pageable copy would wait for the GPU
            local = local.pin_memory()
        maxima[-1].copy_(local, non_blocking=True)
        kept = []
        for row, index, values in parts:
            if row == q.FOUND_INF:
                kept.append((row, index, values))
                continue
            where = self._device_index(index)
            v = values.to(self.device, torch.float64)
            if row in SUM_ROWS:
                squared = q.STEP_KINDS[row] == "norm"
                sums[SUM_ROWS.index(row)].index_add_(0, where, v * v if squared else v)
            else:
                k = MAX_ROWS.index(row)
                sums[len(SUM_ROWS) + k].index_add_(0, where, v.isnan().double())
                maxima[k].scatter_reduce_(0, where, v.nan_to_num(nan=0.0), "amax")
        self.dist.all_reduce(sums, op=self.dist.ReduceOp.SUM, group=self.group)
        self.dist.all_reduce(maxima, op=self.dist.ReduceOp.MAX, group=self.group)
        # Every row goes out: a statistic no rank produced is 0, as the host would fill it anyway.
        out = kept + [(row, self.all_index,
                       sums[k].sqrt() if q.STEP_KINDS[row] == "norm" else sums[k])
                      for k, row in enumerate(SUM_ROWS)]
        out += [(row, self.all_index, maxima[k].masked_fill(sums[len(SUM_ROWS) + k] > 0, math.nan))
                for k, row in enumerate(MAX_ROWS)]
        # The global flags reach the host with the statistics (no sync on the training thread).
        return out + [(q.PRESENT, self.all_index, maxima[-1])], None

    def epoch(self, parts: list) -> list:
        """Global per-tensor epoch parts (Σ|ΔW| and ‖ΔW‖)."""
        sums = torch.zeros(2, self.num_tensors, dtype=torch.float64, device=self.device)
        for row, index, values in parts:
            v = values.to(self.device, torch.float64)
            squared = q.EPOCH_KINDS[row] == "norm"
            sums[row].index_add_(0, self._device_index(index), v * v if squared else v)
        self.dist.all_reduce(sums, op=self.dist.ReduceOp.SUM, group=self.group)
        return [(q.EPOCH_ABS_SUM, self.all_index, sums[q.EPOCH_ABS_SUM]),
                (q.EPOCH_NORM, self.all_index, sums[q.EPOCH_NORM].sqrt())]


def agree(ok: bool, message: str) -> None:
    """All ranks learn whether every rank succeeded (one all-reduce); the others raise too."""
    import torch.distributed as dist

    flag = torch.tensor([0.0 if ok else 1.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if ok and flag.item() > 0:
        raise GradflowError(message)
