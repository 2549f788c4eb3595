"""Blockwise prediction in bounded memory, on Dask: a stack of any size is predicted one block at a time,
each finished block written to the prediction's OME-Zarr outputs at once, so memory depends on a block's
size and never on the stack's; a prediction that is killed resumes from the blocks already written. The
engine of both the app's predictions (``storage.jobs.predict_worker``, which opens a dataset's volume through
the store's guarded readers: ``BlockJob.opener``) and ``python -m unet predict`` (a TIFF or zarr file read
slice by slice, :func:`unet.exchange.io.open_stack`).

Blocks. A slice up to ``tile``² pixels (2048² by default) is one block: the engine normalises it as a
whole (``unet.training.data.normalize_image``) and the network runs on overlapping tiles inside it (the
overlap-tile strategy of :func:`unet.prediction.infer.predict_slice`), then the slice's mask and instances (a
watershed) are made and it is scored against its labels when it has some: the same as ``python -m unet
predict``. A larger slice is cut into tiles of ``tile``² pixels (on chunk boundaries, so no two blocks
ever write the same chunk), each a block of its own in bounded memory:

- the slice's mean and standard deviation are computed once, streamed row band by row band, so every
  tile is normalised as the whole slice would be;
- a tile reads its core, a halo of ``halo`` pixels around it and the network's context beyond that; it
  writes the probabilities and mask of its core and the watershed's labels of its core into the slice's
  raw-label array, and keeps the labels of the bands it shares with its neighbours;
- when all tiles of a slice are done, the slice is *stitched*: an instance of one tile and one of its
  neighbour that cover the same pixels of their shared band (intersection over union above 1/2) are one
  neuron; the slice's instances are then numbered 1… and written, and its raw labels deleted. Stitching
  only reads the raw labels, so a stitch that is killed simply runs again.

A slice is finished when its marker ``blocks/<i>.json`` (written last, atomically, with its scores and
the digests of what was written) exists; a tile when ``blocks/<i>-<t>.json`` does. Anything killed
half-way is simply done again.

Where blocks run: :func:`run_blocks` hands them to a ``dask.distributed`` cluster: the one at
``$NEUROSEG_DASK_SCHEDULER`` (``tcp://host:8786``; its workers must see the data directory at the same
path), else a local cluster started inside the prediction process, one worker process per GPU or, on a
CPU, as many as the cores and the memory allow (``$NEUROSEG_PREDICT_WORKERS`` overrides). With a single
worker the blocks run in the process itself: the same functions, without a cluster to start. A slice's
stitch is a task that depends on its tiles.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from unet.exchange.io import CHUNK, atomic_write, open_stack

OUTPUT_DTYPES = {"probabilities": np.float32, "mask": np.uint8, "instances": np.int32, "neurons": np.int32}
SCHEDULER_ENV = "NEUROSEG_DASK_SCHEDULER"
WORKERS_ENV = "NEUROSEG_PREDICT_WORKERS"
TILE = 2048  # slices up to TILE² pixels are one block; larger ones are cut into tiles of TILE²
HALO = 128  # pixels of instance context around a tile, and the width of the bands neighbours compare
CONTEXT = 64  # pixels of network context read beyond a tile's halo
BYTES_PER_PIXEL = 110  # memory of a block in flight: network, watershed and their copies, per pixel read

#: ``progress(done, total)``: blocks finished so far (resumed ones included) of all blocks.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BlockJob:
    """What every block of one prediction needs (plain values: it travels to the Dask workers)."""

    checkpoint: str  # the checkpoint file (or, with ``package``, a BioImage.IO package exported by Neuroseg)
    volume: str  # the stack: the dataset's OME-Zarr volume, or a file ``opener`` opens
    out: str  # the prediction's folder: <output>.ome.zarr and blocks/
    slices: tuple[int, ...]  # output slice i is slice slices[i] of the volume
    threshold: float = 0.5
    with_instances: bool = True
    tta: bool = False
    device: str = "auto"  # "auto": the worker's GPU when it has one, else the CPU
    # opens ``volume`` as an array of (Z, Y, X) in each process that reads it (a picklable function: it
    # travels to the Dask workers); None: :func:`unet.exchange.io.open_stack` (a TIFF or zarr file, slice by slice)
    opener: Callable[[str], Any] | None = None
    package: bool = False  # ``checkpoint`` is a BioImage.IO package (its weights, never its code)
    network_tile: int = 0  # the network's input tile (0: the engine's choice, unet.prediction.infer.choose_tile)
    threads: int = 0  # CPU threads per worker (0: leave torch's default)
    tile: int = TILE  # the largest slice edge predicted whole; larger slices are cut into tiles of this edge
    halo: int = HALO
    method: str = "agglomerate"  # how neurons are made from the map (unet.prediction.postprocess.METHODS; the default)

    def __post_init__(self) -> None:
        if self.tile > CHUNK and self.tile % CHUNK:
            raise ValueError(f"a tile larger than a chunk must be a multiple of it ({CHUNK}), not {self.tile}")
        if not 0 < self.halo <= self.tile:
            raise ValueError(f"the halo must be between 1 and the tile ({self.tile}), not {self.halo}")

    @property
    def outputs(self) -> tuple[str, ...]:
        """What every block writes."""
        return ("probabilities", "mask", "instances") if self.with_instances else ("probabilities", "mask")

    @property
    def all_outputs(self) -> tuple[str, ...]:
        """The block outputs and, with instances, the 3D neurons linked from them (:func:`link_neurons`)."""
        return (*self.outputs, "neurons") if self.with_instances else self.outputs

    @property
    def chunk(self) -> int:
        """The outputs' chunk edge: tiles start on chunk boundaries."""
        return min(CHUNK, self.tile)


