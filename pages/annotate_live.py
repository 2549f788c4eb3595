"""The live panel of the Annotate page: training that follows the annotator. Turn it on to start (or join)
a live session on the dataset; its newest prediction of the slice is shown on the canvas or under it,
refreshed every few seconds, and can be taken into the edit (the whole slice, or the zoomed region)."""

from __future__ import annotations

import time

import numpy as np
import streamlit as st

import pages.state as state
from domain.live import LiveInfo
from pages.annotate_canvas import CANVAS_RENDERED, Tools
from pages.annotate_panels import Edit, pending_strokes
from pages.canvas_aids import live_overlay
from pages.common import attempt, can, flash, frame_guard, owner, still_signed_in
from storage.service import Neuroseg, UserError
from ui.annotation import Draft
from ui.live import (
    OVERLAYS,
    REFRESH_S,
    SCRATCH,
    overlay_picture,
    predicted_mask,
    predicted_region,
    prediction_caption,
    status_text,
    under,
)
from ui.paint import View, png_data_url
from ui.prediction import compose
from ui.text import plain
from ui.training import checkpoint_label, default_checkpoint

# this panel's own keys
LIVE_TOLD = "_live_told"  # (run, slice, region, when): what the session was last told this tab looks at
LIVE_PICTURE = "_live_picture"  # (what it shows, its data URL): the live prediction encoded once


def _stop(svc: Neuroseg, live_key: str, run_id: int) -> None:
    def stopped(_) -> str:
        st.session_state[live_key] = False
        return f"Live session #{run_id} stops; it is a run now (Runs, Predict)."

    attempt(lambda: svc.live_stop(run_id), stopped, failed=lambda exc: f"Live did not stop: {plain(exc)}",
            in_callback=True)


def _accept(edit: Edit, draft: Draft, run_id: int, region: tuple[int, int, int, int] | None) -> None:
    """Take the newest live prediction of the slice (or of ``region``) into the edit."""
    pending_strokes(draft)
    seen = edit.svc.live_prediction(run_id, edit.z)
    if seen is None:
        flash("No live prediction of this slice yet: wait a few seconds.", "info")
        return
    asked = region
    region = predicted_region(seen, region)  # (only what the session has predicted)
    if region is not None and min(region[2:]) <= 0:
        flash("The live session has not predicted this part of the slice yet: wait a few seconds.", "info")
        return
    changed = draft.accept(predicted_mask(seen.probabilities), region)
    edit.keep(draft)
    only = (" (only the zoomed region: the rest of the slice has not been predicted yet)"
            if region is not None and region != asked else "")
    flash(f"Took the live prediction (step {seen.step:,}) into your edit{only}: {changed:,} pixels changed. "
          "Correct what is wrong, then save.")
    st.rerun()  # the whole page: the canvas shows the edit


def live_panel(edit: Edit, draft: Draft, volume: np.ndarray, view: View, tools: Tools) -> None:
    """The Live toggle, the start (or join, or leave) of the dataset's live session, and, while it is on,
    its prediction of this slice with the buttons that take it into the edit."""
    svc, dataset_id = edit.svc, edit.dataset_id
    session = svc.live(dataset_id)
    live_key = f"live_on_{dataset_id}"
    # a reload finds the session this user had on, and so does a late run (its toggle came back off)
    if live_key not in st.session_state or state.late_run():
        st.session_state[live_key] = session is not None and owner() in session.viewers
    with st.container(border=True, key="live_panel"):
        head = st.columns([2, 5, 3], vertical_alignment="center")
        want = head[0].toggle("Live", key=live_key, disabled=not can("train"),
                              help="Train in the background while you annotate: every version "
                              "you save is learned within seconds, and this slice is predicted again and again.")
        if want and session is None:
            checkpoints = {c.id: c for c in svc.checkpoint_choices()}
            ids = [*checkpoints, SCRATCH]
            first = default_checkpoint(list(checkpoints.values()), svc.runs(), dataset_id,
                                       svc.default_model(dataset_id))
            start_id = head[1].selectbox(
                "Start from", ids, index=ids.index(first) if first in ids else 0, key=f"live_start_{dataset_id}",
                format_func=lambda i: "random initialisation (a forest of your strokes teaches it)" if i == SCRATCH
                else checkpoint_label(checkpoints[i]),
                help="A trained model predicts well from the first second and learns your corrections. From random "
                     "initialisation the network learns only from what you paint; until it knows better, a random "
                     "forest trained on your strokes (as in ilastik) answers for the pixels nobody painted.")
            if head[2].button("Start live session", type="primary", key="live_go"):
                attempt(lambda: svc.live_start(dataset_id, None if start_id == SCRATCH else start_id, owner(),
                                               scratch=start_id == SCRATCH),
                        lambda started: f"Live session #{started[0].run_id} {started[1]}.",
                        failed=lambda exc: f"Live could not start: {plain(exc)}")
        elif want and session is not None:
            if owner() not in session.viewers:
                svc.live_start(dataset_id, None, owner())  # join it
            # (its status line is drawn by the view below, which refreshes: never older than the prediction)
            head[2].button("Stop (for everyone)", key="live_stop", on_click=_stop, args=(svc, live_key, session.run_id),
                           help="End the session: it keeps its checkpoints and becomes a run in Runs and Predict.")
        elif session is not None:
            if owner() in session.viewers:
                svc.live_leave(session.run_id, owner())  # turned off here: others may still watch it
            if session.run.cancel_requested:  # stopped: no use turning Live on for it
                head[1].caption(f"Live session #{session.run.id} is stopping: it saves its weights and becomes a "
                                "run (Runs, Predict). Turn Live on to start a new one.")
            else:
                head[1].caption(status_text(session, owner()) + " · turn Live on to see its predictions (it ends by "
                                "itself when nobody has watched it for 10 minutes)")
        else:
            head[1].caption("Off. Turn it on to fine-tune a model on this dataset while you annotate.")
        if not (want and session is not None):
            live_overlay(_canvas_shown(draft), None)  # (a prediction laid over the canvas earlier goes)

        if want and session is not None:
            _live_prediction(edit, draft, volume, view, tools, session)


