"""Accounts, roles, ownership and the audit trail in the service, over a real SQLite store in tmp_path:
the first admin, sign-in and its refusals, expiry, password changes, the slowing down of wrong passwords,
what each role may do (every call checked in the service, so a forged call is refused too), the queue
limit, and the migration that gives an existing store's rows an owner."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import select, text, update

from storage.auth import accounts, passwords
from storage.auth.accounts import Actor
from storage.db import make_engine, upgrade
from storage.models import SignIn
from storage.service import Neuroseg, UserError
from storage.settings import Settings
from tests.drafts import new_draft, start_options
from unet.network.config import preset

GOOD = "a-good-password"


@pytest.fixture
def svc(tmp_path, monkeypatch):
    monkeypatch.delenv("NEUROSEG_ADMIN_PASSWORD", raising=False)
    service = Neuroseg(Settings.from_env(tmp_path / "data"), supervise=False)
    yield service
    service.close()


def user(svc: Neuroseg, name: str, role: str, password: str = GOOD) -> Actor:
    """A user who has chosen their password, signed in."""
    svc.create_user(name, role, password)
    svc._tx(lambda s: setattr(accounts.user_by_name(s, name), "must_change_password", False))
    return svc.sign_in(name, password, "10.0.0.7")[0]


def trail(svc: Neuroseg, **filters) -> list[tuple[str, str, str, str]]:
    return [(r.username, r.action, r.target, r.outcome) for r in svc.audit_trail(**filters)]


def test_the_first_start_makes_an_admin_whose_one_time_password_must_be_changed(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("NEUROSEG_ADMIN_PASSWORD", raising=False)
    server = Neuroseg(Settings.from_env(tmp_path / "data"))  # the server's start
    server.close()
    err = capfd.readouterr().err
    assert "created the admin account 'admin' with the one-time password" in err
    password = err.split("one-time password ")[1].split()[0]
    admin, token = server.sign_in("admin", password)
    assert admin.role == "admin" and admin.must_change_password
    with pytest.raises(UserError, match="Change your one-time password first"):
        server.acting_as(admin).load_demo()  # nothing else until it is changed
    with pytest.raises(UserError, match="at least 8 characters"):
        server.acting_as(admin).change_password(password, "short")
    changed = server.acting_as(admin).change_password(password, "the admin's own password", token)
    assert not changed.must_change_password
    assert server.acting_as(changed).load_demo().owner == "admin"
    with pytest.raises(UserError, match="Unknown user name or wrong password"):
        server.sign_in("admin", password)  # the one-time password is gone
    assert server.sign_in("admin", "the admin's own password")[0].user_id == admin.user_id
    again = Neuroseg(Settings.from_env(tmp_path / "data"))  # a restart makes no second admin
    again.close()
    assert "one-time password" not in capfd.readouterr().err
    assert [u.username for u in again.users()] == ["admin"]


def test_the_first_start_prints_the_sign_in_beside_the_url_and_the_sign_in_page_says_where(tmp_path, monkeypatch):
    """``./run.sh``'s server prints the admin's one-time password when it starts, before any request, next
    to the URL; the sign-in page of a store nobody has set up says where it is and how to make a new one."""
    from streamlit.testing.v1 import AppTest

    from tests.browser import ROOT, app_server

    monkeypatch.delenv("NEUROSEG_ADMIN_PASSWORD", raising=False)
    data = tmp_path / "data"
    with app_server(data, args=("--server.headless", "true")) as url:
        pass
    log = (tmp_path / "streamlit.log").read_text()
    banner = log[log.index("URL:"):]  # right under Streamlit's URL line, as the server starts
    assert f"Neuroseg at http://localhost:{url.rsplit(':', 1)[1]}" in banner
    password = banner.split("one-time password")[1].split()[0]
    assert "reset-password admin" in banner
    monkeypatch.setenv("NEUROSEG_DATA_DIR", str(data))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert any("**First start.** Sign in as **admin** with the one-time password printed in the terminal" in i.value
               for i in at.info)
    monkeypatch.setenv("NEUROSEG_ADMIN_PASSWORD", "set-by-the-lab")  # (then that is where it is, and it says so)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert any("with the password in `$NEUROSEG_ADMIN_PASSWORD`" in i.value for i in at.info)
    monkeypatch.delenv("NEUROSEG_ADMIN_PASSWORD")
    server = Neuroseg(Settings.from_env(data), supervise=False)
    try:
        admin, token = server.sign_in("admin", password)
        server.acting_as(admin).change_password(password, "the admin's own password", token)
        assert not server.awaiting_first_admin()
    finally:
        server.close()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert at.text_input[0].label == "User name" and not any("First start" in i.value for i in at.info)


def test_the_admin_password_can_come_from_the_environment(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("NEUROSEG_ADMIN_PASSWORD", "from-the-environment")
    server = Neuroseg(Settings.from_env(tmp_path / "data"))
    server.close()
    err = capfd.readouterr().err
    assert "from-the-environment" not in err and "$NEUROSEG_ADMIN_PASSWORD" in err
    assert server.sign_in("admin", "from-the-environment")[0].must_change_password


@pytest.mark.parametrize(("name", "password", "message"), [
    ("nobody", GOOD, "Unknown user name or wrong password"),
    ("ann", "", "Enter your password"),
    ("ann", "x" * 10_000, "longer than any password here"),
    ("../../etc/passwd", GOOD, "only letters a–z, digits"),
    ("<script>alert(1)</script>", GOOD, "only letters a–z, digits"),
    ("", GOOD, "Enter a user name"),
    ("ann", GOOD.upper(), "Unknown user name or wrong password"),
])
def test_bad_sign_ins_get_a_clear_message_sign_nobody_in_and_are_recorded(svc, name, password, message):
    user(svc, "ann", "annotator")
    sessions_before = svc._tx(lambda s: len(s.scalars(select(SignIn)).all()))
    with pytest.raises(UserError, match=message):
        svc.sign_in(name, password, "10.0.0.9")
    assert svc._tx(lambda s: len(s.scalars(select(SignIn)).all())) == sessions_before
    last = svc.audit_trail(action="sign in")[0]
    assert (last.outcome, last.address) == ("failed", "10.0.0.9")
    assert "<" not in last.target or last.target.startswith("user '")  # kept as text, quoted


def test_users_cannot_be_made_with_unsafe_names_or_passwords(svc):
    for name in ("../x", "a b", "<b>x</b>", "x" * 65):
        with pytest.raises(UserError, match="user name"):
            svc.create_user(name, "viewer", GOOD)
    with pytest.raises(UserError, match="at most 1024 characters"):
        svc.create_user("ok", "viewer", "y" * 10_000)
    with pytest.raises(UserError, match="unknown role"):
        svc.create_user("ok", "root", GOOD)


def test_wrong_passwords_in_a_row_make_the_account_wait(svc):
    user(svc, "ann", "annotator")
    for _ in range(passwords.FREE_TRIES):
        with pytest.raises(UserError, match="wrong password"):
            svc.sign_in("ann", "not-the-password")
    with pytest.raises(UserError, match=r"Too many wrong passwords for this user name: wait \d+ s"):
        svc.sign_in("ann", GOOD)  # even the right one, until the wait is over
    svc._tx(lambda s: setattr(accounts.user_by_name(s, "ann"), "locked_until", datetime.now(UTC)))
    assert svc.sign_in("ann", GOOD)[0].username == "ann"
    outcomes = [r.outcome for r in svc.audit_trail(action="sign in", username="ann")][::-1]
    assert outcomes[-5:] == ["failed", "failed", "failed", "refused", "ok"]


def test_wrong_passwords_from_one_address_do_not_lock_the_owner_out_from_another(svc):
    """One wrong password every five minutes kept an account (the admin's, whose name everyone knows) waiting
    for good, its owner's right password too. The wait spares an address from which that name never failed."""
    user(svc, "ann", "annotator")
    svc.sign_in("ann", GOOD, "10.0.0.8")  # (the owner's machine: it has signed in as ann before)
    for _ in range(passwords.FREE_TRIES + 1):
        with pytest.raises(UserError, match=r"wrong password|wait"):
            svc.sign_in("ann", "not-the-password", "10.0.0.66")
    with pytest.raises(UserError, match="Too many wrong passwords for this user name"):
        svc.sign_in("ann", GOOD, "10.0.0.66")  # the address that failed waits, even with the right password
    with pytest.raises(UserError, match="Too many wrong passwords for this user name"):
        svc.sign_in("ann", GOOD, "127.0.0.1")  # so does the loopback, which everyone behind it shares
    with pytest.raises(UserError, match="Too many wrong passwords for this user name"):
        svc.sign_in("ann", GOOD, "10.0.0.9")  # an address that never signed in as ann waits too
    assert svc.sign_in("ann", GOOD, "10.0.0.8")[0].username == "ann"  # the owner's own machine: in
    for name in ("ann", "nobody"):  # a stranger's many addresses buy no tries, for an account or a name that
        for _ in range(passwords.FREE_TRIES + 1):  # is none alike
            with contextlib.suppress(UserError):
                svc.sign_in(name, "not-the-password", "10.0.0.66")
        for address in ("10.0.0.67", "10.0.0.68"):
            with pytest.raises(UserError, match="Too many wrong passwords for this user name"):
                svc.sign_in(name, "still-not-it", address)


def test_a_session_expires_and_a_password_change_signs_out_other_browsers(svc):
    ann = user(svc, "ann", "annotator")
    _, here = svc.sign_in("ann", GOOD)
    _, elsewhere = svc.sign_in("ann", GOOD)
    assert svc.signed_in(here).username == "ann"
    svc.acting_as(ann).change_password(GOOD, "another-good-password", keep_token=here)
    assert svc.signed_in(here).username == "ann"
    with pytest.raises(UserError, match="Please sign in"):
        svc.signed_in(elsewhere)
    with pytest.raises(UserError, match="wrong password"):
        svc.sign_in("ann", GOOD)
    svc._tx(lambda s: s.execute(update(SignIn).values(expires=datetime.now(UTC) - timedelta(seconds=1))))
    # said again at every check (the page's pictures are checked too: a first check deleted it, so the page's
    # own check said "Please sign in" and the expired message was lost), and after someone else signs in
    for _ in range(2):
        with pytest.raises(UserError, match="Your session has expired: sign in again"):
            svc.signed_in(here)
        svc.sign_in("ann", "another-good-password")
    with pytest.raises(UserError, match="Please sign in"):
        svc.signed_in("forged-token")


def _labelled_demo(svc: Neuroseg, who: Actor):
    return svc.acting_as(who).load_demo()


def test_a_viewer_looks_and_exports_but_every_change_is_refused_in_the_service(svc, tmp_path):
    ann, viewer = user(svc, "ann", "annotator"), user(svc, "vic", "viewer")
    demo = _labelled_demo(svc, ann)
    as_viewer = svc.acting_as(viewer)
    assert [d.id for d in as_viewer.datasets()] == [demo.id]  # looking is fine
    draft = new_draft(as_viewer, demo.id, 0, start_options(svc, demo.id, 0)[0])
    draft.working = draft.working.copy()
    draft.working[:5, :5] = 1
    forged = {  # what a forged request would make the page call
        "save mask": lambda: as_viewer.save_draft(draft),
        "keep draft": lambda: as_viewer.keep_draft(draft, "user:1"),
        "train": lambda: as_viewer.submit_training([{"dataset_id": demo.id, "slices": [0]}], [], preset("tiny")),
        "upload": lambda: as_viewer.load_demo(),
        "rename": lambda: as_viewer.update(demo.id, name="mine now"),
        "delete": lambda: as_viewer.delete_dataset(demo.id),
        "restore": lambda: as_viewer.restore(svc.history(demo.id, 0)[0].id),
        "users": lambda: as_viewer.users(),
        "set role": lambda: as_viewer.set_role(viewer.user_id, "admin"),
    }
    for what, call in forged.items():
        with pytest.raises(UserError, match=r"Your role \(viewer\)"):
            call()
        assert svc.datasets()[0].name == demo.name, what
    assert [m.version for m in svc.history(demo.id, 0)] == [1] and svc.runs() == []
    refused = [(a, o) for _, a, _, o in trail(svc, username="vic", outcome="refused")]
    assert {a for a, _ in refused} >= {"save mask", "train", "load demo", "rename", "delete", "restore", "set role"}
    assert [u.role for u in svc.users() if u.username == "vic"] == ["viewer"]


def test_an_annotator_changes_only_what_they_own_and_an_admin_anything(svc):
    ann, bob, boss = user(svc, "ann", "annotator"), user(svc, "bob", "annotator"), user(svc, "boss", "admin")
    demo = _labelled_demo(svc, ann)
    assert demo.owner == "ann" and svc.dataset(demo.id).owner == "ann"
    with pytest.raises(UserError, match=f"Dataset {demo.id} belongs to ann: only its owner or an admin"):
        svc.acting_as(bob).delete_dataset(demo.id)
    with pytest.raises(UserError, match="belongs to ann"):
        svc.acting_as(bob).update(demo.id, name="bob's now")
    assert svc.acting_as(ann).update(demo.id, name="Ann's stack").name == "Ann's stack"
    # bob may annotate ann's stack: annotation is shared work, kept as versions by author
    draft = new_draft(svc.acting_as(bob), demo.id, 0, start_options(svc, demo.id, 0)[0])
    draft.working = draft.working.copy()
    draft.working[:4, :4] = 2
    assert svc.acting_as(bob).save_draft(draft, author="forged name").author == "bob"
    svc.acting_as(boss).delete_dataset(demo.id)
    assert svc.datasets() == []
    assert [(u, a, t, o) for u, a, t, o in trail(svc) if a in ("delete", "rename")][::-1] == [
        ("bob", "delete", f"dataset {demo.id}", "refused"), ("bob", "rename", f"dataset {demo.id}", "refused"),
        ("ann", "rename", f"dataset {demo.id}", "ok"), ("boss", "delete", f"dataset {demo.id}", "ok")]
    assert {r.address for r in svc.audit_trail(username="bob")} == {"10.0.0.7"}


def test_one_waiting_run_per_user_unless_an_admin_raises_it_and_the_queue_names_the_owners(svc, monkeypatch):
    monkeypatch.setattr("storage.jobs.queue.start_queued", lambda *a, **k: [])  # no worker: the runs stay queued
    ann, boss = user(svc, "ann", "annotator"), user(svc, "boss", "admin")
    demo = _labelled_demo(svc, ann)
    spec = [{"dataset_id": demo.id, "slices": [0, 1]}]
    first = svc.acting_as(ann).submit_training(spec, [], preset("tiny"), preset="tiny")
    assert first.owner == "ann"
    with pytest.raises(UserError, match=rf"already have 1 training run waiting \(#{first.id}\); your limit is 1"):
        svc.acting_as(ann).submit_training(spec, [], preset("tiny"), preset="tiny")
    with pytest.raises(UserError, match=r"Your role \(annotator\) cannot manage users"):
        svc.acting_as(ann).set_queue_limit(ann.user_id, 3)
    svc.acting_as(boss).set_queue_limit(ann.user_id, 2)
    second = svc.acting_as(ann).submit_training(spec, [], preset("tiny"), preset="tiny")
    third = svc.acting_as(boss).submit_training(spec, [], preset("tiny"), preset="tiny")
    queue = svc.training_queue()
    assert [(q.position, q.run_id, q.owner) for q in queue] == [
        (1, first.id, "ann"), (2, second.id, "ann"), (3, third.id, "boss")]
    with pytest.raises(UserError, match=r"not yours|belongs to ann"):
        svc.acting_as(user(svc, "bob", "annotator")).cancel_run(first.id)
    assert svc.acting_as(ann).cancel_run(first.id).status == "CANCELLED"
    actions = [(u, a, o) for u, a, _, o in trail(svc) if a in ("train", "cancel", "set queue limit")][::-1]
    assert actions == [("ann", "train", "ok"), ("ann", "train", "failed"), ("ann", "set queue limit", "refused"),
                       ("boss", "set queue limit", "ok"), ("ann", "train", "ok"), ("boss", "train", "ok"),
                       ("bob", "cancel", "refused"), ("ann", "cancel", "ok")]


def test_role_changes_are_the_admins_and_recorded(svc):
    boss, ann = user(svc, "boss", "admin"), user(svc, "ann", "viewer")
    as_boss = svc.acting_as(boss)
    assert as_boss.set_role(ann.user_id, "annotator").role == "annotator"
    with pytest.raises(UserError, match="cannot take the admin role from yourself"):
        as_boss.set_role(boss.user_id, "viewer")
    with pytest.raises(UserError, match="cannot disable your own account"):
        as_boss.set_disabled(boss.user_id, True)
    assert [(a, o) for _, a, _, o in trail(svc) if a in ("set role", "disable user")][:2] == [
        ("disable user", "refused"), ("set role", "refused")], "refused, not failed"
    password = as_boss.reset_password(ann.user_id)
    assert svc.sign_in("ann", password)[0].must_change_password
    assert ("boss", "set role", f"user {ann.user_id} → annotator", "ok") in trail(svc)
    assert ("boss", "reset password", f"user {ann.user_id}", "ok") in trail(svc)
    as_boss.set_disabled(ann.user_id, True)
    with pytest.raises(UserError, match=r"^Unknown user name or wrong password\.$"):
        svc.sign_in("ann", password)


def test_an_existing_store_migrates_and_its_rows_get_the_first_admin_as_owner(tmp_path, monkeypatch, capfd):
    """A store made before accounts (schema 0007, with a dataset, masks, a run and a prediction) migrates:
    nothing is lost, an admin owns every row, and the server gives that admin a one-time password."""
    monkeypatch.delenv("NEUROSEG_ADMIN_PASSWORD", raising=False)
    settings = Settings.from_env(tmp_path / "data")
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.database_url)
    upgrade(engine, "0007")
    with engine.begin() as conn:
        now = datetime.now(UTC)
        conn.execute(text("INSERT INTO datasets (id, name, z, y, x, dtype, source_name, sha256, size_bytes, created,"
                          " notes, volume_format) VALUES (1, 'old', 2, 8, 8, 'uint8', 'old.tif', 'x', 128, :t, '',"
                          " 'ome-zarr')"), {"t": now})
        for v in (1, 2):
            conn.execute(text("INSERT INTO mask_versions (id, dataset_id, slice_index, version, kind, author, "
                              "labelled_pixels, created, file, sha256) VALUES (:v, 1, 0, :v, 'painted', 'ann', 5, "
                              ":t, 'f', 's')"), {"v": v, "t": now})
        conn.execute(text("INSERT INTO runs (id, status, kind, spec, config, device, created, phase) VALUES "
                          "(1, 'FINISHED', 'train', '{}', '{}', 'cpu', :t, '')"), {"t": now})
        conn.execute(text("INSERT INTO checkpoints (id, run_id, step, kind, file, sha256, metrics, created) VALUES "
                          "(1, 1, 5, 'best', 'c', 's', '{}', :t)"), {"t": now})
        conn.execute(text("INSERT INTO predictions (id, checkpoint_id, dataset_id, file, sha256, created, slices, "
                          "status, done, phase, files, postprocess) VALUES (1, 1, 1, 'p', 's', :t, '[0]', "
                          "'FINISHED', 1, '', '{}', 'watershed')"), {"t": now})
    engine.dispose()

    server = Neuroseg(settings)  # the start after the upgrade: migrates, then gives the admin a password
    server.close()
    password = capfd.readouterr().err.split("one-time password ")[1].split()[0]
    with server.sessions() as s:
        owners = {t: s.execute(text(f"SELECT owner_id FROM {t} WHERE id = 1")).scalars().all()
                  for t in ("datasets", "runs", "predictions")}  # (the starter model's run is the system's)
        masks = s.execute(text("SELECT count(*) FROM mask_versions")).scalar()
        checkpoints = s.execute(text("SELECT count(*) FROM checkpoints WHERE run_id = 1")).scalar()
    admin = server.sign_in("admin", password)[0]
    assert owners == {"datasets": [admin.user_id], "runs": [admin.user_id], "predictions": [admin.user_id]}
    assert (masks, checkpoints) == (2, 1), "the table copies of the migration lost nothing"
    assert server.dataset(1).owner == "admin" and server.run(1).owner == "admin"
    assert [u.username for u in server.users()] == ["admin"]


