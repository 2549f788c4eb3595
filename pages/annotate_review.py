"""Where to work next, on the Annotate page (issue 29): **Next to fix** (key N) takes the best item of the
dataset's queue, shared by everyone on it, and opens its slice zoomed in on its region, with the object tools
acting on the prediction it was ranked from. The edit starts from the slice's latest version where there is one
(what anyone saved there stays), else from that prediction; the queue's panel shows what is open,
who took what, and what was done. The ranking is :mod:`storage.review.worklist`."""

from __future__ import annotations

import streamlit as st

import pages.state as state
from domain.review import WorkItemInfo
from pages.common import data_table, flash, frame_guard
from storage.service import Neuroseg, UserError
from ui.prediction import focus
from ui.text import plain

TAKEN = "_annotate_work_item"  # the item this tab took last: its region is said above the canvas


def _next(svc: Neuroseg, dataset_id: int, shape: tuple[int, int]) -> None:
    try:
        item = svc.next_work(dataset_id, state.author())
    except UserError as exc:
        flash(f"Next to fix: {plain(exc)}", "warning")
        return
    if item is None:
        flash("The queue is empty: **Rank again** below once there is a prediction or a live session.", "info")
        return
    y0, x0, h, w = item.box
    state.focus_annotate(*focus([y0, x0, y0 + h, x0 + w], shape))
    state.open_annotate_at(dataset_id, item.slice_index)
    prediction_id = item.prediction_id
    open_draft = state.drafts().get((dataset_id, item.slice_index))
    if prediction_id is not None and (open_draft is None or open_draft.prediction_id != prediction_id):
        # the saved labels stay (and unsaved changes: see pages.annotate_panels.current_draft)
        state.request_start(dataset_id, item.slice_index, prediction_id, keep_saved=True)
    st.session_state[TAKEN] = item


def next_button(svc: Neuroseg, dataset_id: int, shape: tuple[int, int], z: int) -> None:
    """The Next button, and what the item it took is about (on that item's slice)."""
    st.button("Next to fix", key="next_work", shortcut="N", type="primary", on_click=_next,
              args=(svc, dataset_id, shape), help="The best place to correct next on this dataset (its shared queue: "
                                                  "the prediction's uncertainty, suspicious neurons, slices nobody "
                                                  "corrected), opened zoomed in.")
    item: WorkItemInfo | None = st.session_state.get(TAKEN)
    if item is not None and (item.dataset_id, item.slice_index) == (dataset_id, z):
        y0, x0, h, w = item.box
        st.caption(f"To fix: slice {item.slice_index}, rows {y0}–{y0 + h - 1}, columns {x0}–{x0 + w - 1} "
                   f"({item.reasons}). Saving the slice marks it done.")


def _rank(svc: Neuroseg, dataset_id: int) -> None:
    try:
        ranked = svc.rank_work(dataset_id)
    except UserError as exc:
        flash(f"Rank again: {plain(exc)}", "warning")
    else:
        flash(f"The queue holds {len(ranked.open)} place(s) to look at.", "success")


def queue_panel(svc: Neuroseg, dataset_id: int) -> None:
    """The dataset's queue: open items best first, who took them, and what was done."""
    work = svc.work_list(dataset_id)
    with st.expander(f"Where to work next: {len(work.open)} open, {len(work.done)} done (shared by everyone on "
                     "this dataset)"):
        st.button("Rank again", key="rank_work", on_click=_rank, args=(svc, dataset_id),
                  help="Rank the slices and regions again from the newest prediction, the live session's "
                       "predictions and the masks saved since.")
        if work.ranked is not None:
            st.caption(f"Ranked {work.ranked:%Y-%m-%d %H:%M} UTC. A region's score adds the uncertainty of the "
                       "few neurons a correction there would touch (its three most doubtful, per pixel of the "
                       "region), the share of it that suspicious neurons cover, and a bonus for a slice nobody "
                       "corrected.")
        if work.open:
            data_table([{"slice": i.slice_index, "region (y, x, h, w)": ", ".join(map(str, i.box)),
                           "score": round(i.score, 3), "why": i.reasons, "from": i.source or "—",
                           "taken by": i.taken_by or ""} for i in work.open[:50]],
                         hide_index=True, key="work_open")
        if work.done:
            st.markdown("**Done**")
            versions = {m.id: m.version for z in {i.slice_index for i in work.done} for m in svc.history(dataset_id, z)}
            data_table([{"slice": i.slice_index, "region (y, x, h, w)": ", ".join(map(str, i.box)),
                         "done by": i.done_by, "when": f"{i.done_at:%Y-%m-%d %H:%M}",
                         "saved as": f"v{versions[i.mask_version_id]}" if i.mask_version_id in versions else "—"}
                        for i in work.done], hide_index=True, key="work_done")


if __name__ == "__main__":  # run as a page of its own: only by Streamlit's folder mode, which this ends
    frame_guard()
