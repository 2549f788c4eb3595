"""What the guard lets through a websocket (:func:`filtered`, for :class:`web.guard.Guard`).

- **The developer's menu.** Streamlit takes, from any websocket, signed in or not, messages meant for the
  developer's menu: clear the caches (each one opened the store again and left a supervisor thread and a
  database engine behind), tell the checkout's git remote, branch and changed files, run on save, and the
  debug ones. They are dropped (:data:`DROPPED_MESSAGES`), and logged once per websocket.
- **Large messages before a sign-in.** Streamlit parses every message up to ``server.maxWidgetStateSize``
  (25 MB) and keeps the widget values in the session: a value of nested JSON of 24 MB took ~570 MiB and 5-7 s
  of the interpreter per session, from a websocket that was not signed in. A session that is not signed in
  (:func:`web.sessions.token_of`) sends a sign-in form and its page's key, a few kB: its messages larger than
  :data:`ANONYMOUS_BYTES` are dropped unread. The session a websocket serves is read from the server's first
  message to it. A signed-in account whose role creates nothing (a viewer) sends no canvas either: its messages
  larger than :data:`VIEWER_BYTES` are dropped too (a viewer's 21 MB values held ~290 MiB per tab).
- **Reruns.** Each rerun a browser asks for is handled on the server's event loop (a thread started per
  rerun): a thousand sent at once by websockets that were not even signed in kept the server from answering
  anyone for minutes. Reruns are paced (:class:`Pace`): :data:`SOCKET_PACE` per signed-in websocket,
  :data:`SIGNED_IN_PACE` per sign-in, :data:`ANONYMOUS_PACE` per websocket not signed in, and
  :data:`ALL_ANONYMOUS_PACE` for all of those together. A message over its pace waits (the browser's further
  messages wait behind it) and none is dropped, so a signed-in user's pages go on whatever strangers send.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
import anyio.to_thread
from streamlit import config
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

from storage.service import RIGHTS
from web import sessions

log = logging.getLogger(__name__)
_now = time.monotonic  # (the clock: a test sets its own)

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

DROPPED_MESSAGES = frozenset({"clear_cache", "load_git_info", "set_run_on_save", "debug_disconnect_websocket",
                              "debug_shutdown_runtime"})  # BackMsg kinds of the developer's menu
ANONYMOUS_BYTES = 64 << 10  # the largest message of a session that is not signed in
VIEWER_BYTES = 1 << 20  # … of a session signed in by a role that creates nothing (no canvas, no notes)


class Pace:
    """At most ``rate`` events a second after a burst of ``burst``: :meth:`wait` says how long the next one
    must wait (it is counted at once, so the events queued behind it wait their turn too)."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, _now()

    def wait(self) -> float:
        now = _now()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


SOCKET_PACE = (10.0, 30.0)  # reruns a second (and burst) of one signed-in websocket (a tab)
SIGNED_IN_PACE = (40.0, 80.0)  # … of one sign-in, all its tabs together (a tab's fragments ask every 2 s)
ANONYMOUS_PACE = (2.0, 6.0)  # … of one websocket not signed in (the sign-in form)
ALL_ANONYMOUS_PACE = (10.0, 20.0)  # … of every websocket not signed in, together
_paces: dict[str, Pace] = {}  # by sign-in token (the event loop's only: no lock)
_all_anonymous = Pace(*ALL_ANONYMOUS_PACE)


def _signed_in_pace(token: str) -> Pace:
    if len(_paces) > 10_000:  # (old sign-ins: forget those that have refilled)
        for key in [k for k, p in _paces.items() if _now() - p.at > 60]:
            del _paces[key]
    return _paces.setdefault(token, Pace(*SIGNED_IN_PACE))


def _may_create(session_id: str) -> bool:
    who = sessions.actor_of(session_id)
    return who is not None and "create" in RIGHTS.get(getattr(who, "role", ""), set())


def back_message_kind(data: bytes) -> str | None:
    """What a websocket message from a browser asks of Streamlit (its ``BackMsg`` kind), or None when it is not
    one (Streamlit then says so itself)."""
    message = BackMsg()
    try:
        message.ParseFromString(data)
    except Exception:  # (protobuf's DecodeError: bytes that are no BackMsg)
        return None
    return message.WhichOneof("type")


def _largest_message() -> int:
    try:
        return int(config.get_option("server.maxWidgetStateSize")) << 20
    except Exception:
        return 25 << 20


def new_session_id(data: bytes) -> str:
    """The session id a server's message to a browser announces (its ``new_session``), or ""."""
    if len(data) > 1 << 20:  # (a new session's message is small: a large one is a page's content)
        return ""
    message = ForwardMsg()
    try:
        message.ParseFromString(data)
    except Exception:  # (protobuf's DecodeError)
        return ""
    return message.new_session.initialize.session_id if message.WhichOneof("type") == "new_session" else ""


def filtered(receive: Receive, send: Send, signed_in: str = "") -> tuple[Receive, Send]:
    """``receive`` and ``send`` of a websocket, with the filters of this module's text: a message larger than
    Streamlit takes is passed on unread (Streamlit closes the websocket), and each kind of drop is logged once
    per websocket."""
    largest, told, socket = _largest_message(), set(), {"session": ""}
    own_pace, tab_pace = Pace(*ANONYMOUS_PACE), Pace(*SOCKET_PACE)

    def drop(why: str) -> None:
        if why not in told:
            told.add(why)
            log.warning("dropped a websocket message (%s), and any more of them", why)

    async def receiving() -> MutableMapping[str, Any]:
        while True:
            message = await receive()
            data = message.get("bytes") if message.get("type") == "websocket.receive" else None
            # (``signed_in``: the browser's sign-in cookie, checked by the guard: a new tab's, a reload's or a
            # reconnect's first rerun comes before the server has said which session it serves)
            token = sessions.token_of(socket["session"]) if socket["session"] else signed_in
            if data and len(data) > ANONYMOUS_BYTES and not token:
                drop(f"more than {ANONYMOUS_BYTES:,} bytes from a session that is not signed in")
                continue
            if data and VIEWER_BYTES < len(data) <= largest and not await anyio.to_thread.run_sync(
                    _may_create, socket["session"]):
                drop(f"more than {VIEWER_BYTES:,} bytes from a session whose role creates nothing")
                continue
            kind = back_message_kind(data) if data and len(data) <= largest else None
            if kind in DROPPED_MESSAGES:
                drop(f"the developer's menu: {kind}")
                continue
            if kind == "rerun_script":
                wait = (max(tab_pace.wait(), _signed_in_pace(token).wait()) if token else
                        max(own_pace.wait(), _all_anonymous.wait()))
                if wait > 0:
                    if "pace" not in told:
                        told.add("pace")
                        log.warning("a websocket asks for reruns faster than its pace: they wait")
                    await anyio.sleep(wait)
            return message

    async def sending(message: MutableMapping[str, Any]) -> None:
        if not socket["session"] and message.get("type") == "websocket.send" and message.get("bytes"):
            socket["session"] = new_session_id(message["bytes"])
        await send(message)

    return receiving, sending
