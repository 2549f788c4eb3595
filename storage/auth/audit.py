"""The audit trail: one row for everything someone did or tried (create, save, restore, delete, train,
cancel, resume, predict, role changes, sign-ins and their failures), with who, when, what, on what, from
which address and how it ended (``ok``, ``refused`` by a permission check, ``failed``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import AuditEvent

OUTCOMES = ("ok", "refused", "failed", "asked")  # (asked: the action asked a question back, e.g. channels as slices)


@dataclass(frozen=True)
class AuditRow:
    id: int
    time: datetime
    username: str
    action: str
    target: str
    outcome: str
    detail: str
    address: str


def record(session: Session, user_id: int | None, action: str, target: str = "", outcome: str = "ok",
           detail: str = "", address: str = "", *, username: str = "") -> None:
    session.add(AuditEvent(time=datetime.now(UTC), user_id=user_id, username=(username or "system")[:64],
                           action=action[:32], target=target[:120], outcome=outcome, detail=detail[:2000],
                           address=(address or "")[:64]))


def events(session: Session, *, username: str = "", action: str = "", outcome: str = "",
           since: datetime | None = None, until: datetime | None = None, limit: int = 500) -> list[AuditRow]:
    """The newest events first, filtered by user name, action, outcome and time."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(max(1, min(limit, 10_000)))
    if username:
        query = query.where(AuditEvent.username == username)
    if action:
        query = query.where(AuditEvent.action == action)
    if outcome:
        query = query.where(AuditEvent.outcome == outcome)
    if since is not None:
        query = query.where(AuditEvent.time >= since)
    if until is not None:
        query = query.where(AuditEvent.time < until)
    return [AuditRow(e.id, e.time if e.time.tzinfo else e.time.replace(tzinfo=UTC), e.username, e.action, e.target,
                     e.outcome, e.detail, e.address) for e in session.scalars(query)]


def actions(session: Session) -> list[str]:
    return sorted(session.scalars(select(AuditEvent.action).group_by(AuditEvent.action)))


def usernames(session: Session) -> list[str]:
    return sorted(session.scalars(select(AuditEvent.username).group_by(AuditEvent.username)))

