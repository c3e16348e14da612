"""The fused kernels: Triton's (gradflow/fused_triton.py, on a CPU through Triton's interpreter)
and Numba's (gradflow/fused_cpu.py), which share the bucket around them (gradflow/fused.py).

Every figure is compared with a float64 NumPy reference computed here from the tensors themselves:
‖x‖ = sqrt(Σx²), max|x| (NaN where x holds a NaN), the count of NaN/±Inf, and for the update
d = w_after − w_before taken in the compute dtype (float32; float64 for float64 parameters), ‖d‖,
Σ|d| and max|d|. Triton's chunks are made tiny, so that tensors span several programs of each
kernel; one tensor spans two of Numba's blocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import REPO, fused_kernels_on
from torch import nn

from gradflow import buckets, quantities
from gradflow.errors import GradflowError, GradflowWarning

needs_triton = pytest.mark.skipif(not fused_kernels_on("cpu"),
                                  reason="needs Triton (interpreted on a CPU)")
# 700: three of Triton's chunks of 256; 4200: two of Numba's blocks of 4096
SHAPES = [(3,), (20, 30), (700,), (1,), (5, 4, 3, 3), (4200,)]


@pytest.fixture
def fused_triton(monkeypatch):
    if not fused_kernels_on("cpu"):
        pytest.skip("needs Triton (interpreted on a CPU)")
    from gradflow import fused_triton

    monkeypatch.setattr(fused_triton, "CHUNK", 256)
    monkeypatch.setattr(fused_triton, "BLOCK", 64)
    monkeypatch.setattr(fused_triton, "COMBINE_BLOCK", 2)  # a tensor's chunks in several iterations
    return fused_triton


@pytest.fixture(params=["triton", "numba", "numba-threads"])
def kind(request, monkeypatch):
    """The fused bucket class under test: Triton's (interpreted, tiny chunks) or Numba's, as it is
    (SHAPES[5] spans two blocks) or with tensors cut into pieces of 1,000 elements that three
    threads share (the kernels' work split, otherwise only for tensors of millions)."""
    if request.param == "triton":
        return request.getfixturevalue("fused_triton").TritonFusedBucket
    pytest.importorskip("numba")
    from gradflow import fused_cpu

    assert fused_cpu.BLOCK == 4096  # compiled in
    if request.param == "numba-threads":
        monkeypatch.setattr(fused_cpu, "PIECE", 1000)
        monkeypatch.setattr(fused_cpu, "PARALLEL_MIN_ELEMENTS", 1)
        threads = torch.get_num_threads()
        torch.set_num_threads(3)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    return fused_cpu.CpuFusedBucket


def kind_for(kind: type, dtype: torch.dtype) -> type:
    if not kind.supports(dtype):
        pytest.skip(f"{kind.__name__} has no kernel for {dtype}")
    return kind


def make_params(dtype: torch.dtype) -> list[nn.Parameter]:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(*shape).to(dtype)) for shape in SHAPES]
    params[4].data = params[4].data.contiguous(memory_format=torch.channels_last)  # dense, permuted
    return params


