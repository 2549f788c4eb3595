"""Annotate: paint neuron, membrane or "unlabelled" on a slice over its current mask, and save the result as
a new version of the slice's mask. Edits are drafts kept in the browser session and, as the user paints,
in the store (per user and slice) until saved or discarded: moving to another slice or page, reloading
or opening a new tab drops nothing (the pages warn about them, and leaving the tab before a stroke has
reached the server asks first)."""

from __future__ import annotations

import time

import streamlit as st
from streamlit_drawable_canvas import CanvasResult, st_canvas  # needs a running Streamlit: pages only

from pages.canvas_aids import live_overlay, room, window_room
from pages.common import can, dataset_picker, flash, leave_guard, owner, select_dataset, start_page, volume_or_stop
from storage.service import MaskConflict, UserError
from ui.annotation import Draft, StartOption, history_rows, start_options, trim_histories
from ui.figures import slice_strip
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
from ui.paint import IGNORE, MEMBRANE, NEURON, View, brush_color, png_data_url, slice_window, view_picture
from ui.prediction import compose
from ui.text import plain
from ui.training import checkpoint_label, default_checkpoint

svc = start_page("Annotate")
datasets = svc.datasets()
if not datasets:
    st.info("No datasets yet: load the demo dataset on the home page or upload a stack on **Datasets**.")
    st.page_link("pages/datasets.py", label="Go to Datasets", icon=":material/folder:")
    st.stop()

drafts: dict[tuple[int, int], Draft] = st.session_state.setdefault("drafts", {})
author = st.session_state.get("author", "")

dataset_id = dataset_picker(datasets, key="dataset_pick_annotate")  # (a key of its own on each page)
info = svc.dataset(dataset_id)
z_count, height, width = info.shape
volume = volume_or_stop(svc, dataset_id)


# --- which slice ----------------------------------------------------------------------------------
slice_key = f"annotate_slice_{dataset_id}"
positions: dict[int, int] = st.session_state.setdefault("slice_of", {})
if slice_key not in st.session_state:  # the URL's slice (a reload, a bookmark), else where this tab was
    try:
        asked = int(st.query_params.get("slice", ""))
    except ValueError:
        asked = None
    start = asked if asked is not None and 0 <= asked < z_count else positions.get(dataset_id, 0)
    st.session_state[slice_key] = min(start, z_count - 1)


def _step(delta: int) -> None:
    st.session_state[slice_key] = min(max(0, st.session_state[slice_key] + delta), z_count - 1)


def _go(dataset: int, z: int) -> None:
    select_dataset(dataset)
    st.session_state[f"annotate_slice_{dataset}"] = z


nav = st.columns([1, 10, 1], vertical_alignment="bottom")
nav[0].button("◀ Prev", on_click=_step, args=(-1,), disabled=st.session_state[slice_key] <= 0, key="prev_slice")
with nav[1]:
    z = st.slider("Slice", 0, z_count - 1, key=slice_key) if z_count > 1 else 0
nav[2].button("Next ▶", on_click=_step, args=(1,), disabled=z >= z_count - 1, key="next_slice")
positions[dataset_id] = z
if st.query_params.get("slice") != str(z):  # in the URL too: a reload or a bookmark opens this slice
    st.query_params["slice"] = str(z)

kinds = svc.slice_kinds(dataset_id)
strip = ["unsaved" if (d := drafts.get((dataset_id, i))) is not None and d.dirty
         else kinds[i].kind if i in kinds else "none" for i in range(z_count)]
st.plotly_chart(slice_strip(strip), key="slice_strip", config={"displayModeBar": False})

# --- the draft of this slice ----------------------------------------------------------------------
history = svc.history(dataset_id, z)  # (callbacks run before the page: this is current for the whole run)
options = start_options(history, svc.predictions(dataset_id=dataset_id), z)
latest = kinds.get(z)


def open_draft(option: StartOption) -> Draft:
    """A new edit of this slice from ``option``, kept in this session's drafts."""
    drafts[(dataset_id, z)] = fresh = Draft.begin(svc.draft_start(
        dataset_id, z, option.source, mask_id=option.mask_id, prediction_id=option.prediction_id))
    return fresh

