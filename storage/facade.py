"""The base of the service the pages call (:class:`storage.service.Neuroseg` is built on :class:`Facade`):
who acts and what they may do (``guard``: the right checked, the actor read again from the store, the
attempt written to the audit trail; ``looks``: a read, for an account that may still look), one transaction
per call (``_tx``, errors a user can act on as :class:`UserError`), the cache of arrays read once, and
``cleaned``, user text as the store keeps it. The areas of the service build on it:
:mod:`storage.auth.service_accounts`, :mod:`storage.records.service_data`,
:mod:`storage.records.service_models`, :mod:`storage.jobs.service_live`."""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from domain.records import ChannelsQuestion, Deleted, MaskConflict, UserError
from storage.auth import access, accounts, audit, users
from storage.auth.accounts import Actor
from storage.jobs.supervisor import Supervisor
from storage.records import deletion, ingest
from storage.records.files import FileStore, IntegrityError
from storage.settings import Settings

P = ParamSpec("P")
T = TypeVar("T")


def cleaned(clean: Callable[..., str], value: str | None, *args: Any) -> str | None:
    """What a user typed as the store keeps it (:mod:`storage.text`), or :class:`UserError` saying why not."""
    if value is None:
        return None
    try:
        return clean(value, *args)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def guard(action: str, right: str, kind: str | None = None, *, owned: bool = False, creates: str | None = None,
          record: bool = True, target: Callable[..., str] | None = None):
    """A service method that ``right`` allows (:func:`storage.auth.access.allow`), for the owner or an admin
    only when ``owned`` (the first argument is the id of a ``kind``). The actor is read again from the
    store first (:meth:`Facade._acting`: a disabled, removed or signed-out user is refused, a changed role
    counts at once), so a page's callback that runs before its sign-in check cannot act on an old sign-in.
    The attempt is written to the audit trail as done, refused or failed (unless ``record`` is off: what a
    page does on every stroke; a refusal is always written). A method that ``creates`` a row makes the
    actor its owner."""

    def wrap(method):
        @functools.wraps(method)
        def inner(self: Facade, *args, **kwargs):
            ident = args[0] if args else kwargs.get(f"{kind}_id") if kind else None
            if kind and isinstance(ident, np.integer):  # (a NumPy id: as the database adapters take it)
                ident = int(ident)
                args, kwargs = ((ident, *args[1:]), kwargs) if args else (args, {**kwargs, f"{kind}_id": ident})
            what = target(*args, **kwargs) if target else (f"{kind} {ident}" if kind and ident is not None else "")
            what = what[:200]
            try:
                if kind and ident is not None and not _is_id(ident):  # (a forged request's "1; x", 2**70, 1.5)
                    raise UserError(f"There is no {kind} {str(ident)[:40]!r}.")
                actor = self._acting()  # who it is now: still there, enabled, signed in, and their role
                access.allow(actor, right, actor.user_id, target=what)  # the role first
                owner_id, owner_name = self._tx(users.owner_of, kind, ident) if owned else (None, "")
                access.allow(actor, right, owner_id, owner_name, what)
            except UserError as exc:  # what it names does not exist
                self._audit(action, what, "failed", str(exc))
                raise
            except access.Denied as exc:
                self._looked = float("-inf")  # (its reads are checked again too)
                self._audit(action, what, "refused", str(exc))
                raise UserError(str(exc)) from None
            # a role changed meanwhile: the method sees the current one
            bound = self if actor is self.actor else self.acting_as(actor)
            try:
                result = method(bound, *args, **kwargs)
            except access.Denied as exc:  # (a check only the method can make: what a delete takes with it)
                self._audit(action, what, "refused", str(exc))
                raise UserError(str(exc)) from None
            except UserError as exc:
                if record:  # (a question asked back, e.g. "read these channels as slices?", is no failure)
                    self._audit(action, what, "asked" if isinstance(exc, ChannelsQuestion) else "failed", str(exc))
                raise
            except Exception as exc:  # a fault (or a forged argument's type): in the trail too, then as it is
                self._audit(action, what, "failed", str(exc) if isinstance(exc, MaskConflict)
                            else f"{type(exc).__name__} (the server's log has the details)")
                raise
            if creates and self.actor.user_id is not None:
                self._tx(users.set_owner, creates, result.id, self.actor.user_id)
                result = dataclasses.replace(result, owner_id=self.actor.user_id, owner=self.actor.username)
            if record:
                self._audit(action, f"{creates} {result.id}" if creates else what, "ok")
            return result

        return inner

    return wrap


