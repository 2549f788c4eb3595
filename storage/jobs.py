"""Training runs as background processes.

``submit_training`` writes the run row (QUEUED) and its mask lineage first; ``start_queued`` then starts
``python -m storage.worker --run-id N`` as a fresh interpreter in its own process group (stdout and
stderr to the run's log) for the oldest QUEUED run of every idle device. The worker claims its run
(QUEUED → RUNNING) in one UPDATE, and a partial unique index allows one RUNNING run per device, so a
repeated click, a rerun or a second browser never trains the same run twice. ``reconcile`` marks a
RUNNING run whose process is gone or whose heartbeat is stale as LOST, and escalates an unheeded
cancel to SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.api import NotFound, latest_mask
from storage.files import FileStore
from storage.models import Checkpoint, Dataset, Metric, Run, RunMask
from storage.procs import is_alive
from storage.settings import PROJECT_ROOT, Settings
from unet.config import TrainConfig

HEARTBEAT_STALE = timedelta(seconds=90)
CANCEL_GRACE = timedelta(seconds=30)
ACTIVE = ("QUEUED", "RUNNING")


@dataclass(frozen=True)
class RunInfo:
    id: int
    status: str
    device: str
    spec: dict[str, Any]
    config: dict[str, Any]
    created: datetime
    started: datetime | None
    finished: datetime | None
    error: str | None
    pid: int | None
    cancel_requested: bool
    parent_checkpoint_id: int | None = None
    phase: str = ""  # what the worker does now: "training", "validating slice 2 of 3"
    train_seconds: float | None = None  # training time over every start of the run (resumes included)

    @property
    def dataset_ids(self) -> list[int]:
        return sorted({p["dataset_id"] for role in ("train", "val") for p in self.spec.get(role, [])})

    @property
    def duration_s(self) -> float | None:
        """How long it trained: the trainer's own clock, which carries on over resumes; else the wall
        time of its (last) start."""
        if self.train_seconds is not None:
            return self.train_seconds
        if self.started is None:
            return None
        end = _aware(self.finished) or datetime.now(UTC)
        return (end - _aware(self.started)).total_seconds()


def _info(row: Run, train_seconds: float | None = None) -> RunInfo:
    return RunInfo(row.id, row.status, row.device, row.spec, row.config, row.created, row.started, row.finished,
                   row.error, row.pid, row.cancel_requested is not None, row.parent_checkpoint_id, row.phase or "",
                   train_seconds)


def _train_seconds(session: Session, run_ids: list[int]) -> dict[int, float]:
    if not run_ids:
        return {}
    rows = session.execute(select(Metric.run_id, func.max(Metric.time))
                           .where(Metric.run_id.in_(run_ids), Metric.key == "loss").group_by(Metric.run_id))
    return {run_id: float(t) for run_id, t in rows if t is not None}


def device_key(config: TrainConfig) -> str:
    """The device a run will hold: 'cpu', 'cuda:0', 'mps'. Resolved at submit time."""
    from unet.device import pick_device

    device = pick_device(config.device)
    if device.type == "cuda":
        return f"cuda:{device.index or 0}"
    return device.type


def submit_training(session: Session, spec: dict[str, list[dict[str, Any]]], config: TrainConfig,
                    parent_checkpoint_id: int | None = None) -> RunInfo:
    """Record a run: ``spec = {"train": [{"dataset_id": 1, "slices": [0, 1]}], "val": [...]}``. The latest
    mask version of every slice is looked up now and recorded, so the run trains on exactly what the user
    saw when pressing Train. Call :func:`start_queued` after the transaction commits."""
    if not spec.get("train"):
        raise ValueError("choose at least one training slice")
    run = Run(status="QUEUED", spec=spec, config=config.to_dict(), device=device_key(config),
              parent_checkpoint_id=parent_checkpoint_id)
    session.add(run)
    session.flush()
    seen: set[int] = set()
    for role in ("train", "val"):
        for part in spec.get(role, []):
            dataset = session.get(Dataset, part["dataset_id"])
            if dataset is None:
                raise NotFound(f"dataset {part['dataset_id']} does not exist")
            for z in part["slices"]:
                mask = latest_mask(session, dataset.id, z)
                if mask is None:
                    raise ValueError(f"slice {z} of '{dataset.name}' has no mask yet: annotate it or leave it out")
                if mask.id in seen:
                    raise ValueError(f"slice {z} of '{dataset.name}' is in both the training and validation sets")
                seen.add(mask.id)
                session.add(RunMask(run_id=run.id, mask_version_id=mask.id, role=role))
    session.flush()
    return _info(run)


def _reap(proc: subprocess.Popen) -> None:
    threading.Thread(target=proc.wait, daemon=True).start()  # no zombies once the page is gone


def launch(settings: Settings, module: str, args: list[str], log: Path) -> subprocess.Popen:
    """``python -m module args`` as a fresh interpreter in its own process group (so it outlives the
    server), told where the store is, with stdout and stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NEUROSEG_DATA_DIR": str(settings.data_dir), "DATABASE_URL": settings.database_url,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=PROJECT_ROOT, start_new_session=True)
    _reap(proc)
    return proc


