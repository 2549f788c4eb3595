"""What every page shares: the service (opened once per server process, bound to the signed-in user), the
rights of the signed-in user, the page's start (the guard against Streamlit's folder mode, the title, the
flashed messages), service calls whose refusal becomes a message (:func:`attempt`), the leave guard of
Annotate's strokes, and the selected dataset. What must survive a change of page is kept under the keys of
:mod:`pages.state`, and what must survive a reload in the URL (the dataset). The sign-in lives in
:mod:`pages.signin`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Literal, TypeVar

import numpy as np
import streamlit as st
from streamlit.runtime.pages_manager import PagesManager
from streamlit.runtime.scriptrunner import get_script_run_ctx

import pages.state as state
from storage.service import RIGHTS, Actor, Neuroseg, UserError, settings_from_env, shared_service
from ui.text import cells, plain

T = TypeVar("T")


@st.cache_resource(show_spinner="Opening the store …")
def _service(data_dir: str, database_url: str) -> Neuroseg:
    # once per server process and store: migrates, and starts the supervisor (orphaned and queued runs); the
    # same one again when Streamlit's cache is cleared (storage.service.shared_service)
    return shared_service(data_dir, database_url)


def base_service() -> Neuroseg:
    """The process's service, acting as nobody in particular (sign-in only)."""
    settings = settings_from_env()
    return _service(str(settings.data_dir), settings.database_url)


NOBODY = Actor(None, "anonymous", "none")  # no right at all: every guarded call is refused


def service() -> Neuroseg:
    """The service acting as the signed-in user: every call is checked against their role and recorded
    under their name (:func:`pages.signin.sign_in_gate` has made sure there is one before a page runs)."""
    return base_service().acting_as(state.signed_actor() or NOBODY)


def actor() -> Actor:
    return state.signed_actor() or NOBODY


def can(right: str) -> bool:
    """Whether the signed-in user's role has ``right`` (pages use it to show what they may do; the
    service checks again on every call)."""
    return right in RIGHTS.get(actor().role, set())


def release_uploads(*files) -> None:
    """Let Streamlit forget uploaded files once they are stored. It keeps each upload whole in memory until the
    page is closed (nothing frees it when its uploader leaves the page), and the guard bounds what a page may
    hold (:func:`web.uploads.upload_room`): a second stack in the same tab would be refused."""
    ctx = get_script_run_ctx()
    if ctx is None:
        return
    for file in files:
        if file is not None and getattr(file, "file_id", None):
            with contextlib.suppress(Exception):  # (another Streamlit, or gone already: the page's end frees it)
                ctx.uploaded_file_mgr.remove_file(ctx.session_id, file.file_id)


def still_signed_in(right: str = "look") -> bool:
    """For a fragment that reruns by itself (``run_every``): no page run checks the sign-in then, so an open tab
    would go on showing a run's or a prediction's progress after its user was disabled or signed out (the
    reads it makes check no account). Whether they may still use ``right``; if not, it says so."""
    refused = service().refusal(right)
    if refused:
        st.warning(f"{refused} Reload the page.", icon=":material/lock:")
    return not refused


def owner() -> str:
    """Whose drafts and live views these are: the signed-in user's."""
    return f"user:{actor().user_id}"


def start_page(title: str) -> Neuroseg:
    """What every page does first: leave Streamlit's folder mode, show the title and the messages left by
    the last run's callbacks; returns the service."""
    frame_guard()
    st.title(title)
    show_flashes()
    if not can("create"):
        st.info(f"You are signed in as a **{actor().role}**: you can look at everything and export it. An admin "
                "can give you the annotator role to upload, annotate, train and predict.",
                icon=":material/visibility:")
    return service()


