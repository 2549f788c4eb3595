"""The sign-in: who this browser is (a session token, the browser's cookie with this origin's key, or a
single sign-on that has just come back), the gate every page passes (the sign-in form, or the form that
changes a one-time password), the sidebar's account box and the sign-out. The sign-in is kept in the browser
(an HttpOnly cookie and this origin's key, :func:`remember_in_browser`), so a reload or a new tab finds it,
and the Streamlit session is bound to it for the checks in front of the server (:mod:`web.sessions`)."""

from __future__ import annotations

import os
import secrets
from urllib.parse import unquote

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

import pages.state as state
import web.sessions as sessions
from pages.common import NOBODY, actor, attempt, base_service, frame_guard, service
from storage.service import SESSION_HOURS, Actor, UserError, admin_password_from_env
from ui.text import plain

# this module's own keys
AUTH_TOKEN = "auth_token"  # the session token: None, nothing to change in the browser; "", signed out
AUTH_MESSAGE = "auth_message"  # why nobody is signed in (an expired session, a refused single sign-on)
_ASK, _PROOF, _ANSWERED = "_sign_in_ask", "_sign_in_proof", "_sign_in_answered"  # the page's key, asked for
_SSO_TRIED = "_sign_in_sso_tried"  # the single sign-on answer this session took or was refused

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


@st.cache_resource
def _cookies_component():
    return st.components.v2.component("neuroseg_cookies", js=_COOKIES_JS)


def _cookie(name: str) -> str:
    try:
        value = st.context.cookies.get(name)
    except Exception:  # no browser: no cookies
        return ""
    return unquote(value) if isinstance(value, str) else ""  # (AppTest hands out a mock)


def remember_in_browser(need_proof: bool) -> str | None:
    """Keep the sign-in in the browser (an HttpOnly cookie and this origin's key, so a reload or a new tab
    finds it), or forget it after a sign-out; with ``need_proof`` ask the page for its key. Called once at
    the start of every run; returns the key the page sent in this run (None: none sent)."""
    token = st.session_state.get(AUTH_TOKEN)  # None: nothing to change; "": signed out
    ask = st.session_state.setdefault(_ASK, secrets.token_hex(8)) if need_proof else ""
    data = {"token": token, "key": base_service().browser_key(token) if token else "", "ask": ask,
            "hours": SESSION_HOURS}
    with st.sidebar:  # (out of the page's own elements, as a widget of the frame)
        result = _cookies_component()(data=data, key="neuroseg_cookies", height=0, on_proof_change=lambda: None)
    answer = getattr(result, "proof", None)  # "<key> <ask> <n>": the answer to this session's question only
    parts = answer.split(" ") if isinstance(answer, str) else []
    return parts[0] if ask and len(parts) == 3 and parts[1] == ask else None


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
    token = st.session_state.get(AUTH_TOKEN) or ""
    cookie = "" if token else _cookie(SESSION_COOKIE)
    answered = st.session_state.get(_ANSWERED, False)
    proof = st.session_state.pop(_PROOF, None)  # the page's key (:func:`keep_sign_in`)
    if cookie:
        if proof is None and not answered:
            return WAITING
        st.session_state[_ANSWERED] = True
    if token or cookie:
        try:
            who = svc.signed_in(token, address) if token else svc.signed_in(cookie, address, proof=proof or "-")
        except UserError as exc:
            if token:
                st.session_state[AUTH_TOKEN] = ""  # (the page deletes the cookie at the next run)
            if "expired" in str(exc) or "disabled" in str(exc):  # (a sign-in that was this session's: why it
                st.session_state[AUTH_MESSAGE] = str(exc)  # ended; "Please sign in" needs no word)
        else:
            st.session_state[AUTH_TOKEN] = token or cookie
            return who
    if _sso_configured() and getattr(st.user, "is_logged_in", False):
        claims = st.user.to_dict()
        answer = tuple(str(claims.get(k, "")) for k in ("iss", "sub", "iat", "nonce"))
        if not svc.single_sign_on_fresh(claims.get("iat")) or st.session_state.get(_SSO_TRIED) == answer:
            # an old Streamlit sign-on cookie (a session that expired, or was never signed out), or one this
            # session was refused: the form, once told why, and no refusal written on every run
            if not st.session_state.get(_SSO_TRIED):
                st.session_state.setdefault(AUTH_MESSAGE, "Your single sign-on has ended: sign in again.")
            st.session_state[_SSO_TRIED] = answer
            return None
        st.session_state[_SSO_TRIED] = answer
        try:
            who, token = svc.sign_in_oidc(str(claims.get("iss", "")), str(claims.get("sub", "")),
                                          email=str(claims.get("email", "") or ""),
                                          name=str(claims.get("name", "") or ""),
                                          preferred=str(claims.get("preferred_username", "") or ""), address=address,
                                          issued_at=claims.get("iat"), nonce=str(claims.get("nonce", "") or ""))
        except UserError as exc:
            st.session_state[AUTH_MESSAGE] = str(exc)
            return None
        st.session_state[AUTH_TOKEN] = token
        st.session_state.pop(AUTH_MESSAGE, None)
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
        st.session_state[_PROOF] = proof
        st.rerun()


