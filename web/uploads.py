"""What uploads may hold of the server's memory (:func:`upload_room`, asked by :class:`web.guard.Guard` before a
byte of an upload is read). Streamlit keeps every upload whole in memory until its page lets it go (the pages
let a stored one go: :func:`pages.common.release_uploads`): a signed-in annotator PUTting 200 MiB files under
new ids filled the server's memory. An upload passes only while the page's uploads, held and being received,
stay within ``$NEUROSEG_UPLOAD_MEMORY_MB`` (default: two of the largest uploads, ``server.maxUploadSize``, a
stack and its labels), and the machine keeps 1 GiB free after every upload being received."""

from __future__ import annotations

import logging
import os

from starlette.datastructures import Headers
from streamlit import config
from streamlit.runtime import Runtime

from storage.service import available_memory

log = logging.getLogger(__name__)

RESERVE_BYTES = 1 << 30  # memory an upload must leave free on the machine


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


def declared_length(headers: Headers) -> int | None:
    value = headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def reserve(session_id: str, size: int) -> None:
    RECEIVING[session_id] = RECEIVING.get(session_id, 0) + size


def release(session_id: str, size: int) -> None:
    left = RECEIVING.get(session_id, 0) - size
    if left > 0:
        RECEIVING[session_id] = left
    else:
        RECEIVING.pop(session_id, None)
