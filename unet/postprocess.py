"""From probabilities to masks and neuron instances."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import h_maxima, remove_small_objects
from skimage.segmentation import watershed


def to_mask(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Neuron mask (uint8 0/1) from a neuron probability map."""
    return (prob > threshold).astype(np.uint8)


def instances(prob: np.ndarray, threshold: float = 0.5, smooth: float = 1.0, h: float = 4.0,
              min_size: int = 30) -> np.ndarray:
    """Neuron instances from a 2-D neuron probability map by a seeded watershed.

    The map is smoothed (``smooth`` px Gaussian) and thresholded; specks under ``min_size`` pixels are
    dropped. Seeds are the h-maxima of the distance transform of that neuron mask: a maximum must stand
    ``h`` pixels above the saddle to its neighbour, so one elongated cell keeps one seed while two cells
    joined through a small gap in their membrane get two. The watershed floods the inverted distance and
    gives every pixel an instance (membranes go to their nearest cell), as the ISBI evaluation expects.
    Returns int32 labels from 1."""
    if prob.ndim != 2:
        raise ValueError(f"instances works on one slice, got shape {prob.shape}")
    p = ndi.gaussian_filter(prob.astype(np.float32), smooth) if smooth > 0 else prob
    foreground = p > threshold
    if min_size > 1:
        foreground = remove_small_objects(foreground, max_size=min_size - 1)
    if not foreground.any():
        return np.ones(prob.shape, np.int32)
    distance = ndi.distance_transform_edt(foreground).astype(np.float32)
    seeds = h_maxima(ndi.gaussian_filter(distance, 0.5), h) if h > 0 else foreground
    markers, _ = ndi.label(seeds)
    labels = watershed(-distance, markers)
    if min_size > 1:
        labels = _merge_small(labels, min_size)
    return labels.astype(np.int32)


def _merge_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Give instances smaller than ``min_size`` pixels to their largest touching neighbour."""
    sizes = np.bincount(labels.ravel())
    small = np.flatnonzero((sizes < min_size) & (sizes > 0))
    if not len(small):
        return labels
    keep = labels.copy()
    keep[np.isin(labels, small)] = 0
    if not keep.any():
        return labels
    # each removed pixel takes the label of the nearest kept pixel
    _, (iy, ix) = ndi.distance_transform_edt(keep == 0, return_indices=True)
    return keep[iy, ix]
