"""What every run's worker shares (training and live sessions): a reporter that writes metric rows in batches,
registers checkpoints and answers "should I stop?" from the database; a heartbeat from a thread of its own
(so a long validation is not mistaken for a dead worker); where a restarted run begins; and the lifecycle
itself (:func:`run_job`): unwind on SIGTERM, the heartbeat, the body run to its end with how it ended
recorded (:mod:`storage.jobs.outcome`), then the next queued run of the device."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.jobs.outcome import Outcome, run_to_end, unwind_on_sigterm
from storage.jobs.queue import CoreShare, start_queued
from storage.models import Checkpoint, Metric, Run
from storage.records.files import FileStore, sha256_of
from storage.settings import Settings
from unet.exchange.checkpoint import side_file
from unet.training.reporting import NullReporter

log = logging.getLogger(__name__)

HEARTBEAT_EVERY = 10.0
FLUSH_EVERY = 2.0


class DatabaseReporter(NullReporter):
    """Writes metric rows in batches, registers checkpoints, and answers should_stop from the database."""

    def __init__(self, sessions: sessionmaker[Session], store: FileStore, run_id: int):
        self.sessions, self.store, self.run_id = sessions, store, run_id
        self.pending: list[Metric] = []
        self.last_flush = time.monotonic()
        self.stop = False
        self.share: CoreShare | None = None  # training on the CPU: its threads, shared while others run

    def use_cpu_threads(self, chosen: int) -> None:
        """Train on the CPU with ``chosen`` torch threads, or fewer while the app's other CPU jobs run beside it
        (asked now, then again as it trains: :meth:`share_cores`)."""
        self.share = CoreShare(self.sessions, chosen, run_id=self.run_id)
        torch.set_num_threads(self.share.chosen)
        self.share_cores()

    def share_cores(self) -> None:
        """On the CPU: no more torch threads than this run's share of the cores while the app's other CPU jobs
        (predictions) run beside it, and its own choice again when they are done. Called from the training
        thread (a thread count is the calling thread's own)."""
        if self.share is None:
            return
        threads = self.share()
        if threads != torch.get_num_threads():
            log.info(f"run {self.run_id}: {threads} CPU thread(s), {self.share.others} other CPU job(s) beside it")
            torch.set_num_threads(threads)

    def _flush(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_flush < FLUSH_EVERY:
            return
        with self.sessions.begin() as s:
            s.add_all(self.pending)
            cancel = s.scalar(select(Run.cancel_requested).where(Run.id == self.run_id))
        self.pending = []
        self.stop = self.stop or cancel is not None
        self.last_flush = time.monotonic()
        self.share_cores()

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


def heartbeat(sessions: sessionmaker[Session], run_id: int, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_EVERY):
        with contextlib.suppress(Exception), sessions.begin() as s:
            s.execute(update(Run).where(Run.id == run_id).values(heartbeat=datetime.now(UTC)))


def start_segment(sessions: sessionmaker[Session], run_id: int, out_dir: Path, resume: bool) -> int:
    """Where this start of the run begins: the step of its ``latest`` checkpoint, or 0. Metric rows past
    that step (written before a crash or a cancel, and about to be written again) are dropped, so no step
    is stored twice, and a "resume" row records the start, so the page can say what happened."""
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
        log.info(f"run {run_id}: resumed from step {step}" + ("" if step else
                 f" (it had reached step {had} but stopped before its first checkpoint: it starts again)"))
    return step


def run_job(sessions: sessionmaker[Session], store: FileStore, settings: Settings, run_id: int,
            body: Callable[[Outcome, DatabaseReporter], None]) -> int:
    """Run ``body`` as run ``run_id``'s worker: unwind on SIGTERM, keep a heartbeat, hand it a reporter,
    record how it ended (its status and error), then start the next queued run of the device."""
    unwind_on_sigterm()
    stop = threading.Event()
    threading.Thread(target=heartbeat, args=(sessions, run_id, stop), daemon=True).start()
    reporter = DatabaseReporter(sessions, store, run_id)
    try:
        return run_to_end(sessions, Run, run_id, lambda outcome: body(outcome, reporter), cleanup=reporter.close)
    finally:
        stop.set()
        start_queued(sessions, settings)  # the device is free: next in line
