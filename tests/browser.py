"""A real Neuroseg server on a free loopback port and a headless Chromium driven by Playwright, for the
browser tests. Chromium is Debian's (``/usr/bin/chromium``, installed by ``./test.sh``); Playwright's own
browser download is never used."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("NEUROSEG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("NEUROSEG_ARTIFACTS") or ROOT / "test-artifacts")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerURL(str):
    """The base URL of a running test server, with the server's process id."""

    pid: int
    data_dir: Path


@contextlib.contextmanager
def app_server(data_dir: Path, timeout: float = 120, root: Path = ROOT, *, port: int | None = None,
               args: tuple[str, ...] = ()) -> Iterator[ServerURL]:
    """``streamlit run web/asgi.py`` (``app.py`` behind :mod:`web.guard`) as ``./run.sh`` starts it (the
    checkout's ``.streamlit/config.toml``; only the port is chosen here), with its store in ``data_dir``;
    yields the base URL once the server says it listens (its output is awaited line by line and kept in
    ``streamlit.log`` beside ``data_dir``). ``root`` serves another checkout (``bench.server`` measures an
    older commit so); ``args`` go to ``streamlit run`` (``--secrets.files …``)."""
    port = port or free_port()
    env = {**os.environ, "NEUROSEG_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(root)}
    env.pop("DATABASE_URL", None)
    script = root / "web" / "asgi.py"
    script = script if script.is_file() else root / "app.py"  # (an older checkout, for bench.server)
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(script),
                             "--server.port", str(port), *args],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    listening = threading.Event()
    log_path = data_dir.parent / "streamlit.log"

    def pump() -> None:
        with open(log_path, "wb") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if b"URL:" in line:
                    listening.set()
        listening.set()  # the server exited: stop waiting

    threading.Thread(target=pump, daemon=True).start()
    url = ServerURL(f"http://127.0.0.1:{port}")
    url.pid = proc.pid
    url.data_dir = data_dir
    try:
        if not listening.wait(timeout) or proc.poll() is not None:
            raise RuntimeError(f"the server did not start: {log_path.read_text(errors='replace')[-2000:]}")
        _await_health(url, proc, time.monotonic() + timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _await_health(url: str, proc: subprocess.Popen, deadline: float) -> None:
    """Until ``deadline``: the server's health endpoint answers ``ok``. A loaded machine can keep a just
    started server's first answer waiting past one request's timeout, so a request that timed out is made
    again (each waits up to 10 s: nothing spins); a refused connection, an error reply or a server that
    exited fails at once."""
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=10) as r:
                assert r.read().strip() == b"ok"
                return
        except (TimeoutError, urllib.error.URLError) as exc:
            timed_out = isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)
            if not timed_out or isinstance(exc, urllib.error.HTTPError) or proc.poll() is not None \
                    or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {url} did not answer its health check: {exc}") from exc


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (./test.sh installs Debian's chromium package)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser
        except BaseException:
            _print_pages(browser)
            raise
        finally:
            browser.close()


def pages_text(browser) -> str:
    """What each open page of ``browser`` shows (its URL and the start of its text)."""
    shown = []
    for context in browser.contexts:
        for page in context.pages:
            try:
                text = page.inner_text("body", timeout=2000)
            except Exception as exc:  # a closed or hung page
                text = f"(unreadable: {exc})"
            shown.append(f"--- {page.url}\n{text[:1500]}")
    return "\n".join(shown)


def _print_pages(browser) -> None:
    """What each open page showed when a browser test failed (CI keeps only the test's output)."""
    print(pages_text(browser), flush=True)


def signed_in(page, url: ServerURL, username: str = "ann", role: str = "annotator"):
    """``page`` with its browser signed in to the server at ``url`` as ``username`` (an account in the
    server's store, made when missing)."""
    from tests.accounts import sign_in_browser

    sign_in_browser(page, url, url.data_dir, username, role)
    return page


def open_with_demo(page, url: ServerURL, name: str = "ann") -> None:
    """Sign in as ``name`` (an annotator), open the app, load the demo dataset and wait until it is in."""
    signed_in(page, url, name)
    page.goto(url)
    page.get_by_role("button", name="Load demo dataset").click()
    page.get_by_text("Loaded Demo: synthetic EM").wait_for()


def canvas_key(page) -> str:
    """The key of the canvas on screen (Streamlit puts ``st-key-<key>`` on its container)."""
    return page.evaluate("document.querySelector('[class*=\"st-key-canvas-\"]').className"
                         ".match(/st-key-(canvas-\\S+)/)[1]")


def new_canvas(page, old_key: str):
    """The canvas that replaced ``old_key`` (a save or a change of view remounts it), once its drawing
    surface exists: fabric creates ``canvas.upper-canvas`` when it has set the canvas up, and strokes drawn
    before that are lost."""
    page.wait_for_function(  # the new canvas alone on screen: the old one can linger a moment beside it
        "k => { const boxes = document.querySelectorAll('[class*=\"st-key-canvas-\"]');"
        " return boxes.length === 1 && !boxes[0].classList.contains('st-key-' + k); }", arg=old_key)
    canvas = page.locator(f".st-key-{canvas_key(page)} canvas.upper-canvas")
    canvas.wait_for()
    return canvas


def annotate_render(page) -> float:
    """When the Annotate page's latest render was made (server clock, ms): its leave guard, drawn after the
    canvas, keeps it in ``window.__neurosegLeaveGuard.run``. Waits for a first render to arrive."""
    await_annotate_render(page, 0)
    return page.evaluate("window.__neurosegLeaveGuard.run")


def await_annotate_render(page, after: float) -> None:
    """Wait until a render of Annotate newer than ``after`` has reached the browser in full, the canvas with
    its new settings included (a caption above the canvas can arrive before the canvas's new props do, and
    a stroke begun in between loses its first points)."""
    page.wait_for_function("t => ((window.__neurosegLeaveGuard || {}).run || 0) > t", arg=after)
