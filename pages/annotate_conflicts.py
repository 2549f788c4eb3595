"""The Annotate page's answers when a save or a keep meets someone else's work: a newer version saved by
someone else while this edit was open (:func:`conflict_panel`: move the changes onto it, or open it), and
another tab or browser of the same user that kept its own edit of the slice after this tab last did
(:func:`clash_panel`: open the other tab's changes, or keep these). Nothing is overwritten until the user
chooses."""

from __future__ import annotations

import streamlit as st

from domain.records import MaskInfo
from pages.annotate_panels import CLASHES, CONFLICT, Edit, pending_strokes
from pages.common import flash, frame_guard, owner
from storage.service import UserError
from ui.annotation import Draft, start_options
from ui.text import plain


def _rebase(edit: Edit, draft: Draft) -> None:
    newest = edit.svc.history(edit.dataset_id, edit.z)[-1]
    draft.rebase(edit.svc.mask(newest.id), newest.id, newest.kind)
    edit.keep(draft)
    st.session_state.pop(CONFLICT, None)
    flash(f"Your changes now sit on v{newest.version}: look them over and save.", "info")


def _discard_and_open_latest(edit: Edit) -> None:
    edit.keep(edit.open_draft(start_options(edit.svc.history(edit.dataset_id, edit.z), [], edit.z)[0]))
    st.session_state.pop(CONFLICT, None)


def _keep_mine(edit: Edit, draft: Draft) -> None:
    pending_strokes(draft)
    key = (edit.dataset_id, edit.z)
    try:
        edit.svc.keep_draft(draft, owner(), replace=True)
    except UserError as exc:
        flash(f"Your changes could not be kept in the store ({plain(exc)}); they are still in this tab.", "error")
        return
    edit.kept_revision[key] = draft.revision
    st.session_state.get(CLASHES, {}).pop(key, None)


def _open_theirs(edit: Edit) -> None:
    key = (edit.dataset_id, edit.z)
    try:
        stored = edit.svc.stored_draft(edit.dataset_id, edit.z, owner())
    except UserError as exc:
        flash(f"The other tab's changes could not be opened: {plain(exc)}", "error")
        return
    st.session_state.get(CLASHES, {}).pop(key, None)
    if stored is None:  # (saved or discarded there meanwhile: a fresh edit of what is saved now)
        edit.drafts.pop(key, None)
        flash("The other tab's changes were saved or discarded meanwhile: this is the slice as saved now.", "info")
        return
    opened = edit.drafts[key] = Draft.from_stored(stored)
    edit.kept_revision[key] = opened.revision


# --- the panels --------------------------------------------------------------------------------------
def conflict_panel(edit: Edit, draft: Draft, history: list[MaskInfo]) -> bool:
    """When this draft's save met a newer version: the ways out. Returns whether it is in conflict."""
    in_conflict = st.session_state.get(CONFLICT) == draft.uid
    if in_conflict:
        newest = history[-1] if history else None
        with st.container(border=True):
            st.error(f"Not saved: slice {edit.z} now has **v{newest.version if newest else 0}**"
                     f"{' by ' + plain(newest.author) if newest and newest.author else ''}, saved after your edit "
                     f"began. Your {draft.changed_pixels:,} changed pixels are kept. Choose one:",
                     icon=":material/sync_problem:")
            c1, c2 = st.columns(2)
            c1.button(f"Move my changes onto v{newest.version if newest else 0} (then look and save)",
                      type="primary", on_click=_rebase, args=(edit, draft), key="rebase", width="stretch")
            c2.button(f"Discard my changes and open v{newest.version if newest else 0}",
                      on_click=_discard_and_open_latest, args=(edit,), key="discard_for_latest", width="stretch")
    return in_conflict


def clash_panel(edit: Edit, draft: Draft) -> bool:
    """When this tab's last keep met another tab's (or browser's) newer edit of the slice: which to keep.
    Nothing is overwritten until the user says so; this tab's changes stay on screen. Returns whether the
    slice is in such a clash."""
    clashes = st.session_state.get(CLASHES, {})
    clash = clashes.get((edit.dataset_id, edit.z))
    if clash is None:
        return False
    kept = [d for d in edit.svc.drafts_of(owner()) if (d.dataset_id, d.slice_index) == (edit.dataset_id, edit.z)]
    if not kept or kept[0].token == draft.kept_as:  # the other tab saved or discarded meanwhile: nothing to ask
        clashes.pop((edit.dataset_id, edit.z), None)
        return False
    with st.container(border=True, key="draft_clash"):
        st.warning(f"Another tab or browser where you are signed in has unsaved changes on slice {edit.z} "
                   f"({clash.changed_pixels:,} pixels, kept {clash.updated:%H:%M:%S} UTC), made after this tab last "
                   f"kept its own. Your {draft.changed_pixels:,} changed pixels here are not kept in the store "
                   "yet. Choose one:", icon=":material/tab_duplicate:")
        c1, c2 = st.columns(2)
        c1.button("Keep mine (the other tab's changes are dropped)", on_click=_keep_mine, args=(edit, draft),
                  key="clash_keep_mine", width="stretch")
        c2.button("Open the other tab's changes (mine here are dropped)", on_click=_open_theirs, args=(edit,),
                  key="clash_open_theirs", type="primary", width="stretch")
    return True


if __name__ == "__main__":  # run as a page of its own: only by Streamlit's folder mode, which this ends
    frame_guard()