def signed_in_user() -> Actor | None:
    """Who this browser is signed in as (None: nobody; :data:`WAITING`: its key is on the way, see
    :func:`keep_sign_in`); what the frame asks first, on every run. The Streamlit session is bound to the
    sign-in for the checks in front of the server (:mod:`web.guard`: uploads, reconnects, media), and
    unbound when nobody is signed in."""
    who = _signed_in()
    signed = who is not None and who is not WAITING
    state.set_actor(who if signed else None)
    _bind_session(st.session_state.get(AUTH_TOKEN, "") if signed else "")
    return who


def _bind_session(token: str) -> None:
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
    state.set_author(who.username)
    if who.must_change_password:
        _change_password_form(first=True)
        st.stop()
    return who


def _sign_in_form() -> None:
    st.title("Neuroseg")
    st.subheader("Sign in")
    # (kept until the form is sent: a rerun the page's component asks for right after must not hide it)
    message = st.session_state.get(AUTH_MESSAGE, "")
    if message:
        st.warning(message, icon=":material/lock_clock:")
    if base_service().awaiting_first_admin():
        where = ("the password in `$NEUROSEG_ADMIN_PASSWORD` (the server was started with it set)"
                 if admin_password_from_env() else "the one-time password printed in the terminal that started "
                 "the server (`./run.sh`), beside its URL")
        st.info(f"**First start.** Sign in as **admin** with {where}. Lost it? In the Neuroseg folder on the "
                "server, `.venv/bin/python -m storage reset-password admin` prints a new one.", icon=":material/key:")
    with st.form("sign_in", enter_to_submit=True):
        username = st.text_input("User name", max_chars=64, autocomplete="username")
        password = st.text_input("Password", type="password", autocomplete="current-password")
        submitted = st.form_submit_button("Sign in", type="primary",
                                          on_click=lambda: st.session_state.pop(AUTH_MESSAGE, None))
    if submitted:
        attempt(lambda: base_service().sign_in(username, password, client_address()), _signed_in_now)
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
        attempt(lambda: service().change_password(old, new, st.session_state.get(AUTH_TOKEN, "")), _password_changed)


def _signed_in_now(signed: tuple[Actor, str]) -> None:
    who, token = signed
    st.session_state[AUTH_TOKEN] = token
    st.session_state.pop(AUTH_MESSAGE, None)
    state.set_actor(who)


def _password_changed(now: Actor) -> str:
    state.set_actor(now)
    return "Your password is changed; other browsers signed in as you are signed out."


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
    token = st.session_state.get(AUTH_TOKEN, "")
    if token:
        service().sign_out(token)
    st.session_state.pop(AUTH_TOKEN, None)
    state.forget_user()
    st.session_state[AUTH_TOKEN] = ""
    if _sso_configured() and getattr(st.user, "is_logged_in", False):
        st.logout()  # the browser goes through the provider's sign-out and comes back as a new session
        return
    st.rerun()



if __name__ == "__main__":  # run as a page of its own: only by Streamlit's folder mode, which this ends
    frame_guard()
