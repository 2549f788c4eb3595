"""Augmentation of training patches. Geometric transforms move the image, its target and its weights
together (nearest-neighbour for the target, so labels stay labels); intensity transforms touch the image
only. Every random draw comes from the ``np.random.Generator`` passed in."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from unet.network.config import AugmentConfig
from unet.training.labels import IGNORE


def dihedral(arrays: list[np.ndarray], k: int, flip: bool) -> list[np.ndarray]:
    """Rotate by ``k`` × 90° and optionally flip left-right: one of the 8 symmetries of the square."""
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(-2, -1))
        if flip:
            a = a[..., ::-1]
        out.append(np.ascontiguousarray(a))
    return out


def dihedral_vector(vector: tuple[float, float], k: int, flip: bool) -> tuple[float, float]:
    """Where :func:`dihedral` ``(k, flip)`` takes a displacement ``(dy, dx)``: each quarter turn maps it
    to ``(−dx, dy)``, the left-right flip to ``(dy, −dx)``."""
    dy, dx = vector
    for _ in range(k % 4):
        dy, dx = -dx, dy
    return (dy, -dx) if flip else (dy, dx)


def elastic_fields(shape: tuple[int, int], rng: np.random.Generator, sigma: float,
                   grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random displacement fields: normal displacements with std ``sigma`` pixels on a coarse
    ``grid × grid`` lattice, bicubically interpolated to full size (the U-Net paper's deformation)."""
    coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
    zoom = (shape[0] / grid, shape[1] / grid)
    dy = ndi.zoom(coarse[0], zoom, order=3, mode="nearest", grid_mode=True)[: shape[0], : shape[1]]
    dx = ndi.zoom(coarse[1], zoom, order=3, mode="nearest", grid_mode=True)[: shape[0], : shape[1]]
    return dy, dx


def elastic(image: np.ndarray, others: list[tuple[np.ndarray, int, float]], rng: np.random.Generator,
            sigma: float, grid: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Deform ``image`` (linear interpolation) and each of ``others`` given as ``(array, order, cval)``
    with the same displacement field."""
    dy, dx = elastic_fields(image.shape, rng, sigma, grid)
    yy, xx = np.meshgrid(np.arange(image.shape[0], dtype=np.float32),
                         np.arange(image.shape[1], dtype=np.float32), indexing="ij")
    coords = np.stack([yy + dy, xx + dx])
    warped = ndi.map_coordinates(image, coords, order=1, mode="reflect")
    rest = [ndi.map_coordinates(a, coords, order=order, mode="constant", cval=cval)
            for a, order, cval in others]
    return warped.astype(image.dtype), rest


def intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random contrast (×0.7–1.3), brightness (±0.3 std) and gamma (0.7–1.5) of a normalised image."""
    lo, hi = float(image.min()), float(image.max())
    if hi > lo:
        unit = (image - lo) / (hi - lo)
        unit = unit ** rng.uniform(0.7, 1.5)
        image = unit * (hi - lo) + lo
    image = image * rng.uniform(0.7, 1.3) + rng.uniform(-0.3, 0.3)
    return image.astype(np.float32)


def augment_patch(image: np.ndarray, target: np.ndarray, weights: np.ndarray | None,
                  config: AugmentConfig, rng: np.random.Generator, label_offset: tuple[float, float] = (0.0, 0.0)
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Apply the configured augmentations to one patch (2-D arrays of equal shape).

    ``label_offset`` is the labels' drawing convention (:func:`unet.training.labels.label_offset`: where the labels
    sit against the image's membranes). A flip or quarter turn turns that offset with the patch, so a
    network would see it in eight directions and learn none; the image is moved back by the difference
    (cubic spline), so every patch shows the labels where the annotators draw them."""
    arrays = [image, target] + ([weights] if weights is not None else [])
    if config.flips:
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        arrays = dihedral(arrays, k, flip)
        if label_offset != (0.0, 0.0):
            turned = dihedral_vector(label_offset, k, flip)
            move = (turned[0] - label_offset[0], turned[1] - label_offset[1])
            if move != (0.0, 0.0):
                arrays[0] = ndi.shift(arrays[0], move, order=3, mode="reflect")
    image, target = arrays[0], arrays[1]
    weights = arrays[2] if weights is not None else None
    if config.elastic_p and config.elastic_sigma > 0 and rng.random() < config.elastic_p:
        others = [(target, 0, float(IGNORE))] + ([(weights, 1, 0.0)] if weights is not None else [])
        image, rest = elastic(image, others, rng, config.elastic_sigma, config.elastic_grid)
        target = rest[0]
        weights = rest[1] if weights is not None else None
    if config.intensity_p and rng.random() < config.intensity_p:
        image = intensity(image, rng)
    if config.noise_p and config.noise_std > 0 and rng.random() < config.noise_p:
        image = image + rng.normal(0.0, config.noise_std, image.shape).astype(np.float32)
    return image.astype(np.float32), target, weights
