"""What every page shares: the service (opened once per server process, bound to the signed-in user), the
sign-in gate, the selected dataset, the guard against Streamlit's folder mode, and a few renderers.
Widgets' own keys vanish from ``st.session_state`` on pages that do not show them, so what must survive a
change of page is kept under plain keys, and what must survive a reload is kept in the URL (the dataset)
or a cookie (the sign-in)."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import unquote

import numpy as np
import streamlit as st

import web.sessions as sessions
from storage.service import SESSION_HOURS, Actor, Neuroseg, UserError, settings_from_env
from ui.text import plain


@st.cache_resource(show_spinner="Opening the store …")
def _service(data_dir: str, database_url: str) -> Neuroseg:
    # once per server process and store: migrates, and starts the supervisor (orphaned and queued runs)
    return Neuroseg(settings_from_env(data_dir, database_url))


def base_service() -> Neuroseg:
    """The process's service, acting as nobody in particular (sign-in only)."""
    settings = settings_from_env()
    return _service(str(settings.data_dir), settings.database_url)


NOBODY = Actor(None, "anonymous", "none")  # no right at all: every guarded call is refused


def service() -> Neuroseg:
    """The service acting as the signed-in user: every call is checked against their role and recorded
    under their name (:func:`sign_in_gate` has made sure there is one before a page runs)."""
    return base_service().acting_as(st.session_state.get("actor") or NOBODY)


def actor() -> Actor:
    return st.session_state.get("actor") or NOBODY


def can(right: str) -> bool:
    """Whether the signed-in user's role has ``right`` (pages use it to show what they may do; the
    service checks again on every call)."""
    from storage.service import RIGHTS

    return right in RIGHTS.get(actor().role, set())


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
SESSION_COOKIE = sessions.COOKIE
_COOKIES_JS = """
// The sign-in lives in two halves: an HttpOnly cookie the server sets (POST /_neuroseg/cookie, web/guard.py),
// which no script reads but every port of this host receives, and a key in this origin's own storage
// (scheme, host and port), which no other port can read. A new session that has only the cookie asks for
// the key ("ask") and signs in when it matches (storage.auth.accounts.browser_key).
export default function ({ data, setStateValue }) {
  const d = data || {};
  const kept = window.__neurosegSignIn || (window.__neurosegSignIn = { token: undefined, ask: "", sent: 0 });
  if (typeof d.token === "string" && kept.token !== d.token) {  // null: leave the cookie as it is
    kept.token = d.token;
    if (d.token && d.key) localStorage.setItem("neuroseg_key", d.key);
    if (!d.token) localStorage.removeItem("neuroseg_key");
    const keep = (token, tries) => fetch(new URL("_neuroseg/cookie", window.location.origin + "/"), {
      method: "POST", credentials: "same-origin", headers: { "X-Neuroseg-Token": token },
    }).then((r) => { if (!r.ok) throw new Error(String(r.status)); }).catch(() => {
      // (a refused token is not tried again; a busy or restarting server is, a few times)
      if (kept.token === token && tries < 5) setTimeout(() => keep(token, tries + 1), 500 * 2 ** tries);
    });
    keep(d.token, 0);
  }
  // Answer the question until the server stops asking: an answer sent while a session's first run is
  // drawn again (once its page is known) can be dropped with the element it went to, and the element that
  // replaces it may not be drawn again, so the answer is repeated (each one new: "<key> <ask> <n>") every
  // 1.5 s while the latest render still asks.
  kept.setStateValue = setStateValue;
  kept.ask = d.ask || "";
  const answer = () => {
    if (!kept.ask) return;
    kept.sent += 1;
    kept.setStateValue("proof", (localStorage.getItem("neuroseg_key") || "-") + " " + kept.ask + " " + kept.sent);
  };
  if (kept.ask && kept.answering !== kept.ask) {
    kept.answering = kept.ask;
    answer();
    clearInterval(kept.timer);
    kept.timer = setInterval(() => {
      if (kept.ask) answer(); else { clearInterval(kept.timer); kept.answering = ""; }
    }, 1500);
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


def owner() -> str:
    """Whose drafts and live views these are: the signed-in user's."""
    return f"user:{actor().user_id}"


