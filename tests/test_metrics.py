"""ISBI 2012 metrics against hand-computed contingency tables and a literal copy of Fiji's flood."""

from collections import deque
from math import log

import numpy as np
import pytest
from scipy import ndimage

from gradflow.errors import GradflowError
from gradflow.metrics import (THRESHOLDS, info_scores, isbi_scores, pixel_error, pixel_scores,
                              rand_scores, thinned_proposal, v_info, v_rand)



# ---------------------------------------------------------------- reference flood


def fiji_watershed(proposed_cells: np.ndarray) -> np.ndarray:
    """Line-by-line Python copy of Fiji's WatershedTransform2D.apply() (Trainable_Segmentation) on the
    image cell = 0, border = 255 with 4-connectivity: Vincent-Soille flooding with its global flag."""
    mask, wshed, init, inqueue = -2, 0, -1, -3
    height, width = proposed_cells.shape
    image = np.where(proposed_cells, 0, 255)
    labels = np.full((width, height), init)  # tabLabels[x][y]
    pixels = sorted(((image[y, x], x, y) for x in range(width) for y in range(height)), key=lambda r: r[0])

    def neighbours(x, y):  # Neighborhood2DC4 order
        return [(u, v) for u, v in ((x - 1, y), (x, y - 1), (x + 1, y), (x, y + 1))
                if 0 <= u < width and 0 <= v < height]

    fifo, flag, current, start = deque(), False, 0, 0
    while start < len(pixels):
        h = pixels[start][0]
        end = start
        while end < len(pixels) and pixels[end][0] == h:
            end += 1
        for _, x, y in pixels[start:end]:
            labels[x, y] = mask
            if any(labels[u, v] >= wshed for u, v in neighbours(x, y)):
                fifo.append((x, y))
                labels[x, y] = inqueue
        while fifo:
            x, y = fifo.popleft()
            for u, v in neighbours(x, y):
                if labels[u, v] > 0:
                    if labels[x, y] == inqueue or (labels[x, y] == wshed and flag):
                        labels[x, y] = labels[u, v]
                    elif labels[x, y] > 0 and labels[x, y] != labels[u, v]:
                        labels[x, y], flag = wshed, False
                elif labels[u, v] == wshed:
                    if labels[x, y] == inqueue:
                        labels[x, y], flag = wshed, True
                elif labels[u, v] == mask:
                    labels[u, v] = inqueue
                    fifo.append((u, v))
        for _, x, y in pixels[start:end]:
            if labels[x, y] == mask:
                current += 1
                labels[x, y] = current
                fifo.append((x, y))
                while fifo:
                    px, py = fifo.popleft()
                    for u, v in neighbours(px, py):
                        if labels[u, v] == mask:
                            labels[u, v] = current
                            fifo.append((u, v))
        start = end
    labels[labels == init] = 0
    return labels.T


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Same lines (0) and the same segments up to renumbering."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def test_thinning_matches_fiji_flood_on_random_maps():
    rng = np.random.default_rng(0)
    for _ in range(150):
        height, width = rng.integers(1, 22, size=2)
        kind = rng.integers(3)
        if kind == 0:  # blobby, thick borders
            smooth = ndimage.gaussian_filter(rng.random((height, width)), rng.uniform(0.5, 2))
            cells = smooth > rng.uniform(0.35, 0.6)
        elif kind == 1:  # speckle: many ties and dam pockets
            cells = rng.random((height, width)) > rng.uniform(0.2, 0.9)
        else:  # nearly empty / nearly full / empty / full
            cells = rng.random((height, width)) > rng.choice([0.0, 0.95, 1.0, -1.0])
        assert same_partition(thinned_proposal(cells), fiji_watershed(cells)), cells.astype(int)


# ---------------------------------------------------------------- hand-made maps

# Two true cells A (columns 0-2) and B (columns 4-6), 15 pixels each, membrane column 3.
TWO_CELLS = np.ones((5, 7), dtype=np.uint8) * 255
TWO_CELLS[:, 3] = 0
# The proposal splits B with a border row 2 across columns 4-6.
SPLIT_B = (TWO_CELLS > 0).astype(np.float64)
SPLIT_B[2, 4:] = 0.0
# Three true cells A, B, C (columns 0-2, 4-6, 8-10), membranes in columns 3 and 7.
THREE_CELLS = np.ones((5, 11), dtype=np.uint8)
THREE_CELLS[:, [3, 7]] = 0
# The proposal merges A and B through a gap at the bottom of column 3.
MERGE_AB = THREE_CELLS.astype(np.float64)
MERGE_AB[4, 3] = 1.0


def test_split_thinning_by_hand():
    # Fiji's queue visits column 3 top to bottom, then row 2: (3,0),(3,1) see A and B-top -> dams;
    # (3,2) sees only A (its right neighbour is still queued) -> A; (3,3),(3,4) see A, B-bottom -> dams;
    # row 2 columns 4-6 see B-top and B-bottom -> dams.
    proposal = thinned_proposal(SPLIT_B > 0.5)
    expected_dams = np.zeros((5, 7), dtype=bool)
    expected_dams[[0, 1, 3, 4], 3] = True
    expected_dams[2, 4:] = True
    np.testing.assert_array_equal(proposal == 0, expected_dams)
    assert proposal[2, 3] == proposal[0, 0]


