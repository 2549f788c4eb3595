"""The job queue: background processes for training runs and predictions.

:func:`start_queued` starts ``python -m storage.jobs.train_worker --run-id N`` as a fresh interpreter in its
own process group (stdout and stderr to the run's log) for the oldest QUEUED run of every idle device. A
run being launched is reserved first (compare-and-set on its pid); the worker then claims it (QUEUED →
RUNNING, :func:`claim`) in one UPDATE, and a partial unique index allows one RUNNING run per device, so a
repeated click, a rerun or a second browser never trains the same run twice. :func:`reconcile` marks a
job whose process is gone or silent, and escalates an unheeded cancel to SIGTERM, then SIGKILL; the
supervisor (:mod:`storage.jobs.supervisor`) calls it, never a read."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import torch
from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from domain.kinds import ACTIVE, RunKind, RunStatus
from domain.records import aware
from storage.jobs.procs import is_alive, start_time
from storage.models import Prediction, Run
from storage.records.files import FileStore
from storage.settings import PROJECT_ROOT, Settings
from unet.network.threads import shared_threads

log = logging.getLogger(__name__)

HEARTBEAT_STALE = timedelta(seconds=90)
CANCEL_GRACE = timedelta(seconds=30)
SHARE_EVERY = 10.0  # how often a CPU job counts the app's other CPU jobs and takes its share of the cores


def _reap(proc: subprocess.Popen) -> None:
    threading.Thread(target=proc.wait, daemon=True).start()  # no zombies once the caller is gone


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


TRAIN_PROCESSES_ENV = "NEUROSEG_TRAIN_PROCESSES"


def train_processes(device: str) -> int:
    """How many processes train one run: one per visible GPU (DistributedDataParallel, launched by
    torchrun) when the run trains on CUDA and more than one GPU is visible, else one;
    ``$NEUROSEG_TRAIN_PROCESSES`` sets it (on a CPU, N processes share the cores through gloo)."""
    if os.environ.get(TRAIN_PROCESSES_ENV):
        return max(1, int(os.environ[TRAIN_PROCESSES_ENV]))
    if device == "cpu":
        return 1
    try:
        return max(1, torch.cuda.device_count()) if device in ("auto", "cuda") else 1
    except Exception:
        return 1


def launch_worker(settings: Settings, run_id: int, kind: str = RunKind.TRAIN, device: str = "cpu") -> subprocess.Popen:
    """The process of a run: a training worker (under torchrun, one process per GPU, when
    :func:`train_processes` says so), or a live session's (:mod:`storage.jobs.live_worker`)."""
    log = FileStore(settings.data_dir).worker_log(run_id)
    if kind == RunKind.LIVE:
        return launch(settings, "storage.jobs.live_worker", ["--run-id", str(int(run_id))], log)
    processes = train_processes(device)
    if processes > 1:
        return launch(settings, "torch.distributed.run", [
            "--standalone", f"--nproc-per-node={processes}", "-m", "storage.jobs.train_worker",
            "--run-id", str(int(run_id))], log)
    return launch(settings, "storage.jobs.train_worker", ["--run-id", str(int(run_id))], log)


def launch_prediction(sessions: sessionmaker[Session], settings: Settings, prediction_id: int) -> subprocess.Popen:
    """Start the process of a QUEUED prediction and record its pid, so that one that dies before it has
    started is noticed too."""
    proc = launch(settings, "storage.jobs.predict_worker", ["--prediction-id", str(int(prediction_id))],
                  FileStore(settings.data_dir).prediction_log(prediction_id))
    with sessions.begin() as s:
        s.execute(update(Prediction).where(Prediction.id == prediction_id, Prediction.pid.is_(None))
                  .values(pid=proc.pid, pid_started=start_time(proc.pid)))
    return proc


