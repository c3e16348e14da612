"""The ISBI 2012 challenge's segmentation scores: V_rand, V_info (after border thinning), pixel error.

This follows the challenge's own evaluation, the Fiji script "Segmentation evaluation after border
thinning" (imagej.github.io, I. Arganda-Carreras, 2016) that calls
``RandError.getMaximalVRandAfterThinning(0.0, 1.0, 0.1, true)`` and
``VariationOfInformation.getMaximalVInfoAfterThinning(0.0, 1.0, 0.1)`` from Trainable Weka
Segmentation (``fiji/Trainable_Segmentation``, ``trainableSegmentation/metrics``), and the definitions of
Arganda-Carreras et al. 2015, "Crowdsourcing the creation of image segmentation algorithms for
connectomics", Front. Neuroanat. 9:142. Conventions, each taken from that reference code:

* Polarity: ``prob`` is the probability of *cell* (high = cell); ``labels`` are 255 or 1 = cell and
  0 = membrane. (The gradflow data loaders use the opposite polarity, membrane = 1, for training
  targets: pass ``1 - membrane_probability`` and ``1 - membrane_target``.)
* Thresholds: the Java loop ``for (th = 0.0; th <= 1.0; th += 0.1)``, i.e. the 11 doubles 0.0, 0.1,
  0.2, 0.30000000000000004, ..., 0.7999999999999999, 0.8999999999999999, 0.9999999999999999 (the last
  one is just below 1, so a binary 0/1 map gives the same segmentation at every threshold). A pixel
  is cell when ``prob > t`` (strictly greater). Fiji reads probability maps as 32-bit
  floats, so ``prob`` is rounded to float32 before the comparison (0.3 as a double is not > t=0.3…04,
  0.3 as a float is).
* Ground truth: cell pixels (label > 0) are cut into segments by 4-connected labelling; membrane
  pixels are the "background" that the foreground restriction drops: they count nowhere.
* Proposal at threshold t: the cell pixels (``prob > t``) are 4-connected-labelled, and the border
  (``prob <= t``) is flooded from the cells exactly as Fiji's ``WatershedTransform2D(binary, 4)``
  (a Vincent-Soille FIFO flood of the image cell = 0, border = 255) does it; see
  ``thinned_proposal``. Pixels where two cells' floods meet stay unlabelled as 1-pixel "dams"
  (lines); a border pocket reachable only through a dam stays dam as well. (scikit-image's
  ``watershed(..., watershed_line=True)`` is a different flood: it gives such pockets the label of
  the pushing seed and breaks ties in heap order; on noisy maps it moved V_rand by up to 3e-4.)
  Edge cases as in Fiji: a map with no border at all is one segment; a map with no cell pixel at all
  is also one segment (Fiji's flood then makes the whole image a single new basin).
* Contingency table, counts over the ground truth's cell pixels only: ``n_ij`` pixels in true segment
  i and proposed segment j, ``a_i = sum_j n_ij`` (true segment sizes, line pixels included),
  ``b_j = sum_i n_ij`` (proposed segment sizes inside the true cells), and ``s`` pixels of true cells
  that lie on the proposal's watershed lines. Each of those is a singleton segment of its own.
* Rand (counts; the reference divides everything by n^2, which cancels):
  ``P = (sum n_ij^2 + s) / (sum b_j^2 + s)``, ``R = (sum n_ij^2 + s) / sum a_i^2``,
  ``V_rand = 2PR / (P + R)``. ``P`` is Fiji's precision, the merge score: a proposed segment that
  joins true segments lowers it. ``R`` is the recall, the split score: a true segment cut in parts
  lowers it. (P = 1 when there is no false-positive pair, R = 1 when there is no false-negative pair,
  F = 0 when P + R = 0, as in Fiji's ``ClassificationStatistics``.)
* Information (natural logs, probabilities p = count / n with n = number of true cell pixels; each
  singleton has probability 1/n): ``H(A)`` of the truth, ``H(B)`` of the proposal and ``H(A, B)``,
  ``I = H(A) + H(B) - H(A, B)``, precision ``I / H(A)`` (merges lower it), recall ``I / H(B)`` (splits
  lower it), ``V_info = 2PR / (P + R)``. As in Fiji: ``H(A) = 0`` (a single true segment) gives P = 0,
  R = 1; ``H(B) = 0`` gives P = 1, R = 0; so a slice with one true segment scores V_info = 0. An
  undefined F (P + R = 0) counts as 0.
* Stacks (N, H, W): at each threshold the per-slice scores (and precisions, recalls) are averaged
  over slices, then the best threshold is taken: ``max_t mean_slices F(t)``, as Fiji's
  ``getForegroundRestrictedScoresAfterThinning`` does for V_info. (The stored Fiji ``RandError``
  source predates its thinning methods; the script's ``true`` flag is read as per-slice averaging,
  like V_info.)
* Pixel error (the challenge's deprecated third metric, ``PixelError.getPixelErrorMaximalFScore``):
  ``1 - max_t F``, with F the F-score of the cell pixels (positive = cell); true/false
  positive/negative counts are summed over all slices before the F-score, as Fiji does.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
from skimage.measure import label as connected_components

from gradflow.errors import GradflowError


def _fiji_thresholds() -> tuple[float, ...]:
    """The doubles Fiji's ``for (th = 0.0; th <= 1.0; th += 0.1)`` visits (accumulated rounding kept)."""
    thresholds, t = [], 0.0
    while t <= 1.0:
        thresholds.append(t)
        t += 0.1
    return tuple(thresholds)


