"""Recorder on CUDA: float32, bfloat16 and mixed-dtype models; exact figures; no host syncs.

Skipped without a GPU. References are recomputed on the host in float64 from the tensors the
optimizer saw (bfloat16 → float64 is exact), so the recorder must not round its figures to
bfloat16: ‖·‖ and Δw have to be computed in at least float32.
"""

from __future__ import annotations

import traceback
import warnings

import numpy as np
import pytest
import torch
from conftest import fused_kernels_on
from reference import layer_reference
from torch import nn

import gradflow
from gradflow.errors import GradflowWarning

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# The default (the fused Triton kernels where Triton is installed), the multi-tensor buckets and
# the stacking ones (the CPU's).
STRATEGIES = ["auto", "foreach", "stack"]

STEPS = 3
LAYERS = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}  # nn.Sequential(Linear, Tanh, Linear)


def host(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy().copy()  # float64: the reference must not overflow


def make_model(dtypes: tuple[torch.dtype, torch.dtype], device: str) -> nn.Module:
    """Two Linear layers with the given dtypes; a cast in between lets mixed dtypes run."""
    torch.manual_seed(0)
    first, last = nn.Linear(16, 32), nn.Linear(32, 8)
    first.to(device=device, dtype=dtypes[0])
    last.to(device=device, dtype=dtypes[1])

    class Cast(nn.Module):
        def forward(self, x):
            return torch.tanh(x).to(dtypes[1])

    return nn.Sequential(first, Cast(), last)


def train_and_check(tmp_path, dtypes: tuple[torch.dtype, torch.dtype], device: str = "cuda",
                    huge: bool = False) -> None:
    """``huge``: one gradient entry of 1e20 in the last step, whose square overflows float32."""
    model = make_model(dtypes, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    store = str(tmp_path / "run.zarr")
    data = torch.Generator(device=device).manual_seed(1)
    steps = []
    with gradflow.Recorder(model, optimizer, store, every=1):
        for _ in range(STEPS):
            x = torch.randn(8, 16, generator=data, device=device, dtype=dtypes[0])
            y = torch.randn(8, 8, generator=data, device=device, dtype=dtypes[1])
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x).float(), y.float()).backward()
            if huge and len(steps) == STEPS - 1:
                model[0].weight.grad[0, 0] = 1e20
            grads = {n: host(p.grad) for n, p in model.named_parameters()}
            before = {n: host(p) for n, p in model.named_parameters()}
            optimizer.step()
            after = {n: host(p) for n, p in model.named_parameters()}
            steps.append((grads, before, after))
    ds = gradflow.open(store)
    assert list(ds["layer"].values) == list(LAYERS)
    assert ds.sizes["step"] == STEPS
    for step, (grads, before, after) in enumerate(steps):
        for layer, names in LAYERS.items():
            assert not all(np.array_equal(before[n], after[n]) for n in names)  # weights did move
            for var, value in layer_reference(grads, before, after, names).items():
                got = float(ds[var].isel(step=step).sel(layer=layer))
                np.testing.assert_allclose(got, value, rtol=1e-5, atol=0,
                                           err_msg=f"{var} step {step} layer {layer} {dtypes}")


@pytest.mark.parametrize("dtypes", [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),  # two (device, dtype) groups in one model
], ids=["float32", "bfloat16", "mixed"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_figures_match_reference(tmp_path, dtypes, strategy, monkeypatch):
    """Every bucket kind is exact on a GPU; the default is the fused one where Triton is installed
    (not its fallback to foreach, which warns)."""
    monkeypatch.setattr(gradflow.buckets, "STRATEGY", strategy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradflowWarning)
        train_and_check(tmp_path, dtypes)
    if strategy == "auto" and fused_kernels_on("cuda"):
        model = make_model(dtypes, "cuda")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradflow.Recorder(model, optimizer, str(tmp_path / "kind.zarr")) as rec:
            assert {type(b).__name__ for b in rec._all_buckets()} == {"TritonFusedBucket"}


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_norm_of_a_huge_gradient_does_not_overflow(tmp_path, dtypes, strategy, monkeypatch):
    """‖g‖ with an entry of 1e20 is about 1e20, not inf (float32 squares overflow above ~1.8e19)."""
    monkeypatch.setattr(gradflow.buckets, "STRATEGY", strategy)
    train_and_check(tmp_path, dtypes, huge=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_recording_does_not_sync(tmp_path, strategy, monkeypatch):
    """Recording a step never makes the training thread wait for the GPU: the figures go to the host
    by an asynchronous copy that the writer thread waits for (a sync per step would stall a
    launch-bound loop). Both bucket kinds: the multi-tensor default and the stacking one."""
    monkeypatch.setattr(gradflow.buckets, "STRATEGY", strategy)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(20)]).cuda()  # 40 parameter tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 32, device="cuda")
    steps = 5
    with gradflow.Recorder(model, optimizer, str(tmp_path / "run.zarr"), every=1) as recorder:
        for _ in range(2):  # warm-up: first-step set-up may sync
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        recorder.end_epoch()  # the first end_epoch may allocate
        torch.cuda.synchronize()
        syncs = []

        def note(message, *args, **kwargs):  # where each sync came from (the warning names torch)
            if "called a synchronizing CUDA operation" in str(message):  # not the mode's own note
                syncs.append("".join(traceback.format_stack(limit=8)[:-1]))

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = note
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    optimizer.zero_grad()
                    model(x).square().mean().backward()
                    optimizer.step()
                recorder.end_epoch()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert not syncs, f"{len(syncs)} host syncs in {steps} recorded steps:\n" + "\n".join(syncs)
