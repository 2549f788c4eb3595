"""What the pages call: one object over the database, the file store and the jobs, one method per thing a
page does. It holds no SQL and no rules of its own: each method runs one function of the entity modules
(:mod:`storage.records.datasets`, :mod:`storage.records.masks`, :mod:`storage.records.drafts`,
:mod:`storage.records.runs`, :mod:`storage.records.predictions`, :mod:`storage.records.deletion`,
:mod:`storage.records.ingest`) in its own transaction and
returns :mod:`domain.records`. Errors a user can act on come out as :class:`UserError` (or
:class:`MaskConflict`) with the message to show. No Streamlit here: it is tested with plain pytest."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hmac
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Concatenate, ParamSpec, TypeVar

import numpy as np
from sqlalchemy.orm import Session

from domain.kinds import RunStatus
from domain.live import LiveInfo, LivePrediction
from domain.records import (
    AlreadyLoaded,
    ChannelsQuestion,
    CheckpointInfo,
    DatasetInfo,
    Deleted,
    DraftLike,
    DraftStart,
    MaskConflict,
    MaskInfo,
    Overview,
    PlanRow,
    PredictionInfo,
    RunInfo,
    RunMaskInfo,
    RunSnapshot,
    StoredDraft,
    UserError,
    UserInfo,
)
from domain.scores import HeldOut, Score
from storage import text
from storage.auth import access, accounts, audit, users
from storage.auth.access import RIGHTS
from storage.auth.accounts import SESSION_HOURS, SYSTEM, Actor
from storage.auth.audit import AuditRow
from storage.db import open_store
from storage.jobs import queue
from storage.jobs.supervisor import Supervisor
from storage.records import (
    datasets,
    deletion,
    drafts,
    files,
    heldout,
    ingest,
    live,
    masks,
    packages,
    predictions,
    runs,
    starter,
)
from storage.records.files import IntegrityError
from storage.records.runs import Curve
from storage.records.volumes import Volume
from storage.settings import Settings
from storage.text import NAME_MAX, NOTES_MAX
from unet.network.config import PRESETS, TrainConfig
from unet.prediction.postprocess import DEFAULT_METHOD

P = ParamSpec("P")
T = TypeVar("T")

__all__ = [
    "NAME_MAX",
    "NOTES_MAX",
    "RIGHTS",
    "SESSION_HOURS",
    "SYSTEM",
    "Actor",
    "AlreadyLoaded",
    "ChannelsQuestion",
    "MaskConflict",
    "Neuroseg",
    "RunStatus",
    "UserError",
    "isbi_dir",
    "settings_from_env",
]

isbi_dir = ingest.isbi_dir


def first_start(settings: Settings | None = None) -> str:
    """Before the server takes requests (``web/asgi.py``): bring the store up to date and, on its first
    start, make the admin with a one-time password. Returns what to print beside the server's URL ("" when
    nothing was made)."""
    from storage.db import open_store

    settings = settings or Settings.from_env()
    sessions, _store = open_store(settings, migrate=True)
    said: list[str] = []
    try:
        with sessions.begin() as s:
            password = accounts.ensure_admin(s, log=said.append)
    finally:
        sessions.kw["bind"].dispose()
    if password is None:
        return ""
    if os.environ.get("NEUROSEG_ADMIN_PASSWORD"):
        return ("Sign in as admin with the password in $NEUROSEG_ADMIN_PASSWORD; you choose your own at the first "
                "sign-in.")
    return (f"First start: sign in as admin with the one-time password  {password}\n"
            "(shown only this once; you choose your own at the first sign-in. Lost it? Run\n"
            " .venv/bin/python -m storage reset-password admin  in this folder.)")


def settings_from_env(data_dir: str | None = None, database_url: str | None = None) -> Settings:
    """Where the store is: the arguments, else ``$NEUROSEG_DATA_DIR`` and ``$DATABASE_URL``, else the
    embedded default (``data/`` with a SQLite file in it)."""
    return Settings.from_env(data_dir, database_url)


def _cleaned(clean: Callable[..., str], value: str | None, *args: Any) -> str | None:
    """What a user typed as the store keeps it (:mod:`storage.text`), or :class:`UserError` saying why not."""
    if value is None:
        return None
    try:
        return clean(value, *args)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _guard(action: str, right: str, kind: str | None = None, *, owned: bool = False, creates: str | None = None,
           record: bool = True, target: Callable[..., str] | None = None):
    """A service method that ``right`` allows (:func:`storage.auth.access.allow`), for the owner or an admin
    only when ``owned`` (the first argument is the id of a ``kind``). The actor is read again from the
    store first (:meth:`Neuroseg._acting`: a disabled, removed or signed-out user is refused, a changed role
    counts at once), so a page's callback that runs before its sign-in check cannot act on an old sign-in.
    The attempt is written to the audit trail as done, refused or failed (unless ``record`` is off: what a
    page does on every stroke; a refusal is always written). A method that ``creates`` a row makes the
    actor its owner."""

    def wrap(method):
        @functools.wraps(method)
        def inner(self: Neuroseg, *args, **kwargs):
            ident = args[0] if args else kwargs.get(f"{kind}_id") if kind else None
            what = target(*args, **kwargs) if target else (f"{kind} {ident}" if kind and ident is not None else "")
            try:
                actor = self._acting()  # who it is now: still there, enabled, signed in, and their role
                access.allow(actor, right, actor.user_id, target=what)  # the role first
                owner_id, owner_name = self._tx(users.owner_of, kind, ident) if owned else (None, "")
                access.allow(actor, right, owner_id, owner_name, what)
            except UserError as exc:  # what it names does not exist
                self._audit(action, what, "failed", str(exc))
                raise
            except access.Denied as exc:
                self._audit(action, what, "refused", str(exc))
                raise UserError(str(exc)) from None
            # a role changed meanwhile: the method sees the current one
            bound = self if actor is self.actor else self.acting_as(actor)
            try:
                result = method(bound, *args, **kwargs)
            except UserError as exc:
                if record:
                    self._audit(action, what, "failed", str(exc))
                raise
            if creates and self.actor.user_id is not None:
                self._tx(users.set_owner, creates, result.id, self.actor.user_id)
                result = dataclasses.replace(result, owner_id=self.actor.user_id, owner=self.actor.username)
            if record:
                self._audit(action, f"{creates} {result.id}" if creates else what, "ok")
            return result

        return inner

    return wrap


class Neuroseg:
    """The service: open it once per process (the app caches it). ``supervise=True`` (the server) brings
    the schema up to date and starts the supervisor thread that settles and starts the jobs."""

    def __init__(self, settings: Settings | None = None, *, supervise: bool = True):
        self.settings = settings or Settings.from_env()
        self.sessions, self.store = open_store(self.settings, migrate=True)
        self._browser_secret: bytes | None = None
        self.store.clean_spool()  # uploads a killed server was receiving (gigabytes each); none still in use
        self.supervisor = Supervisor(self.sessions, self.settings)
        self.starter_note = ""  # what became of the shipped starter model (a refusal, for a damaged file)
        if supervise:
            try:  # the app works without a starter: a failure here is said on Home, not a failed start
                registered = self._tx(starter.register, self.store)
                self.starter_note = registered.message if registered.refused else ""
            except UserError as exc:
                self.starter_note = f"the starter model was not registered: {exc}"
            self.supervisor.tick()  # runs orphaned by a crash are marked before the first page shows them
            self.supervisor.start()
        self._arrays: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.actor: Actor = SYSTEM  # who calls: the command line, the workers and tests act as the system
        if supervise:
            self._tx(accounts.ensure_admin)  # the first start: an admin with a one-time password (the log)

    # --- who acts ---------------------------------------------------------------------------------------
    def acting_as(self, actor: Actor) -> Neuroseg:
        """This service for one signed-in user: the same store, caches and supervisor, every call checked
        against ``actor``'s role and recorded under their name (what the pages use)."""
        bound = copy.copy(self)
        bound.actor = actor
        return bound

    def _acting(self) -> Actor:
        """The actor as the store says it is now (:func:`storage.auth.accounts.current_actor`, one small query):
        :class:`storage.auth.access.Denied` when the user is gone or disabled, or the browser's sign-in ended."""
        if self.actor.user_id is None:  # the system, or nobody signed in (whom every right refuses)
            return self.actor
        try:
            with self.sessions.begin() as s:
                return accounts.current_actor(s, self.actor)
        except accounts.SignInError as exc:
            raise access.Denied(str(exc)) from None

    def refusal(self, right: str, kind: str | None = None, ident: int | None = None) -> str:
        """Why the signed-in user may not use ``right`` (on the ``kind`` row ``ident``, owner or admin
        only): "" when they may. The service's own check asked beforehand, so a page shows what would be
        refused as disabled, with the reason; the call itself is checked again."""
        try:
            actor = self._acting()
            access.allow(actor, right, actor.user_id)
            if kind is not None:
                owner_id, owner_name = self._tx(users.owner_of, kind, ident)
                access.allow(actor, right, owner_id, owner_name, f"{kind} {ident}")
        except (access.Denied, UserError) as exc:
            return str(exc)
        return ""

    def _audit(self, action: str, target: str = "", outcome: str = "ok", detail: str = "") -> None:
        try:
            with self.sessions.begin() as s:
                audit.record(s, self.actor.user_id, action, target, outcome, detail, self.actor.address,
                             username=self.actor.username)
        except Exception:  # the trail never stops what it records (a full disk is reported by the action)
            pass

    def _author(self, given: str) -> str:
        """What a mask version records as its author: the signed-in user (the system: what it was given)."""
        return given if self.actor.user_id is None else self.actor.username

    def _owner(self, given: str | None) -> str | None:
        """Whose drafts and live views: the signed-in user's (the system: what it was given)."""
        return given if self.actor.user_id is None else f"user:{self.actor.user_id}"

    # --- signing in (no actor yet: these are what make one) --------------------------------------------
    def _signing(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """An accounts call whose refusals are kept (the audit rows of a failed sign-in are committed)."""
        with self.sessions() as s:
            try:
                result = fn(s, *args, **kwargs)
            except (accounts.SignInError, ValueError, LookupError) as exc:
                s.commit()
                raise UserError(str(exc)) from None
            s.commit()
            return result

    def sign_in(self, username: str, password: str, address: str = "") -> tuple[Actor, str]:
        """(the user, the token for the browser's cookie); a refusal is a :class:`UserError` to show."""
        return self._signing(accounts.sign_in, username, password, address)

    def sign_in_oidc(self, issuer: str, subject: str, *, email: str = "", name: str = "", preferred: str = "",
                     address: str = "") -> tuple[Actor, str]:
        return self._signing(accounts.sign_in_oidc, issuer, subject, email=email, name=name, preferred=preferred,
                             address=address)

    def signed_in(self, token: str, address: str = "", *, proof: str | None = None) -> Actor:
        """The user a browser's token stands for; :class:`UserError` says why not (expired, unknown). With
        ``proof`` (a new browser session that has only the cookie) the browser's key of this origin must
        match too (:func:`storage.auth.accounts.browser_key`): a cookie alone, which every port of the host
        receives, signs nobody in."""
        if proof is not None and not hmac.compare_digest(str(proof), self.browser_key(token)):
            raise UserError("Please sign in.")
        return self._signing(accounts.session_actor, token, address)

    def browser_key(self, token: str) -> str:
        """What the browser keeps beside its sign-in cookie, in this origin's own storage."""
        if self._browser_secret is None:
            self._browser_secret = accounts.browser_secret(self.store.root)
        return accounts.browser_key(self._browser_secret, token)

    def sign_out(self, token: str) -> None:
        self._signing(accounts.sign_out, token, self.actor if self.actor.user_id is not None else None)

    def change_password(self, old: str, new: str, keep_token: str = "") -> Actor:
        """The signed-in user's new password (every other browser of theirs is signed out); returns the
        user as they are now (no longer bound to change it)."""
        if self.actor.user_id is None:
            raise UserError("Sign in first.")
        self._signing(accounts.change_password, self.actor, old, new, keep_token)
        return dataclasses.replace(self.actor, must_change_password=False)

    # --- users, the audit trail and the machine (admin) ------------------------------------------------
    def me(self) -> UserInfo | None:
        return None if self.actor.user_id is None else self._tx(users.user_info, self.actor.user_id)

    @_guard("list users", "admin", record=False)
    def users(self) -> list[UserInfo]:
        return self._tx(users.list_users)

    @_guard("create user", "admin", target=lambda username, *a, **k: f"user {username}")
    def create_user(self, username: str, role: str, password: str = "") -> tuple[UserInfo, str]:
        """A local account; without a password a one-time one is made (returned, to hand over). It must
        be changed at the first sign-in."""
        return self._tx(users.create_local, username, role, password)

    @_guard("set role", "admin", target=lambda user_id, role, *a, **k: f"user {user_id} → {role}")
    def set_role(self, user_id: int, role: str) -> UserInfo:
        if user_id == self.actor.user_id and role != "admin":
            raise UserError("You cannot take the admin role from yourself: another admin can.")
        return self._tx(users.set_role, user_id, role)

    @_guard("set queue limit", "admin", target=lambda user_id, n, *a, **k: f"user {user_id} → {n} waiting")
    def set_queue_limit(self, user_id: int, runs_waiting: int) -> UserInfo:
        return self._tx(users.set_queue_limit, user_id, runs_waiting)

    @_guard("reset password", "admin", "user")
    def reset_password(self, user_id: int) -> str:
        """A new one-time password for a local account (returned, to hand over); its browsers are signed out."""
        return self._tx(users.reset_password, user_id)

    @_guard("disable user", "admin", target=lambda user_id, off, *a, **k: f"user {user_id} → "
            + ("disabled" if off else "enabled"))
    def set_disabled(self, user_id: int, disabled: bool) -> UserInfo:
        if user_id == self.actor.user_id and disabled:
            raise UserError("You cannot disable your own account.")
        return self._tx(users.set_disabled, user_id, disabled)

    @_guard("audit", "admin", record=False)
    def audit_trail(self, *, username: str = "", action: str = "", outcome: str = "", since=None, until=None,
                    limit: int = 500) -> list[AuditRow]:
        return self._tx(audit.events, username=username, action=action, outcome=outcome, since=since, until=until,
                        limit=limit)

    @_guard("audit", "admin", record=False)
    def audit_choices(self) -> tuple[list[str], list[str]]:
        """(the user names, the actions) that occur in the trail, for its filters."""
        return self._tx(lambda s: (audit.usernames(s), audit.actions(s)))

    @_guard("disk use", "admin", record=False)
    def disk_use(self) -> users.DiskUse:
        """Bytes on disk per dataset and per run (their folders in the store), and what is free."""
        return self._tx(users.disk_use, self.store)

    def training_queue(self) -> list[users.QueueRow]:
        """The training runs that are running or waiting, in the order they start, with their owners."""
        return self._tx(users.training_queue)

    def _tx(self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(session, *args, **kwargs)`` in one transaction; what a user can act on (a refusal, a
        missing row, a damaged file, a full disk) comes out as :class:`UserError`."""
        try:
            with self.sessions.begin() as s:
                return fn(s, *args, **kwargs)
        except (ValueError, LookupError, IntegrityError) as exc:  # (MaskConflict passes through as it is)
            raise UserError(str(exc)) from exc
        except OSError as exc:
            raise UserError(ingest.disk_message(exc)) from exc

    def _cached(self, key: tuple, load: Callable[[], np.ndarray], keep: int = 4) -> np.ndarray:
        """A read-only array kept for the next few calls (stacks and probabilities are read once)."""
        with self._lock:
            if key in self._arrays:
                self._arrays.move_to_end(key)
                return self._arrays[key]
        data = load()
        if isinstance(data, np.ndarray):  # a lazy volume hands out a fresh array on every read
            data.setflags(write=False)
        with self._lock:
            self._arrays[key] = data
            while len(self._arrays) > keep:
                self._arrays.popitem(last=False)
        return data

    # --- the store and the machine ---------------------------------------------------------------------
    def overview(self) -> Overview:
        from unet.network.device import describe_device, pick_device

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
        from unet.exchange.io import parse_slices

        return list(range(count)) if text.strip().lower() in ("", "all") else parse_slices(text, count)

    # --- datasets ---------------------------------------------------------------------------------------
    def datasets(self) -> list[DatasetInfo]:
        return self._tx(datasets.list_datasets)

    def dataset(self, dataset_id: int) -> DatasetInfo:
        return self._tx(datasets.get_dataset, dataset_id)

    @_guard("upload", "create", creates="dataset")
    def import_upload(self, volume: BinaryIO, labels: BinaryIO | None = None, *, name: str = "", notes: str = "",
                      author: str = "", progress: ingest.Progress | None = None,
                      channels_as_z: bool = False) -> DatasetInfo:
        """Store an uploaded volume (and its labels) as a new dataset; see :func:`storage.records.ingest.import_upload`.
        A name typed is refused when too long; one taken from the file's name is cut (:mod:`storage.text`)."""
        name = _cleaned(text.clean_name, name, "A dataset's name") or text.clean_name(
            Path(getattr(volume, "name", "") or "upload").stem, cut=True) or "upload"
        notes = _cleaned(text.clean_notes, notes)
        return ingest.import_upload(self.sessions, self.store, volume, labels, name=name, notes=notes,
                                    author=self._author(author),
                                    progress=progress, channels_as_z=channels_as_z)

    @staticmethod
    def server_folders() -> tuple[list[str], str | None]:
        """(the folders stacks may be imported from, the folder exports go into): what the admin set in
        ``$NEUROSEG_IMPORT_ROOTS`` and ``$NEUROSEG_EXPORT_ROOT``; empty and None when they are off (the
        default), so a page can say so instead of offering a form that is always refused."""
        root = files.export_root()
        return [str(r) for r in files.import_roots()], str(root) if root else None

    @_guard("upload", "create", creates="dataset")
    def import_path(self, path: str, *, link: bool = False, name: str = "", author: str = "",
                    progress: ingest.Progress | None = None) -> DatasetInfo:
        """A stack already on the server (OME-Zarr, zarr or N5 folder) as a dataset, copied or linked
        read-only; only from the folders ``$NEUROSEG_IMPORT_ROOTS`` names (off when unset), and every
        refusal of a path says the same words; see :func:`storage.records.ingest.import_path`."""
        name = _cleaned(text.clean_name, name, "A dataset's name")
        return ingest.import_path(self.sessions, self.store, path, link=link, name=name, author=self._author(author),
                                  progress=progress)

    @_guard("load demo", "create", creates="dataset")
    def load_demo(self, author: str = "") -> DatasetInfo:
        return ingest.load_demo(self.sessions, self.store, self._author(author))

    @_guard("load ISBI 2012", "create", creates="dataset")
    def load_isbi(self, author: str = "", progress: ingest.Progress | None = None) -> DatasetInfo:
        return ingest.load_isbi(self.sessions, self.store, self._author(author), progress)

    @_guard("rename", "manage", "dataset", owned=True)
    def update(self, dataset_id: int, *, name: str | None = None, notes: str | None = None) -> DatasetInfo:
        """Rename a dataset and set its notes (:mod:`storage.text`: no controls, within the length limits)."""
        return self._tx(datasets.update_dataset, dataset_id, name=_cleaned(text.clean_name, name, "A dataset's name"),
                        notes=_cleaned(text.clean_notes, notes))

    def volume(self, dataset_id: int) -> Volume | np.ndarray:
        """The stack, read lazily: ``volume[z]`` reads one slice (or ``volume.levels[k][z]`` one slice of the
        overview pyramid); the server never holds the whole stack (:class:`storage.records.volumes.Volume`)."""
        info = self.dataset(dataset_id)
        return self._cached(("volume", info.id, info.sha256),
                            lambda: self._tx(datasets.load_volume, self.store, info.id))

    def value_range(self, dataset_id: int) -> tuple[float, float]:
        """The lowest and highest voxel of the stack (recorded when it was stored)."""
        volume = self.volume(dataset_id)
        low, high = getattr(volume, "value_range", (None, None))
        if low is None or high is None:  # a linked stack: its middle slice tells (never the whole stack)
            middle = volume[volume.shape[0] // 2]
            low, high = float(np.min(middle)), float(np.max(middle))
        return float(low), float(high)

    def deletion_preview(self, dataset_id: int) -> Deleted:
        return self._tx(lambda s: deletion.preview(self.store, deletion.plan_dataset(s, self.store, dataset_id)))

    @_guard("delete", "manage", "dataset", owned=True)
    def delete_dataset(self, dataset_id: int) -> Deleted:
        return self._tx(lambda s: deletion.execute(s, self.store, deletion.plan_dataset(s, self.store, dataset_id)))

    # --- masks and drafts -------------------------------------------------------------------------------
    def slice_kinds(self, dataset_id: int) -> dict[int, MaskInfo]:
        """The latest mask version of every slice that has one."""
        return self._tx(masks.slice_kinds, dataset_id)

    def history(self, dataset_id: int, slice_index: int) -> list[MaskInfo]:
        return self._tx(masks.mask_history, dataset_id, slice_index)

    def mask(self, mask_id: int) -> np.ndarray:
        return self._tx(masks.load_mask, self.store, mask_id)

    @_guard("restore", "annotate", "mask")
    def restore(self, mask_id: int, author: str = "") -> MaskInfo:
        return self._tx(masks.restore_mask, self.store, mask_id, author=self._author(author))

    def draft_start(self, dataset_id: int, slice_index: int, source: str = "latest", *, mask_id: int | None = None,
                    prediction_id: int | None = None) -> DraftStart:
        """What an edit starts from: the mask version ``mask_id``, the prediction ``prediction_id`` (its mask
        of this slice), or nothing (every pixel unlabelled)."""
        return self._tx(drafts.start, self.store, dataset_id, slice_index, source, mask_id, prediction_id)

    @_guard("save mask", "annotate",
            target=lambda draft, *a, **k: f"dataset {draft.dataset_id} slice {draft.slice_index}")
    def save_draft(self, draft: DraftLike, author: str = "", owner: str | None = None) -> MaskInfo:
        """Save the draft's mask as a new version, exactly as it is, and forget the owner's kept copy. A
        newer version saved meanwhile by someone else raises :class:`MaskConflict` and the draft is kept."""
        info = self._tx(drafts.save, self.store, draft, self._author(author), self._owner(owner))
        draft.saved(info.id, info.kind)
        return info

    @_guard("keep draft", "annotate", record=False)
    def keep_draft(self, draft: DraftLike, owner: str) -> None:
        """Keep the draft in the store as it is now (or forget it when nothing is changed), so a reload, a
        new tab or a restart finds it. Called by the Annotate page after every change."""
        self._tx(drafts.keep_edit, self.store, draft, self._owner(owner))

    def stored_draft(self, dataset_id: int, slice_index: int, owner: str) -> StoredDraft | None:
        """The owner's kept draft of a slice, with its two masks, or None."""
        return self._tx(drafts.load, self.store, dataset_id, slice_index, self._owner(owner))

    def drafts_of(self, owner: str) -> list[StoredDraft]:
        """Every slice on which this owner has unsaved changes kept in the store."""
        return self._tx(drafts.of_owner, self._owner(owner))

    # --- training ---------------------------------------------------------------------------------------
    def default_split(self, dataset_id: int) -> tuple[list[int], list[int]]:
        """The labelled slices of a dataset, the last ~15% (at least one) kept for validation."""
        return self._tx(runs.default_split, dataset_id)

    def train_plan(self, train: list[dict[str, Any]], val: list[dict[str, Any]]) -> list[PlanRow]:
        """Which mask version of each chosen slice a run would use, and how many labelled pixels it has."""
        return self._tx(runs.train_plan, train, val)

    def training_estimate(self, config: TrainConfig, val: list[dict[str, Any]]) -> str:
        """How long a run of ``config`` validating on ``val`` takes here, measured on this machine for this
        network and this data's size (see :mod:`unet.training.estimate`)."""
        return self._tx(runs.training_estimate, config, val)

    @_guard("train", "train", creates="run")
    def submit_training(self, train: list[dict[str, Any]], val: list[dict[str, Any]], config: TrainConfig, *,
                        preset: str = "", parent_checkpoint_id: int | None = None) -> RunInfo:
        spec = {"train": train, "val": val, "preset": preset}
        if self.actor.user_id is not None:  # one waiting run per user unless an admin allows more
            self._tx(users.check_queue_room, self.actor.user_id)
        run = self._tx(runs.submit_training, spec, config, parent_checkpoint_id)
        queue.start_queued(self.sessions, self.settings)
        return self.run(run.id)

    def runs(self) -> list[RunInfo]:
        return self._tx(runs.list_runs)

    def run(self, run_id: int) -> RunInfo:
        return self._tx(runs.get_run, run_id)

    def snapshot(self, run_id: int) -> RunSnapshot:
        """The run, where it is and its curves (every metric, {key: [(step, value, seconds), …]} in step
        order), read in one transaction: what the Train page polls."""
        def read(s: Session) -> RunSnapshot:
            run, curves = runs.get_run(s, run_id), runs.run_curves(s, run_id)
            progress = runs.run_progress(run, curves)
            curves.pop("resume", None)  # bookkeeping, not a curve
            return RunSnapshot(run, progress, curves)

        return self._tx(read)

    def curves(self, run_id: int) -> dict[str, Curve]:
        return self.snapshot(run_id).curves

    def run_log(self, run_id: int, lines: int = 30) -> str:
        return runs.run_log(self.store, run_id, lines)

    @_guard("cancel", "manage", "run", owned=True)
    def cancel_run(self, run_id: int) -> RunInfo:
        return self._tx(runs.cancel_run, run_id)

    @_guard("resume", "manage", "run", owned=True)
    def resume_run(self, run_id: int) -> RunInfo:
        self._tx(runs.resume_run, run_id)
        queue.start_queued(self.sessions, self.settings)
        return self.run(run_id)

    def checkpoints(self, run_id: int) -> list[CheckpointInfo]:
        return self._tx(runs.checkpoints, run_id)

    def checkpoint_choices(self) -> list[CheckpointInfo]:
        """Every checkpoint of every run, newest run first, with its validation metrics."""
        return self._tx(runs.checkpoints)

    @_guard("export model", "export", "checkpoint")
    def export_model(self, checkpoint_id: int, with_data: bool = False) -> tuple[bytes, str]:
        """The checkpoint as a BioImage.IO package (bytes, file name), validated and tested before it is
        handed out; its authors are the signed-in user (``Neuroseg`` for the system). Its test image and
        cover are synthetic unless ``with_data``: then a crop of a slice it trained on
        (:meth:`export_source`), which leaves the lab with the package."""
        author = self.actor.display_name or self.actor.username if self.actor.user_id is not None else ""
        return self._tx(runs.export_model, self.store, checkpoint_id, [author] if author else [], with_data)

    def export_source(self, checkpoint_id: int) -> tuple[str, int, int] | None:
        """(dataset name, dataset id, slice) a package's test image would be cut from, if the user agrees."""
        def read(s):
            found = runs.export_source(s, checkpoint_id)
            return (found[0].name, found[0].id, found[1]) if found else None

        return self._tx(read)

    @_guard("rename model", "manage", "checkpoint", owned=True)
    def update_model(self, checkpoint_id: int, *, name: str | None = None, notes: str | None = None
                     ) -> CheckpointInfo:
        """Give a checkpoint a name and notes (its run's owner or an admin; :mod:`storage.text`: no controls,
        within the length limits)."""
        return self._tx(runs.update_checkpoint, checkpoint_id, _cleaned(text.clean_name, name, "A model's name"),
                        _cleaned(text.clean_notes, notes))

    def model_card(self, checkpoint_id: int) -> dict[str, Any]:
        """A checkpoint's card: run, recipe, held-out scores, parent, size (its masks: :meth:`run_masks`)."""
        return self._tx(runs.model_card, self.store, checkpoint_id)

    @_guard("import model", "create", target=lambda upload, filename, *a, **k: f"package {filename[:60]}")
    def import_model(self, upload: BinaryIO, filename: str) -> packages.Imported:
        """A BioImage.IO package as a checkpoint (a finished run of kind ``imported``), after the checks of
        :mod:`storage.records.packages`; a refusal says what was found and leaves no row and no file."""
        imported = self._tx(packages.import_package, self.store, upload, filename)
        if self.actor.user_id is not None:
            self._tx(users.set_owner, "run", imported.run_id, self.actor.user_id)
        return imported

    def checkpoint_bytes(self, checkpoint_id: int) -> bytes:
        return self._tx(runs.checkpoint_bytes, self.store, checkpoint_id)

    @_guard("delete", "manage", "checkpoint", owned=True)
    def delete_checkpoint(self, checkpoint_id: int) -> Deleted:
        return self._tx(lambda s: deletion.execute(s, self.store, deletion.plan_checkpoint(s, self.store,
                                                                                            checkpoint_id)))

    def run_masks(self, run_id: int) -> list[RunMaskInfo]:
        return self._tx(runs.run_masks, run_id)

    def lineage(self, run_id: int) -> tuple[int | None, list[int]]:
        """(the run this one was fine-tuned from, the runs fine-tuned from this one)."""
        return self._tx(runs.lineage, run_id)

    def run_deletion_preview(self, run_id: int) -> Deleted:
        return self._tx(lambda s: deletion.preview(self.store, deletion.plan_run(s, self.store, run_id)))

    @_guard("delete", "manage", "run", owned=True)
    def delete_run(self, run_id: int) -> Deleted:
        return self._tx(lambda s: deletion.execute(s, self.store, deletion.plan_run(s, self.store, run_id)))

    # --- predictions ------------------------------------------------------------------------------------
    @_guard("predict", "predict", creates="prediction")
    def predict(self, checkpoint_id: int, dataset_id: int, slices: list[int],
                postprocess: str = DEFAULT_METHOD, tta: bool = False) -> PredictionInfo:
        """Queue a prediction of ``slices`` and start its process; ``postprocess`` says how its neurons are
        made from the map (``unet.prediction.postprocess.METHODS``); ``tta`` averages the network's answers over the 8
        flips of each tile (fewer errors at the borders, 8× the time)."""
        info = self._tx(predictions.submit_prediction, checkpoint_id, dataset_id, slices, postprocess, tta)
        queue.launch_prediction(self.sessions, self.settings, info.id)
        return self.prediction(info.id)

    @_guard("resume", "manage", "prediction", owned=True)
    def resume_prediction(self, prediction_id: int) -> PredictionInfo:
        """Start a failed (or killed) prediction again; it keeps the blocks already written."""
        self._tx(predictions.resume_prediction, prediction_id)
        queue.launch_prediction(self.sessions, self.settings, prediction_id)
        return self.prediction(prediction_id)

    def prediction(self, prediction_id: int) -> PredictionInfo:
        return self._tx(predictions.get_prediction, prediction_id)

    def predictions(self, *, dataset_id: int | None = None, run_id: int | None = None) -> list[PredictionInfo]:
        return self._tx(predictions.list_predictions, dataset_id=dataset_id, run_id=run_id)

    def prediction_output(self, prediction_id: int, output: str = "probabilities") -> Volume | np.ndarray:
        """(slices, Y, X): the neuron probabilities, the 0/255 mask or the instance labels, as stored (read
        lazily: ``output[i]`` reads the i-th predicted slice)."""
        return self._cached((output, prediction_id),
                            lambda: self._tx(predictions.load_output, self.store, prediction_id, output))

    @_guard("export to server", "create", "prediction")
    def export_prediction(self, prediction_id: int, folder: str = "") -> list[str]:
        """Write the prediction's outputs as OME-Zarr images into ``$NEUROSEG_EXPORT_ROOT`` or the subfolder
        of it named by ``folder`` (off when unset: the downloads are what a user gets), under names made
        from the prediction's id; returns the paths written. It needs the right to create (viewers export
        by downloading): it writes on the server. See :func:`storage.records.predictions.export_folder`."""
        return [str(p) for p in self._tx(predictions.export_prediction, self.store, prediction_id, folder)]

    def prediction_file(self, prediction_id: int, output: str) -> bytes:
        return self._tx(predictions.prediction_file, self.store, prediction_id, output)

    # --- the live loop ---------------------------------------------------------------------------------
    def live(self, dataset_id: int) -> LiveInfo | None:
        """The dataset's live session (queued, running or paused), or None."""
        return self._tx(live.current, dataset_id)

    @_guard("live", "train", "dataset")
    def live_start(self, dataset_id: int, checkpoint_id: int | None, owner: str,
                   scratch: bool = False) -> tuple[LiveInfo, str]:
        """Turn Live on: join the dataset's session, resume its lost one, or start one from the checkpoint
        (``scratch``: from random weights, taught by a forest of the strokes). Returns the session and
        "joined", "resumed" or "started"."""
        info, what = self._tx(live.start, dataset_id, checkpoint_id, self._owner(owner), scratch)
        if what == "started" and self.actor.user_id is not None:
            self._tx(users.set_owner, "run", info.run.id, self.actor.user_id)
        queue.start_queued(self.sessions, self.settings)
        return self._tx(live.current, dataset_id) or info, what

    @_guard("live view", "train", record=False)
    def live_see(self, run_id: int, owner: str, slice_index: int,
                 region: tuple[int, int, int, int] | None = None) -> None:
        """``owner`` is looking at ``slice_index`` (at ``region`` = (y0, x0, h, w) of it when zoomed in: that
        region is predicted first): it (and the slices beside it) is re-predicted."""
        self._tx(live.see, run_id, self._owner(owner), slice_index, region)

    @_guard("live view", "train", record=False)
    def live_leave(self, run_id: int, owner: str) -> None:
        self._tx(live.leave, run_id, self._owner(owner))

    @_guard("stop live", "train", "run")
    def live_stop(self, run_id: int) -> RunInfo:
        """End the session for everyone; it becomes a finished run with its checkpoints."""
        return self._tx(live.stop, run_id)

    def live_prediction(self, run_id: int, slice_index: int) -> LivePrediction | None:
        return self._tx(live.prediction, self.store, run_id, slice_index)

    # --- held-out slices and the default model --------------------------------------------------------
    def awaiting_first_admin(self) -> bool:
        """Nobody has set this store up yet (the sign-in page says where the first password is)."""
        return self._tx(accounts.awaiting_first_admin)

    def held_out(self, dataset_id: int) -> HeldOut | None:
        return self._tx(heldout.held_out, dataset_id)

    @_guard("set held-out", "manage", "dataset", owned=True)
    def set_held_out(self, dataset_id: int, slices: list[int]) -> HeldOut | None:
        """Freeze these labelled slices (their current versions) as the dataset's held-out set: a new
        version. Runs are compared within a version."""
        return self._tx(heldout.set_held_out, dataset_id, slices)

    def held_out_seen(self, dataset_id: int) -> HeldOut | None:
        """The held-out set with the runs that trained on each of its slices."""
        return self._tx(heldout.held_out_seen, dataset_id)

    def trained_on(self, checkpoint_id: int, dataset_id: int) -> list[int]:
        """The dataset's slices this checkpoint (its run, or a run it was fine-tuned from) trained on: its
        scores there say little about unseen data."""
        return self._tx(heldout.checkpoint_trained_on, checkpoint_id, dataset_id)

    def held_out_scores(self, dataset_id: int) -> list[Score]:
        """Every run scored on the dataset's held-out slices, with its change against parent and best."""
        return self._tx(heldout.scores, dataset_id)

    @_guard("score", "train", "run")
    def score_run(self, run_id: int) -> int:
        """Score a run (and its parent) on the held-out slices now, in this process (runs that end are
        scored by their worker). Returns how many scores were written."""
        try:
            return heldout.score_run(self.sessions, self.store, run_id)
        except (ValueError, LookupError, IntegrityError) as exc:
            raise UserError(str(exc)) from exc

    @_guard("promote", "manage", "dataset", owned=True)
    def promote(self, dataset_id: int, checkpoint_id: int | None) -> None:
        """Make a checkpoint the dataset's default model (what Predict and Live start from)."""
        self._tx(heldout.promote, dataset_id, checkpoint_id)

    def default_model(self, dataset_id: int) -> int | None:
        return self._tx(heldout.default_model, dataset_id)

    def close(self) -> None:
        """Stop the supervisor thread (tests; the server keeps it for its lifetime)."""
        self.supervisor.stop()

