"""The server ``./run.sh`` starts: ``streamlit run web/asgi.py`` serves ``app.py`` as Streamlit's ASGI app
(``st.App``) with :class:`web.guard.Guard` in front of every route (origins, uploads, reconnects, media).
Streamlit finds ``app`` here by reading this file; every ``streamlit run`` option (``--server.port``,
``--server.address``, …) still applies."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # (Streamlit puts this file's folder on the path, not the project's)
    sys.path.insert(0, str(ROOT))

from starlette.middleware import Middleware  # noqa: E402
from streamlit.starlette import App  # noqa: E402

from web.guard import Guard  # noqa: E402

app = App(ROOT / "app.py", middleware=[Middleware(Guard)])