def remember_in_browser(need_proof: bool) -> str | None:
    """Keep the sign-in in the browser (an HttpOnly cookie and this origin's key, so a reload or a new tab
    finds it), or forget it after a sign-out; with ``need_proof`` ask the page for its key. Called once at
    the start of every run; returns the key the page sent in this run (None: none sent)."""
    token = st.session_state.get("auth_token")  # None: nothing to change; "": signed out
    ask = st.session_state.setdefault("_sign_in_ask", secrets.token_hex(8)) if need_proof else ""
    data = {"token": token, "key": base_service().browser_key(token) if token else "", "ask": ask,
            "hours": SESSION_HOURS}
    with st.sidebar:  # (out of the page's own elements, as a widget of the frame)
        result = _components()[0](data=data, key="neuroseg_cookies", height=0, on_proof_change=lambda: None)
    answer = getattr(result, "proof", None)  # "<key> <ask> <n>": the answer to this session's question only
    parts = answer.split(" ") if isinstance(answer, str) else []
    return parts[0] if ask and len(parts) == 3 and parts[1] == ask else None


def leave_guard(armed: bool) -> None:
    """Ask before the tab is closed or reloaded while strokes have not reached the server (Annotate
    renders this after it has kept the strokes in the store)."""
    # "run": when this render was made (server clock): later than any render the browser saw before it
    # sent the strokes, also when the page has reconnected to a new session meanwhile
    _components()[1](data={"armed": armed, "run": time.time() * 1000}, key="neuroseg_leave_guard", height=0)


def client_address() -> str:
    """The browser's address: the one the server sees, or behind a reverse proxy that says so
    (``NEUROSEG_BEHIND_PROXY=1``) the one the proxy puts in ``X-Forwarded-For``."""
    address = ""
    try:
        address = st.context.ip_address or "localhost"  # (Streamlit gives None for a loopback connection)
        if os.environ.get("NEUROSEG_BEHIND_PROXY") == "1":
            forwarded = st.context.headers.get("X-Forwarded-For", "") or st.context.headers.get("X-Real-Ip", "")
            address = forwarded.split(",")[0].strip() or address
    except Exception:  # no browser (AppTest)
        pass
    return str(address)[:64]


def _sso_configured() -> bool:
    try:
        return "auth" in st.secrets
    except Exception:  # no secrets file
        return False


WAITING = Actor(None, "waiting", "none")  # a cookie, and the page's key is on its way


def _signed_in() -> Actor | None:
    """The user of this browser: the session token this Streamlit session holds, or the browser's cookie
    with this origin's key (sent by the page: :func:`keep_sign_in`), else a single sign-on that has just come back
    (``st.user``). None: nobody (the reason is left in ``auth_message``); :data:`WAITING`: the page has not
    sent its key yet."""
    svc = base_service()
    address = client_address()
    token = st.session_state.get("auth_token") or ""
    cookie = "" if token else _cookie(SESSION_COOKIE)
    answered = st.session_state.get("_sign_in_answered", False)
    proof = st.session_state.pop("_sign_in_proof", None)  # the page's key (:func:`keep_sign_in`)
    if cookie:
        if proof is None and not answered:
            return WAITING
        st.session_state["_sign_in_answered"] = True
    if token or cookie:
        try:
            who = svc.signed_in(token, address) if token else svc.signed_in(cookie, address, proof=proof or "-")
        except UserError as exc:
            if token:
                st.session_state["auth_token"] = ""  # (the page deletes the cookie at the next run)
            if "expired" in str(exc):
                st.session_state["auth_message"] = str(exc)
        else:
            st.session_state["auth_token"] = token or cookie
            return who
    if _sso_configured() and getattr(st.user, "is_logged_in", False):
        claims = st.user.to_dict()
        try:
            who, token = svc.sign_in_oidc(str(claims.get("iss", "")), str(claims.get("sub", "")),
                                          email=str(claims.get("email", "") or ""),
                                          name=str(claims.get("name", "") or ""),
                                          preferred=str(claims.get("preferred_username", "") or ""), address=address)
        except UserError as exc:
            st.session_state["auth_message"] = str(exc)
            return None
        st.session_state["auth_token"] = token
        return who
    return None


def keep_sign_in(who: Actor | None) -> None:
    """What the frame does right after ``st.navigation``: keep the sign-in in the browser
    (:func:`remember_in_browser`) and, while a cookie waits for this origin's key (:data:`WAITING`), ask
    the page for it; when the key has come, run again to sign in with it. Why after the navigation: the
    page answers at once, and an answer sent before the browser knows which page it is on reruns the
    default page (a reload of /train would land on Home)."""
    proof = remember_in_browser(who is WAITING)
    if who is WAITING and proof is not None:
        st.session_state["_sign_in_proof"] = proof
        st.rerun()