def test_split_lowers_recall_not_precision():
    # Over the 30 true cell pixels: A -> proposal A (15); B -> B-top (6), B-bottom (6), 3 singletons.
    sum_a2 = 15**2 + 15**2  # true segment sizes
    sum_b2 = 15**2 + 6**2 + 6**2 + 3  # proposed sizes inside true cells + singletons
    sum_ab2 = 15**2 + 6**2 + 6**2 + 3
    precision, recall = sum_ab2 / sum_b2, sum_ab2 / sum_a2
    assert (precision, recall) == (1.0, 2 / 3)
    scores = rand_scores(SPLIT_B, TWO_CELLS)
    assert np.allclose(scores["precision"], precision) and np.allclose(scores["recall"], recall)
    assert v_rand(SPLIT_B, TWO_CELLS) == pytest.approx(2 * precision * recall / (precision + recall))  # 0.8

    n = 30
    h_true = log(2)
    h_proposed = -(15 / n * log(15 / n) + 2 * 6 / n * log(6 / n)) + 3 / n * log(n)
    h_joint = h_proposed  # every proposed segment lies in one true segment
    mutual = h_true + h_proposed - h_joint
    info = info_scores(SPLIT_B, TWO_CELLS)
    assert np.allclose(info["precision"], mutual / h_true)  # = 1
    assert np.allclose(info["recall"], mutual / h_proposed)
    p, r = mutual / h_true, mutual / h_proposed
    assert v_info(SPLIT_B, TWO_CELLS) == pytest.approx(2 * p * r / (p + r))  # 0.685


def test_merge_lowers_precision_not_recall():
    # Column 3 floods into the merged AB segment; column 7 is all dams, but on true membrane.
    # True cells: A -> AB (15), B -> AB (15), C -> C (15); no singleton.
    sum_a2 = 3 * 15**2
    sum_b2 = 30**2 + 15**2
    sum_ab2 = 3 * 15**2
    precision, recall = sum_ab2 / sum_b2, sum_ab2 / sum_a2
    assert (precision, recall) == (0.6, 1.0)
    scores = rand_scores(MERGE_AB, THREE_CELLS)
    assert np.allclose(scores["precision"], precision) and np.allclose(scores["recall"], recall)
    assert v_rand(MERGE_AB, THREE_CELLS) == pytest.approx(0.75)

    h_true = log(3)
    h_proposed = -(2 / 3 * log(2 / 3) + 1 / 3 * log(1 / 3))
    h_joint = log(3)  # every true segment lies in one proposed segment
    mutual = h_true + h_proposed - h_joint
    info = info_scores(MERGE_AB, THREE_CELLS)
    assert np.allclose(info["precision"], mutual / h_true)
    assert np.allclose(info["recall"], 1.0)
    p = mutual / h_true
    assert v_info(MERGE_AB, THREE_CELLS) == pytest.approx(2 * p / (1 + p))


def test_perfect_prediction_scores_one():
    prob = (THREE_CELLS > 0).astype(np.float32)
    assert v_rand(prob, THREE_CELLS) == 1.0
    assert v_info(prob, THREE_CELLS) == pytest.approx(1.0, abs=1e-12)
    assert pixel_error(prob, THREE_CELLS) == 0.0
    assert isbi_scores(prob, THREE_CELLS) == pytest.approx({"v_rand": 1.0, "v_info": 1.0, "pixel_error": 0.0})


def test_torch_tensors_are_accepted():
    import torch

    prob = torch.tensor(SPLIT_B, requires_grad=True)
    assert v_rand(prob, torch.from_numpy(TWO_CELLS)) == pytest.approx(0.8)


def test_single_proposed_segment_conventions():
    # No border at all, and no cell at all, are both one proposed segment (Fiji): Rand P = 450/900.
    for prob in (np.ones((5, 7)), np.zeros((5, 7))):
        scores = rand_scores(prob, TWO_CELLS)
        assert np.allclose(scores["precision"], 0.5) and np.allclose(scores["recall"], 1.0)
        assert v_info(prob, TWO_CELLS) == 0.0  # H(proposal) = 0 -> precision 1, recall 0 (Fiji)
    one_true_segment = np.ones((4, 4), dtype=np.uint8)
    assert v_rand(np.ones((4, 4)), one_true_segment) == 1.0
    assert v_info(np.ones((4, 4)), one_true_segment) == 0.0  # H(truth) = 0 -> precision 0 (Fiji)


# ---------------------------------------------------------------- thresholds and stacks


def test_thresholds_are_fijis_accumulated_doubles():
    assert len(THRESHOLDS) == 11
    assert THRESHOLDS[3] == 0.1 + 0.1 + 0.1 and THRESHOLDS[-1] == 0.9999999999999999


