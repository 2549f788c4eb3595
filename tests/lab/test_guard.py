"""The guard's rules as plain functions (the real server's probes are in test_hostile_server.py)."""

from __future__ import annotations

import pytest
from streamlit import config

from web.guard import _route, host_allowed, same_origin, session_cookie


@pytest.fixture
def address():
    before = config.get_option("server.address")

    def use(value: str) -> None:
        config.set_option("server.address", value)

    yield use
    config.set_option("server.address", before)


def test_only_the_servers_own_origin_is_same_origin(monkeypatch):
    assert same_origin("http://127.0.0.1:8501", "127.0.0.1:8501")
    for other in ("http://127.0.0.1:9999", "http://localhost:8501", "null", "https://evil.example",
                  "file://", "http://127.0.0.1:8501.evil.example"):
        assert not same_origin(other, "127.0.0.1:8501"), other
    monkeypatch.setenv("NEUROSEG_ALLOWED_ORIGINS", "https://neuroseg.lab.org")
    assert same_origin("https://neuroseg.lab.org", "127.0.0.1:8501")


def test_host_names_on_loopback_and_on_a_shared_server(address, monkeypatch):
    monkeypatch.delenv("NEUROSEG_ALLOWED_HOSTS", raising=False)
    monkeypatch.delenv("NEUROSEG_BEHIND_PROXY", raising=False)
    address("127.0.0.1")
    assert host_allowed("localhost:8501") and host_allowed("127.0.0.1:8501") and host_allowed("[::1]:8501")
    assert not host_allowed("evil.example:8501")  # DNS rebinding
    monkeypatch.setenv("NEUROSEG_ALLOWED_HOSTS", "neuroseg.lab.org")
    assert host_allowed("neuroseg.lab.org:8501") and not host_allowed("evil.example:8501")
    address("0.0.0.0")  # shared on purpose, with its names listed: only those
    assert host_allowed("neuroseg.lab.org") and not host_allowed("evil.example")
    monkeypatch.delenv("NEUROSEG_ALLOWED_HOSTS")
    assert host_allowed("evil.example")  # shared naming no host: any (docs/lab-server.md says so)
    address("127.0.0.1")
    monkeypatch.setenv("NEUROSEG_BEHIND_PROXY", "1")
    assert host_allowed("evil.example")  # nginx's server_name decides


def test_routes_under_a_base_path_and_the_cookie_it_sets(monkeypatch):
    before = config.get_option("server.baseUrlPath")
    try:
        config.set_option("server.baseUrlPath", "neuroseg")
        assert _route("/neuroseg/media/abc.png") == "/media/abc.png"
        assert _route("/neuroseg") == "/"
        assert _route("/neurosegx/media/abc.png") == "/neurosegx/media/abc.png"
    finally:
        config.set_option("server.baseUrlPath", before)
    cookie = session_cookie("a b;c", 3600, secure=True).decode()
    assert cookie.startswith("neuroseg_session=a%20b%3Bc;") and "HttpOnly" in cookie and "Secure" in cookie
    assert "Max-Age=0" in session_cookie("", 3600, secure=False).decode()


def test_a_websocket_drops_the_developers_messages_and_large_ones_before_a_sign_in():
    """What web.sockets lets through, message by message, as the server's websocket hands them over: the
    developer menu's messages never; a message over 64 kB only once the session it serves is signed in (a
    24 MB value of nested JSON took ~570 MiB and seconds of the interpreter from an anonymous session)."""
    import asyncio

    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    from web import sessions
    from web.sockets import filtered

    def back(kind: str, size: int = 0) -> dict:
        msg = BackMsg()
        if kind == "rerun_script":
            msg.rerun_script.query_string = "x" * size
        else:
            setattr(msg, kind, True)
        return {"type": "websocket.receive", "bytes": msg.SerializeToString()}

    hello = ForwardMsg()
    hello.new_session.initialize.session_id = "session-7"
    incoming = [back("clear_cache"), back("rerun_script", 100 << 10), back("rerun_script", 10),
                back("load_git_info"), back("rerun_script", 100 << 10), {"type": "websocket.disconnect"}]
    got, sent = [], []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    async def talk() -> None:
        receiving, sending = filtered(receive, send)
        got.append(await receiving())  # the developer's message and the anonymous 100 kB one dropped
        await sending({"type": "websocket.send", "bytes": hello.SerializeToString()})  # (the session it serves)
        sessions.bind("session-7", "token-of-ann")  # its page signed in
        got.append(await receiving())
        got.append(await receiving())

    try:
        asyncio.run(talk())
    finally:
        sessions.unbind("session-7")
    assert [len(m.get("bytes", b"")) for m in got] == [len(back("rerun_script", 10)["bytes"]),
                                                        len(back("rerun_script", 100 << 10)["bytes"]), 0]
    assert got[-1]["type"] == "websocket.disconnect" and len(sent) == 1