def signed_in_user() -> Actor | None:
    """Who this browser is signed in as (None: nobody; :data:`WAITING`: its key is on the way, see
    :func:`keep_sign_in`); what the frame asks first, on every run. The Streamlit session is bound to the
    sign-in for the checks in front of the server (:mod:`web.guard`: uploads, reconnects, media), and
    unbound when nobody is signed in."""
    who = _signed_in()
    signed = who is not None and who is not WAITING
    st.session_state["actor"] = who if signed else None
    _bind_session(st.session_state.get("auth_token", "") if signed else "")
    return who


def _bind_session(token: str) -> None:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    if ctx is None:
        return
    sessions.install_verifier(base_service().signed_in)
    if token:
        sessions.bind(ctx.session_id, token)
    else:
        sessions.unbind(ctx.session_id)


def sign_in_gate(who: Actor | None) -> Actor:
    """Before any page runs (``app.py``): the signed-in user, or the sign-in form and nothing else (then
    the script stops); a user with a one-time password sees only the form that changes it."""
    if who is WAITING:  # the page sends its key in a moment, and this runs again
        st.caption("Signing in …")
        st.stop()
        return NOBODY
    if who is None:
        _sign_in_form()
        st.stop()
        return NOBODY  # (st.stop does not stop a script run without Streamlit)
    st.session_state["author"] = who.username
    if who.must_change_password:
        _change_password_form(first=True)
        st.stop()
    return who


def _sign_in_form() -> None:
    st.title("Neuroseg")
    st.subheader("Sign in")
    message = st.session_state.pop("auth_message", "")
    if message:
        st.warning(message, icon=":material/lock_clock:")
    if base_service().awaiting_first_admin():
        st.info("**First start.** Sign in as **admin** with the one-time password printed in the terminal that "
                "started the server (`./run.sh`), beside its URL. Lost it? In the Neuroseg folder on the server, "
                "`.venv/bin/python -m storage reset-password admin` prints a new one.", icon=":material/key:")
    with st.form("sign_in", enter_to_submit=True):
        username = st.text_input("User name", max_chars=64, autocomplete="username")
        password = st.text_input("Password", type="password", autocomplete="current-password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if submitted:
        try:
            who, token = base_service().sign_in(username, password, client_address())
        except UserError as exc:
            st.error(str(exc))
        else:
            st.session_state["auth_token"], st.session_state["actor"] = token, who
            st.rerun()
    if _sso_configured():
        st.divider()
        label = os.environ.get("NEUROSEG_SSO_LABEL", "your institution")
        if st.button(f"Sign in with {label}", icon=":material/badge:"):
            st.login()


def _change_password_form(first: bool = False) -> None:
    who = actor()
    if first:
        st.title("Neuroseg")
        st.subheader("Choose your password")
        st.info(f"Signed in as **{plain(who.username)}** with a one-time password: choose your own to go on.")
    with st.form("change_password", clear_on_submit=True):
        old = st.text_input("Current password", type="password", autocomplete="current-password")
        new = st.text_input("New password", type="password", autocomplete="new-password",
                            help="At least 8 characters.")
        again = st.text_input("New password again", type="password", autocomplete="new-password")
        done = st.form_submit_button("Change password", type="primary")
    if done:
        if new != again:
            st.error("The two new passwords differ.")
            return
        try:
            now = service().change_password(old, new, st.session_state.get("auth_token", ""))
        except UserError as exc:
            st.error(str(exc))
            return
        st.session_state["actor"] = now
        flash("Your password is changed; other browsers signed in as you are signed out.")
        st.rerun()


def account_menu() -> None:
    """The sidebar's account box: who is signed in, their role, change password, sign out."""
    who = actor()
    st.caption(f"Signed in as **{plain(who.display_name or who.username)}** · {who.role}")
    with st.popover("Account", icon=":material/person:"):
        st.write(f"User **{plain(who.username)}**, role **{who.role}**.")
        _change_password_form()
        if st.button("Sign out", icon=":material/logout:"):
            sign_out()


def sign_out() -> None:
    token = st.session_state.get("auth_token", "")
    if token:
        service().sign_out(token)
    for key in ("auth_token", "actor", "author"):
        st.session_state.pop(key, None)
    st.session_state["auth_token"] = ""
    if _sso_configured() and getattr(st.user, "is_logged_in", False):
        st.logout()  # the browser goes through the provider's sign-out and comes back as a new session
        return
    st.rerun()


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
