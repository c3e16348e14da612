"""Training augmentation as in Drozdzal et al. 2016: flips, rotations, shear and elastic spline warping.

All transforms of an image are composed into ONE sampling grid, so the image is interpolated once,
and the same grid samples the label (bilinear, then re-thresholded at 0.5, so labels stay binary and
aligned with the image). Everything is torch ops on the batch's device; only the few random numbers
per image are drawn on the generator's device and moved.

Geometry, in pixel coordinates centred on the image (u to the right, v down): the output pixel at p
samples the input at

    q = D · R(angle) · S(shear) · p + d(p)

D = flip (u → −u) then `quarter_turns` × 90° as `torch.rot90(x, k, dims=(-2, -1))`, R a rotation
(angle > 0 turns the image the same way as rot90), S = [[1, shear], [0, 1]] (input column u + shear·v)
and d a smooth displacement in pixels, bicubically upsampled from a coarse control grid. Outside the
image the input is mirrored (reflection padding).
"""

import math

import torch
import torch.nn.functional as F

from gradflow.errors import GradflowError


def augment_batch(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *, flip: bool = True,
                  rot90: bool = True, max_angle: float = 15.0, max_shear: float = 0.1,
                  elastic_std: float = 4.0, elastic_points: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly transform images x (N, C, H, W) and binary labels y (N, C', H, W) identically.

    Per image: a flip with probability 1/2, a uniform number of quarter turns (only 0 or 2 for
    non-square images), a rotation uniform in ±max_angle degrees, a shear uniform in ±max_shear, and
    an elastic warp whose elastic_points × elastic_points control displacements are normal with
    standard deviation elastic_std pixels. Deterministic for a given generator state.
    """
    if x.ndim != 4 or y.ndim != 4 or x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:]:
        raise GradflowError(f"augment_batch needs (N, C, H, W) images and labels of one size, "
                            f"got {tuple(x.shape)} and {tuple(y.shape)}")
    n, _, height, width = x.shape
    uniform = torch.rand(n, 4, generator=generator, device=generator.device).to(x.device)
    control = torch.randn(n, 2, elastic_points, elastic_points, generator=generator, device=generator.device)
    turns = (uniform[:, 1] * 4).floor().long() if height == width else 2 * (uniform[:, 1] * 2).floor().long()
    grid = sampling_grid(
        flip=(uniform[:, 0] < 0.5) & flip,
        quarter_turns=turns * rot90,
        angle=(2 * uniform[:, 2] - 1) * max_angle,
        shear=(2 * uniform[:, 3] - 1) * max_shear,
        displacement=control.to(x.device) * elastic_std,
        height=height,
        width=width,
    )
    return warp(x, y, grid)


def warp(x: torch.Tensor, y: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample images and labels with one grid; labels re-thresholded at 0.5 and returned in y's dtype."""
    both = torch.cat([x, y.to(x.dtype)], dim=1)
    warped = F.grid_sample(both, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)
    x_out, y_out = warped.split([x.shape[1], y.shape[1]], dim=1)
    return x_out, (y_out > 0.5).to(y.dtype)


def sampling_grid(flip: torch.Tensor, quarter_turns: torch.Tensor, angle: torch.Tensor, shear: torch.Tensor,
                  displacement: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`F.grid_sample` grid (N, H, W, 2) for q = D·R·S·p + d(p) (see module docstring).

    flip (N,) bool; quarter_turns (N,) int; angle (N,) degrees; shear (N,); displacement
    (N, 2, gh, gw) control displacements in pixels (channel 0 along u, 1 along v), gh, gw >= 2,
    spread evenly over the image with the corner controls on the corner pixels.
    """
    device = displacement.device
    n = len(angle)
    # Dihedral part: flip first, then k quarter turns. rot90 maps output (u, v) to input (-v, u).
    mirror = 1.0 - 2.0 * flip.to(device, torch.float32)  # -1 where flipped
    k = quarter_turns.to(device) % 4
    cos_k = torch.tensor([1.0, 0.0, -1.0, 0.0], device=device)[k]
    sin_k = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device)[k]
    dihedral = torch.stack([torch.stack([mirror * cos_k, -mirror * sin_k], -1),
                            torch.stack([sin_k, cos_k], -1)], -2)
    theta = angle.to(device, torch.float32) * (math.pi / 180)
    rotation = torch.stack([torch.stack([theta.cos(), -theta.sin()], -1),
                            torch.stack([theta.sin(), theta.cos()], -1)], -2)
    shearing = torch.eye(2, device=device).repeat(n, 1, 1)
    shearing[:, 0, 1] = shear.to(device, torch.float32)
    matrix = dihedral @ rotation @ shearing  # (N, 2, 2)

    u = torch.arange(width, device=device, dtype=torch.float32) - (width - 1) / 2
    v = torch.arange(height, device=device, dtype=torch.float32) - (height - 1) / 2
    p = torch.stack(torch.meshgrid(u, v, indexing="xy"), -1)  # (H, W, 2) as (u, v)
    q = torch.einsum("nij,hwj->nhwi", matrix, p)
    dense = F.interpolate(displacement.float(), size=(height, width), mode="bicubic", align_corners=True)
    q = q + dense.permute(0, 2, 3, 1)
    # Pixel-centred coordinates to grid_sample's [-1, 1] with align_corners=False.
    return q / torch.tensor([width / 2, height / 2], device=device)
