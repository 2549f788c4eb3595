"""Corrections by the object, not the pixel (issue 29): each tool takes the edit's label mask (MEMBRANE,
NEURON or IGNORE per pixel, :mod:`unet.training.labels`) and the neurons of the prediction shown (an instance
map: 0 nothing, ``k`` the k-th neuron, as :func:`unet.prediction.postprocess.segment` makes them) and returns
the mask as the tool leaves it, a new array (the one given is never written). Every tool works inside the
bounding box of what it touches, so an action costs what the object costs, not what the slice costs (a
4096² slice is 16 M pixels; a neuron a few thousand).

- :func:`accept` — a neuron becomes NEURON, with a ring of MEMBRANE along its border: what the prediction calls
  membrane of it (a watershed gives every pixel to a neuron), else ``ring`` pixels wide;
  :func:`accept_confident` does it for every neuron whose mean probability clears a threshold.
- :func:`merge` — two neighbours: the membrane between them becomes NEURON.
- :func:`split_seeds` — two (or more) seeds inside one neuron: a seeded watershed on the boundary map inside
  that neuron draws the new membrane; :func:`split_line` draws it along a line across the neuron.
- :func:`erase` — a false neuron becomes MEMBRANE (or IGNORE: "unlabelled").
- :func:`fill` — the connected region of equal labels under a click takes a label (IGNORE: "don't know")."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import line as draw_line
from skimage.segmentation import flood, watershed

from unet.training.labels import IGNORE, MEMBRANE, NEURON

RING = 2  # px of membrane an accepted neuron gets along its border
CONTACT = 3  # px either side of the border of two merged neighbours that become neuron
SNAP = 4  # px: a click on a membrane takes the neuron nearest to it within this distance

Box = tuple[slice, slice]


def _box(where: np.ndarray, pad: int) -> Box | None:
    """The bounding box of ``where``'s True pixels, grown by ``pad`` and clipped to the array."""
    rows, cols = np.flatnonzero(where.any(axis=1)), np.flatnonzero(where.any(axis=0))
    if not rows.size:
        return None
    h, w = where.shape
    return (slice(max(0, rows[0] - pad), min(h, rows[-1] + pad + 1)),
            slice(max(0, cols[0] - pad), min(w, cols[-1] + pad + 1)))


def _label_box(instances: np.ndarray, label: int, pad: int) -> Box:
    box = _box(instances == label, pad)
    if box is None:
        raise ValueError(f"there is no neuron {label} on this slice")
    return box


def _check_point(shape: tuple[int, ...], y: int, x: int) -> None:
    """A click must lie on the slice (a negative index would silently wrap around to the other side)."""
    h, w = shape[:2]
    if not (0 <= y < h and 0 <= x < w):
        raise ValueError(f"({y}, {x}) is outside the slice ({h} × {w})")


def object_at(instances: np.ndarray, y: int, x: int, snap: int = SNAP) -> int:
    """The neuron under a click at (``y``, ``x``); on a membrane (label 0) the nearest neuron within ``snap``
    pixels; 0 when there is none."""
    _check_point(instances.shape, y, x)
    if instances[y, x]:
        return int(instances[y, x])
    near = instances[max(0, y - snap):y + snap + 1, max(0, x - snap):x + snap + 1]
    found = np.argwhere(near > 0)
    if not found.size:
        return 0
    centre = np.array([min(y, snap), min(x, snap)])
    nearest = found[np.argmin(((found - centre) ** 2).sum(axis=1))]
    return int(near[tuple(nearest)])


def _accept_in(out: np.ndarray, inside: np.ndarray, ring: int, prob: np.ndarray | None = None) -> None:
    """``inside`` accepted in ``out``: with ``prob``, its pixels the prediction calls neuron are NEURON and its
    pixels it calls membrane (the neuron's half of the membrane around it: a watershed gives every pixel to
    a neuron) are MEMBRANE; without, or where it calls none of them membrane, a ring ``ring`` pixels wide."""
    if prob is not None:
        membrane = inside & (prob <= 0.5)
        if membrane.any():
            out[membrane] = MEMBRANE
            out[inside & ~membrane] = NEURON
            return
    core = ndi.binary_erosion(inside, iterations=ring, border_value=1) if ring else inside
    out[inside] = MEMBRANE
    out[core] = NEURON


def accept(mask: np.ndarray, instances: np.ndarray, label: int, ring: int = RING,
           prob: np.ndarray | None = None) -> np.ndarray:
    """Neuron ``label`` accepted: its pixels NEURON, but for a ring of MEMBRANE along its border with the
    other neurons: with the prediction's probabilities ``prob``, the pixels of it the prediction calls
    membrane; without, ``ring`` pixels wide (a neuron that fills a whole box keeps its border with the slice)."""
    out = mask.copy()
    box = _label_box(instances, label, 1)
    inside = instances[box] == label
    part = out[box]
    _accept_in(part, inside, ring, None if prob is None else prob[box])
    return out