draft = drafts.get((dataset_id, z))
request = st.session_state.get("start_request")  # "Correct this slice" on Predict
if request is not None and tuple(request[:2]) == (dataset_id, z):
    del st.session_state["start_request"]
    if draft is not None and draft.dirty:
        st.warning(f"This slice has {draft.changed_pixels:,} unsaved changed pixels: they are kept. Choose the "
                   "prediction under **Start from** to drop them and start from it.")
    else:
        draft = open_draft(StartOption("prediction", f"prediction #{request[2]}", None, request[2]))
kept_revision: dict[tuple[int, int], int] = st.session_state.setdefault("_kept_revision", {})
if draft is None:  # not edited in this session: an edit kept in the store (a reload, another tab) comes back
    stored = svc.stored_draft(dataset_id, z, owner())
    if stored is not None:
        draft = drafts[(dataset_id, z)] = Draft.from_stored(stored)
        kept_revision[(dataset_id, z)] = draft.revision
        st.session_state.setdefault("_restored", {})[draft.uid] = (f"Restored your unsaved changes on this slice "
                                                                   f"(kept {stored.updated:%Y-%m-%d %H:%M} UTC): save "
                                                                   "or discard them.")
if draft is None or (not draft.dirty and draft.latest_id != (latest.id if latest else None)):
    draft = open_draft(options[0])  # new, or saved elsewhere


restored_note = st.session_state.get("_restored", {}).get(draft.uid)
if restored_note and draft.dirty:
    st.info(restored_note, icon=":material/restore:")


def _keep(d: Draft) -> None:
    """Keep the draft in the store when it changed since it was last kept (or forget it once clean)."""
    key = (d.dataset_id, d.slice_index)
    if not can("annotate"):  # a viewer's canvas draws nothing
        return
    if kept_revision.get(key) != d.revision:
        try:
            svc.keep_draft(d, owner())
        except UserError as exc:
            st.error(f"Your changes could not be kept in the store ({exc}); they are still in this tab: save "
                     "them or keep the tab open.")
        else:
            kept_revision[key] = d.revision


def _pending_strokes(d: Draft) -> None:
    """Merge what the canvas sent with the click that runs a callback (callbacks run before the page)."""
    state = st.session_state.get(d.canvas_key)
    data = ((state or {}).get("drawing") or {}).get("data") if isinstance(state, dict) else None
    if data:
        d.apply(CanvasResult(None, data, return_image_data=True).image_data)


def _start_from(index: int) -> None:
    _keep(open_draft(options[index]))


def _save() -> None:
    _pending_strokes(draft)
    if not draft.dirty:
        flash("Nothing to save: paint on the slice first.", "info")
        return
    changed = draft.changed_pixels
    try:
        saved = svc.save_draft(draft, st.session_state.get("author", ""), owner=owner())
    except MaskConflict as exc:
        st.session_state["conflict"] = draft.uid
        flash(f"Not saved: {exc}. Your changes are kept.", "error")
    except UserError as exc:
        flash(f"Not saved: {exc}. Your changes are kept.", "error")
    else:
        st.session_state.pop("conflict", None)
        kept_revision[(dataset_id, z)] = draft.revision
        st.session_state["last_saved"] = (draft.uid, f"Saved slice {z} as **v{saved.version}** ({saved.kind}, "
                                          f"{changed:,} pixels changed) at {saved.created:%H:%M:%S}.")


def _rebase() -> None:
    newest = svc.history(dataset_id, z)[-1]
    draft.rebase(svc.mask(newest.id), newest.id, newest.kind)
    _keep(draft)
    st.session_state.pop("conflict", None)
    flash(f"Your changes now sit on v{newest.version}: look them over and save.", "info")


def _discard() -> None:
    draft.discard()
    _keep(draft)
    st.session_state.pop("conflict", None)


