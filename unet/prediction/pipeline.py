"""Whole slices predicted in a pipeline on one device (issue 30: prediction that fills the device). Slice by
slice, :func:`unet.prediction.blockwise.run_block` leaves a GPU idle while the host reads the slice, makes its
neurons (a watershed on the CPU takes far longer than the network on a GPU) and writes it. Here three things
overlap:

- a reader thread reads and normalises the next slices while the device predicts the current ones;
- the device predicts ``together`` slices at once, their tiles sharing batches of ``batch_size``
  (:func:`unet.prediction.infer.predict_slices`: each slice gets the same answer as alone);
- a pool of host threads makes each slice's mask and neurons, scores it, writes its outputs and then its
  marker (:func:`unet.prediction.blockwise.finish_block`), while the device goes on.

The outputs and markers are those of :func:`~unet.prediction.blockwise.run_block`, slice for slice (a killed
run resumes from the markers written; a slice's chunks are its own, so threads never write the same chunk).
About ``ahead`` slices wait for the host at once (``ahead`` + ``together`` at most): memory stays bounded when
the host is the slower side. The first error stops the run at once; the slices being finished then are
finished (a marker is written last, so a slice cut short has none), and the ones not started are dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from unet.network.threads import usable_cores
from unet.prediction.blocks import BlockJob, marker_path, read_marker
from unet.prediction.blockwise import finish_block, model_of, volume_of
from unet.prediction.infer import predict_slices
from unet.prediction.segment import GPU_BATCH, GPU_TOGETHER
from unet.training.data import normalize_image


def host_threads() -> int:
    """Threads that finish slices on the host: the cores this process may use but one (the one that feeds
    the device), 1 to 8."""
    return max(1, min(8, usable_cores() - 1))


def run_slices(job: BlockJob, indices: list[int], target_of: Callable[[int], np.ndarray | None],
               on_done: Callable[[int, dict[str, Any]], None], *, together: int = GPU_TOGETHER,
               batch_size: int = GPU_BATCH,
               threads: int | None = None, ahead: int | None = None) -> None:
    """Predict output slices ``indices`` whole (see the module's text); ``on_done(index, marker)`` is told of
    each slice once its marker is written: those finished before first, then the others in order (a slice
    whose marker exists is not predicted again).
    The first error (a read, the network, a write) stops the run and is raised."""
    together, threads = max(1, together), threads or host_threads()
    ahead = ahead or 2 * max(together, threads)
    done = {i: read_marker(marker_path(job, i)) for i in indices}
    for i in indices:
        if done[i] is not None:
            on_done(i, done[i])
    todo = [i for i in indices if done[i] is None]
    if not todo:
        return
    model, device = model_of(job)
    volume = volume_of(job)
    groups = [todo[k:k + together] for k in range(0, len(todo), together)]

    def read(group: list[int]) -> list[np.ndarray]:
        return [normalize_image(np.asarray(volume[job.slices[i]])) for i in group]

    reader = ThreadPoolExecutor(1, thread_name_prefix="neuroseg-read")
    host = ThreadPoolExecutor(threads, thread_name_prefix="neuroseg-finish")
    waiting: deque[tuple[int, Future]] = deque()

    def settle(limit: int) -> None:
        for _, future in waiting:  # a slice that failed stops the run now, not when its turn comes
            if future.done() and future.exception() is not None:
                raise future.exception()
        while len(waiting) > limit:
            i, future = waiting.popleft()
            on_done(i, future.result())

    try:
        upcoming = reader.submit(read, groups[0])
        for g, group in enumerate(groups):
            images = upcoming.result()
            if g + 1 < len(groups):
                upcoming = reader.submit(read, groups[g + 1])
            probs = predict_slices(model, images, device=device, tta=job.tta, tile=job.network_tile or None,
                                   batch_size=batch_size, normalized=True)
            for i, prob in zip(group, probs, strict=True):
                waiting.append((i, host.submit(finish_block, job, i, prob, target_of(i))))
            settle(ahead)
        settle(0)
    except BaseException:  # (an error, or a cancel: the slices not started are dropped, not finished first)
        reader.shutdown(wait=True, cancel_futures=True)
        host.shutdown(wait=True, cancel_futures=True)
        raise
    reader.shutdown()
    host.shutdown()