@dataclass(frozen=True)
class Block:
    """One unit of work: output slice ``index`` whole (``part`` None) or its tile ``part``."""

    index: int
    part: int | None
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def key(self) -> str:
        return str(self.index) if self.part is None else f"{self.index}-{self.part}"

    @property
    def pixels(self) -> int:
        return (self.rows[1] - self.rows[0]) * (self.cols[1] - self.cols[0])


def slice_blocks(job: BlockJob, index: int, shape: tuple[int, int]) -> list[Block]:
    """The blocks of output slice ``index``: the whole slice, or its tiles in row-major order."""
    y, x = shape
    if y <= job.tile and x <= job.tile:
        return [Block(index, None, (0, y), (0, x))]
    rows = [(r, min(r + job.tile, y)) for r in range(0, y, job.tile)]
    cols = [(c, min(c + job.tile, x)) for c in range(0, x, job.tile)]
    return [Block(index, part, r, c) for part, (r, c) in enumerate((r, c) for r in rows for c in cols)]


def plan(job: BlockJob, shape: tuple[int, int]) -> dict[int, list[Block]]:
    """Every output slice's blocks."""
    return {index: slice_blocks(job, index, shape) for index in range(len(job.slices))}


def output_path(folder: str | os.PathLike, name: str) -> Path:
    return Path(folder) / f"{name}.ome.zarr"


