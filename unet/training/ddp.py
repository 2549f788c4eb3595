"""Training on several GPUs with ``torchrun`` (DistributedDataParallel): this process's place in the process
group (:func:`distributed`), joining and leaving it (:func:`run_distributed`), rank 0's answer told to every
process (:func:`agree`) and this process's share of each global batch (:func:`share`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist


def distributed() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless it runs in an initialised process group (a run
    started by ``torchrun``, one process per GPU; :func:`init_distributed`)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1). Returns whether this is a
    distributed run. With CUDA, this process's GPU (``LOCAL_RANK``) becomes its current device *before* the
    group is made, and the group carries CUDA tensors over NCCL and CPU tensors over gloo: rank 0's answers
    (:func:`agree`, ``broadcast_object_list``) are small CPU tensors, which NCCL alone refuses, and NCCL's
    first collective otherwise runs every rank on GPU 0. Without CUDA: gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    if torch.cuda.is_available():  # CUDA-only
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local < torch.cuda.device_count():
            torch.cuda.set_device(local)
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    return True


def end_distributed(clean: bool = True) -> None:
    """Leave the process group (each process, once it is done): a process that exits with gloo's threads
    still running is aborted by the C++ runtime ("terminate called without an active exception"). After a
    clean end every process first waits for the others at a barrier, so no collective of another process
    is still in flight while this one's connections close (without it a rank was aborted now and then as
    it left); after an error it leaves at once (the others may never arrive)."""
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def run_distributed(work: Callable[[int, int], int]) -> int:
    """``work(rank, world)`` in the process group when started by ``torchrun``, else as ``work(0, 1)``.

    A distributed process that ends cleanly leaves with ``os._exit`` once its output is flushed: gloo's
    threads can outlive :func:`end_distributed`, and the interpreter's finalisation then aborts the process
    now and then ("terminate called without an active exception", seen about once in 20 runs on a loaded
    2-core machine, always after ``main`` returned), which torchrun reports as a failed run although every
    checkpoint was written. Nothing is left to finalise by then: checkpoints and the store are written and
    closed by ``work``."""
    joined = not (dist.is_available() and dist.is_initialized()) and init_distributed()  # not one a caller made
    clean = False
    try:
        code = work(*distributed())
        clean = True
    finally:
        end_distributed(clean)
    if joined:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def agree(flag: bool, world: int) -> bool:
    """Rank 0's answer, told to every process (a CPU tensor: over gloo, no GPU sync)."""
    return bool(agree_values([1.0 if flag else 0.0], world)[0])


def agree_values(values: list[float], world: int) -> list[float]:
    """Rank 0's numbers, told to every process."""
    if world <= 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def share(batches, rank: int, world: int):
    """This process's share of every global batch."""
    for xs, ys, ws in batches:
        per = len(xs) // world
        part = slice(rank * per, (rank + 1) * per)
        yield xs[part], ys[part], (ws[part] if ws is not None else None)
