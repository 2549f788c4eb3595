"""Which Streamlit session is signed in as whom, for the checks that run before Streamlit sees a request.

Streamlit knows its sessions by an id that the browser also sends in clear (the upload URL, the
websocket's reconnect header), so the id alone must never act as a credential. The page layer binds a
session id to the sign-in token it holds (:func:`bind`) on every run and unbinds it when nobody is signed
in; :mod:`web.guard` asks :func:`actor_of` before it lets an upload through, and compares a reconnecting
browser's cookie with :func:`token_of`. Each answer is checked again against the store (the
``verify`` function the page layer installs, :meth:`storage.service.Neuroseg.signed_in`), so a
session whose account was disabled or signed out elsewhere stops counting at once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

COOKIE = "neuroseg_session"  # the browser's copy of the sign-in token (pages.signin writes it)

_lock = threading.Lock()
_tokens: dict[str, str] = {}
_verify: Callable[[str], Any] | None = None


def install_verifier(verify: Callable[[str], Any]) -> None:
    """The function that turns a token into the account it signs in (raising when it is not valid)."""
    global _verify
    _verify = verify


def bind(session_id: str, token: str) -> None:
    with _lock:
        _tokens[session_id] = token


def unbind(session_id: str) -> None:
    with _lock:
        _tokens.pop(session_id, None)


def token_of(session_id: str) -> str:
    with _lock:
        return _tokens.get(session_id, "")


def actor_of(session_id: str) -> Any | None:
    """The account the session is signed in as now, or None (not bound, or its token is no longer valid)."""
    token = token_of(session_id)
    return verified(token) if token else None


def verified(token: str) -> Any | None:
    """The account a sign-in token stands for now, or None."""
    if not token or _verify is None:
        return None
    try:
        return _verify(token)
    except Exception:  # revoked, expired, disabled, or the store is closing: not signed in
        return None


def forget_all() -> None:
    """(tests) Drop every binding."""
    with _lock:
        _tokens.clear()