THRESHOLDS: tuple[float, ...] = _fiji_thresholds()


class Table(NamedTuple):
    """Contingency counts of one slice at one threshold, restricted to the true cell pixels.

    ``true_sizes`` a_i and ``proposed_sizes`` b_j (only nonzero ones, line pixels excluded from b),
    ``overlaps`` the nonzero n_ij with i, j > 0, ``singletons`` s = true cell pixels on proposal lines.
    """

    true_sizes: np.ndarray
    proposed_sizes: np.ndarray
    overlaps: np.ndarray
    singletons: int


# ---------------------------------------------------------------- input checks


def _check_inputs(prob, labels) -> tuple[np.ndarray, np.ndarray]:
    """(prob as float32-rounded float64, cell mask as bool), both (N, H, W); GradflowError if invalid.

    Accepts numpy arrays or torch tensors (on any device).
    """
    prob, labels = (np.asarray(x.detach().cpu() if hasattr(x, "detach") else x) for x in (prob, labels))
    if prob.shape != labels.shape:
        raise GradflowError(f"prob and labels must have the same shape, got {prob.shape} and {labels.shape}")
    if prob.ndim not in (2, 3) or prob.size == 0:
        raise GradflowError("prob and labels must be non-empty (H, W) or (N, H, W) arrays, "
                            f"got shape {prob.shape}")
    if not (np.issubdtype(prob.dtype, np.number) or prob.dtype == bool):
        raise GradflowError(f"prob must be a numeric array, got dtype {prob.dtype}")
    prob = prob.astype(np.float32).astype(np.float64)  # Fiji's 32-bit image, compared as a double
    if np.isnan(prob).any():
        raise GradflowError("prob must hold probabilities in [0, 1] (high = cell); it contains NaN")
    if prob.min() < 0.0 or prob.max() > 1.0:
        raise GradflowError("prob must hold probabilities in [0, 1] (high = cell); "
                            f"got values in [{prob.min():g}, {prob.max():g}]")
    values = np.unique(labels)
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        raise GradflowError("labels must be binary: 255 or 1 = cell, 0 = membrane; "
                            f"got values {values[:6].tolist()}{' ...' if len(values) > 6 else ''}")
    cells = labels > 0
    if prob.ndim == 2:
        prob, cells = prob[None], cells[None]
    for index, slice_cells in enumerate(cells):
        if not slice_cells.any():
            raise GradflowError(f"labels slice {index} has no cell pixel (all membrane): nothing to score")
    return prob, cells


