"""The training worker: ``python -m storage.train_worker --run-id N`` (started by :mod:`storage.queue`).

It claims its run, loads the recorded mask versions, trains through :func:`unet.train.train` with a
reporter that writes metrics and registers checkpoints in batches, keeps a heartbeat from a separate
thread (so a long validation is not mistaken for a dead worker), stops when the run is cancelled, records
how it ended (:mod:`storage.outcome`, shared with the prediction process), then starts the next queued
run of its device."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from domain.kinds import RunStatus
from storage.db import open_store
from storage.files import FileStore, sha256_of
from storage.masks import load_mask
from storage.models import Checkpoint, MaskVersion, Metric, Run, RunMask
from storage.outcome import Outcome, job_main, run_to_end, unwind_on_sigterm
from storage.procs import start_time
from storage.queue import claim, start_queued
from storage.settings import Settings
from unet.config import TrainConfig
from unet.data import TrainData
from unet.train import NullReporter, train

HEARTBEAT_EVERY = 10.0
FLUSH_EVERY = 2.0


class DatabaseReporter(NullReporter):
    """Writes metric rows in batches, registers checkpoints, and answers should_stop from the database."""

    def __init__(self, sessions: sessionmaker[Session], store: FileStore, run_id: int):
        self.sessions, self.store, self.run_id = sessions, store, run_id
        self.pending: list[Metric] = []
        self.last_flush = time.monotonic()
        self.stop = False

    def _flush(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_flush < FLUSH_EVERY:
            return
        with self.sessions.begin() as s:
            s.add_all(self.pending)
            cancel = s.scalar(select(Run.cancel_requested).where(Run.id == self.run_id))
        self.pending = []
        self.stop = self.stop or cancel is not None
        self.last_flush = time.monotonic()

    def on_step(self, step: int, loss: float, lr: float, seconds: float) -> None:
        self.pending += [Metric(run_id=self.run_id, key="loss", step=step, value=loss, time=seconds),
                         Metric(run_id=self.run_id, key="lr", step=step, value=lr, time=seconds)]
        self._flush()

    def on_validation(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        self.pending += [Metric(run_id=self.run_id, key=k, step=step, value=v, time=seconds)
                         for k, v in metrics.items()]
        self._flush(force=True)

    def on_checkpoint(self, kind: str, path: Path, step: int, metrics: dict[str, float]) -> None:
        relative = str(path.resolve().relative_to(self.store.root))
        with self.sessions.begin() as s:
            row = s.scalar(select(Checkpoint).where(Checkpoint.run_id == self.run_id, Checkpoint.kind == kind))
            if row is None:
                row = Checkpoint(run_id=self.run_id, kind=kind, file=relative, step=step, sha256="", metrics={})
                s.add(row)
            row.step, row.sha256 = step, sha256_of(path)
            row.metrics = {k: v for k, v in metrics.items() if isinstance(v, int | float)}

    def should_stop(self) -> bool:
        if time.monotonic() - self.last_flush >= FLUSH_EVERY:  # asked between tiles too: read the flag
            self._flush(force=True)
        return self.stop

    def on_phase(self, text: str) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Run).where(Run.id == self.run_id).values(phase=text[:120]))

    def close(self) -> None:
        self._flush(force=True)


def _load_data(session: Session, store: FileStore, run_id: int) -> TrainData:
    from storage.datasets import load_volume

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


def _heartbeat(sessions: sessionmaker[Session], run_id: int, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_EVERY):
        with contextlib.suppress(Exception), sessions.begin() as s:
            s.execute(update(Run).where(Run.id == run_id).values(heartbeat=datetime.now(UTC)))


def _start_segment(sessions: sessionmaker[Session], run_id: int, out_dir: Path, resume: bool) -> int:
    """Where this start of the run begins: the step of its ``latest`` checkpoint, or 0. Metric rows past
    that step (written before a crash or a cancel, and about to be written again) are dropped, so no step
    is stored twice, and a "resume" row records the start, so the page can say what happened."""
    from unet.checkpoint import side_file

    step = 0
    if resume:
        with contextlib.suppress(OSError, ValueError):
            step = int(json.loads(side_file(out_dir / "latest.pt").read_text()).get("step", 0))
    with sessions.begin() as s:
        had = s.scalar(select(func.max(Metric.step)).where(Metric.run_id == run_id, Metric.key == "loss"))
        if had is not None:  # a first start has nothing to drop (and must not touch rows others wrote)
            s.execute(delete(Metric).where(Metric.run_id == run_id, Metric.step > step, Metric.key != "resume"))
            s.add(Metric(run_id=run_id, key="resume", step=step, value=float(had), time=0.0))
    if had is not None:
        print(f"run {run_id}: resumed from step {step}" + ("" if step else
              f" (it had reached step {had} but stopped before its first checkpoint: it starts again)"),
              flush=True)
    return step


def run_worker(run_id: int, settings: Settings) -> int:
    """Train run ``run_id``. Under torchrun (several GPUs: :func:`storage.queue.train_processes`) every
    process runs this; rank 0 is the worker the store knows (it claims the run under the launcher's pid,
    whose process tree the supervisor signals; it keeps the heartbeat, reports and checkpoints), the others
    train their share of each batch and follow its decisions."""
    from unet.train import run_distributed

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
        import torch.distributed as dist

        dist.broadcast_object_list(shared, src=0)
        plan = shared[0]
    if plan is None:
        if rank == 0:
            print(f"run {run_id} is not queued or its device is busy; nothing to do")
        return 0
    config, parent_file, resume = TrainConfig.from_dict(plan["config"]), plan["parent"], plan["resume"]
    out_dir = store.run_dir(run_id)
    if rank != 0:
        with sessions.begin() as s:
            data = _load_data(s, store, run_id)
        train(config, data, None, out_dir=out_dir, resume=resume, init_from=None if resume else parent_file)
        return 0
    unwind_on_sigterm()
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(sessions, run_id, stop), daemon=True).start()
    reporter = DatabaseReporter(sessions, store, run_id)

    def body(outcome: Outcome) -> None:
        with sessions.begin() as s:
            data = _load_data(s, store, run_id)
        _start_segment(sessions, run_id, out_dir, resume)
        result = train(config, data, reporter, out_dir=out_dir, resume=resume,
                       init_from=None if resume else parent_file)
        if result.reason == "stopped":
            outcome.status = RunStatus.CANCELLED
        shared = f" ({world} processes)" if world > 1 else ""
        print(f"run {run_id}: {result.reason} after {result.steps_done} steps on {result.device}{shared}", flush=True)
        if outcome.status == RunStatus.FINISHED:
            from storage.heldout import score_run

            reporter.on_phase("scoring on the held-out slices")
            if score_run(sessions, store, run_id, device=result.device):
                print(f"run {run_id}: scored on the held-out slices", flush=True)

    try:
        return run_to_end(sessions, Run, run_id, body, cleanup=reporter.close)
    finally:
        stop.set()
        start_queued(sessions, settings)  # the device is free: next in line


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, "storage.train_worker", "--run-id", run_worker)


if __name__ == "__main__":
    sys.exit(main())
