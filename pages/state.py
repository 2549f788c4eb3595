"""The session-state keys that more than one module of the pages reads or writes, each behind a typed
accessor, so that a key's name and type are said once. (Keys that one module keeps to itself stay there, as
constants.) The names are the ones ``st.session_state`` has always held: tests and open sessions find them.

Widgets' own keys vanish from ``st.session_state`` on pages that do not show them, so what must survive a
change of page is kept under plain keys here."""

from __future__ import annotations

from typing import Any

import streamlit as st

from storage.service import Actor
from ui.annotation import Draft

# --- who is signed in ---------------------------------------------------------------------------------
ACTOR = "actor"  # the signed-in user (an Actor), or None
AUTHOR = "author"  # the signed-in user's name, written on what they save


def signed_actor() -> Actor | None:
    """The signed-in user as this run found them (None: nobody)."""
    return st.session_state.get(ACTOR)


def set_actor(who: Actor | None) -> None:
    st.session_state[ACTOR] = who


def author() -> str:
    """The name saved masks and uploads are recorded under ("" when nobody is signed in)."""
    return st.session_state.get(AUTHOR, "")


def set_author(name: str) -> None:
    st.session_state[AUTHOR] = name


def forget_user() -> None:
    """Drop who was signed in (a sign-out)."""
    for key in (ACTOR, AUTHOR):
        st.session_state.pop(key, None)


# --- the selected dataset (every page) -----------------------------------------------------------------
DATASET = "dataset_id"


def dataset_id() -> int | None:
    return st.session_state.get(DATASET)


def set_dataset_id(dataset: int) -> None:
    st.session_state[DATASET] = int(dataset)


def forget_dataset() -> None:
    st.session_state.pop(DATASET, None)


# --- the frame's run counter (the frame counts, Annotate reads) ----------------------------------------
SCRIPT_RUNS = "_script_runs"


def script_runs() -> int:
    """How many times this session has run the frame (Annotate tells whether its canvas was on screen in the
    run before)."""
    return st.session_state.get(SCRIPT_RUNS, 0)


def count_script_run() -> None:
    st.session_state[SCRIPT_RUNS] = script_runs() + 1


# --- a late run: the browser's rerun of a page the user has just left ----------------------------------
LATE_RUN = "_late_run"  # the run (script_runs) whose widgets came without their values


def mark_late_run() -> None:
    """This run is a late one: the browser sent it with the page it still showed after the user had clicked
    another (a component's value: see pages.common.leave_guard), and the page's widgets came without their
    values, so Streamlit gives them their defaults. The pages give them back what they were instead."""
    st.session_state[LATE_RUN] = script_runs()


def late_run() -> bool:
    return st.session_state.get(LATE_RUN) == script_runs()


KEPT = "_kept_"  # + a widget's key: its value when it was last drawn


def widget_values(defaults: dict[str, object]) -> None:
    """Give the widgets of these keys their value before they are drawn (without a default of their own): what
    they held when last drawn (Streamlit forgets the value of a widget that a run does not draw: another page,
    an earlier visit), also in a late run, whose widgets came without their values; else ``defaults``. Call
    :func:`keep_values` once they are drawn."""
    late = late_run()
    for key, default in defaults.items():
        if key not in st.session_state or (late and KEPT + key in st.session_state):
            st.session_state[key] = st.session_state.get(KEPT + key, default)


def keep_values(keys) -> None:
    """What the widgets of these keys hold now, for :func:`widget_values` of a later run."""
    for key in keys:
        if key in st.session_state:
            st.session_state[KEPT + key] = st.session_state[key]


# --- Annotate's drafts (Annotate edits them, the frame and Datasets look) ------------------------------
DRAFTS = "drafts"


def drafts() -> dict[tuple[int, int], Draft]:
    """This session's edits, by (dataset, slice), created on first use."""
    return st.session_state.setdefault(DRAFTS, {})


def drafts_if_any() -> dict[tuple[int, int], Draft]:
    """This session's edits, without creating the dict (pages that only look)."""
    return st.session_state.get(DRAFTS, {})


# --- where Annotate opens (Annotate keeps it; Predict's "Correct this slice" and "Open" set it) ----------
SLICE_OF = "slice_of"
START_REQUEST = "start_request"
ZOOM, CENTRE_Y, CENTRE_X = "annotate_zoom", "annotate_cy", "annotate_cx"  # (Annotate's widgets' keys)


def annotate_slice_key(dataset: int) -> str:
    """The key of Annotate's slice slider for ``dataset``."""
    return f"annotate_slice_{dataset}"


def slice_positions() -> dict[int, int]:
    """The slice this tab was on in each dataset (the slider's own key vanishes on other pages)."""
    return st.session_state.setdefault(SLICE_OF, {})


def open_annotate_at(dataset: int, z: int) -> None:
    """Annotate opens ``dataset`` at slice ``z`` next."""
    st.session_state[annotate_slice_key(dataset)] = z
    slice_positions()[dataset] = z


def request_start(dataset: int, z: int, prediction_id: int, keep_saved: bool = False) -> None:
    """Annotate's next edit of slice ``z`` of ``dataset`` starts from prediction ``prediction_id`` ("Correct this
    slice"), or with ``keep_saved`` from the slice's latest version with that prediction's neurons for the
    object tools (Next to fix: what someone saved on the slice stays)."""
    st.session_state[START_REQUEST] = (dataset, z, prediction_id, keep_saved)


def start_request(dataset: int, z: int) -> tuple[int, bool] | None:
    """The prediction asked for as the start of slice ``z`` of ``dataset`` and whether the saved labels stay
    (taken: asked once), or None."""
    request: Any = st.session_state.get(START_REQUEST)
    if request is None or tuple(request[:2]) != (dataset, z):
        return None
    del st.session_state[START_REQUEST]
    return request[2], bool(request[3])


def focus_annotate(zoom: int, cy: int, cx: int) -> None:
    """Annotate's zoom and region (its widgets' values) for the next visit."""
    st.session_state[ZOOM], st.session_state[CENTRE_Y], st.session_state[CENTRE_X] = zoom, cy, cx
