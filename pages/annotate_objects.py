"""The object tools of the Annotate page (issue 29): the neurons of the prediction an edit started from, a
tool picker, and the clicks on the canvas that a tool turns into one change of the draft (undo takes it
back whole; the save records the tool). The tools themselves are :mod:`unet.prediction.objects`, through
:meth:`ui.annotation.Draft.use_tool`."""

from __future__ import annotations

import re

import numpy as np
import streamlit as st

import pages.state as state
from domain.kinds import RunStatus, Tool
from pages.annotate_panels import Edit
from pages.common import flash, frame_guard
from storage.service import Neuroseg
from ui.annotation import Draft
from ui.paint import View
from ui.text import plain
from ui.tools import (
    BRUSH,
    SHORTCUTS,
    SPLIT_LINE,
    TOOLS,
    WHOLE_MAX,
    accept_confident,
    neurons_from,
    run_tool,
    saved_as,
)

PICKED = "annotate_object_tool"
NEURONS = "_annotate_neurons"  # the neurons of the prediction shown, read once per prediction and slice
RESETS = "_annotate_clicks_reset"  # bumped to give the canvas a fresh key (its clicks forgotten)


class Neurons:
    """The neurons the object tools act on: those of the finished prediction an edit started from, or of the
    live prediction shown (made from its probabilities when a tool first needs them, once per prediction)."""

    def __init__(self, source: str, prob: np.ndarray, instances: np.ndarray | None = None,
                 known: tuple[int, int, int, int] | None = None):
        self.source, self.prob, self._instances, self.known = source, prob, instances, known
        self._seen: tuple[View | None, np.ndarray] | None = None

    @property
    def instances(self) -> np.ndarray:
        """Every neuron of the slice."""
        return self.in_view(None)

    def in_view(self, view: View | None) -> np.ndarray:
        """The neurons in ``view`` at least (a large live prediction is cut only around the view shown)."""
        if self._instances is not None:
            return self._instances
        if self._seen is None or (self._seen[0] is not None and self._seen[0] != view):
            found = neurons_from(self.prob, view)
            if self.known is not None:  # a zoomed viewer's region only: the rest was never predicted (no neurons)
                y0, x0, h, w = self.known
                inside = np.zeros(found.shape, bool)
                inside[y0:y0 + h, x0:x0 + w] = True
                found[~inside] = 0
            self._seen = (view if self.prob.size > WHOLE_MAX else None, found)
        return self._seen[1]


def _cached(key: tuple, make) -> Neurons | None:
    cache = st.session_state.setdefault(NEURONS, {})
    if key not in cache:
        found = make()
        if found is None:
            return None
        cache.clear()  # (one slice's neurons at a time: a 4096² map is 64 MB)
        cache[key] = found
    return cache[key]


def neurons_of(svc: Neuroseg, draft: Draft) -> Neurons | None:
    """The neurons of the finished prediction the edit started from ("Correct this slice", "Start from" a
    prediction, Next to fix), else of the live prediction of this slice while Live is on; None when there
    is neither (or the prediction made no neurons)."""
    if draft.prediction_id is not None:
        def finished() -> Neurons | None:
            try:
                job = svc.prediction(draft.prediction_id)
                # (an id of a deleted prediction can be given again, to another dataset's: its neurons are not these)
                if (job.status != RunStatus.FINISHED or job.dataset_id != draft.dataset_id
                        or draft.slice_index not in job.slices):
                    return None
                i = job.slices.index(draft.slice_index)
                prob = np.asarray(svc.prediction_output(job.id)[i])
                if prob.shape != draft.working.shape:
                    return None
                return Neurons(f"prediction {job.id}", prob, np.asarray(svc.prediction_output(job.id, "instances")[i]))
            except (RuntimeError, LookupError, OSError, ValueError):  # (a missing or damaged output: no tools)
                return None
        return _cached(("prediction", draft.prediction_id, draft.dataset_id, draft.slice_index), finished)
    session = svc.live(draft.dataset_id) if st.session_state.get(f"live_on_{draft.dataset_id}") else None
    if session is None:
        return None
    seen = svc.live_prediction(session.run_id, draft.slice_index)
    if seen is None:
        return None
    return _cached(("live", session.run_id, draft.slice_index, seen.step, seen.masks_seen, seen.region),
                   lambda: Neurons(f"live prediction (step {seen.step:,})", seen.probabilities,
                                   known=seen.region if seen.partial else None))


