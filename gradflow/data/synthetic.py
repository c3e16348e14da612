"""Synthetic EM-like membrane images with exact labels, so everything runs with no download.

Each image is a jittered Voronoi tessellation of cells seen through a smooth domain warp (curvy cell
walls). Membranes are drawn along the cell walls with a thickness and darkness that vary from wall to
wall and along each wall; the label is exactly the drawn membrane mask. Cells get their own brightness,
organelle-like dark blobs (irregular "mitochondria" and ring-shaped vesicles) that are *not*
membrane, grainy texture, uneven illumination, blur and noise. Dark blobs, dark cells and faint
membranes overlap in intensity, so a global intensity threshold cannot segment the membranes (like the
ISBI 2012 data, where the best threshold reaches about 0.82 pixel accuracy with 22% membrane): a model
has to use shape and context.

Units: lengths in pixels, intensities in [0, 1] (bright cytoplasm ≈ 0.65, membrane cores ≈ 0.3).
"""

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

CELL_SPACING = 28.0  # mean distance between neighbouring cell centres before seeds are dropped, px


def synthetic_em(n: int, size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return `n` images (n, size, size) float32 in [0, 1] and membrane labels (n, size, size) uint8.

    Labels are 1 on membrane and 0 inside cells. Image i depends only on (seed, i, size), so the
    first k images of a call with n > k equal a call with n = k.
    """
    images = np.empty((n, size, size), np.float32)
    labels = np.empty((n, size, size), np.uint8)
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n)):
        images[i], labels[i] = synthetic_image(np.random.default_rng(child), size)
    return images, labels


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit standard deviation.

    Filtered in Fourier space (periodic boundaries), so the cost does not grow with `sigma`.
    """
    spectrum = np.fft.rfft2(rng.standard_normal(shape))
    field = np.fft.irfft2(ndimage.fourier_gaussian(spectrum, sigma, n=shape[-1]), s=shape)
    return (field - field.mean()) / (field.std() + 1e-12)


def cell_seeds(rng: np.random.Generator, size: int) -> np.ndarray:
    """Jittered grid of cell centres (k, 2) covering the image plus a one-cell margin.

    A quarter of the seeds are dropped so cell sizes vary (neighbours absorb the missing cell).
    """
    ticks = np.arange(-CELL_SPACING, size + 2 * CELL_SPACING, CELL_SPACING)
    grid = np.stack(np.meshgrid(ticks, ticks, indexing="ij"), -1).reshape(-1, 2)
    seeds = grid + rng.uniform(-0.45, 0.45, grid.shape) * CELL_SPACING
    return seeds[rng.random(len(seeds)) > 0.25]


def synthetic_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (size, size) float32 and its membrane mask (size, size) uint8."""
    shape = (size, size)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)

    # Cells: nearest and second-nearest seed of each domain-warped pixel. The distance to the
    # bisector of those two seeds is the distance to the cell wall (in warped coordinates).
    warp = 0.12 * CELL_SPACING
    points = np.stack([rows + warp * smooth_noise(rng, shape, CELL_SPACING / 3),
                       cols + warp * smooth_noise(rng, shape, CELL_SPACING / 3)], -1).reshape(-1, 2)
    seeds = cell_seeds(rng, size)
    dist, index = cKDTree(seeds).query(points, k=2)
    gap = np.linalg.norm(seeds[index[:, 0]] - seeds[index[:, 1]], axis=1)
    wall_dist = ((dist[:, 1] ** 2 - dist[:, 0] ** 2) / (2 * gap)).reshape(shape)
    cell = index[:, 0].reshape(shape)
    neighbour = index[:, 1].reshape(shape)

    # Membranes: each wall gets the mean of two per-cell draws (symmetric in the two cells), and a
    # smooth variation along its length.
    cell_thickness = rng.uniform(1.4, 2.6, len(seeds))
    half_width = (cell_thickness[cell] + cell_thickness[neighbour]) / 2
    half_width *= np.clip(1 + 0.15 * smooth_noise(rng, shape, 6.0), 0.6, 1.4)
    membrane = wall_dist < half_width

    cell_darkness = rng.uniform(0.2, 0.55, len(seeds))
    darkness = (cell_darkness[cell] + cell_darkness[neighbour]) / 2
    darkness *= np.clip(1 + 0.25 * smooth_noise(rng, shape, 8.0), 0.4, 1.5)
    # Soft edge centred on the label boundary: the outer rim of a membrane is only mildly dark.
    membrane_profile = 1 / (1 + np.exp((wall_dist - 0.75 * half_width) / 0.6))

    # Cytoplasm: per-cell brightness, grainy texture and uneven illumination.
    image = (rng.normal(0.66, 0.05, len(seeds)) - 0.15 * (rng.random(len(seeds)) < 0.15))[cell]
    image += 0.05 * smooth_noise(rng, shape, 1.0) + 0.04 * smooth_noise(rng, shape, 3.0)
    image += 0.05 * smooth_noise(rng, shape, size / 3)

    # Organelles, kept clear of membranes: irregular dark blobs and ring-shaped vesicles.
    interior = wall_dist > half_width + 2.0
    blob_field = smooth_noise(rng, shape, 2.5)
    blobs = interior & (blob_field > np.quantile(blob_field, 0.93))
    blob_profile = ndimage.gaussian_filter(blobs.astype(np.float64), 0.8)
    image -= rng.uniform(0.2, 0.45) * blob_profile * (1 + 0.2 * smooth_noise(rng, shape, 2.0))

    centres = interior & (rng.random(shape) < 0.006)
    centre_dist = ndimage.distance_transform_edt(~centres)
    radius = rng.uniform(1.5, 3.0)
    rings = np.exp(-(((centre_dist - radius) / 0.8) ** 2)) * (wall_dist > half_width + 1.0)
    image -= rng.uniform(0.2, 0.4) * rings

    image -= darkness * membrane_profile

    # Imaging: optical blur, then grainy (spatially correlated) noise.
    image = ndimage.gaussian_filter(image, rng.uniform(0.5, 0.9))
    image += rng.uniform(0.03, 0.05) * smooth_noise(rng, shape, 0.6)
    image += 0.02 * rng.standard_normal(shape)
    return np.clip(image, 0, 1).astype(np.float32), membrane.astype(np.uint8)
