"""The checks every request passes before Streamlit sees it (an ASGI middleware, :class:`Guard`).

Streamlit on its own lets any page on any ``localhost`` port open a websocket to the server (and a
``SameSite=Strict`` cookie ignores ports, so that page acts as the signed-in user), takes uploads from any
session with an XSRF token, signed in or not, lets a browser that knows another session's id reconnect to
it, and serves ``/media`` files to whoever has the URL. Here:

- **Origin.** A websocket, and any request that changes something (not GET, HEAD or OPTIONS), whose
  ``Origin`` is not the server's own (the ``Host`` it was asked for, or one of
  ``$NEUROSEG_ALLOWED_ORIGINS``) is refused (403). A request without ``Origin`` comes from no browser
  and so carries no victim's cookie.
- **Host.** While the server listens on loopback only (the default), a request for any other host name
  is refused: a DNS-rebinding page (``evil.example`` resolved to 127.0.0.1) is same-origin with itself.
  ``$NEUROSEG_ALLOWED_HOSTS`` adds names (and, on a server shared with ``--server.address``, is the list
  of names it answers to); behind the reverse proxy (``NEUROSEG_BEHIND_PROXY=1``) nginx's
  ``server_name`` decides.
- **Uploads.** ``PUT``/``DELETE`` on ``/_stcore/upload_file/<session>/…`` pass only for a session that is
  signed in now, by an account whose role may create (:mod:`web.sessions`), from the browser that holds
  that sign-in (its cookie is the session's token: knowing a session's id is not enough); anyone else
  gets 403 before a byte of the body is read. ``/_neuroseg/upload-check`` answers the same question for
  nginx's ``auth_request`` (``deploy/nginx``).
- **The sign-in cookie** is set by this server, ``HttpOnly`` (``POST /_neuroseg/cookie`` from the app's own
  page, with the token in a header): script on a page of another port of the same host, which shares the
  host's cookies, cannot read it.
- **Reconnects.** A websocket that asks to resume a signed-in session must send that session's sign-in
  cookie; otherwise it gets a new, signed-out session (the session id is not a credential).
- **Frames.** Every response says ``frame-ancestors 'self'`` (and ``X-Frame-Options: SAMEORIGIN``): no other
  page, also not one on another port, shows the app in a frame to click in it.
- **Media.** ``/media/…`` (the images and downloads the pages show) is served to a browser with a valid
  sign-in cookie, or while a session that shows the file is signed in; a closed session's files are not.
- **Upload memory.** An upload passes only while it fits what the page and the machine may hold
  (:mod:`web.uploads`); otherwise 413 (and the connection closed) before a byte is read. An upload must say
  its size (``Content-Length``), as browsers do; one account sends two at once at most (429), and a body that
  stalls or trickles is cut off, its room given back.
- **Developer messages.** Streamlit takes, from any websocket, signed in or not, messages meant for the
  developer's menu: clear the caches (each one opened the store again and left a supervisor thread and a
  database engine behind), tell the checkout's git remote, branch and changed files, run on save, and the
  debug ones. They are dropped here (:mod:`web.sockets`); ``/_stcore/metrics`` (who is online, what
  media is held) is an admin's (their sign-in cookie), and Streamlit's HTTP agent API is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import anyio.to_thread
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, cookie_parser
from streamlit import config
from streamlit.runtime import Runtime

from storage.service import RIGHTS, SESSION_HOURS
from web import sessions, sockets, uploads

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
UPLOAD_PREFIX = "/_stcore/upload_file/"
UPLOAD_CHECK = "/_neuroseg/upload-check"  # for nginx's auth_request
COOKIE_ROUTE = "/_neuroseg/cookie"  # the page's sign-in becomes an HttpOnly cookie here
TOKEN_HEADER = "x-neuroseg-token"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ADMIN_ROUTES = ("/_stcore/metrics",)  # (who is online, what media is held: an admin's, with their sign-in cookie)
REFUSED_PREFIXES = ("/_stcore/agent/",)  # (Streamlit's HTTP agent API, off by default: never past the guard)


def _split_host(host: str) -> str:
    """The name of a ``Host`` header value, without its port (``[::1]:8501`` → ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _env_list(name: str) -> list[str]:
    return [item.strip().lower().rstrip("/") for item in os.environ.get(name, "").split(",") if item.strip()]


def same_origin(origin: str, host: str) -> bool:
    """Whether a browser's ``Origin`` is this server as the browser asked for it (or a configured one)."""
    origin = origin.strip().lower().rstrip("/")
    if origin in _env_list("NEUROSEG_ALLOWED_ORIGINS"):
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.netloc == host.strip().lower()


def host_allowed(host: str) -> bool:
    """Whether a request for ``host`` may be served: any name behind the proxy or on a server shared on
    purpose (``--server.address`` other than loopback), else loopback names and ``$NEUROSEG_ALLOWED_HOSTS``."""
    if os.environ.get("NEUROSEG_BEHIND_PROXY") == "1":
        return True
    try:
        address = str(config.get_option("server.address") or "")
    except Exception:  # (no Streamlit config: a unit test)
        address = "127.0.0.1"
    name = _split_host(host)
    listed = _env_list("NEUROSEG_ALLOWED_HOSTS")
    if address not in ("127.0.0.1", "localhost", "::1") and not listed:
        return True  # shared on a network on purpose, naming no host: any name the lab uses
    return name in LOOPBACK_NAMES or name in listed


def cookie_token(headers: Headers) -> str:
    value = cookie_parser(headers.get("cookie", "")).get(sessions.COOKIE, "")
    return unquote(value)


def may_upload(session_id: str, token: str) -> bool:
    """Whether the Streamlit session ``session_id`` may receive files from a browser holding ``token``: the
    session is signed in now with that very token, by a role that creates things, not waiting to choose its
    password."""
    if not token or sessions.token_of(session_id) != token:
        return False
    who = sessions.actor_of(session_id)
    return who is not None and not getattr(who, "must_change_password", False) and \
        "create" in RIGHTS.get(getattr(who, "role", ""), set())


def base_path() -> str:
    """``server.baseUrlPath`` as a prefix (``/neuroseg``), or "" (the routes sit under it)."""
    try:
        base = str(config.get_option("server.baseUrlPath") or "").strip("/")
    except Exception:
        base = ""
    return f"/{base}" if base else ""


def _route(path: str) -> str:
    """The path as Streamlit's router sees it, without the base URL path."""
    base = base_path()
    return path[len(base):] or "/" if base and (path == base or path.startswith(base + "/")) else path


def session_cookie(token: str, seconds: int, secure: bool) -> bytes:
    """The ``Set-Cookie`` value that keeps (or, with no token, deletes) the browser's sign-in."""
    value = quote(token, safe="") if token else ""
    age = seconds if token else 0
    return (f"{sessions.COOKIE}={value}; Path=/; Max-Age={age}; HttpOnly; SameSite=Strict"
            + ("; Secure" if secure else "")).encode("latin-1")


def _upload_session(path: str) -> str:
    rest = path.split(UPLOAD_PREFIX, 1)[1] if UPLOAD_PREFIX in path else ""
    return rest.split("/", 1)[0]


def _media_shown_to_signed_in(file_id: str) -> bool:
    """Whether a session that is still open and signed in shows the media file ``file_id``."""
    try:
        runtime = Runtime.instance()
        manager = runtime.media_file_mgr
        with manager._lock:  # (Streamlit 1.67: which session refers to which file)
            holders = [sid for sid, files in manager._files_by_session_and_coord.items()
                       if file_id in files.values()]
    except Exception:  # no runtime, or another Streamlit: only the cookie counts
        return False
    return any(runtime.is_active_session(sid) and sessions.actor_of(sid) is not None for sid in holders)


def _is_admin(token: str) -> bool:
    who = sessions.verified(token) if token else None
    return who is not None and getattr(who, "role", "") == "admin" and not getattr(who, "must_change_password", False)


def _media_allowed(token: str, file_id: str) -> bool:
    return sessions.verified(token) is not None or _media_shown_to_signed_in(file_id)


async def _off_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a worker thread: the checks ask the store, which must not stall the server's loop."""
    return await anyio.to_thread.run_sync(fn, *args)


FRAME_HEADERS = [(b"content-security-policy", b"frame-ancestors 'self'"), (b"x-frame-options", b"SAMEORIGIN")]


def _framed_by_self_only(send: Send) -> Send:
    """``send`` with headers that keep the app out of other sites' frames (clickjacking a signed-in user:
    a page on another port is "same-site" and its frame gets the cookie)."""

    async def sending(message: MutableMapping[str, Any]) -> None:
        if message.get("type") == "http.response.start":
            names = {name.lower() for name, _ in message.get("headers", [])}
            message = {**message, "headers": [*message.get("headers", []),
                                              *[h for h in FRAME_HEADERS if h[0] not in names]]}
        await send(message)

    return sending


class Guard:
    """ASGI middleware: the checks of this module, in front of Streamlit's own routes."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = _route(scope.get("path", ""))
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        host = headers.get("host", "")
        if not host_allowed(host):
            await self._refuse(scope, receive, send, f"host {host!r} is not this server")
            return
        origin = headers.get("origin")
        if origin is not None and method not in SAFE_METHODS and not same_origin(origin, host):
            await self._refuse(scope, receive, send, f"origin {origin!r} is not this server")
            return
        if path.startswith(REFUSED_PREFIXES):
            await self._refuse(scope, receive, send, "not served")
            return
        if path in ADMIN_ROUTES and not await _off_loop(_is_admin, cookie_token(headers)):
            await self._refuse(scope, receive, send, "an admin's only")
            return
        receiving: tuple[str, int, str] | None = None  # an upload admitted: (its session, its bytes, its account)
        answer: Any = None  # (its answer, which says 408 when it was cut off)
        if scope["type"] == "websocket":
            scope = self._without_foreign_reconnect(scope, headers)
            cookie = cookie_token(headers)  # (a valid sign-in's reruns are paced as a signed-in user's at once)
            checked = cookie if cookie and await _off_loop(sessions.verified, cookie) is not None else ""
            receive, send = sockets.filtered(receive, send, checked)
        elif path == UPLOAD_CHECK:  # nginx asks before it passes an upload on
            original = _route(headers.get("x-original-uri", "").split("?", 1)[0])
            allowed = UPLOAD_PREFIX in original and await _off_loop(
                may_upload, _upload_session(original), cookie_token(headers))
            await self._answer(send, 204 if allowed else 403, b"" if allowed else b"not signed in\n")
            return
        elif path == COOKIE_ROUTE:
            await self._set_cookie(scope, receive, send, headers, method)
            return
        elif UPLOAD_PREFIX in path and method in ("PUT", "DELETE", "POST"):
            if not await _off_loop(may_upload, _upload_session(path), cookie_token(headers)):
                await self._refuse(scope, receive, send, "upload from a browser that does not hold the session's "
                                                         "sign-in")
                return
            if method == "PUT":
                session, incoming = _upload_session(path), uploads.declared_length(headers)
                who = await _off_loop(sessions.actor_of, session)
                user = f"user:{getattr(who, 'user_id', None) or session}"
                busy = uploads.user_room(user)
                if full := busy or uploads.upload_room(session, incoming):
                    log.warning("refused an upload: %s", full)  # (and its body is not read: closed)
                    status = 429 if busy else 411 if "Content-Length" in full else 413
                    await self._answer(send, status, f"{full}\n".encode(), close=True)
                    return
                receiving = (session, incoming or 0, user)
                uploads.reserve(*receiving)
                receive = uploads.watched(receive)
                send = answer = uploads.answered_as_cut(send, receive)
        elif path.startswith("/media/") and method in ("GET", "HEAD"):
            file_id = path.rsplit("/", 1)[-1].split(".", 1)[0]
            if not await _off_loop(_media_allowed, cookie_token(headers), file_id):
                await self._refuse(scope, receive, send, "media for a browser that is not signed in")
                return
        if scope["type"] == "http":
            send = _framed_by_self_only(send)
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:
            if not getattr(receive, "cut", False):
                raise  # (a browser that left: as Streamlit has it)
            if not answer.started:  # (an upload cut off here: 408 and one line in the log, no traceback)
                await self._answer(send, 408, uploads.CUT_OFF, close=True)
        finally:
            if receiving is not None:  # (received and held by Streamlit now, or refused: no longer in flight)
                uploads.release(*receiving)

    async def _set_cookie(self, scope: Scope, receive: Receive, send: Send, headers: Headers, method: str) -> None:
        """Keep the page's sign-in as an HttpOnly cookie (a valid token), or delete it (an empty one). The
        request comes from the app's own page (its Origin was checked above, and a browser sends one with
        every POST); a token that signs nobody in is refused."""
        if method != "POST":
            await self._answer(send, 405, b"POST only\n")
            return
        token = headers.get(TOKEN_HEADER, "").strip()
        if token and await _off_loop(sessions.verified, token) is None:
            await self._answer(send, 403, b"not a sign-in\n")
            return
        secure = scope.get("scheme") == "https" or headers.get("x-forwarded-proto", "") == "https"
        cookie = session_cookie(token, int(SESSION_HOURS * 3600), secure)
        await send({"type": "http.response.start", "status": 204,
                    "headers": [(b"set-cookie", cookie), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    def _without_foreign_reconnect(scope: Scope, headers: Headers) -> Scope:
        """Drop the session id a websocket asks to resume unless the browser holds that session's sign-in."""
        raw = headers.get("sec-websocket-protocol", "")
        entries = [e.strip() for e in raw.split(",")]
        if len(entries) < 3 or not entries[2]:
            return scope
        bound = sessions.token_of(entries[2])
        if not bound or bound == cookie_token(headers):
            return scope
        log.warning("a browser without its sign-in asked to resume a signed-in session: given a new session")
        kept = ", ".join(entries[:2]).encode("latin-1")
        new_headers = [(k, kept if k.lower() == b"sec-websocket-protocol" else v) for k, v in scope["headers"]]
        return {**scope, "headers": new_headers}

    @staticmethod
    async def _answer(send: Send, status: int, body: bytes, close: bool = False) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode()),
                                *([(b"connection", b"close")] if close else [])]})
        await send({"type": "http.response.body", "body": body})

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, why: str) -> None:
        log.warning("refused %s %s: %s", scope.get("method", "websocket"), scope.get("path", ""), why)
        if scope["type"] == "websocket":
            message = await receive()  # websocket.connect
            if message.get("type") == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})
            return
        await self._answer(send, 403, b"forbidden\n")