def _discard_and_open_latest() -> None:
    _keep(open_draft(start_options(svc.history(dataset_id, z), [], z)[0]))
    st.session_state.pop("conflict", None)


def _undo(forward: bool = False) -> None:
    _pending_strokes(draft)  # (a stroke the canvas sent with this click is a change to undo too)
    if draft.redo() if forward else draft.undo():
        _keep(draft)


def _restore(mask_id: int) -> None:
    try:
        restored = svc.restore(mask_id, st.session_state.get("author", ""))
    except UserError as exc:
        flash(f"Not restored: {exc}", "error")
        return
    drafts.pop((dataset_id, z), None)
    old = next((m.version for m in svc.history(dataset_id, z) if m.id == mask_id), "?")
    flash(f"Restored v{old} as v{restored.version}.")


in_conflict = st.session_state.get("conflict") == draft.uid
if in_conflict:
    newest = history[-1] if history else None
    with st.container(border=True):
        st.error(f"Not saved: slice {z} now has **v{newest.version if newest else 0}**"
                 f"{' by ' + plain(newest.author) if newest and newest.author else ''}, saved after your edit began. "
                 f"Your {draft.changed_pixels:,} changed pixels are kept. Choose one:", icon=":material/sync_problem:")
        c1, c2 = st.columns(2)
        c1.button(f"Move my changes onto v{newest.version if newest else 0} (then look and save)", type="primary",
                  on_click=_rebase, key="rebase", width="stretch")
        c2.button(f"Discard my changes and open v{newest.version if newest else 0}", on_click=_discard_and_open_latest,
                  key="discard_for_latest", width="stretch")

current = next((i for i, o in enumerate(options) if o.source == draft.source and o.mask_id == draft.source_mask_id
                and (o.prediction_id == draft.prediction_id or o.source != "prediction")), None)
