"""The lab set-up of docs/lab-server.md, tested to start: nginx with ``deploy/nginx/neuroseg.conf.template``
(rendered as docs/lab-server.md says) in front of ``streamlit run web/asgi.py``, TLS with a certificate made here,
WebSockets through the proxy (the page runs, a user signs in, a signed-in upload passes; another origin, an
anonymous upload and the app's own upload check's URL are refused by nginx itself), the client's address
from the proxy in the audit trail, plain HTTP redirected, and Streamlit's XSRF protection on."""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from string import Template

import numpy as np
import pytest
import tifffile

from storage.service import Neuroseg
from storage.settings import Settings
from tests.accounts import PASSWORD, make_user
from tests.browser import ARTIFACTS, ROOT, app_server, chromium, free_port

pytestmark = pytest.mark.slow
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
TEMPLATE = ROOT / "deploy" / "nginx" / "neuroseg.conf.template"


def self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {proc.stderr.read().decode(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)  # a port that is not open yet: nothing to await but the next try
    raise TimeoutError(f"nginx did not listen on {port}")


def _status(url: str, context: ssl.SSLContext, headers: dict[str, str], method: str = "GET") -> int:
    request = urllib.request.Request(url, headers=headers, method=method, data=b"x" if method == "PUT" else None)
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_app_runs_behind_nginx_with_tls_and_websockets(tmp_path, monkeypatch):
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (./test.sh installs Debian's nginx-light)")
    from playwright.sync_api import expect

    monkeypatch.setenv("NEUROSEG_BEHIND_PROXY", "1")
    data_dir = tmp_path / "data"
    make_user(data_dir, "ann")
    prefix = tmp_path / "nginx"
    (prefix / "logs").mkdir(parents=True)
    cert, key = self_signed(prefix)
    https_port, http_port = free_port(), free_port()
    with app_server(data_dir) as url:
        site = Template(TEMPLATE.read_text()).safe_substitute(
            NEUROSEG_HOST="localhost", NEUROSEG_UPSTREAM=url.removeprefix("http://"), TLS_CERT=str(cert),
            TLS_KEY=str(key), HTTPS_PORT=str(https_port), HTTP_PORT=str(http_port))
        assert "${" not in site
        (prefix / "neuroseg.conf").write_text(site)
        (prefix / "nginx.conf").write_text(f"""{'user root;' if os.geteuid() == 0 else ''}
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log;
events {{}}
http {{
    access_log {prefix}/logs/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/neuroseg.conf;
}}
""")
        check = subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        nginx = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                                 stderr=subprocess.PIPE)
        try:
            wait_listening(https_port, nginx)
            # plain HTTP is redirected to HTTPS
            opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                                      {"redirect_request": lambda *a, **k: None}))
            with pytest.raises(urllib.error.HTTPError) as redirect:
                opener.open(f"http://localhost:{http_port}/datasets", timeout=10)
            assert redirect.value.code == 301
            assert redirect.value.headers["Location"] == f"https://localhost:{https_port}/datasets"
            # TLS, and the app's health behind it
            context = ssl.create_default_context(cafile=str(cert))
            with urllib.request.urlopen(f"https://localhost:{https_port}/_stcore/health", context=context,
                                        timeout=10) as response:
                assert response.read().strip() == b"ok"
                assert "max-age" in response.headers["Strict-Transport-Security"]

            with chromium() as browser:
                expect.set_options(timeout=90_000)
                page = browser.new_page(ignore_https_errors=True, viewport={"width": 1300, "height": 900})
                page.set_default_timeout(90_000)
                page.goto(f"https://localhost:{https_port}/")
                page.get_by_role("heading", name="Sign in").wait_for()  # rendered over the WebSocket
                page.get_by_role("textbox", name="User name").fill("ann")
                page.get_by_label("Password", exact=True).fill(PASSWORD)
                page.get_by_role("button", name="Sign in").click()
                page.get_by_text("Signed in as ann").wait_for()
                page.get_by_role("link", name="Datasets").first.click()
                page.get_by_role("heading", name="Datasets").wait_for()
                deadline = time.monotonic() + 30  # the page asks the server for its HttpOnly cookie
                while "neuroseg_session" not in {c["name"] for c in page.context.cookies()}:
                    assert time.monotonic() < deadline, "no sign-in cookie was set through the proxy"
                    page.wait_for_timeout(100)
                cookies = {c["name"]: c for c in page.context.cookies()}
                assert "_streamlit_xsrf" in cookies, "XSRF protection is on"
                assert cookies["neuroseg_session"]["secure"], "the sign-in cookie is HTTPS-only behind TLS"
                assert cookies["neuroseg_session"]["httpOnly"], "and no script reads it"
                # a signed-in browser's upload passes nginx's check of the session (auth_request)
                buffer = io.BytesIO()
                tifffile.imwrite(buffer, np.zeros((2, 32, 32), np.uint8), photometric="minisblack")
                page.locator("input[type=file]").first.set_input_files(
                    {"name": "proxied.tif", "mimeType": "image/tiff", "buffer": buffer.getvalue()})
                # the file listed under the form: its upload has begun, and Streamlit keeps the form's
                # button disabled until it ends (a click before that would submit no file: the likely
                # cause of a failure under load)
                page.get_by_text("proxied.tif", exact=True).wait_for()
                page.get_by_role("button", name="Upload and check").click()
                page.get_by_text(re.compile(r"^Stored proxied")).wait_for()
                page.screenshot(path=ARTIFACTS / "behind-nginx.png", full_page=True)
            # nginx itself refuses a page of another origin, an anonymous upload and its own check's URL
            base = f"https://localhost:{https_port}"
            assert _status(base + "/", context, {"Origin": "https://evil.example"}) == 403
            assert _status(base + "/", context, {"Origin": f"https://localhost:{https_port}"}) == 200
            assert _status(base + "/_stcore/upload_file/some-session/some-file", context, {}, "PUT") == 403
            assert _status(base + "/_neuroseg/upload-check", context, {}) == 404
        finally:
            nginx.terminate()
            nginx.wait(timeout=15)
        access = (prefix / "logs" / "access.log").read_text()
        assert '"GET /_stcore/stream HTTP/1.1" 101' in access, "the WebSocket went through the proxy"
    svc = Neuroseg(Settings.from_env(data_dir), supervise=False)
    sign_ins = svc.audit_trail(action="sign in", username="ann")
    assert sign_ins[0].outcome == "ok" and sign_ins[0].address == "127.0.0.1", "the proxy's client address"
