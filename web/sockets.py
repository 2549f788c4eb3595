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
  message to it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from streamlit import config
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

from web import sessions

log = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

DROPPED_MESSAGES = frozenset({"clear_cache", "load_git_info", "set_run_on_save", "debug_disconnect_websocket",
                              "debug_shutdown_runtime"})  # BackMsg kinds of the developer's menu
ANONYMOUS_BYTES = 64 << 10  # the largest message of a session that is not signed in


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


def filtered(receive: Receive, send: Send) -> tuple[Receive, Send]:
    """``receive`` and ``send`` of a websocket, with the filters of this module's text: a message larger than
    Streamlit takes is passed on unread (Streamlit closes the websocket), and each kind of drop is logged once
    per websocket."""
    largest, told, socket = _largest_message(), set(), {"session": ""}

    def drop(why: str) -> None:
        if why not in told:
            told.add(why)
            log.warning("dropped a websocket message (%s), and any more of them", why)

    async def receiving() -> MutableMapping[str, Any]:
        while True:
            message = await receive()
            data = message.get("bytes") if message.get("type") == "websocket.receive" else None
            if data and len(data) > ANONYMOUS_BYTES and not sessions.token_of(socket["session"]):
                drop(f"more than {ANONYMOUS_BYTES:,} bytes from a session that is not signed in")
                continue
            kind = back_message_kind(data) if data and len(data) <= largest else None
            if kind not in DROPPED_MESSAGES:
                return message
            drop(f"the developer's menu: {kind}")

    async def sending(message: MutableMapping[str, Any]) -> None:
        if not socket["session"] and message.get("type") == "websocket.send" and message.get("bytes"):
            socket["session"] = new_session_id(message["bytes"])
        await send(message)

    return receiving, sending
