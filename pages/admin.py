"""Admin: the users and their roles (add, change a role or a queue limit, hand out a one-time password,
disable), the audit trail with filters, the disk each dataset and run takes, and the training queue.
Every call here is an admin's call in the service: another user who reaches this URL is refused there."""

from __future__ import annotations

import datetime as dt
import re

import streamlit as st

from pages.common import attempt, can, data_table, flash, start_page, still_signed_in
from ui.text import plain

ADDED = "_admin_users_added"  # (this page's own key: users added in this session, which names the form)
ONE_TIME = "admin_one_time"  # (this page's own key: a one-time password to hand over, shown once)
svc = start_page("Admin")
if not can("admin"):
    st.error("This page is for admins.")
    st.stop()

ROLES = ("admin", "annotator", "viewer")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# (a key keeps the tab a user is on when a message above it shifts the page, e.g. after a delete)
users_tab, audit_tab, disk_tab, queue_tab = st.tabs(["Users", "Audit trail", "Disk use", "Training queue"],
                                                    key="admin_tab", on_change="rerun")

with users_tab:
    people = svc.users()
    data_table([{"user": u.username, "name": u.display_name, "role": u.role,
                   "signs in with": "single sign-on" if u.single_sign_on else "password",
                   "runs waiting at most": u.max_queued_runs,
                   "state": "disabled" if u.disabled else
                   ("must change password" if u.must_change_password else "active"),
                   "last sign-in": u.last_sign_in.strftime("%Y-%m-%d %H:%M") if u.last_sign_in else "never"}
                  for u in people], hide_index=True, width="stretch")
    handed = st.session_state.pop(ONE_TIME, None)
    if handed:
        st.success(f"One-time password for **{plain(handed[0])}**: `{handed[1]}`. Hand it over now: it is not shown "
                   "again, and it must be changed at the first sign-in.", icon=":material/key:")

    left, right = st.columns(2)
    # (a refused name stays in the field to be corrected: a form cleared on every submit sent an empty name
    # on the next click, whose "Enter a user name" hid the reason; a new form once the user is made)
    added = st.session_state.get(ADDED, 0)
    with left, st.form(f"add_user_{added}"):
        st.markdown("**Add a user**")
        new_name = st.text_input("User name", max_chars=64, help="Letters a–z, digits, '.', '_' and '-'.")
        new_role = st.selectbox("Role", ROLES, index=1)
        if st.form_submit_button("Add user", type="primary"):
            attempt(lambda: svc.create_user(new_name, new_role),
                    lambda made: st.session_state.update({ONE_TIME: (made[0].username, made[1]), ADDED: added + 1}))
    with right:
        st.markdown("**Change a user**")
        by_name = {u.username: u for u in people}
        chosen = by_name[st.selectbox("User", list(by_name), key="admin_user")]
        role = st.selectbox("Role", ROLES, index=ROLES.index(chosen.role), key=f"admin_role_{chosen.id}")
        limit = st.number_input("Training runs waiting at once", 1, 100, chosen.max_queued_runs,
                                key=f"admin_limit_{chosen.id}")
        b1, b2, b3 = st.columns(3)

        def apply() -> list[str]:
            changed = []
            if role != chosen.role:
                stopped = svc.set_role(chosen.id, role).stopped
                changed.append(f"role {role}")
                if stopped:
                    changed.append(f"stopped {', '.join(stopped)} (a {role} does not train or predict)")
            if limit != chosen.max_queued_runs:
                svc.set_queue_limit(chosen.id, int(limit))
                changed.append(f"at most {int(limit)} training run{'s' * (int(limit) != 1)} waiting")
            return changed

        def applied(changed: list[str]) -> None:
            flash(f"**{plain(chosen.username)}**: " + (", ".join(changed) if changed else "nothing to change")
                  + ".", "success" if changed else "info")

        if b1.button("Apply", type="primary", key="admin_apply"):
            attempt(apply, applied)
        elif not chosen.single_sign_on and b2.button("Reset password", key="admin_reset"):
            attempt(lambda: svc.reset_password(chosen.id),
                    lambda password: st.session_state.update({ONE_TIME: (chosen.username, password)}))
        elif b3.button("Enable" if chosen.disabled else "Disable", key="admin_disable"):
            attempt(lambda: svc.set_disabled(chosen.id, not chosen.disabled),
                    lambda done: f"**{plain(chosen.username)}**: {'disabled' if done.disabled else 'enabled'}"
                    + (f"; stopped {', '.join(done.stopped)}." if done.stopped else "."))

