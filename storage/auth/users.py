"""Users as the admin manages them (roles, queue limits, one-time passwords, disabling), who owns what,
the training queue with its owners, and the disk each dataset and run takes. The checks of who may call
these are the service's (:mod:`storage.auth.access`)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from domain.kinds import RunKind, RunStatus
from domain.records import UserInfo
from storage.auth.accounts import aware, create_user, get_user, now
from storage.auth.passwords import HASHER, check_new_password
from storage.models import ROLES, Checkpoint, Dataset, Prediction, Run, SignIn, User
from storage.records.files import FileStore

OWNED = {"dataset": Dataset, "run": Run, "prediction": Prediction}


def user_info(session: Session, user_id: int) -> UserInfo:
    return _info(get_user(session, user_id))


def _info(u: User) -> UserInfo:
    return UserInfo(u.id, u.username, u.display_name, u.email, u.role, u.oidc_subject is not None,
                    u.password_hash is not None, bool(u.must_change_password), bool(u.disabled), u.max_queued_runs,
                    aware(u.created), aware(u.last_sign_in))


def list_users(session: Session) -> list[UserInfo]:
    return [_info(u) for u in session.scalars(select(User).order_by(User.username))]


def create_local(session: Session, username: str, role: str, password: str = "") -> tuple[UserInfo, str]:
    password = password or secrets.token_urlsafe(12)
    user = create_user(session, username, role, password, must_change=True)
    return _info(user), password


def set_role(session: Session, user_id: int, role: str) -> UserInfo:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    user = get_user(session, user_id)
    if user.role == "admin" and role != "admin" and _admins(session) <= 1:
        raise ValueError("This is the only admin: make another user admin first.")
    user.role = role
    return _info(user)


def _admins(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(User).where(User.role == "admin",
                                                                      User.disabled.is_(False))) or 0


def set_queue_limit(session: Session, user_id: int, runs_waiting: int) -> UserInfo:
    if not 1 <= int(runs_waiting) <= 100:
        raise ValueError("A user may have between 1 and 100 training runs waiting.")
    user = get_user(session, user_id)
    user.max_queued_runs = int(runs_waiting)
    return _info(user)


def reset_password(session: Session, user_id: int) -> str:
    user = get_user(session, user_id)
    if user.oidc_subject is not None and user.password_hash is None:
        raise ValueError(f"{user.username} signs in by single sign-on and has no password here.")
    password = secrets.token_urlsafe(12)
    user.password_hash = HASHER.hash(check_new_password(password))
    user.must_change_password, user.failed_sign_ins, user.locked_until = True, 0, None
    session.execute(delete(SignIn).where(SignIn.user_id == user.id))
    return password


def set_disabled(session: Session, user_id: int, disabled: bool) -> UserInfo:
    user = get_user(session, user_id)
    if disabled and user.role == "admin" and _admins(session) <= 1:
        raise ValueError("This is the only admin: it cannot be disabled.")
    user.disabled = bool(disabled)
    if disabled:  # its sign-ins end for good, and are kept a while so that its open tabs can say why
        session.execute(update(SignIn).where(SignIn.user_id == user.id, SignIn.expires > now())
                        .values(expires=now()))
    else:  # wrong passwords tried while it was disabled do not keep it waiting
        user.failed_sign_ins, user.locked_until = 0, None
    return _info(user)


# --- ownership ---------------------------------------------------------------------------------------------
def owner_of(session: Session, kind: str | None, ident: int | None) -> tuple[int | None, str]:
    """(owner's id, owner's name) of a dataset, run, checkpoint (its run's) or prediction; (None, "")
    when it has none. LookupError when it does not exist."""
    shown, asked = kind, ident
    if kind == "checkpoint":
        checkpoint = session.get(Checkpoint, int(ident)) if ident is not None else None
        kind, ident = "run", (checkpoint.run_id if checkpoint else None)
    model = OWNED.get(kind or "")
    row = session.get(model, int(ident)) if model is not None and ident is not None else None
    if row is None:
        raise LookupError(f"{shown} {asked} does not exist")
    if row.owner_id is None:
        return None, ""
    return row.owner_id, row.owner.username if row.owner else ""


def set_owner(session: Session, kind: str, ident: int, user_id: int) -> None:
    row = session.get(OWNED[kind], ident)
    if row is not None:
        row.owner_id = user_id


# --- the training queue ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueueRow:
    position: int  # 0: running now; 1: next; …
    run_id: int
    owner: str
    status: str
    device: str
    kind: str
    preset: str


def training_queue(session: Session) -> list[QueueRow]:
    """Running runs first, then the waiting ones in the order they start (:func:`storage.jobs.queue.start_queued`:
    oldest first, live sessions after normal runs)."""
    active = session.scalars(select(Run).where(Run.status.in_([RunStatus.RUNNING, RunStatus.QUEUED]))
                             .order_by(Run.status != RunStatus.RUNNING, Run.kind == RunKind.LIVE, Run.id)).all()
    rows, waiting = [], 0
    for run in active:
        if run.status == RunStatus.QUEUED:
            waiting += 1
        rows.append(QueueRow(0 if run.status == RunStatus.RUNNING else waiting, run.id,
                             run.owner.username if run.owner else "", run.status, run.device, run.kind or "train",
                             (run.spec or {}).get("preset", "")))
    return rows


def check_queue_room(session: Session, user_id: int) -> None:
    """Refuse a new training run while the user already has as many waiting as they may (one unless an
    admin raised it), so one user cannot fill a shared GPU's queue."""
    user = get_user(session, user_id)
    waiting = session.scalars(select(Run.id).where(Run.owner_id == user_id, Run.status == RunStatus.QUEUED,
                                                   Run.kind != RunKind.LIVE).order_by(Run.id)).all()
    if len(waiting) >= user.max_queued_runs:
        listed = ", ".join(f"#{r}" for r in waiting)
        raise ValueError(f"You already have {len(waiting)} training run{'s' * (len(waiting) > 1)} waiting ({listed}); "
                         f"your limit is {user.max_queued_runs}. Wait for it to start or cancel it "
                         "(an admin can raise the limit).")


# --- disk use ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskUse:
    datasets: list[tuple[int, str, str, int]]  # (id, name, owner, bytes), largest first
    runs: list[tuple[int, str, str, int]]  # (id, preset or kind, owner, bytes)
    predictions_bytes: int
    total_bytes: int
    free_bytes: int
    orphans_bytes: int = 0  # folders a crash left that no dataset owns (``orphans/``, kept for a look)
    orphans: tuple[tuple[str, int], ...] = ()  # (name, bytes) of each, largest first


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def disk_use(session: Session, store: FileStore) -> DiskUse:
    ds = [(d.id, d.name, d.owner.username if d.owner else "", _size(store.root / store.dataset_dir(d.id)))
          for d in session.scalars(select(Dataset))]
    rs = [(r.id, (r.spec or {}).get("preset", "") or r.kind, r.owner.username if r.owner else "",
           _size(store.run_dir(r.id))) for r in session.scalars(select(Run))]
    predictions = _size(store.root / "predictions")
    left = _orphans(store)
    orphans = sum(n for _, n in left)
    free = shutil.disk_usage(store.root).free
    return DiskUse(sorted(ds, key=lambda t: -t[3]), sorted(rs, key=lambda t: -t[3]), predictions,
                   sum(t[3] for t in ds) + sum(t[3] for t in rs) + predictions + orphans, free, orphans, left)


def _orphans(store: FileStore) -> tuple[tuple[str, int], ...]:
    folder = store.root / ORPHANS
    if folder.is_symlink() or not folder.is_dir():
        return ()
    entries = []
    for entry in folder.iterdir():
        with contextlib.suppress(FileNotFoundError):  # (gone meanwhile: another admin deleted it)
            entries.append((entry.name, _size(entry) if entry.is_dir() and not entry.is_symlink()
                            else entry.lstat().st_size))
    return tuple(sorted(entries, key=lambda t: -t[1]))


ORPHANS = "orphans"  # (storage.records.datasets moves a crash's leftover folder there)


def empty_orphans(store: FileStore, names: list[str] | None = None) -> tuple[int, int]:
    """Delete what crashes left in ``orphans/`` (no row owns it; an admin has looked): the entries ``names``
    (what the admin was shown; None: all); returns (entries, bytes) freed. A link there is removed, never
    followed; an entry gone meanwhile is skipped."""
    wanted = None if names is None else set(names)
    chosen = [(name, n) for name, n in _orphans(store) if wanted is None or name in wanted]
    for name, _ in chosen:  # (none when orphans/ is a link or a file: _orphans lists nothing then)
        entry = store.root / ORPHANS / name
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return len(chosen), sum(n for _, n in chosen)