def wide(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy().ravel()


def gradient_reference(g: torch.Tensor | None) -> tuple[float, float, float]:
    if g is None:
        return 0.0, 0.0, 0.0
    x = wide(g.to_dense() if g.is_sparse else g)
    with np.errstate(over="ignore", invalid="ignore"):
        norm = np.sqrt(np.sum(x * x))
    largest = np.nan if np.isnan(x).any() else np.abs(x).max()
    return norm, largest, float(np.sum(~np.isfinite(x)))


def update_reference(after: torch.Tensor, before: torch.Tensor) -> tuple[float, float, float, float]:
    work = quantities.compute_dtype(after.dtype)
    d = wide(after.to(work) - before.to(work))  # the subtraction in the compute dtype, as recorded
    largest = np.nan if np.isnan(d).any() else np.abs(d).max()
    return np.sqrt(np.sum(wide(after) ** 2)), np.sqrt(np.sum(d * d)), np.abs(d).sum(), largest


def row(parts: list, which: int) -> np.ndarray:
    return next(v for r, _, v in parts if r == which).double().numpy()


def assert_update_figures(parts: list, params: list[nn.Parameter], before: list[torch.Tensor],
                          where: str = "") -> None:
    """``after_step``'s ‖w‖, ‖Δw‖, Σ|Δw| and max|Δw| per tensor against :func:`update_reference`."""
    for j, (p, w) in enumerate(zip(params, before)):
        for which, value in zip((quantities.PARAM_NORM_AFTER, quantities.UPDATE_NORM,
                                 quantities.UPDATE_ABS_SUM, quantities.UPDATE_MAX_ABS),
                                update_reference(p, w)):
            np.testing.assert_allclose(row(parts, which)[j], value, rtol=1e-12,
                                       err_msg=f"{where}row {which} tensor {j}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_step_figures_match_float64_references(kind, dtype):
    params = make_params(dtype)
    bucket = kind_for(kind, dtype).build(params, list(range(len(params))))
    if "chunks" in bucket.tables:  # Triton's
        assert bucket.tables["chunks"] == 1 + 3 + 3 + 1 + 1 + 17
    else:  # Numba's: pieces of 1,000 elements (numba-threads) or whole tensors, and the threads
        assert len(bucket.tables["piece_numel"]) == len(SHAPES) + 4 * (not bucket.tables["whole"])
        assert len(bucket._splits()) == (3 if not bucket.tables["whole"] else 1)
    for p in params:
        p.grad = torch.randn_like(p)
    params[2].grad[5], params[2].grad[7] = float("nan"), float("inf")
    params[1].grad[0, 0] = -float("inf")
    params[3].grad = None
    params[5].grad[4100] = float("nan")  # in the second block only
    present = np.ones(len(params), bool)
    parts = bucket.gradient_parts(present, None)
    assert present.tolist() == [True, True, True, False, True, True]
    for j, p in enumerate(params):
        norm, largest, bad = gradient_reference(p.grad)
        np.testing.assert_allclose(row(parts, quantities.GRAD_NORM)[j], norm, rtol=1e-12)
        np.testing.assert_allclose(row(parts, quantities.GRAD_MAX_ABS)[j], largest, rtol=0)
        assert row(parts, quantities.GRAD_NONFINITE)[j] == bad

    before = [p.detach().clone() for p in params]
    parts = bucket.snapshot()
    np.testing.assert_allclose(row(parts, quantities.PARAM_NORM_BEFORE),
                               [np.sqrt(np.sum(wide(w) ** 2)) for w in before], rtol=1e-12)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p), alpha=1e-2)
        params[0][1] = float("nan")  # a NaN weight: its update figures are NaN
        params[5][4097] += 1.0  # the largest update, in the second block
    assert_update_figures(bucket.after_step(), params, before)
    parts = bucket.not_stepped()
    np.testing.assert_allclose(row(parts, quantities.PARAM_NORM_AFTER)[1:],
                               [np.sqrt(np.sum(wide(p) ** 2)) for p in params[1:]], rtol=1e-12)


def test_huge_entries_and_scaled_gradients(kind):
    """1e20 entries square to 1e40 in float64 (finite: float32 squares would be inf); a fused
    optimizer's GradScaler scale divides ‖g‖ and max|g|."""
    params = [nn.Parameter(torch.full((300,), 1e20)), nn.Parameter(torch.ones(4))]
    bucket = kind.build(params, [0, 1])
    for p in params:
        p.grad = p.detach() * 2
    parts = bucket.gradient_parts(np.ones(2, bool), torch.tensor(4.0))
    np.testing.assert_allclose(row(parts, quantities.GRAD_NORM),
                               [2e20 * np.sqrt(300) / 4, 2 * 2 / 4], rtol=1e-6)
    np.testing.assert_allclose(row(parts, quantities.GRAD_MAX_ABS), [2e20 / 4, 2 / 4], rtol=1e-6)
    np.testing.assert_allclose(row(bucket.snapshot(), quantities.PARAM_NORM_BEFORE),
                               [1e20 * np.sqrt(300), 2.0], rtol=1e-6)


def test_gradients_of_any_layout_and_moved_tensors(kind):
    """A transposed (dense) gradient, a gapped one and a sparse one are read as what they hold; a
    gradient or parameter at a new address (``p.data = ...``) is read there, not at the old one,
    also where it is gapped."""
    params = [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(5, 3))]
    bucket = kind.build(params, [0, 1, 2])
    params[0].grad = torch.randn(4, 6).t()
    params[1].grad = torch.randn(16)[::2]
    params[2].grad = torch.randn(5, 3).to_sparse()
    parts = bucket.gradient_parts(np.ones(3, bool), None)
    np.testing.assert_allclose(row(parts, quantities.GRAD_NORM),
                               [gradient_reference(p.grad)[0] for p in params], rtol=1e-12)
    for p in params:
        p.grad = torch.randn_like(p)  # fresh tensors, new addresses
    parts = bucket.gradient_parts(np.ones(3, bool), None)
    np.testing.assert_allclose(row(parts, quantities.GRAD_NORM),
                               [gradient_reference(p.grad)[0] for p in params], rtol=1e-12)
    params[1].data = torch.randn(8) * 5
    np.testing.assert_allclose(row(bucket.snapshot(), quantities.PARAM_NORM_BEFORE),
                               [np.sqrt(np.sum(wide(p) ** 2)) for p in params], rtol=1e-12)
    params[1].data = torch.randn(16)[::2]  # gapped: read through a dense copy
    np.testing.assert_allclose(row(bucket.snapshot(), quantities.PARAM_NORM_BEFORE),
                               [np.sqrt(np.sum(wide(p) ** 2)) for p in params], rtol=1e-12)