if current is None:  # the edit started from something no longer offered first (an older version, a prediction)
    started = (f"prediction #{draft.prediction_id}" if draft.prediction_id is not None else
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
        st.warning(f"Starting from {options[choice].label} drops the {draft.changed_pixels:,} pixels you changed on "
                   "this slice.")
        st.button(f"Discard my changes and start from {options[choice].label}", on_click=_start_from,
                  args=(choice,))
    else:
        _start_from(choice)
        st.rerun()

# --- tools ----------------------------------------------------------------------------------------
tools = st.columns([3, 3, 3, 3])
# The tools keep their settings through visits to other pages (Streamlit forgets a widget's state once a
# run leaves it out): each is kept under a key of its own and given back here. Predict's "Open" of an
# error sets the zoom and the region before this runs.
TOOL_DEFAULTS = {"annotate_tool": NEURON, "annotate_brush": 5, "annotate_opacity": 0.35, "annotate_zoom": 1,
                 "annotate_cy": 50, "annotate_cx": 50}
for key, default in TOOL_DEFAULTS.items():
    if key not in st.session_state:
        st.session_state[key] = st.session_state.get(f"_kept_{key}", default)
tool = tools[0].radio("Paint", [NEURON, MEMBRANE, IGNORE], key="annotate_tool",
                      format_func={NEURON: ":blue[**Neuron**] (cyan)", MEMBRANE: ":red[**Membrane**] (red)",
                                   IGNORE: ":orange[**Unlabelled**] (erase to unknown)"}.get)
brush = tools[1].slider("Brush size (image pixels)", 1, 40, key="annotate_brush")
opacity = tools[1].slider("Mask opacity", 0.0, 1.0, step=0.05, key="annotate_opacity")
zoom = tools[2].select_slider("Zoom", [1, 2, 4, 8], key="annotate_zoom",
                              help="Show a region larger, for fine membranes. Your strokes are kept when you move.")
centre = (0.5, 0.5)
if zoom > 1:
    centre = (tools[3].slider("Region: down (%)", 0, 100, key="annotate_cy") / 100,
              tools[3].slider("Region: across (%)", 0, 100, key="annotate_cx") / 100)
else:
    tools[3].caption("Undo and Redo (under the canvas) step through every change of this edit, across zoom, "
                     "opacity and Accept. Unlabelled pixels are ignored by training, so a few strokes on nothing "
                     "are already training data.")

for key in TOOL_DEFAULTS:
    if key in st.session_state:
        st.session_state[f"_kept_{key}"] = st.session_state[key]
room_w, room_h = room()  # (the frame has the browser say it)
view = View.fit((height, width), zoom, centre, target=max(384, min(room_w, 2048)))  # as wide as the page
last_canvas = st.session_state.get("_canvas_rendered")
if last_canvas != (draft.canvas_key, st.session_state.get("_script_runs", 0) - 1):
    draft.remount()  # the canvas was not on screen in the last run: its strokes are gone from it, bake them
elif view != draft.view:
    _pending_strokes(draft)
draft.set_view(view)  # a new view bakes the strokes so far and starts an empty canvas over it
cache = st.session_state.setdefault("_background", {})
bg_key = (draft.uid, draft.generation, opacity, view, dataset_id, z)
if cache.get("key") != bg_key:  # read and encode once per canvas and opacity, not on every stroke
    contrast = slice_window(volume, z)  # only the view's region is read, from the pyramid when shrunk
    cache["key"], cache["url"] = bg_key, png_data_url(view_picture(volume, z, view, draft.view_base, opacity,
                                                                   contrast))

display_h, display_w = view.display_shape
st.caption(f"Painting **{ {NEURON: 'neuron', MEMBRANE: 'membrane', IGNORE: 'unlabelled'}[tool]}** with a "
           f"{brush}-pixel brush · slice {z}: {width} × {height} pixels" + (
    f", showing rows {view.y0}–{view.y0 + view.h - 1} and columns {view.x0}–{view.x0 + view.w - 1}"
    if zoom > 1 else "") + f" at {view.describe()} · cyan: neuron, red: membrane, no tint: unlabelled")
if can("annotate"):
    result = st_canvas(stroke_width=max(1, round(brush * view.ratio)), stroke_color=brush_color(tool),
                       background_image=cache["url"], height=display_h, width=display_w, drawing_mode="freedraw",
                       return_image_data=True, key=draft.canvas_key, max_display_height=max(480, room_h - 120),
                       update_streamlit=True)
    draft.apply(result.image_data)
else:  # a viewer sees the slice and its mask, with nothing to paint on
    st.image(cache["url"], width=display_w, caption="View only: your role cannot paint or save masks.")
_keep(draft)  # every change goes to the store: a reload or a new tab finds it
trim_histories(list(drafts.values()), draft)  # (a session's undo stays within its memory budget)
st.session_state["_canvas_rendered"] = (draft.canvas_key, st.session_state.get("_script_runs", 0))

# --- save -----------------------------------------------------------------------------------------
actions = st.columns([2, 2, 1, 1, 6], vertical_alignment="center")
actions[0].button("Save version", type="primary", on_click=_save, key="save_mask",
                  disabled=in_conflict or not can("annotate"))
actions[1].button("Discard changes", on_click=_discard, disabled=not draft.dirty or in_conflict, key="discard_mask")
actions[2].button("Undo", icon=":material/undo:", on_click=_undo, key="undo_edit", disabled=not draft.can_undo,
                  help="Take back the last change of this edit: a stroke, an Accept, a Discard (kept across zoom "
                       "and opacity changes and visits to other slices, until you save).")
actions[3].button("Redo", icon=":material/redo:", on_click=_undo, args=(True,), key="redo_edit",
                  disabled=not draft.can_redo)
last_saved = st.session_state.get("last_saved")
if draft.dirty:
    actions[4].markdown(f"**Unsaved: {draft.changed_pixels:,} pixels changed** (kept in the store) · will be saved "
                        f"as *{draft.kind}* by *{plain(author or 'anonymous')}*")
elif last_saved is not None and last_saved[0] == draft.uid:
    actions[4].success(last_saved[1], icon=":material/check:")
else:
    actions[4].markdown("No unsaved changes on this slice.")

# --- live: training that follows the annotator ---------------------------------------------------------
session = svc.live(dataset_id)
live_key = f"live_on_{dataset_id}"
if live_key not in st.session_state:  # a reload finds the session this user had on
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
            try:
                session, what = svc.live_start(dataset_id, None if start_id == SCRATCH else start_id, owner(),
                                               scratch=start_id == SCRATCH)
            except UserError as exc:
                st.error(f"Live could not start: {exc}")
            else:
                flash(f"Live session #{session.run_id} {what}.")
                st.rerun()
    elif want and session is not None:
        if owner() not in session.viewers:
            svc.live_start(dataset_id, None, owner())  # join it
        # (its status line is drawn by the view below, which refreshes: never older than the prediction)
        def _stop(run_id: int) -> None:
            try:
                svc.live_stop(run_id)
            except UserError as exc:
                flash(f"Live did not stop: {exc}", "error")
                return
            st.session_state[live_key] = False
            flash(f"Live session #{run_id} stops; it is a run now (Runs, Predict).")

        head[2].button("Stop (for everyone)", key="live_stop", on_click=_stop, args=(session.run_id,),
                       help="End the session: it keeps its checkpoints and becomes a run in Runs and Predict.")
    elif session is not None:
        if owner() in session.viewers:
            svc.live_leave(session.run_id, owner())  # turned off here: others may still watch it
        if session.run.cancel_requested:  # stopped: no use turning Live on for it
            head[1].caption(f"Live session #{session.run.id} is stopping: it saves its weights and becomes a run "
                            "(Runs, Predict). Turn Live on to start a new one.")
        else:
            head[1].caption(status_text(session, owner()) + " · turn Live on to see its predictions (it ends by "
                            "itself when nobody has watched it for 10 minutes)")
    else:
        head[1].caption("Off. Turn it on to fine-tune a model on this dataset while you annotate.")
    if not (want and session is not None):
        live_overlay(draft.canvas_key, None)  # (a prediction laid over the canvas earlier goes)

    if want and session is not None:
        shown_on = st.columns([2, 8], vertical_alignment="center")
        on_canvas = shown_on[0].toggle("On the canvas", key="live_on_canvas", value=True, disabled=not can("annotate"),
                                       help="Lay the live prediction over the slice you paint on (it lets every "
                                            "stroke through); off: show it as a picture under the canvas.")
        how = shown_on[1].radio("Show the prediction as", list(OVERLAYS), format_func=OVERLAYS.get, horizontal=True,
                                key="live_show")
        on_canvas = on_canvas and can("annotate")  # (a viewer has no canvas)

        def accept(region: tuple[int, int, int, int] | None) -> None:
            _pending_strokes(draft)
            seen = svc.live_prediction(session.run_id, z)
            if seen is None:
                flash("No live prediction of this slice yet: wait a few seconds.", "info")
                return
            asked = region
            region = predicted_region(seen, region)  # (only what the session has predicted)
            if region is not None and min(region[2:]) <= 0:
                flash("The live session has not predicted this part of the slice yet: wait a few seconds.", "info")
                return
            changed = draft.accept(predicted_mask(seen.probabilities), region)
            _keep(draft)
            only = (" (only the zoomed region: the rest of the slice has not been predicted yet)"
                    if region is not None and region != asked else "")
            flash(f"Took the live prediction (step {seen.step:,}) into your edit{only}: {changed:,} pixels changed. "
                  "Correct what is wrong, then save.")
            st.rerun()  # the whole page: the canvas shows the edit

        @st.fragment(run_every=REFRESH_S)
        def live_view() -> None:
            now = svc.live(dataset_id)  # the session as it is now: the status line and the picture agree
            st.caption(status_text(now, owner()) if now is not None else
                       f"Live session #{session.run_id} has ended: it is a run now (Runs, Predict).")
            told = st.session_state.get("_live_told")
            on_screen = (view.y0, view.x0, view.h, view.w) if zoom > 1 else None  # zoomed: that region first
            if told is None or told[:3] != (session.run_id, z, on_screen) or time.monotonic() - told[3] > 30:
                svc.live_see(session.run_id, owner(), z, on_screen)  # this slice (and its neighbours) next
                st.session_state["_live_told"] = (session.run_id, z, on_screen, time.monotonic())
            seen = svc.live_prediction(session.run_id, z)
            if seen is None:
                st.caption(f"Waiting for the first live prediction of slice {z} …")
                live_overlay(draft.canvas_key, None)
                return
            # the view's region only, every s-th pixel when the view shows the slice shrunk (never the whole slice)
            made = st.session_state.get("_live_picture")
            key = (session.run_id, z, seen.step, seen.masks_seen, view, how, opacity, on_canvas)
            if made is None or made[0] != key:  # encoded once per prediction and view, not every 2 s
                s = view.shrink
                region = (slice(view.y0, view.y0 + view.h, s), slice(view.x0, view.x0 + view.w, s))
                picture = overlay_picture(seen.probabilities[region], how, opacity)
                if not on_canvas:  # a picture of its own: the slice under it
                    grey, _ = compose(volume[(z, *region)], seen.probabilities[region], [], opacity)
                    picture = View(0, 0, *grey.shape[:2], view.scale, 1).render(under(grey, picture))
                made = st.session_state["_live_picture"] = (key, png_data_url(picture))
            if on_canvas:
                live_overlay(draft.canvas_key, made[1], stamp=str(seen.step))
                st.caption(prediction_caption(seen) + " · on the canvas (" + OVERLAYS[how] + ")")
            else:
                live_overlay(draft.canvas_key, None)
                st.image(made[1], caption=prediction_caption(seen), width=min(display_w, 900))

        live_view()
        # outside the fragment that refreshes every 2 s: a click never lands on a button being redrawn
        buttons = st.columns(2)
        if buttons[0].button("Accept for the whole slice", key="live_accept_all",
                             help="Copy the newest live prediction into your edit (your own strokes stay)."):
            accept(None)
        if zoom > 1 and buttons[1].button("Accept in the zoomed region", key="live_accept_region"):
            accept((view.y0, view.x0, view.h, view.w))

others = sorted({(d.dataset_id, d.slice_index) for key, d in drafts.items() if d.dirty and key != (dataset_id, z)}
                | {(d.dataset_id, d.slice_index) for d in svc.drafts_of(owner())
                   if (d.dataset_id, d.slice_index) != (dataset_id, z)})
if others:
    st.warning("Unsaved changes are also waiting on " + ", ".join(
        f"slice {oz}" + ("" if ods == dataset_id else f" of dataset #{ods}") for ods, oz in others)
        + ". They are kept until you save or discard them.")
    go_cols = st.columns(min(len(others), 6))
    for col, (ods, oz) in zip(go_cols, others[:6], strict=False):
        col.button(f"Go to slice {oz}" + ("" if ods == dataset_id else f" (#{ods})"), on_click=_go,
                   args=(ods, oz), key=f"go_{ods}_{oz}")

# --- history --------------------------------------------------------------------------------------
st.subheader(f"Versions of slice {z}")
if not history:
    st.caption("No saved version yet.")
else:
    by_id = {m.id: m for m in history}
    st.dataframe(history_rows(history), hide_index=True, key="history_table")
    if len(history) > 1:
        older = [m for m in reversed(history[:-1])]
        cols = st.columns([3, 2], vertical_alignment="bottom")
        pick = cols[0].selectbox("An older version", [m.id for m in older], key=f"restore_pick_{dataset_id}_{z}",
                                 format_func=lambda i: f"v{by_id[i].version} · {by_id[i].kind} · "
                                                       f"{by_id[i].author or 'anonymous'}")
        cols[1].button("Restore it as a new version", on_click=_restore, args=(pick,),
                       disabled=draft.dirty or not can("annotate"),
                       key="restore", help="Save or discard your changes first." if draft.dirty else None)

leave_guard(armed=True)  # after the strokes of this run are kept: see pages.common.leave_guard
window_room()  # last: this run has read its URL (?slice=) before a report of the room reruns it