def start_queued(sessions: sessionmaker[Session], settings: Settings) -> list[subprocess.Popen]:
    """Start a worker for the oldest QUEUED run of each device that is free, normal runs before live
    sessions (a live session yields its device to them, :mod:`storage.records.live`). Returns the processes."""
    with sessions.begin() as s:
        runs = s.scalars(select(Run).where(Run.status.in_(ACTIVE)).order_by(Run.kind == RunKind.LIVE, Run.id)).all()
        launching = {r.id for r in runs if r.status == RunStatus.QUEUED and r.pid is not None
                     and (r.pid == 0 or is_alive(r.pid, r.pid_started))}
        busy = {r.device for r in runs if r.status == RunStatus.RUNNING or r.id in launching}
        chosen: dict[str, tuple[int, int | None, str]] = {}
        for run in runs:
            if run.status == RunStatus.QUEUED and run.device not in busy and run.device not in chosen:
                chosen[run.device] = (run.id, run.pid, run.kind)
    started = []
    for device, (run_id, seen_pid, kind) in chosen.items():
        with sessions.begin() as s:
            same = Run.pid.is_(None) if seen_pid is None else Run.pid == seen_pid
            reserved = s.execute(update(Run).where(Run.id == run_id, Run.status == RunStatus.QUEUED, same)
                                 .values(pid=0)).rowcount == 1
        if not reserved:
            continue
        proc = launch_worker(settings, run_id, kind, device)
        with sessions.begin() as s:
            s.execute(update(Run).where(Run.id == run_id, Run.status == RunStatus.QUEUED, Run.pid == 0)
                      .values(pid=proc.pid, pid_started=start_time(proc.pid)))
        started.append(proc)
    return started


def cpu_jobs_beside(session: Session, *, run_id: int | None = None, prediction_id: int | None = None) -> int:
    """How many of the app's jobs other than this one compute on the CPU now: a running training or live
    session on the CPU, and running predictions on the CPU (one whose worker has not said where yet counts too)
    (a CPU job shares the cores with them: :func:`unet.network.threads.shared_threads`)."""
    runs = session.scalar(select(func.count()).select_from(Run).where(
        Run.status == RunStatus.RUNNING, Run.device == "cpu", Run.id != (run_id or -1)))
    predictions = session.scalar(select(func.count()).select_from(Prediction).where(
        Prediction.status == RunStatus.RUNNING, Prediction.id != (prediction_id or -1),
        or_(Prediction.device.is_(None), Prediction.device == "cpu")))
    return int(runs or 0) + int(predictions or 0)


class CoreShare:
    """The threads of a CPU job while the app's other CPU jobs run beside it: its own choice ``chosen``, but no
    more than its share of the cores (:func:`unet.network.threads.shared_threads`). Asked as it works, it
    counts the others again at most every ``SHARE_EVERY`` seconds, so it gives cores up when another job starts
    and takes its choice back when they end (a training from its metric flushes, a prediction as blocks
    finish). A database error keeps the last answer: it is only advice."""

    def __init__(self, sessions: sessionmaker[Session], chosen: int, *, run_id: int | None = None,
                 prediction_id: int | None = None):
        self.sessions, self.chosen = sessions, max(1, int(chosen))
        self.run_id, self.prediction_id = run_id, prediction_id
        self.threads, self.others, self.last = self.chosen, 0, float("-inf")

    def __call__(self) -> int:
        if time.monotonic() - self.last < SHARE_EVERY:
            return self.threads
        self.last = time.monotonic()
        try:
            with self.sessions.begin() as s:
                self.others = cpu_jobs_beside(s, run_id=self.run_id, prediction_id=self.prediction_id)
        except SQLAlchemyError as exc:
            log.warning(f"{self}: the other CPU jobs could not be counted: {exc}")
            return self.threads
        self.threads = shared_threads(self.chosen, self.others)
        return self.threads

    def __str__(self) -> str:
        return f"run {self.run_id}" if self.run_id is not None else f"prediction {self.prediction_id}"


def claim(session: Session, run_id: int, pid: int, pid_started: float | None) -> bool:
    """QUEUED → RUNNING for this process, atomically; False when another worker got it first."""
    now = datetime.now(UTC)
    try:
        with session.begin_nested():
            result = session.execute(update(Run).where(Run.id == run_id, Run.status == RunStatus.QUEUED).values(
                status=RunStatus.RUNNING, pid=pid, pid_started=pid_started, started=now, heartbeat=now, error=None))
    except IntegrityError:  # another run holds the device
        return False
    return result.rowcount == 1


@dataclass
class Reconciled:
    """What one :func:`reconcile` did."""

    lost: list[int] = field(default_factory=list)  # runs whose worker died or went silent
    cancelled: list[int] = field(default_factory=list)  # runs whose worker was stopped after a cancel
    signalled: list[tuple[int, str]] = field(default_factory=list)  # (run id, "SIGTERM" | "SIGKILL")
    failed_predictions: list[int] = field(default_factory=list)
    cancelled_predictions: list[int] = field(default_factory=list)  # asked to stop, and their process is gone
    signalled_predictions: list[tuple[int, str]] = field(default_factory=list)