@st.fragment(run_every=15)  # (events of other users appear without a click)
def audit_trail() -> None:
    if not still_signed_in("admin"):  # (an admin demoted meanwhile: the trail is no longer theirs)
        return
    names, actions = svc.audit_choices()
    f1, f2, f3, f4 = st.columns([1, 1, 1, 2])
    who = f1.selectbox("User", ["everyone", *names], key="audit_user")
    what = f2.selectbox("Action", ["every action", *actions], key="audit_action")
    outcome = f3.selectbox("Outcome", ["any", "ok", "refused", "failed", "asked"], key="audit_outcome")
    today = dt.date.today()
    span = f4.date_input("Between", (today - dt.timedelta(days=30), today), key="audit_span")
    since = until = None
    chosen = [d for d in (span if isinstance(span, tuple | list) else [span]) if d is not None]
    if chosen:  # (one date, while the second is not picked yet: that day alone)
        since = dt.datetime.combine(chosen[0], dt.time.min, dt.UTC)
        until = dt.datetime.combine(chosen[-1] + dt.timedelta(days=1), dt.time.min, dt.UTC)
    rows = svc.audit_trail(username="" if who == "everyone" else who, action="" if what == "every action" else what,
                           outcome="" if outcome == "any" else outcome, since=since, until=until, limit=2000)
    when = (f" from {since:%Y-%m-%d} to {until - dt.timedelta(days=1):%Y-%m-%d}" if since and until else
            ", any day")
    st.caption(f"{len(rows)} event{'s' * (len(rows) != 1)}{when}, newest first (at most 2000 shown).")
    names = {str(u.id): u.username for u in svc.users()}  # ("user 2 → viewer" says whom: "user 2 (ann) → viewer")
    data_table([{"time (UTC)": r.time.strftime("%Y-%m-%d %H:%M:%S"), "user": r.username, "action": r.action,
                 "on": re.sub(r"\buser (\d+)\b", lambda m: f"{m[0]} ({names[m[1]]})" if m[1] in names else m[0],
                              r.target),
                 "outcome": r.outcome, "address": r.address, "detail": r.detail} for r in rows],
               hide_index=True, width="stretch")


with audit_tab:
    audit_trail()

with disk_tab:
    use = svc.disk_use()
    m1, m2, m3 = st.columns(3)
    m1.metric("The store takes", _size(use.total_bytes))
    m2.metric("Predictions", _size(use.predictions_bytes))
    m3.metric("Free on its disk", _size(use.free_bytes))
    d1, d2 = st.columns(2)
    d1.markdown("**Datasets**")
    data_table(at=d1, rows=[{"dataset": f"#{i} {name}", "owner": owner or "—", "on disk": _size(n)}
                  for i, name, owner, n in use.datasets], hide_index=True, width="stretch")
    d2.markdown("**Runs**")
    data_table(at=d2, rows=[{"run": f"#{i} {what}", "owner": owner or "—", "on disk": _size(n)}
                  for i, what, owner, n in use.runs], hide_index=True, width="stretch")
    if use.orphans:
        st.warning(f"**{_size(use.orphans_bytes)}** in `orphans/`: what crashes left while a stack was stored, "
                   "which no dataset owns (kept in the data folder for a look).", icon=":material/folder_off:")
        data_table([{"in orphans/": name, "on disk": _size(n)} for name, n in use.orphans], hide_index=True,
                     key="orphans_list")
        sure = st.checkbox(f"Yes, delete these {len(use.orphans)}", key="orphans_sure")
        if st.button("Delete what crashes left", key="empty_orphans", disabled=not sure):
            attempt(lambda: svc.empty_orphans([name for name, _ in use.orphans]),  # (what was shown, no more)
                    lambda freed: f"Deleted what crashes left: {_size(freed)} freed.")

with queue_tab:
    queue = svc.training_queue()
    if not queue:
        st.info("No training run is running or waiting.")
    else:
        upcoming = [q for q in queue if q.position == 1]
        if upcoming:
            st.write(f"Next: run #{upcoming[0].run_id} by **{plain(upcoming[0].owner or 'system')}**.")
        data_table([{"place": "running" if q.position == 0 else f"{q.position}", "run": f"#{q.run_id}",
                       "owner": q.owner or "—", "kind": q.kind, "recipe": q.preset, "device": q.device}
                      for q in queue], hide_index=True, width="stretch")
