"""From probabilities to masks and neuron instances.

Three ways from a neuron probability map to neurons (every pixel gets one; membranes go to a neighbour,
as the ISBI evaluation expects), compared on ISBI 2012 by ``bench.quality``:

- ``"agglomerate"``: an over-segmentation (a watershed of the membrane map from its minima) whose
  fragments are merged, lowest first, while the mean membrane probability along their shared border is
  below ``threshold`` (scikit-image's region adjacency graph, ``rag_boundary`` and ``merge_hierarchical``);
- ``"watershed"``: the seeded watershed of the neuron mask's distance transform (:func:`instances`);
- ``"threshold"``: connected components of the neuron mask, grown over the membranes.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import h_maxima, h_minima, remove_small_objects
from skimage.segmentation import relabel_sequential, watershed


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
    markers, count = ndi.label(seeds)
    if count == 0:  # no maximum stands h above its saddle (thin cells): each connected cell is one seed
        markers, _ = ndi.label(foreground)
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


METHODS = ("agglomerate", "watershed", "threshold")
#: The post-processing the app and the command line use unless told otherwise: on ISBI 2012 slices 25-29
#: it beat the seeded watershed on V_rand, V_info, adapted Rand error and VI (docs/benchmarks.md, ``bench.quality``).
DEFAULT_METHOD = "agglomerate"
# The defaults of agglomerate() and threshold_components() are the parameters bench.quality chose on ISBI
# 2012 slices 20-24 (best V_rand of the U-Net's maps as Predict makes them by default, without test-time
# augmentation); instances() keeps the defaults it always had (its tuned ones lost on V_info and VI on 25-29).


def fragments(prob: np.ndarray, smooth: float = 1.0, h: float = 0.05) -> np.ndarray:
    """An over-segmentation: the watershed of the membrane map (1 − the smoothed neuron probability) from
    its h-minima (a basin must be ``h`` deeper than its saddle to get a seed of its own). Labels from 1."""
    boundary = 1.0 - (ndi.gaussian_filter(prob.astype(np.float32), smooth) if smooth > 0 else prob.astype(np.float32))
    seeds, count = ndi.label(h_minima(boundary, h) if h > 0 else boundary <= boundary.min())
    if count == 0:
        return np.ones(prob.shape, np.int32)
    return watershed(boundary, seeds).astype(np.int32)


def _weight_boundary(graph, src, dst, n):
    """The merged edge to ``n``: the mean of the two edges' boundary values, weighted by their lengths."""
    default = {"weight": 0.0, "count": 0}
    count_src, count_dst = graph[src].get(n, default)["count"], graph[dst].get(n, default)["count"]
    weight_src, weight_dst = graph[src].get(n, default)["weight"], graph[dst].get(n, default)["weight"]
    count = count_src + count_dst
    return {"count": count, "weight": (count_src * weight_src + count_dst * weight_dst) / max(count, 1)}


def _merge_nothing(graph, src, dst):
    pass


def agglomerate(prob: np.ndarray, threshold: float = 0.5, smooth: float = 3.0, h: float = 0.02,
                min_size: int = 30) -> np.ndarray:
    """Neuron instances from a 2-D neuron probability map by agglomeration: :func:`fragments` of the
    smoothed map, merged pairwise, the pair with the lowest mean membrane probability (1 − ``prob``, not
    smoothed) along its shared border first, while that mean is below ``threshold``; instances under
    ``min_size`` pixels go to their largest neighbour.
    Returns int32 labels from 1."""
    from skimage.graph import merge_hierarchical, rag_boundary  # keeps skimage.graph out of the server process

    if prob.ndim != 2:
        raise ValueError(f"agglomerate works on one slice, got shape {prob.shape}")
    parts = fragments(prob, smooth, h)
    if parts.max() > 1:
        # the map is smoothed to find fewer, larger fragments; their borders are weighed on the map itself
        graph = rag_boundary(parts, 1.0 - prob.astype(np.float64))
        parts = merge_hierarchical(parts, graph, thresh=threshold, rag_copy=False, in_place_merge=True,
                                   merge_func=_merge_nothing, weight_func=_weight_boundary)
        parts, _, _ = relabel_sequential(parts + 1)
    if min_size > 1:
        parts = _merge_small(parts, min_size)
    return parts.astype(np.int32)


def threshold_components(prob: np.ndarray, threshold: float = 0.8, smooth: float = 1.0,
                         min_size: int = 30) -> np.ndarray:
    """Neuron instances as the 4-connected components of the neuron mask, grown over the membranes by a
    watershed of the membrane map. Returns int32 labels from 1."""
    p = ndi.gaussian_filter(prob.astype(np.float32), smooth) if smooth > 0 else prob.astype(np.float32)
    foreground = p > threshold
    if min_size > 1:
        foreground = remove_small_objects(foreground, max_size=min_size - 1)
    markers, count = ndi.label(foreground)
    if count == 0:
        return np.ones(prob.shape, np.int32)
    return watershed(1.0 - p, markers).astype(np.int32)


def segment(prob: np.ndarray, method: str = DEFAULT_METHOD, **params) -> np.ndarray:
    """Neuron instances of one slice by ``method`` (one of :data:`METHODS`) with its tuned defaults, or the
    parameters given."""
    if method == "agglomerate":
        return agglomerate(prob, **params)
    if method == "watershed":
        return instances(prob, **params)
    if method == "threshold":
        return threshold_components(prob, **params)
    raise ValueError(f"unknown post-processing {method!r}: choose one of {', '.join(METHODS)}")
