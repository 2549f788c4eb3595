"""Signed-in users for the tests: a real account in the test's store and a real session token from a real
sign-in, handed to AppTest (its session state) or to Chromium (the cookie the app sets itself)."""

from __future__ import annotations

from pathlib import Path

from storage.auth.accounts import user_by_name
from storage.service import Neuroseg, UserError
from storage.settings import Settings

PASSWORD = "a-good-test-password"
SESSION_COOKIE = "neuroseg_session"


def make_user(data_dir: Path | str, username: str = "ann", role: str = "annotator",
              password: str = PASSWORD) -> str:
    """The user (made when missing, with its password already chosen) signed in: returns the token."""
    svc = Neuroseg(Settings.from_env(data_dir), supervise=False)
    try:
        try:
            svc.create_user(username, role, password)
        except UserError as exc:
            if "already" not in str(exc):
                raise

        def chosen(s) -> None:
            user_by_name(s, username).must_change_password = False

        svc._tx(chosen)
        return svc.sign_in(username, password)[1]
    finally:
        svc.close()
        svc.sessions.kw["bind"].dispose()


def sign_in_browser(page, url: str, data_dir: Path | str, username: str = "ann", role: str = "annotator") -> str:
    """Sign ``page``'s browser context in as ``username``: what the app keeps after a sign-in, the session
    cookie and this origin's key in the page's storage (:func:`storage.auth.accounts.browser_key`)."""
    token = make_user(data_dir, username, role)
    keep_in_browser(page, url, data_dir, token)
    return token


def keep_in_browser(page, url: str, data_dir: Path | str, token: str) -> None:
    """The browser of ``page`` holds the sign-in ``token``: its cookie, and the key in this origin's storage."""
    from storage.auth.accounts import browser_key, browser_secret

    key = browser_key(browser_secret(Path(data_dir)), token)
    page.context.add_cookies([{"name": SESSION_COOKIE, "value": token, "url": str(url)}])
    origin = str(url).rstrip("/")
    page.context.add_init_script(f"if (location.origin === {origin!r}) localStorage.setItem('neuroseg_key', {key!r});")
