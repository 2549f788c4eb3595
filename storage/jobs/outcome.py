"""How a background job ends, the same for the training worker and the prediction process: FINISHED when
its body returns (or what the body set, e.g. CANCELLED when it stopped on request), CANCELLED when a
signal stopped it, FAILED with the traceback when it raised. The status is written however it ended."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from domain.kinds import RunStatus
from storage import logs
from storage.models import Prediction, Run
from storage.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    status: RunStatus = RunStatus.FINISHED
    error: str | None = None


class Cancelled(Exception):
    """A job stopping because it was asked to (its message says what it keeps): CANCELLED, not FAILED."""


def unwind_on_sigterm() -> None:
    """SIGTERM (the supervisor stopping a worker that ignores a cancel) unwinds like Ctrl-C, so the job
    still records how it ended."""
    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def run_to_end(sessions: sessionmaker[Session], table: type[Run] | type[Prediction], job_id: int,
               body: Callable[[Outcome], None], cleanup: Callable[[], None] | None = None) -> int:
    """Run ``body(outcome)``, then ``cleanup()``, then record the outcome on the job's row. Returns the
    process's exit code: 1 after a failure, else 0."""
    outcome = Outcome()
    try:
        body(outcome)
    except Cancelled as exc:
        outcome.status, outcome.error = RunStatus.CANCELLED, str(exc)
        log.info(f"{table.__tablename__[:-1]} {job_id}: {exc}")
    except KeyboardInterrupt:
        outcome.status, outcome.error = RunStatus.CANCELLED, "stopped by a signal"
        log.info(f"{table.__tablename__[:-1]} {job_id}: stopped by a signal")
    except BaseException as exc:
        outcome.status, outcome.error = RunStatus.FAILED, "".join(traceback.format_exception(exc))[-20000:]
        traceback.print_exc()
    finally:
        if cleanup is not None:
            with contextlib.suppress(Exception):
                cleanup()
        values: dict[str, object] = {"status": outcome.status, "error": outcome.error}
        if table is Run and outcome.status == RunStatus.QUEUED:  # paused (a live session yielding): queued again
            values.update(pid=None, pid_started=None, heartbeat=None)
        elif table is Run:
            values["finished"] = datetime.now(UTC)
        with sessions.begin() as s:
            s.execute(update(table).where(table.id == job_id).values(**values))
    return 1 if outcome.status == RunStatus.FAILED else 0


def job_main(argv: list[str] | None, module: str, option: str, run: Callable[[int, Settings], int]) -> int:
    """The command line of a job process: ``python -m <module> <option> N`` runs job N on the store of
    ``$NEUROSEG_DATA_DIR`` / ``$DATABASE_URL``."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description="Run one job of the store (started by "
                                 "the app's queue).")
    ap.add_argument(option, type=int, required=True, dest="job_id")
    logs.configure("stdout")  # the run's log file (the queue appends stdout and stderr to it)
    return run(ap.parse_args(argv).job_id, Settings.from_env())