# ---------------------------------------------------------------- segmentations


def true_segments(cells: np.ndarray) -> np.ndarray:
    """4-connected components of the true cell region (H, W) bool -> int labels, 0 = membrane."""
    return connected_components(cells, connectivity=1)


_MASK, _INQUEUE, _OUTSIDE = -2, -3, -4  # flood states; labels are > 0 and a dam (line) is 0


def thinned_proposal(proposed_cells: np.ndarray) -> np.ndarray:
    """Proposal segments after border thinning: int labels (H, W), 0 = watershed lines ("dams").

    ``proposed_cells`` is the binarised map (True = cell, i.e. ``prob > t``). This is Fiji's
    ``WatershedTransform2D(binary, 4).apply()`` (Vincent & Soille 1991 flooding) on the image
    cell = 0, border = 255, reproduced pixel for pixel:

    * the cells are the basins: their 4-connected components;
    * the border is flooded breadth-first from them with one FIFO queue, started with the border
      pixels that touch a cell in Fiji's scan order (x outer, y inner) and extended in neighbour
      order left, up, right, down (x-1, y-1, x+1, y+1);
    * a dequeued pixel looks at its already-flooded 4-neighbours: one basin label -> that label; two
      or more -> dam; only dams -> dam (so a border pocket reached only through a dam stays dam,
      Fiji's "plateaus in the dams").

    The queue is processed a whole distance layer at a time with numpy; inside a layer a pixel also
    sees the results of the same-layer neighbours dequeued before it, which is resolved by iterating
    to the (unique) fixpoint. No border: one segment. No cell at all: one segment (Fiji's flood makes
    the whole image a single new basin).
    """
    if not proposed_cells.any():
        return np.ones(proposed_cells.shape, dtype=np.int32)
    basins = connected_components(proposed_cells, connectivity=1).astype(np.int32)
    if proposed_cells.all():
        return basins
    height, width = proposed_cells.shape
    state = np.full((height + 2, width + 2), _OUTSIDE, dtype=np.int32)  # frame = outside the image
    state[1:-1, 1:-1] = np.where(proposed_cells, basins, _MASK)
    flat = state.reshape(-1)
    stride = width + 2
    offsets = np.array([-1, -stride, 1, stride])  # left, up, right, down (Fiji's Neighborhood2DC4)

    # First layer: border pixels with a cell neighbour, in Fiji's pixel-list order (x outer, y inner).
    touches_cell = np.zeros_like(state, dtype=bool)
    cells_padded = state > 0
    touches_cell[1:-1, 1:-1] = (cells_padded[1:-1, :-2] | cells_padded[:-2, 1:-1]
                                | cells_padded[1:-1, 2:] | cells_padded[2:, 1:-1])
    touches_cell &= state == _MASK
    xs, ys = np.nonzero(touches_cell.T)
    front = ys * stride + xs
    rank = np.zeros(flat.size, dtype=np.int64)
    while front.size:
        flat[front] = _INQUEUE
        order = np.arange(front.size)
        rank[front] = order
        neighbours = offsets[:, None] + front  # (4, n): row = direction in Fiji's order
        values = flat[neighbours]
        earlier = (values == _INQUEUE) & (rank[neighbours] < order)
        result = _flood_decision(values)
        dependent = np.flatnonzero(earlier.any(axis=0))
        if dependent.size:
            sub_values, sub_earlier = values[:, dependent], earlier[:, dependent]
            sub_ranks = np.where(sub_earlier, rank[neighbours[:, dependent]], 0)
            for _ in range(front.size + 1):  # the DAG depth bounds the iterations
                updated = _flood_decision(np.where(sub_earlier, result[sub_ranks], sub_values))
                if np.array_equal(updated, result[dependent]):
                    break
                result[dependent] = updated
        flat[front] = result
        # Next layer: still-masked neighbours in order of discovery (dequeue order, then direction).
        candidates = neighbours.T.reshape(-1)
        candidates = candidates[flat[candidates] == _MASK]
        _, first = np.unique(candidates, return_index=True)
        front = candidates[np.sort(first)]
    return state[1:-1, 1:-1].copy()


