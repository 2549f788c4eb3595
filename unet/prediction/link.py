"""3D neurons from 2D instances: the instances of neighbouring slices are linked by overlap.

Two instances of neighbouring slices are one neuron when each is the other's best match (the one it
overlaps most) and their overlap covers at least ``min_overlap`` of the smaller of the two. The rule is
mutual, so an instance links to at most one instance per neighbour: a neuron that branches between two
slices continues in its larger branch and the other starts a neuron of its own, never a merge of two
neurons through one slice. Slices are linked pair by pair, so memory holds two slices at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

#: ``band(r0, r1)``: rows r0:r1 of one slice of instances.
Band = Callable[[int, int], np.ndarray]


def _counts(keys: list[np.ndarray], counts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sum counts per key over several (keys, counts) parts."""
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    return unique, np.bincount(inverse, weights=np.concatenate(counts), minlength=len(unique)).astype(np.int64)


def slice_links(lower: Band, upper: Band, height: int, band: int = 512,
                min_overlap: float = 0.5) -> tuple[np.ndarray, int, int]:
    """Pairs (label in the lower slice, label in the upper one) of instances that are one neuron, read in
    bands of ``band`` rows (``lower(r0, r1)`` gives rows r0:r1 of the lower slice); label 0 is background
    and never links. Also returns each slice's largest label."""
    la_parts, na_parts, lb_parts, nb_parts, pair_parts, overlap_parts = [], [], [], [], [], []
    max_a = max_b = 0
    for r in range(0, height, band):
        a, b = lower(r, min(r + band, height)).astype(np.int64), upper(r, min(r + band, height)).astype(np.int64)
        if a.shape != b.shape:
            raise ValueError(f"neighbouring slices differ in shape: {a.shape} and {b.shape}")
        max_a, max_b = max(max_a, int(a.max(initial=0))), max(max_b, int(b.max(initial=0)))
        for values, labels, areas in ((a, la_parts, na_parts), (b, lb_parts, nb_parts)):
            unique, count = np.unique(values[values > 0], return_counts=True)
            labels.append(unique)
            areas.append(count)
        both = (a > 0) & (b > 0)
        unique, count = np.unique(a[both] * (1 << 32) + b[both], return_counts=True)
        pair_parts.append(unique)
        overlap_parts.append(count)
    la, area_a = _counts(la_parts, na_parts)
    lb, area_b = _counts(lb_parts, nb_parts)
    pairs, overlap = _counts(pair_parts, overlap_parts)
    if not len(pairs):
        return np.zeros((0, 2), np.int64), max_a, max_b
    pa, pb = np.searchsorted(la, pairs >> 32), np.searchsorted(lb, pairs & ((1 << 32) - 1))
    # each side's best partner: in order of overlap, the last write for a label wins
    order = np.argsort(overlap, kind="stable")
    best_of_a = np.full(len(la), -1)
    best_of_a[pa[order]] = pb[order]
    best_of_b = np.full(len(lb), -1)
    best_of_b[pb[order]] = pa[order]
    mutual = (best_of_a[pa] == pb) & (best_of_b[pb] == pa)
    enough = overlap >= min_overlap * np.minimum(area_a[pa], area_b[pb])
    keep = mutual & enough
    return np.stack([la[pa[keep]], lb[pb[keep]]], axis=1), max_a, max_b


def link_stack(read: Callable[[int, int, int], np.ndarray], count: int, height: int, *,
               neighbours: Iterable[bool] | None = None, band: int = 512,
               min_overlap: float = 0.5) -> list[np.ndarray]:
    """The 3D neuron of every 2D instance of a stack of ``count`` slices of instances (``read(i, r0, r1)``
    gives rows r0:r1 of slice i; ``height`` rows a slice). ``neighbours[i]`` says whether slices i and i + 1
    touch (False where slices were skipped; by default all do). Returns, per slice, a lookup table:
    ``table[label]`` is that instance's neuron, numbered from 1 in the order neurons first appear
    (``table[0]`` is 0)."""
    touching = list(neighbours) if neighbours is not None else [True] * max(count - 1, 0)
    maxima: list[int | None] = [None] * count
    edges = []
    for i in range(count - 1):
        if touching[i]:  # (slices that do not touch are not compared: each is read once, for its largest label)
            pairs, maxima[i], maxima[i + 1] = slice_links(lambda r0, r1, i=i: read(i, r0, r1),
                                                          lambda r0, r1, i=i: read(i + 1, r0, r1), height, band,
                                                          min_overlap)
            edges.append((i, pairs))
    for i in range(count):
        if maxima[i] is None:
            maxima[i] = max(int(read(i, r, min(r + band, height)).max(initial=0)) for r in range(0, height, band))
    offsets = np.concatenate([[0], np.cumsum([m + 1 for m in maxima])]).astype(np.int64)
    nodes = int(offsets[-1])
    src = np.concatenate([offsets[i] + pairs[:, 0] for i, pairs in edges]) if edges else np.zeros(0, np.int64)
    dst = np.concatenate([offsets[i + 1] + pairs[:, 1] for i, pairs in edges]) if edges else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(src)), (src, dst)), shape=(nodes, nodes))
    _, component = connected_components(graph, directed=False)
    background = np.zeros(nodes, bool)
    background[offsets[:-1]] = True  # label 0 of every slice
    first = np.full(component.max() + 1, nodes)
    np.minimum.at(first, component[~background], np.flatnonzero(~background))
    used = first < nodes
    rank = np.zeros(len(first), np.int64)
    rank[used] = np.argsort(np.argsort(first[used])) + 1
    neuron = np.where(background, 0, rank[component])
    return [neuron[offsets[i]:offsets[i + 1]] for i in range(count)]


def link_volume(instances: np.ndarray, min_overlap: float = 0.5) -> np.ndarray:
    """A ``(Z, Y, X)`` stack of 2D instances as 3D neurons (int32, 0 stays 0)."""
    tables = link_stack(lambda i, r0, r1: instances[i, r0:r1], instances.shape[0], instances.shape[1],
                        min_overlap=min_overlap)
    return np.stack([table[instances[i]] for i, table in enumerate(tables)]).astype(np.int32)