def _marker(job: BlockJob, key: str | int) -> Path:
    return Path(job.out) / "blocks" / f"{key}.json"


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def create_output(final: Path, name: str, shape: tuple[int, int, int], slices: list[int],
                  pixel_size_nm: float | None = None, chunk: int = CHUNK) -> None:
    """One output image ``(len(slices), Y, X)``, created whole in a partial folder and renamed."""
    from ome_zarr.writer import write_multiscales_metadata

    n, y, x = shape
    partial = final.with_name(f"{final.name}.partial-{uuid.uuid4().hex[:12]}")
    try:
        group = zarr.open_group(LocalStore(partial), mode="w", zarr_format=3)
        group.create_array("0", shape=(n, y, x), chunks=(1, min(chunk, y), min(chunk, x)), dtype=OUTPUT_DTYPES[name],
                           compressors=[ZstdCodec(level=3), Crc32cCodec()], fill_value=0,
                           config={"write_empty_chunks": True})
        xy = float(pixel_size_nm or 1.0)
        unit = {"unit": "nanometer"} if pixel_size_nm else {}
        write_multiscales_metadata(group, name=name, axes=[{"name": a, "type": "space", **unit} for a in "zyx"],
                                   datasets=[{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [1.0, xy, xy]}]}])
        group.attrs["neuroseg"] = {"slices": list(slices)}
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def create_outputs(job: BlockJob, shape: tuple[int, int], pixel_size_nm: float | None = None) -> None:
    """Create the output arrays ``(len(slices), Y, X)`` (each an OME-Zarr image; chunks of one slice by
    ``job.chunk``² pixels, zstd and CRC32C); outputs that exist already (a resumed prediction) are kept."""
    for name in job.all_outputs:
        final = output_path(job.out, name)
        if not (final / "zarr.json").is_file():
            create_output(final, name, (len(job.slices), *shape), list(job.slices), pixel_size_nm, job.chunk)


def write_slice(path: Path, index: int, data: np.ndarray, rows: tuple[int, int] | None = None,
                cols: tuple[int, int] | None = None) -> None:
    """Write slice ``index`` of an output (or its region ``rows`` × ``cols``), every chunk of it even when
    all zeros (the setting is not kept in the array's metadata, so it is set again here: a missing chunk
    must always mean damage)."""
    with zarr.config.set({"array.write_empty_chunks": True}):
        array = zarr.open_array(LocalStore(path), path="0", mode="r+")
        if rows is None:
            array[index] = data
        else:
            array[index, rows[0]:rows[1], cols[0]:cols[1]] = data


def finished_blocks(job: BlockJob) -> dict[int, dict[str, Any]]:
    """The output slices already finished (index → their marker: scores and digests)."""
    done = {}
    for index in range(len(job.slices)):
        marker = _read_marker(_marker(job, index))
        if marker is not None:
            done[index] = marker
    return done


_MODELS: dict[tuple[str, str], Any] = {}  # per worker process: the model of each checkpoint, loaded once


def _model(job: BlockJob):
    import torch

    from unet.exchange.checkpoint import load_checkpoint
    from unet.network.device import pick_device

    if job.threads:
        torch.set_num_threads(job.threads)
    device = str(pick_device(job.device if job.device != "auto" else _worker_device()))
    key = (job.checkpoint, device)
    if key not in _MODELS:
        if job.package:
            from unet.exchange.bioimageio import load_package

            _MODELS[key] = load_package(job.checkpoint).build_model(device).eval()
        else:
            _MODELS[key] = load_checkpoint(job.checkpoint, map_location=device).build_model(device).eval()
    return _MODELS[key], device


def _worker_device() -> str:
    """Inside a Dask worker on a machine with GPUs: the GPU of this worker (workers are numbered)."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:
        count = 0
    if not count:
        return "cpu"
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if str(name).isdigit() else 0
    except (ImportError, ValueError):
        index = 0
    return f"cuda:{index % count}"


def _volume(job: BlockJob):
    return (job.opener or open_stack)(job.volume)


def _errors(instances: np.ndarray | None, target: np.ndarray | None, offset: tuple[int, int] = (0, 0)) -> list:
    """The largest merges and splits of ``instances`` against the labels' neurons (none without both)."""
    from unet.prediction.metrics import segmentation_errors
    from unet.training.labels import target_to_instances

    if instances is None or target is None:
        return []
    return segmentation_errors(instances, target_to_instances(target), offset=offset)


