"""Label conventions.

Uploaded labels follow ISBI 2012: white (255, or 1, or True) = neuron interior, black (0) = membrane.
Inside Neuroseg a *target* is a uint8 image with ``NEURON = 1``, ``MEMBRANE = 0`` and ``IGNORE = 2`` for
pixels nobody labelled: the loss and the metrics skip them, so a few scribbles are already training data.
Instance label images (0 = background/membrane, one integer per neuron) are turned into targets by
drawing the membranes between touching instances.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

MEMBRANE = 0
NEURON = 1
IGNORE = 2


def is_binary(labels: np.ndarray) -> bool:
    """True for bool images and images whose values are a subset of {0, 1} or of {0, 255}."""
    if labels.dtype == np.bool_:
        return True
    values = np.unique(labels)
    return set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}


# How an uploaded label file is read (the upload form names them; "auto" tells binary from neuron ids)
LABEL_SCHEMES = {
    "auto": "detect: white (255 or 1) = neuron and 0 = membrane, or one id per neuron",
    "binary": "binary: any value but 0 = neuron, 0 = membrane",
    "instances": "neuron ids: one id per neuron, 0 = membrane",
    "classes-neuron-first": "classes (ilastik): 1 = neuron, 2 = membrane, 0 = not labelled",
    "classes-membrane-first": "classes (ilastik): 1 = membrane, 2 = neuron, 0 = not labelled",
}
FEW_IDS = 3  # a slice of at most this many values besides 0, all small (classes) or with 255 (a mask with
# grey levels), is not read as neuron ids by "auto": it asks


def label_kind(labels: np.ndarray) -> str:
    """How "auto" reads a slice: ``binary`` or ``instances``; :class:`ValueError` when it cannot tell: a
    slice of at most three values besides 0 that are classes (ilastik's 1 and 2) or a mask with grey levels
    (0, 128, 255) must be named by whoever uploads it. A few neurons with ids like 7 and 9 are ids."""
    if is_binary(labels):
        return "binary"
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if len(ids) <= FEW_IDS and (ids.max() <= FEW_IDS or ids.max() == 255):
        shown = ", ".join(str(v) for v in [0, *ids.tolist()])
        raise ValueError(f"the labels hold only the values {shown}: that is not a binary mask (0 and 255, or 0 "
                         "and 1) nor neurons one id each. If they are classes (ilastik saves 1 and 2, 0 = not "
                         "labelled) or neuron ids, say which under 'Labels are' and upload again")
    return "instances"


def labels_to_target(labels: np.ndarray, scheme: str = "auto", *, ask: bool = False) -> np.ndarray:
    """Turn uploaded labels into a target of the same shape, read as ``scheme`` (:data:`LABEL_SCHEMES`):
    binary (0/255, 0/1, bool) or instance labels give ``NEURON``/``MEMBRANE`` only, classes give ``IGNORE``
    where nothing is labelled. Works on a slice or a stack. "auto" tells binary from instance labels; with
    ``ask`` (an upload, whose form can say how to read them) it refuses a slice it cannot tell
    (:func:`label_kind`), else such a slice is read as neuron ids (the command line, benchmarks, training
    files)."""
    labels = np.asarray(labels)
    if scheme not in LABEL_SCHEMES:
        raise ValueError(f"labels are read as one of {', '.join(LABEL_SCHEMES)}, not {scheme!r}")
    if labels.dtype.kind == "f":
        raise ValueError("labels must be integers or booleans, not floating point")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0 (0 = membrane/background, one id per neuron)")
    if scheme.startswith("classes"):
        if labels.size and labels.max() > 2:
            raise ValueError(f"class labels are 0 (not labelled), 1 and 2, but these hold {int(labels.max())}")
        neuron, membrane = (1, 2) if scheme == "classes-neuron-first" else (2, 1)
        target = np.full(labels.shape, IGNORE, np.uint8)
        target[labels == neuron], target[labels == membrane] = NEURON, MEMBRANE
        return target
    if scheme == "auto":
        kind = label_kind(labels) if ask and labels.ndim == 2 else "binary" if is_binary(labels) else "instances"
    else:
        kind = scheme
    if kind == "binary":
        return (labels > 0).astype(np.uint8)
    if labels.ndim == 3:  # (asked: each slice is told apart by itself)
        return np.stack([labels_to_target(s, scheme if ask else kind, ask=ask) for s in labels])
    return instances_to_target(labels)


def instances_to_target(instances: np.ndarray) -> np.ndarray:
    """A 2-D instance label image → target: neuron inside instances, membrane on background (0) and on
    both sides of every border where two instances touch (4-neighbours), so touching cells stay apart."""
    if instances.ndim != 2:
        raise ValueError(f"instances_to_target works on one slice, got shape {instances.shape}")
    padded = np.pad(instances, 1)
    inside = instances > 0
    touching = np.zeros(instances.shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        neighbour = padded[dy : dy + instances.shape[0], dx : dx + instances.shape[1]]
        touching |= (neighbour != instances) & (neighbour > 0)
    return (inside & ~touching).astype(np.uint8)


def target_to_instances(target: np.ndarray) -> np.ndarray:
    """Ground-truth neuron instances: 4-connected components of ``NEURON`` pixels (int32, 0 elsewhere)."""
    if target.ndim != 2:
        raise ValueError(f"target_to_instances works on one slice, got shape {target.shape}")
    instances, _ = ndi.label(target == NEURON)
    return instances.astype(np.int32)


def border_weights(target: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """The U-Net paper's weight map ``1 + w0·exp(-(d1 + d2)² / 2σ²)`` on membrane pixels, where d1 and
    d2 are the distances to the nearest and second-nearest neuron: thin membranes between two cells
    weigh most. Neuron pixels weigh 1; IGNORE pixels weigh 0."""
    if target.ndim != 2:
        raise ValueError(f"border_weights works on one slice, got shape {target.shape}")
    weights = np.ones(target.shape, np.float32)
    instances = target_to_instances(target)
    n = int(instances.max())
    if n >= 2 and w0 > 0:
        d1 = np.full(target.shape, np.inf, np.float32)
        d2 = np.full(target.shape, np.inf, np.float32)
        reach = int(np.ceil(3 * sigma)) + 1  # beyond this the exponential is negligible
        for idx, sl in enumerate(ndi.find_objects(instances), start=1):
            if sl is None:
                continue
            box = tuple(slice(max(s.start - reach, 0), s.stop + reach) for s in sl)
            d = ndi.distance_transform_edt(instances[box] != idx).astype(np.float32)
            a, b = d1[box], d2[box]
            closer = d < a
            b[:] = np.where(closer, a, np.minimum(b, d))
            a[:] = np.where(closer, d, a)
        border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
        membrane = target == MEMBRANE
        weights[membrane] += np.nan_to_num(border[membrane], nan=0.0, posinf=0.0)
    weights[target == IGNORE] = 0
    return weights


def slice_label_offset(image: np.ndarray, target: np.ndarray, sigma: float = 1.0) -> tuple[float, float]:
    """The sub-pixel ``(dy, dx)`` that moves ``image``'s membranes (its dark lines) onto the membrane labels
    of ``target``, by phase correlation to 1/20 px (scikit-image's ``phase_cross_correlation``). Labels
    drawn exactly on the membranes give (0, 0); ISBI 2012's sit about 0.6 px above theirs."""
    from skimage.registration import phase_cross_correlation  # keeps skimage.registration out of the server process

    dark = -ndi.gaussian_filter(image.astype(np.float32), sigma)
    membrane = (target == MEMBRANE).astype(np.float32)
    shift, _, _ = phase_cross_correlation((membrane - membrane.mean()) / (membrane.std() + 1e-9),
                                          (dark - dark.mean()) / (dark.std() + 1e-9),
                                          upsample_factor=20, normalization=None)
    return float(shift[0]), float(shift[1])


#: What :func:`label_offset` asks of a slice before it measures it, and of the slices' answers.
DENSE = 0.9  # share of the slice's pixels labelled
SPREAD = 0.25  # px: the slices' offsets must agree this well (standard deviation per axis)
SMALLEST = 0.05  # px: a smaller offset is no offset


def is_dense(target: np.ndarray) -> bool:
    """Whether a slice is labelled all over (:data:`DENSE`) with both classes: what :func:`label_offset`
    measures. Scribbles say nothing about where a border is drawn."""
    return bool(np.mean(target != IGNORE) >= DENSE and 0 < np.mean(target == MEMBRANE) < 1)


def offset_words(offset) -> str | None:
    """Where labels drawn with ``offset`` (dy, dx) sit against the membranes, in words ("0.57 px above and
    0.17 px left of"); None for no offset."""
    dy, dx = (float(v) for v in (offset or (0.0, 0.0)))
    if not (dy or dx):
        return None
    return (f"{abs(dy):.2f} px {'above' if dy < 0 else 'below'} and {abs(dx):.2f} px "
            f"{'left of' if dx < 0 else 'right of'}")


def agreed_offset(found: list[tuple[float, float]]) -> tuple[float, float] | None:
    """One convention from the slices' offsets: their median, None when there are none or they disagree
    (:data:`SPREAD`), (0, 0) when under :data:`SMALLEST`."""
    if not found:
        return None
    values = np.array(found, np.float64)
    if len(values) > 1 and values.std(axis=0).max() > SPREAD:
        return None
    dy, dx = np.median(values, axis=0)
    if max(abs(dy), abs(dx)) < SMALLEST:
        return (0.0, 0.0)
    return (round(float(dy), 3), round(float(dx), 3))


def central(image: np.ndarray, target: np.ndarray, crop: int = 1024) -> tuple[float, float]:
    """:func:`slice_label_offset` on the central ``crop``² window (the convention is the same all over)."""
    y0, x0 = max((target.shape[0] - crop) // 2, 0), max((target.shape[1] - crop) // 2, 0)
    window = (slice(y0, y0 + crop), slice(x0, x0 + crop))
    return slice_label_offset(image[window], target[window])


def label_offset(images: list[np.ndarray], targets: list[np.ndarray], most: int = 8) -> tuple[float, float] | None:
    """The labels' drawing convention: where the fully labelled slices (:func:`is_dense`; at most ``most`` of
    them, spread over the list) put the membranes against the image, as :func:`agreed_offset` of their
    :func:`central` offsets. None when no slice is fully labelled or they disagree: nothing to keep."""
    dense = [k for k, t in enumerate(targets) if is_dense(t)]
    step = max(len(dense) // most, 1)
    return agreed_offset([central(images[k], targets[k]) for k in dense[::step][:most]])
