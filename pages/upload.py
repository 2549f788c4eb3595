"""The one way a stack is uploaded, on Datasets and on Predict: a volume TIFF with optional labels, a name
and notes, a progress bar while it is received and checked, the refusal said with the files still
attached, and the question a grey stack saved as channels raises (read the channels as Z slices?)."""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

import pages.state as state
from domain.records import DatasetInfo
from pages.common import can, flash, frame_guard, release_uploads, select_dataset
from storage.service import LABEL_SCHEMES, ChannelsQuestion, Neuroseg, UserError
from ui.text import plain

_CHANNELS_AS_Z = "_channels_as_z"  # the user answered the channels question (set by its button, read once)


def stored_words(info: DatasetInfo) -> str:
    """What was stored, as Datasets says it."""
    return (f"Stored **{plain(info.name)}**: {info.shape[0]} × {info.shape[1]} × {info.shape[2]} {info.dtype}"
            f"{f', {info.labelled_slices} labelled slices' if info.labelled_slices else ''}.")


def upload_stack(svc: Neuroseg, key: str, stored: Callable[[DatasetInfo], str] = stored_words) -> None:
    """The upload form, its progress and its answer, drawn where it is called. Widget keys start with
    ``key`` (the volume's is ``{key}_file``, the submit button's ``{key}_go``): each page has its own. The
    form keeps its files after a refusal (nothing to attach again) and after the channels question; a new
    form (its keys get a number) clears it once stored. The stored dataset is selected, and ``stored(info)``
    flashed."""
    form = st.session_state.setdefault(f"{key}_form", 0)
    keys = {part: f"{key}_{part}" + (f"_{form}" if form else "")
            for part in ("file", "labels", "labels_as", "name", "notes")}
    with st.form(f"{key}_{form}"):
        volume = st.file_uploader("Volume: a multi-page TIFF (Z × Y × X), 8- or 16-bit or float32",
                                  type=["tif", "tiff"], key=keys["file"])
        labels = st.file_uploader("Labels (optional): a TIFF of the same shape; 255 or 1 = neuron, 0 = membrane, "
                                  "or instance labels", type=["tif", "tiff"], key=keys["labels"])
        labels_as = st.selectbox("Labels are", list(LABEL_SCHEMES), format_func=LABEL_SCHEMES.get,
                                 key=keys["labels_as"],
                                 help="How the label file's values are read. Detect tells a binary mask from "
                                      "neuron ids, and asks when it cannot (a file of 0, 1 and 2 only).")
        c1, c2 = st.columns([1, 2])
        name = c1.text_input("Name", placeholder="the file name", max_chars=200, key=keys["name"])
        notes = c2.text_area("Notes", height=68, placeholder="sample, microscope, pixel size, …", key=keys["notes"])
        submitted = st.form_submit_button("Upload and check", type="primary", disabled=not can("create"),
                                          key=f"{key}_go")
    as_slices = st.session_state.pop(_CHANNELS_AS_Z, False)  # the user answered the channels question
    if not (submitted or as_slices):
        return
    if volume is None:
        st.error("Choose a volume TIFF first.")
        return
    what = plain(f"{volume.name} and {labels.name}" if labels is not None else volume.name)
    bar = st.progress(0.0, text=f"Receiving {volume.name} …")
    try:
        info = svc.import_upload(volume, labels, name=name, notes=notes, channels_as_z=as_slices, labels_as=labels_as,
                                 author=state.author(),
                                 progress=lambda stage, f: bar.progress(min(max(f, 0.0), 1.0), text=stage))
    except ChannelsQuestion as exc:  # not a refusal: a question, with a button that answers it
        bar.empty()
        st.warning(f"**{what}** {'were' if labels is not None else 'was'} not stored yet: "
                   f"{plain(str(exc).rstrip('.'))}.", icon=":material/help:")
        st.button(f"Read them as {exc.count} Z slices and store", type="primary",
                  on_click=lambda: st.session_state.update({_CHANNELS_AS_Z: True}), key="channels_as_z")
    except UserError as exc:
        bar.empty()
        st.error(f"**{what}** {'were' if labels is not None else 'was'} not stored: "
                 f"{plain(str(exc).rstrip('.'))}. The files are still attached: fix the cause, or choose others.")
    else:
        bar.empty()
        release_uploads(volume, labels)  # (stored: the server's memory is free of them)
        select_dataset(info.id)
        st.session_state[f"{key}_form"] = form + 1
        flash(stored(info))
        st.rerun()


if __name__ == "__main__":  # run as a page of its own: only by Streamlit's folder mode, which this ends
    frame_guard()