def test_reruns_are_paced_and_a_viewer_sends_no_large_message(monkeypatch):
    """A thousand reruns sent at once by websockets not even signed in kept the server from answering anyone
    for minutes (a thread started per rerun on its event loop); a viewer's 21 MB values held ~290 MiB per tab.
    Reruns over a websocket's pace wait (none is dropped; strangers share one pace, a signed-in tab has its
    own), and a role that creates nothing sends nothing over 1 MB. The clock stands still here: the waits asked
    for are what the pace says."""
    import asyncio
    from types import SimpleNamespace

    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    from web import sessions, sockets

    monkeypatch.setattr(sockets, "_now", lambda: 1000.0)
    monkeypatch.setattr(sockets, "_all_anonymous", sockets.Pace(*sockets.ALL_ANONYMOUS_PACE))
    monkeypatch.setattr(sockets, "_paces", {})
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(round(seconds, 3))

    monkeypatch.setattr(sockets.anyio, "sleep", sleep)
    roles = {"token-of-vic": "viewer", "token-of-ann": "annotator"}
    monkeypatch.setattr(sessions, "actor_of", lambda sid: SimpleNamespace(role=roles[sessions.token_of(sid)]))

    def rerun(size: int = 0) -> dict:
        msg = BackMsg()
        msg.rerun_script.query_string = "x" * size
        return {"type": "websocket.receive", "bytes": msg.SerializeToString()}

    def socket_of(session: str, incoming: list[dict]):
        hello = ForwardMsg()
        hello.new_session.initialize.session_id = session

        async def receive():
            return incoming.pop(0)

        async def send(message):
            pass

        receiving, sending = sockets.filtered(receive, send)
        return receiving, lambda: sending({"type": "websocket.send", "bytes": hello.SerializeToString()})

    async def talk(session: str, incoming: list[dict], token: str = "", count: int | None = None) -> list[dict]:
        receiving, hello = socket_of(session, incoming)
        await hello()
        if token:
            sessions.bind(session, token)
        return [await receiving() for _ in range(len(incoming) if count is None else count)]

    try:
        asyncio.run(talk("stranger-1", [rerun() for _ in range(8)]))
        assert waits == [0.5, 1.0], waits  # its own pace: 6 at once, then 2 a second
        waits.clear()
        for stranger in ("stranger-2", "stranger-3", "stranger-4"):  # every stranger's pace together: 20 at
            asyncio.run(talk(stranger, [rerun() for _ in range(5)]))  # once (8 taken), then 10 a second
        assert waits == [0.1, 0.2, 0.3], waits
        waits.clear()
        got = asyncio.run(talk("ann-tab", [rerun() for _ in range(31)], "token-of-ann"))
        assert len(got) == 31 and waits == [0.1], waits  # a signed-in tab: 30 at once, then 10 a second
        waits.clear()

        async def new_tab() -> None:  # a signed-in browser's new tab: its first reruns come before the server
            incoming = [rerun() for _ in range(10)]  # has said which session it serves (the guard checked its
            receiving, _ = sockets.filtered(lambda: _pop(incoming), None, "token-of-bob")  # sign-in cookie)
            for _ in range(10):
                await receiving()

        async def _pop(incoming):
            return incoming.pop(0)

        asyncio.run(new_tab())
        assert waits == [], waits  # (not behind the strangers' shared pace, spent above)

        big = rerun(2 << 20)
        got = asyncio.run(talk("vic-tab", [big, rerun(), {"type": "websocket.disconnect"}], "token-of-vic", 2))
        assert [m["type"] for m in got[:2]] == ["websocket.receive", "websocket.disconnect"]
        assert len(got[0]["bytes"]) < 100  # the viewer's 2 MB message dropped unread, its small one passed
        got = asyncio.run(talk("ann-tab-2", [rerun(2 << 20)], "token-of-ann"))
        assert len(got[0]["bytes"]) > 2 << 20  # an annotator's canvas may be that large
    finally:
        for session in ("stranger-1", "stranger-2", "stranger-3", "stranger-4", "ann-tab", "vic-tab", "ann-tab-2"):
            sessions.unbind(session)