def _canvas_shown(draft: Draft) -> str:
    """The key of the canvas on screen: the brush's (``draft.canvas_key``), or an object tool's, which is
    keyed after it (the overlay laid on the brush's canvas only was gone once a tool was picked)."""
    shown = st.session_state.get(CANVAS_RENDERED)
    return shown[0] if shown and str(shown[0]).startswith(draft.canvas_key) else draft.canvas_key


def _live_prediction(edit: Edit, draft: Draft, volume: np.ndarray, view: View, tools: Tools,
                     session: LiveInfo) -> None:
    """The session's newest prediction of this slice, refreshed every few seconds, and the Accept buttons."""
    svc, dataset_id, z, zoom, opacity = edit.svc, edit.dataset_id, edit.z, tools.zoom, tools.opacity
    display_w = view.display_shape[1]
    shown_on = st.columns([2, 8], vertical_alignment="center")
    state.widget_values({"live_on_canvas": True, "live_show": next(iter(OVERLAYS))})
    on_canvas = shown_on[0].toggle("On the canvas", key="live_on_canvas", disabled=not can("annotate"),
                                   help="Lay the live prediction over the slice you paint on (it lets every "
                                        "stroke through); off: show it as a picture under the canvas.")
    how = shown_on[1].radio("Show the prediction as", list(OVERLAYS), format_func=OVERLAYS.get, horizontal=True,
                            key="live_show")
    state.keep_values(["live_on_canvas", "live_show"])
    on_canvas = on_canvas and can("annotate")  # (a viewer has no canvas)

    @st.fragment(run_every=REFRESH_S)
    def live_view() -> None:
        if not still_signed_in("train"):  # (a role that may no longer train: said once, and nothing asked
            return  # of the store, so no refusal is written every 2 s)
        now = svc.live(dataset_id)  # the session as it is now: the status line and the picture agree
        st.caption(status_text(now, owner()) if now is not None else
                   f"Live session #{session.run_id} has ended: it is a run now (Runs, Predict).")
        told = st.session_state.get(LIVE_TOLD)
        on_screen = (view.y0, view.x0, view.h, view.w) if zoom > 1 else None  # zoomed: that region first
        if told is None or told[:3] != (session.run_id, z, on_screen) or time.monotonic() - told[3] > 30:
            try:
                svc.live_see(session.run_id, owner(), z, on_screen)  # this slice (and its neighbours) next
            except UserError as exc:  # (refused in between: the next refresh says why)
                st.warning(plain(exc))
                return
            st.session_state[LIVE_TOLD] = (session.run_id, z, on_screen, time.monotonic())
        seen = svc.live_prediction(session.run_id, z, uncertainty=how == "uncertainty")
        if seen is None:
            st.caption(f"Waiting for the first live prediction of slice {z} …")
            live_overlay(_canvas_shown(draft), None)
            return
        # the view's region only, every s-th pixel when the view shows the slice shrunk (never the whole slice)
        made = st.session_state.get(LIVE_PICTURE)
        key = (session.run_id, z, seen.step, seen.masks_seen, view, how, opacity, on_canvas)
        if made is None or made[0] != key:  # encoded once per prediction and view, not every 2 s
            s = view.shrink
            region = (slice(view.y0, view.y0 + view.h, s), slice(view.x0, view.x0 + view.w, s))
            doubt = seen.uncertainty[region] if seen.uncertainty is not None else None
            picture = overlay_picture(seen.probabilities[region], how, opacity, uncertainty=doubt)
            if not on_canvas:  # a picture of its own: the slice under it
                grey, _ = compose(volume[(z, *region)], seen.probabilities[region], [], opacity)
                picture = View(0, 0, *grey.shape[:2], view.scale, 1).render(under(grey, picture))
            made = st.session_state[LIVE_PICTURE] = (key, png_data_url(picture))
        if on_canvas:
            live_overlay(_canvas_shown(draft), made[1], stamp=str(seen.step))
            st.caption(prediction_caption(seen) + " · on the canvas (" + OVERLAYS[how] + ")")
        else:
            live_overlay(_canvas_shown(draft), None)
            st.image(made[1], caption=prediction_caption(seen), width=min(display_w, 900))

    live_view()
    # outside the fragment that refreshes every 2 s: a click never lands on a button being redrawn
    buttons = st.columns(2)
    if buttons[0].button("Accept for the whole slice", key="live_accept_all",
                         help="Copy the newest live prediction into your edit (your own strokes stay)."):
        _accept(edit, draft, session.run_id, None)
    if zoom > 1 and buttons[1].button("Accept in the zoomed region", key="live_accept_region"):
        _accept(edit, draft, session.run_id, (view.y0, view.x0, view.h, view.w))


if __name__ == "__main__":  # run as a page of its own: only by Streamlit's folder mode, which this ends
    frame_guard()
