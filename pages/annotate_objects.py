"""The object tools of the Annotate page (issue 29): the neurons of the prediction an edit started from, a
tool picker, and the clicks on the canvas that a tool turns into one change of the draft (undo takes it
back whole; the save records the tool). The tools themselves are :mod:`unet.prediction.objects`, through
:meth:`ui.annotation.Draft.use_tool`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import streamlit as st

from domain.kinds import RunStatus, Tool
from pages.annotate_panels import Edit
from pages.common import flash, frame_guard
from storage.service import Neuroseg
from ui.annotation import Draft
from ui.tools import BRUSH, TOOLS, accept_confident, run_tool

PICKED = "annotate_object_tool"
NEURONS = "_annotate_neurons"  # the neurons of the prediction shown, read once per prediction and slice
RESETS = "_annotate_clicks_reset"  # bumped to give the canvas a fresh key (its clicks forgotten)


@dataclass(frozen=True)
class Neurons:
    """The neurons of the prediction an edit started from (its instance map) and its probabilities."""

    prediction_id: int
    instances: np.ndarray
    prob: np.ndarray


def neurons_of(svc: Neuroseg, draft: Draft) -> Neurons | None:
    """The neurons of the finished prediction the edit started from ("Correct this slice", or "Start from"
    a prediction), or None when it started from something else or the prediction made no neurons."""
    if draft.prediction_id is None:
        return None
    cache = st.session_state.setdefault(NEURONS, {})
    key = (draft.prediction_id, draft.slice_index)
    if key not in cache:
        try:
            job = svc.prediction(draft.prediction_id)
            if job.status != RunStatus.FINISHED or draft.slice_index not in job.slices:
                return None
            i = job.slices.index(draft.slice_index)
            found = Neurons(job.id, np.asarray(svc.prediction_output(job.id, "instances")[i]),
                            np.asarray(svc.prediction_output(job.id)[i]))
        except (RuntimeError, LookupError, OSError, ValueError):  # (a missing or damaged output: no tools)
            return None
        cache.clear()  # (one slice's neurons at a time: a 4096² map is 64 MB)
        cache[key] = found
    return cache[key]


def _accept_confident(edit: Edit, draft: Draft, neurons: Neurons, threshold: float) -> None:
    new, chosen = accept_confident(draft.working, neurons.instances, neurons.prob, threshold)
    changed = draft.use_tool(new, Tool.ACCEPT_CONFIDENT)
    edit.keep(draft)
    flash(f"Accepted {len(chosen)} neuron(s) with a mean probability of at least {threshold:.2f} "
          f"({changed:,} pixels changed; Undo takes them back).", "success" if chosen else "info")


def tool_picker(edit: Edit, draft: Draft, neurons: Neurons | None) -> str:
    """The tool the canvas works with: the brush, or an object tool when the edit has a prediction's
    neurons to act on."""
    if neurons is None:  # (the user guide says how to get them: start the edit from a finished prediction)
        return BRUSH
    left, right = st.columns([5, 2])
    picked = left.radio("Tool", list(TOOLS), key=PICKED, horizontal=True, format_func=lambda t: TOOLS[t][0],
                        help="Click a neuron on the canvas (two for Merge and Split). Each action is one step "
                             "that Undo takes back.")
    threshold = right.slider("Confidence", 0.5, 1.0, 0.9, 0.01, key="annotate_confidence")
    right.button("Accept all confident neurons", key="accept_confident", on_click=_accept_confident,
                 args=(edit, draft, neurons, threshold))
    return picked


def act(edit: Edit, draft: Draft, neurons: Neurons, tool: str, points: list[tuple[int, int]],
        paint: int) -> None:
    """Run ``tool`` once enough clicks have come; the page then redraws over the changed draft."""
    needed = TOOLS[tool][1]
    if len(points) < needed:
        st.caption(f"{TOOLS[tool][0]}: {needed - len(points)} more click(s) on the canvas.")
        return
    try:
        new = run_tool(tool, draft.working, neurons.instances, neurons.prob, points, paint)
    except ValueError as exc:
        flash(f"{TOOLS[tool][0]}: {exc}.", "warning")
    else:
        if draft.use_tool(new, Tool(tool)):
            edit.keep(draft)
        else:
            flash(f"{TOOLS[tool][0]}: nothing to change, the mask already says so.", "info")
    st.session_state[RESETS] = st.session_state.get(RESETS, 0) + 1  # the clicks are used: a fresh canvas
    st.rerun()


if __name__ == "__main__":  # run as a page of its own: only by Streamlit's folder mode, which this ends
    frame_guard()