def test_unusable_buckets_fall_back_with_a_warning(fused_triton, monkeypatch):
    """Kernels that fail give the device's torch-only bucket (here, a CPU: stack; foreach on a GPU)
    and a warning naming why; never an error inside the training step."""
    monkeypatch.setattr(buckets, "fused_kind", lambda device: fused_triton.TritonFusedBucket)

    class Broken:  # a kernel whose launch fails (as a Triton compile error would)
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("no such kernel")
            return launch

    monkeypatch.setattr(fused_triton, "_partials", Broken())
    monkeypatch.setattr(fused_triton, "_combine", Broken())
    with pytest.warns(GradflowWarning, match="kernels failed"):
        bucket = buckets.build([nn.Parameter(torch.randn(3))], [0], strategy="fused")
    assert type(bucket) is quantities.Bucket


def test_recording_leaves_training_bit_identical(kind, tmp_path, monkeypatch):
    """The snapshot kernel writes only the snapshot: weights trained with fused recording equal the
    weights trained without it, bit for bit."""
    import gradflow

    monkeypatch.setattr(buckets, "STRATEGY", "fused")
    monkeypatch.setattr(buckets, "fused_kind", lambda device: kind)

    def train(record: bool) -> dict:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        rec = gradflow.Recorder(model, optimizer, tmp_path / "run.zarr") if record else None
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(4, 8)).square().mean().backward()
            optimizer.step()
        if rec is not None:
            assert type(rec._all_buckets()[0]) is kind
            rec.close()
        return {k: v.clone() for k, v in model.state_dict().items()}

    with warnings.catch_warnings():
        warnings.simplefilter("error", GradflowWarning)
        recorded = train(True)
    plain = train(False)
    assert all(torch.equal(recorded[k], plain[k]) for k in plain)


def test_kernels_that_compute_wrong_figures_fail_the_self_test(fused_triton, monkeypatch):
    """A Triton that compiled a kernel wrongly (here: one figure off by 1e-6 relative) must cost
    speed, never exactness: the self-test finds it, and the bucket falls back, warning."""
    from gradflow import fused

    real = fused_triton._combine

    class Skewed:
        def __getitem__(self, grid):
            def launch(partials, first, count, out, tensors, MODE, BLOCK):
                real[grid](partials, first, count, out, tensors, MODE=MODE, BLOCK=BLOCK)
                if MODE == fused.AFTER:
                    out[2].mul_(1 + 1e-6)  # Σ|Δw| only
            return launch

    monkeypatch.setattr(fused, "_VERDICTS", {})
    monkeypatch.setattr(fused_triton, "_combine", Skewed())
    with pytest.raises(fused.Unavailable, match=f"row {quantities.UPDATE_ABS_SUM}"):
        fused.self_test(torch.device("cpu"), torch.float32, fused_triton.TritonFusedBucket)
    monkeypatch.setattr(buckets, "fused_kind", lambda device: fused_triton.TritonFusedBucket)
    with pytest.warns(GradflowWarning, match="self-test"):
        bucket = buckets.build([nn.Parameter(torch.randn(3))], [0], strategy="fused")
    assert type(bucket) is quantities.Bucket


def test_numba_kernels_that_compute_wrong_figures_fail_the_self_test(monkeypatch):
    """As for Triton: a Numba that compiled a kernel wrongly (one figure off by 1e-6 relative)
    is found by the self-test, and the CPU records with the stack bucket, warning."""
    pytest.importorskip("numba")
    from gradflow import fused, fused_cpu

    real = fused_cpu._after_kernel

    def skewed(*args):  # (..., partial, lo, hi): partial's columns are Σw², Σd², Σ|d|, max|d|
        real(*args)
        args[-3][:, 2] *= 1 + 1e-6  # Σ|Δw| only

    monkeypatch.setattr(fused, "_VERDICTS", {})
    monkeypatch.setattr(fused_cpu, "_after_kernel", skewed)
    with pytest.raises(fused.Unavailable, match=f"row {quantities.UPDATE_ABS_SUM}"):
        fused.self_test(torch.device("cpu"), torch.float32, fused_cpu.CpuFusedBucket)
    with pytest.warns(GradflowWarning, match="self-test"):
        bucket = buckets.build([nn.Parameter(torch.randn(3))], [0], strategy="fused")
    assert type(bucket) is quantities.Bucket


