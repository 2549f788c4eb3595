"""What uploads may hold of the server's memory (:func:`upload_room`, asked by :class:`web.guard.Guard` before a
byte of an upload is read). Streamlit keeps every upload whole in memory until its page lets it go (the pages
let a stored one go: :func:`pages.common.release_uploads`): a signed-in annotator PUTting 200 MiB files under
new ids filled the server's memory. An upload passes only while the page's uploads, held and being received,
stay within ``$NEUROSEG_UPLOAD_MEMORY_MB`` (default: two of the largest uploads, ``server.maxUploadSize``, a
stack and its labels), and the machine keeps 1 GiB free after every upload being received.

An upload being received holds the room its ``Content-Length`` declares until it ends, so an annotator who
declared 4 GB uploads from a few tabs and then sent nothing kept everyone else's uploads refused for as long
as they liked. One account has at most :data:`USER_UPLOADS` uploads in flight (all its tabs together), and an
upload whose body stops for :data:`IDLE_S` or trickles slower than :data:`MIN_RATE` (after
:data:`GRACE_S`) is cut off (:func:`watched`), its room given back."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
from starlette.datastructures import Headers
from streamlit import config
from streamlit.runtime import Runtime

from storage.service import available_memory

log = logging.getLogger(__name__)
_now = time.monotonic  # (the clock: a test sets its own)

RESERVE_BYTES = 1 << 30  # memory an upload must leave free on the machine
USER_UPLOADS = 2  # uploads one account may have in flight at once (a stack and its labels)
IDLE_S = 60.0  # an upload's body that stops this long is cut off
GRACE_S = 60.0  # … and after this long, one that has come slower than
MIN_RATE = 64 << 10  # bytes a second
BY_USER: dict[str, int] = {}  # uploads in flight, by account


# bytes of the uploads being received now, by session: a check and its reservation run on the server's event
# loop with no await between them, so uploads sent at once are counted against each other
RECEIVING: dict[str, int] = {}


def _page_limit() -> int:
    try:
        largest = int(config.get_option("server.maxUploadSize")) << 20
    except Exception:
        largest = 4096 << 20
    given = os.environ.get("NEUROSEG_UPLOAD_MEMORY_MB", "").strip()
    if given and not given.isdigit():
        log.warning("$NEUROSEG_UPLOAD_MEMORY_MB is %r, not a number of MB: the default is used", given)
    return (int(given) << 20 if given.isdigit() else 0) or 2 * largest


def upload_room(session_id: str, incoming: int | None) -> str | None:
    """Why the server cannot take an upload of ``incoming`` bytes into the session now (None: it can): see
    the module's text (upload memory)."""
    if incoming is None:
        return "an upload must say its size (Content-Length)"
    limit = _page_limit()
    try:
        manager = Runtime.instance().uploaded_file_mgr
        with manager._lock:  # (Streamlit 1.67's MemoryUploadedFileManager: the files each session holds)
            held = sum(len(f.data) for f in manager.file_storage.get(session_id, {}).values())
    except Exception:  # no runtime, or another Streamlit: the machine's memory still counts
        held = 0
    held += RECEIVING.get(session_id, 0)
    if held + incoming > limit:
        return (f"this page holds {held / 2**20:,.0f} MB of uploads already; with this one it would hold more "
                f"than the {limit / 2**20:,.0f} MB a page may ($NEUROSEG_UPLOAD_MEMORY_MB): reload the page")
    free = available_memory()  # (0: not known, and then not counted)
    available = free - sum(RECEIVING.values())
    if free and incoming > available - RESERVE_BYTES:
        return (f"the server has {max(available - RESERVE_BYTES, 0) / 2**20:,.0f} MB of memory to spare now, "
                "less than this upload: try again later, or import the stack from a folder on the server")
    return None


def user_room(user: str) -> str | None:
    """Why ``user`` may not start another upload now (None: it may)."""
    if BY_USER.get(user, 0) >= USER_UPLOADS:
        return (f"you are sending {USER_UPLOADS} uploads already (from this or another tab): wait until they have "
                "arrived")
    return None


def watched(receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> Callable[[], Awaitable[Any]]:
    """``receive`` of an upload's body, cut off (the app is told the browser left) when the body stops for
    :data:`IDLE_S` or comes slower than :data:`MIN_RATE` after :data:`GRACE_S`."""
    start, got = _now(), 0

    async def receiving() -> MutableMapping[str, Any]:
        nonlocal got
        try:
            with anyio.fail_after(IDLE_S):
                message = await receive()
        except TimeoutError:
            log.warning("cut off an upload whose body stopped for %.0f s", IDLE_S)
            receiving.cut = True
            return {"type": "http.disconnect"}
        if message.get("type") == "http.request" and message.get("more_body"):
            got += len(message.get("body", b""))
            elapsed = _now() - start
            if elapsed > GRACE_S and got < MIN_RATE * elapsed:
                log.warning("cut off an upload arriving at %.0f bytes/s", got / elapsed)
                receiving.cut = True
                return {"type": "http.disconnect"}
        return message

    receiving.cut = False  # (set once it is cut off: the guard answers 408 for the app, which saw the browser leave)
    return receiving


CUT_OFF = (b"the upload stopped or came too slowly (less than 64 kB/s): it was cut off; send it again\n")


def answered_as_cut(send: Callable[[MutableMapping[str, Any]], Awaitable[None]], receiving) -> Callable:
    """``send`` of an upload's answer, which says 408 and why once ``receiving`` (:func:`watched`) cut the upload
    off (the app, told the browser left, answers 500)."""

    async def sending(message: MutableMapping[str, Any]) -> None:
        if message.get("type") == "http.response.start":
            sending.started = True
        if getattr(receiving, "cut", False):
            if message.get("type") == "http.response.start":
                message = {"type": "http.response.start", "status": 408,
                           "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                       (b"content-length", str(len(CUT_OFF)).encode()), (b"connection", b"close")]}
            elif message.get("type") == "http.response.body":
                message = {"type": "http.response.body", "body": CUT_OFF}
        await send(message)

    sending.started = False
    return sending


def declared_length(headers: Headers) -> int | None:
    value = headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def reserve(session_id: str, size: int, user: str = "") -> None:
    RECEIVING[session_id] = RECEIVING.get(session_id, 0) + size
    if user:
        BY_USER[user] = BY_USER.get(user, 0) + 1


def release(session_id: str, size: int, user: str = "") -> None:
    left = RECEIVING.get(session_id, 0) - size
    if left > 0:
        RECEIVING[session_id] = left
    else:
        RECEIVING.pop(session_id, None)
    if user and BY_USER.get(user, 0) > 1:
        BY_USER[user] -= 1
    elif user:
        BY_USER.pop(user, None)
