"""Single sign-on (OIDC through Streamlit's ``st.login``): the user of a provider's answer, found by its
issuer and subject or made at its first sign-in, and the answer taken once, while fresh. Streamlit keeps the
answer in a signed cookie for 30 days, which every port of the host receives and a sign-out does not end: a
copy of it must sign nobody in (:func:`sign_in_oidc`)."""

from __future__ import annotations

import hashlib
import os
import re
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.auth import audit
from storage.auth.accounts import Actor, SignInError, actor_of, create_user, new_session, now, user_by_name
from storage.models import ROLES, SingleSignOn, User

SSO_FRESH = timedelta(minutes=10)  # a provider's answer signs in within this time of being issued, once
SSO_AGAIN = "Your single sign-on has ended: sign in again."


def issued(issued_at: object) -> datetime | None:
    """When the provider issued its answer (its ``iat``, seconds since 1970), or None when it does not say."""
    try:
        return datetime.fromtimestamp(float(issued_at), UTC)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def fresh(issued_at: object) -> bool:
    """Whether an answer issued then may still sign in (``SSO_FRESH``; a provider's clock may run ahead)."""
    when, moment = issued(issued_at), now()
    return when is not None and moment - SSO_FRESH <= when <= moment + timedelta(minutes=5)


def _take_single_sign_on(session: Session, issuer: str, subject: str, issued_at: object, nonce: str) -> str | None:
    """Take the provider's answer for one sign-in: None, or why it signs nobody in. Streamlit keeps the
    answer in a signed cookie for 30 days, which every port of the host receives and a sign-out does not
    end, so a copy must not sign anyone in: an answer is taken once (a digest of issuer, subject, issue
    time and nonce is kept), and only while fresh (``SSO_FRESH``: a session that expired later, or a sign-out,
    goes through the provider again)."""
    if issued(issued_at) is None:
        return "no issue time"
    if not fresh(issued_at):
        return "answer not fresh"
    moment = now()
    digest = hashlib.sha256("\n".join((issuer, subject, f"{float(issued_at)!r}", nonce)).encode()).hexdigest()
    session.execute(delete(SingleSignOn).where(SingleSignOn.used < moment - 2 * SSO_FRESH))
    try:
        with session.begin_nested():
            session.add(SingleSignOn(digest=digest, used=moment))
            session.flush()
    except IntegrityError:  # taken before: by this browser's first session, or by a copy of its cookie
        return "answer already used"
    return None


def sign_in_oidc(session: Session, issuer: str, subject: str, *, email: str = "", name: str = "",
                 preferred: str = "", address: str = "", issued_at: object = None,
                 nonce: str = "") -> tuple[Actor, str]:
    """The user of a single sign-on identity: found by (issuer, subject), or made on its first sign-in
    with the role ``$NEUROSEG_OIDC_ROLE`` (viewer unless set: an admin gives more). Its user name comes
    from the identity's preferred name or e-mail, made safe and unique. The provider's answer (``issued_at``,
    its ``iat``; ``nonce``) signs in once and only fresh (:func:`_take_single_sign_on`)."""
    if not issuer or not subject:
        raise SignInError("The sign-on provider did not say who you are (no issuer or subject).")
    user = session.scalar(select(User).where(User.oidc_issuer == issuer, User.oidc_subject == subject))
    why = _take_single_sign_on(session, issuer, subject, issued_at, str(nonce or ""))
    if why is not None:
        shown = user.username if user is not None else f"sso:{subject[:60]}"
        audit.record(session, user.id if user is not None else None, "sign in", f"user {shown}", "refused",
                     f"single sign-on: {why}", address, username=shown)
        raise SignInError(SSO_AGAIN)
    if user is None:
        base = re.sub(r"[^a-z0-9._-]+", "-", (preferred or email.split("@")[0] or name or "user").lower())
        base = base.strip(".-_")[:56] or "user"
        username, n = base, 1
        while user_by_name(session, username) is not None:
            n += 1
            username = f"{base}-{n}"
        role = os.environ.get("NEUROSEG_OIDC_ROLE", "viewer")
        user = create_user(session, username, role if role in ROLES else "viewer", None, must_change=False,
                           display_name=name, email=email)
        user.oidc_issuer, user.oidc_subject = issuer[:500], subject[:255]
        audit.record(session, user.id, "create user", f"user {username}", detail=f"first single sign-on ({issuer})",
                     address=address, username=username)
    if user.disabled:
        audit.record(session, user.id, "sign in", f"user {user.username}", "failed", "account disabled", address,
                     username=user.username)
        raise SignInError("This account is disabled: ask an admin.")
    token = new_session(session, user, address, "oidc")
    audit.record(session, user.id, "sign in", f"user {user.username}", "ok", "single sign-on", address,
                 username=user.username)
    return actor_of(user, address, token), token
