"""The service's accounts (part of :class:`storage.service.Neuroseg`): signing in and out, passwords, the
users an admin manages, the audit trail, disk use and the training queue
(:mod:`storage.auth.accounts`, :mod:`storage.auth.users`, :mod:`storage.auth.audit`)."""

from __future__ import annotations

import dataclasses
import hmac
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import select

from domain.kinds import ACTIVE, RunKind
from domain.records import UserError, UserInfo
from storage.auth import access, accounts, audit, single_sign_on, users
from storage.auth.access import RIGHTS
from storage.auth.accounts import Actor
from storage.auth.audit import AuditRow
from storage.facade import Facade, guard, looks
from storage.models import Prediction, Run
from storage.records import live, predictions, runs

T = TypeVar("T")

# One password sign-in at a time in this server, from reading the throttle's counts to writing them: each
# browser session submits its form in a thread of its own, and 40 wrong passwords sent at once were all checked
# (the counts were read before the slow hash and written after). argon2 takes ~50 ms, so a lab waits no more
# than a moment; refusals by the throttle hash nothing and return at once.
_SIGN_IN = threading.Lock()


class AccountsService(Facade):
    """Signing in, and what an admin manages."""

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
        with _SIGN_IN:
            return self._signing(accounts.sign_in, username, password, address)

    def sign_in_oidc(self, issuer: str, subject: str, *, email: str = "", name: str = "", preferred: str = "",
                     address: str = "", issued_at: object = None, nonce: str = "") -> tuple[Actor, str]:
        """(the user, a new session token) for the provider's answer that has just come back (``st.user``:
        its issuer, subject, ``iat`` and ``nonce``); each answer signs in once, fresh."""
        return self._signing(single_sign_on.sign_in_oidc, issuer, subject, email=email, name=name,
                             preferred=preferred, address=address, issued_at=issued_at, nonce=nonce)

    @staticmethod
    def single_sign_on_fresh(issued_at: object) -> bool:
        """Whether a provider's answer issued then (its ``iat``) may still sign in: a page asks before it tries
        one, so an old Streamlit sign-on cookie does not write a refusal on every run."""
        return single_sign_on.fresh(issued_at)

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

    @guard("list users", "admin", record=False)
    def users(self) -> list[UserInfo]:
        return self._tx(users.list_users)

    @guard("create user", "admin", target=lambda username, *a, **k: f"user {username}")
    def create_user(self, username: str, role: str, password: str = "") -> tuple[UserInfo, str]:
        """A local account; without a password a one-time one is made (returned, to hand over). It must
        be changed at the first sign-in."""
        return self._tx(users.create_local, username, role, password)

    @guard("set role", "admin", target=lambda user_id, role, *a, **k: f"user {user_id} → {role}")
    def set_role(self, user_id: int, role: str) -> UserInfo:
        """A user's new role, at once; a role that may not train stops the user's trainings and live
        sessions too (see :meth:`_stop_jobs_of`)."""
        if user_id == self.actor.user_id and role != "admin":
            raise access.Denied("You cannot take the admin role from yourself: another admin can.")  # (refused)
        info = self._tx(users.set_role, user_id, role)
        if "train" in RIGHTS.get(role, ()):
            return info
        return dataclasses.replace(info, stopped=tuple(self._stop_jobs_of(user_id, f"its owner's role is now {role}")))

    @guard("set queue limit", "admin", target=lambda user_id, n, *a, **k: f"user {user_id} → {n} waiting")
    def set_queue_limit(self, user_id: int, runs_waiting: int) -> UserInfo:
        return self._tx(users.set_queue_limit, user_id, runs_waiting)

    @guard("reset password", "admin", "user")
    def reset_password(self, user_id: int) -> str:
        """A new one-time password for a local account (returned, to hand over); its browsers are signed out."""
        return self._tx(users.reset_password, user_id)

    @guard("disable user", "admin", target=lambda user_id, off, *a, **k: f"user {user_id} → "
            + ("disabled" if off else "enabled"))
    def set_disabled(self, user_id: int, disabled: bool) -> UserInfo:
        if user_id == self.actor.user_id and disabled:
            raise access.Denied("You cannot disable your own account.")
        info = self._tx(users.set_disabled, user_id, disabled)
        if not disabled:
            return info
        return dataclasses.replace(info, stopped=tuple(self._stop_jobs_of(user_id, "its owner's account is disabled")))

    def _stop_jobs_of(self, user_id: int, why: str) -> list[str]:
        """Stop the trainings, live sessions and predictions a user owns that are queued or running (a queued
        one is cancelled, a running one stops at its next step or block and keeps its checkpoints or blocks): a
        user who may no longer train or predict has none going on, nor waiting for the device. Each is audited;
        returns what was stopped."""
        def stop(s) -> list[str]:
            stopped = []
            for run in s.scalars(select(Run).where(Run.owner_id == user_id, Run.status.in_(list(ACTIVE)))
                                 .order_by(Run.id)):
                (live.stop if run.kind == RunKind.LIVE else runs.cancel_run)(s, run.id)
                stopped.append(f"{'live session' if run.kind == RunKind.LIVE else 'run'} {run.id}")
            for prediction_id in s.scalars(select(Prediction.id).where(
                    Prediction.owner_id == user_id, Prediction.status.in_(list(ACTIVE)),
                    Prediction.cancel_requested.is_(None)).order_by(Prediction.id)).all():
                predictions.cancel_prediction(s, prediction_id)
                stopped.append(f"prediction {prediction_id}")
            return stopped

        stopped = self._tx(stop)
        for what in stopped:
            self._audit("cancel", what, "ok", why)
        return stopped

    @guard("audit", "admin", record=False)
    def audit_trail(self, *, username: str = "", action: str = "", outcome: str = "", since=None, until=None,
                    limit: int = 500) -> list[AuditRow]:
        return self._tx(audit.events, username=username, action=action, outcome=outcome, since=since, until=until,
                        limit=limit)

    @guard("audit", "admin", record=False)
    def audit_choices(self) -> tuple[list[str], list[str]]:
        """(the user names, the actions) that occur in the trail, for its filters."""
        return self._tx(lambda s: (audit.usernames(s), audit.actions(s)))

    @guard("disk use", "admin", record=False)
    def disk_use(self) -> users.DiskUse:
        """Bytes on disk per dataset and per run (their folders in the store), and what is free."""
        return self._tx(users.disk_use, self.store)

    @guard("empty orphans", "admin", target=lambda *a, **k: "orphans/", record=False)
    def empty_orphans(self, names: list[str] | None = None) -> int:
        """Delete the folders crashes left that no dataset owns (``orphans/``): those named (what the admin was
        shown; None: all); returns the bytes freed. The trail says how many and how much."""
        count, freed = self._tx(lambda s: users.empty_orphans(self.store, names))
        self._audit("empty orphans", "orphans/", "ok", f"{count} folder{'s' if count != 1 else ''}, {freed:,} bytes")
        return freed

    @looks
    def training_queue(self) -> list[users.QueueRow]:
        """The training runs that are running or waiting, in the order they start, with their owners."""
        return self._tx(users.training_queue)

    def awaiting_first_admin(self) -> bool:
        """Nobody has set this store up yet (the sign-in page says where the first password is)."""
        return self._tx(accounts.awaiting_first_admin)