def worker_log(settings: Settings, run_id: int) -> Path:
    return FileStore(settings.data_dir).run_dir(run_id) / "worker.log"


def launch_worker(settings: Settings, run_id: int) -> subprocess.Popen:
    return launch(settings, "storage.worker", ["--run-id", str(int(run_id))], worker_log(settings, run_id))


def start_queued(sessions: sessionmaker[Session], settings: Settings) -> list[subprocess.Popen]:
    """Start a worker for the oldest QUEUED run of each device that is free. A run being launched is
    reserved first (compare-and-set on its pid), so a repeated click, a rerun or a second browser that
    calls this at the same moment starts nothing more."""
    from storage.procs import start_time

    with sessions.begin() as s:
        reconcile(s)
        runs = s.scalars(select(Run).where(Run.status.in_(ACTIVE)).order_by(Run.id)).all()
        launching = {r.id for r in runs if r.status == "QUEUED" and r.pid is not None
                     and (r.pid == 0 or is_alive(r.pid, r.pid_started))}
        busy = {r.device for r in runs if r.status == "RUNNING" or r.id in launching}
        chosen: dict[str, tuple[int, int | None]] = {}
        for run in runs:
            if run.status == "QUEUED" and run.device not in busy and run.device not in chosen:
                chosen[run.device] = (run.id, run.pid)
    started = []
    for run_id, seen_pid in chosen.values():
        with sessions.begin() as s:
            same = Run.pid.is_(None) if seen_pid is None else Run.pid == seen_pid
            reserved = s.execute(update(Run).where(Run.id == run_id, Run.status == "QUEUED", same)
                                 .values(pid=0)).rowcount == 1
        if not reserved:
            continue
        proc = launch_worker(settings, run_id)
        with sessions.begin() as s:
            s.execute(update(Run).where(Run.id == run_id, Run.status == "QUEUED", Run.pid == 0)
                      .values(pid=proc.pid, pid_started=start_time(proc.pid)))
        started.append(proc)
    return started


def claim(session: Session, run_id: int, pid: int, pid_started: float | None) -> bool:
    """QUEUED → RUNNING for this process, atomically; False when another worker got it first."""
    from sqlalchemy.exc import IntegrityError

    now = datetime.now(UTC)
    try:
        with session.begin_nested():
            result = session.execute(update(Run).where(Run.id == run_id, Run.status == "QUEUED").values(
                status="RUNNING", pid=pid, pid_started=pid_started, started=now, heartbeat=now, error=None))
    except IntegrityError:  # another run holds the device
        return False
    return result.rowcount == 1


def cancel_run(session: Session, run_id: int) -> RunInfo:
    """Ask a run to stop. A queued run is cancelled at once; a running one stops at its next step."""
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    if run.status == "QUEUED":
        run.status, run.finished = "CANCELLED", datetime.now(UTC)
    elif run.status == "RUNNING" and run.cancel_requested is None:
        run.cancel_requested = datetime.now(UTC)
    session.flush()
    return _info(run)


def resume_run(session: Session, run_id: int) -> RunInfo:
    """Queue a CANCELLED, FAILED or LOST run again; its worker continues from ``latest``."""
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    if run.status not in ("CANCELLED", "FAILED", "LOST"):
        raise ValueError(f"run {run_id} is {run.status}; only cancelled, failed or lost runs can be resumed")
    run.status, run.cancel_requested, run.finished, run.pid = "QUEUED", None, None, None
    session.flush()
    return _info(run)


def _aware(t: datetime | None) -> datetime | None:
    return t if t is None or t.tzinfo else t.replace(tzinfo=UTC)  # SQLite returns naive datetimes


def reconcile(session: Session, now: datetime | None = None) -> list[int]:
    """Mark RUNNING runs whose worker is gone or silent as LOST; SIGTERM workers that ignore a cancel.
    Returns the ids marked LOST."""
    now = now or datetime.now(UTC)
    lost = []
    for run in session.scalars(select(Run).where(Run.status == "RUNNING")):
        alive = is_alive(run.pid, run.pid_started)
        heartbeat = _aware(run.heartbeat)
        if not alive or heartbeat is None or now - heartbeat > HEARTBEAT_STALE:
            reason = ("the worker process is gone" if not alive else
                      f"no heartbeat since {heartbeat:%H:%M:%S} UTC" if heartbeat else "no heartbeat")
            run.status, run.finished = "LOST", now
            run.error = f"LOST: {reason} (pid {run.pid}); resume continues from the latest checkpoint"
            if alive and run.pid:
                _terminate(run.pid)
            lost.append(run.id)
        elif run.cancel_requested is not None and now - _aware(run.cancel_requested) > CANCEL_GRACE and run.pid:
            _terminate(run.pid)
    session.flush()
    return lost


