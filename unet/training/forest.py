"""An ilastik-style pixel classifier: scikit-image's multiscale filter features and a scikit-learn random
forest, trained on painted pixels in seconds.

Neuroseg's baseline (``bench.quality``, ``bench.loop``) and, in the live loop from random weights, a
teacher: a network learning from scratch on a few brush strokes has nothing to say about the pixels nobody
painted, while a forest on hand-made filters, trained on the same strokes, already draws most membranes. So
the live learner takes the forest's answer as a down-weighted target there (:mod:`unet.training.live`). That is the
simplest form of Shallow2Deep (Matskevych, Wolny, Pape and Kreshuk 2022, "From shallow to deep: exploiting
feature-based classifiers for domain adaptation in semantic segmentation", Front. Comput. Sci.,
doi:10.3389/fcomp.2022.805166; torch-em's ``shallow2deep`` trains on such pseudo-labels too): a classifier
on hand-made features, trained on sparse strokes, gives the dense targets a network learns from.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np

from unet.training.labels import IGNORE, NEURON

# the features of ilastik's default set in scikit-image's terms: smoothed intensity, gradient magnitude and
# Hessian eigenvalues at six scales from 0.7 to 16 px (24 features a pixel)
FEATURES = {"intensity": True, "edges": True, "texture": True, "sigma_min": 0.7, "sigma_max": 16, "num_sigma": 6}
TILE = 512  # features are computed tile by tile: 512² × 24 float32 is 25 MB, whatever the slice's size
MARGIN = 64  # the filters' reach around a tile (scikit-image's Gaussians stop at 4 sigma: 4 × 16 px)


def pixel_features(image: np.ndarray, workers: int = 1) -> np.ndarray:
    """``(H, W, 24)`` float32 features of one slice, normalised to zero mean and unit deviation first so that
    the forest does not depend on the stack's grey levels. All of it at once: for a large slice,
    :func:`tile_features` computes the same values one tile at a time."""
    h, w = np.shape(image)
    return tile_features(image, (slice(0, h), slice(0, w)), *_stats(image), workers=workers)


def tiles(shape: tuple[int, int], size: int = TILE) -> list[tuple[slice, slice]]:
    """The tiles of a slice, row by row."""
    return [(slice(y, min(y + size, shape[0])), slice(x, min(x + size, shape[1])))
            for y in range(0, shape[0], size) for x in range(0, shape[1], size)]


def tile_features(image: np.ndarray, tile: tuple[slice, slice], mean: float, std: float,
                  workers: int = 1) -> np.ndarray:
    """:func:`pixel_features` of one tile (the slice's ``mean`` and ``std`` normalise it), read with
    :data:`MARGIN` pixels around it so that it matches the whole slice's features."""
    from skimage.feature import multiscale_basic_features  # only with a forest: a live session from a model has none

    h, w = np.shape(image)
    ys, xs = tile
    y0, x0 = max(ys.start - MARGIN, 0), max(xs.start - MARGIN, 0)
    y1, x1 = min(ys.stop + MARGIN, h), min(xs.stop + MARGIN, w)
    x = (np.asarray(image[y0:y1, x0:x1], np.float32) - mean) / (std + 1e-6)
    features = multiscale_basic_features(x, workers=workers, **FEATURES)
    return features[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0].astype(np.float32)


def _stats(image: np.ndarray) -> tuple[float, float]:
    x = np.asarray(image, np.float32)
    return float(x.mean()), float(x.std())


class PixelForest:
    """A random forest over :func:`pixel_features`, refitted whenever the painted pixels change.

    The features of each slice's painted pixels are kept (at most ``per_slice`` of them, drawn uniformly, so
    that a fully labelled 4096² slice costs what a few strokes do), keyed by the slice and its target. Both
    the features and the prediction are computed tile by tile, and only the tiles that are needed, so that
    memory does not grow with the slice.

    Args:
        trees: the forest's size (30 fit on 20,000 pixels in about 1.3 s on one thread; 100 trees take 3×
            as long and barely differ as a teacher).
        per_slice: painted pixels kept per slice.
        seed: the forest's and the draw's seed.
    """

    def __init__(self, trees: int = 30, per_slice: int = 10_000, seed: int = 0):
        self.trees, self.per_slice, self.seed = trees, per_slice, seed
        self.forest = None
        self._pixels: dict[Hashable, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # key → (target, x, y)

    def fit(self, slices: Mapping[Hashable, tuple[np.ndarray, np.ndarray]]) -> bool:
        """Train on the painted pixels (targets NEURON / MEMBRANE; IGNORE is unpainted) of ``key → (image,
        target)``. Returns whether the forest changed: it does not when no painted pixel did (the same
        target array, or an equal one: change a target by passing a new array), and it stays unfitted while
        only one class is painted."""
        from sklearn.ensemble import RandomForestClassifier  # scikit-learn (~4 s) only when a forest is fitted

        changed = set(self._pixels) - set(slices)
        for key in changed:
            del self._pixels[key]
        for key, (image, target) in slices.items():
            target = np.asarray(target)
            known = self._pixels.get(key)
            if known is not None and (known[0] is target or np.array_equal(known[0], target)):
                continue
            self._pixels[key] = (target, *self._painted_features(image, target))
            changed.add(key)
        if not changed:
            return False
        x = [v[1] for v in self._pixels.values()]
        y = [v[2] for v in self._pixels.values()]
        if not y or len(np.unique(np.concatenate(y))) < 2:
            self.forest = None
            return True
        self.forest = RandomForestClassifier(n_estimators=self.trees, min_samples_leaf=2, n_jobs=1,
                                             random_state=self.seed).fit(np.concatenate(x), np.concatenate(y))
        return True

    def _painted_features(self, image: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The features and classes of (at most ``per_slice`` of) the painted pixels of one slice."""
        where = np.flatnonzero(target.ravel() != IGNORE)
        if len(where) > self.per_slice:
            where = np.sort(np.random.default_rng(self.seed).choice(where, self.per_slice, replace=False))
        chosen = np.zeros(target.shape, bool)
        chosen.ravel()[where] = True
        mean, std = _stats(image)
        xs, ys = [], []
        for tile in tiles(target.shape):
            here = chosen[tile]
            if here.any():
                xs.append(tile_features(image, tile, mean, std)[here])
                ys.append(target[tile][here])
        if not xs:
            return np.zeros((0, 4 * FEATURES["num_sigma"]), np.float32), np.zeros(0, target.dtype)
        return np.concatenate(xs), np.concatenate(ys)

    def predict(self, image: np.ndarray, near: np.ndarray | None = None, reach: int = 0) -> np.ndarray | None:
        """The neuron probability of one slice (float32), or None while the forest is not fitted. With
        ``near`` (a boolean mask), only the tiles within ``reach`` pixels of it are predicted; the rest
        is NaN."""
        if self.forest is None:
            return None
        shape = np.shape(image)
        out = np.full(shape, np.nan, np.float32)
        neuron = list(self.forest.classes_).index(NEURON)
        mean, std = _stats(image)
        for ys, xs in tiles(shape):
            if near is not None and not near[max(ys.start - reach, 0):ys.stop + reach,
                                             max(xs.start - reach, 0):xs.stop + reach].any():
                continue
            features = tile_features(image, (ys, xs), mean, std)
            prob = self.forest.predict_proba(features.reshape(-1, features.shape[-1]))[:, neuron]
            out[ys, xs] = prob.reshape(features.shape[:2])
        return out
