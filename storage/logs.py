"""The store's log. Every module of ``storage`` logs through ``logging.getLogger(__name__)``; :func:`configure`
sends those lines (INFO and up) to the process's stderr or stdout, with the time, the level and the module.
The server and the command line get stderr when they open the store (:func:`storage.db.open_store`); a job
process asks for stdout first (:func:`storage.jobs.outcome.job_main`): its queue appends both to the run's log
file, whose tail the Train page shows."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Standard(logging.StreamHandler):
    """Writes to ``sys.stdout`` or ``sys.stderr`` as they are when a line is logged (a test's capture, a
    redirect made after the start), as the standard library's last-resort handler does."""

    def __init__(self, which: str):
        logging.Handler.__init__(self)
        self.which = which

    @property
    def stream(self):
        return getattr(sys, self.which)


def configure(which: str = "stderr") -> None:
    """Once per process: the ``storage`` loggers' lines, INFO and up, to ``sys.stderr`` or ``sys.stdout``
    (``which``); a later call keeps the first one's choice."""
    logger = logging.getLogger("storage")
    if any(isinstance(handler, _Standard) for handler in logger.handlers):
        return
    handler = _Standard(which)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
