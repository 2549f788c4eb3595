"""The panels of the Annotate page, each a function of what it needs: the slice picker, the edit of a slice
(:class:`Edit`: its draft opened, restored and kept in the store), the conflict and "Start from" choices,
the save bar, the other slices' unsaved edits and the history. Their callbacks get what they act on as
arguments. The tools and the canvas are in :mod:`pages.annotate_canvas`, the live panel in
:mod:`pages.annotate_live`."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

import pages.state as state
from domain.records import MaskInfo
from pages.common import attempt, can, data_table, flash, frame_guard, owner, select_dataset
from storage.service import DraftClash, MaskConflict, Neuroseg, UserError
from ui.annotation import Draft, StartOption, history_rows
from ui.figures import slice_strip
from ui.text import plain

# this module's own keys
CONFLICT = "conflict"  # the uid of the draft whose save met a newer version
LAST_SAVED = "last_saved"  # (draft uid, what its save made)
KEPT_REVISION = "_kept_revision"  # the revision of each draft last kept in the store
RESTORED = "_restored"  # draft uid -> the note that its changes came back from the store
CLASHES = "_draft_clashes"  # (dataset, slice) -> the DraftClash this tab's last keep met


def _step(slice_key: str, delta: int, z_count: int) -> None:
    st.session_state[slice_key] = min(max(0, st.session_state[slice_key] + delta), z_count - 1)


def slice_picker(svc: Neuroseg, dataset_id: int, z_count: int,
                 drafts: dict[tuple[int, int], Draft]) -> tuple[int, dict[int, MaskInfo]]:
    """Prev, Next and a slider (first the URL's ``?slice=`` or where this tab was), and a strip of what each
    slice holds; returns the slice and each slice's latest mask."""
    slice_key = state.annotate_slice_key(dataset_id)
    positions = state.slice_positions()
    if slice_key not in st.session_state:  # the URL's slice (a reload, a bookmark), else where this tab was
        try:
            asked = int(st.query_params.get("slice", ""))
        except ValueError:
            asked = None
        start = asked if asked is not None and 0 <= asked < z_count else positions.get(dataset_id, 0)
        st.session_state[slice_key] = min(start, z_count - 1)
    elif state.late_run() and dataset_id in positions:  # (the slider came back at 0: where this tab was)
        st.session_state[slice_key] = min(positions[dataset_id], z_count - 1)

    nav = st.columns([1, 10, 1], vertical_alignment="bottom")
    nav[0].button("◀ Prev", on_click=_step, args=(slice_key, -1, z_count), disabled=st.session_state[slice_key] <= 0,
                  key="prev_slice")
    with nav[1]:
        z = st.slider("Slice", 0, z_count - 1, key=slice_key) if z_count > 1 else 0
    nav[2].button("Next ▶", on_click=_step, args=(slice_key, 1, z_count), disabled=z >= z_count - 1, key="next_slice")
    positions[dataset_id] = z
    # in the URL too: a reload or a bookmark opens this slice (slice 0 of a first visit is not written: each
    # write is one more step of the browser's Back)
    if st.query_params.get("slice") != str(z) and ("slice" in st.query_params or z != 0):
        st.query_params["slice"] = str(z)

    kinds = svc.slice_kinds(dataset_id)
    strip = ["unsaved" if (d := drafts.get((dataset_id, i))) is not None and d.dirty
             else kinds[i].kind if i in kinds else "none" for i in range(z_count)]
    st.plotly_chart(slice_strip(strip), key="slice_strip", config={"displayModeBar": False})
    return z, kinds


@dataclass
class Edit:
    """The slice being edited, with what its panels and callbacks act on: the service, this session's
    drafts, and the revision of each draft last kept in the store."""

    svc: Neuroseg
    dataset_id: int
    z: int
    drafts: dict[tuple[int, int], Draft]
    kept_revision: dict[tuple[int, int], int]

    @classmethod
    def of(cls, svc: Neuroseg, dataset_id: int, z: int) -> Edit:
        return cls(svc, dataset_id, z, state.drafts(), st.session_state.setdefault(KEPT_REVISION, {}))

    def open_draft(self, option: StartOption) -> Draft:
        """A new edit of this slice from ``option``, kept in this session's drafts (in the store over the edit
        it replaces: this tab's own, not another tab's)."""
        replaced = self.drafts.get((self.dataset_id, self.z))
        self.drafts[(self.dataset_id, self.z)] = fresh = Draft.begin(self.svc.draft_start(
            self.dataset_id, self.z, option.source, mask_id=option.mask_id, prediction_id=option.prediction_id))
        fresh.kept_as = replaced.kept_as if replaced is not None else ""
        return fresh

    def keep(self, d: Draft) -> None:
        """Keep the draft in the store when it changed since it was last kept (or forget it once clean)."""
        key = (d.dataset_id, d.slice_index)
        if not can("annotate"):  # a viewer's canvas draws nothing
            return
        clashes = st.session_state.setdefault(CLASHES, {})
        if self.kept_revision.get(key) != d.revision:
            try:
                self.svc.keep_draft(d, owner())
            except DraftClash as exc:  # (another tab's newer edit is not overwritten: clash_panel asks)
                clashes[key] = exc
            except UserError as exc:
                st.error(f"Your changes could not be kept in the store ({plain(exc)}); they are still in this tab: "
                         "save them or keep the tab open.")
            else:
                self.kept_revision[key] = d.revision
                clashes.pop(key, None)


def current_draft(edit: Edit, options: list[StartOption], latest: MaskInfo | None) -> Draft:
    """This slice's draft: the one of this session, else an edit kept in the store (a reload, another tab),
    then the start that Predict or Next to fix asked for unless the draft holds unsaved changes, else a new
    one from the first option (also when the slice was saved elsewhere meanwhile). A draft opened here on
    its own has nothing to keep yet: it never erases an edit kept in the store by another tab."""
    dataset_id, z = edit.dataset_id, edit.z
    key = (dataset_id, z)
    draft = edit.drafts.get(key)
    requested = state.start_request(dataset_id, z)  # "Correct this slice" on Predict, Next to fix
    if draft is None or (requested is not None and not draft.dirty):
        stored = edit.svc.stored_draft(dataset_id, z, owner())  # (a reload, another tab: it comes back)
        if stored is not None:
            draft = edit.drafts[key] = Draft.from_stored(stored)
            edit.kept_revision[key] = draft.revision
            st.session_state.setdefault(RESTORED, {})[draft.uid] = (
                f"Restored your unsaved changes on this slice (kept {stored.updated:%Y-%m-%d %H:%M} UTC): save "
                "or discard them.")
    if requested is not None:
        draft = _requested(edit, draft, latest, *requested)
    if draft is None or (not draft.dirty and draft.latest_id != (latest.id if latest else None)):
        draft = edit.open_draft(options[0])  # new, or saved elsewhere
        edit.kept_revision[key] = draft.revision
    restored_note = st.session_state.get(RESTORED, {}).get(draft.uid)
    if restored_note and draft.dirty:
        st.info(restored_note, icon=":material/restore:")
    return draft


def _requested(edit: Edit, draft: Draft | None, latest: MaskInfo | None, prediction_id: int,
               keep_saved: bool) -> Draft | None:
    """The start asked for by Predict or Next to fix, unless ``draft`` holds unsaved changes (they are kept,
    and Next's prediction is lent to their object tools)."""
    if draft is not None and draft.dirty:
        if keep_saved and draft.source != "prediction" and draft.prediction_id is None:
            draft.prediction_id = prediction_id  # (changes no pixel: the tools act on the item's prediction)
            said = (f"Your {draft.changed_pixels:,} unsaved changed pixels on this slice are kept; the object tools "
                    f"act on prediction #{prediction_id}.")
        else:
            said = (f"Prediction #{prediction_id} was not opened: this slice has {draft.changed_pixels:,} unsaved "
                    "changed pixels, and they are kept. Save or discard them first to start from the prediction "
                    "(**Start from**).")
        notes = st.session_state.setdefault(RESTORED, {})  # (shown with the draft while it is unsaved: the
        notes[draft.uid] = f"{notes[draft.uid]} {said}" if draft.uid in notes else said  # page reruns at once)
        return draft
    option = (StartOption("latest", f"latest version (v{latest.version}, {latest.kind})", latest.id, prediction_id)
              if keep_saved and latest is not None else
              StartOption("prediction", f"prediction #{prediction_id}", None, prediction_id))
    try:
        fresh = edit.open_draft(option)
    except (UserError, ValueError, LookupError) as exc:  # (the prediction was deleted meanwhile, say)
        st.warning(f"Could not start from prediction #{prediction_id}: {plain(exc)}")
        return draft
    edit.kept_revision[(edit.dataset_id, edit.z)] = fresh.revision  # (nothing to keep yet)
    return fresh


def pending_strokes(d: Draft) -> None:
    """Merge what the canvas sent with the click that runs a callback (callbacks run before the page)."""
    data = canvas_data(d.canvas_key)
    if data:
        d.apply_canvas(data)


def canvas_data(key: str) -> object:
    """What the canvas ``key`` sent last (its strokes as a PNG data URL), as the browser sent it: nothing here
    trusts its shape."""
    canvas = st.session_state.get(key)
    drawing = canvas.get("drawing") if isinstance(canvas, dict) else None
    return drawing.get("data") if isinstance(drawing, dict) else None


# --- the callbacks of the edit ---------------------------------------------------------------------------
def _start_from(edit: Edit, option: StartOption) -> None:
    edit.keep(edit.open_draft(option))


def _save(edit: Edit, draft: Draft) -> None:
    pending_strokes(draft)
    if not draft.dirty:
        flash("Nothing to save: paint on the slice first.", "info")
        return
    changed = draft.changed_pixels
    try:
        saved = edit.svc.save_draft(draft, state.author(), owner=owner())
    except MaskConflict as exc:  # (the conflict panel offers the ways out)
        st.session_state[CONFLICT] = draft.uid
        flash(f"Not saved: {plain(exc)}. Your changes are kept.", "error")
    except UserError as exc:
        flash(f"Not saved: {plain(exc)}. Your changes are kept.", "error")
    else:
        st.session_state.pop(CONFLICT, None)
        st.session_state.get(CLASHES, {}).pop((edit.dataset_id, edit.z), None)  # (the other tab's edit stays)
        edit.kept_revision[(edit.dataset_id, edit.z)] = draft.revision
        st.session_state[LAST_SAVED] = (draft.uid, f"Saved slice {edit.z} as **v{saved.version}** ({saved.kind}, "
                                        f"{changed:,} pixels changed) at {saved.created:%H:%M:%S}.")


def _discard(edit: Edit, draft: Draft) -> None:
    draft.discard()
    edit.keep(draft)
    st.session_state.pop(CONFLICT, None)


def _undo(edit: Edit, draft: Draft, forward: bool = False) -> None:
    pending_strokes(draft)  # (a stroke the canvas sent with this click is a change to undo too)
    if draft.redo() if forward else draft.undo():
        edit.keep(draft)


def _restore(edit: Edit, mask_id: int) -> None:
    def restored(made: MaskInfo) -> str:
        edit.drafts.pop((edit.dataset_id, edit.z), None)
        old = next((m.version for m in edit.svc.history(edit.dataset_id, edit.z) if m.id == mask_id), "?")
        return f"Restored v{old} as v{made.version}."

    attempt(lambda: edit.svc.restore(mask_id, state.author()), restored,
            failed=lambda exc: f"Not restored: {plain(exc)}", in_callback=True)


def _go(dataset: int, z: int) -> None:
    select_dataset(dataset)
    state.open_annotate_at(dataset, z)


# --- the panels --------------------------------------------------------------------------------------
def start_from_panel(edit: Edit, draft: Draft, options: list[StartOption], history: list[MaskInfo],
                     in_conflict: bool) -> None:
    """"Start from": what this edit started from, and the other starts this slice offers."""
    current = next((i for i, o in enumerate(options) if o.source == draft.source and o.mask_id == draft.source_mask_id
                    and (o.prediction_id == draft.prediction_id or o.source != "prediction")), None)
    if current is None:  # the edit started from something no longer offered first (an older version, a prediction)
        started = ((f"prediction #{draft.prediction_id}" if draft.prediction_id is not None else
                    "a prediction, since deleted") if draft.source == "prediction" else
                   next((f"v{m.version} ({m.kind})" for m in history if m.id == draft.source_mask_id),
                        "nothing (scribble)"))
        options = [StartOption(draft.source, f"what this edit started from: {started}", draft.source_mask_id,
                               draft.prediction_id), *options]
        current = 0
    choice = st.radio("Start from", range(len(options)), format_func=lambda i: options[i].label, index=current,
                      horizontal=True, key=f"start_{draft.uid}_{draft.source_mask_id}_{draft.prediction_id}",
                      disabled=in_conflict)
    if choice != current:
        if draft.dirty:
            st.warning(f"Starting from {options[choice].label} drops the {draft.changed_pixels:,} pixels you changed "
                       "on this slice.")
            st.button(f"Discard my changes and start from {options[choice].label}", on_click=_start_from,
                      args=(edit, options[choice]))
        else:
            _start_from(edit, options[choice])
            st.rerun()


def save_bar(edit: Edit, draft: Draft, in_conflict: bool) -> None:
    """Save, Discard, Undo, Redo, and what is unsaved (or was saved last)."""
    # (buttons as wide as their labels and shortcuts, in a row that wraps: fixed columns cut "Save version"
    # and hid Undo's and Redo's labels under their shortcuts on a laptop's width)
    row = st.container(horizontal=True, vertical_alignment="center")
    actions = [row, row, row, row, row]
    actions[0].button("Save version", type="primary", on_click=_save, args=(edit, draft), key="save_mask",
                      disabled=in_conflict or not can("annotate"), shortcut="Ctrl+S")
    actions[1].button("Discard changes", on_click=_discard, args=(edit, draft), disabled=not draft.dirty or in_conflict,
                      key="discard_mask")
    actions[2].button("Undo", icon=":material/undo:", on_click=_undo, args=(edit, draft), key="undo_edit",
                      disabled=not draft.can_undo, shortcut="Ctrl+Z",
                      help="Take back the last change of this edit: a stroke, an Accept, a Discard (kept across zoom "
                           "and opacity changes and visits to other slices, until you save).")
    actions[3].button("Redo", icon=":material/redo:", on_click=_undo, args=(edit, draft, True), key="redo_edit",
                      disabled=not draft.can_redo, shortcut="Ctrl+Shift+Z")
    last_saved = st.session_state.get(LAST_SAVED)
    if draft.dirty:
        kept = ("not kept in the store: see above" if (edit.dataset_id, edit.z) in st.session_state.get(CLASHES, {})
                else "kept in the store")
        actions[4].markdown(f"**Unsaved: {draft.changed_pixels:,} pixels changed** ({kept}) · will be "
                            f"saved as *{draft.kind}* by *{plain(state.author() or 'anonymous')}*")
    elif last_saved is not None and last_saved[0] == draft.uid:
        actions[4].success(last_saved[1], icon=":material/check:")
    else:
        actions[4].markdown("No unsaved changes on this slice.")


def other_drafts(edit: Edit) -> None:
    """The unsaved edits of other slices (this session's and those kept in the store), with a way to each."""
    dataset_id, z = edit.dataset_id, edit.z
    others = sorted({(d.dataset_id, d.slice_index) for key, d in edit.drafts.items()
                     if d.dirty and key != (dataset_id, z)}
                    | {(d.dataset_id, d.slice_index) for d in edit.svc.drafts_of(owner())
                       if (d.dataset_id, d.slice_index) != (dataset_id, z)})
    if others:
        st.warning("Unsaved changes are also waiting on " + ", ".join(
            f"slice {oz}" + ("" if ods == dataset_id else f" of dataset #{ods}") for ods, oz in others)
            + ". They are kept until you save or discard them.")
        go_cols = st.columns(min(len(others), 6))
        for col, (ods, oz) in zip(go_cols, others[:6], strict=False):
            col.button(f"Go to slice {oz}" + ("" if ods == dataset_id else f" (#{ods})"), on_click=_go,
                       args=(ods, oz), key=f"go_{ods}_{oz}")


def history_panel(edit: Edit, draft: Draft, history: list[MaskInfo]) -> None:
    """The saved versions of this slice, and the restore of an older one."""
    st.subheader(f"Versions of slice {edit.z}")
    if not history:
        st.caption("No saved version yet.")
        return
    by_id = {m.id: m for m in history}
    data_table(history_rows(history), hide_index=True, key="history_table")
    if len(history) > 1:
        older = [m for m in reversed(history[:-1])]
        cols = st.columns([3, 2], vertical_alignment="bottom")
        pick = cols[0].selectbox("An older version", [m.id for m in older],
                                 key=f"restore_pick_{edit.dataset_id}_{edit.z}",
                                 format_func=lambda i: f"v{by_id[i].version} · {by_id[i].kind} · "
                                                       f"{by_id[i].author or 'anonymous'}")
        cols[1].button("Restore it as a new version", on_click=_restore, args=(edit, pick),
                       disabled=draft.dirty or not can("annotate"),
                       key="restore", help="Save or discard your changes first." if draft.dirty else None)


if __name__ == "__main__":  # run as a page of its own: only by Streamlit's folder mode, which this ends
    frame_guard()
