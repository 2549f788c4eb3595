"""The training worker: ``python -m storage.jobs.train_worker --run-id N`` (started by :mod:`storage.jobs.queue`).

It claims its run, loads the recorded mask versions and trains through :func:`unet.training.train.train`; the rest
of its life (the reporter that writes metrics and registers checkpoints, the heartbeat, stopping when the
run is cancelled, recording how it ended, starting the next queued run) is :func:`storage.jobs.lifecycle.run_job`,
shared with the live sessions' worker."""

from __future__ import annotations

import logging
import os
import sys

import torch.distributed as dist
from sqlalchemy import select
from sqlalchemy.orm import Session

from domain.kinds import RunStatus
from storage.db import open_store
from storage.jobs.lifecycle import DatabaseReporter, run_job, start_segment
from storage.jobs.outcome import Outcome, job_main
from storage.jobs.procs import start_time
from storage.jobs.queue import claim
from storage.models import Checkpoint, MaskVersion, Run, RunMask
from storage.records.datasets import load_volume
from storage.records.files import FileStore
from storage.records.heldout import score_run
from storage.records.masks import load_mask
from storage.settings import Settings
from unet.network.config import TrainConfig
from unet.network.device import pick_device
from unet.network.threads import choose_threads
from unet.training.data import TrainData
from unet.training.ddp import run_distributed
from unet.training.train import train

log = logging.getLogger(__spec__.name if __spec__ else __name__)  # its real name, run as `python -m` too


def _load_data(session: Session, store: FileStore, run_id: int) -> TrainData:
    volumes: dict[int, object] = {}
    sides: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], [])}
    rows = session.execute(select(RunMask.role, MaskVersion)
                           .join(MaskVersion, RunMask.mask_version_id == MaskVersion.id)
                           .where(RunMask.run_id == run_id)
                           .order_by(MaskVersion.dataset_id, MaskVersion.slice_index))
    for role, mask in rows:
        if mask.dataset_id not in volumes:
            volumes[mask.dataset_id] = load_volume(session, store, mask.dataset_id)
        images, targets = sides[role]
        images.append(volumes[mask.dataset_id][mask.slice_index])
        targets.append(load_mask(session, store, mask.id))
    return TrainData(*sides["train"], *sides["val"])


def run_worker(run_id: int, settings: Settings) -> int:
    """Train run ``run_id``. Under torchrun (several GPUs: :func:`storage.jobs.queue.train_processes`) every
    process runs this; rank 0 is the worker the store knows (it claims the run under the launcher's pid,
    whose process tree the supervisor signals; it keeps the heartbeat, reports and checkpoints), the others
    train their share of each batch and follow its decisions."""
    return run_distributed(lambda rank, world: _run_worker(run_id, settings, rank, world))


def _run_worker(run_id: int, settings: Settings, rank: int, world: int) -> int:
    sessions, store = open_store(settings)  # the server has migrated it
    plan = None
    if rank == 0:
        worker = os.getppid() if world > 1 else os.getpid()  # under torchrun: the launcher, which the server started
        with sessions.begin() as s:
            if claim(s, run_id, worker, start_time(worker)):
                run = s.get(Run, run_id)
                parent = s.get(Checkpoint, run.parent_checkpoint_id) if run.parent_checkpoint_id else None
                plan = {"config": run.config, "parent": str(store.abspath(parent.file)) if parent else None,
                        "resume": (store.run_dir(run_id) / "latest.pt").exists()}
    if world > 1:  # every process learns rank 0's claim and what it trains from
        shared = [plan]
        dist.broadcast_object_list(shared, src=0)
        plan = shared[0]
    if plan is None:
        if rank == 0:
            log.info(f"run {run_id} is not queued or its device is busy; nothing to do")
        return 0
    config, parent_file, resume = TrainConfig.from_dict(plan["config"]), plan["parent"], plan["resume"]
    out_dir = store.run_dir(run_id)
    if rank != 0:
        with sessions.begin() as s:
            data = _load_data(s, store, run_id)
        train(config, data, None, out_dir=out_dir, resume=resume, init_from=None if resume else parent_file)
        return 0

    def body(outcome: Outcome, reporter: DatabaseReporter) -> None:
        with sessions.begin() as s:
            data = _load_data(s, store, run_id)
        if world == 1 and pick_device(config.device).type == "cpu":  # not every core: what trains fastest here
            reporter.on_phase("choosing the number of CPU threads (once per machine and network)")
            reporter.use_cpu_threads(choose_threads(config))  # (fewer while predictions run beside it)
        start_segment(sessions, run_id, out_dir, resume)
        result = train(config, data, reporter, out_dir=out_dir, resume=resume,
                       init_from=None if resume else parent_file)
        if result.reason == "stopped":
            outcome.status = RunStatus.CANCELLED
        shared = f" ({world} processes)" if world > 1 else ""
        log.info(f"run {run_id}: {result.reason} after {result.steps_done} steps on {result.device}{shared}")
        if outcome.status == RunStatus.FINISHED:
            reporter.on_phase("scoring on the held-out slices")
            if score_run(sessions, store, run_id, device=result.device):
                log.info(f"run {run_id}: scored on the held-out slices")

    return run_job(sessions, store, settings, run_id, body)


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, "storage.jobs.train_worker", "--run-id", run_worker)


if __name__ == "__main__":
    sys.exit(main())
