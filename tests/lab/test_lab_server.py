"""The lab server in a real browser (Chromium driving ``streamlit run app.py``): nothing but the sign-in
form for an anonymous visitor on every URL, the first admin's one-time password, bad sign-ins, what each
role may do (the service refuses a forged call too), the audit trail on the Admin page, and a password
change that takes effect."""

from __future__ import annotations

import re

import pytest

from storage.service import Neuroseg, UserError
from storage.settings import Settings
from tests.accounts import keep_in_browser, make_user
from tests.browser import ARTIFACTS, app_server, chromium, signed_in
from tests.drafts import new_draft, start_options
from unet.network.config import preset

pytestmark = pytest.mark.slow
TIMEOUT_MS = 90_000
ADMIN_FIRST = "the-first-admin-password"
URLS = ("", "datasets", "annotate", "train", "predict", "runs", "admin", "common", "no-such-page")


def new_page(browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    page.set_default_timeout(TIMEOUT_MS)
    return page


def sign_in(page, username: str, password: str) -> None:
    page.get_by_role("textbox", name="User name").fill(username)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()


def test_an_anonymous_visitor_sees_only_the_sign_in_form_and_bad_sign_ins_say_why(tmp_path, monkeypatch):
    from playwright.sync_api import expect

    monkeypatch.setenv("NEUROSEG_ADMIN_PASSWORD", ADMIN_FIRST)
    data_dir = tmp_path / "data"
    svc = Neuroseg(Settings.from_env(data_dir), supervise=False)
    svc.load_demo()  # there is something to see, for whoever is signed in
    with app_server(data_dir) as url, chromium() as browser:
        expect.set_options(timeout=TIMEOUT_MS)
        page = new_page(browser)
        for path in URLS:
            page.goto(f"{url}/{path}")
            page.get_by_role("heading", name="Sign in").wait_for()
            expect(page.get_by_role("button", name="Sign in")).to_have_count(1)
            expect(page.locator('[data-testid="stSidebarNav"] a')).to_have_count(0)
            for hidden in ("Load demo dataset", "Demo: synthetic EM", "Browse dataset", "Save version"):
                expect(page.get_by_text(hidden)).to_have_count(0)
        page.goto(url)
        page.get_by_role("heading", name="Sign in").wait_for()
        page.screenshot(path=ARTIFACTS / "sign-in.png", full_page=True)

        for name, password, message in (
            ("nobody", "whatever-it-is", "Unknown user name or wrong password"),
            ("admin", "", "Enter your password"),
            ("admin", "p" * 10_000, "longer than any password here"),
            ("../../etc", "whatever-it-is", "only letters a–z, digits"),
            ("<img src=x onerror=alert(1)>", "whatever-it-is", "only letters a–z, digits"),
        ):
            sign_in(page, name, password)
            page.get_by_text(message).wait_for()
            expect(page.get_by_role("heading", name="Sign in")).to_have_count(1)  # still nobody
        expect(page.locator("img[src=x]")).to_have_count(0)  # the name was text, never markup

        # an expired session: the sign-in form again, with a message that says so
        token = make_user(data_dir, "ann")
        keep_in_browser(page, url, data_dir, token)
        page.goto(f"{url}/datasets")
        page.get_by_text("Browse dataset").wait_for()
        from sqlalchemy import update

        from storage.models import SignIn

        svc._tx(lambda s: s.execute(update(SignIn).values(expires=SignIn.created)))
        page.reload()
        page.get_by_text("Your session has expired: sign in again").wait_for()
        expect(page.get_by_text("Browse dataset")).to_have_count(0)
    failed = [r for r in svc.audit_trail(action="sign in") if r.outcome == "failed"]
    assert len(failed) >= 5 and all(r.address == "localhost" for r in failed)


def test_roles_ownership_audit_and_a_password_change_in_the_browser(tmp_path, monkeypatch):
    from playwright.sync_api import expect

    monkeypatch.setenv("NEUROSEG_ADMIN_PASSWORD", ADMIN_FIRST)
    data_dir = tmp_path / "data"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with app_server(data_dir) as url, chromium() as browser:
        expect.set_options(timeout=TIMEOUT_MS)
        svc = Neuroseg(Settings.from_env(data_dir), supervise=False)

        # the first admin: the one-time password, then their own
        admin = new_page(browser)
        admin.goto(url)
        sign_in(admin, "admin", ADMIN_FIRST)
        admin.get_by_text("Choose your password").wait_for()
        expect(admin.locator('[data-testid="stSidebarNav"] a')).to_have_count(0)  # nothing else until then
        admin.get_by_label("Current password").fill(ADMIN_FIRST)
        admin.get_by_label("New password", exact=True).fill("the admin's own password")
        admin.get_by_label("New password again").fill("the admin's own password")
        admin.get_by_role("button", name="Change password").click()
        admin.get_by_text("Signed in as Administrator").wait_for()

        # the admin adds ann (annotator) on the Admin page and reads her one-time password
        admin.get_by_role("link", name="Admin").first.click()
        admin.get_by_role("tab", name="Users").wait_for()
        admin.get_by_role("textbox", name="User name").fill("ann")
        admin.get_by_role("button", name="Add user").click()
        handed = admin.get_by_text("One-time password for ann:")
        handed.wait_for()
        one_time = re.search(r"One-time password for ann: (\S+)\.", handed.inner_text()).group(1)

        # ann: the one-time password must be changed; then she loads the demo, which is hers
        ann = new_page(browser)
        ann.goto(url)
        sign_in(ann, "ann", one_time)
        ann.get_by_label("Current password").fill(one_time)
        ann.get_by_label("New password", exact=True).fill("ann's chosen password")
        ann.get_by_label("New password again").fill("ann's chosen password")
        ann.get_by_role("button", name="Change password").click()
        ann.get_by_text("Signed in as ann").wait_for()
        expect(ann.get_by_role("link", name="Admin")).to_have_count(0)  # not listed for an annotator
        ann.get_by_role("button", name="Load demo dataset").click()
        ann.get_by_text("Loaded Demo: synthetic EM").wait_for()
        demo = svc.datasets()[0]
        assert demo.owner == "ann"

        # vic, a viewer: sees the stack, cannot save; a forged call is refused by the service
        vic = signed_in(new_page(browser), url, "vic", "viewer")
        vic.goto(f"{url}/annotate")
        vic.get_by_text("View only: your role cannot paint or save masks.").wait_for()
        vic.get_by_text("You are signed in as a viewer").wait_for()
        expect(vic.locator("canvas.upper-canvas")).to_have_count(0)
        vic.screenshot(path=ARTIFACTS / "viewer-annotate.png", full_page=True)
        expect(vic.get_by_role("button", name="Save version")).to_be_disabled()
        vic.get_by_role("link", name="Train").first.click()
        expect(vic.get_by_role("button", name="Train", exact=True)).to_be_disabled()
        # what a forged request would make the server call, as vic: refused by the service
        as_vic = svc.acting_as(svc.signed_in(make_user(data_dir, "vic", "viewer")))
        draft = new_draft(as_vic, demo.id, 0, start_options(svc, demo.id, 0)[0])
        draft.working = draft.working.copy()
        draft.working[:8, :8] = 1
        with pytest.raises(UserError, match=r"Your role \(viewer\) cannot save or restore masks"):
            as_vic.save_draft(draft)
        with pytest.raises(UserError, match=r"Your role \(viewer\) cannot train"):
            as_vic.submit_training([{"dataset_id": demo.id, "slices": [0, 1]}], [], preset("tiny"), preset="tiny")
        assert [m.version for m in svc.history(demo.id, 0)] == [1] and svc.runs() == []
        vic.screenshot(path=ARTIFACTS / "viewer-train.png", full_page=True)

        # bob, another annotator: cannot delete ann's dataset
        bob = signed_in(new_page(browser), url, "bob")
        bob.goto(f"{url}/datasets?dataset={demo.id}")
        bob.get_by_text("Delete this dataset").click()  # the form says why it is off, before any click
        bob.get_by_text(f"Dataset {demo.id} belongs to ann: only its owner or an admin").last.wait_for()
        expect(bob.get_by_role("button", name="Delete dataset")).to_be_disabled()
        expect(bob.get_by_label("Type the dataset's name to confirm")).to_be_disabled()
        as_bob = svc.acting_as(svc.signed_in(make_user(data_dir, "bob")))  # what a forged request would call
        with pytest.raises(UserError, match=f"Dataset {demo.id} belongs to ann"):
            as_bob.delete_dataset(demo.id)
        assert [d.id for d in svc.datasets()] == [demo.id]

        # the admin can
        admin.goto(f"{url}/datasets?dataset={demo.id}")
        admin.get_by_text("Delete this dataset").click()
        admin.get_by_label("Type the dataset's name to confirm").fill(demo.name)
        admin.get_by_label("Type the dataset's name to confirm").press("Enter")
        admin.get_by_role("button", name="Delete dataset").click()
        admin.get_by_text(f"Deleted **{demo.name}**".replace("**", "")).wait_for()
        assert svc.datasets() == []

        # the audit trail shows each attempt, refused or done
        admin.get_by_role("link", name="Admin").first.click()
        admin.get_by_role("tab", name="Audit trail").click()
        caption = admin.get_by_text(re.compile(r"\d+ events from [\d-]+ to [\d-]+, newest first"))
        caption.wait_for()
        rows = svc.audit_trail()
        seen = {(r.username, r.action, r.outcome) for r in rows}
        assert {("admin", "change password", "ok"), ("admin", "create user", "ok"), ("ann", "change password", "ok"),
                ("ann", "load demo", "ok"), ("vic", "save mask", "refused"), ("vic", "train", "refused"),
                ("bob", "delete", "refused"),
                ("admin", "delete", "ok")} <= seen
        assert int(caption.inner_text().split()[0]) == len(rows)
        admin.screenshot(path=ARTIFACTS / "admin-audit.png", full_page=True)

        # a password change takes effect: ann signs out; her one-time password no longer works, hers does
        ann.get_by_role("button", name=re.compile("Account")).click()
        ann.get_by_role("button", name=re.compile("Sign out")).click()
        ann.get_by_role("heading", name="Sign in").wait_for()
        sign_in(ann, "ann", one_time)
        ann.get_by_text("Unknown user name or wrong password").wait_for()
        sign_in(ann, "ann", "ann's chosen password")
        ann.get_by_text("Signed in as ann").wait_for()