def _flood_decision(neighbour_values: np.ndarray) -> np.ndarray:
    """Per column of the (4, n) already-flooded neighbour states: the single basin label, else 0 (dam).

    Labels are > 0; dams are 0; not-yet-flooded states are negative and ignored. Two distinct
    labels -> dam; no label (only dams) -> dam.
    """
    high = np.maximum.reduce(neighbour_values)
    low = np.minimum.reduce(np.where(neighbour_values > 0, neighbour_values, np.iinfo(np.int32).max))
    return np.where(low == high, high, 0).astype(np.int32)


_DENSE_TABLE_LIMIT = 1 << 22  # up to 4M (true, proposed) pairs counted densely (32 MB of int64)


def contingency(truth: np.ndarray, proposal: np.ndarray) -> Table:
    """Counts over the true cell pixels (truth > 0) of two label maps; proposal label 0 = singleton."""
    inside = truth > 0
    true_ids = truth[inside].astype(np.int64)
    proposed_ids = proposal[inside].astype(np.int64)
    true_sizes = np.bincount(true_ids)[1:]
    on_line = proposed_ids == 0
    true_ids, proposed_ids = true_ids[~on_line], proposed_ids[~on_line]
    proposed_sizes = np.bincount(proposed_ids)
    pair_ids = proposed_ids * (int(truth.max()) + 1) + true_ids
    if pair_ids.size and pair_ids.max() < _DENSE_TABLE_LIMIT:  # dense counting is ~10x faster than a sort
        overlaps = np.bincount(pair_ids)
        overlaps = overlaps[overlaps > 0]
    else:
        _, overlaps = np.unique(pair_ids, return_counts=True)
    return Table(true_sizes[true_sizes > 0], proposed_sizes[proposed_sizes > 0],
                 overlaps.astype(np.int64), int(on_line.sum()))


# ---------------------------------------------------------------- scores of one table


def _f_score(precision: float, recall: float) -> float:
    """Harmonic mean; 0 when both are 0 (Fiji leaves it 0 or NaN, which its max ignores)."""
    total = precision + recall
    return 2.0 * precision * recall / total if total > 0 else 0.0


def rand_prf(table: Table) -> tuple[float, float, float]:
    """(V_rand, precision, recall) of one table, exact integer sums of squared counts."""
    sum_a2 = int(np.sum(table.true_sizes ** 2))
    sum_b2 = int(np.sum(table.proposed_sizes ** 2)) + table.singletons
    sum_ab2 = int(np.sum(table.overlaps ** 2)) + table.singletons
    precision = 1.0 if sum_b2 == sum_ab2 else sum_ab2 / sum_b2  # no false-positive pair -> 1
    recall = 1.0 if sum_a2 == sum_ab2 else sum_ab2 / sum_a2  # no false-negative pair -> 1
    return _f_score(precision, recall), precision, recall


def _plogp(counts: np.ndarray, n: int) -> float:
    """sum p log p over p = counts / n (counts > 0)."""
    p = counts / n
    return float(np.sum(p * np.log(p)))


def info_prf(table: Table) -> tuple[float, float, float]:
    """(V_info, precision, recall) of one table: I / H(truth), I / H(proposal), harmonic mean."""
    n = int(table.true_sizes.sum())
    singleton_term = table.singletons / n * np.log(n)  # s singletons of probability 1/n each
    h_true = -_plogp(table.true_sizes, n)
    h_proposed = -_plogp(table.proposed_sizes, n) + singleton_term
    h_joint = -_plogp(table.overlaps, n) + singleton_term
    mutual = h_true + h_proposed - h_joint
    if h_proposed == 0:  # one proposed segment, no line: Fiji's second special case wins
        precision, recall = 1.0, 0.0
    elif h_true == 0:  # one true segment
        precision, recall = 0.0, 1.0
    else:
        precision, recall = mutual / h_true, mutual / h_proposed
    return _f_score(precision, recall), precision, recall


