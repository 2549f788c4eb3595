"""Single sign-on end to end in a real browser: Streamlit's ``st.login`` against a real OpenID Connect
provider on a loopback port (``tests/oidc_provider.py``, written with Authlib), the identity mapped to a
user of the store on its first sign-in and to the same user afterwards, and signing out."""

from __future__ import annotations

import re
import secrets

import pytest

from storage.service import Neuroseg
from storage.settings import Settings
from tests.browser import ARTIFACTS, app_server, chromium, free_port
from tests.oidc_provider import Person, start

pytestmark = pytest.mark.slow
TIMEOUT_MS = 90_000


def test_single_sign_on_through_st_login_against_a_loopback_provider(tmp_path, monkeypatch):
    from playwright.sync_api import expect

    pytest.importorskip("httpx", reason="st.login's token exchange needs httpx (requirements.txt)")
    provider, server = start("neuroseg-lab", secrets.token_urlsafe(16),
                             Person("0a1b2c", "jane.doe@lab.example.org", "Jane Doe", "jdoe"))
    port = free_port()
    secrets_file = tmp_path / "secrets.toml"
    secrets_file.write_text(f"""[auth]
redirect_uri = "http://127.0.0.1:{port}/oauth2callback"
cookie_secret = "{secrets.token_urlsafe(32)}"
client_id = "{provider.client_id}"
client_secret = "{provider.client_secret}"
server_metadata_url = "{provider.url}/.well-known/openid-configuration"
""")
    monkeypatch.setenv("NEUROSEG_SSO_LABEL", "Example Lab ID")
    monkeypatch.setenv("NEUROSEG_OIDC_ROLE", "annotator")
    data_dir = tmp_path / "data"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with app_server(data_dir, port=port, args=("--secrets.files", str(secrets_file))) as url, \
                chromium() as browser:
            expect.set_options(timeout=TIMEOUT_MS)
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"{url}/datasets")
            page.get_by_role("button", name=re.compile("Sign in with Example Lab ID")).click()
            page.get_by_text("Signed in as Jane Doe · annotator").wait_for()  # back from the provider
            assert ("POST", "/token") in provider.requests and ("GET", "/jwks") in provider.requests
            page.screenshot(path=ARTIFACTS / "sso-signed-in.png", full_page=True)
            page.get_by_role("button", name="Load demo dataset").click()  # the role the provider's users get
            page.get_by_text("Loaded Demo: synthetic EM").wait_for()

            svc = Neuroseg(Settings.from_env(data_dir), supervise=False)
            jane = [u for u in svc.users() if u.single_sign_on]
            assert [(u.username, u.email, u.display_name, u.role, u.has_password) for u in jane] == [
                ("jdoe", "jane.doe@lab.example.org", "Jane Doe", "annotator", False)]
            assert svc.datasets()[0].owner == "jdoe"
            signs = [(r.username, r.outcome, r.detail) for r in svc.audit_trail(action="sign in")]
            assert signs == [("jdoe", "ok", "single sign-on")]
            # every cookie of this browser, copied into another (a server on another port of the host receives
            # them all): Streamlit's own sign-on cookie is valid for 30 days, but its answer was taken once
            cookies = page.context.cookies()
            assert any(c["name"].startswith("_streamlit_user") for c in cookies)
            thief = browser.new_context()
            try:
                thief.add_cookies(cookies)
                stolen = thief.new_page()
                stolen.goto(f"{url}/datasets")
                stolen.get_by_text("Your single sign-on has ended: sign in again.").wait_for()
                expect(stolen.get_by_text("Signed in as")).to_have_count(0)
            finally:
                thief.close()
            assert next((r.outcome, r.detail) for r in svc.audit_trail(action="sign in")) == (
                "refused", "single sign-on: answer already used")

            page.reload()  # the sign-in holds
            page.get_by_text("Signed in as Jane Doe").wait_for()

            page.get_by_role("button", name=re.compile("Account")).click()
            page.get_by_role("button", name=re.compile("Sign out")).click()
            try:
                page.get_by_role("heading", name="Sign in").wait_for()
            finally:
                page.screenshot(path=ARTIFACTS / "sso-signed-out.png", full_page=True)
            assert ("GET", "/logout") in provider.requests  # the provider's session ends too
            expect(page.get_by_text("Signed in as")).to_have_count(0)

            page.get_by_role("button", name=re.compile("Sign in with Example Lab ID")).click()  # again: same user
            page.get_by_text("Signed in as Jane Doe · annotator").wait_for()
            assert [u.username for u in svc.users() if u.single_sign_on] == ["jdoe"]
            assert len(svc.audit_trail(action="sign in", outcome="ok")) == 2
            # no password to guess for jdoe, and the answer tells no more than for a name that is no account
            with pytest.raises(Exception, match=r"^Unknown user name or wrong password\.$"):
                svc.sign_in("jdoe", "any-password-at-all")
    finally:
        server.shutdown()
