"""Blockwise prediction in bounded memory, on Dask: a stack of any size is predicted one block at a time,
each finished block written to the prediction's OME-Zarr outputs at once, so memory depends on a block's
size and never on the stack's; a prediction that is killed resumes from the blocks already written.

A block is one slice: the engine normalises each slice as a whole (``unet.data.normalize_image``), so a
slice is the unit whose result does not depend on how the stack is cut. Inside it, the network runs on
overlapping tiles (the overlap-tile strategy of :func:`unet.infer.predict_slice`: each tile reads its
halo of context), then the mask and the instances (a watershed) of the slice are made and the slice is
scored against its labels when it has some. A block is finished when its marker
``blocks/<i>.json`` (written last, atomically, with the block's scores and the digests of what it wrote)
exists: a block killed half-way is simply done again.

Where blocks run: :func:`run_blocks` hands them to a ``dask.distributed`` cluster: the one at
``$NEUROSEG_DASK_SCHEDULER`` (``tcp://host:8786``; its workers must see the data directory at the same
path), else a local cluster started inside the prediction process, one worker process per GPU or, on a
CPU, as many as the cores and the memory allow (``$NEUROSEG_PREDICT_WORKERS`` overrides). With a single
worker the blocks run in the process itself: the same function, without a cluster to start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from storage.volumes import CHUNK, External, Volume
from unet.io import atomic_write

OUTPUT_DTYPES = {"probabilities": np.float32, "mask": np.uint8, "instances": np.int32}
SCHEDULER_ENV = "NEUROSEG_DASK_SCHEDULER"
WORKERS_ENV = "NEUROSEG_PREDICT_WORKERS"

#: ``progress(done, total)``: blocks finished so far (resumed ones included) of all blocks.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BlockJob:
    """What every block of one prediction needs (plain values: it travels to the Dask workers)."""

    checkpoint: str  # the checkpoint file
    volume: str  # the dataset's OME-Zarr volume
    out: str  # the prediction's folder: <output>.ome.zarr and blocks/
    slices: tuple[int, ...]  # block i predicts slice slices[i]
    threshold: float = 0.5
    with_instances: bool = True
    tta: bool = False
    device: str = "auto"  # "auto": the worker's GPU when it has one, else the CPU
    linked: bool = False  # the volume is a stack on the server read where it lies (storage.volumes.External)
    threads: int = 0  # CPU threads per worker (0: leave torch's default)

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("probabilities", "mask", "instances") if self.with_instances else ("probabilities", "mask")


def output_path(folder: str | os.PathLike, name: str) -> Path:
    return Path(folder) / f"{name}.ome.zarr"


def _marker(job: BlockJob, index: int) -> Path:
    return Path(job.out) / "blocks" / f"{index}.json"


def create_output(final: Path, name: str, shape: tuple[int, int, int], slices: list[int],
                  pixel_size_nm: float | None = None) -> None:
    """One output image ``(len(slices), Y, X)``, created whole in a partial folder and renamed."""
    from ome_zarr.writer import write_multiscales_metadata

    n, y, x = shape
    partial = final.with_name(f"{final.name}.partial-{uuid.uuid4().hex[:12]}")
    try:
        group = zarr.open_group(LocalStore(partial), mode="w", zarr_format=3)
        group.create_array("0", shape=(n, y, x), chunks=(1, min(CHUNK, y), min(CHUNK, x)), dtype=OUTPUT_DTYPES[name],
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
    ``CHUNK``² pixels, zstd and CRC32C); outputs that exist already (a resumed prediction) are kept."""
    for name in job.outputs:
        final = output_path(job.out, name)
        if not (final / "zarr.json").is_file():
            create_output(final, name, (len(job.slices), *shape), list(job.slices), pixel_size_nm)


def write_slice(path: Path, index: int, data: np.ndarray) -> None:
    """Write slice ``index`` of an output, every chunk of it even when all zeros (the setting is not kept
    in the array's metadata, so it is set again here: a missing chunk must always mean damage)."""
    with zarr.config.set({"array.write_empty_chunks": True}):
        zarr.open_array(LocalStore(path), path="0", mode="r+")[index] = data


