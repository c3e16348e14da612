"""Recorder under FSDP1 (use_orig_params=True), FSDP2 (fully_shard) and HSDP: 2 CPU processes, gloo.

The test launches this file as a script for ranks 0 and 1. Each rank trains a sharded MLP whose
shards are uneven, and one of whose tensors has an empty shard on one rank, with a Recorder on
every rank. Each rank also gathers, from first principles, the full gradient the optimizer used
and the full weights before and after every step (all-gathering the local shards), and trains an
unsharded copy of the model on the same data (both ranks' batches). The test recomputes every
per-layer figure with numpy from the gathered tensors (exact) and from the unsharded reference
(same training, float32 rounding apart), and compares them with what rank 0 recorded. Unsupported
setups must fail with the same error on both ranks, without a hang. FSDP2 runs through the
multi-tensor (foreach) buckets that GPUs use and, where Triton is installed, through the fused
kernels (``fsdp2_fused``: Triton's, interpreted on a CPU; ``fsdp2_numba``: Numba's); the others through stacked ones. ``fsdp2_frozen``
freezes one weight and leaves it out of the optimizer (BitFit): its layer's ``param_norm`` and
``update_ratio`` must still cover it, combined over its shards. HSDP runs as 2
replicas of a 1-way shard (a (2, 1) mesh): the replicas hold the same figures, which must not be
summed. FSDP1 HYBRID_SHARD runs likewise (1-rank shard groups, one replicate group); on CPU over
gloo torch does not average its replicas' gradients, so it is checked against rank 0's own tensors
only.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fused_kernels_on
from reference import layer_reference
from torch import nn

STEPS = 3
FUSED = fused_kernels_on("cpu")
NUMBA = importlib.util.find_spec("numba") is not None
KINDS = (("fsdp1", "fsdp2", "hsdp", "fsdp1_hybrid", "fsdp2_frozen") + (("fsdp2_fused",) if FUSED else ())
         + (("fsdp2_numba",) if NUMBA else ()))
# fsdp2_frozen: layer "2"'s weight frozen and left out of the optimizer, its bias trained (BitFit):
# the layer's param_norm and update_ratio still cover the frozen weight, across its shards.
FROZEN = "2.weight"
# FSDP2 through each bucket kind (fused: Triton's, interpreted; numba: the CPU's fused kernels);
# the others through stacked buckets.
STRATEGY = {"fsdp2": "foreach", "fsdp2_fused": "fused", "fsdp2_numba": "fused"}
REPLICATED = ("hsdp", "fsdp1_hybrid")  # 2 replicas of a 1-way shard: every rank holds whole tensors
WORLD_SIZE = 2
NAMES = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"], "4": ["4.weight"]}
SHAPES = {"0.weight": (7, 5), "0.bias": (7,), "2.weight": (3, 7), "2.bias": (3,), "4.weight": (1, 3)}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(),
                         nn.Linear(3, 1, bias=False))


def batch(rank: int, step: int):
    data = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(6, 5, generator=data), torch.randn(6, 1, generator=data)


def shard(model: nn.Module, kind: str, **options) -> nn.Module:
    kind = "fsdp2" if kind in ("fsdp2_fused", "fsdp2_frozen", "fsdp2_numba") else kind
    if kind == "fsdp1_hybrid":  # HYBRID_SHARD: shard within (1-rank) groups, replicate across them
        import torch.distributed as dist
        from torch.distributed.fsdp import ShardingStrategy

        shard_groups = [dist.new_group([r]) for r in range(WORLD_SIZE)]  # every rank makes all
        replicas = dist.new_group(list(range(WORLD_SIZE)))
        options.update(sharding_strategy=ShardingStrategy.HYBRID_SHARD,
                       process_group=(shard_groups[dist.get_rank()], replicas))
        kind = "fsdp1"
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
                    device_id=torch.device("cpu"), **{"use_orig_params": True, **options})
    from torch.distributed.fsdp import fully_shard

    if kind == "hsdp":  # 2 replicas of a 1-way shard: figures must not be summed over replicas
        from torch.distributed.device_mesh import init_device_mesh

        options["mesh"] = init_device_mesh("cpu", (WORLD_SIZE, 1),
                                           mesh_dim_names=("replicate", "shard"))
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, **options)
    return fully_shard(model, **options)


def gather(t: torch.Tensor | None, kind: str) -> np.ndarray:
    """All ranks' local shards of ``t`` (a DTensor, a flat FSDP1 slice or None), in rank order."""
    import torch.distributed as dist

    local = getattr(t, "_local_tensor", t)
    local = np.zeros(0) if local is None else local.detach().reshape(-1).double().numpy().copy()
    if kind in REPLICATED:  # every rank holds the whole (1-way sharded) tensor
        return local
    pieces = [None] * WORLD_SIZE
    dist.all_gather_object(pieces, local)
    return np.concatenate(pieces)


