"""An ilastik-style pixel classifier: scikit-image's multiscale filter features and a scikit-learn random
forest, trained on painted pixels in seconds.

Neuroseg's baseline (``bench.quality``, ``bench.loop``) and, in the live loop from random weights, a
teacher: a network learning from scratch on a few brush strokes has nothing to say about the pixels nobody
painted, while a forest on hand-made filters, trained on the same strokes, already draws most membranes. So
the live learner takes the forest's answer as a down-weighted target there (:mod:`unet.live`). That is the
simplest form of Shallow2Deep (Matskevych, Wolny, Pape and Kreshuk 2022, "From shallow to deep: exploiting
feature-based classifiers for domain adaptation in semantic segmentation", Front. Comput. Sci.,
doi:10.3389/fcomp.2022.805166; torch-em's ``shallow2deep`` trains on such pseudo-labels too): a classifier
on hand-made features, trained on sparse strokes, gives the dense targets a network learns from.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np

from unet.labels import IGNORE, NEURON

# the features of ilastik's default set in scikit-image's terms: smoothed intensity, gradient magnitude and
# Hessian eigenvalues at six scales from 0.7 to 16 px (24 features a pixel)
FEATURES = {"intensity": True, "edges": True, "texture": True, "sigma_min": 0.7, "sigma_max": 16, "num_sigma": 6}


def pixel_features(image: np.ndarray, workers: int = 1) -> np.ndarray:
    """``(H, W, 24)`` float32 features of one slice, normalised to zero mean and unit deviation first so that
    the forest does not depend on the stack's grey levels."""
    from skimage.feature import multiscale_basic_features

    x = np.asarray(image, np.float32)
    x = (x - x.mean()) / (x.std() + 1e-6)
    return multiscale_basic_features(x, workers=workers, **FEATURES).astype(np.float32)


class PixelForest:
    """A random forest over :func:`pixel_features`, refitted whenever the painted pixels change.

    The features of each slice's painted pixels are kept (at most ``per_slice`` of them, drawn uniformly, so
    that a fully labelled 4096² slice costs what a few strokes do), keyed by the slice and its target.

    Args:
        trees: the forest's size (30 fit on 20,000 pixels in about 1.3 s on one thread; 100 trees take 3×
            as long and barely differ as a teacher).
        per_slice: painted pixels kept per slice.
        seed: the forest's and the draw's seed.
    """

    def __init__(self, trees: int = 30, per_slice: int = 10_000, seed: int = 0):
        self.trees, self.per_slice, self.seed = trees, per_slice, seed
        self.forest = None
        self._pixels: dict[Hashable, tuple[int, np.ndarray, np.ndarray]] = {}  # key → (target hash, x, y)

    @property
    def fitted(self) -> bool:
        return self.forest is not None

    def fit(self, slices: Mapping[Hashable, tuple[np.ndarray, np.ndarray]]) -> bool:
        """Train on the painted pixels (targets NEURON / MEMBRANE; IGNORE is unpainted) of ``key → (image,
        target)``. Returns whether the forest changed: it does not when no painted pixel did, and it stays
        unfitted while only one class is painted."""
        from sklearn.ensemble import RandomForestClassifier

        changed = set(self._pixels) - set(slices)
        for key in changed:
            del self._pixels[key]
        for key, (image, target) in slices.items():
            tag = hash(np.asarray(target).tobytes())
            if key in self._pixels and self._pixels[key][0] == tag:
                continue
            where = np.flatnonzero(np.asarray(target).ravel() != IGNORE)
            if len(where) > self.per_slice:
                where = np.sort(np.random.default_rng(self.seed).choice(where, self.per_slice, replace=False))
            features = pixel_features(image)
            self._pixels[key] = (tag, features.reshape(-1, features.shape[-1])[where], target.ravel()[where])
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

    def predict(self, image: np.ndarray) -> np.ndarray | None:
        """The neuron probability of one slice (float32), or None while the forest is not fitted."""
        if self.forest is None:
            return None
        features = pixel_features(image)
        prob = self.forest.predict_proba(features.reshape(-1, features.shape[-1]))
        return prob[:, list(self.forest.classes_).index(NEURON)].reshape(np.shape(image)).astype(np.float32)
