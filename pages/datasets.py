"""Datasets: upload a stack (and its labels), list what is stored, browse a dataset slice by slice with
its masks, rename it, delete it."""

from __future__ import annotations

import streamlit as st

from pages.common import (
    dataset_picker,
    flash,
    frame_guard,
    histogram,
    select_dataset,
    service,
    show_flashes,
    volume_or_stop,
)
from storage.service import UserError
from unet.paint import View, auto_window, overlay, window

frame_guard()
svc = service()
st.title("Datasets")
show_flashes()

# --- upload -------------------------------------------------------------------------------------
datasets = svc.datasets()
with st.expander("Upload a stack", expanded=not datasets):
    with st.form("upload", clear_on_submit=True):
        volume = st.file_uploader("Volume: a multi-page TIFF (Z × Y × X), 8- or 16-bit or float32",
                                  type=["tif", "tiff"], key="upload_volume")
        labels = st.file_uploader("Labels (optional): a TIFF of the same shape; 255 or 1 = neuron, 0 = membrane, "
                                  "or instance labels", type=["tif", "tiff"], key="upload_labels")
        c1, c2 = st.columns([1, 2])
        name = c1.text_input("Name", placeholder="the file name", max_chars=200)
        notes = c2.text_area("Notes", height=68, placeholder="sample, microscope, pixel size, …")
        submitted = st.form_submit_button("Upload and check", type="primary")
    if submitted:
        if volume is None:
            st.error("Choose a volume TIFF first.")
        else:
            bar = st.progress(0.0, text=f"Receiving {volume.name} …")
            try:
                info = svc.import_upload(volume, labels, name=name, notes=notes,
                                         author=st.session_state.get("author", ""),
                                         progress=lambda stage, f: bar.progress(min(max(f, 0.0), 1.0), text=stage))
            except UserError as exc:
                bar.empty()
                what = f"{volume.name} and {labels.name}" if labels is not None else volume.name
                st.error(f"**{what}** was not stored: {str(exc).rstrip('.')}.")
            else:
                bar.empty()
                select_dataset(info.id)
                datasets = svc.datasets()
                st.success(f"Stored **{info.name}**: {info.shape[0]} × {info.shape[1]} × {info.shape[2]} {info.dtype}"
                           f"{f', {info.labelled_slices} labelled slices' if info.labelled_slices else ''}.")

if not datasets:
    st.info("No datasets yet: upload a stack above, or load the demo dataset from the home page.")
    st.stop()

# --- the list -------------------------------------------------------------------------------------
st.dataframe(
    [{"id": d.id, "name": d.name, "shape (Z×Y×X)": "×".join(map(str, d.shape)), "dtype": d.dtype,
      "size (MB)": round(d.size_bytes / 1e6, 1), "labelled slices": f"{d.labelled_slices} / {d.shape[0]}",
      "pixel (nm)": d.pixel_size_nm, "created": d.created.strftime("%Y-%m-%d %H:%M"), "file": d.source_name}
     for d in datasets],
    hide_index=True, key="dataset_table")

dataset_id = dataset_picker(datasets, "Browse dataset")
info = svc.dataset(dataset_id)
z_count, height, width = info.shape

# --- browse ---------------------------------------------------------------------------------------
volume = volume_or_stop(svc, dataset_id)
kinds = svc.slice_kinds(dataset_id)
left, right = st.columns([3, 2])
with right:
    z = st.slider("Slice", 0, z_count - 1, key=f"browse_slice_{dataset_id}") if z_count > 1 else 0
    image = volume[z]
    lo, hi = auto_window(image)
    full_lo, full_hi = (0.0, 255.0) if info.dtype == "uint8" else (
        (0.0, 65535.0) if info.dtype == "uint16" else (float(volume.min()), float(volume.max())))
    auto = st.toggle("Automatic contrast (0.5–99.5 percentile)", value=True, key="browse_auto")
    if not auto and full_hi > full_lo:
        lo, hi = st.slider("Contrast window", full_lo, full_hi, (max(full_lo, lo), min(full_hi, hi)),
                           key=f"browse_window_{dataset_id}")
    mask_info = kinds.get(z)
    show_mask = st.toggle("Show mask", value=True, disabled=mask_info is None, key="browse_show_mask")
    opacity = st.slider("Mask opacity", 0.0, 1.0, 0.35, 0.05, key="browse_opacity")
    st.plotly_chart(histogram(image, lo, hi), key="browse_hist")
    if mask_info is None:
        st.caption(f"Slice {z} has no mask yet.")
    else:
        st.caption(f"Slice {z}: mask v{mask_info.version} ({mask_info.kind}"
                   f"{', by ' + mask_info.author if mask_info.author else ''}), "
                   f"{mask_info.labelled_pixels:,} labelled pixels. Cyan: neuron, red: membrane.")
with left:
    mask = svc.mask(mask_info.id) if (mask_info is not None and show_mask) else None
    shown = View.fit((height, width), 1, target=640)  # small slices drawn larger, pixel for pixel
    st.image(shown.render(overlay(window(image, lo, hi), mask, opacity)),
             caption=f"slice {z} of {z_count} ({width} × {height} pixels, shown at {shown.scale}×)")

# --- edit and delete ------------------------------------------------------------------------------
with st.expander("Name and notes"), st.form(f"edit_{dataset_id}"):
    new_name = st.text_input("Name", info.name, max_chars=200)
    new_notes = st.text_area("Notes", info.notes)
    if st.form_submit_button("Save name and notes"):
        try:
            svc.update(dataset_id, name=new_name, notes=new_notes)
        except UserError as exc:
            st.error(str(exc))
        else:
            flash("Name and notes saved.")
            st.rerun()

with st.expander("Delete this dataset"):
    preview = svc.deletion_preview(dataset_id)
    st.warning(f"Deleting **{info.name}** removes {preview.describe()}: the stack, every mask version of every "
               "slice, and the runs that trained on it with their checkpoints. This cannot be undone.")
    confirm = st.text_input("Type the dataset's name to confirm", key=f"confirm_delete_{dataset_id}")
    if st.button("Delete dataset", type="primary", disabled=confirm.strip() != info.name,
                 key=f"delete_{dataset_id}"):
        try:
            removed = svc.delete_dataset(dataset_id)
        except UserError as exc:
            st.error(str(exc))
        else:
            st.session_state.pop("dataset_id", None)
            st.query_params.pop("dataset", None)
            drafts = st.session_state.get("drafts", {})
            for key in [k for k in drafts if k[0] == dataset_id]:
                del drafts[key]
            flash(f"Deleted **{info.name}**: {removed.describe()}.")
            st.rerun()
