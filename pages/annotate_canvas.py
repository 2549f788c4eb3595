"""The painting part of the Annotate page: the tools (class, brush, opacity, zoom and region, kept through
visits to other pages) and the canvas over the slice and its current mask, whose strokes go into the draft
and, on every change, into the store."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import streamlit as st
from streamlit_drawable_canvas import st_canvas  # needs a running Streamlit: pages only

import pages.state as state
from pages.annotate_objects import RESETS, Neurons, act
from pages.annotate_panels import Edit, canvas_data, pending_strokes
from pages.canvas_aids import room
from pages.common import can, frame_guard
from ui.annotation import Draft, trim_histories
from ui.paint import IGNORE, MEMBRANE, NEURON, View, brush_color, png_data_url, slice_window, view_picture
from ui.tools import BRUSH, SPLIT_LINE, TOOLS, click_points, line_points

BACKGROUND = "_background"  # the canvas's background picture, encoded once per view and opacity
CANVAS_RENDERED = "_canvas_rendered"  # (canvas key, run) of the canvas last on screen
CANVAS_SETTLED = "_canvas_settled"  # whether that canvas has sent its first state (see pages.common.leave_guard)
# The tools keep their settings through visits to other pages (Streamlit forgets a widget's state once a
# run leaves it out): each is kept under a key of its own and given back here. Predict's "Open" of an
# error sets the zoom and the region before this runs.
TOOL_DEFAULTS = {"annotate_tool": NEURON, "annotate_brush": 5, "annotate_opacity": 0.35, state.ZOOM: 1,
                 state.CENTRE_Y: 50, state.CENTRE_X: 50}


@dataclass(frozen=True)
class Tools:
    """What the tools are set to."""

    tool: int
    brush: int
    opacity: float
    zoom: int
    centre: tuple[float, float]


def tools_panel() -> Tools:
    """The tools, given back their settings from the last visit."""
    tools = st.columns([3, 3, 3, 3])
    state.widget_values(TOOL_DEFAULTS)
    tool = tools[0].radio("Paint", [NEURON, MEMBRANE, IGNORE], key="annotate_tool",
                          format_func={NEURON: ":blue[**Neuron**] (cyan)", MEMBRANE: ":red[**Membrane**] (red)",
                                       IGNORE: ":orange[**Unlabelled**] (erase to unknown)"}.get)
    brush = tools[1].slider("Brush size (image pixels)", 1, 40, key="annotate_brush")
    opacity = tools[1].slider("Mask opacity", 0.0, 1.0, step=0.05, key="annotate_opacity")
    zoom = tools[2].select_slider("Zoom", [1, 2, 4, 8], key=state.ZOOM,
                                  help="Show a region larger, for fine membranes. Your strokes are kept when you move.")
    centre = (0.5, 0.5)
    if zoom > 1:
        centre = (tools[3].slider("Region: down (%)", 0, 100, key=state.CENTRE_Y) / 100,
                  tools[3].slider("Region: across (%)", 0, 100, key=state.CENTRE_X) / 100)
    else:
        tools[3].caption("Undo and Redo (under the canvas) step through every change of this edit, across zoom, "
                         "opacity and Accept. Unlabelled pixels are ignored by training, so a few strokes on nothing "
                         "are already training data.")

    state.keep_values(TOOL_DEFAULTS)
    return Tools(tool, brush, opacity, zoom, centre)


def canvas_panel(edit: Edit, draft: Draft, volume: np.ndarray, tools: Tools, object_tool: str = BRUSH,
                 neurons: Neurons | None = None) -> View:
    """The canvas (a picture for a viewer) over the slice and its draft, as wide as the page; its strokes go
    into the draft and the store, or, with an object tool, its clicks pick neurons. Returns the view."""
    dataset_id, z = edit.dataset_id, edit.z
    height, width = volume.shape[1:]
    tool, brush, opacity, zoom = tools.tool, tools.brush, tools.opacity, tools.zoom
    room_w, room_h = room()  # (the frame has the browser say it)
    view = View.fit((height, width), zoom, tools.centre, target=max(384, min(room_w, 2048)))  # as wide as the page
    last_canvas = st.session_state.get(CANVAS_RENDERED)
    if last_canvas != (draft.canvas_key, state.script_runs() - 1):
        draft.remount()  # the canvas was not on screen in the last run: its strokes are gone from it, bake them
    elif view != draft.view:
        pending_strokes(draft)
    draft.set_view(view)  # a new view bakes the strokes so far and starts an empty canvas over it
    cache = st.session_state.setdefault(BACKGROUND, {})
    bg_key = (draft.uid, draft.generation, opacity, view, dataset_id, z)
    if cache.get("key") != bg_key:  # read and encode once per canvas and opacity, not on every stroke
        contrast = slice_window(volume, z)  # only the view's region is read, from the pyramid when shrunk
        cache["key"], cache["url"] = bg_key, png_data_url(view_picture(volume, z, view, draft.view_base, opacity,
                                                                       contrast))

    display_h, display_w = view.display_shape
    clicking = object_tool != BRUSH and neurons is not None
    doing = (f"**{TOOLS[object_tool][0]}**: " + ("draw on the canvas" if object_tool == SPLIT_LINE else
                                                 "click on the canvas") if clicking else
             f"Painting **{ {NEURON: 'neuron', MEMBRANE: 'membrane', IGNORE: 'unlabelled'}[tool]}** with a "
             f"{brush}-pixel brush")
    st.caption(doing + f" · slice {z}: {width} × {height} pixels" + (
        f", showing rows {view.y0}–{view.y0 + view.h - 1} and columns {view.x0}–{view.x0 + view.w - 1}"
        if zoom > 1 else "") + f" at {view.describe()} · cyan: neuron, red: membrane, no tint: unlabelled")
    if can("annotate") and clicking:
        safe = re.sub(r"\W", "_", object_tool)  # (the key names the canvas's CSS class: "don't know" → don_t_know)
        key = f"{draft.canvas_key}-{safe}-{st.session_state.get(RESETS, 0)}"
        line = object_tool == SPLIT_LINE  # (a line drawn free-hand; the other tools take clicks)
        result = st_canvas(stroke_width=2, stroke_color="#ffff00", fill_color="rgba(255, 255, 0, 0.6)",
                           background_image=cache["url"], height=display_h, width=display_w,
                           drawing_mode="freedraw" if line else "point", point_display_radius=5, key=key,
                           max_display_height=max(480, room_h - 120), update_streamlit=True)
        st.session_state[CANVAS_RENDERED] = (key, state.script_runs())  # (the brush's canvas was not shown)
        st.session_state[CANVAS_SETTLED] = result.background_fit is not None
        points = line_points(result.json_data, view) if line else click_points(result.json_data, view)
        act(edit, draft, neurons, object_tool, points, tool, view)
        return view
    if can("annotate"):
        result = st_canvas(stroke_width=max(1, round(brush * view.ratio)), stroke_color=brush_color(tool),
                           background_image=cache["url"], height=display_h, width=display_w, drawing_mode="freedraw",
                           return_image_data=True, key=draft.canvas_key, max_display_height=max(480, room_h - 120),
                           update_streamlit=True)
        draft.apply_canvas(canvas_data(draft.canvas_key))  # (its data URL, decoded only when it is the canvas's)
        st.session_state[CANVAS_SETTLED] = result.background_fit is not None
    else:  # a viewer sees the slice and its mask, with nothing to paint on
        st.image(cache["url"], width=display_w, caption="View only: your role cannot paint or save masks.")
        st.session_state[CANVAS_SETTLED] = True
    edit.keep(draft)  # every change goes to the store: a reload or a new tab finds it
    trim_histories(list(edit.drafts.values()), draft)  # (a session's undo stays within its memory budget)
    st.session_state[CANVAS_RENDERED] = (draft.canvas_key, state.script_runs())
    return view


if __name__ == "__main__":  # run as a page of its own: only by Streamlit's folder mode, which this ends
    frame_guard()
