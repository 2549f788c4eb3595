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