def test_an_upload_that_stalls_or_trickles_is_cut_off_and_one_account_sends_two_at_once(monkeypatch):
    """An annotator declared 4 GB uploads from three tabs and sent a few bytes: their declared room was held
    as long as they liked, and everyone else's uploads got 413. An upload whose body stops for a minute, or
    comes slower than 64 kB/s after a minute, is cut off (the app is told the browser left, and the guard
    gives its room back); one account has two uploads in flight at most, all its tabs together."""
    import asyncio

    from web import uploads

    clock = [0.0]
    monkeypatch.setattr(uploads, "_now", lambda: clock[0])
    chunk = {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    async def trickle():  # 1 kB a second
        clock[0] += 1.0
        return dict(chunk)

    async def body(receive, count):
        return [await receive() for _ in range(count)]

    got = asyncio.run(body(uploads.watched(trickle), 70))
    kinds = [m["type"] for m in got]
    assert kinds[:60] == ["http.request"] * 60 and kinds[60] == "http.disconnect", kinds  # (after the minute)

    async def fast():  # 1 MB a second: fine however long it takes
        clock[0] += 1.0
        return {"type": "http.request", "body": b"x" * (1 << 20), "more_body": True}

    assert {m["type"] for m in asyncio.run(body(uploads.watched(fast), 120))} == {"http.request"}

    async def stalled():
        await asyncio.Event().wait()  # (the browser sends nothing more)

    monkeypatch.setattr(uploads, "IDLE_S", 0.05)
    assert asyncio.run(body(uploads.watched(stalled), 1)) == [{"type": "http.disconnect"}]

    assert uploads.user_room("user:7") is None
    uploads.reserve("tab-1", 10, "user:7")
    uploads.reserve("tab-2", 10, "user:7")
    try:
        assert "you are sending 2 uploads already" in uploads.user_room("user:7")
        assert uploads.user_room("user:8") is None  # (another account is not held up)
    finally:
        uploads.release("tab-1", 10, "user:7")
        uploads.release("tab-2", 10, "user:7")
    assert uploads.user_room("user:7") is None and not uploads.BY_USER and not uploads.RECEIVING


def test_an_upload_cut_off_is_answered_408_and_gives_its_room_back(monkeypatch):
    """The app behind the guard (a real Starlette route reading the body as Streamlit's does) sees the browser
    leave when the guard cuts a stalled upload off: its ClientDisconnect became a 500 and a traceback in the
    server's log. The browser gets 408 and why; the upload's room and the account's place are given back."""
    import asyncio
    from types import SimpleNamespace

    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import Response
    from starlette.routing import Route

    from web import guard, uploads

    monkeypatch.setattr(uploads, "IDLE_S", 0.2)
    monkeypatch.setattr(guard, "may_upload", lambda session, token: True)
    monkeypatch.setattr(guard.sessions, "actor_of", lambda session: SimpleNamespace(user_id=7))
    monkeypatch.setattr(uploads, "upload_room", lambda session, size: None)

    async def put(request):
        async for _ in request.stream():
            pass
        return Response(status_code=204)

    app = Starlette(routes=[Route(guard.UPLOAD_PREFIX + "{sid}/{fid}", put, methods=["PUT"])],
                    middleware=[Middleware(guard.Guard)])
    sent, parts = [], [{"type": "http.request", "body": b"a" * 10, "more_body": True}]

    async def receive():
        if parts:
            return parts.pop()
        await asyncio.Event().wait()  # (the browser sends nothing more, and keeps the connection)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "PUT", "path": guard.UPLOAD_PREFIX + "s1/f1", "query_string": b"",
             "headers": [(b"host", b"localhost"), (b"content-length", b"1000")], "scheme": "http",
             "server": ("127.0.0.1", 8501), "client": ("127.0.0.1", 5), "root_path": "", "http_version": "1.1"}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [408]
    assert b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body") == uploads.CUT_OFF
    assert not uploads.BY_USER and not uploads.RECEIVING