def test_audit_filters_and_a_failed_action_is_recorded_as_failed(svc):
    ann = user(svc, "ann", "annotator")
    with pytest.raises(UserError):
        svc.acting_as(ann).delete_dataset(12345)  # no such dataset: it fails, it is not refused
    assert trail(svc, action="delete") == [("ann", "delete", "dataset 12345", "failed")]
    assert trail(svc, username="ann", outcome="ok") == [("ann", "sign in", "user ann", "ok")]
    assert trail(svc, since=datetime.now(UTC) + timedelta(minutes=1)) == []
    names, actions = svc.audit_choices()
    assert "ann" in names and {"sign in", "delete", "create user"} <= set(actions)
    use = svc.disk_use()
    assert use.free_bytes > 0 and use.datasets == []
    assert np.isfinite(use.total_bytes)


def test_an_admin_sees_and_deletes_what_crashes_left_no_one_else_can(svc, tmp_path):
    """``orphans/`` (a crash's leftover stack folder, moved aside when its id was handed out again) grew for
    ever: the admin page shows its size and an admin deletes it; a link there is removed, never followed."""
    boss, ann = user(svc, "boss", "admin"), user(svc, "ann", "annotator")
    left = svc.store.root / "orphans" / "dataset-3-0a1b2c3d"
    left.mkdir(parents=True)
    (left / "volume.bin").write_bytes(b"x" * 5000)
    outside = tmp_path / "keep"
    outside.mkdir()
    (outside / "precious").write_text("not the store's")
    (svc.store.root / "orphans" / "link").symlink_to(outside)
    use = svc.acting_as(boss).disk_use()
    assert use.orphans_bytes >= 5000 and use.total_bytes >= use.orphans_bytes
    assert [name for name, _ in use.orphans] == ["dataset-3-0a1b2c3d", "link"]
    with pytest.raises(UserError, match="cannot manage users"):
        svc.acting_as(ann).empty_orphans()
    assert left.is_dir()
    shown = [name for name, _ in use.orphans]
    (svc.store.root / "orphans" / "dataset-4-later").mkdir()  # a crash after the admin looked: not deleted unseen
    assert svc.acting_as(boss).empty_orphans([*shown, "../keep", "gone"]) >= 5000  # (names not listed: ignored)
    assert [p.name for p in (svc.store.root / "orphans").iterdir()] == ["dataset-4-later"]
    assert (outside / "precious").is_file()
    svc.acting_as(boss).empty_orphans()
    assert svc.acting_as(boss).disk_use().orphans_bytes == 0
    assert ("boss", "empty orphans", "orphans/", "ok") in trail(svc, action="empty orphans")
    assert [r.detail.split(",")[0] for r in svc.audit_trail(action="empty orphans", outcome="ok")] == ["1 folder",
                                                                                                   "2 folders"]


