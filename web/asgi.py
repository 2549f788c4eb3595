"""The server ``./run.sh`` starts: ``streamlit run web/asgi.py`` serves ``app.py`` as Streamlit's ASGI app
(``st.App``) with :class:`web.guard.Guard` in front of every route (origins, uploads, reconnects, media).
Streamlit finds ``app`` here by reading this file; every ``streamlit run`` option (``--server.port``,
``--server.address``, …) still applies."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # (Streamlit puts this file's folder on the path, not the project's)
    sys.path.insert(0, str(ROOT))

from starlette.middleware import Middleware  # noqa: E402
from streamlit import config  # noqa: E402
from streamlit.runtime.pages_manager import PagesManager  # noqa: E402
from streamlit.starlette import App  # noqa: E402

from storage.service import first_start  # noqa: E402
from web.guard import Guard  # noqa: E402


def _announce() -> None:
    """The first start's sign-in, printed right under the URL Streamlit has just printed (a new user should
    not have to find it in a log after their first request)."""
    note = first_start()
    if not note:
        return
    try:
        address = config.get_option("server.address") or "localhost"
        address = "localhost" if address in ("127.0.0.1", "::1", "0.0.0.0", "::") else address
        port = config.get_option("server.port")
        where = f"http://{address}:{port}"
    except Exception:  # (no Streamlit configuration: the URL is Streamlit's to say)
        where = "the URL below"
    lines = [f"Neuroseg at {where}", *note.splitlines()]
    width = max(len(line) for line in lines)
    print("\n  " + "─" * width + "\n" + "\n".join(f"  {line}" for line in lines) + "\n  " + "─" * width + "\n",
          flush=True)


def _no_folder_pages() -> None:
    """Never Streamlit's old folder mode, in which every file of ``pages/`` is a page (app, admin, common,
    …): it is decided once per server, on the first session, and a tab that reconnects to a restarted
    server showed that list until the app's first run drew its own navigation. The app's pages are its
    ``st.navigation`` (``app.py``)."""
    PagesManager.uses_pages_directory = False


def _no_forwarded_client() -> None:
    """uvicorn takes a request's client address from ``X-Forwarded-For`` whenever the peer is loopback (its
    default ``forwarded_allow_ips``), so any program on the server could sign in "from" any address: the
    audit trail would record it, and 20 failures "from" a colleague's address would lock them out. Unless the
    server is behind the reverse proxy (``NEUROSEG_BEHIND_PROXY=1``, where nginx sets the header), the
    middleware uvicorn wraps this app in once it has imported it passes requests on untouched. (Its setting,
    ``$FORWARDED_ALLOW_IPS``, is read before this file is imported: ``./run.sh`` sets it too.)"""
    if os.environ.get("NEUROSEG_BEHIND_PROXY") == "1":
        return
    try:
        import uvicorn.config  # (imported by Streamlit's server already; only its middleware is replaced)
    except ImportError:
        return
    uvicorn.config.ProxyHeadersMiddleware = lambda app, trusted_hosts=None: app


GC_EVERY_S = 60.0  # a full garbage collection this often, off the pages' runs


def _collect_now_and_then() -> None:
    """Streamlit's full garbage collection after every script run is off (``runner.postScriptGC``: 0.12 s of
    the interpreter's lock per rerun with PyTorch loaded, 80% of the server's CPU under a storm of reruns).
    Python's own collector runs by objects made, not bytes held: a page's large arrays in a reference cycle
    (each run's functions refer to its globals) could wait long for it. A daemon thread collects once a
    minute."""
    def collect() -> None:
        while True:
            time.sleep(GC_EVERY_S)
            gc.collect()

    threading.Thread(target=collect, name="neuroseg-gc", daemon=True).start()


_no_forwarded_client()
_no_folder_pages()
_collect_now_and_then()
_announce()
app = App(ROOT / "app.py", middleware=[Middleware(Guard)])
