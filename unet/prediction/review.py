"""Where a correction helps most (issue 29): a per-pixel uncertainty of a neuron probability map, the neurons
that look wrong next to their neighbouring slices, and regions of a slice ranked by the likely gain of a
correction there.

- :func:`margin` — the map's own doubt, ``1 − |2p − 1|``: 1 at p = 0.5, 0 at 0 or 1. With test-time flips the
  stored map is the mean of the eight, so where the flips disagree it sits near 0.5 and the margin says so.
- a live session's uncertainty (kept by :mod:`storage.jobs.live_worker`) is the larger of the margin and
  ``|a − b|`` of its predictions by two consecutive weights (what the last training changed it is unsure of).
- :func:`suspects` — neurons a person should look at: tiny fragments, and neurons that split or merge between
  this slice and a neighbour (one neuron here covers two there, or the other way round).
- :func:`rank_regions` — the slice cut in tiles, each scored by the doubt a few actions would settle there, the
  share of it that suspects cover, and whether anyone has corrected the slice; best first.

**The doubt a few actions settle.** A tool acts on one neuron at a time, so a correction teaches the network
about the neurons it touches. Given the slice's neurons (``objects``), a tile's doubt is the uncertainty summed
over its :data:`ACTIONS` most doubtful neurons (their part in the tile), per pixel of the tile; with no neuron
in the tile, its mean uncertainty. Mean uncertainty alone sends the user to thin, busy membranes, where every
neuron has a doubtful rim and each action labels few pixels (``docs/benchmarks.md``: the queue trailed random
order so).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

FRAGMENT = 64  # px: a neuron smaller than this is a fragment
SHARE = 0.25  # of a neuron's area that a neighbour's neuron must cover to count as its match
W_UNCERTAIN, W_SUSPECT, W_UNCORRECTED = 1.0, 0.5, 0.25  # how the signals add up in a region's score
ACTIONS = 3  # the actions a person does on one item before the next (what a tile's doubt counts)


def margin(prob: np.ndarray) -> np.ndarray:
    """The map's own doubt per pixel (float32 in [0, 1]): 1 where p = 0.5, 0 where p is 0 or 1."""
    p = np.asarray(prob, dtype=np.float32)
    return (1.0 - np.abs(2.0 * p - 1.0)).astype(np.float32)


def _areas(instances: np.ndarray) -> np.ndarray:
    return np.bincount(instances.ravel(), minlength=int(instances.max()) + 1)


def _covered_twice(here: np.ndarray, there: np.ndarray, share: float) -> set[int]:
    """Labels of ``here`` of which two or more neurons of ``there`` each cover at least ``share``."""
    both = (here > 0) & (there > 0)
    if not both.any():
        return set()
    pairs, counts = np.unique(np.stack([here[both], there[both]]).astype(np.int64), axis=1, return_counts=True)
    areas_there = _areas(there)
    # a neuron of ``there`` counts when it lies mostly inside this one (a real branch, not a grazing neighbour)
    real = counts >= share * areas_there[pairs[1]]
    labels, parts = np.unique(pairs[0][real], return_counts=True)
    return {int(k) for k in labels[parts >= 2]}


def suspects(instances: np.ndarray, below: np.ndarray | None = None, above: np.ndarray | None = None, *,
             fragment: int = FRAGMENT, share: float = SHARE) -> dict[int, str]:
    """The suspicious neurons of a slice (label → why): ``"fragment"`` (fewer than ``fragment`` pixels),
    ``"splits between slices"`` (two neurons of a neighbouring slice each lie mostly inside it: a merge here,
    or a split there) and ``"merges between slices"`` (it lies mostly inside one neuron of a neighbour that
    also holds another neuron of this slice). ``below``/``above`` are the neighbouring slices' instances."""
    found: dict[int, str] = {}
    areas = _areas(instances)
    for k in np.flatnonzero((areas > 0) & (areas < fragment)):
        if k:
            found[int(k)] = "fragment"
    for other in (below, above):
        if other is None:
            continue
        if other.shape != instances.shape:
            raise ValueError(f"neighbouring slices differ in shape: {instances.shape} and {other.shape}")
        for k in _covered_twice(instances, other, share):
            found.setdefault(k, "splits between slices")
        # the other way round: a neuron there that two neurons here lie mostly inside
        merged_there = _covered_twice(other, instances, share)
        if merged_there:
            inside = np.isin(other, list(merged_there)) & (instances > 0)
            for k in np.unique(instances[inside]):
                if areas[k] and np.count_nonzero(inside & (instances == k)) >= share * areas[k]:
                    found.setdefault(int(k), "merges between slices")
    return found


