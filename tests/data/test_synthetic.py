import numpy as np
import pytest
from scipy import ndimage

from gradflow.data import synthetic_em


def best_threshold_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
    """Best pixel accuracy of ONE global threshold on intensity, over all thresholds and both polarities.

    Sort the pixels by intensity; calling the k darkest pixels membrane is right for the membrane
    pixels among them and the cell pixels among the rest. The other polarity scores 1 - that.
    """
    order = np.argsort(images.ravel(), kind="stable")
    is_membrane = labels.ravel()[order].astype(bool)
    membrane_below = np.concatenate([[0], np.cumsum(is_membrane)])
    cell_below = np.concatenate([[0], np.cumsum(~is_membrane)])
    accuracy = (membrane_below + cell_below[-1] - cell_below) / is_membrane.size
    return float(max(accuracy.max(), 1 - accuracy.min()))


def test_best_threshold_accuracy_matches_brute_force():
    rng = np.random.default_rng(3)
    images = rng.random((2, 7, 5))
    labels = (images + 0.4 * rng.random((2, 7, 5)) < 0.6).astype(np.uint8)
    brute = 0.0
    for t in np.concatenate([[-1.0], np.unique(images)]):
        dark = images <= t
        brute = max(brute, (dark == labels).mean(), (~dark == labels).mean())
    assert best_threshold_accuracy(images, labels) == pytest.approx(brute)


def test_shapes_types_and_ranges():
    images, labels = synthetic_em(3, 40, seed=1)
    assert images.shape == labels.shape == (3, 40, 40)
    assert images.dtype == np.float32 and labels.dtype == np.uint8
    assert images.min() >= 0 and images.max() <= 1
    assert set(np.unique(labels)) == {0, 1}


@pytest.mark.parametrize("size", [16, 37, 100])
def test_any_size(size):
    images, labels = synthetic_em(1, size, seed=0)
    assert images.shape == labels.shape == (1, size, size)


def test_deterministic_for_a_seed_and_seeds_differ():
    a_images, a_labels = synthetic_em(3, 48, seed=5)
    b_images, b_labels = synthetic_em(3, 48, seed=5)
    c_images, c_labels = synthetic_em(3, 48, seed=6)
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    assert (a_images != c_images).mean() > 0.9
    assert (a_labels != c_labels).mean() > 0.05
    assert (a_images[0] != a_images[1]).mean() > 0.9  # images within a call differ too


def test_prefix_of_a_longer_call_is_the_shorter_call():
    long_images, long_labels = synthetic_em(4, 32, seed=2)
    short_images, short_labels = synthetic_em(2, 32, seed=2)
    np.testing.assert_array_equal(long_images[:2], short_images)
    np.testing.assert_array_equal(long_labels[:2], short_labels)


@pytest.fixture(scope="module")
def batch():
    return synthetic_em(10, 128, seed=0)


def test_membrane_fraction_like_isbi(batch):
    # ISBI 2012 training labels: 22% membrane (19.6-26.4% per slice).
    _, labels = batch
    assert 0.17 < labels.mean() < 0.28
    assert all(0.12 < fraction < 0.35 for fraction in labels.mean(axis=(1, 2)))


def test_membranes_separate_many_cells(batch):
    # The membrane mask is a tessellation: its complement falls apart into cells (4-connected).
    _, labels = batch
    for label in labels:
        _, num_cells = ndimage.label(label == 0)
        assert num_cells >= 10


def test_membranes_are_darker_on_average(batch):
    images, labels = batch
    assert images[labels == 1].mean() < images[labels == 0].mean() - 0.1


def test_not_separable_by_an_intensity_threshold(batch):
    images, labels = batch
    majority = max(labels.mean(), 1 - labels.mean())
    assert majority < 0.85  # labels are far from trivial
    assert best_threshold_accuracy(images, labels) < 0.85  # ISBI 2012 itself: 0.815
    assert max(best_threshold_accuracy(x, y) for x, y in zip(images, labels)) < 0.9
