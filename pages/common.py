"""What every page shares: the service (opened once per server process), the user's name, the selected
dataset, the guard against Streamlit's folder mode, and a few renderers. Widgets' own keys vanish from
``st.session_state`` on pages that do not show them, so what must survive a change of page is kept under
plain keys, and what must survive a reload is kept in the URL (the dataset) or a cookie (the name)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import unquote

import numpy as np
import streamlit as st

from storage.service import Neuroseg, UserError, settings_from_env


@st.cache_resource(show_spinner="Opening the store …")
def _service(data_dir: str, database_url: str) -> Neuroseg:
    # once per server process and store: migrates, and starts the supervisor (orphaned and queued runs)
    return Neuroseg(settings_from_env(data_dir, database_url))


def service() -> Neuroseg:
    settings = settings_from_env()
    return _service(str(settings.data_dir), settings.database_url)


def start_page(title: str) -> Neuroseg:
    """What every page does first: leave Streamlit's folder mode, show the title and the messages left by
    the last run's callbacks; returns the service."""
    frame_guard()
    st.title(title)
    show_flashes()
    return service()


def attempt(action: Callable[[], T], done: Callable[[T], str]) -> None:
    """Carry out a service call from a button: its refusal is shown here, what it did is flashed on the
    page's next run."""
    try:
        result = action()
    except UserError as exc:
        st.error(str(exc))
    else:
        flash(done(result))
        st.rerun()


def flash(message: str, kind: str = "success") -> None:
    """A message shown once, on the next run of the page (for callbacks)."""
    st.session_state.setdefault("_flash", []).append((kind, message))


def show_flashes() -> None:
    for kind, message in st.session_state.pop("_flash", []):
        getattr(st, kind)(message)


def frame_guard() -> None:
    """Every page script calls this first. With a ``pages/`` folder beside ``app.py``, Streamlit starts in
    its old folder mode (every file in ``pages/`` a page, ``app.py``'s frame skipped) until some session
    runs ``app.py``; a deep link opened right after a restart would stay there. Here the folder mode is
    switched off and the same URL runs again through ``app.py``'s ``st.navigation`` (a page's hash is the
    hash of its URL path in both modes, so the user lands on the page asked for)."""
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    # AppTest resets the flag before each of its runs and emulates the folder mode itself (its runner's
    # session is "test session id"): there a rerun would only drop the click being tested.
    ctx = get_script_run_ctx()
    under_apptest = ctx is not None and ctx.session_id == "test session id"
    if PagesManager.uses_pages_directory and not under_apptest:
        PagesManager.uses_pages_directory = False
        st.rerun()


T = TypeVar("T")
USER_COOKIE, BROWSER_COOKIE = "neuroseg_user", "neuroseg_browser"
_COOKIES_JS = """
export default function ({ data }) {
  const year = 365 * 24 * 3600;
  for (const [name, value] of Object.entries(data || {})) {
    const current = document.cookie.split("; ").find((c) => c.startsWith(name + "="));
    const wanted = name + "=" + encodeURIComponent(value);
    if (current !== wanted) document.cookie = wanted + "; path=/; max-age=" + year + "; SameSite=Strict";
  }
}
"""
_LEAVE_GUARD_JS = """
// A stroke on the canvas exists only in this browser until the canvas has sent it (about 200 ms after
// mouse-up, over Streamlit's websocket); the script run this starts keeps it in the store. So a stroke
// arms the guard, and the guard is disarmed when a render newer than the send arrives, or when the
// message sent after the stroke has wholly left the browser (the socket open, nothing buffered).
// Closing or reloading the tab while armed asks first.
const guard = window.__neurosegLeaveGuard || (window.__neurosegLeaveGuard = { pending: false, run: 0 });
if (!guard.installed) {
  guard.installed = true;
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (...args) {
    if (guard.pending && !guard.stroking && guard.sentAtRun === undefined) {
      guard.sentAtRun = guard.run;
      const socket = this, sentAt = performance.now();
      const check = setInterval(() => {
        if (!guard.pending || guard.sentAtRun === undefined) { clearInterval(check); return; }
        if (socket.readyState === WebSocket.OPEN && socket.bufferedAmount === 0
            && performance.now() - sentAt > 300) { guard.pending = false; clearInterval(check); }
      }, 100);
    }
    return send.apply(this, args);
  };
  const onCanvas = (e) => e.composedPath().some((el) => el.classList && el.classList.contains("upper-canvas"));
  document.addEventListener("pointerdown", (e) => {
    if (onCanvas(e)) { guard.pending = true; guard.stroking = true; guard.sentAtRun = undefined; }
  }, true);
  document.addEventListener("pointerup", () => { guard.stroking = false; }, true);
  window.addEventListener("beforeunload", (e) => {
    if (guard.pending && guard.armed) { e.preventDefault(); e.returnValue = ""; }
  });
}
export default function ({ data }) {
  guard.armed = !!(data && data.armed);
  guard.run = (data && data.run) || 0;
  if (guard.pending && guard.sentAtRun !== undefined && guard.run > guard.sentAtRun) guard.pending = false;
}
"""