def _is_id(value: object) -> bool:
    """A row's id as the store can hold it: an integer (not a bool) of 64 bits."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and 0 <= int(value) < 2**63


LOOK_FRESH_S = 1.0  # a read checks the account again after this long (a page makes dozens of reads per run)


def looks(method: Callable[Concatenate[Facade, P], T]) -> Callable[Concatenate[Facade, P], T]:
    """A read: what every role may see (the "look" right), for a user whom the store still knows, enabled
    and signed in, checked again at most once a second per bound service (:meth:`Facade._may_look`). The
    pages check the sign-in on every run, but a fragment that reruns by itself, a callback that runs before
    the check, or another caller of the service reads only what this lets through."""

    @functools.wraps(method)
    def inner(self: Facade, *args: P.args, **kwargs: P.kwargs) -> T:
        self._may_look()
        args = tuple(int(a) if isinstance(a, np.integer) else a for a in args)  # (NumPy ids, as guard takes them)
        kwargs = {k: int(v) if isinstance(v, np.integer) else v for k, v in kwargs.items()}
        return method(self, *args, **kwargs)

    return inner


class Facade:
    """What every area of the service shares: the store opened by :class:`storage.service.Neuroseg`, the
    actor every call is checked against, one transaction per call and the cache of arrays."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: FileStore
    supervisor: Supervisor
    actor: Actor
    _browser_secret: bytes | None
    _arrays: OrderedDict[tuple, np.ndarray]
    _lock: threading.Lock
    _looked: float = float("-inf")  # when this bound service last found its actor may look

    # --- who acts ---------------------------------------------------------------------------------------
    def acting_as(self, actor: Actor) -> Self:
        """This service for one signed-in user: the same store, caches and supervisor, every call checked
        against ``actor``'s role and recorded under their name (what the pages use)."""
        bound = copy.copy(self)
        bound.actor = actor
        bound._looked = float("-inf")
        return bound

    @property
    def _system(self) -> bool:
        """The command line, the workers and the tests: no user, every right (:data:`SYSTEM`)."""
        return self.actor.user_id is None and self.actor.role == "admin"

    def _may_look(self) -> None:
        """:class:`UserError` unless this actor may read (see :func:`looks`); a refusal is audited."""
        if self._system or time.monotonic() - self._looked < LOOK_FRESH_S:
            return
        try:
            if self.actor.user_id is None:  # (nobody signed in)
                raise access.Denied("Please sign in.")
            actor = self._acting()
            access.allow(actor, "look", actor.user_id)
        except access.Denied as exc:
            self._audit("look", "", "refused", str(exc))
            raise UserError(str(exc)) from None
        self._looked = time.monotonic()

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
        return given if self._system else self.actor.username

    def _owner(self, given: str | None) -> str | None:
        """Whose drafts and live views: the signed-in user's (the system: what it was given; nobody signed
        in: an owner no row has)."""
        if self._system:
            return given
        return f"user:{self.actor.user_id}" if self.actor.user_id is not None else "nobody:"

    def _tx(self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(session, *args, **kwargs)`` in one transaction; what a user can act on (a refusal, a
        missing row, a damaged file, a full disk) comes out as :class:`UserError`."""
        try:
            with self.sessions.begin() as s:
                return fn(s, *args, **kwargs)
        except (ValueError, LookupError, IntegrityError) as exc:  # (MaskConflict passes through as it is)
            raise UserError(str(exc)) from exc
        except OverflowError as exc:  # a number no column holds (2**70 for an id): nothing to find
            raise UserError("A number in the request is out of range.") from exc
        except access.Denied:  # (a PermissionError, but no disk's: the guard audits it as a refusal)
            raise
        except OSError as exc:
            raise UserError(ingest.disk_message(exc)) from exc

    def _deletion_preview(self, plan_of: Callable[[Session], deletion.Plan], what: str) -> Deleted:
        """What a delete would remove, with another user's runs and predictions it would take named (and the
        refusal the delete would meet for them)."""

        def look(s: Session) -> Deleted:
            plan = plan_of(s)
            theirs = deletion.others(plan, self.actor.user_id)
            return dataclasses.replace(deletion.preview(self.store, plan), others=tuple(theirs),
                                       refused=self._others_refusal(theirs, what))

        return self._tx(look)

    def _others_refusal(self, theirs: list[str], what: str) -> str:
        """Why this actor may not take ``theirs`` (another user's runs and predictions) with the delete of
        ``what``: "" for an admin, or when there are none."""
        if not theirs or self.actor.role == "admin":
            return ""
        return (f"Deleting {what} would also delete {', '.join(theirs)}, which you do not own: ask the owner to "
                "delete it first, or an admin.")

    def _delete_planned(self, plan_of: Callable[[Session], deletion.Plan], what: str) -> Deleted:
        """Carry out a delete's plan (:mod:`storage.records.deletion`). Another user's runs and predictions
        that it would take with it (a prediction made with your checkpoint, a run trained on your dataset) are
        theirs: only an admin's delete takes them (:class:`access.Denied` otherwise). Each run and prediction
        it takes gets its own row in the audit trail."""

        def carry_out(s: Session) -> tuple[deletion.Plan, Deleted]:
            plan = plan_of(s)
            refused = self._others_refusal(deletion.others(plan, self.actor.user_id), what)
            if refused and not plan.refusal:
                raise access.Denied(refused)
            return plan, deletion.execute(s, self.store, plan)

        plan, deleted = self._tx(carry_out)
        for kind, ident, owner_id, owner in plan.owned:
            if f"{kind} {ident}" != what:
                whose = f", owned by {owner}" if owner and owner_id != self.actor.user_id else ""
                self._audit("delete", f"{kind} {ident}", "ok", f"with {what}{whose}")
        return deleted

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
