"""Recorder under DistributedDataParallel: 2 CPU processes, gloo backend, only rank 0 writes.

The test launches this very file twice as a script (ranks 0 and 1). Each rank trains a DDP-wrapped
MLP on its own data, with a Recorder attached, and saves what the optimizer saw (the all-reduced
gradients) and the weights before and after every step. The test then recomputes every per-layer
figure from those raw tensors with numpy and compares them with what rank 0 recorded.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from reference import layer_reference
from torch import nn

STEPS = 3
WORLD_SIZE = 2
LAYERS = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}  # nn.Sequential(Linear, Tanh, Linear)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def worker(rank: int, out_dir: Path) -> None:
    """One DDP rank: train STEPS steps with a Recorder and save grads and weights per step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import gradflow

    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'rendezvous'}", rank=rank,
                            world_size=WORLD_SIZE)
    model = make_model()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    # Rank 0 gets the real store; rank 1 a path of its own, which must never be created.
    store = out_dir / ("run.zarr" if rank == 0 else f"rank{rank}.zarr")
    recorder = gradflow.Recorder(ddp, optimizer, str(store), every=1)
    data = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    saved = {}
    for step in range(STEPS):
        x, y = torch.randn(6, 4, generator=data), torch.randn(6, 3, generator=data)
        optimizer.zero_grad()
        local = copy.deepcopy(model)  # this rank's own gradient, before DDP averages it
        nn.functional.mse_loss(local(x), y).backward()
        for name, p in local.named_parameters():
            saved[f"{step}:{name}:local_grad"] = p.grad.numpy().copy()
        nn.functional.mse_loss(ddp(x), y).backward()
        for name, p in model.named_parameters():
            saved[f"{step}:{name}:grad"] = p.grad.numpy().copy()
            saved[f"{step}:{name}:before"] = p.detach().numpy().copy()
        optimizer.step()
        for name, p in model.named_parameters():
            saved[f"{step}:{name}:after"] = p.detach().numpy().copy()
    recorder.close()
    np.savez(out_dir / f"rank{rank}.npz", **saved)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_two_ranks_only_rank0_writes_exact_figures(tmp_path):
    import gradflow

    root = str(Path(__file__).resolve().parents[1])  # import this checkout's gradflow, installed or not
    paths = [root, os.path.join(root, "tests"), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    procs = [
        subprocess.Popen([sys.executable, __file__, str(rank), str(tmp_path)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(WORLD_SIZE)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    for rank, (p, output) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{output}"

    saved = [np.load(tmp_path / f"rank{rank}.npz") for rank in range(WORLD_SIZE)]
    # The reference itself: the ranks' own gradients differ, DDP gave both their mean, and both
    # ranks hold the same weights; so rank 0's tensors are the whole truth.
    for key in saved[0].files:
        if key.endswith(":local_grad"):
            assert not np.allclose(saved[0][key], saved[1][key])
            mean = (saved[0][key] + saved[1][key]) / 2
            np.testing.assert_allclose(saved[0][key.replace("local_grad", "grad")], mean, rtol=1e-5, atol=1e-7)
        else:
            np.testing.assert_array_equal(saved[0][key], saved[1][key])
    assert not (tmp_path / "rank1.zarr").exists(), "rank 1 must not write a store"

    ds = gradflow.open(str(tmp_path / "run.zarr"))
    assert list(ds["layer"].values) == list(LAYERS)  # no "module." prefix
    assert ds.sizes["step"] == STEPS
    assert list(ds["module_type"].values) == ["Linear", "Linear"]
    assert list(ds["num_params"].values) == [4 * 8 + 8, 8 * 3 + 3]
    for step in range(STEPS):
        for layer, names in LAYERS.items():
            tensors = {kind: {n: saved[0][f"{step}:{n}:{kind}"] for n in names}
                       for kind in ("grad", "before", "after")}
            expected = layer_reference(tensors["grad"], tensors["before"], tensors["after"], names)
            for var, value in expected.items():
                got = float(ds[var].isel(step=step).sel(layer=layer))
                np.testing.assert_allclose(got, value, rtol=2e-6, atol=0,
                                           err_msg=f"{var} step {step} layer {layer}")


if __name__ == "__main__":
    worker(int(sys.argv[1]), Path(sys.argv[2]))