def test_map_correct_only_above_threshold_gets_max_score():
    prob = np.where(TWO_CELLS > 0, 1.0, 0.65)  # membrane is cell (A, B merged) while t < 0.65
    scores = rand_scores(prob, TWO_CELLS)
    merged = (15**2 + 15**2) / 30**2
    expected_precision = [merged if t < 0.65 else 1.0 for t in THRESHOLDS]
    np.testing.assert_allclose(scores["precision"], expected_precision)
    assert v_rand(prob, TWO_CELLS) == 1.0
    assert v_info(prob, TWO_CELLS) == pytest.approx(1.0, abs=1e-12)


def test_cell_means_strictly_above_threshold_after_float32_rounding():
    at_half = rand_scores(np.where(TWO_CELLS > 0, 1.0, 0.5), TWO_CELLS)["precision"]
    assert at_half[0.5] == 1.0 and at_half[0.4] == 0.5  # 0.5 > 0.5 is false: membrane stays border
    # float32(0.3) = 0.30000001 > 0.1 + 0.1 + 0.1 = 0.30000000000000004, although 0.3 (double) is not.
    at_03 = rand_scores(np.where(TWO_CELLS > 0, 1.0, 0.3), TWO_CELLS)["precision"]
    assert at_03.iloc[3] == 0.5 and at_03.iloc[4] == 1.0


def test_stack_averages_slices_per_threshold_then_maximises():
    late = np.where(TWO_CELLS > 0, 1.0, 0.65)  # correct for t >= 0.7, merged (F = 2/3) below
    early = np.where(TWO_CELLS > 0, 0.35, 0.0)  # correct for t <= 0.3, no cell at all (F = 2/3) above
    merged_f = 2 * 0.5 / 1.5
    assert v_rand(late, TWO_CELLS) == 1.0 and v_rand(early, TWO_CELLS) == 1.0
    stack = np.stack([late, early])
    labels = np.stack([TWO_CELLS, TWO_CELLS])
    assert v_rand(stack, labels) == pytest.approx((1.0 + merged_f) / 2)  # not the mean of maxima, 1.0
    both = np.stack([SPLIT_B, (TWO_CELLS > 0).astype(float)])
    assert v_rand(both, labels) == pytest.approx((0.8 + 1.0) / 2)


def test_pixel_error_by_hand_pools_slices():
    # SPLIT_B: 27 true cell pixels predicted cell, 3 predicted membrane, no false cell: F = 18/19.
    assert pixel_error(SPLIT_B, TWO_CELLS) == pytest.approx(1 - 18 / 19)
    # Stack with a perfect slice: tp = 27 + 30, fp = 0, fn = 3 -> recall 57/60 (pooled, not averaged).
    stack = np.stack([SPLIT_B, (TWO_CELLS > 0).astype(float)])
    recall = 57 / 60
    assert pixel_error(stack, np.stack([TWO_CELLS, TWO_CELLS])) == pytest.approx(1 - 2 * recall / (1 + recall))
    assert pixel_scores(SPLIT_B, TWO_CELLS)["recall"].tolist() == [0.9] * 11


# ---------------------------------------------------------------- user mistakes


@pytest.mark.parametrize("prob, labels, message", [
    (np.ones((5, 7)), np.ones((5, 6)), "same shape"),
    (np.ones(7), np.ones(7), r"\(H, W\) or \(N, H, W\)"),
    (np.full((5, 7), 1.5), TWO_CELLS, r"\[0, 1\]"),
    (np.full((5, 7), np.nan), TWO_CELLS, "NaN"),
    (np.ones((5, 7)), TWO_CELLS // 2, "binary"),
    (np.ones((2, 5, 7)), np.stack([TWO_CELLS, 0 * TWO_CELLS]), "slice 1 has no cell"),
])
def test_invalid_inputs_raise_one_clear_error(prob, labels, message):
    for score in (v_rand, v_info, pixel_error):
        with pytest.raises(GradflowError, match=message):
            score(prob, labels)


# ---------------------------------------------------------------- real ground truth


def test_isbi_ground_truth_against_itself_and_perturbed(isbi_dir):
    from PIL import Image

    labels = np.array(Image.open(sorted((isbi_dir / "labels").glob("*.png"))[0]))
    cells = labels > 0
    assert isbi_scores(cells.astype(np.float32), labels) == pytest.approx(
        {"v_rand": 1.0, "v_info": 1.0, "pixel_error": 0.0}, abs=1e-12)
    thinner_membrane = ~ndimage.binary_erosion(~cells)  # breaks 1-2 pixel membranes: merges
    thicker_membrane = ~ndimage.binary_dilation(~cells, iterations=3)  # removes small cells
    for prob in (thinner_membrane, thicker_membrane):
        assert v_rand(prob.astype(np.float32), labels) < 1.0
        assert v_info(prob.astype(np.float32), labels) < 1.0
