"""What the pages call: one object over the database, the file store and the jobs, one method per thing a
page does. It holds no SQL and no rules of its own: each method runs one function of the entity modules
(:mod:`storage.records.datasets`, :mod:`storage.records.masks`, :mod:`storage.records.drafts`,
:mod:`storage.records.runs`, :mod:`storage.records.predictions`, :mod:`storage.records.deletion`,
:mod:`storage.records.ingest`) in its own transaction and
returns :mod:`domain.records`. Errors a user can act on come out as :class:`UserError` (or
:class:`MaskConflict`) with the message to show. No Streamlit here: it is tested with plain pytest.

:class:`Neuroseg` is assembled here from the service's areas, each a class in its room over the shared
base :class:`storage.facade.Facade` (who acts, the rights checked by ``guard``, one transaction per
call): :class:`~storage.auth.service_accounts.AccountsService`, :class:`~storage.records.service_data.DataService`,
:class:`~storage.records.service_models.ModelsService`, :class:`~storage.jobs.service_live.LiveService` and
:class:`~storage.review.service_review.ReviewService`. The
names pages and ``web/`` use (``UserError``, ``RIGHTS``, ``Actor``, …) are imported from here: the only module
of the store they may import."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np

from domain.kinds import RunStatus
from domain.records import AlreadyLoaded, ChannelsQuestion, DraftClash, MaskConflict, Overview, UserError
from storage.auth import accounts
from storage.auth.access import RIGHTS
from storage.auth.accounts import SESSION_HOURS, SYSTEM, Actor
from storage.auth.service_accounts import AccountsService
from storage.db import open_store
from storage.facade import looks
from storage.jobs.service_live import LiveService
from storage.jobs.supervisor import Supervisor
from storage.records import datasets, ingest, runs, starter
from storage.records.service_data import DataService
from storage.records.service_models import ModelsService
from storage.review.service_review import ReviewService
from storage.settings import Settings
from storage.text import NAME_MAX, NOTES_MAX
from unet.exchange.io import parse_slices
from unet.network.config import PRESETS, TrainConfig
from unet.network.device import describe_device, pick_device
from unet.network.threads import available_memory
from unet.training.labels import LABEL_SCHEMES

__all__ = [
    "LABEL_SCHEMES",
    "NAME_MAX",
    "NOTES_MAX",
    "RIGHTS",
    "SESSION_HOURS",
    "SYSTEM",
    "Actor",
    "AlreadyLoaded",
    "ChannelsQuestion",
    "DraftClash",
    "MaskConflict",
    "Neuroseg",
    "RunStatus",
    "UserError",
    "available_memory",
    "isbi_dir",
    "settings_from_env",
    "shared_service",
]

isbi_dir = ingest.isbi_dir


def first_start(settings: Settings | None = None) -> str:
    """Before the server takes requests (``web/asgi.py``): bring the store up to date and, on its first
    start, make the admin with a one-time password. Returns what to print beside the server's URL ("" when
    nothing was made)."""
    settings = settings or Settings.from_env()
    sessions, _store = open_store(settings, migrate=True)
    said: list[str] = []
    try:
        with sessions.begin() as s:
            password = accounts.ensure_admin(s, say=said.append)
    finally:
        sessions.kw["bind"].dispose()
    if password is None:
        return ""
    if admin_password_from_env():
        return ("Sign in as admin with the password in $NEUROSEG_ADMIN_PASSWORD; you choose your own at the first "
                "sign-in.")
    return (f"First start: sign in as admin with the one-time password  {password}\n"
            "(shown only this once; you choose your own at the first sign-in. Lost it? Run\n"
            " .venv/bin/python -m storage reset-password admin  in this folder.)")


def admin_password_from_env() -> bool:
    """Whether the first admin's password is the one in ``$NEUROSEG_ADMIN_PASSWORD`` (none is printed then)."""
    return bool(os.environ.get("NEUROSEG_ADMIN_PASSWORD"))


def settings_from_env(data_dir: str | None = None, database_url: str | None = None) -> Settings:
    """Where the store is: the arguments, else ``$NEUROSEG_DATA_DIR`` and ``$DATABASE_URL``, else the
    embedded default (``data/`` with a SQLite file in it)."""
    return Settings.from_env(data_dir, database_url)


class Neuroseg(AccountsService, DataService, ModelsService, LiveService, ReviewService):
    """The service: open it once per process (the app caches it). ``supervise=True`` (the server) brings
    the schema up to date and starts the supervisor thread that settles and starts the jobs."""

    def __init__(self, settings: Settings | None = None, *, supervise: bool = True):
        self.settings = settings or Settings.from_env()
        self.sessions, self.store = open_store(self.settings, migrate=True)
        self._browser_secret: bytes | None = None
        self.store.clean_spool()  # uploads a killed server was receiving (gigabytes each); none still in use
        self.supervisor = Supervisor(self.sessions, self.settings)
        self.starter_note = ""  # what became of the shipped starter model (a refusal, for a damaged file)
        self._arrays: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.actor: Actor = SYSTEM  # who calls: the command line, the workers and tests act as the system
        if supervise:
            try:  # the app works without a starter: a failure here is said on Home, not a failed start
                registered = self._tx(starter.register, self.store)
                self.starter_note = registered.message if registered.refused else ""
            except UserError as exc:
                self.starter_note = f"the starter model was not registered: {exc}"
            self._tx(accounts.ensure_admin)  # the first start: an admin with a one-time password (the log)
            # last: a service that failed to open leaves no thread behind (a page opens it again)
            self.supervisor.tick()  # runs orphaned by a crash are marked before the first page shows them
            self.supervisor.start()

    # --- the store and the machine ---------------------------------------------------------------------
    @looks
    def overview(self) -> Overview:
        with self.sessions.begin() as s:
            count = datasets.count_datasets(s)
            total, active = runs.count_runs(s)
        return Overview(count, total, active, describe_device(), pick_device("auto").type != "cpu")

    @staticmethod
    def presets() -> dict[str, TrainConfig]:
        """The training recipes by name (``cpu-quick``, ``gpu-full``, …)."""
        return dict(PRESETS)

    @staticmethod
    def parse_slices(text: str, count: int) -> list[int]:
        """Slices from text such as ``all``, ``0-24`` or ``0,2,5-9`` (a stack of ``count``); ValueError says
        what is wrong."""
        return list(range(count)) if text.strip().lower() in ("", "all") else parse_slices(text, count)

    def close(self) -> None:
        """Stop the supervisor thread (tests; the server keeps it for its lifetime)."""
        self.supervisor.stop()



_SHARED: dict[tuple[str, str], Neuroseg] = {}
_SHARED_LOCK = threading.Lock()


def shared_service(data_dir: str, database_url: str) -> Neuroseg:
    """The one service of this server process for a store: opened once (it migrates the store and starts the
    supervisor) and kept for the process's life. Not in Streamlit's resource cache alone: a websocket may ask
    Streamlit to clear that cache, and every service opened again left its supervisor thread and database
    engine running (a leak anyone who reaches the port could drive)."""
    key = (str(data_dir), str(database_url))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Neuroseg(settings_from_env(data_dir, database_url))
        return _SHARED[key]
