import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from gradflow.data import augment_batch
from gradflow.data.augment import sampling_grid, warp
from gradflow.errors import GradflowError

NO_TRANSFORM = dict(flip=False, rot90=False, max_angle=0.0, max_shear=0.0, elastic_std=0.0)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_field(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, H, W) smooth random images (Gaussian-filtered noise, scipy), unit-ish scale."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((n, 1, height, width)), (0, 0, 4, 4))
    return torch.from_numpy(field / field.std()).float()


def grid_for(n, height, width, flip=False, turns=0, angle=0.0, shear=0.0, displacement=None):
    """Explicit transform parameters, the same for all n images."""
    return sampling_grid(
        flip=torch.full((n,), flip),
        quarter_turns=torch.full((n,), turns),
        angle=torch.full((n,), float(angle)),
        shear=torch.full((n,), float(shear)),
        displacement=torch.zeros(n, 2, 3, 3) if displacement is None else displacement,
        height=height,
        width=width,
    )


def dihedral_reference(x: torch.Tensor, flip: bool, turns: int) -> torch.Tensor:
    return torch.rot90(torch.flip(x, dims=[-1]) if flip else x, turns, dims=(-2, -1))


def test_identity_parameters_give_identity():
    x = smooth_field(3, 20, 28)
    y = (x > 0).float()
    x_out, y_out = warp(x, y, grid_for(3, 20, 28))
    torch.testing.assert_close(x_out, x, atol=1e-5, rtol=0)
    assert torch.equal(y_out, y)
    x_out, y_out = augment_batch(x, y, generator(0), **NO_TRANSFORM)
    torch.testing.assert_close(x_out, x, atol=1e-5, rtol=0)
    assert torch.equal(y_out, y)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_flips_and_quarter_turns_are_exact(flip, turns):
    x = torch.randn(2, 1, 12, 12, generator=generator(101))
    y = (torch.rand(2, 1, 12, 12, generator=generator(102)) > 0.5).float()
    x_out, y_out = warp(x, y, grid_for(2, 12, 12, flip=flip, turns=turns))
    torch.testing.assert_close(x_out, dihedral_reference(x, flip, turns), atol=1e-5, rtol=0)
    assert torch.equal(y_out, dihedral_reference(y, flip, turns))


def test_random_dihedral_draws_are_exact_and_varied():
    x = torch.randn(16, 1, 10, 10, generator=generator(103))
    y = (torch.rand(16, 1, 10, 10, generator=generator(104)) > 0.5).float()
    x_out, y_out = augment_batch(x, y, generator(1), **{**NO_TRANSFORM, "flip": True, "rot90": True})
    seen = set()
    for i in range(16):
        matches = [(f, k) for f in (False, True) for k in range(4)
                   if torch.allclose(x_out[i], dihedral_reference(x[i], f, k), atol=1e-5)]
        assert len(matches) == 1
        assert torch.equal(y_out[i], dihedral_reference(y[i], *matches[0]))
        seen.add(matches[0])
    assert len(seen) >= 4


def test_non_square_images_only_turn_by_half_turns():
    x = torch.randn(16, 1, 8, 14, generator=generator(105))
    x_out, _ = augment_batch(x, (x > 0).float(), generator(2), **{**NO_TRANSFORM, "flip": True, "rot90": True})
    assert x_out.shape == x.shape
    for i in range(16):
        references = [dihedral_reference(x[i], f, k) for f in (False, True) for k in (0, 2)]
        assert any(torch.allclose(x_out[i], reference, atol=1e-5) for reference in references)


def test_rotation_by_90_degrees_equals_rot90():
    x = torch.randn(2, 1, 15, 15, generator=generator(106))
    x_out, _ = warp(x, x > 0, grid_for(2, 15, 15, angle=90.0))
    torch.testing.assert_close(x_out, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-4, rtol=0)


def centred_coordinates(height, width):
    v, u = torch.meshgrid(torch.arange(height) - (height - 1) / 2, torch.arange(width) - (width - 1) / 2, indexing="ij")
    return u, v


def test_small_rotation_of_a_linear_ramp():
    # Bilinear interpolation reproduces a linear ramp exactly, so the output is the ramp at R·p.
    u, v = centred_coordinates(41, 41)
    ramp = (0.7 * u + 0.3 * v)[None, None]
    theta = math.radians(12.0)
    x_out, _ = warp(ramp, ramp > 0, grid_for(1, 41, 41, angle=12.0))
    expected = 0.7 * (math.cos(theta) * u - math.sin(theta) * v) + 0.3 * (math.sin(theta) * u + math.cos(theta) * v)
    inside = (u.abs() < 14) & (v.abs() < 14)  # R·p stays inside the image
    torch.testing.assert_close(x_out[0, 0][inside], expected[inside], atol=1e-4, rtol=0)


def test_shear_of_a_linear_ramp():
    u, v = centred_coordinates(31, 31)
    x_out, _ = warp(u[None, None], u[None, None] > 0, grid_for(1, 31, 31, shear=0.2))
    inside = u.abs() + 0.2 * v.abs() < 15  # u + 0.2·v stays inside the image
    torch.testing.assert_close(x_out[0, 0][inside], (u + 0.2 * v)[inside], atol=1e-4, rtol=0)


def test_constant_displacement_is_a_shift():
    x = torch.randn(1, 1, 20, 20, generator=generator(107))
    displacement = torch.zeros(1, 2, 4, 4)
    displacement[:, 0] = 3.0  # sample 3 px to the right
    displacement[:, 1] = -2.0  # and 2 px up
    x_out, _ = warp(x, x > 0, grid_for(1, 20, 20, displacement=displacement))
    torch.testing.assert_close(x_out[0, 0, 2:, :-3], x[0, 0, :-2, 3:], atol=1e-4, rtol=0)