def attempt(action: Callable[[], T], done: Callable[[T], str | None] | None = None, *,
            failed: Callable[[Exception], str] = plain, errors: tuple[type[Exception], ...] = (UserError,),
            in_callback: bool = False, rerun: Literal["app", "fragment"] | None = "app") -> bool:
    """Carry out a service call and show its refusal as a message; returns whether it was done.

    A refusal (one of ``errors``) is shown as ``failed(exc)``: drawn here, or from a callback
    (``in_callback``, which runs before the page) flashed on the page's next run. Once done, ``done(result)``
    does what follows and returns what to flash on the page's next run (None: nothing), and the page (or, with
    ``rerun="fragment"``, the fragment) runs again; None: it goes on (so does a callback, whose page runs
    next anyway)."""
    try:
        result = action()
    except errors as exc:
        if in_callback:
            flash(failed(exc), "error")
        else:
            st.error(failed(exc))
        return False
    message = done(result) if done is not None else None
    if message is not None:
        flash(message)
    if rerun is not None and not in_callback:
        st.rerun(scope=rerun)
    return True


_FLASH = "_flash"  # (this module's own key: the messages for the next run)


def data_table(rows, at=st, **options):
    """``st.dataframe`` (or ``at.dataframe``) of ``rows``, with user text that a spreadsheet would run as a
    formula neutralised (every table has a "Download as CSV" button, and names, notes and the audit trail's
    details are any user's text)."""
    return at.dataframe(cells(rows), **options)


def flash(message: str, kind: str = "success") -> None:
    """A message shown once, on the next run of the page (for callbacks)."""
    st.session_state.setdefault(_FLASH, []).append((kind, message))


def show_flashes() -> None:
    for kind, message in st.session_state.pop(_FLASH, []):
        getattr(st, kind)(message)


def frame_guard() -> None:
    """Every page script calls this first. With a ``pages/`` folder beside ``app.py``, Streamlit starts in
    its old folder mode (every file in ``pages/`` a page, ``app.py``'s frame skipped) until some session
    runs ``app.py``; a deep link opened right after a restart would stay there. Here the folder mode is
    switched off and the same URL runs again through ``app.py``'s ``st.navigation`` (a page's hash is the
    hash of its URL path in both modes, so the user lands on the page asked for)."""
    # AppTest resets the flag before each of its runs and emulates the folder mode itself (its runner's
    # session is "test session id"): there a rerun would only drop the click being tested.
    ctx = get_script_run_ctx()
    under_apptest = ctx is not None and ctx.session_id == "test session id"
    if PagesManager.uses_pages_directory and not under_apptest:
        PagesManager.uses_pages_directory = False
        st.rerun()


_LEAVE_GUARD_JS = """
// A stroke on the canvas exists only in this browser until the canvas has sent it (about 200 ms after
// mouse-up, over Streamlit's websocket); the script run this starts keeps it in the store. So a stroke
// arms the guard, and the guard is disarmed when a render newer than the send arrives, or when the
// message sent after the stroke has wholly left the browser (the socket open, nothing buffered).
// Closing or reloading the tab while armed asks first; a click on a link to another page waits for it.
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
  // A click on a link to another page while a stroke is on its way (the canvas sends it 200 ms after
  // mouse-up): the page it leaves would drop the stroke unsent, so the click waits until the stroke has
  // reached the server (at most 5 s), then goes on as clicked.
  document.addEventListener("click", (e) => {
    if (guard.replaying || !guard.pending || !guard.armed) return;
    const link = e.target && e.target.closest ? e.target.closest("a[href]") : null;
    if (!link || link.target === "_blank" || link.hasAttribute("download")) return;
    e.preventDefault();
    e.stopImmediatePropagation();
    const asked = performance.now();
    const wait = setInterval(() => {
      if (guard.pending && performance.now() - asked < 5000) return;
      clearInterval(wait);
      guard.replaying = true;
      try { link.click(); } finally { guard.replaying = false; }
    }, 50);
  }, true);
}
export default function ({ data }) {
  guard.armed = !!(data && data.armed);
  guard.run = (data && data.run) || 0;
  guard.settled = !!(data && data.settled);
  if (guard.pending && guard.sentAtRun !== undefined && guard.run > guard.sentAtRun) guard.pending = false;
  return () => { guard.settled = false; };  // (the page is left: its canvas is gone)
}
"""