@dataclass(frozen=True)
class RegionScore:
    """A tile of a slice and why it is worth a correction."""

    y0: int
    x0: int
    h: int
    w: int
    score: float
    uncertainty: float  # the tile's mean uncertainty
    suspects: int  # suspicious neurons that reach into the tile
    uncorrected: bool  # nobody has saved a mask of the slice

    @property
    def reasons(self) -> str:
        parts = [f"uncertainty {self.uncertainty:.2f}"]
        if self.suspects:
            parts.append(f"{self.suspects} suspicious neuron(s)")
        if self.uncorrected:
            parts.append("never corrected")
        return ", ".join(parts)


def tile_size(shape: tuple[int, int], tiles: int = 4) -> int:
    """A tile about 1/``tiles`` of the slice's longer side, at least 64 px (what Annotate's zoom of
    ``tiles`` shows of the slice)."""
    return max(64, -(-max(shape) // tiles))


def objects_of(prob: np.ndarray) -> np.ndarray:
    """The neurons of a probability map as :func:`rank_regions` counts them: connected pixels above 0.5 (cheap
    on a 4096² slice, where the watershed of the tools would take seconds per slice)."""
    return ndi.label(np.asarray(prob) > 0.5)[0]


def _doubt(u: np.ndarray, objects: np.ndarray | None, actions: int) -> float:
    """A tile's doubt that ``actions`` actions settle (see the module's text)."""
    if objects is None or not objects.any():
        return float(u.mean())
    mass = np.bincount(objects.ravel(), weights=u.ravel())[1:]  # each neuron's uncertainty in the tile
    k = min(actions, mass.size)
    return float(np.partition(mass, mass.size - k)[-k:].sum() / u.size)


def rank_regions(uncertainty: np.ndarray, *, suspect_mask: np.ndarray | None = None,
                 suspect_labels: np.ndarray | None = None, uncorrected: bool = False, tile: int | None = None,
                 known: np.ndarray | None = None, objects: np.ndarray | None = None,
                 actions: int = ACTIONS) -> list[RegionScore]:
    """The tiles of a slice, best first. A tile's score is ``W_UNCERTAIN`` × its doubt (with ``objects``, the
    slice's neurons, the uncertainty of its ``actions`` most doubtful neurons per pixel of the tile, else its
    mean uncertainty) + ``W_SUSPECT`` × the share of it covered by suspicious neurons (``suspect_mask``;
    ``suspect_labels`` the instance map, to count them) + ``W_UNCORRECTED`` when the slice has no saved mask.
    Pixels outside ``known`` (a live prediction's never-predicted rest) count as uncertainty 0."""
    if uncertainty.ndim != 2:
        raise ValueError(f"an uncertainty map is one slice, got shape {uncertainty.shape}")
    if objects is not None and objects.shape != uncertainty.shape:
        raise ValueError(f"neurons of shape {objects.shape} for an uncertainty map of shape {uncertainty.shape}")
    height, width = uncertainty.shape
    tile = tile or tile_size((height, width))
    u = np.asarray(uncertainty, np.float32)
    if known is not None:
        u = np.where(known, u, 0.0)
    out = []
    # tiles of about equal size, none larger than ``tile`` (a 700-row slice of 225-px tiles left a strip of 25
    # rows, whose few pixels made its per-pixel scores the first of the queue)
    rows = np.linspace(0, height, -(-height // tile) + 1).round().astype(int)
    cols = np.linspace(0, width, -(-width // tile) + 1).round().astype(int)
    for y0, y1 in zip(rows[:-1].tolist(), rows[1:].tolist(), strict=True):
        for x0, x1 in zip(cols[:-1].tolist(), cols[1:].tolist(), strict=True):
            box = (slice(y0, y1), slice(x0, x1))
            mean_u = float(u[box].mean())
            doubt = _doubt(u[box], None if objects is None else objects[box], actions)
            share, count = 0.0, 0
            if suspect_mask is not None:
                share = float(suspect_mask[box].mean())
                if suspect_labels is not None and share:
                    count = len(np.unique(suspect_labels[box][suspect_mask[box]]))
            score = W_UNCERTAIN * doubt + W_SUSPECT * share + (W_UNCORRECTED if uncorrected else 0.0)
            out.append(RegionScore(y0, x0, box[0].stop - y0, box[1].stop - x0, score, mean_u, count, uncorrected))
    out.sort(key=lambda r: (-r.score, r.y0, r.x0))
    return out


def suspect_mask(instances: np.ndarray, found: dict[int, str]) -> np.ndarray:
    """The pixels of the suspicious neurons ``found``."""
    if not found:
        return np.zeros(instances.shape, bool)
    lookup = np.zeros(int(instances.max()) + 1, bool)
    lookup[[k for k in found if k <= instances.max()]] = True
    return lookup[instances]