def run_block(job: BlockJob, index: int, target: np.ndarray | None = None) -> dict[str, Any]:
    """Predict output slice ``index`` (slice ``job.slices[index]``) whole, write its outputs and then its
    marker; returns the marker (the slice's scores when ``target`` is given, and digests)."""
    from unet.prediction.infer import predict_slice
    from unet.prediction.metrics import evaluate_slice
    from unet.prediction.postprocess import segment, to_mask

    marker = _marker(job, index)
    if marker.is_file():  # done by an earlier attempt (a resumed prediction, a retried task)
        return json.loads(marker.read_text())
    model, device = _model(job)
    z = job.slices[index]
    image = _volume(job)[z]
    prob = predict_slice(model, image, device=device, tta=job.tta, tile=job.network_tile or None).astype(np.float32)
    results = {"probabilities": prob, "mask": to_mask(prob, job.threshold) * np.uint8(255)}
    if job.with_instances:
        results["instances"] = segment(prob, job.method).astype(np.int32)
    digests = {}
    for name in job.outputs:
        data = np.ascontiguousarray(results[name], dtype=OUTPUT_DTYPES[name])
        write_slice(output_path(job.out, name), index, data)
        digests[name] = hashlib.sha256(data.data).hexdigest()
    record = {"slice": z, "sha256": digests, "scores": None if target is None else
              evaluate_slice(prob, target, seg=results.get("instances"), method=job.method),
              "errors": _errors(results.get("instances"), target)}
    atomic_write(marker, lambda fh: fh.write(json.dumps(record).encode()))
    return record


# ---- slices larger than a tile

def slice_stats(job: BlockJob, index: int) -> tuple[float, float]:
    """Mean and standard deviation of output slice ``index``'s image, streamed band by band in a fixed
    order (the same figures whoever computes them) and kept in ``blocks/<i>.stats.json``."""
    path = Path(job.out) / "blocks" / f"{index}.stats.json"
    known = _read_marker(path)
    if known is not None:
        return known["mean"], known["std"]
    volume = _volume(job)
    z, (height, _width) = job.slices[index], volume.shape[1:]
    total = squares = 0.0
    count = 0
    for r in range(0, height, job.chunk):
        band = volume[z, r:r + job.chunk].astype(np.float64)
        total += float(band.sum())
        squares += float(np.square(band).sum())
        count += band.size
    mean = total / count
    std = float(np.sqrt(max(squares / count - mean * mean, 0.0)))
    atomic_write(path, lambda fh: fh.write(json.dumps({"mean": mean, "std": std}).encode()))
    return mean, std


