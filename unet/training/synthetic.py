"""Synthetic EM-like stacks with known labels: Voronoi cells with dark membranes, organelles, blur and
noise. Used by the tests and by the app's demo dataset; every random draw comes from the
``np.random.Generator`` passed in."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree


def make_synthetic_em(
    shape: tuple[int, int, int] = (8, 256, 256),
    rng: np.random.Generator | None = None,
    *,
    cell_size: float = 28.0,
    membrane_width: float = 2.5,
    noise: float = 12.0,
    blur: float = 1.0,
    organelles: float = 0.6,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(volume, labels)``: uint8 ``(Z, Y, X)`` grey image and uint8 labels (255 = neuron
    interior, 0 = membrane, as ISBI 2012). Cells drift slowly from slice to slice like real sections.

    ``cell_size`` is the typical cell diameter in pixels, ``membrane_width`` the membrane thickness,
    ``noise`` the standard deviation of the additive noise in grey levels, ``organelles`` the expected
    number of dark organelles per cell (they are *not* membrane: the network must learn shape)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    z, h, w = shape
    if min(shape) < 1:
        raise ValueError(f"shape must be positive, got {shape}")
    n_cells = max(2, int(h * w / (cell_size**2) * 1.3))
    seeds = rng.uniform(-cell_size, [h + cell_size, w + cell_size], size=(n_cells, 2))
    brightness = rng.uniform(150, 205, n_cells)
    yy, xx = np.mgrid[0:h, 0:w]
    coords = np.column_stack([yy.ravel(), xx.ravel()]).astype(np.float64)
    volume = np.empty(shape, np.uint8)
    labels = np.empty(shape, np.uint8)
    for k in range(z):
        seeds = seeds + rng.normal(0, cell_size * 0.04, seeds.shape)
        dist, idx = cKDTree(seeds).query(coords, k=2)
        gap = (dist[:, 1] - dist[:, 0]).reshape(h, w)  # ~ twice the distance to the nearest cell border
        membrane = gap < membrane_width
        owner = idx[:, 0].reshape(h, w)
        image = brightness[owner].astype(np.float32)
        # fine cytoplasm texture
        image += ndi.gaussian_filter(rng.normal(0, 18, (h, w)).astype(np.float32), 1.5)
        # organelles: dark round blobs well inside cells
        n_org = rng.poisson(organelles * n_cells)
        if n_org:
            centres = rng.uniform([0, 0], [h, w], size=(n_org, 2))
            radii = rng.uniform(2.0, cell_size * 0.15, n_org)
            inner = gap > membrane_width * 3
            for (cy, cx), r in zip(centres, radii, strict=True):
                y0, y1 = int(max(cy - r - 1, 0)), int(min(cy + r + 2, h))
                x0, x1 = int(max(cx - r - 1, 0)), int(min(cx + r + 2, w))
                blob = (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2 < r * r
                blob &= inner[y0:y1, x0:x1]
                image[y0:y1, x0:x1][blob] = rng.uniform(70, 110)
        image[membrane] = rng.uniform(35, 60)
        if blur > 0:
            image = ndi.gaussian_filter(image, blur)
        image += rng.normal(0, noise, image.shape).astype(np.float32)
        volume[k] = np.clip(image, 0, 255).astype(np.uint8)
        labels[k] = np.where(membrane, 0, 255).astype(np.uint8)
    return volume, labels