def accept_confident(mask: np.ndarray, instances: np.ndarray, prob: np.ndarray, threshold: float = 0.9,
                     ring: int = RING) -> tuple[np.ndarray, list[int]]:
    """Every neuron whose mean neuron probability is at least ``threshold``, accepted as :func:`accept`
    does with ``prob``. Returns (the mask, the labels accepted)."""
    if prob.shape != instances.shape:
        raise ValueError(f"the probabilities are {prob.shape}, the neurons {instances.shape}")
    n = int(instances.max())
    if n == 0:
        return mask.copy(), []
    sums = np.bincount(instances.ravel(), weights=prob.ravel().astype(np.float64), minlength=n + 1)
    counts = np.bincount(instances.ravel(), minlength=n + 1)
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    chosen = [k for k in range(1, n + 1) if counts[k] and means[k] >= threshold]
    out, wanted = mask.copy(), set(chosen)
    for k, box in enumerate(ndi.find_objects(instances), start=1):
        if box is not None and k in wanted:
            _accept_in(out[box], instances[box] == k, ring, prob[box])
    return out, chosen


def merge(mask: np.ndarray, instances: np.ndarray, a: int, b: int, contact: int = CONTACT) -> np.ndarray:
    """Neurons ``a`` and ``b`` are one: the pixels within ``contact`` of both (the membrane between them)
    become NEURON, and so do membrane pixels no neuron took there. ValueError when they do not touch (no
    pixel is within ``contact`` of both)."""
    if a == b or 0 in (a, b):
        raise ValueError("choose two different neurons")
    if contact < 1:
        raise ValueError("the contact is at least one pixel")
    out = mask.copy()
    box = _box((instances == a) | (instances == b), contact + 1)
    if box is None:
        raise ValueError(f"there are no neurons {a} and {b} on this slice")
    near_a = ndi.binary_dilation(instances[box] == a, iterations=contact)
    near_b = ndi.binary_dilation(instances[box] == b, iterations=contact)
    between = near_a & near_b & np.isin(instances[box], (a, b, 0))  # (0: a membrane no neuron took)
    if not between.any():
        raise ValueError(f"neurons {a} and {b} do not touch")
    out[box][between] = NEURON
    return out


def _between_parts(parts: np.ndarray) -> np.ndarray:
    """The pixels with a 4-neighbour in another part (0 is no part: the border with it is no cut)."""
    cut = np.zeros(parts.shape, bool)
    for a, b, ca, cb in ((parts[:-1], parts[1:], cut[:-1], cut[1:]), (parts[:, :-1], parts[:, 1:], cut[:, :-1],
                                                                      cut[:, 1:])):
        differ = (a != b) & (a > 0) & (b > 0)
        ca |= differ
        cb |= differ
    return cut


def split_seeds(mask: np.ndarray, instances: np.ndarray, boundary: np.ndarray,
                seeds: Sequence[tuple[int, int]]) -> np.ndarray:
    """The neuron under the seeds cut in as many parts as there are seeds: a watershed of ``boundary`` (high
    on membranes, e.g. 1 − the neuron probability) from the seeds, inside that neuron only; the border
    between the parts becomes MEMBRANE, one pixel either side."""
    if len(seeds) < 2:
        raise ValueError("a split needs two seeds")
    for y, x in seeds:
        _check_point(instances.shape, y, x)
    labels = {int(instances[y, x]) for y, x in seeds}
    if len(labels) != 1 or 0 in labels:
        raise ValueError("put every seed inside the same neuron")
    label = labels.pop()
    box = _label_box(instances, label, 1)
    inside = instances[box] == label
    markers = np.zeros(inside.shape, np.int32)
    for i, (y, x) in enumerate(seeds, start=1):
        markers[y - box[0].start, x - box[1].start] = i
    parts = watershed(boundary[box].astype(np.float32), markers, mask=inside)
    cut = _between_parts(parts)
    out = mask.copy()
    out[box][cut] = MEMBRANE
    return out


def split_line(mask: np.ndarray, instances: np.ndarray, points: Sequence[tuple[int, int]],
               width: int = 1) -> np.ndarray:
    """A membrane drawn along the polyline ``points`` (y, x), ``width`` pixels either side, inside the
    neurons it crosses only (the rest of the slice is left as it is)."""
    if len(points) < 2:
        raise ValueError("a line needs two points")
    h, w = instances.shape
    drawn = np.zeros((h, w), bool)
    for (y0, x0), (y1, x1) in pairwise(points):
        rr, cc = draw_line(int(y0), int(x0), int(y1), int(x1))
        keep = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        drawn[rr[keep], cc[keep]] = True
    box = _box(drawn, width + 1)
    if box is None:
        raise ValueError("the line lies outside the slice")
    band = ndi.binary_dilation(drawn[box], iterations=width) if width else drawn[box]
    crossed = band & (instances[box] > 0)
    out = mask.copy()
    out[box][crossed] = MEMBRANE
    return out


def erase(mask: np.ndarray, instances: np.ndarray, label: int, value: int = MEMBRANE) -> np.ndarray:
    """A false neuron: its pixels become ``value`` (MEMBRANE, or IGNORE for "unlabelled")."""
    if value not in (MEMBRANE, IGNORE):
        raise ValueError("erase makes a neuron membrane or unlabelled")
    out = mask.copy()
    box = _label_box(instances, label, 0)
    out[box][instances[box] == label] = value
    return out


def fill(mask: np.ndarray, y: int, x: int, value: int) -> np.ndarray:
    """The connected region of pixels labelled as (``y``, ``x``) is (4-connected) takes ``value``
    (IGNORE: "don't know")."""
    if value not in (MEMBRANE, NEURON, IGNORE):
        raise ValueError(f"{value} is not a label")
    _check_point(mask.shape, y, x)
    out = mask.copy()
    out[flood(mask, (int(y), int(x)), connectivity=1)] = value
    return out