# ---------------------------------------------------------------- over thresholds and slices


def _tables(prob: np.ndarray, cells: np.ndarray) -> list[list[Table]]:
    """tables[slice][threshold]; a threshold whose binary map equals the previous one reuses its table."""
    tables = []
    for slice_prob, slice_cells in zip(prob, cells):
        truth = true_segments(slice_cells)
        row, previous = [], None
        for t in THRESHOLDS:
            proposed_cells = slice_prob > t
            if previous is None or not np.array_equal(proposed_cells, previous):
                table = contingency(truth, thinned_proposal(proposed_cells))
            row.append(table)
            previous = proposed_cells
        tables.append(row)
    return tables


def _per_threshold(tables: list[list[Table]], prf: Callable[[Table], tuple[float, float, float]]) -> pd.DataFrame:
    """Slice-averaged (score, precision, recall) per threshold."""
    values = np.array([[prf(table) for table in row] for row in tables])  # (slice, threshold, 3)
    frame = pd.DataFrame(values.mean(axis=0), columns=["score", "precision", "recall"])
    frame.index = pd.Index(THRESHOLDS, name="threshold")
    return frame


def rand_scores(prob, labels) -> pd.DataFrame:
    """Foreground-restricted Rand F-score, precision (merge score) and recall (split score) after
    border thinning, per threshold (index), averaged over slices. ``v_rand`` is the max of ``score``."""
    return _per_threshold(_tables(*_check_inputs(prob, labels)), rand_prf)


def info_scores(prob, labels) -> pd.DataFrame:
    """Foreground-restricted information-theoretic F-score, precision I/H(truth) and recall
    I/H(proposal) after border thinning, per threshold, averaged over slices."""
    return _per_threshold(_tables(*_check_inputs(prob, labels)), info_prf)


def pixel_scores(prob, labels) -> pd.DataFrame:
    """Pixel F-score, precision and recall of the cell class per threshold, counts summed over slices."""
    prob, cells = _check_inputs(prob, labels)
    rows = []
    for t in THRESHOLDS:
        proposed = prob > t
        tp = int(np.count_nonzero(proposed & cells))
        fp = int(np.count_nonzero(proposed & ~cells))
        fn = int(np.count_nonzero(~proposed & cells))
        precision = 1.0 if fp == 0 else tp / (tp + fp)
        recall = 1.0 if fn == 0 else tp / (tp + fn)
        rows.append((_f_score(precision, recall), precision, recall))
    return pd.DataFrame(rows, columns=["score", "precision", "recall"],
                        index=pd.Index(THRESHOLDS, name="threshold"))


def v_rand(prob, labels) -> float:
    """V_rand (thinned): best foreground-restricted Rand F-score over the 11 thresholds, in [0, 1]."""
    return float(rand_scores(prob, labels)["score"].max())


def v_info(prob, labels) -> float:
    """V_info (thinned): best foreground-restricted information-theoretic F-score, in [0, 1]."""
    return float(info_scores(prob, labels)["score"].max())


def pixel_error(prob, labels) -> float:
    """ISBI 2012 pixel error: 1 - best pixel F-score (cell class) over the 11 thresholds, in [0, 1]."""
    return 1.0 - float(pixel_scores(prob, labels)["score"].max())


def isbi_scores(prob, labels) -> dict[str, float]:
    """All three at once, thinning each map only once: {"v_rand", "v_info", "pixel_error"}."""
    tables = _tables(*_check_inputs(prob, labels))
    return {"v_rand": float(_per_threshold(tables, rand_prf)["score"].max()),
            "v_info": float(_per_threshold(tables, info_prf)["score"].max()),
            "pixel_error": pixel_error(prob, labels)}
