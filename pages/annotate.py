"""Annotate: paint neuron, membrane or "unlabelled" on a slice over its current mask, and save the result as
a new version of the slice's mask. Edits are drafts kept in the browser session and, as the user paints,
in the store (per user and slice) until saved or discarded: moving to another slice or page, reloading
or opening a new tab drops nothing (the pages warn about them, and leaving the tab before a stroke has
reached the server asks first)."""

from __future__ import annotations

import streamlit as st

import pages.state as state
from pages.annotate_canvas import CANVAS_SETTLED, canvas_panel, tools_panel
from pages.annotate_conflicts import clash_panel, conflict_panel
from pages.annotate_live import live_panel
from pages.annotate_objects import neurons_of, tool_picker
from pages.annotate_panels import (
    Edit,
    current_draft,
    history_panel,
    other_drafts,
    save_bar,
    slice_picker,
    start_from_panel,
)
from pages.annotate_review import next_button, queue_panel
from pages.canvas_aids import window_room
from pages.common import can, dataset_picker, leave_guard, start_page, volume_or_stop
from ui.annotation import start_options
from ui.tools import BRUSH

svc = start_page("Annotate")
datasets = svc.datasets()
if not datasets:
    st.info("No datasets yet: load the demo dataset on the home page or upload a stack on **Datasets**.")
    st.page_link("pages/datasets.py", label="Go to Datasets", icon=":material/folder:")
    st.stop()

dataset_id = dataset_picker(datasets, key="dataset_pick_annotate")  # (a key of its own on each page)
info = svc.dataset(dataset_id)
volume = volume_or_stop(svc, dataset_id)

z, kinds = slice_picker(svc, dataset_id, info.shape[0], state.drafts())
if can("annotate"):
    next_button(svc, dataset_id, info.shape[1:], z)  # where to work next: the dataset's shared queue
edit = Edit.of(svc, dataset_id, z)
history = svc.history(dataset_id, z)  # (callbacks run before the page: this is current for the whole run)
options = start_options(history, svc.predictions(dataset_id=dataset_id), z)
draft = current_draft(edit, options, kinds.get(z))
in_conflict = conflict_panel(edit, draft, history)
start_from_panel(edit, draft, options, history, in_conflict)
tools = tools_panel()
neurons = neurons_of(svc, draft)  # the prediction's, when the edit started from one: the object tools act on them
object_tool = tool_picker(edit, draft, neurons) if can("annotate") else BRUSH
view = canvas_panel(edit, draft, volume, tools, object_tool, neurons)
clash_panel(edit, draft)  # (after the canvas: its strokes of this run were kept, or met another tab's edit)
save_bar(edit, draft, in_conflict)
live_panel(edit, draft, volume, view, tools)  # training that follows the annotator
other_drafts(edit)
history_panel(edit, draft, history)
queue_panel(svc, dataset_id)

# after the strokes of this run are kept: see pages.common.leave_guard
leave_guard(armed=True, settled=st.session_state.get(CANVAS_SETTLED, True))
window_room()  # last: this run has read its URL (?slice=) before a report of the room reruns it