def _context(model) -> int:
    """Pixels of input a tile's border needs beyond what it predicts (valid padding's offset, or CONTEXT)."""
    from unet.prediction.infer import tile_plan

    t, o, *_ = tile_plan(model, (4 * CHUNK, 4 * CHUNK))
    return max(CONTEXT, (t - o) // 2)


def _raw_path(job: BlockJob, index: int) -> Path:
    return Path(job.out) / "blocks" / f"{index}.raw.zarr"


def _open_raw(job: BlockJob, index: int, shape: tuple[int, int]) -> zarr.Array:
    """Output slice ``index``'s raw labels (int64: tile ``t``'s label ``k`` is ``t·2³² + k``), one array
    per slice, created by whichever tile comes first (the same array whoever creates it)."""
    path = _raw_path(job, index)
    try:
        return zarr.open_array(LocalStore(path), mode="r+")
    except FileNotFoundError:  # (zarr's ArrayNotFoundError is one)
        pass
    chunk = job.chunk
    try:
        return zarr.create_array(LocalStore(path), shape=shape, chunks=(min(chunk, shape[0]), min(chunk, shape[1])),
                                 dtype=np.int64, fill_value=0, compressors=[ZstdCodec(level=1)],
                                 config={"write_empty_chunks": True}, overwrite=False)
    except zarr.errors.ContainsArrayError:  # another tile created it meanwhile
        return zarr.open_array(LocalStore(path), mode="r+")


def _bands(block: Block, shape: tuple[int, int], halo: int) -> dict[str, tuple[int, int, int, int]]:
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


def run_tile(job: BlockJob, block: Block, target: np.ndarray | None = None) -> dict[str, Any]:
    """Predict one tile of a large slice: its core's probabilities and mask into the outputs, the
    watershed's labels of its core into the slice's raw labels, and (in ``blocks/<i>-<t>.npz``) the labels
    of the bands it shares with its neighbours; then its marker (scores of its core against ``target``,
    the core's labels)."""
    from unet.prediction.infer import predict_slice
    from unet.prediction.metrics import evaluate_slice
    from unet.prediction.postprocess import segment, to_mask

    marker = _marker(job, block.key)
    if marker.is_file():
        return json.loads(marker.read_text())
    model, device = _model(job)
    volume = _volume(job)
    z, shape = job.slices[block.index], tuple(volume.shape[1:])
    mean, std = slice_stats(job, block.index)
    halo, context = job.halo, _context(model)
    (y0, y1), (x0, x1) = block.rows, block.cols
    # the region whose instances are made (core and halo), and the one read (with the network's context)
    hy0, hy1, hx0, hx1 = max(0, y0 - halo), min(shape[0], y1 + halo), max(0, x0 - halo), min(shape[1], x1 + halo)
    ey0, ey1 = max(0, hy0 - context), min(shape[0], hy1 + context)
    ex0, ex1 = max(0, hx0 - context), min(shape[1], hx1 + context)
    image = (volume[z, ey0:ey1, ex0:ex1].astype(np.float32) - np.float32(mean)) / np.float32(std if std > 1e-6 else 1)
    prob = predict_slice(model, image, device=device, tta=job.tta, normalized=True,
                         tile=job.network_tile or None).astype(np.float32)
    del image
    prob = np.ascontiguousarray(prob[hy0 - ey0:hy1 - ey0, hx0 - ex0:hx1 - ex0])
    core = (slice(y0 - hy0, y1 - hy0), slice(x0 - hx0, x1 - hx0))
    write_slice(output_path(job.out, "probabilities"), block.index, prob[core], block.rows, block.cols)
    write_slice(output_path(job.out, "mask"), block.index, to_mask(prob[core], job.threshold) * np.uint8(255),
                block.rows, block.cols)
    labels = segment(prob, job.method).astype(np.int64) + (np.int64(block.part) << 32) if job.with_instances else None
    record: dict[str, Any] = {"slice": z, "part": block.part, "scores": None, "labelled": 0, "errors": []}
    if target is not None:
        from unet.training.labels import IGNORE

        record["labelled"] = int(np.count_nonzero(target != IGNORE))
        if record["labelled"]:
            # (numbered from 1 as the tile's watershed made them, for the scores)
            core_labels = labels[core] - (np.int64(block.part) << 32) if labels is not None else None
            record["scores"] = evaluate_slice(prob[core], target, seg=core_labels, method=job.method)
            # the tile's own errors (its labels are the tile's: enough to find the place)
            record["errors"] = _errors(core_labels, target, offset=(y0, x0))
    if labels is not None:
        with zarr.config.set({"array.write_empty_chunks": True}):
            _open_raw(job, block.index, shape)[y0:y1, x0:x1] = labels[core]
        bands = {}
        for side, (by0, by1, bx0, bx1) in _bands(block, shape, halo).items():
            bands[side] = labels[by0 - hy0:by1 - hy0, bx0 - hx0:bx1 - hx0]
            bands[f"{side}_at"] = np.array([by0, bx0])
        bands["core"] = np.unique(labels[core])
        npz = Path(job.out) / "blocks" / f"{block.key}.npz"
        atomic_write(npz, lambda fh: np.savez_compressed(fh, **bands))
    atomic_write(marker, lambda fh: fh.write(json.dumps(record).encode()))
    return record


def _matches(a: np.ndarray, a_at: np.ndarray, b: np.ndarray, b_at: np.ndarray) -> np.ndarray:
    """Pairs (label of a, label of b) that cover the same pixels where the two bands overlap: their
    intersection over union there is above 1/2 (each label of a then pairs with one label of b at most)."""
    y0, x0 = max(a_at[0], b_at[0]), max(a_at[1], b_at[1])
    y1, x1 = min(a_at[0] + a.shape[0], b_at[0] + b.shape[0]), min(a_at[1] + a.shape[1], b_at[1] + b.shape[1])
    if y1 <= y0 or x1 <= x0:
        return np.zeros((0, 2), np.int64)
    from unet.prediction.metrics import contingency

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
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    marker = _marker(job, index)
    if marker.is_file():
        return json.loads(marker.read_text())
    blocks = slice_blocks(job, index, shape)
    folder = Path(job.out) / "blocks"
    records = [_read_marker(_marker(job, b.key)) for b in blocks]
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
        raw = zarr.open_array(LocalStore(_raw_path(job, index)), mode="r")
        out = output_path(job.out, "instances")
        for r in range(0, shape[0], job.chunk):
            band = raw[r:r + job.chunk]
            write_slice(out, index, final[np.searchsorted(labels, band)], (r, min(r + job.chunk, shape[0])),
                        (0, shape[1]))
    band_rows = max(1, (64 << 20) // (shape[1] * 4))
    digests = {name: _stream_digest(output_path(job.out, name), index, shape[0], band_rows) for name in job.outputs}
    scored = [r for r in records if r["scores"]]
    scores = None
    if scored:
        weights = np.array([r["labelled"] for r in scored], np.float64)
        keys = sorted({k for r in scored for k in r["scores"]})
        scores = {k: float(np.average([r["scores"].get(k, np.nan) for r in scored], weights=weights)) for k in keys}
    errors = sorted((e for r in records for e in r.get("errors", [])), key=lambda e: -e["pixels"])[:10]
    record = {"slice": job.slices[index], "sha256": digests, "scores": scores, "tiles": len(blocks), "errors": errors}
    atomic_write(marker, lambda fh: fh.write(json.dumps(record).encode()))
    shutil.rmtree(_raw_path(job, index), ignore_errors=True)
    for b in blocks:
        for leftover in (folder / f"{b.key}.npz", _marker(job, b.key)):
            leftover.unlink(missing_ok=True)
    (folder / f"{index}.stats.json").unlink(missing_ok=True)
    return record


def default_workers(n_blocks: int, block_pixels: int) -> int:
    """How many worker processes a local cluster gets: one per GPU; on a CPU, one per core, fewer when
    the memory would not hold that many blocks at once (``BYTES_PER_PIXEL`` per pixel of a block read)."""
    if os.environ.get(WORKERS_ENV):
        return max(1, int(os.environ[WORKERS_ENV]))
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:
        gpus = 0
    if gpus:
        return max(1, min(gpus, n_blocks))
    per_block = BYTES_PER_PIXEL * block_pixels + (300 << 20)
    available = _available_memory()
    by_memory = max(1, int(available * 0.6 // per_block)) if available else 1
    return max(1, min(os.cpu_count() or 1, n_blocks, by_memory))


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _target_part(target: np.ndarray | None, block: Block) -> np.ndarray | None:
    if target is None:
        return None
    return np.ascontiguousarray(target[block.rows[0]:block.rows[1], block.cols[0]:block.cols[1]])


def run_blocks(job: BlockJob, shape: tuple[int, int], *, targets: Mapping[int, np.ndarray] | None = None,
               progress: Progress | None = None, pixel_size_nm: float | None = None,
               scheduler: str | None = None, workers: int | None = None) -> dict[int, dict[str, Any]]:
    """Predict every block not finished yet and return every output slice's marker (index → marker).

    Args:
        job: the prediction (checkpoint, volume, output folder, slices, options).
        shape: a slice's (Y, X).
        targets: labels of some slices ({slice: target}), to score those slices.
        progress: told (blocks finished, blocks in all) as blocks finish.
        scheduler: a Dask scheduler's address (default ``$NEUROSEG_DASK_SCHEDULER``; none: a local cluster).
        workers: worker processes of a local cluster (default :func:`default_workers`); 1 runs the blocks
            in this process.
    """
    shape = (int(shape[0]), int(shape[1]))
    targets = targets or {}
    report = progress or (lambda _done, _total: None)
    create_outputs(job, shape, pixel_size_nm)
    blocks = plan(job, shape)
    done = finished_blocks(job)
    total = sum(len(b) for b in blocks.values())
    todo = {i: [b for b in blocks[i] if not _marker(job, b.key).is_file()] for i in blocks if i not in done}
    count = sum(len(blocks[i]) for i in done) + sum(len(blocks[i]) - len(todo[i]) for i in todo)
    report(count, total)
    if not todo:
        return done

    def target(block: Block) -> np.ndarray | None:
        whole = targets.get(job.slices[block.index])
        return whole if block.part is None else _target_part(whole, block)

    def work(block: Block):
        if block.part is None:
            return run_block, job, block.index, target(block)
        return run_tile, job, block, target(block)

    scheduler = scheduler if scheduler is not None else os.environ.get(SCHEDULER_ENV) or None
    pending = [b for i in todo for b in todo[i]]
    largest = max((b.pixels for b in pending), default=1)
    halo = job.halo if any(b.part is not None for b in pending) else 0
    n = 1 if scheduler else (workers or default_workers(len(pending), int((np.sqrt(largest) + 2 * halo + 128) ** 2)))
    if not scheduler and n == 1:
        for i, left in todo.items():
            for block in left:
                fn, *args = work(block)
                result = fn(*args)
                count += 1
                if block.part is None:
                    done[i] = result
                report(count, total)
            if i not in done:
                done[i] = stitch(job, i, shape)
        return done
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if not scheduler:
        threads = max(1, (os.cpu_count() or 1) // n)
        job = replace(job, threads=job.threads or threads)
        # on loopback only, its HTTP endpoint on a free port (no dashboard is installed)
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", silence_logs=40, memory_limit=0)
    try:
        with Client(scheduler or cluster) as client:
            kinds: dict[str, tuple[str, int]] = {}
            futures = []
            for i, left in todo.items():
                tile_futures = []
                for block in left:
                    fn, *args = work(block)
                    future = client.submit(fn, *args, key=f"block-{job.out}-{block.key}", pure=False, retries=1)
                    kinds[future.key] = ("slice" if block.part is None else "tile", i)
                    futures.append(future)
                    tile_futures.append(future)
                if blocks[i][0].part is not None:
                    future = client.submit(stitch, job, i, shape, *tile_futures, key=f"stitch-{job.out}-{i}",
                                           pure=False, retries=1)
                    kinds[future.key] = ("stitch", i)
                    futures.append(future)
            for future in as_completed(futures):
                kind, i = kinds[future.key]
                result = future.result()
                if kind != "stitch":
                    count += 1
                if kind != "tile":
                    done[i] = result
                if kind != "stitch":
                    report(count, total)
    finally:
        if cluster is not None:
            cluster.close()
    return done


def link_neurons(job: BlockJob, shape: tuple[int, int], largest: int = 20) -> dict[str, Any]:
    """Once every slice is finished: link the 2D instances of neighbouring predicted slices into 3D neurons
    (:func:`unet.prediction.link.link_stack`, two slices in memory at a time, in bands of rows), write them as the
    ``neurons`` output and return (and keep, in ``blocks/neurons.json``) their count, the ``largest``
    of them with their voxels, and the output's digest. Slices that were not predicted break the chain."""
    from unet.prediction.link import link_stack

    marker = Path(job.out) / "blocks" / "neurons.json"
    known = _read_marker(marker)
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


def combined_sha256(markers: Mapping[int, dict[str, Any]], name: str) -> str:
    """One digest for an output: the sha256 of its slices' digests in order."""
    digest = hashlib.sha256()
    for index in sorted(markers):
        digest.update(markers[index]["sha256"][name].encode())
    return digest.hexdigest()
