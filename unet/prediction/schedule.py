"""Where the blocks of a prediction run (:func:`run_blocks`): on a ``dask.distributed`` cluster, the one at
``$NEUROSEG_DASK_SCHEDULER`` (``tcp://host:8786``; its workers must see the data directory at the same
path), else a local cluster started inside the prediction process, one worker process per GPU or, on a
CPU, as many as the cores and the memory allow (:func:`default_workers`; ``$NEUROSEG_PREDICT_WORKERS``
overrides). With a single worker the blocks run in the process itself: the same functions, without a
cluster to start. A slice's stitch is a task that depends on its tiles.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from unet.network.threads import available_memory, omp_threads, usable_cores
from unet.prediction.blocks import Block, BlockJob, create_outputs, finished_blocks, marker_path, plan
from unet.prediction.blockwise import model_of, run_block, run_tile
from unet.prediction.pipeline import run_slices
from unet.prediction.stitch import stitch

SCHEDULER_ENV = "NEUROSEG_DASK_SCHEDULER"
WORKERS_ENV = "NEUROSEG_PREDICT_WORKERS"
BYTES_PER_PIXEL = 110  # memory of a block in flight: network, watershed and their copies, per pixel read

#: ``progress(done, total)``: blocks finished so far (resumed ones included) of all blocks.
Progress = Callable[[int, int], None]


def default_workers(n_blocks: int, block_pixels: int) -> int:
    """How many worker processes a local cluster gets: one per GPU; on a CPU, one per core, fewer when
    the memory would not hold that many blocks at once (``BYTES_PER_PIXEL`` per pixel of a block read)."""
    if os.environ.get(WORKERS_ENV):
        return max(1, int(os.environ[WORKERS_ENV]))
    try:
        gpus = torch.cuda.device_count()
    except Exception:
        gpus = 0
    if gpus:
        return max(1, min(gpus, n_blocks))
    per_block = BYTES_PER_PIXEL * block_pixels + (300 << 20)
    available = available_memory()
    by_memory = max(1, int(available * 0.6 // per_block)) if available else 1
    return max(1, min(usable_cores(), n_blocks, by_memory))


def _target_part(target: np.ndarray | None, block: Block) -> np.ndarray | None:
    if target is None:
        return None
    return np.ascontiguousarray(target[block.rows[0]:block.rows[1], block.cols[0]:block.cols[1]])


def blocks_written(job: BlockJob, shape: tuple[int, int]) -> tuple[int, int]:
    """(blocks written, blocks in all) as the output folder says: what a stopped prediction keeps (blocks that
    were in flight on other workers when it stopped count once their marker is there)."""
    shape = (int(shape[0]), int(shape[1]))
    blocks = plan(job, shape)
    done = finished_blocks(job)
    written = sum(len(b) if i in done else sum(marker_path(job, x.key).is_file() for x in b)
                  for i, b in blocks.items())
    return written, sum(len(b) for b in blocks.values())


def run_blocks(job: BlockJob, shape: tuple[int, int], *, targets: Mapping[int, np.ndarray] | None = None,
               progress: Progress | None = None, pixel_size_nm: float | None = None,
               scheduler: str | None = None, workers: int | None = None,
               pipeline: bool | None = None, cores: int | None = None,
               share: Callable[[], int] | None = None) -> dict[int, dict[str, Any]]:
    """Predict every block not finished yet and return every output slice's marker (index → marker).

    Args:
        job: the prediction (checkpoint, volume, output folder, slices, options).
        shape: a slice's (Y, X).
        targets: labels of some slices ({slice: target}), to score those slices.
        progress: told (blocks finished, blocks in all) as blocks finish.
        scheduler: a Dask scheduler's address (default ``$NEUROSEG_DASK_SCHEDULER``; none: a local cluster).
        workers: worker processes of a local cluster (default :func:`default_workers`); 1 runs the blocks
            in this process.
        pipeline: in this process, predict whole slices in a pipeline (:mod:`unet.prediction.pipeline`:
            reads, the device and the host's neurons and writes overlap); default: on a GPU.
        cores: the CPU cores a local run may keep busy (default: all): its worker processes, and the torch
            threads in all, stay within them (the app gives a prediction its share while a training runs).
        share: asked as blocks finish, the cores a local run may keep busy from then on (default: ``cores``
            all along): a run in this process sets its torch threads to it, a local cluster keeps no more
            blocks in flight than it allows. With no ``cores``, its first answer is the cores to start with.
            Not asked when ``job.threads`` is set.
    """
    shape = (int(shape[0]), int(shape[1]))
    targets = targets or {}
    report = progress or (lambda _done, _total: None)
    create_outputs(job, shape, pixel_size_nm)
    blocks = plan(job, shape)
    done = finished_blocks(job)
    total = sum(len(b) for b in blocks.values())
    todo = {i: [b for b in blocks[i] if not marker_path(job, b.key).is_file()] for i in blocks if i not in done}
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
    share = share if not (scheduler or job.threads) else None  # (a job's own thread count is kept)
    cores = cores or (share() if share else None)
    ceiling = omp_threads()

    def capped(threads: int) -> int:  # torch threads per process: never beyond what an operator set
        return max(1, min(threads, ceiling or threads))

    if cores and not scheduler:
        n = min(n, cores)
        job = replace(job, threads=job.threads or capped(cores // n))
    if not scheduler and n == 1:
        whole = [i for i, left in todo.items() if left and left[0].part is None]
        if pipeline is None and whole:
            pipeline = str(model_of(job)[1]).startswith("cuda")
        if pipeline and whole:
            def finished(i: int, marker: dict[str, Any]) -> None:
                nonlocal count
                done[i] = marker
                count += 1
                report(count, total)

            run_slices(job, whole, lambda i: targets.get(job.slices[i]), finished)
        for i, left in todo.items():
            if i in done:  # (predicted in the pipeline)
                continue
            for block in left:
                fn, *args = work(block)
                result = fn(*args)
                count += 1
                if block.part is None:
                    done[i] = result
                report(count, total)
                if share and capped(share()) != job.threads:  # (fewer threads beside another CPU job)
                    job = replace(job, threads=capped(share()))
            if i not in done:
                done[i] = stitch(job, i, shape)
        return done
    from distributed import Client, LocalCluster, as_completed  # only for a cluster: a one-worker run never loads it

    cluster = None
    if not scheduler:
        job = replace(job, threads=job.threads or capped(usable_cores() // n))  # (with ``cores``, set above)
        # on loopback only, its HTTP endpoint on a free port (no dashboard is installed)
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", silence_logs=40, memory_limit=0)
    queue = [(i, block) for i, left in todo.items() for block in left]
    queue.reverse()  # (popped from the end: in order)

    def allowed() -> int | None:  # blocks in flight at most (None: all at once): as the run's share of the cores
        return max(1, share() // max(1, job.threads)) if share else None

    try:
        with Client(scheduler or cluster) as client:
            kinds: dict[str, tuple[str, int]] = {}
            submitted: list = []  # (cancelled when this run stops early: a cluster elsewhere would finish them)
            tiles: dict[int, list] = {i: [] for i in todo}
            waiting = as_completed()

            def submit(fn, *args, key: str, kind: str, i: int) -> None:
                future = client.submit(fn, *args, key=key, pure=False, retries=1)
                submitted.append(future)
                kinds[future.key] = (kind, i)
                waiting.add(future)
                if kind == "tile":
                    tiles[i].append(future)
                if kind != "stitch" and blocks[i][0].part is not None and len(tiles[i]) == len(todo[i]):
                    # a tiled slice's stitch, once its tiles are all asked for (it waits for them)
                    submit(stitch, job, i, shape, *tiles[i], key=f"stitch-{job.out}-{i}", kind="stitch", i=i)

            for i, left in todo.items():
                if not left and blocks[i][0].part is not None:  # (its tiles were all done: only the stitch)
                    submit(stitch, job, i, shape, key=f"stitch-{job.out}-{i}", kind="stitch", i=i)
            in_flight = 0
            try:
                while True:
                    while queue and ((limit := allowed()) is None or in_flight < limit):
                        i, block = queue.pop()
                        fn, *args = work(block)
                        submit(fn, *args, key=f"block-{job.out}-{block.key}",
                               kind="slice" if block.part is None else "tile", i=i)
                        in_flight += 1
                    future = next(waiting, None)
                    if future is None:
                        break
                    kind, i = kinds[future.key]
                    result = future.result()
                    if kind != "stitch":
                        count += 1
                        in_flight -= 1
                    if kind != "tile":
                        done[i] = result
                    if kind != "stitch":
                        report(count, total)
            except BaseException:  # (a cancel from the progress report, an error, a signal): a cluster elsewhere
                with contextlib.suppress(Exception):  # would otherwise finish the blocks asked for, and write them
                    client.cancel(submitted, force=True)
                raise
    finally:
        if cluster is not None:
            cluster.close()
    return done