def _terminate(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)  # the worker leads its own process group


def get_run(session: Session, run_id: int) -> RunInfo:
    reconcile(session)
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    return _info(run, _train_seconds(session, [run_id]).get(run_id))


def run_metrics(session: Session, run_id: int, key: str) -> list[tuple[int, float, float]]:
    """(step, value, seconds) of one metric, in step order."""
    rows = session.execute(select(Metric.step, Metric.value, Metric.time)
                           .where(Metric.run_id == run_id, Metric.key == key).order_by(Metric.step))
    return [tuple(r) for r in rows]


def run_curves(session: Session, run_id: int) -> dict[str, list[tuple[int, float, float]]]:
    """Every metric of a run, {key: [(step, value, seconds), …]} in step order, in one query."""
    curves: dict[str, list[tuple[int, float, float]]] = {}
    rows = session.execute(select(Metric.key, Metric.step, Metric.value, Metric.time)
                           .where(Metric.run_id == run_id).order_by(Metric.key, Metric.step))
    for key, step, value, seconds in rows:
        curves.setdefault(key, []).append((step, value, seconds))
    return curves


def list_runs(session: Session) -> list[RunInfo]:
    reconcile(session)
    rows = list(session.scalars(select(Run).order_by(Run.id.desc())))
    seconds = _train_seconds(session, [r.id for r in rows])
    return [_info(r, seconds.get(r.id)) for r in rows]


def run_masks(session: Session, run_id: int) -> list[dict[str, Any]]:
    """The mask versions a run trained and validated on."""
    from storage.models import MaskVersion

    rows = session.execute(select(RunMask.role, MaskVersion, Dataset.name)
                           .join(MaskVersion, RunMask.mask_version_id == MaskVersion.id)
                           .join(Dataset, MaskVersion.dataset_id == Dataset.id)
                           .where(RunMask.run_id == run_id)
                           .order_by(RunMask.role.desc(), MaskVersion.dataset_id, MaskVersion.slice_index))
    return [{"role": role, "dataset_id": m.dataset_id, "dataset": name, "slice": m.slice_index,
             "version": m.version, "kind": m.kind, "author": m.author, "labelled_pixels": m.labelled_pixels,
             "mask_id": m.id} for role, m, name in rows]


def checkpoint_run(session: Session, checkpoint_id: int | None) -> int | None:
    if checkpoint_id is None:
        return None
    row = session.get(Checkpoint, checkpoint_id)
    return row.run_id if row else None


def child_runs(session: Session, run_id: int) -> list[int]:
    """Runs fine-tuned from one of this run's checkpoints."""
    return list(session.scalars(select(Run.id).join(Checkpoint, Run.parent_checkpoint_id == Checkpoint.id)
                                .where(Checkpoint.run_id == run_id).order_by(Run.id)))


def delete_checkpoint(session: Session, store: FileStore, checkpoint_id: int) -> int:
    """Delete one checkpoint (its predictions go with it; runs fine-tuned from it keep running and forget
    their parent). Returns the number of files removed."""
    from storage.models import Prediction

    row = session.get(Checkpoint, checkpoint_id)
    if row is None:
        raise NotFound(f"checkpoint {checkpoint_id} does not exist")
    run = session.get(Run, row.run_id)
    if run.status in ACTIVE:
        raise ValueError(f"run {run.id} is {run.status}: its checkpoints are still being written")
    predictions = list(session.scalars(select(Prediction.id).where(Prediction.checkpoint_id == checkpoint_id)))
    from unet.checkpoint import side_file

    path = store.abspath(row.file)
    session.delete(row)
    session.flush()
    removed = 0
    for p in (path, side_file(path)):
        if p.is_file():
            p.unlink()
            removed += 1
    return removed + sum(store.delete_tree(f"predictions/{p}") for p in predictions)


def run_checkpoints(session: Session, run_id: int) -> list[dict[str, Any]]:
    rows = session.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.id))
    return [{"id": c.id, "kind": c.kind, "step": c.step, "file": c.file, "sha256": c.sha256, "metrics": c.metrics}
            for c in rows]


def startup(settings: Settings | None = None) -> tuple[sessionmaker[Session], FileStore, Settings]:
    """What the app does once per process: open (and migrate) the store, mark runs orphaned by a crash
    as LOST, and start the queued runs. Runs still training in their own processes are left alone:
    the pages find them through the database (a server restart re-attaches)."""
    from storage.db import open_store

    settings = settings or Settings.from_env()
    sessions, store = open_store(settings)
    start_queued(sessions, settings)  # reconciles first
    return sessions, store, settings
