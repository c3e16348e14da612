"""Per-tensor figure kernels and per-layer aggregation on hand-made tensors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from gradflow import quantities as q

INF, NAN = float("inf"), float("nan")


def test_gradient_figures_on_hand_made_rows():
    grads = torch.tensor([[3.0, -4.0, 0.0, 0.0], [1.0, NAN, INF, -INF], [0.0, 0.0, 0.0, -2.0]])
    norm, max_abs = (x.tolist() for x in q.gradient_stats(grads.clone()))
    assert norm[0] == 5 and np.isnan(norm[1]) and norm[2] == 2
    assert max_abs[0] == 4 and np.isnan(max_abs[1]) and max_abs[2] == 2
    assert q.nonfinite_counts(grads.clone()).tolist() == [0, 3, 0]
    assert q.nonfinite_counts(torch.tensor([[INF, 1.0]])).tolist() == [1]


def test_update_figures_and_norms():
    diff = torch.tensor([[3.0, -4.0, 0.0], [0.0, 0.0, 0.0], [-0.5, 0.25, 0.0]])
    norm, abs_sum, max_abs = q.update_stats(diff.clone())
    np.testing.assert_allclose(norm.tolist(), [5.0, 0.0, np.sqrt(0.3125)], rtol=1e-7)
    assert abs_sum.tolist() == [7.0, 0.0, 0.75]
    assert max_abs.tolist() == [4.0, 0.0, 0.5]
    np.testing.assert_allclose(q.norms(diff).tolist(), [5.0, 0.0, np.sqrt(0.3125)], rtol=1e-7)


# The foreach bucket as on a GPU: non-finite entries counted every step, with no host look.
KINDS = [q.Bucket, q.ForeachBucket, "foreach, count always"]


def build(kind, *args, **kwargs):
    if kind == "foreach, count always":
        bucket = q.ForeachBucket.build(*args, **kwargs)
        assert not bucket.count_always  # on a CPU it looks first
        bucket.count_always = True
        return bucket
    return kind.build(*args, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_bucket_figures_for_bfloat16_with_a_missing_gradient(kind):
    torch.manual_seed(0)
    # Two big tensors of one shape are stacked; three small odd ones share a zero-padded matrix.
    shapes = [(48, 48)] * 2 + [(5,), (2, 2), ()]
    params = [torch.randn(shape, dtype=torch.bfloat16) for shape in shapes]
    bucket = build(kind, params, list(range(4, 9)))  # global indices 4..8
    if kind is q.Bucket:
        classes = [(type(c).__name__, len(c.params)) for c in bucket.classes]
        assert classes == [("ShapeClass", 2), ("RaggedClass", 3)]
    # Three steps reusing the buffers: a different gradient missing, then NaN/Inf in both classes.
    for missing, bad in (([1, 3], []), ([0, 2], []), ([], [1, 4])):
        for j, p in enumerate(params):
            p.grad = None if j in missing else torch.randn(p.shape, dtype=torch.bfloat16)
            if j in bad:
                p.grad.view(-1)[0] = NAN if j == 1 else INF
        present = np.ones(9, dtype=bool)
        before = [p.double().numpy().copy() for p in params]
        parts = bucket.before_step(present, grad_scale=None)
        for p in params:
            p.sub_(0.125 * torch.sign(p))  # a bf16 update
        parts += bucket.after_step()
        matrix, found_inf = q.to_host(parts).resolve(q.NUM_STATS, 9)
        assert found_inf == 0 and matrix[q.GRAD_NONFINITE].sum() == len(bad)
        assert present.tolist() == [True] * 4 + [j not in missing for j in range(5)]
        for j, p in enumerate(params):
            t = 4 + j
            g = np.zeros(p.shape) if p.grad is None else p.grad.double().numpy()
            d = p.double().numpy() - before[j]
            expected = {q.GRAD_NORM: np.sqrt(np.sum(g**2)), q.GRAD_MAX_ABS: np.abs(g).max(),
                        q.GRAD_NONFINITE: np.sum(~np.isfinite(g)),
                        q.PARAM_NORM_BEFORE: np.sqrt(np.sum(before[j]**2)),
                        q.UPDATE_NORM: np.sqrt(np.sum(d**2)), q.UPDATE_ABS_SUM: np.abs(d).sum(),
                        q.UPDATE_MAX_ABS: np.abs(d).max(),
                        q.PARAM_NORM_AFTER: np.sqrt(np.sum(p.double().numpy()**2))}
            for row, value in expected.items():
                np.testing.assert_allclose(matrix[row, t], value, rtol=1e-6, err_msg=f"row {row} t {t}")
        assert (matrix[:, :4] == 0).all()


@pytest.mark.parametrize("kind", [q.Bucket, q.ForeachBucket])
def test_grad_scale_unscales_the_gradient_figures(kind):
    p = torch.zeros(2)
    p.grad = torch.tensor([6.0, -8.0])
    bucket = kind.build([p], [0])
    parts = bucket.before_step(np.ones(1, dtype=bool), grad_scale=torch.tensor(4.0))
    matrix, _ = q.to_host(parts).resolve(q.NUM_STATS, 1)
    assert matrix[q.GRAD_NORM, 0] == 2.5 and matrix[q.GRAD_MAX_ABS, 0] == 2.0


def test_layer_step_figures_combine_tensors():
    # Layer 0 = tensors 0, 1 (10 and 5 elements); layer 1 = tensor 2 (4 elements, no gradient).
    per_tensor = np.zeros((1, q.NUM_STATS, 3))
    per_tensor[0, q.GRAD_NORM] = [3.0, 4.0, 0.0]
    per_tensor[0, q.GRAD_MAX_ABS] = [2.0, 3.0, 0.0]
    per_tensor[0, q.GRAD_NONFINITE] = [1.0, 2.0, 0.0]
    per_tensor[0, q.PARAM_NORM_BEFORE] = [8.0, 6.0, 2.0]
    per_tensor[0, q.UPDATE_NORM] = [1.0, np.sqrt(3.0), 0.0]
    per_tensor[0, q.UPDATE_ABS_SUM] = [2.0, 4.0, 0.0]
    per_tensor[0, q.UPDATE_MAX_ABS] = [0.5, 1.5, 0.0]
    per_tensor[0, q.PARAM_NORM_AFTER] = [1.0, np.sqrt(8.0), 4.0]
    present = np.array([[True, True, False]])
    out = q.layer_step_stats(per_tensor, present, np.array([0, 2]), np.array([15.0, 4.0]))
    assert out["grad_norm"][0, 0] == 5.0 and np.isnan(out["grad_norm"][0, 1])
    assert out["grad_max_abs"][0, 0] == 3.0 and np.isnan(out["grad_max_abs"][0, 1])
    assert out["nonfinite"][0, 0] == 3.0 and np.isnan(out["nonfinite"][0, 1])
    np.testing.assert_allclose(out["update_norm"], [[2.0, 0.0]], rtol=1e-7)
    np.testing.assert_allclose(out["update_mean_abs"], [[6.0 / 15.0, 0.0]])
    assert out["update_max_abs"].tolist() == [[1.5, 0.0]]
    np.testing.assert_allclose(out["param_norm"], [[3.0, 4.0]], rtol=1e-7)
    np.testing.assert_allclose(out["update_ratio"], [[0.2, 0.0]], rtol=1e-7)
    assert all(v.dtype == np.float32 for v in out.values())


def test_layer_epoch_figures():
    per_tensor = np.array([[3.0, 1.0, 8.0], [2.0, np.sqrt(5.0), 3.0]])  # abs sums, norms
    out = q.layer_epoch_stats(per_tensor, np.array([0, 2]), np.array([8.0, 2.0]))
    np.testing.assert_allclose(out["update_mean_abs"], [0.5, 4.0])
    np.testing.assert_allclose(out["update_norm"], [3.0, 3.0])


def _reference_figures(g, before, after):
    d = after - before
    return {q.GRAD_NORM: np.sqrt(np.sum(g**2)), q.GRAD_MAX_ABS: np.abs(g).max(),
            q.GRAD_NONFINITE: np.sum(~np.isfinite(g)),
            q.PARAM_NORM_BEFORE: np.sqrt(np.sum(before**2)),
            q.UPDATE_NORM: np.sqrt(np.sum(d**2)), q.UPDATE_ABS_SUM: np.abs(d).sum(),
            q.UPDATE_MAX_ABS: np.abs(d).max(), q.PARAM_NORM_AFTER: np.sqrt(np.sum(after**2))}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_small_scratch_splits_classes_and_blocks_exactly(dtype, kind):
    """A scratch of 2000 elements: a 3×900 tensor is read in blocks, a class of 4×(40,40) in runs of 1;
    every figure still matches float64 first principles, and NaN in one block wins over the rest."""
    torch.manual_seed(1)
    shapes = [(3, 900)] + [(40, 40)] * 4 + [(5000,)]
    params = [torch.randn(shape).to(dtype) for shape in shapes]
    bucket = build(kind, params, list(range(6)), scratch_elements=2000)
    if kind is q.Bucket:
        kinds = sorted({type(c).__name__ for c in bucket.classes})
        assert kinds == ["BlockClass", "ShapeClass"]
        assert max(c.scratch.numel() for c in bucket.classes) <= 2000
        assert all(c.snapshot.dtype == dtype for c in bucket.classes)  # Δw snapshot: own dtype
    else:
        assert max(sum(v.numel() for v in views) for views in bucket.scratch_views) <= 2000
        assert all(s.dtype == dtype for s in bucket.snaps)
    bucket.start_epoch()
    start = [p.double().numpy().copy() for p in params]
    for bad in (False, True):
        for p in params:
            p.grad = torch.randn(p.shape).to(dtype)
        if bad:
            params[0].grad[2, 899] = NAN  # in the last block of the 3×40 tensor
            params[5].grad[0] = INF
        present = np.ones(6, dtype=bool)
        before = [p.double().numpy().copy() for p in params]
        parts = bucket.before_step(present, grad_scale=None)
        for p in params:
            p.sub_(0.01 * torch.sign(p) + 0.001 * torch.randn(p.shape).to(dtype))
        parts += bucket.after_step()
        matrix, _ = q.to_host(parts).resolve(q.NUM_STATS, 6)
        for j, p in enumerate(params):
            expected = _reference_figures(p.grad.double().numpy(), before[j], p.double().numpy())
            for row, value in expected.items():
                np.testing.assert_allclose(matrix[row, j], value, rtol=2e-6,
                                           err_msg=f"{dtype} row {row} tensor {j} bad={bad}")
    epoch, _ = q.to_host(bucket.end_epoch()).resolve(2, 6)
    for j, p in enumerate(params):
        d = p.double().numpy() - start[j]
        np.testing.assert_allclose(epoch[q.EPOCH_NORM, j], np.sqrt(np.sum(d**2)), rtol=2e-6)
        np.testing.assert_allclose(epoch[q.EPOCH_ABS_SUM, j], np.abs(d).sum(), rtol=2e-6)


@pytest.mark.parametrize("kind", [q.Bucket, q.ForeachBucket])
def test_snapshot_false_keeps_gradient_figures_and_norms_only(kind):
    p = torch.tensor([3.0, -4.0])
    p.grad = torch.tensor([1.0, 0.0])
    bucket = kind.build([p], [0], snapshot=False)
    parts = bucket.before_step(np.ones(1, dtype=bool), grad_scale=None)
    p.sub_(1.0)
    parts += bucket.after_step()
    assert {row for row, _, _ in parts} == {q.GRAD_NORM, q.GRAD_MAX_ABS, q.PARAM_NORM_BEFORE,
                                            q.PARAM_NORM_AFTER}
    matrix, _ = q.to_host(parts).resolve(q.NUM_STATS, 1)
    assert matrix[q.PARAM_NORM_BEFORE, 0] == 5.0 and matrix[q.GRAD_NORM, 0] == 1.0
    np.testing.assert_allclose(matrix[q.PARAM_NORM_AFTER, 0], np.sqrt(4.0 + 25.0))


def test_foreach_count_of_more_than_2_24_nonfinite_entries_is_exact():
    """The multi-tensor bucket counts non-finite entries as float32 sums of 0/1 per piece: pieces
    are capped at 2**24 elements, so 2**24 + 3 NaN in one tensor count exactly."""
    n = (1 << 24) + 3
    p = torch.zeros(n)
    p.grad = torch.full((n,), NAN)
    bucket = build("foreach, count always", [p], [0], snapshot=False, scratch_elements=1 << 25)
    assert max(b - a for _, a, b in bucket.pieces) <= 1 << 24
    matrix, _ = q.to_host(bucket.gradient_parts(np.ones(1, dtype=bool), None)).resolve(q.NUM_STATS, 1)
    assert matrix[q.GRAD_NONFINITE, 0] == n


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_split_non_contiguous_tensor_is_flattened_once_per_pass(layout):
    """A gradient bigger than the scratch and not contiguous is copied flat once for all its pieces
    (one gradient-sized temporary), not once per piece."""
    if layout == "transposed":
        p, g = torch.zeros(512, 512), torch.randn(512, 512).t()
    else:
        p = torch.zeros(64, 32, 8, 8)
        g = torch.randn(64, 32, 8, 8).to(memory_format=torch.channels_last)
    bucket = q.ForeachBucket.build([p], [0], snapshot=False, scratch_elements=1 << 14)
    assert len(bucket.chunks) >= 8
    flattened, storages = {}, set()
    for c in range(len(bucket.chunks)):
        for block in bucket._blocks(c, [g], flattened):
            storages.add(block.untyped_storage().data_ptr())
    assert g.untyped_storage().data_ptr() not in storages and len(storages) == 1
    # and the pieces are the gradient's elements in order
    pieces = [block for c in range(len(bucket.chunks)) for block in bucket._blocks(c, [g], {})]
    np.testing.assert_array_equal(torch.cat(pieces).numpy(), g.reshape(-1).numpy())


def test_layer_figures_of_an_empty_layer_or_beyond_float32_leak_no_warnings():
    """An empty layer's mean |Δw| is 0/0 and a float64 norm of 1e200 squares to inf: the figures are
    NaN and inf (float32 cannot hold them), computed without numpy RuntimeWarnings reaching the user."""
    per_tensor = np.zeros((1, q.NUM_STATS, 3))
    per_tensor[0, q.GRAD_NORM] = [3.0, 0.0, 1e200]
    per_tensor[0, q.UPDATE_NORM] = [4.0, 0.0, 1e200]
    per_tensor[0, q.UPDATE_ABS_SUM] = [6.0, 0.0, 1e200]
    per_tensor[0, q.PARAM_NORM_BEFORE] = per_tensor[0, q.PARAM_NORM_AFTER] = [5.0, 0.0, 1e200]
    epoch = np.array([[6.0, 0.0, 1e200], [4.0, 0.0, 1e200]])
    starts, numel = np.array([0, 1, 2]), np.array([2.0, 0.0, 7.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step = q.layer_step_stats(per_tensor, np.ones((1, 3), bool), starts, numel)
        epochs = q.layer_epoch_stats(epoch, starts, numel)
    np.testing.assert_array_equal(step["grad_norm"][0], [3.0, 0.0, np.inf])
    np.testing.assert_array_equal(step["update_mean_abs"][0], [3.0, np.nan, np.inf])
    np.testing.assert_array_equal(step["update_ratio"][0, :2], [np.float32(0.8), np.nan])
    np.testing.assert_array_equal(epochs["update_mean_abs"], [3.0, np.nan, np.inf])
    np.testing.assert_array_equal(epochs["update_norm"], [4.0, 0.0, np.inf])


@pytest.mark.parametrize("n", [1023, 65_536, 262_144 + 77, 2_097_152])
def test_cpu_float32_norms_stay_within_an_ulp_on_equal_entries(n):
    """Adam's first step moves every weight by exactly lr: |Δw| equal everywhere, where torch's float32
    accumulation is worst (391 ulps on 65,536 entries). ``l2_norm`` (rows of one tensor, several
    rows, a non-contiguous view) stays within 2 float32 ulps of a float64 reference."""
    generator = torch.Generator().manual_seed(n)
    signs = torch.randint(0, 2, (3, n), generator=generator).float() * 2 - 1
    cases = {"equal": torch.full((1, n), 1e-3), "adam": 1e-3 * signs,
             "ramp": torch.linspace(0.5, 1.5, n).repeat(2, 1),
             "view": torch.full((n, 2), 0.25).t()}  # rows with stride 2
    for name, rows in cases.items():
        want = rows.double().square().sum(1).sqrt()
        got = q.l2_norm(rows.clone() if name != "view" else rows, checked=True).double()
        ulps = ((got - want).abs() / (want * torch.finfo(torch.float32).eps)).max().item()
        assert ulps <= 2, f"{name}: {ulps:.1f} ulps"
