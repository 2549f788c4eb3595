"""Blockwise prediction in bounded memory: one block (:mod:`unet.prediction.blocks`) predicted and written
to the prediction's OME-Zarr outputs at once, so memory depends on a block's size and never on the stack's;
a prediction that is killed resumes from the blocks already written. The engine of both the app's
predictions (``storage.jobs.predict_worker``, which opens a dataset's volume through the store's guarded
readers: ``BlockJob.opener``) and ``python -m unet predict`` (a TIFF or zarr file read slice by slice,
:func:`unet.exchange.stacks.open_stack`); :func:`unet.prediction.schedule.run_blocks` hands the blocks out.

A whole slice (:func:`run_block`): the engine normalises it as a whole (``unet.training.data.normalize_image``)
and the network runs on overlapping tiles inside it (the overlap-tile strategy of
:func:`unet.prediction.infer.predict_slice`), then the slice's mask and instances (a watershed) are made and
it is scored against its labels when it has some: the same as ``python -m unet predict``.

A tile of a larger slice (:func:`run_tile`), in bounded memory:

- the slice's mean and standard deviation are computed once, streamed row band by row band, so every
  tile is normalised as the whole slice would be (:func:`slice_stats`);
- a tile reads its core, a halo of ``halo`` pixels around it and the network's context beyond that; it
  writes the probabilities and mask of its core and the watershed's labels of its core into the slice's
  raw-label array, and keeps the labels of the bands it shares with its neighbours, which
  :func:`unet.prediction.stitch.stitch` joins once all tiles of the slice are done.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore

from unet.exchange.checkpoint import load_checkpoint
from unet.exchange.io import CHUNK
from unet.exchange.package_reader import load_package
from unet.exchange.stacks import open_stack
from unet.exchange.writing import atomic_write
from unet.network.device import pick_device
from unet.prediction.blocks import (
    OUTPUT_DTYPES,
    Block,
    BlockJob,
    marker_path,
    output_path,
    raw_path,
    read_marker,
    write_slice,
)
from unet.prediction.infer import predict_slice, tile_plan
from unet.prediction.metrics import evaluate_slice, scored_neurons, segmentation_errors
from unet.prediction.postprocess import segment, to_mask
from unet.prediction.stitch import neighbour_bands
from unet.training.labels import IGNORE

CONTEXT = 64  # pixels of network context read beyond a tile's halo


_MODELS: dict[tuple[str, str], Any] = {}  # per worker process: the model of each checkpoint, loaded once


def model_of(job: BlockJob):
    if job.threads:
        torch.set_num_threads(job.threads)
    device = str(pick_device(job.device if job.device != "auto" else _worker_device()))
    if device.startswith("cuda:"):  # CUDA-only: this worker's GPU is its current one (streams, events, new tensors)
        torch.cuda.set_device(torch.device(device))
    key = (job.checkpoint, device)
    if key not in _MODELS:
        if job.package:
            model = load_package(job.checkpoint).build_model(device).eval()
        else:
            model = load_checkpoint(job.checkpoint, map_location=device).build_model(device).eval()
        if device.startswith("cuda"):  # CUDA-only: the tiles go channels-last (infer.predict_slices), so do the weights
            model = model.to(memory_format=torch.channels_last)
        _MODELS[key] = model
    return _MODELS[key], device


def _worker_device() -> str:
    """Inside a Dask worker on a machine with GPUs: the GPU of this worker (workers are numbered)."""
    try:
        count = torch.cuda.device_count()
    except Exception:
        count = 0
    if not count:
        return "cpu"
    try:
        from distributed import get_worker  # distributed only inside a Dask worker (a one-worker run has none)

        name = get_worker().name
        index = int(name) if str(name).isdigit() else 0
    except (ImportError, ValueError):
        index = 0
    return f"cuda:{index % count}"


def volume_of(job: BlockJob):
    return (job.opener or open_stack)(job.volume)


def _errors(instances: np.ndarray | None, target: np.ndarray | None, offset: tuple[int, int] = (0, 0)) -> list:
    """The largest merges and splits of ``instances`` against the neurons the labels outline whole (none
    without both; :func:`unet.prediction.metrics.scored_neurons`: an unlabelled band through a neuron is no
    merge)."""
    if instances is None or target is None:
        return []
    return segmentation_errors(instances, scored_neurons(target), offset=offset)


def run_block(job: BlockJob, index: int, target: np.ndarray | None = None) -> dict[str, Any]:
    """Predict output slice ``index`` (slice ``job.slices[index]``) whole, write its outputs and then its
    marker; returns the marker (the slice's scores when ``target`` is given, and digests)."""
    marker = marker_path(job, index)
    if marker.is_file():  # done by an earlier attempt (a resumed prediction, a retried task)
        return json.loads(marker.read_text())
    model, device = model_of(job)
    image = volume_of(job)[job.slices[index]]
    prob = predict_slice(model, image, device=device, tta=job.tta, tile=job.network_tile or None)
    return finish_block(job, index, prob, target)


def finish_block(job: BlockJob, index: int, prob: np.ndarray, target: np.ndarray | None = None) -> dict[str, Any]:
    """What follows the network for output slice ``index`` whole: its mask and neurons made from ``prob``,
    its outputs written, scored against ``target`` when given, and its marker written last; returns the
    marker. (:mod:`unet.prediction.pipeline` calls it on a host thread while the device goes on.)"""
    prob = np.asarray(prob, np.float32)
    results = {"probabilities": prob, "mask": to_mask(prob, job.threshold) * np.uint8(255)}
    if job.with_instances:
        results["instances"] = segment(prob, job.method).astype(np.int32)
    digests = {}
    for name in job.outputs:
        data = np.ascontiguousarray(results[name], dtype=OUTPUT_DTYPES[name])
        write_slice(output_path(job.out, name), index, data)
        digests[name] = hashlib.sha256(data.data).hexdigest()
    record = {"slice": job.slices[index], "sha256": digests, "scores": None if target is None else
              evaluate_slice(prob, target, seg=results.get("instances"), method=job.method),
              "errors": _errors(results.get("instances"), target)}
    atomic_write(marker_path(job, index), lambda fh: fh.write(json.dumps(record).encode()))
    return record


# ---- slices larger than a tile

def slice_stats(job: BlockJob, index: int) -> tuple[float, float]:
    """Mean and standard deviation of output slice ``index``'s image, streamed band by band in a fixed
    order (the same figures whoever computes them) and kept in ``blocks/<i>.stats.json``."""
    path = Path(job.out) / "blocks" / f"{index}.stats.json"
    known = read_marker(path)
    if known is not None:
        return known["mean"], known["std"]
    volume = volume_of(job)
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
    t, o, *_ = tile_plan(model, (4 * CHUNK, 4 * CHUNK))
    return max(CONTEXT, (t - o) // 2)

def _open_raw(job: BlockJob, index: int, shape: tuple[int, int]) -> zarr.Array:
    """Output slice ``index``'s raw labels (int64: tile ``t``'s label ``k`` is ``t·2³² + k``), one array
    per slice, created by whichever tile comes first (the same array whoever creates it)."""
    path = raw_path(job, index)
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

def run_tile(job: BlockJob, block: Block, target: np.ndarray | None = None) -> dict[str, Any]:
    """Predict one tile of a large slice: its core's probabilities and mask into the outputs, the
    watershed's labels of its core into the slice's raw labels, and (in ``blocks/<i>-<t>.npz``) the labels
    of the bands it shares with its neighbours; then its marker (scores of its core against ``target``,
    the core's labels)."""
    marker = marker_path(job, block.key)
    if marker.is_file():
        return json.loads(marker.read_text())
    model, device = model_of(job)
    volume = volume_of(job)
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
        record["labelled"] = int(np.count_nonzero(target != IGNORE))
        if record["labelled"]:
            # (numbered from 1 as the tile's watershed made them, for the scores)
            core_labels = labels[core] - (np.int64(block.part) << 32) if labels is not None else None
            record["scores"] = evaluate_slice(prob[core], target, seg=core_labels, method=job.method)
            # the tile's own errors (its labels are the tile's: enough to find the place)
            record["errors"] = _errors(core_labels, target, offset=(y0, x0))
    if labels is not None:
        _open_raw(job, block.index, shape).with_config({"write_empty_chunks": True})[y0:y1, x0:x1] = labels[core]
        bands = {}
        for side, (by0, by1, bx0, bx1) in neighbour_bands(block, shape, halo).items():
            bands[side] = labels[by0 - hy0:by1 - hy0, bx0 - hx0:bx1 - hx0]
            bands[f"{side}_at"] = np.array([by0, bx0])
        bands["core"] = np.unique(labels[core])
        npz = Path(job.out) / "blocks" / f"{block.key}.npz"
        atomic_write(npz, lambda fh: np.savez_compressed(fh, **bands))
    atomic_write(marker, lambda fh: fh.write(json.dumps(record).encode()))
    return record
