
from dataclasses import fields

import numpy as np
import pytest
import skimage.io
import torch

from gradflow.data import EMData, load_data, synthetic_em
from gradflow.errors import GradflowError
from gradflow.train import TrainConfig



def standardised(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float64)
    return (image - image.mean()) / image.std()


def test_synthetic_matches_the_generator():
    data = load_data("synthetic", size=32, seed=4, n_train=3, n_val=2)
    assert isinstance(data, EMData) and data.source == "synthetic"
    images, labels = synthetic_em(5, 32, seed=4)
    for tensor in (data.train_images, data.train_labels, data.val_images, data.val_labels):
        assert tensor.dtype == torch.float32
    assert data.train_images.shape == data.train_labels.shape == (3, 1, 32, 32)
    assert data.val_images.shape == data.val_labels.shape == (2, 1, 32, 32)
    for i in range(3):
        np.testing.assert_allclose(data.train_images[i, 0].numpy(), standardised(images[i]), atol=1e-5)
        np.testing.assert_array_equal(data.train_labels[i, 0].numpy(), labels[i])
    for i in range(2):
        np.testing.assert_allclose(data.val_images[i, 0].numpy(), standardised(images[3 + i]), atol=1e-5)
        np.testing.assert_array_equal(data.val_labels[i, 0].numpy(), labels[3 + i])
    assert data.split["seed"] == 4
    assert data.split["train_index"] == [0, 1, 2] and data.split["val_index"] == [3, 4]


def test_images_standardised_per_image():
    data = load_data("synthetic", size=24, seed=0, n_train=4, n_val=1)
    x = data.train_images.double()
    mean = x.sum(dim=(1, 2, 3)) / x[0].numel()
    variance = ((x - mean[:, None, None, None]) ** 2).sum(dim=(1, 2, 3)) / x[0].numel()
    torch.testing.assert_close(mean, torch.zeros(4, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(variance, torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.fixture
def isbi_like(tmp_path):
    """Four 64×48 slices with distinct random content and 0/255 labels, in the images/ + labels/ layout."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 64, 48), dtype=np.uint8)
    labels = np.where(rng.random((4, 64, 48)) < 0.3, 0, 255).astype(np.uint8)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(4):
        skimage.io.imsave(tmp_path / "images" / f"{i:02d}.png", images[i], check_contrast=False)
        skimage.io.imsave(tmp_path / "labels" / f"{i:02d}.png", labels[i], check_contrast=False)
    return tmp_path, images, labels


def test_isbi_tiles_come_from_their_own_split(isbi_like):
    path, images, labels = isbi_like
    data = load_data(path, size=16, seed=1, n_train=3, n_val=1)
    split = data.split
    assert sorted(split["train_index"] + split["val_index"]) == [0, 1, 2, 3]
    assert split["train"] == [f"{i:02d}" for i in split["train_index"]]
    assert split["val"] == [f"{i:02d}" for i in split["val_index"]]
    assert split["tiles_per_image"] == 4 * 3
    assert data.train_images.shape == data.train_labels.shape == (3 * 12, 1, 16, 16)
    assert data.val_images.shape == data.val_labels.shape == (12, 1, 16, 16)
    assert data.source == str(path)
    # Tiles image by image, then row by row: rebuild each from the slice it must come from.
    for tensor_images, tensor_labels, indices in ((data.train_images, data.train_labels, split["train_index"]),
                                                  (data.val_images, data.val_labels, split["val_index"])):
        t = 0
        for i in indices:
            for row in range(4):
                for col in range(3):
                    window = np.s_[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16]
                    np.testing.assert_allclose(tensor_images[t, 0].numpy(), standardised(images[i][window]), atol=1e-5)
                    np.testing.assert_array_equal(tensor_labels[t, 0].numpy(), labels[i][window] == 0)
                    t += 1


def test_isbi_split_is_seeded(isbi_like):
    path, _, _ = isbi_like
    splits = {seed: load_data(path, size=16, seed=seed, n_train=2, n_val=2).split for seed in range(6)}
    assert load_data(path, size=16, seed=3, n_train=2, n_val=2).split == splits[3]
    assert len({tuple(split["val_index"]) for split in splits.values()}) > 1


def test_isbi_size_must_divide_both_sides(isbi_like):
    path, _, _ = isbi_like
    with pytest.raises(GradflowError, match="does not divide"):
        load_data(path, size=64, seed=0, n_train=1, n_val=1)  # 64 divides 64 but not 48


def test_isbi_size_error_suggests_only_sizes_the_model_takes(isbi_like):
    """The sizes named for a size that does not divide the slices are those that do AND that the model's
    2**levels divides: of 64×48's common divisors 8 and 16, 8 is no size for 4 levels (before: both named)."""
    path, _, _ = isbi_like
    assert_one_line_error("does not divide the 64×48 ISBI images; use one of [8, 16]", path, size=32,
                          n_train=1, n_val=1)
    assert_one_line_error("use one of [16]", path, size=32, n_train=1, n_val=1, side_step=16)
    assert_one_line_error("no size does at 2**levels = 32: use fewer levels", path, size=32, n_train=1,
                          n_val=1, side_step=32)
    for levels, expected in ((3, "[8, 16]"), (4, "[16]")):  # through the config, as every command calls it
        config = TrainConfig(data=str(path), size=32, levels=levels)
        assert_one_line_error(f"use one of {expected}", config.data, size=config.size, n_train=1, n_val=1,
                              side_step=config.side_step)
    assert TrainConfig(arch="table1", size=32).side_step == 32  # table1 has 5 levels whatever --levels says


def test_isbi_n_train_counts_slices_and_help_says_so(isbi_like):
    """n_train/n_val pick ISBI slices, each cut into (H/size)·(W/size) tiles: 2 slices of 64×48 at size
    16 are 2·4·3 = 24 tiles. The option's help says slices and tiles (before: 'tiles for ISBI')."""
    path, _, _ = isbi_like
    data = load_data(path, size=16, seed=0, n_train=2, n_val=1)
    assert len(data.train_images) == 2 * (64 // 16) * (48 // 16) and len(data.val_images) == 1 * 4 * 3
    helps = {spec.name: spec.metadata["help"] for spec in fields(TrainConfig)}
    for name in ("n_train", "n_val"):
        assert "ISBI slices, each cut into (512/size)²" in helps[name], helps[name]


def assert_one_line_error(fragment, *args, **kwargs):
    with pytest.raises(GradflowError) as error:
        load_data(*args, **kwargs)
    assert "\n" not in str(error.value)
    assert fragment in str(error.value)


def test_errors(isbi_like, tmp_path):
    path, _, _ = isbi_like
    assert_one_line_error("does not divide the 64×48", path, size=20, n_train=1, n_val=1)
    assert_one_line_error("only 4 images", path, size=16, n_train=4, n_val=1)
    assert_one_line_error("n_train", "synthetic", size=16, n_train=0, n_val=1)
    assert_one_line_error("too small", "synthetic", size=4)
    assert_one_line_error("does not exist", tmp_path / "missing")


def test_real_isbi_paper_split(isbi_dir):
    data = load_data(isbi_dir, size=128, seed=0)
    assert data.train_images.shape == (25 * 16, 1, 128, 128)
    assert data.val_images.shape == (5 * 16, 1, 128, 128)
    assert len(set(data.split["train"]) | set(data.split["val"])) == 30
    assert 0.19 < data.train_labels.mean().item() < 0.25
    assert set(data.val_labels.unique().tolist()) == {0.0, 1.0}