@pytest.mark.parametrize("why", ["bfloat16", "no numba"])
def test_the_cpu_default_is_numba_where_it_can_be_else_stack(monkeypatch, why):
    """``auto`` on a CPU: Numba's kernels for float32/float64 where Numba is installed; otherwise
    (bfloat16, float16, no Numba) the stack bucket, silently. Asking for ``fused`` where it cannot
    be built warns, naming why."""
    pytest.importorskip("numba")
    from gradflow import fused_cpu

    assert type(buckets.build([nn.Parameter(torch.randn(3))], [0])) is fused_cpu.CpuFusedBucket
    params = [nn.Parameter(torch.randn(3, dtype=torch.bfloat16 if why == "bfloat16" else None))]
    if why == "no numba":
        monkeypatch.setattr(fused_cpu, "numba", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(buckets.build(params, [0])) is quantities.Bucket
    with pytest.warns(GradflowWarning, match="no kernel for torch.bfloat16" if why == "bfloat16"
                      else "Numba is not installed"):
        assert type(buckets.build(params, [0], strategy="fused")) is quantities.Bucket


COMPILE = """
import sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gradflow import fused_triton as fused

for dtype in ("fp32", "bf16", "fp16", "fp64"):
    element = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}[dtype]
    work = tl.float64 if dtype == "fp64" else tl.float32
    pointers = dict.fromkeys(("pointers", "offsets", "numel", "chunk_tensor", "chunk_start"), "*i64")
    kernels = [
        (fused._partials, {**pointers, "snapshot": "*" + dtype, "partials": "*fp64"},
         {"ELEMENT": element, "WORK": work, "CHUNK": fused.CHUNK, "BLOCK": fused.BLOCK}),
        (fused._combine, {"partials": "*fp64", "first_chunk": "*i64", "chunk_count": "*i64",
                          "out": "*fp64", "tensors": "i32"}, {"BLOCK": fused.COMBINE_BLOCK}),
    ]
    for kernel, types, constants in kernels:
        for mode in range(4):
            names = kernel.arg_names
            source = ASTSource(fn=kernel, signature={n: types.get(n, "constexpr") for n in names},
                               constexprs={(names.index(n),): v
                                           for n, v in {**constants, "MODE": mode}.items()})
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
            assert compiled.asm["cubin"], (kernel, dtype, mode)
print("compiled")
"""


@needs_triton
def test_kernels_compile_for_a_gpu_without_one(tmp_path):
    """Triton compiles every phase of both kernels for every dtype to GPU machine code (cubin for
    sm_90: the H100 and H200) here, without a GPU. The interpreter that runs them on a CPU accepts
    what the compiler refuses (a non-constexpr global, say), so this catches that before a GPU
    does. In a process of its own: the interpreter patches triton.language for the process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("change", ["slice", "bigger", "dtype"])
def test_a_parameter_changed_in_size_or_dtype_is_refused_not_misread(kind, change):
    """The kernels read ``numel`` elements of the bucket's dtype at each address: a ``p.data = ...``
    that keeps the address with fewer elements (a slice), gives more, or another dtype, must raise,
    never yield figures read from the wrong memory (the foreach bucket raises or reads it right)."""
    params = [nn.Parameter(torch.arange(8.0)), nn.Parameter(torch.arange(8.0))]
    bucket = kind.build(params, [0, 1])
    bucket.snapshot()
    params[1].data = {"slice": lambda w: w[:4], "bigger": lambda w: torch.arange(16.0),
                      "dtype": lambda w: w.double()}[change](params[1].data)
    with pytest.raises(GradflowError, match="create the Recorder after changing parameters"):
        bucket.snapshot()
    params[1].grad = torch.ones_like(params[1])
    with pytest.raises(GradflowError, match="create the Recorder after changing parameters"):
        bucket.gradient_parts(np.ones(2, bool), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_update_that_relays_a_weight_out_is_measured_elementwise(kind, dtype):
    """An optimizer that assigns ``p.data`` a copy in another memory layout (channels_last in,
    contiguous out) between the snapshot and the step's end: the snapshot holds the old memory
    order, so Δw must pair elements by index, not by memory position."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(2, 3, 4, 4).to(dtype).contiguous(
        memory_format=torch.channels_last)), nn.Parameter(torch.randn(5).to(dtype))]
    bucket = kind_for(kind, dtype).build(params, [0, 1])
    before = [p.detach().clone() for p in params]
    bucket.snapshot()
    with torch.no_grad():
        params[0].data = (params[0].data * 1.5 + 1).contiguous()
        params[1].add_(0.5)
    assert_update_figures(bucket.after_step(), params, before)


@pytest.mark.parametrize("when", ["during", "before"])
def test_a_weight_relaid_in_place_is_measured_elementwise(kind, when):
    """``p.data = p.data.t()`` on a square weight keeps its address and size but pairs every
    element with another one: Δw is w_after − w_before by index (here, during the step, the
    transpose itself is the update), never by memory position. Relaid before the snapshot, the
    step's update is measured in the new layout."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 5)), nn.Parameter(torch.randn(3))]
    bucket = kind.build(params, [0, 1])
    for _ in range(2):  # the address table of a first step is reused by the second
        if when == "before":
            params[0].data = params[0].data.t()
        before = [p.detach().clone() for p in params]
        bucket.snapshot()
        with torch.no_grad():
            if when == "during":
                params[0].data = params[0].data.t()  # same address, same size, new strides
            for p in params:
                p.add_(0.125)
        assert_update_figures(bucket.after_step(), params, before)


RECORD_ONE_STEP = """
import sys, tempfile, warnings
import numpy as np
import torch
{prelude}
import gradflow
from gradflow import quantities