@st.cache_resource
def _leave_guard_component():
    return st.components.v2.component("neuroseg_leave_guard", js=_LEAVE_GUARD_JS)


def leave_guard(armed: bool, settled: bool = True) -> None:
    """Ask before the tab is closed or reloaded while strokes have not reached the server, and hold a click
    on a link to another page until they have (Annotate renders this after it has kept the strokes in the
    store). ``settled``: the canvas has told the server
    its first state, which it does in a rerun of its own once its picture has loaded. Until then a click on
    another page can be undone by that rerun: Streamlit's browser side sends a component's value with the
    page it still shows, and of two waiting requests the newer one's page wins. The browser keeps the
    flag (``window.__neurosegLeaveGuard.settled``) for tests that leave the page."""
    # "run": when this render was made (server clock): later than any render the browser saw before it
    # sent the strokes, also when the page has reconnected to a new session meanwhile
    _leave_guard_component()(data={"armed": armed, "run": time.time() * 1000, "settled": settled},
                             key="neuroseg_leave_guard", height=0)


def select_dataset(dataset_id: int) -> None:
    """Make ``dataset_id`` the selected dataset of every page (and of the URL, so a reload keeps it)."""
    state.set_dataset_id(dataset_id)
    st.query_params["dataset"] = str(int(dataset_id))


def selected_dataset(datasets) -> int | None:
    """The one dataset selection every page shares: the URL's (a reload, a bookmark, the browser's Back and
    Forward: what the address says is what the page works on), else this session's choice, else the newest
    dataset. It is written back to the URL on every page, so a reload opens the same stack."""
    ids = [d.id for d in datasets]
    if not ids:
        return None
    try:
        current = int(st.query_params.get("dataset", ""))
    except ValueError:
        current = None
    if current not in ids:
        current = state.dataset_id()
    if current not in ids:
        current = ids[-1]
    if state.dataset_id() != current or st.query_params.get("dataset") != str(current):
        select_dataset(current)
    return current


def dataset_picker(datasets, label: str = "Dataset", key: str | None = None) -> int:
    """Select a dataset; the choice is the one shared by every page. Each page has its own widget (its
    key vanishes on other pages), whose value is set from the shared selection before it is drawn."""
    key = key or f"dataset_pick_{label}"
    current = selected_dataset(datasets)
    if key in st.session_state and st.session_state[key] is None:  # no choice of the user's (see below): a
        state.mark_late_run()  # late run, whose other widgets came without their values too
    if st.session_state.get(key) != current:  # only then: a forced value closes a menu the user has open
        st.session_state[key] = current

    def chosen() -> None:
        if st.session_state[key] is not None:  # (None: no choice of the user's, see below)
            select_dataset(st.session_state[key])

    names = {d.id: f"{d.name}  ·  #{d.id}  ·  {d.shape[0]}×{d.shape[1]}×{d.shape[2]}" for d in datasets}
    # No default option (index=None): a rerun of this page sent by the browser after the user has left it
    # (a component's value sent with the page it still showed) can bring this widget without its value,
    # and with a default it would be read as the user choosing the first dataset. (required: no clear button)
    st.selectbox(label, [d.id for d in datasets], format_func=names.get, key=key, on_change=chosen, index=None,
                 required=True)
    return current


def volume_or_stop(svc: Neuroseg, dataset_id: int) -> np.ndarray:
    """The dataset's stack, or an error that says why it cannot be read (and the page stops there)."""
    try:
        return svc.volume(dataset_id)
    except UserError as exc:
        st.error(f"This dataset's stored stack cannot be read: {plain(exc)}.")
        st.stop()


if __name__ == "__main__":  # run as a page of its own: only by Streamlit's folder mode, which this ends
    frame_guard()