def refused(rank: int, out_dir: Path, kind: str) -> str:
    """An unsupported sharding: the Recorder must raise on this rank (the other raises too)."""
    import gradflow

    if kind == "fsdp1":
        model = shard(make_model(), kind, use_orig_params=False)
    else:  # weights sharded on their last dim (tensor-parallel style), biases on dim 0
        from torch.distributed.tensor import Shard

        model = shard(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                                    nn.Linear(4, 4)), kind,
                      shard_placement_fn=lambda p: Shard(p.ndim - 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        gradflow.Recorder(model, optimizer, str(out_dir / f"refused{rank}.zarr"))
    except gradflow.GradflowError as err:
        return str(err)
    return ""


def worker(rank: int, out_dir: Path) -> None:
    """Both kinds, one after the other, in one process group (one process start per rank)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'rendezvous'}", rank=rank,
                            world_size=WORLD_SIZE)
    for kind in KINDS:
        (out_dir / kind).mkdir(exist_ok=True)
        train(rank, out_dir / kind, kind)
    dist.barrier()
    dist.destroy_process_group()


def train(rank: int, out_dir: Path, kind: str) -> None:
    import torch.distributed as dist

    import gradflow
    from gradflow import buckets

    from gradflow import fused_cpu, fused_triton

    buckets.STRATEGY = STRATEGY.get(kind, "stack")
    buckets.fused_kind = lambda device: (fused_triton.TritonFusedBucket if kind == "fsdp2_fused"
                                         else fused_cpu.CpuFusedBucket)
    error = refused(rank, out_dir, kind) if kind not in REPLICATED else ""
    model, reference = make_model(), make_model()  # reference: unsharded, on both ranks' batches
    if kind == "fsdp2_frozen":
        for m in (model, reference):
            m.get_parameter(FROZEN).requires_grad_(False)
    model = shard(model, kind)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                                momentum=0.9)
    ref_optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad],
                                    lr=0.1, momentum=0.9)
    store = out_dir / ("run.zarr" if rank == 0 else f"rank{rank}.zarr")
    recorder = gradflow.Recorder(model, optimizer, str(store), every=1)
    names = [n.replace("_fsdp_wrapped_module.", "") for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(SHAPES), names
    saved = {"error": np.array(error),
             "buckets": np.array(sorted({type(b).__name__ for b in recorder._all_buckets()})
                                 if recorder._active else [])}  # a replica of rank 0: no buckets
    for step in range(STEPS):
        x, y = batch(rank, step)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for name, p in zip(names, model.parameters()):
            if p.requires_grad:  # (not p.grad: FSDP1 leaves it None where a rank's shard is empty)
                saved[f"{step}:{name}:grad"] = gather(p.grad, kind).reshape(SHAPES[name])
            saved[f"{step}:{name}:before"] = gather(p, kind).reshape(SHAPES[name])
        optimizer.step()
        for name, p in zip(names, model.parameters()):
            saved[f"{step}:{name}:after"] = gather(p, kind).reshape(SHAPES[name])
        xs, ys = zip(*(batch(r, step) for r in range(WORLD_SIZE)))
        ref_optimizer.zero_grad()
        nn.functional.mse_loss(reference(torch.cat(xs)), torch.cat(ys)).backward()
        for name, p in reference.named_parameters():
            if p.requires_grad:
                saved[f"{step}:{name}:ref_grad"] = p.grad.double().numpy().copy()
            saved[f"{step}:{name}:ref_before"] = p.detach().double().numpy().copy()
        ref_optimizer.step()
        for name, p in reference.named_parameters():
            saved[f"{step}:{name}:ref_after"] = p.detach().double().numpy().copy()
        if step == 1:
            recorder.end_epoch(train_loss=1.0)
    recorder.close()
    np.savez(out_dir / f"rank{rank}.npz", **saved)
    dist.barrier()


def figures(saved, step: int, prefix: str = "") -> dict:
    out = {}
    for layer, names in NAMES.items():
        tensors = {kind: {n: saved[f"{step}:{n}:{prefix}{kind}"] if f"{step}:{n}:{prefix}{kind}" in saved
                          else None for n in names}  # no gradient: a frozen weight
                   for kind in ("grad", "before", "after")}
        out[layer] = layer_reference(tensors["grad"], tensors["before"], tensors["after"], names)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Both ranks, run once for both kinds."""
    out = tmp_path_factory.mktemp("fsdp")
    root = str(Path(__file__).resolve().parents[1])
    paths = [root, os.path.join(root, "tests"), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(WORLD_SIZE)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for rank, (p, output) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{output}"
    return out


@pytest.mark.parametrize("kind", KINDS[:5] + (pytest.param("fsdp2_fused", marks=pytest.mark.skipif(
    not FUSED, reason="needs Triton (interpreted on a CPU)")), pytest.param(
    "fsdp2_numba", marks=pytest.mark.skipif(not NUMBA, reason="needs Numba"))))
def test_sharded_two_ranks_global_figures(runs, kind):
    import gradflow

    tmp_path = runs / kind
    saved = [np.load(tmp_path / f"rank{rank}.npz") for rank in range(WORLD_SIZE)]

    # Unsupported sharding: the same clear error on both ranks.
    errors = [str(s["error"]) for s in saved]
    if kind not in REPLICATED:
        assert errors[0] and errors[0] == errors[1]
        assert ("use_orig_params" in errors[0]) if kind == "fsdp1" else ("placements" in errors[0])
    assert not (tmp_path / "rank1.zarr").exists(), "rank 1 must not write a store"
    expected = {"fsdp2": "ForeachBucket", "fsdp2_fused": "TritonFusedBucket",
                "fsdp2_numba": "CpuFusedBucket"}.get(kind, "Bucket")
    kinds = [s["buckets"].tolist() for s in saved]
    assert kinds[0] == [expected] and kinds[1] in ([expected], []), kinds

    ds = gradflow.open(str(tmp_path / "run.zarr"))
    assert list(ds["layer"].values) == list(NAMES)  # no _fsdp_wrapped_module
    assert list(ds["module_type"].values) == ["Linear"] * 3  # not FSDPLinear
    assert list(ds["num_params"].values) == [42, 24, 3]  # unsharded sizes
    assert ds.sizes["step"] == STEPS
    for step in range(STEPS):
        exact = figures(saved[0], step)
        unsharded = figures(saved[0], step, "ref_")
        for layer in NAMES:
            for var, value in exact[layer].items():
                got = float(ds[var].isel(step=step).sel(layer=layer))
                np.testing.assert_allclose(got, value, rtol=2e-6, atol=0,
                                           err_msg=f"{var} step {step} layer {layer}")
                if kind == "fsdp1_hybrid":
                    # Found here: FSDP1 HYBRID_SHARD on CPU over gloo leaves each replica's
                    # gradient un-averaged (the ranks' gradients differ and their weights drift
                    # apart), so no unsharded model reproduces its training; rank 0's own tensors
                    # above are the reference (summing over the replicas would not match them).
                    continue
                np.testing.assert_allclose(got, unsharded[layer][var], rtol=1e-4, atol=1e-7,
                                           err_msg=f"vs unsharded: {var} step {step} {layer}")
    if kind == "fsdp1_hybrid":
        replica = np.load(tmp_path / "rank1.npz")
        assert not np.array_equal(replica["0:0.weight:grad"], saved[0]["0:0.weight:grad"])
    # Epoch 0 = steps 0 and 1: W(after step 1) − W(before step 0), combined over the shards.
    ep = gradflow.open(str(tmp_path / "run.zarr"), group="epochs")
    for layer, names in NAMES.items():
        d = np.concatenate([(saved[0][f"1:{n}:after"] - saved[0][f"0:{n}:before"]).ravel()
                            for n in names])
        got = ep.sel(epoch=0, layer=layer)
        np.testing.assert_allclose(float(got.update_mean_abs), np.abs(d).mean(), rtol=2e-6)
        np.testing.assert_allclose(float(got.update_norm), np.sqrt(np.sum(d**2)), rtol=2e-6)

def nccl_worker(rank: int, world: int, out_dir: Path) -> None:
    """FSDP2 on CUDA over NCCL, one GPU per rank: every rank saves the full tensors it saw."""
    import torch.distributed as dist

    import gradflow

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{out_dir / 'rendezvous'}", rank=rank,
                            world_size=world)
    model = shard(make_model().cuda(), "fsdp2")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    recorder = gradflow.Recorder(model, optimizer, str(out_dir / f"rank{rank}.zarr"), every=1)
    saved = {}

    def full(t, name):  # DTensor.full_tensor() all-gathers the shards: every rank calls it
        return t.full_tensor().detach().double().cpu().numpy().reshape(SHAPES[name])

    for step in range(STEPS):
        x, y = batch(rank, step)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x.cuda()), y.cuda()).backward()
        for name, p in model.named_parameters():
            saved[f"{step}:{name}:grad"] = full(p.grad, name)
            saved[f"{step}:{name}:before"] = full(p, name)
        optimizer.step()
        for name, p in model.named_parameters():
            saved[f"{step}:{name}:after"] = full(p, name)
    recorder.close()
    np.savez(out_dir / f"rank{rank}.npz", **saved)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_fsdp2_nccl_global_figures(tmp_path):
    """FSDP2 over NCCL on up to 2 GPUs (one rank per GPU: NCCL refuses two ranks on one GPU, so a
    one-GPU machine runs 1 rank, which still goes through DTensor shards on CUDA and the NCCL
    all-reduces), against first-principles figures from the full tensors."""
    import gradflow

    world = min(2, torch.cuda.device_count())
    root = str(Path(__file__).resolve().parents[1])
    paths = [root, os.path.join(root, "tests"), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(tmp_path), "nccl", str(world)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for rank, (p, output) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{output}"
    assert world == 1 or not (tmp_path / "rank1.zarr").exists(), "rank 1 must not write a store"
    saved = np.load(tmp_path / "rank0.npz")
    ds = gradflow.open(str(tmp_path / "rank0.zarr"))
    assert list(ds["num_params"].values) == [42, 24, 3]
    for step in range(STEPS):
        for layer, value in figures(saved, step).items():
            for var, expected in value.items():
                got = float(ds[var].isel(step=step).sel(layer=layer))
                np.testing.assert_allclose(got, expected, rtol=2e-6, atol=0,
                                           err_msg=f"{var} step {step} layer {layer} (world {world})")


if __name__ == "__main__":
    if sys.argv[3:4] == ["nccl"]:
        nccl_worker(int(sys.argv[1]), int(sys.argv[4]), Path(sys.argv[2]))
    else:
        worker(int(sys.argv[1]), Path(sys.argv[2]))