warnings.simplefilter("always")
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
rec = gradflow.Recorder(model, optimizer, tempfile.mkdtemp() + "/run.zarr")
optimizer.zero_grad()
model(torch.randn(5, 4)).square().sum().backward()
g = np.concatenate([p.grad.double().numpy().ravel() for p in model.parameters()])
optimizer.step()
rec.close()
recorded = float(gradflow.open(rec._store.url).grad_norm.values[0, 0])
assert recorded == np.float32(np.sqrt(np.sum(g * g))), (recorded, np.sqrt(np.sum(g * g)))
print("kind", type(rec._all_buckets()[0]).__name__)
"""


def run_one_step(prelude: str, pythonpath: list) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*pythonpath, REPO]))}
    return subprocess.run([sys.executable, "-c", RECORD_ONE_STEP.format(prelude=prelude)], env=env,
                          capture_output=True, text=True, timeout=600, check=False, cwd=REPO)


def test_without_a_writable_cache_location_the_kernels_compile_in_process():
    """A read-only install and a read-only home directory leave Numba no place for its cache, and
    then ``cache=True`` raises when the kernels are defined (a RuntimeError that made every
    Recorder fail on a CPU). Here Numba is given no cache locator at all: the kernels are compiled
    in the process and record exactly, without a warning."""
    pytest.importorskip("numba")
    prelude = ("from numba.core import caching\n"
               "impl = getattr(caching, 'CacheImpl', None) or caching._CacheImpl\n"
               "impl._locator_classes = []")
    result = run_one_step(prelude, [])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kind CpuFusedBucket" in result.stdout and "Warning" not in result.stderr, result.stderr


HIDE_TRITON = """
import atexit, traceback
asked = []  # where gradflow's code imported Triton

class HideTriton:  # torch's optimizers import Triton where it is installed: hide it from them
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            ours = [f for f in traceback.extract_stack() if f.filename.startswith({package!r})]
            asked.extend(f"{{f.filename}}:{{f.lineno}}" for f in ours[-1:])
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, HideTriton())
atexit.register(lambda: print("gradflow imported triton at", asked))
"""


def test_a_cpu_recorder_does_not_import_triton():
    """Triton costs about 70 MiB of resident memory and is of no use on a CPU: recording on a CPU
    (Numba's kernels, their self-test included) must not import it. In a process of its own, where
    every import of Triton is refused and the ones that gradflow's code asks for are noted (torch's
    optimizers import it too, where it is installed, and would hide gradflow's)."""
    pytest.importorskip("numba")
    result = run_one_step(HIDE_TRITON.format(package=str(REPO / "gradflow")), [])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kind CpuFusedBucket" in result.stdout, result.stdout + result.stderr[-3000:]
    assert "gradflow imported triton at []" in result.stdout, result.stdout


CACHE_HITS = """
import atexit
atexit.register(lambda: print("cache hits", sum(len(getattr(sys.modules["gradflow.fused_cpu"], k)
                                                    .stats.cache_hits) for k in (
    "_gradient_kernel", "_norm_kernel", "_snapshot_kernel", "_after_kernel"))))
"""


@pytest.mark.parametrize("corrupt", ["index", "data"])
def test_a_corrupt_kernel_cache_is_compiled_again_and_rewritten(tmp_path, monkeypatch, corrupt):
    """Numba's on-disk cache of the kernels, cut short or overwritten (a full disk, a crash while
    writing): the next process compiles the kernels again and records exactly with them (not the
    stacked ops, silently, in every process until someone deletes the cache), and rewrites the
    cache, which the process after it loads."""
    pytest.importorskip("numba")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
    first = run_one_step(CACHE_HITS, [])
    assert "kind CpuFusedBucket" in first.stdout and "cache hits 0" in first.stdout, first.stderr
    files = sorted((tmp_path / "cache").rglob("*.nbi" if corrupt == "index" else "*.nbc"))
    assert len(files) >= 4, files  # one per kernel at least
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2] + b"garbage")
    again = run_one_step(CACHE_HITS, [])  # (asserts that the recorded ‖g‖ is exact)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "kind CpuFusedBucket" in again.stdout and "Warning" not in again.stderr, again.stderr
    assert "cache hits 0" in again.stdout, again.stdout
    third = run_one_step(CACHE_HITS, [])
    assert "kind CpuFusedBucket" in third.stdout and "cache hits 4" in third.stdout, third.stdout


@pytest.mark.parametrize("broken", ["library", "definitions"])
def test_a_broken_numba_records_with_the_stacked_ops_and_one_warning(tmp_path, broken):
    """A Numba that is installed but fails to import (``OSError`` from a missing llvmlite
    library) or refuses the kernels' definitions: no traceback, one GradflowWarning naming the
    failure, and the stacked ops record the step exactly."""
    fake = tmp_path / "numba"
    fake.mkdir()
    if broken == "library":
        (fake / "__init__.py").write_text("raise OSError('Could not find/load shared object "
                                          "file')\n")
    else:
        (fake / "__init__.py").write_text("types = None\n"
                                          "def njit(*args, **kwargs):\n"
                                          "    raise TypeError('unknown option inline')\n")
        (fake / "extending.py").write_text("def intrinsic(f):\n    return f\n")
        (fake / "core").mkdir()
        (fake / "core" / "__init__.py").write_text("")
        (fake / "core" / "caching.py").write_text("class FunctionCache:\n    pass\n")
    result = run_one_step("", [tmp_path])
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "kind Bucket" in result.stdout
    assert result.stderr.count("GradflowWarning") == 1, result.stderr
    assert ("could not find/load" if broken == "library" else "unknown option inline") \
        in result.stderr.lower()


