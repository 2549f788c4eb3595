"""The supervisor: the one place that settles jobs. Every few seconds it reconciles (a dead or silent
worker, an unheeded cancel, a dead prediction process: :func:`storage.jobs.queue.reconcile`) and starts the
queued runs of idle devices. The app starts one per server process (so a hung worker is stopped even
when nobody has a page open); it also runs on its own::

    python -m storage.jobs.supervisor                    # forever, on $NEUROSEG_DATA_DIR / $DATABASE_URL
    python -m storage.jobs.supervisor --exit-when-idle   # until no run or prediction is queued or running
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import threading
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from domain.kinds import ACTIVE
from storage.db import open_store
from storage.jobs.queue import CANCEL_GRACE, HEARTBEAT_STALE, Reconciled, reconcile, start_queued
from storage.models import Prediction, Run
from storage.settings import Settings

log = logging.getLogger(__spec__.name if __spec__ else __name__)  # its real name, run as `python -m` too

INTERVAL_S = 2.0


class Supervisor:
    """``tick()`` once, or ``start()`` a daemon thread that ticks every ``interval`` seconds."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, *, interval: float = INTERVAL_S,
                 cancel_grace: timedelta = CANCEL_GRACE, heartbeat_stale: timedelta = HEARTBEAT_STALE):
        self.sessions, self.settings, self.interval = sessions, settings, interval
        self.cancel_grace, self.heartbeat_stale = cancel_grace, heartbeat_stale
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sigterm_sent: dict = {}  # (run id, worker pid) or ("prediction", id, pid) → when it sent SIGTERM

    def tick(self) -> Reconciled:
        with self.sessions.begin() as s:
            done = reconcile(s, cancel_grace=self.cancel_grace, heartbeat_stale=self.heartbeat_stale,
                             sigterm_sent=self._sigterm_sent)
        start_queued(self.sessions, self.settings)
        return done

    def busy(self) -> bool:
        """Whether a run or a prediction is queued or running."""
        with self.sessions.begin() as s:
            runs = s.scalar(select(func.count()).select_from(Run).where(Run.status.in_(ACTIVE))) or 0
            predictions = s.scalar(select(func.count()).select_from(Prediction)
                                   .where(Prediction.status.in_(ACTIVE))) or 0
        return bool(runs or predictions)

    def run(self, exit_when_idle: bool = False, report=None) -> None:
        """Tick until :meth:`stop` (or, with ``exit_when_idle``, until nothing is queued or running)."""
        failing = ""
        while not self._stop.is_set():
            try:
                done = self.tick()
            except Exception as exc:  # an unreachable database: try again next time, say so once
                message = f"{type(exc).__name__}: {exc}".splitlines()[0]
                if message != failing:
                    log.warning(f"supervisor: {message} (retrying every {self.interval:g} s)")
                failing = message
            else:
                if failing:
                    log.info("supervisor: the store answers again")
                    failing = ""
                if report is not None:
                    report(done)
                if exit_when_idle and not self.busy():
                    return
            self._stop.wait(self.interval)

    def start(self) -> Supervisor:
        self._thread = threading.Thread(target=self.run, name="neuroseg-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._thread.join(timeout=10)


def _report(done: Reconciled) -> None:
    """What the command line prints of each tick (its user's output at a terminal, not the log)."""
    for run_id, sig in done.signalled:
        print(f"run {run_id}: sent {sig} to its worker", flush=True)
    for prediction_id, sig in done.signalled_predictions:
        print(f"prediction {prediction_id}: sent {sig} to its process", flush=True)
    for what, ids in (("lost", done.lost), ("cancelled", done.cancelled),
                      ("failed prediction", done.failed_predictions),
                      ("cancelled prediction", done.cancelled_predictions)):
        for job_id in ids:
            print(f"{what}: {job_id}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m storage.jobs.supervisor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval", type=float, default=INTERVAL_S, help="seconds between ticks")
    ap.add_argument("--cancel-grace", type=float, default=CANCEL_GRACE.total_seconds(),
                    help="seconds a worker may ignore a cancel before it is terminated")
    ap.add_argument("--exit-when-idle", action="store_true", help="stop once nothing is queued or running")
    args = ap.parse_args(argv)
    settings = Settings.from_env()
    sessions, _ = open_store(settings, migrate=True)
    with contextlib.suppress(KeyboardInterrupt):
        Supervisor(sessions, settings, interval=args.interval, cancel_grace=timedelta(seconds=args.cancel_grace)
                   ).run(args.exit_when_idle, _report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
