"""The array stitching of a blockwise prediction (beside :mod:`unet.prediction.link`, which links slices):
the tiles of a large slice joined into one slice of instances (:func:`stitch`), and, once every slice is
finished, the 2D instances of neighbouring slices linked into 3D neurons (:func:`link_neurons`).

When all tiles of a slice are done, the slice is *stitched*: an instance of one tile and one of its
neighbour that cover the same pixels of their shared band (:func:`neighbour_bands`; intersection over union
above 1/2) are one neuron; the slice's instances are then numbered 1… and written, and its raw labels
deleted. Stitching only reads the raw labels, so a stitch that is killed simply runs again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from zarr.storage import LocalStore

from unet.exchange.writing import atomic_write
from unet.prediction.blocks import (
    Block,
    BlockJob,
    marker_path,
    output_path,
    raw_path,
    read_marker,
    slice_blocks,
    write_slice,
)
from unet.prediction.link import link_stack
from unet.prediction.metrics import contingency


def neighbour_bands(block: Block, shape: tuple[int, int], halo: int) -> dict[str, tuple[int, int, int, int]]:
    """The bands ``block`` shares with its neighbours below and to the right, and above and to the left:
    (y0, y1, x0, x1) in slice pixels, ``halo`` either side of the shared edge."""
    (y0, y1), (x0, x1), (height, width) = block.rows, block.cols, shape
    ry0, ry1, rx0, rx1 = max(0, y0 - halo), min(height, y1 + halo), max(0, x0 - halo), min(width, x1 + halo)
    bands = {}
    if y0 > 0:
        bands["top"] = (y0 - halo, min(y0 + halo, ry1), rx0, rx1)
    if y1 < height:
        bands["bottom"] = (max(y1 - halo, ry0), ry1, rx0, rx1)
    if x0 > 0:
        bands["left"] = (ry0, ry1, x0 - halo, min(x0 + halo, rx1))
    if x1 < width:
        bands["right"] = (ry0, ry1, max(x1 - halo, rx0), rx1)
    return bands


def _matches(a: np.ndarray, a_at: np.ndarray, b: np.ndarray, b_at: np.ndarray) -> np.ndarray:
    """Pairs (label of a, label of b) that cover the same pixels where the two bands overlap: their
    intersection over union there is above 1/2 (each label of a then pairs with one label of b at most)."""
    y0, x0 = max(a_at[0], b_at[0]), max(a_at[1], b_at[1])
    y1, x1 = min(a_at[0] + a.shape[0], b_at[0] + b.shape[0]), min(a_at[1] + a.shape[1], b_at[1] + b.shape[1])
    if y1 <= y0 or x1 <= x0:
        return np.zeros((0, 2), np.int64)
    ua, area_a, ub, area_b, pa, pb, counts = contingency(a[y0 - a_at[0]:y1 - a_at[0], x0 - a_at[1]:x1 - a_at[1]],
                                                         b[y0 - b_at[0]:y1 - b_at[0], x0 - b_at[1]:x1 - b_at[1]])
    iou = counts / (area_a[pa] + area_b[pb] - counts)
    keep = iou > 0.5
    return np.stack([ua[pa[keep]], ub[pb[keep]]], axis=1)


def _stream_digest(path: Path, index: int, height: int, band: int) -> str:
    """sha256 of output slice ``index`` in C order, read in bands of rows (the digest of the whole slice)."""
    array = zarr.open_array(LocalStore(path), path="0", mode="r")
    digest = hashlib.sha256()
    for r in range(0, height, band):
        digest.update(np.ascontiguousarray(array[index, r:r + band]).data)
    return digest.hexdigest()


def stitch(job: BlockJob, index: int, shape: tuple[int, int], *_tiles: Any) -> dict[str, Any]:
    """Finish output slice ``index`` once all its tiles are done: join the instances its tiles share,
    number them 1… into the instances output, combine the tiles' scores, write the slice's marker and
    remove what the tiles left. (``_tiles``: the tiles' results, only so a cluster runs this after them.)"""
    marker = marker_path(job, index)
    if marker.is_file():
        return json.loads(marker.read_text())
    blocks = slice_blocks(job, index, shape)
    folder = Path(job.out) / "blocks"
    records = [read_marker(marker_path(job, b.key)) for b in blocks]
    if any(r is None for r in records):
        raise RuntimeError(f"slice {job.slices[index]}: a tile is not finished; it cannot be stitched yet")
    if job.with_instances:
        bands = {b.part: dict(np.load(folder / f"{b.key}.npz")) for b in blocks}
        per_row = -(-shape[1] // job.tile)
        pairs = []
        for b in blocks:
            mine = bands[b.part]
            if "right" in mine:
                other = bands[b.part + 1]
                pairs.append(_matches(mine["right"], mine["right_at"], other["left"], other["left_at"]))
            if "bottom" in mine:
                other = bands[b.part + per_row]
                pairs.append(_matches(mine["bottom"], mine["bottom_at"], other["top"], other["top_at"]))
        labels = np.unique(np.concatenate([bands[b.part]["core"] for b in blocks]))
        pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
        # only labels found in some tile's core are written; a pair outside them joins nothing written
        inside = np.isin(pairs[:, 0], labels) & np.isin(pairs[:, 1], labels)
        a, b = np.searchsorted(labels, pairs[inside, 0]), np.searchsorted(labels, pairs[inside, 1])
        graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(labels), len(labels)))
        _, component = connected_components(graph, directed=False)
        # number the neurons by their first label's place (row-major tiles, then the watershed's order)
        first = np.full(component.max() + 1 if len(component) else 0, len(labels))
        np.minimum.at(first, component, np.arange(len(labels)))
        order = np.argsort(np.argsort(first))
        final = (order[component] + 1).astype(np.int32)
        raw = zarr.open_array(LocalStore(raw_path(job, index)), mode="r")
        out = output_path(job.out, "instances")
        for r in range(0, shape[0], job.chunk):
            band = raw[r:r + job.chunk]
            write_slice(out, index, final[np.searchsorted(labels, band)], (r, min(r + job.chunk, shape[0])),
                        (0, shape[1]))
    band_rows = max(1, (64 << 20) // (shape[1] * 4))
    digests = {name: _stream_digest(output_path(job.out, name), index, shape[0], band_rows) for name in job.outputs}
    scores = tile_scores([r for r in records if r["scores"]])
    errors = sorted((e for r in records for e in r.get("errors", [])), key=lambda e: -e["pixels"])[:10]
    record = {"slice": job.slices[index], "sha256": digests, "scores": scores, "tiles": len(blocks), "errors": errors}
    atomic_write(marker, lambda fh: fh.write(json.dumps(record).encode()))
    shutil.rmtree(raw_path(job, index), ignore_errors=True)
    for b in blocks:
        for leftover in (folder / f"{b.key}.npz", marker_path(job, b.key)):
            leftover.unlink(missing_ok=True)
    (folder / f"{index}.stats.json").unlink(missing_ok=True)
    return record


def tile_scores(scored: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A tiled slice's scores from its tiles' (each weighted by its labelled pixels): each score over the tiles
    that have it (a tile whose labels hold too few whole neurons has pixel scores only, and its NaN no longer
    spoils the slice's), the ISBI curves threshold by threshold. None when no tile was scored."""
    if not scored:
        return None
    weights = np.array([r["labelled"] for r in scored], np.float64)

    def mean(table: list[list[float]]) -> np.ndarray:  # per column, over the tiles with a finite value
        values = np.array(table, np.float64)
        use = weights[:, None] * np.isfinite(values)
        total = use.sum(axis=0)
        return np.where(total > 0, (np.where(use > 0, values, 0.0) * use).sum(axis=0) / np.maximum(total, 1e-300),
                        np.nan)

    def scalar(record: dict[str, Any], key: str) -> float:
        value = record["scores"].get(key)
        return value if isinstance(value, int | float) else np.nan

    keys = sorted({k for r in scored for k, v in r["scores"].items() if isinstance(v, int | float)})
    means = mean([[scalar(r, k) for k in keys] for r in scored]) if keys else []
    scores: dict[str, Any] = {k: float(v) for k, v in zip(keys, means, strict=True) if np.isfinite(v)}
    curves = [r["scores"].get("isbi_curve") for r in scored]
    if any(isinstance(c, dict) for c in curves):
        blank = [np.nan] * len(next(c for c in curves if isinstance(c, dict))["v_rand"])
        scores["isbi_curve"] = {key: [float(v) for v in mean([c[key] if isinstance(c, dict) else blank
                                                              for c in curves])] for key in ("v_rand", "v_info")}
    return scores


def link_neurons(job: BlockJob, shape: tuple[int, int], largest: int = 20) -> dict[str, Any]:
    """Once every slice is finished: link the 2D instances of neighbouring predicted slices into 3D neurons
    (:func:`unet.prediction.link.link_stack`, two slices in memory at a time, in bands of rows), write them as the
    ``neurons`` output and return (and keep, in ``blocks/neurons.json``) their count, the ``largest``
    of them with their voxels, and the output's digest. Slices that were not predicted break the chain."""
    marker = Path(job.out) / "blocks" / "neurons.json"
    known = read_marker(marker)
    if known is not None:
        return known
    height, band = shape[0], job.chunk
    instances = zarr.open_array(LocalStore(output_path(job.out, "instances")), path="0", mode="r")
    neighbours = [b - a == 1 for a, b in zip(job.slices, job.slices[1:], strict=False)]
    tables = link_stack(lambda i, r0, r1: np.asarray(instances[i, r0:r1]), len(job.slices), height,
                        neighbours=neighbours, band=band)
    count = max((int(t.max(initial=0)) for t in tables), default=0)
    voxels = np.zeros(count + 1, np.int64)
    out = output_path(job.out, "neurons")
    digest = hashlib.sha256()
    for i, table in enumerate(tables):
        of_slice = hashlib.sha256()  # the slice's digest as the other outputs' (its bytes in C order)
        for r in range(0, height, band):
            rows = (r, min(r + band, height))
            neurons = np.ascontiguousarray(table[np.asarray(instances[i, rows[0]:rows[1]])], dtype=np.int32)
            write_slice(out, i, neurons, rows, (0, shape[1]))
            of_slice.update(neurons.data)
            voxels += np.bincount(neurons.ravel(), minlength=count + 1)
        digest.update(of_slice.hexdigest().encode())
    order = np.argsort(voxels[1:])[::-1][:largest] + 1
    record = {"count": count, "largest": [[int(n), int(voxels[n])] for n in order if voxels[n] > 0],
              "sha256": digest.hexdigest()}
    atomic_write(marker, lambda fh: fh.write(json.dumps(record).encode()))
    return record