@pytest.mark.parametrize("when", ["during", "before"])
def test_a_weight_left_gapped_in_memory_is_measured_not_refused(kind, when):
    """An optimizer (or the loop) that assigns ``p.data`` a gapped view of the same shape
    (``w[:, ::2]`` of a wider buffer): the stacked ops record it, so the fused kernels must too,
    never raise inside ``optimizer.step()``. The gapped weight is read through a dense copy; Δw
    pairs elements by index, whatever the layouts before and after."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(2, 3, 4, 4).contiguous(
        memory_format=torch.channels_last)), nn.Parameter(torch.randn(3))]
    bucket = kind.build(params, [0, 1, 2])
    for step in range(3):
        if when == "before":
            for p in params[:2]:
                wide_buffer = torch.zeros(*p.shape[:-1], 2 * p.shape[-1])
                wide_buffer[..., ::2] = p.detach()
                p.data = wide_buffer[..., ::2]
        before = [p.detach().clone() for p in params]
        np.testing.assert_allclose(row(bucket.snapshot(), quantities.PARAM_NORM_BEFORE),
                                   [np.sqrt(np.sum(wide(w) ** 2)) for w in before], rtol=1e-12)
        with torch.no_grad():
            if when == "during":
                for p in params[:2]:
                    wide_buffer = torch.randn(*p.shape[:-1], 2 * p.shape[-1])
                    wide_buffer[..., ::2] = p.detach() + 0.5
                    p.data = wide_buffer[..., ::2]
            for p in params:
                p.add_(0.125 * (step + 1))
        assert_update_figures(bucket.after_step(), params, before, f"step {step} ")
        np.testing.assert_allclose(row(bucket.not_stepped(), quantities.PARAM_NORM_AFTER),
                                   [np.sqrt(np.sum(wide(p) ** 2)) for p in params], rtol=1e-12)


def test_the_numba_self_test_runs_pieces_on_threads(monkeypatch):
    """The runtime self-test must cover what only large buckets do on a CPU (a tensor in several
    pieces, combined; pieces on two threads): a kernel that is wrong only for a piece that does
    not start a tensor, or only off the calling thread, must fail it."""
    pytest.importorskip("numba")
    import threading

    from gradflow import fused, fused_cpu

    real, seen = fused_cpu._snapshot_kernel, []

    def later_pieces_skewed(addresses, tensor, start, numel, offsets, snapshot, partial, lo, hi):
        real(addresses, tensor, start, numel, offsets, snapshot, partial, lo, hi)
        seen.append((threading.current_thread() is threading.main_thread(),
                     bool((start[lo:hi] > 0).any())))
        partial[lo:hi, 0] *= np.where(start[lo:hi] > 0, 1 + 1e-6, 1.0)  # Σw² of later pieces only

    monkeypatch.setattr(fused, "_VERDICTS", {})
    monkeypatch.setattr(fused_cpu, "_snapshot_kernel", later_pieces_skewed)
    with pytest.raises(fused.Unavailable, match=f"row {quantities.PARAM_NORM_BEFORE}"):
        fused.self_test(torch.device("cpu"), torch.float32, fused_cpu.CpuFusedBucket)
    assert {main for main, _ in seen} == {True, False} and any(later for _, later in seen)


def test_the_numba_self_test_crosses_blocks_within_a_piece(monkeypatch):
    """A kernel that is wrong only past the first block of a piece (the blocks that every tensor
    of more than 4,096 elements has) must fail the runtime self-test: its pieces span two blocks."""
    pytest.importorskip("numba")
    from gradflow import fused, fused_cpu

    real = fused_cpu._after_kernel

    def long_pieces_skewed(addresses, tensor, start, numel, offsets, snapshot, partial, lo, hi):
        real(addresses, tensor, start, numel, offsets, snapshot, partial, lo, hi)
        partial[lo:hi, 1] *= np.where(numel[lo:hi] > fused_cpu.BLOCK, 1 + 1e-6, 1.0)  # Σd² only

    monkeypatch.setattr(fused, "_VERDICTS", {})
    monkeypatch.setattr(fused_cpu, "_after_kernel", long_pieces_skewed)
    with pytest.raises(fused.Unavailable, match=f"row {quantities.UPDATE_NORM}"):
        fused.self_test(torch.device("cpu"), torch.float32, fused_cpu.CpuFusedBucket)


def test_the_self_test_checks_finite_norms_and_maxima_across_chunks(monkeypatch):
    """The self-test's long gradient with NaN/Inf has NaN norm and max, which would hide a kernel
    wrong only past a tensor's first block: a finite long tensor must show it."""
    pytest.importorskip("numba")
    from gradflow import fused, fused_cpu

    real = fused_cpu._gradient_kernel

    def long_pieces_skewed(addresses, tensor, start, numel, like, partial, lo, hi):
        real(addresses, tensor, start, numel, like, partial, lo, hi)
        partial[lo:hi, 0] *= np.where(numel[lo:hi] > fused_cpu.BLOCK, 1 + 1e-6, 1.0)  # Σg² only

    monkeypatch.setattr(fused, "_VERDICTS", {})
    monkeypatch.setattr(fused_cpu, "_gradient_kernel", long_pieces_skewed)
    with pytest.raises(fused.Unavailable, match=f"row {quantities.GRAD_NORM}"):
        fused.self_test(torch.device("cpu"), torch.float32, fused_cpu.CpuFusedBucket)


