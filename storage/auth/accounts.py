"""Who may sign in, and who is signed in: local accounts with argon2id password hashes (``argon2-cffi``),
identities from single sign-on (OIDC, through Streamlit's ``st.login``) mapped to the same users, the
browsers signed in (a random token in a cookie; the store keeps its SHA-256), the first admin, and the
slowing down of wrong passwords (the hashes, the rules of a password and how long a name waits:
:mod:`storage.auth.passwords`). Every sign-in, failed or not, is in the audit trail (:mod:`storage.auth.audit`).

No Streamlit here: the pages hand over what the browser sent (the form, the cookie, the address) and show
the :class:`~domain.records.UserError` messages raised here."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from storage.auth import audit
from storage.auth.passwords import (
    ADDRESS_TRIES,
    ADDRESS_WINDOW,
    HASHER,
    MAX_PASSWORD,
    MAX_WAIT,
    check_new_password,
    shared_address,
    verify_password,
    wait_after,
)
from storage.models import ROLES, AuditEvent, SignIn, User
from storage.text import clean_name

log = logging.getLogger(__name__)

USERNAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SESSION_HOURS = float(os.environ.get("NEUROSEG_SESSION_HOURS", "12"))


class SignInError(ValueError):
    """A sign-in that did not happen, with what to tell the user (the service shows it as it is)."""


@dataclass(frozen=True)
class Actor:
    """Who does something, as the service sees it: the signed-in user (or ``system``: the command line,
    the workers and the tests, which act for nobody in particular) and the address they came from."""

    user_id: int | None
    username: str
    role: str
    address: str = ""
    must_change_password: bool = False
    display_name: str = ""
    token_sha256: str = ""  # the browser's sign-in (the SHA-256 of its token): checked on every guarded call


SYSTEM = Actor(None, "system", "admin")


def now() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without their zone; they are stored in UTC."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def browser_secret(folder: Path) -> bytes:
    """This store's key for :func:`browser_key` (made once, readable by the server's user only)."""
    path = folder / "browser.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        pass
    tmp = folder / f".browser.key.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    try:
        os.link(tmp, path)  # the first server to get here decides; the others read its key
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return bytes.fromhex(path.read_text().strip())


def browser_key(secret: bytes, token: str) -> str:
    """The second half of a browser's sign-in. The token travels in a cookie, and a cookie goes to every
    port of its host (a page served on another localhost port receives it); this key is kept in the
    browser's storage of this origin only (scheme, host and port), and a page proves it before a cookie
    alone signs a new session in. Derived from the token, so the store keeps nothing more."""
    return hmac.new(secret, token_digest(token).encode(), hashlib.sha256).hexdigest()


def actor_of(user: User, address: str = "", token: str = "") -> Actor:
    return Actor(user.id, user.username, user.role, address, bool(user.must_change_password),
                 user.display_name or user.username, token_digest(token) if token else "")


def current_actor(session: Session, actor: Actor) -> Actor:
    """``actor`` as the store says it is now, read in one small query on every guarded call (a page's
    callback runs before its sign-in check, so what the browser's session remembers may be old): the user
    still exists and is not disabled, their role and one-time-password state are the current ones (a
    demoted user has the new role's rights at once), and the browser's sign-in, when the actor carries one,
    is still there (not signed out, revoked or expired). :class:`SignInError` says why not. The system
    (no user) is what it is."""
    if actor.user_id is None:
        return actor
    query = select(User.role, User.disabled, User.must_change_password)
    if actor.token_sha256:
        query = query.add_columns(SignIn.expires).outerjoin(
            SignIn, (SignIn.user_id == User.id) & (SignIn.token_sha256 == actor.token_sha256))
    row = session.execute(query.where(User.id == actor.user_id)).first()
    if row is None:
        raise SignInError("This account no longer exists: sign in again.")
    if row.disabled:
        raise SignInError("This account is disabled: ask an admin.")
    if actor.token_sha256 and (row.expires is None or aware(row.expires) <= now()):
        raise SignInError("You are signed out (your session ended or was revoked): sign in again.")
    if row.role == actor.role and bool(row.must_change_password) == actor.must_change_password:
        return actor
    return replace(actor, role=row.role, must_change_password=bool(row.must_change_password))


# --- what a name and a password may be -------------------------------------------------------------------
def check_username(name: str) -> str:
    """The name as stored (lower case), or ValueError saying what is wrong with it."""
    name = (name or "").strip()
    if not name:
        raise ValueError("Enter a user name.")
    if len(name) > 64:
        raise ValueError("A user name has at most 64 characters.")
    lowered = name.lower()
    if not USERNAME.fullmatch(lowered):
        raise ValueError("A user name has only letters a–z, digits, '.', '_' and '-', and starts with a letter "
                         "or a digit (no spaces, slashes or markup).")
    return lowered


# --- users -------------------------------------------------------------------------------------------------
def user_by_name(session: Session, username: str) -> User | None:
    return session.scalar(select(User).where(User.username == username.strip().lower()))


def get_user(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise LookupError(f"user {user_id} does not exist")
    return user


def create_user(session: Session, username: str, role: str, password: str | None = None, *,
                must_change: bool = True, display_name: str = "", email: str = "") -> User:
    name = check_username(username)
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    if user_by_name(session, name) is not None:
        raise ValueError(f"There is already a user named {name}.")
    user = User(username=name, role=role, display_name=clean_name(display_name, cut=True),
                email=clean_name(email, cut=True, limit=320),
                password_hash=HASHER.hash(check_new_password(password, name)) if password else None,
                must_change_password=must_change, max_queued_runs=1)
    session.add(user)
    session.flush()
    return user


def ensure_admin(session: Session, say: Callable[[str], None] = log.info) -> str | None:
    """On the first start (no user yet), or after the migration of a store made before accounts (an
    ``admin`` that owns the old rows and has no password), give the admin a one-time password: the one in
    ``$NEUROSEG_ADMIN_PASSWORD``, else a random one printed once in the server log. It must be changed at
    the first sign-in. Returns the password made (None when nothing was to do)."""
    users = session.scalar(select(func.count()).select_from(User)) or 0
    admin = None
    if users:
        admin = session.scalar(select(User).where(User.role == "admin", User.password_hash.is_(None),
                                                  User.oidc_subject.is_(None), User.username == "admin"))
        if admin is None:
            return None
    given = os.environ.get("NEUROSEG_ADMIN_PASSWORD", "")
    password = given or secrets.token_urlsafe(12)
    check_new_password(password, "admin")
    if admin is None:
        admin = create_user(session, "admin", "admin", password, must_change=True, display_name="Administrator")
    else:
        admin.password_hash, admin.must_change_password = HASHER.hash(password), True
    audit.record(session, None, "create user", "user admin", detail="the first admin (one-time password)")
    if given:
        say("the admin account 'admin' signs in with the password in $NEUROSEG_ADMIN_PASSWORD; "
            "it must be changed at the first sign-in.")
    else:
        say(f"created the admin account 'admin' with the one-time password {password} "
            "(shown only this once; it must be changed at the first sign-in).")
    return password


def awaiting_first_admin(session: Session) -> bool:
    """A store nobody has set up yet: the first admin alone, still with the one-time password of the first
    start (the sign-in page then says where that password is)."""
    users = list(session.scalars(select(User).limit(2)))
    return (len(users) == 1 and users[0].username == "admin" and users[0].must_change_password
            and users[0].password_hash is not None)


# --- signing in and out ------------------------------------------------------------------------------------
# What a refused sign-in says, the same whether the name is an account or not (a user of single sign-on
# finds its button on the same form).
WRONG_MESSAGE = "Unknown user name or wrong password."
WAIT_MESSAGE = "Too many wrong passwords for this user name: wait {seconds} s and try again."
UNKNOWN = "unknown user"  # the audit trail's detail of a sign-in with a name that is no account


def _locked_until(session: Session, user: User | None, name: str) -> datetime | None:
    """Until when a name must wait after wrong passwords in a row: an account's own count, and for a name
    that is no account the same count kept in the audit trail, so both answer alike and at the same time."""
    if user is not None:
        return aware(user.locked_until)
    count, last = session.execute(select(func.count(), func.max(AuditEvent.time)).where(
        AuditEvent.action == "sign in", AuditEvent.outcome == "failed", AuditEvent.username == name,
        AuditEvent.user_id.is_(None), AuditEvent.detail == UNKNOWN)).one()
    wait = wait_after(count or 0)
    return aware(last) + wait if wait and last is not None else None


def _first_try_from(session: Session, name: str, address: str, moment: datetime) -> bool:
    """Whether a name's wait spares this address: the owner's (not shared, signed in as that name before), from
    which no sign-in as that name failed for as long as the longest wait. Else anyone could keep an account (the
    admin's, whose name is known) waiting for good with one wrong password every five minutes, its owner's
    right password included. An address that never signed in as the name (a stranger's; any address, for a
    name that is no account) waits as before, so many addresses buy no more tries."""
    if shared_address(address):
        return False
    sign_ins = select(func.count()).select_from(AuditEvent).where(
        AuditEvent.action == "sign in", AuditEvent.username == name, AuditEvent.address == address[:64])
    if not session.scalar(sign_ins.where(AuditEvent.outcome == "ok")):
        return False
    return not session.scalar(sign_ins.where(AuditEvent.outcome.in_(("failed", "refused")),
                                             AuditEvent.time > moment - MAX_WAIT))


EXPIRED_KEPT = timedelta(days=1)  # how long an expired sign-in is kept, so a browser is told it expired


def new_session(session: Session, user: User, address: str, method: str) -> str:
    token = secrets.token_urlsafe(32)
    moment = now()
    session.add(SignIn(token_sha256=token_digest(token), user_id=user.id, created=moment,
                       expires=moment + timedelta(hours=SESSION_HOURS), address=address[:64], method=method))
    # forget the sign-ins expired a day ago (until then, a browser that comes back is told that its expired)
    session.execute(delete(SignIn).where(SignIn.expires < moment - EXPIRED_KEPT))
    user.last_sign_in = moment
    return token


def sign_in(session: Session, username: str, password: str, address: str = "") -> tuple[Actor, str]:
    """Check a name and a password; returns the user and a new session token for the browser's cookie.
    A refusal raises :class:`SignInError` after it is recorded (the caller commits it). Wrong passwords
    in a row make the account wait, and many failures from one address make that address wait."""
    moment = now()
    shown = (username or "").strip()[:64]
    try:
        name = check_username(username)
    except ValueError as exc:
        audit.record(session, None, "sign in", f"user {shown!r}", "failed", str(exc), address, username=shown)
        raise SignInError(str(exc)) from None
    if not password:
        audit.record(session, None, "sign in", f"user {name}", "failed", "empty password", address, username=name)
        raise SignInError("Enter your password.")
    if len(password) > MAX_PASSWORD:
        audit.record(session, None, "sign in", f"user {name}", "failed", "password too long", address, username=name)
        raise SignInError(f"That password is longer than any password here ({MAX_PASSWORD} characters at most).")
    failures = select(func.count()).select_from(AuditEvent).where(
        AuditEvent.action == "sign in", AuditEvent.outcome == "failed", AuditEvent.address == address[:64],
        AuditEvent.time > moment - ADDRESS_WINDOW)
    if shared_address(address):  # everyone on this machine (or behind it): each name counts its own
        failures = failures.where(AuditEvent.username == name)
    if (session.scalar(failures) or 0) >= ADDRESS_TRIES:
        audit.record(session, None, "sign in", f"user {name}", "refused", "too many failures from this address",
                     address, username=name)
        raise SignInError("Too many failed sign-ins from this address: wait a few minutes and try again.")
    # (the row is locked on a server database: another server process's sign-in as this user waits for this one)
    user = session.scalar(select(User).where(User.username == name).with_for_update())
    locked = _locked_until(session, user, name)
    if locked is not None and locked > moment and not _first_try_from(session, name, address, moment):
        seconds = int((locked - moment).total_seconds()) + 1
        audit.record(session, user.id if user else None, "sign in", f"user {name}", "refused",
                     "waiting after wrong passwords", address, username=name)
        raise SignInError(WAIT_MESSAGE.format(seconds=seconds))
    good = verify_password(user.password_hash if user is not None else None, password)
    if user is None or not good or user.disabled:
        if user is not None:  # (a disabled account waits too: it answers as an unknown name does)
            user.failed_sign_ins += 1
            wait = wait_after(user.failed_sign_ins)
            user.locked_until = moment + wait if wait else None
        why = UNKNOWN if user is None else ("account disabled" if user.disabled else "wrong password")
        audit.record(session, user.id if user else None, "sign in", f"user {name}", "failed", why, address,
                     username=name)
        raise SignInError(WRONG_MESSAGE)  # (a disabled account's right password too: else it says that it is right)
    if HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = HASHER.hash(password)
    user.failed_sign_ins, user.locked_until = 0, None
    token = new_session(session, user, address, "password")
    audit.record(session, user.id, "sign in", f"user {name}", "ok", "password", address, username=name)
    return actor_of(user, address, token), token


class SessionExpired(SignInError):
    pass


def session_actor(session: Session, token: str, address: str = "") -> Actor:
    """The user a browser's token signs in, or :class:`SignInError` (an unknown token, an expired session
    or a disabled account) with what to tell the user."""
    row = session.get(SignIn, token_digest(token)) if token else None
    if row is None:
        raise SignInError("Please sign in.")
    user = session.get(User, row.user_id)
    if aware(row.expires) <= now():  # (kept: every check of it, the page's and its pictures', says the same)
        if user is None or user.disabled:  # (ended by the disabling: a re-enabled account signs in again)
            raise SignInError("This account is disabled: ask an admin.")
        raise SessionExpired("Your session has expired: sign in again. Nothing you saved is lost, and unsaved "
                             "annotation is kept for you.")
    if user is None or user.disabled:
        session.delete(row)
        raise SignInError("This account is disabled: ask an admin.")
    return actor_of(user, address or row.address, token)


def sign_out(session: Session, token: str, actor: Actor | None = None) -> None:
    session.execute(delete(SignIn).where(SignIn.token_sha256 == token_digest(token)))
    if actor is not None and actor.user_id is not None:
        audit.record(session, actor.user_id, "sign out", f"user {actor.username}", address=actor.address,
                     username=actor.username)


def change_password(session: Session, actor: Actor, old: str, new: str, keep_token: str = "") -> None:
    """The signed-in user's new password; every other browser signed in as them is signed out. A disabled
    account, or a browser whose sign-in has ended, cannot (:func:`current_actor`)."""
    current_actor(session, actor)
    user = get_user(session, actor.user_id)
    if not verify_password(user.password_hash, old or ""):
        audit.record(session, user.id, "change password", f"user {user.username}", "failed",
                     "wrong current password", actor.address, username=user.username)
        raise SignInError("The current password is wrong.")
    check_new_password(new, user.username)
    if new == old:
        raise ValueError("Choose a new password, not the one you have.")
    user.password_hash, user.must_change_password = HASHER.hash(new), False
    session.execute(delete(SignIn).where(SignIn.user_id == user.id,
                                         SignIn.token_sha256 != token_digest(keep_token)))
    audit.record(session, user.id, "change password", f"user {user.username}", address=actor.address,
                 username=user.username)
