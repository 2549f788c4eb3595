"""Training data: normalised slices with their targets, and a patch sampler."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from unet.network.config import AugmentConfig
from unet.training.augment import augment_patch
from unet.training.labels import IGNORE, labels_to_target


def normalize_image(image: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per slice, as float32 (works the same for uint8, uint16 and float)."""
    image = np.asarray(image, dtype=np.float32)
    mean = float(image.mean(dtype=np.float64))
    std = float(image.std(dtype=np.float64))
    return (image - mean) / (std if std > 1e-6 else 1.0)


@dataclass
class TrainData:
    """Slices for training and validation. Images are raw (any supported dtype, normalised here);
    targets use NEURON / MEMBRANE / IGNORE (see :mod:`unet.training.labels`). Each side may mix slices of
    different sizes and from different stacks."""

    train_images: list[np.ndarray]
    train_targets: list[np.ndarray]
    val_images: list[np.ndarray] = field(default_factory=list)
    val_targets: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        for side, images, targets in (("training", self.train_images, self.train_targets),
                                      ("validation", self.val_images, self.val_targets)):
            if len(images) != len(targets):
                raise ValueError(f"{len(images)} {side} images but {len(targets)} targets")
            for i, (im, t) in enumerate(zip(images, targets, strict=True)):
                if im.ndim != 2 or im.shape != t.shape:
                    raise ValueError(
                        f"{side} slice {i}: image {im.shape} and target {t.shape} must be equal 2-D shapes"
                    )
                if t.dtype != np.uint8 or (t.size and t.max() > IGNORE):
                    raise ValueError(f"{side} slice {i}: targets are uint8 with values 0, 1 or {IGNORE}")
        if not self.train_images:
            raise ValueError("no training slices")
        if not any(np.any(t != IGNORE) for t in self.train_targets):
            raise ValueError("the training slices have no labelled pixels")
        self.train_images = [normalize_image(im) for im in self.train_images]
        self.val_images = [normalize_image(im) for im in self.val_images]

    @classmethod
    def from_stack(cls, volume: np.ndarray, labels: np.ndarray, train_slices: Sequence[int],
                   val_slices: Sequence[int] = (), *, encoded: bool = False) -> TrainData:
        """Build from a (Z, Y, X) stack and its labels (uploaded convention, or targets when
        ``encoded``). Slices used for both training and validation are refused."""
        if volume.shape != labels.shape:
            raise ValueError(f"labels {labels.shape} do not match the stack {volume.shape}")
        overlap = sorted(set(train_slices) & set(val_slices))
        if overlap:
            raise ValueError(f"slices {overlap} are in both the training and the validation set")
        targets = labels if encoded else labels_to_target(labels)
        return cls([volume[i] for i in train_slices], [targets[i] for i in train_slices],
                   [volume[i] for i in val_slices], [targets[i] for i in val_slices])


class PatchSampler:
    """Draws batches of augmented patches: network inputs ``in_size²`` and targets/weights of the
    centred ``out_size²`` output window at ``offset`` (for valid padding the input sees the paper's
    mirrored context around the output). Windows are placed around labelled pixels, so sparse scribbles
    are found; pixels outside the image are IGNORE."""

    def __init__(self, images: list[np.ndarray], targets: list[np.ndarray], in_size: int, out_size: int,
                 augment: AugmentConfig, rng: np.random.Generator,
                 weights: list[np.ndarray] | None = None, label_offset: tuple[float, float] = (0.0, 0.0),
                 windows: list[np.ndarray] | None = None):
        """``label_offset``: the labels' drawing convention kept through flips (see :func:`augment_patch`;
        the trainers measure or inherit it). ``windows``: boolean masks of where windows may be placed
        (default: the labelled pixels of ``targets``)."""
        self.in_size, self.out_size = in_size, out_size
        self.label_offset = tuple(label_offset)
        self.offset = (in_size - out_size) // 2
        self.augment, self.rng = augment, rng
        pad = in_size
        self.pad = pad
        self.images = [np.pad(im, pad, mode="reflect") if min(im.shape) > 1 else
                       np.pad(im, pad, mode="edge") for im in images]
        self.targets = [np.pad(t, pad, constant_values=IGNORE) for t in targets]
        self.weights = None
        if weights is not None:
            self.weights = [np.pad(w, pad, constant_values=0).astype(np.float32) for w in weights]
        self.shapes = [t.shape for t in targets]
        self.labelled = ([np.flatnonzero(np.asarray(m, bool).ravel()) for m in windows] if windows is not None
                         else [np.flatnonzero(t.ravel() != IGNORE) for t in targets])
        counts = np.array([len(i) for i in self.labelled], np.float64)
        if counts.sum() == 0:
            raise ValueError("no labelled pixels to sample from")
        self.p = counts / counts.sum()

    def target(self, k: int) -> np.ndarray:
        """Slice k's targets as they are sampled now (its own shape)."""
        h, w = self.shapes[k]
        return self.targets[k][self.pad:self.pad + h, self.pad:self.pad + w]

    def set_target(self, k: int, target: np.ndarray) -> None:
        """Slice k's targets from now on (a teacher's new answer on the unpainted pixels): same shape, same
        windows."""
        if target.shape != self.shapes[k]:
            raise ValueError(f"slice {k} is {self.shapes[k]}, the new targets {target.shape}")
        self.targets[k] = np.pad(target, self.pad, constant_values=IGNORE)

    def _window(self, k: int) -> tuple[int, int]:
        h, w = self.shapes[k]
        flat = self.labelled[k][self.rng.integers(len(self.labelled[k]))]
        y, x = divmod(int(flat), w)
        oy = y - int(self.rng.integers(self.out_size))
        ox = x - int(self.rng.integers(self.out_size))
        if h >= self.out_size:
            oy = min(max(oy, 0), h - self.out_size)
        if w >= self.out_size:
            ox = min(max(ox, 0), w - self.out_size)
        return oy, ox

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Return ``x (B, 1, in, in)`` float32, ``y (B, 1, out, out)`` uint8 and weights or None."""
        n, o, off = self.in_size, self.out_size, self.offset
        xs = np.empty((batch_size, 1, n, n), np.float32)
        ys = np.empty((batch_size, 1, o, o), np.uint8)
        ws = np.empty((batch_size, 1, o, o), np.float32) if self.weights is not None else None
        for b in range(batch_size):
            k = int(self.rng.choice(len(self.images), p=self.p))
            oy, ox = self._window(k)
            top, left = oy - off + self.pad, ox - off + self.pad
            window = (slice(top, top + n), slice(left, left + n))
            weights = self.weights[k][window] if self.weights is not None else None
            image, target, weights = augment_patch(
                self.images[k][window], self.targets[k][window], weights, self.augment, self.rng,
                self.label_offset)
            xs[b, 0] = image
            ys[b, 0] = target[off : off + o, off : off + o]
            if ws is not None and weights is not None:
                ws[b, 0] = weights[off : off + o, off : off + o]
        return xs, ys, ws