def finished_blocks(job: BlockJob) -> dict[int, dict[str, Any]]:
    """The blocks already written (index → their marker: scores and digests)."""
    done = {}
    for index in range(len(job.slices)):
        try:
            done[index] = json.loads(_marker(job, index).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    return done


_MODELS: dict[tuple[str, str], Any] = {}  # per worker process: the model of each checkpoint, loaded once


def _model(job: BlockJob):
    import torch

    from unet.checkpoint import load_checkpoint
    from unet.device import pick_device

    if job.threads:
        torch.set_num_threads(job.threads)
    device = str(pick_device(job.device if job.device != "auto" else _worker_device()))
    key = (job.checkpoint, device)
    if key not in _MODELS:
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


def run_block(job: BlockJob, index: int, target: np.ndarray | None = None) -> dict[str, Any]:
    """Predict block ``index`` (slice ``job.slices[index]``), write its outputs and then its marker;
    returns the marker (the slice's scores when ``target`` is given, and digests)."""
    from unet.infer import predict_slice
    from unet.metrics import evaluate_slice
    from unet.postprocess import instances, to_mask

    marker = _marker(job, index)
    if marker.is_file():  # done by an earlier attempt (a resumed prediction, a retried task)
        return json.loads(marker.read_text())
    model, device = _model(job)
    z = job.slices[index]
    image = (External(job.volume) if job.linked else Volume(job.volume))[z]
    prob = predict_slice(model, image, device=device, tta=job.tta).astype(np.float32)
    results = {"probabilities": prob, "mask": to_mask(prob, job.threshold) * np.uint8(255)}
    if job.with_instances:
        results["instances"] = instances(prob, threshold=job.threshold).astype(np.int32)
    digests = {}
    for name in job.outputs:
        data = np.ascontiguousarray(results[name], dtype=OUTPUT_DTYPES[name])
        write_slice(output_path(job.out, name), index, data)
        digests[name] = hashlib.sha256(data.data).hexdigest()
    record = {"slice": z, "sha256": digests,
              "scores": evaluate_slice(prob, target) if target is not None else None}
    atomic_write(marker, lambda fh: fh.write(json.dumps(record).encode()))
    return record


def default_workers(n_blocks: int, shape: tuple[int, int]) -> int:
    """How many worker processes a local cluster gets: one per GPU; on a CPU, one per core, fewer when
    the memory would not hold that many slices at once (about 20 bytes per pixel of a slice in flight)."""
    if os.environ.get(WORKERS_ENV):
        return max(1, int(os.environ[WORKERS_ENV]))
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:
        gpus = 0
    if gpus:
        return max(1, min(gpus, n_blocks))
    per_block = 20 * shape[0] * shape[1] + (200 << 20)
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


def run_blocks(job: BlockJob, shape: tuple[int, int], *, targets: Mapping[int, np.ndarray] | None = None,
               progress: Progress | None = None, pixel_size_nm: float | None = None,
               scheduler: str | None = None, workers: int | None = None) -> dict[int, dict[str, Any]]:
    """Predict every block not finished yet and return all blocks' markers (index → marker).

    Args:
        job: the prediction (checkpoint, volume, output folder, slices, options).
        shape: a slice's (Y, X).
        targets: labels of some slices ({slice: target}), to score those blocks.
        progress: told (blocks finished, blocks in all) as blocks finish.
        scheduler: a Dask scheduler's address (default ``$NEUROSEG_DASK_SCHEDULER``; none: a local cluster).
        workers: worker processes of a local cluster (default :func:`default_workers`); 1 runs the blocks
            in this process.
    """
    targets = targets or {}
    report = progress or (lambda _done, _total: None)
    create_outputs(job, shape, pixel_size_nm)
    done = finished_blocks(job)
    total = len(job.slices)
    todo = [i for i in range(total) if i not in done]
    report(len(done), total)
    if not todo:
        return done
    scheduler = scheduler if scheduler is not None else os.environ.get(SCHEDULER_ENV) or None
    count = 1 if scheduler else (workers or default_workers(len(todo), shape))
    if not scheduler and count == 1:
        for i in todo:
            done[i] = run_block(job, i, targets.get(job.slices[i]))
            report(len(done), total)
        return done
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if not scheduler:
        threads = max(1, (os.cpu_count() or 1) // count)
        job = BlockJob(**{**asdict(job), "threads": job.threads or threads})
        # on loopback only, its HTTP endpoint on a free port (no dashboard is installed)
        cluster = LocalCluster(n_workers=count, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", silence_logs=40, memory_limit=0)
    try:
        with Client(scheduler or cluster) as client:
            futures = [client.submit(run_block, job, i, targets.get(job.slices[i]), key=f"block-{job.out}-{i}",
                                     pure=False, retries=1) for i in todo]
            index = {f.key: i for f, i in zip(futures, todo, strict=True)}
            for future in as_completed(futures):
                done[index[future.key]] = future.result()
                report(len(done), total)
    finally:
        if cluster is not None:
            cluster.close()
    return done


def combined_sha256(markers: Mapping[int, dict[str, Any]], name: str) -> str:
    """One digest for an output: the sha256 of its blocks' digests in order."""
    digest = hashlib.sha256()
    for index in sorted(markers):
        digest.update(markers[index]["sha256"][name].encode())
    return digest.hexdigest()