def reconcile(session: Session, now: datetime | None = None, *, heartbeat_stale: timedelta = HEARTBEAT_STALE,
              cancel_grace: timedelta = CANCEL_GRACE,
              sigterm_sent: dict[tuple, datetime] | None = None) -> Reconciled:
    """Settle what the processes cannot say themselves. A RUNNING run whose worker is gone becomes
    CANCELLED when a cancel was asked for, else LOST; one that is silent is LOST (and terminated). A worker
    that ignores a cancel for ``cancel_grace`` gets SIGTERM (it unwinds and records CANCELLED), and SIGKILL
    when it is still there ``cancel_grace`` after that. ``sigterm_sent`` remembers the SIGTERMs between
    calls (the supervisor keeps it), so one started late still warns first; without it the SIGKILL comes
    twice the grace after the cancel. A prediction whose process is gone is FAILED (CANCELLED when it was asked
    to stop); one that does not heed a cancel is stopped the same way."""
    now = now or datetime.now(UTC)
    sent = sigterm_sent if sigterm_sent is not None else {}
    done = Reconciled()
    for run in session.scalars(select(Run).where(Run.status == RunStatus.RUNNING)):
        alive = is_alive(run.pid, run.pid_started)
        heartbeat, cancelled = aware(run.heartbeat), aware(run.cancel_requested)
        if not alive and cancelled is not None:
            run.status, run.finished = RunStatus.CANCELLED, now
            run.error = "cancelled: the worker was stopped (it did not stop by itself)"
            done.cancelled.append(run.id)
        elif not alive or heartbeat is None or now - heartbeat > heartbeat_stale:
            reason = ("the worker process is gone" if not alive else
                      f"no heartbeat since {heartbeat:%H:%M:%S} UTC" if heartbeat else "no heartbeat")
            run.status, run.finished = RunStatus.LOST, now
            run.error = f"LOST: {reason} (pid {run.pid}); resume continues from the latest checkpoint"
            if alive and run.pid:
                terminate(run.pid)
                done.signalled.append((run.id, "SIGTERM"))
            done.lost.append(run.id)
        elif cancelled is not None and now - cancelled > cancel_grace and run.pid:
            # (per worker: a resumed run's next worker is warned anew)
            done.signalled.append((run.id, _stop_unheeded(run.pid, (run.id, run.pid), cancelled, now, sent,
                                                          sigterm_sent is not None, cancel_grace)))
    for row in session.scalars(select(Prediction).where(Prediction.status.in_(ACTIVE))):
        cancelled = aware(row.cancel_requested)
        key = ("prediction", row.id, row.pid)
        if row.pid is not None and not is_alive(row.pid, row.pid_started):
            if cancelled is not None and key in sent:  # (stopped here after a cancel; a crash is no cancel)
                row.status, row.error = RunStatus.CANCELLED, "cancelled: its process was stopped"
                done.cancelled_predictions.append(row.id)
            else:
                row.status = RunStatus.FAILED
                row.error = f"the prediction process (pid {row.pid}) stopped before it finished; start it again"
                done.failed_predictions.append(row.id)
        elif cancelled is not None and now - cancelled > cancel_grace and row.pid:  # (a block that takes long)
            done.signalled_predictions.append((row.id, _stop_unheeded(row.pid, key, cancelled, now, sent,
                                                                      sigterm_sent is not None, cancel_grace)))
    session.flush()
    return done


def _stop_unheeded(pid: int, key: tuple, cancelled: datetime, now: datetime, sent: dict, remembered: bool,
                   grace: timedelta) -> str:
    """SIGTERM a job's process that ignores a cancel, SIGKILL it ``grace`` after the first SIGTERM (``sent``
    remembers when, by ``key``; not ``remembered`` between calls: twice the grace after the cancel). Returns
    the signal's name."""
    warned = sent.get(key) if remembered else cancelled + grace
    kill = warned is not None and now - warned > grace
    terminate(pid, signal.SIGKILL if kill else signal.SIGTERM)
    sent.setdefault(key, now)
    return "SIGKILL" if kill else "SIGTERM"


def terminate(pid: int, sig: int = signal.SIGTERM) -> None:
    """Signal a worker's process group (it leads its own) and every process below it that left the group
    (torchrun starts each training process in a session of its own)."""
    below = _descendants(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for child in below:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, sig)


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux: from /proc; elsewhere none)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