@st.cache_resource
def _components():
    return (st.components.v2.component("neuroseg_cookies", js=_COOKIES_JS),
            st.components.v2.component("neuroseg_leave_guard", js=_LEAVE_GUARD_JS))


def _cookie(name: str) -> str:
    try:
        value = st.context.cookies.get(name)
    except Exception:  # no browser: no cookies
        return ""
    return unquote(value) if isinstance(value, str) else ""  # (AppTest hands out a mock)


def browser_id() -> str:
    """This browser's own id (a cookie), for the drafts of a user who has not given a name."""
    if "browser_id" not in st.session_state:
        st.session_state["browser_id"] = _cookie(BROWSER_COOKIE) or uuid.uuid4().hex
    return st.session_state["browser_id"]


def owner() -> str:
    """Whose drafts these are: the user's name, else this browser."""
    name = st.session_state.get("author", "")
    return f"name:{name}" if name else f"browser:{browser_id()}"


def remember_in_browser() -> None:
    """Keep the name and this browser's id in cookies, so a reload or a new tab finds them (the frame
    calls this on every run; the component writes only what changed)."""
    _components()[0](data={USER_COOKIE: st.session_state.get("author", ""), BROWSER_COOKIE: browser_id()},
                     key="neuroseg_cookies", height=0)


def leave_guard(armed: bool) -> None:
    """Ask before the tab is closed or reloaded while strokes have not reached the server (Annotate
    renders this after it has kept the strokes in the store)."""
    # "run": when this render was made (server clock): later than any render the browser saw before it
    # sent the strokes, also when the page has reconnected to a new session meanwhile
    _components()[1](data={"armed": armed, "run": time.time() * 1000}, key="neuroseg_leave_guard", height=0)


def author_input() -> str:
    """'Your name', remembered for the browser (a cookie) and so for reloads; saved versions carry it."""
    if "author" not in st.session_state:
        st.session_state["author"] = _cookie(USER_COOKIE).strip()[:100]
    if "author_widget" not in st.session_state:
        st.session_state["author_widget"] = st.session_state.get("author", "")

    def remember() -> None:
        st.session_state["author"] = st.session_state["author_widget"].strip()

    st.text_input("Your name", key="author_widget", on_change=remember, max_chars=100,
                  help="Saved with every mask version you make.")
    st.session_state["author"] = st.session_state["author_widget"].strip()
    return st.session_state["author"]


def select_dataset(dataset_id: int) -> None:
    """Make ``dataset_id`` the selected dataset of every page (and of the URL, so a reload keeps it)."""
    st.session_state["dataset_id"] = int(dataset_id)
    st.query_params["dataset"] = str(int(dataset_id))


def selected_dataset(datasets) -> int | None:
    """The one dataset selection every page shares: this session's choice, else the URL's, else the
    newest dataset. It is written back to the URL on every page, so a reload opens the same stack."""
    ids = [d.id for d in datasets]
    if not ids:
        return None
    current = st.session_state.get("dataset_id")
    if current not in ids:
        try:
            current = int(st.query_params.get("dataset", ""))
        except ValueError:
            current = None
    if current not in ids:
        current = ids[-1]
    if st.session_state.get("dataset_id") != current or st.query_params.get("dataset") != str(current):
        select_dataset(current)
    return current


def dataset_picker(datasets, label: str = "Dataset", key: str | None = None) -> int:
    """Select a dataset; the choice is the one shared by every page. Each page has its own widget (its
    key vanishes on other pages), whose value is set from the shared selection before it is drawn."""
    key = key or f"dataset_pick_{label}"
    current = selected_dataset(datasets)
    if st.session_state.get(key) != current:  # only then: a forced value closes a menu the user has open
        st.session_state[key] = current

    def chosen() -> None:
        select_dataset(st.session_state[key])

    names = {d.id: f"{d.name}  ·  #{d.id}  ·  {d.shape[0]}×{d.shape[1]}×{d.shape[2]}" for d in datasets}
    st.selectbox(label, [d.id for d in datasets], format_func=names.get, key=key, on_change=chosen)
    return current


def volume_or_stop(svc: Neuroseg, dataset_id: int) -> np.ndarray:
    """The dataset's stack, or an error that says why it cannot be read (and the page stops there)."""
    try:
        return svc.volume(dataset_id)
    except UserError as exc:
        st.error(f"This dataset's stored stack cannot be read: {exc}.")
        st.stop()


if __name__ == "__main__":  # run as a page of its own: only by Streamlit's folder mode, which this ends
    frame_guard()
