from pathlib import Path

import numpy as np
import pytest
import skimage.io
import tifffile

from gradflow.data import load_isbi
from gradflow.errors import GradflowError



def challenge_labels(rng: np.random.Generator, shape) -> np.ndarray:
    """Random 0/255 label images (255 = cell, 0 = membrane), as the challenge stores them."""
    return np.where(rng.random(shape) < 0.25, 0, 255).astype(np.uint8)


def write_slices(root: Path, images: np.ndarray, labels: np.ndarray, names, image_ext=".png", label_ext=".png"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for name, image, label in zip(names, images, labels):
        skimage.io.imsave(root / "images" / f"{name}{image_ext}", image, check_contrast=False)
        skimage.io.imsave(root / "labels" / f"{name}{label_ext}", label, check_contrast=False)


def test_slice_folder(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 24, 32), dtype=np.uint8)
    labels = challenge_labels(rng, (3, 24, 32))
    write_slices(tmp_path, images, labels, ["b", "a", "c"])
    got_images, got_labels, names = load_isbi(tmp_path)
    assert names == ["a", "b", "c"]  # sorted by name, images and labels kept in pairs
    np.testing.assert_array_equal(got_images, images[[1, 0, 2]])
    np.testing.assert_array_equal(got_labels, (labels[[1, 0, 2]] == 0).astype(np.uint8))
    assert got_labels.dtype == np.uint8


def test_tiff_slices_pair_with_png_labels_by_stem(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 16, 16), dtype=np.uint8)
    labels = challenge_labels(rng, (2, 16, 16))
    write_slices(tmp_path, images, labels, ["00", "01"], image_ext=".tif", label_ext=".png")
    got_images, got_labels, names = load_isbi(tmp_path)
    assert names == ["00", "01"]
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels == 0)


def test_zero_one_labels(tmp_path):
    rng = np.random.default_rng(2)
    labels = (rng.random((2, 16, 16)) > 0.3).astype(np.uint8)  # 1 = cell, 0 = membrane
    write_slices(tmp_path, rng.integers(0, 256, (2, 16, 16), dtype=np.uint8), labels, ["0", "1"])
    _, got_labels, _ = load_isbi(tmp_path)
    np.testing.assert_array_equal(got_labels, 1 - labels)


def test_challenge_tiff_stacks(tmp_path):
    rng = np.random.default_rng(3)
    volume = rng.integers(0, 256, (5, 20, 28), dtype=np.uint8)
    labels = challenge_labels(rng, (5, 20, 28))
    tifffile.imwrite(tmp_path / "train-volume.tif", volume, photometric="minisblack")
    tifffile.imwrite(tmp_path / "train-labels.tif", labels, photometric="minisblack")
    got_images, got_labels, names = load_isbi(tmp_path)
    np.testing.assert_array_equal(got_images, volume)
    np.testing.assert_array_equal(got_labels, labels == 0)
    assert names == [f"train-volume.tif[{i}]" for i in range(5)]


def assert_one_line_error(path, *fragments):
    with pytest.raises(GradflowError) as error:
        load_isbi(path)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_error_missing_folder(tmp_path):
    assert_one_line_error(tmp_path / "nowhere", "does not exist", "synthetic")


def test_error_file_instead_of_folder(tmp_path):
    tifffile.imwrite(tmp_path / "train-volume.tif", np.zeros((2, 8, 8), np.uint8), photometric="minisblack")
    assert_one_line_error(tmp_path / "train-volume.tif", "is a file", "folder")


def test_error_folder_without_data(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(tmp_path, "images/", "train-volume.tif")


def test_error_images_without_labels_folder(tmp_path):
    (tmp_path / "images").mkdir()
    assert_one_line_error(tmp_path, "labels")


def test_error_no_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    assert_one_line_error(tmp_path, "no PNG or TIFF images")


def test_error_unpaired_image(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (2, 8, 8), dtype=np.uint8)
    write_slices(tmp_path, images, challenge_labels(rng, (2, 8, 8)), ["0", "1"])
    (tmp_path / "labels" / "1.png").unlink()
    assert_one_line_error(tmp_path, "1.png", "labels")


def test_error_label_of_another_shape(tmp_path):
    rng = np.random.default_rng(5)
    write_slices(tmp_path, rng.integers(0, 256, (1, 8, 8), dtype=np.uint8), challenge_labels(rng, (1, 8, 8)), ["0"])
    skimage.io.imsave(tmp_path / "labels" / "0.png", challenge_labels(rng, (8, 9)), check_contrast=False)
    assert_one_line_error(tmp_path, "0.png", "(8, 9)")


def test_error_images_of_different_shapes(tmp_path):
    rng = np.random.default_rng(6)
    write_slices(tmp_path, [np.zeros((8, 8), np.uint8), np.zeros((8, 10), np.uint8)],
                 [challenge_labels(rng, (8, 8)), challenge_labels(rng, (8, 10))], ["0", "1"])
    assert_one_line_error(tmp_path, "differ in shape")


def test_error_colour_image(tmp_path):
    rng = np.random.default_rng(7)
    write_slices(tmp_path, [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)], [challenge_labels(rng, (8, 8))], ["0"])
    assert_one_line_error(tmp_path, "grayscale")


def test_error_unreadable_image(tmp_path):
    rng = np.random.default_rng(8)
    write_slices(tmp_path, rng.integers(0, 256, (1, 8, 8), dtype=np.uint8), challenge_labels(rng, (1, 8, 8)), ["0"])
    (tmp_path / "images" / "0.png").write_bytes(b"not a png at all")
    assert_one_line_error(tmp_path, "cannot read", "0.png")


def test_error_stack_without_labels(tmp_path):
    tifffile.imwrite(tmp_path / "train-volume.tif", np.zeros((2, 8, 8), np.uint8), photometric="minisblack")
    assert_one_line_error(tmp_path, "train-labels.tif")


def test_error_stacks_of_different_lengths(tmp_path):
    tifffile.imwrite(tmp_path / "train-volume.tif", np.zeros((3, 8, 8), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "train-labels.tif", np.zeros((2, 8, 8), np.uint8), photometric="minisblack")
    assert_one_line_error(tmp_path, "(3, 8, 8)", "(2, 8, 8)")


def test_real_isbi(isbi_dir):
    images, labels, names = load_isbi(isbi_dir)
    assert images.shape == labels.shape == (30, 512, 512)
    assert names == [f"{i:02d}" for i in range(30)]
    assert set(np.unique(labels)) == {0, 1}
    assert 0.2 < labels.mean() < 0.24  # 22% membrane
    # Membranes are the dark walls: darker than cell interiors on average.
    assert images[labels == 1].mean() < images[labels == 0].mean() - 30