def test_elastic_control_points_move_their_pixels():
    # 3×3 control grid on a 33×33 image: the centre control sits on pixel (16, 16), corners on corners.
    u, v = centred_coordinates(33, 33)
    displacement = torch.randn(1, 2, 3, 3, generator=generator(3))
    displacement[0, :, 1, 1] = torch.tensor([2.5, -1.5])
    displacement[0, :, 0, 0] = torch.tensor([2.0, 1.0])  # top-left corner, pointing into the image
    x_out, _ = warp(u[None, None], u[None, None] > 0, grid_for(1, 33, 33, displacement=displacement))
    y_out, _ = warp(v[None, None], v[None, None] > 0, grid_for(1, 33, 33, displacement=displacement))
    assert x_out[0, 0, 16, 16].item() == pytest.approx(0.0 + 2.5, abs=1e-4)
    assert y_out[0, 0, 16, 16].item() == pytest.approx(0.0 - 1.5, abs=1e-4)
    assert x_out[0, 0, 0, 0].item() == pytest.approx(-16.0 + 2.0, abs=1e-4)
    assert y_out[0, 0, 0, 0].item() == pytest.approx(-16.0 + 1.0, abs=1e-4)


def mismatch(label: torch.Tensor, image: torch.Tensor, threshold: float) -> float:
    return (label != (image > threshold).float()).float().mean().item()


def mismatch_off_the_edge(label: torch.Tensor, image: torch.Tensor, threshold: float) -> float:
    """Fraction of pixels where label and thresholded image disagree although no neighbour is on the
    other side of the threshold, i.e. disagreements that interpolation at the edge cannot explain."""
    mask = (image > threshold).float()
    edge = F.max_pool2d(mask, 3, 1, 1) != -F.max_pool2d(-mask, 3, 1, 1)
    return ((label != mask) & ~edge).float().mean().item()


TRANSFORMS = {
    "rotation": {**NO_TRANSFORM, "max_angle": 30.0},
    "shear": {**NO_TRANSFORM, "max_shear": 0.3},
    "elastic": {**NO_TRANSFORM, "elastic_std": 5.0},
    "dihedral": {**NO_TRANSFORM, "flip": True, "rot90": True},
    "all": {},
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_label_stays_aligned_with_image(name):
    # The label is a fixed function of the image (image > 0.3), so after any correctly shared warp
    # the warped label must equal the re-thresholded warped image, except at the edge, where
    # interpolating the image and interpolating its thresholded label round differently.
    x = smooth_field(8, 64, 64, seed=4)
    y = (x > 0.3).float()
    x_out, y_out = augment_batch(x, y, generator(5), **TRANSFORMS[name])
    assert (x_out - x).abs().mean() > 0.1  # something happened
    assert set(y_out.unique().tolist()) <= {0.0, 1.0}
    assert mismatch(y_out, x_out, 0.3) < 0.03
    assert mismatch_off_the_edge(y_out, x_out, 0.3) < 0.001
    # The checks are sensitive: a label two pixels off is caught by both.
    assert mismatch(torch.roll(y_out, 2, dims=-1), x_out, 0.3) > 0.08
    assert mismatch_off_the_edge(torch.roll(y_out, 2, dims=-2), x_out, 0.3) > 0.02


def test_deterministic_for_a_generator_state():
    x = smooth_field(4, 32, 32)
    y = (x > 0).float()
    a = augment_batch(x, y, generator(7))
    b = augment_batch(x, y, generator(7))
    c = augment_batch(x, y, generator(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0])
    g = generator(7)
    first, second = augment_batch(x, y, g), augment_batch(x, y, g)
    assert not torch.allclose(first[0], second[0])  # the generator advances


def test_shapes_dtypes_and_channels_preserved():
    x = torch.randn(3, 2, 24, 24, generator=generator(108))
    y = (torch.rand(3, 1, 24, 24, generator=generator(109)) > 0.7).to(torch.uint8)
    x_out, y_out = augment_batch(x, y, generator(9))
    assert x_out.shape == x.shape and x_out.dtype == x.dtype
    assert y_out.shape == y.shape and y_out.dtype == torch.uint8
    assert set(y_out.unique().tolist()) <= {0, 1}


def test_mismatched_shapes_are_an_error():
    with pytest.raises(GradflowError, match="augment_batch"):
        augment_batch(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 9), generator(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_batch_device():
    x = smooth_field(4, 64, 64)
    y = (x > 0.3).float()
    x_cpu, y_cpu = augment_batch(x, y, generator(11))
    x_gpu, y_gpu = augment_batch(x.cuda(), y.cuda(), generator(11))
    assert x_gpu.device.type == "cuda" and y_gpu.device.type == "cuda"
    torch.testing.assert_close(x_gpu.cpu(), x_cpu, atol=1e-4, rtol=0)
    assert (y_gpu.cpu() != y_cpu).float().mean() < 1e-3
    cuda_generator = torch.Generator(device="cuda").manual_seed(11)
    x_out, y_out = augment_batch(x.cuda(), y.cuda(), cuda_generator)
    # The same alignment criterion as test_label_stays_aligned_with_image: disagreement only in
    # the one-pixel band where interpolation rounds differently, none away from the edge.
    assert mismatch(y_out, x_out, 0.3) < 0.03
    assert mismatch_off_the_edge(y_out, x_out, 0.3) < 0.001