def end_epoch(bucket) -> list:
    with torch.no_grad():  # as the Recorder calls it
        return bucket.end_epoch()


def assert_epoch_figures(parts: list, params: list[nn.Parameter], start: list[torch.Tensor],
                         where: str = "") -> None:
    """``end_epoch``'s ‖W_end − W_start‖ and Σ|W_end − W_start| per tensor against
    :func:`update_reference` of the weights now and ``start`` (saved by the test)."""
    got = quantities.to_host(parts).resolve(2, len(params))[0]
    for j, (p, w) in enumerate(zip(params, start)):
        _, norm, abs_sum, _ = update_reference(p, w)
        np.testing.assert_allclose(got[quantities.EPOCH_NORM, j], norm, rtol=1e-12,
                                   err_msg=f"{where}epoch norm, tensor {j}")
        np.testing.assert_allclose(got[quantities.EPOCH_ABS_SUM, j], abs_sum, rtol=1e-12,
                                   err_msg=f"{where}epoch Σ|d|, tensor {j}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_epoch_figures_over_several_epochs_match_float64_references(kind, dtype):
    """Three epochs of recorded steps (which rewrite the Δw snapshot, not the epoch copy) and an
    unrecorded change: each epoch's W_end − W_start is from the end of the one before, in every
    tensor (a permuted one, one of two blocks, one in pieces on threads)."""
    params = make_params(dtype)
    bucket = kind_for(kind, dtype).build(params, list(range(len(params))))
    gen = torch.Generator().manual_seed(3)
    bucket.start_epoch()
    for epoch in range(3):
        start = [p.detach().clone() for p in params]
        for step in range(epoch + 1):
            before = [p.detach().clone() for p in params]
            bucket.snapshot()
            with torch.no_grad():
                for j, p in enumerate(params):
                    p.add_(torch.randn(p.shape, generator=gen).to(dtype), alpha=0.01 * (j + 1))
            assert_update_figures(bucket.after_step(), params, before, f"epoch {epoch} ")
        with torch.no_grad():
            params[epoch].add_(1.0)  # not a recorded step: in the epoch's displacement only
            params[5][4100] -= 3.0  # in the second block
        assert_epoch_figures(end_epoch(bucket), params, start, f"epoch {epoch}: ")


def test_weights_relaid_within_epochs_are_measured_by_index(kind):
    """Parameters relaid in memory with their shapes kept, between the epoch's start and its end
    (a square transpose in place, channels_last to contiguous, dense to gapped) and back in the
    next epoch: W_end − W_start pairs elements by index, as the reference does, whatever the
    layouts at either end."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 5)), nn.Parameter(torch.randn(2, 3, 4, 4).contiguous(
        memory_format=torch.channels_last)), nn.Parameter(torch.randn(6, 4)),
        nn.Parameter(torch.randn(3))]
    bucket = kind.build(params, list(range(len(params))))
    bucket.start_epoch()

    def gapped(w: torch.Tensor) -> torch.Tensor:
        wide_buffer = torch.randn(*w.shape[:-1], 2 * w.shape[-1])
        wide_buffer[..., ::2] = w
        return wide_buffer[..., ::2]

    relayouts = [(lambda w: w.t(), lambda w: w.contiguous(), gapped),  # epoch 0
                 (lambda w: w.t(), lambda w: w.contiguous(memory_format=torch.channels_last),
                  lambda w: w.contiguous())]  # epoch 1: back
    for epoch, relayout in enumerate(relayouts):
        start = [p.detach().clone() for p in params]
        before = [p.detach().clone() for p in params]
        bucket.snapshot()
        with torch.no_grad():
            for p in params:
                p.add_(0.25)
        assert_update_figures(bucket.after_step(), params, before, f"epoch {epoch} ")
        for p, change in zip(params, relayout):
            p.data = change(p.data)
        with torch.no_grad():
            for p in params:
                p.mul_(1.5)
        assert_epoch_figures(end_epoch(bucket), params, start, f"epoch {epoch}: ")
    start = [p.detach().clone() for p in params]  # an epoch without a change of layout
    with torch.no_grad():
        params[0].sub_(0.5)
    assert_epoch_figures(end_epoch(bucket), params, start, "epoch 2: ")


@pytest.mark.parametrize("change", ["shape", "size", "dtype"])
def test_a_parameter_reshaped_or_replaced_within_an_epoch_is_refused_and_its_start_kept(kind,
                                                                                    change):
    """Another shape of as many elements within an epoch leaves W_end − W_start undefined, another
    size or dtype would misread memory: ``check_epoch`` and ``end_epoch`` raise the one-line
    error and change nothing, so once the parameter is put back the epoch is measured from its
    own start."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(3))]
    bucket = kind.build(params, [0, 1])
    bucket.start_epoch()
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(0.5)
    kept = params[0].data
    params[0].data = {"shape": lambda w: w.view(6, 4), "size": lambda w: w[:2],
                      "dtype": lambda w: w.double()}[change](kept)
    message = ("changed shape during the epoch" if change == "shape"
               else "changed size, dtype or device")
    for call in (bucket.check_epoch, lambda: end_epoch(bucket)):
        with pytest.raises(GradflowError, match=f"{message}.*create the Recorder after changing "
                                                f"parameters$"):
            call()
    params[0].data = kept
    with torch.no_grad():
        params[1].mul_(2.0)
    assert_epoch_figures(end_epoch(bucket), params, start)


def test_without_a_snapshot_there_is_no_epoch_copy_and_no_epoch_figures(kind):
    params = make_params(torch.float32)
    bucket = kind.build(params, list(range(len(params))), snapshot=False)
    bucket.start_epoch()
    with torch.no_grad():
        params[0].add_(1.0)
    bucket.check_epoch()
    assert end_epoch(bucket) == []
    assert bucket.epoch == [] and getattr(bucket, "epoch_flat", None) is None


EPOCH_PEAK = """
import resource, sys
import torch
from gradflow import fused_cpu
torch.set_num_threads(1)
torch.set_grad_enabled(False)  # as the Recorder calls the buckets
params = [torch.nn.Parameter(torch.randn(1 << 21)) for _ in range(8)]  # 64 MiB of float32
params[3].data = torch.randn(1 << 11, 1 << 10).t()  # dense, transposed
bucket = fused_cpu.CpuFusedBucket.build(params, list(range(len(params))))
bucket.start_epoch()
bucket.snapshot()
with torch.no_grad():
    for p in params:
        p.add_(1.0)
bucket.after_step()  # the snapshot and the epoch copy are resident now

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status")
                if line.startswith(field + ":"))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident memory (VmHWM) starts again from the current
before = kib("VmRSS")
parts = bucket.end_epoch()
print("grown_kib", kib("VmHWM") - before, "kept_kib", kib("VmRSS") - before)
"""


def test_a_cpu_end_epoch_holds_no_parameter_sized_memory(tmp_path):
    """``end_epoch`` on Numba's bucket reads W_end − W_start with its kernels against the epoch
    copy: its peak resident memory stays within a small fraction of the parameters' (here < 2 MiB
    of 64 MiB; the multi-tensor ops wrote a scratch of P/8 = 8 MiB, kept resident after)."""
    pytest.importorskip("numba")
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run([sys.executable, "-c", EPOCH_PEAK], env=env, capture_output=True,
                            text=True, timeout=600, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    grown, kept = int(words[words.index("grown_kib") + 1]), int(words[words.index("kept_kib") + 1])
    assert grown < 2048 and kept < 2048, result.stdout


def test_a_parameter_gapped_at_build_is_read_through_copies(kind):
    """A parameter that is not dense in memory when the bucket is built (a slice ``w[:, ::2]``) keeps
    the fused kernels (it gave the stacked ops for the whole bucket): it is read through a dense copy
    in each phase, and every step and epoch figure matches the references."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 8)[:, ::2]), nn.Parameter(torch.randn(6, 5)),
              nn.Parameter(torch.randn(3, 10).t())]  # gapped, dense, dense transposed
    bucket = kind.build(params, [0, 1, 2])
    bucket.start_epoch()
    start = [p.detach().clone() for p in params]
    for step in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        parts = bucket.gradient_parts(np.ones(3, bool), None)
        np.testing.assert_allclose(row(parts, quantities.GRAD_NORM),
                                   [gradient_reference(p.grad)[0] for p in params], rtol=1e-12)
        before = [p.detach().clone() for p in params]
        np.testing.assert_allclose(row(bucket.snapshot(), quantities.PARAM_NORM_BEFORE),
                                   [np.sqrt(np.sum(wide(w) ** 2)) for w in before], rtol=1e-12)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p), alpha=1e-2)
        assert_update_figures(bucket.after_step(), params, before, f"step {step} ")
    assert_epoch_figures(end_epoch(bucket), params, start)