def _accept_confident(edit: Edit, draft: Draft, neurons: Neurons, threshold: float) -> None:
    new, chosen = accept_confident(draft.working, neurons.instances, neurons.prob, threshold)
    changed = draft.use_tool(new, Tool.ACCEPT_CONFIDENT)
    edit.keep(draft)
    flash(f"Accepted {len(chosen)} neuron{'s' if len(chosen) != 1 else ''} with a mean probability of at least "
          f"{threshold:.2f} "
          f"({changed:,} pixels changed; Undo takes them back).", "success" if chosen else "info")


def _pick(tool: str) -> None:
    st.session_state[PICKED] = tool
    st.session_state[RESETS] = st.session_state.get(RESETS, 0) + 1  # (clicks of another tool are dropped)


def tool_picker(edit: Edit, draft: Draft, neurons: Neurons | None) -> str:
    """The tool the canvas works with: the brush, or an object tool when the edit has a prediction's
    neurons to act on. Each is a button with its key (B, A, M, S, L, E, F, D)."""
    if neurons is None:  # (the user guide says how to get them: a finished prediction, or Live on)
        return BRUSH
    picked = st.session_state.get(PICKED, BRUSH)
    picked = picked if picked in TOOLS else BRUSH
    st.caption(f"Tools on the neurons of the {neurons.source} (keys in brackets). Each action is one step that "
               "Undo takes back.")
    names = list(TOOLS)
    for row in (names[:4], names[4:]):
        for col, tool in zip(st.columns(4), row, strict=False):
            col.button(TOOLS[tool][0], key="tool_" + re.sub(r"\W", "_", tool), shortcut=SHORTCUTS[tool],
                       type="primary" if tool == picked else "secondary", on_click=_pick, args=(tool,),
                       use_container_width=True)
    left, right = st.columns([3, 2], vertical_alignment="bottom")
    state.widget_values({"annotate_confidence": 0.9})
    threshold = left.slider("Confidence", 0.5, 1.0, step=0.01, key="annotate_confidence")
    state.keep_values(["annotate_confidence"])
    right.button("Accept all confident neurons", key="accept_confident", on_click=_accept_confident,
                 args=(edit, draft, neurons, threshold), shortcut="Shift+A")
    return picked


def act(edit: Edit, draft: Draft, neurons: Neurons, tool: str, points: list[tuple[int, int]],
        paint: int, view: View | None = None) -> None:
    """Run ``tool`` once enough clicks have come; the page then redraws over the changed draft."""
    needed = TOOLS[tool][1]
    if tool == SPLIT_LINE and len(points) < 2:
        st.caption("Split along a line: draw the line across the neuron on the canvas.")
        return
    if len(points) < needed:
        st.caption(f"{TOOLS[tool][0]}: {needed - len(points)} more click(s) on the canvas.")
        return
    try:
        new = run_tool(tool, draft.working, neurons.in_view(view), neurons.prob, points, paint)
    except ValueError as exc:
        flash(f"{TOOLS[tool][0]}: {plain(exc)}.", "warning")
    else:
        if draft.use_tool(new, saved_as(tool)):
            edit.keep(draft)
        else:
            flash(f"{TOOLS[tool][0]}: nothing to change, the mask already says so.", "info")
    st.session_state[RESETS] = st.session_state.get(RESETS, 0) + 1  # the clicks are used: a fresh canvas
    st.rerun()


if __name__ == "__main__":  # run as a page of its own: only by Streamlit's folder mode, which this ends
    frame_guard()