def test_an_admin_who_forgot_the_password_gets_a_one_time_one_from_the_server_shell(svc, tmp_path):
    import os
    import subprocess
    import sys

    user(svc, "boss", "admin")
    env = {**os.environ, "NEUROSEG_DATA_DIR": str(tmp_path / "data")}
    env.pop("DATABASE_URL", None)
    listed = subprocess.run([sys.executable, "-m", "storage", "users"], capture_output=True, text=True, env=env)
    assert listed.returncode == 0 and "boss" in listed.stdout and "admin" in listed.stdout
    done = subprocess.run([sys.executable, "-m", "storage", "reset-password", "boss"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    password = done.stdout.split("one-time password for boss: ")[1].split()[0]
    boss = svc.sign_in("boss", password)[0]
    assert boss.must_change_password
    with pytest.raises(UserError, match="wrong password"):
        svc.sign_in("boss", GOOD)
    missing = subprocess.run([sys.executable, "-m", "storage", "reset-password", "nobody"], capture_output=True,
                             text=True, env=env)
    assert missing.returncode == 2 and "no user named 'nobody'" in missing.stderr
    assert f"the store at {tmp_path / 'data'} (sqlite)" in missing.stderr  # (which store it speaks of)
    assert [r.target for r in svc.audit_trail(action="reset password")] == [f"user {boss.user_id}"]
    # without the server's $NEUROSEG_DATA_DIR it opened (and made) an empty store and found nobody
    env["NEUROSEG_DATA_DIR"] = str(tmp_path / "elsewhere")
    lost = subprocess.run([sys.executable, "-m", "storage", "reset-password", "boss"], capture_output=True,
                          text=True, env=env)
    assert lost.returncode == 2 and f"no Neuroseg store at {tmp_path / 'elsewhere'}" in lost.stderr
    assert not (tmp_path / "elsewhere").exists()
