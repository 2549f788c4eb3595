"""Datasets: upload a stack (and its labels), list what is stored, browse a dataset slice by slice with
its masks, rename it, delete it."""

from __future__ import annotations

import streamlit as st

import pages.state as state
from domain.records import DatasetInfo, Deleted
from pages.common import attempt, can, data_table, dataset_picker, select_dataset, start_page, volume_or_stop
from pages.upload import upload_stack
from storage.service import NAME_MAX
from ui.figures import histogram
from ui.paint import View, auto_window, middle_of, view_picture
from ui.text import plain
from ui.training import seen_words

svc = start_page("Datasets")

# --- upload -------------------------------------------------------------------------------------
datasets = svc.datasets()
with st.expander("Upload a stack", expanded=not datasets):
    upload_stack(svc, "upload")

import_roots, _ = svc.server_folders()
with st.expander("Import a folder on the server (OME-Zarr, zarr or N5)"):
    st.caption("For stacks too large to upload: the folder is read slice by slice and copied into Neuroseg's "
               "store, or linked where it lies (read-only: Neuroseg never writes there, and the dataset breaks "
               "if the folder is moved).")
    if not import_roots:  # off unless an admin names the folders: the server may read far more than users should
        st.info("Importing folders on the server is **off** on this server. An admin turns it on by naming the "
                "folders it may import from in the environment variable `NEUROSEG_IMPORT_ROOTS` (separated by "
                "`:`) and restarting Neuroseg.", icon=":material/block:")
    elif can("create"):
        st.caption("This server imports from: " + ", ".join(f"`{root}`" for root in import_roots) + ". Folders "
                   "holding links or special files are refused.")
    if import_roots:
        with st.form("import_path_form"):
            path = st.text_input("Path on the server", placeholder="/data/em/sample.ome.zarr", key="import_path")
            c1, c2 = st.columns([2, 1])
            path_name = c1.text_input("Name", placeholder="the folder's name", max_chars=NAME_MAX,
                                      key="import_path_name")
            link = c2.toggle("Link instead of copying", key="import_link")
            go = st.form_submit_button("Import", type="primary", disabled=not can("create"))
        if go:
            bar = st.progress(0.0, text="Checking the folder …")

            def imported(info: DatasetInfo) -> str:
                select_dataset(info.id)
                return (f"{'Linked' if link else 'Imported'} **{plain(info.name)}**: {info.shape[0]} × "
                        f"{info.shape[1]} × {info.shape[2]} {info.dtype}.")

            try:
                attempt(lambda: svc.import_path(path, link=link, name=path_name, author=state.author(),
                                                progress=lambda stage, f: bar.progress(min(max(f, 0.0), 1.0),
                                                                                       text=stage)),
                        imported, failed=lambda exc: f"The folder was not imported: {plain(str(exc).rstrip('.'))}.")
            finally:
                bar.empty()

if not datasets:
    st.info("No datasets yet: upload a stack above, or load the demo dataset from the home page.")
    st.stop()

# --- the list -------------------------------------------------------------------------------------
data_table(
    [{"id": d.id, "name": d.name, "shape (Z×Y×X)": "×".join(map(str, d.shape)), "dtype": d.dtype,
      "size (MB)": round(d.size_bytes / 1e6, 1), "labelled slices": f"{d.labelled_slices} / {d.shape[0]}",
      "pixel (nm)": d.pixel_size_nm, "created": d.created.strftime("%Y-%m-%d %H:%M"), "owner": d.owner or "—",
      "file": d.source_name}
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
    image = middle_of(volume, z)  # the slice, or its middle 1024² when it is larger: contrast and histogram
    lo, hi = auto_window(image)
    full_lo, full_hi = (0.0, 255.0) if info.dtype == "uint8" else (
        (0.0, 65535.0) if info.dtype == "uint16" else svc.value_range(dataset_id))
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
                   f"{', by ' + plain(mask_info.author) if mask_info.author else ''}), "
                   f"{mask_info.labelled_pixels:,} labelled pixels. Cyan: neuron, red: membrane.")
with left:
    mask = svc.mask(mask_info.id) if (mask_info is not None and show_mask) else None
    shown = View.fit((height, width), 1, target=640)  # small slices drawn larger; large ones from the pyramid
    st.image(view_picture(volume, z, shown, mask, opacity, (lo, hi)),
             caption=f"slice {z} of {z_count} ({width} × {height} pixels, shown at {shown.ratio:g}×)")

# --- held-out slices ------------------------------------------------------------------------------
frozen = svc.held_out(dataset_id)
seen = svc.held_out_seen(dataset_id) if frozen else None
tainted = seen is not None and bool(seen.seen_by)  # (open, and said in its title: runs trained on them)
with st.expander("Held-out slices" + (f" (version {frozen.version}: slices "
                                      f"{', '.join(map(str, frozen.slices))})" if frozen else " (none)")
                 + (" · some runs trained on them" if tainted else ""), expanded=tainted):
    st.caption("Labelled slices set aside to score every run on this dataset, live sessions included, with the "
               "same metrics, so a retrained model that got worse is flagged on **Runs**. Their mask versions "
               "are frozen now (a later edit of the slice does not move the goalposts) and they never train. "
               "Changing the set makes a new version; runs are compared within a version.")
    labelled = sorted(kinds)
    with st.form(f"held_out_{dataset_id}"):
        pick = st.multiselect("Slices", labelled, default=frozen.slices if frozen else [],
                              key=f"held_out_pick_{dataset_id}")
        if st.form_submit_button("Freeze these as the held-out slices" if not frozen else "Change the held-out slices"):
            attempt(lambda: svc.set_held_out(dataset_id, pick),
                    lambda h: (f"Held-out slices, version {h.version}: {', '.join(map(str, h.slices))}. Runs that "
                               "end from now on are scored there." + seen_words(h) if h else
                               "This dataset has no held-out slices now."))
    if tainted:
        st.warning(seen_words(seen).strip(), icon=":material/visibility:")

# --- edit and delete ------------------------------------------------------------------------------
refused = svc.refusal("manage", "dataset", dataset_id)  # (the service checks each call again)
with st.expander("Name and notes"), st.form(f"edit_{dataset_id}"):
    if refused:
        st.caption(refused)
    new_name = st.text_input("Name", info.name, max_chars=NAME_MAX, disabled=bool(refused))
    new_notes = st.text_area("Notes", info.notes, disabled=bool(refused))
    if st.form_submit_button("Save name and notes", disabled=bool(refused)):
        attempt(lambda: svc.update(dataset_id, name=new_name, notes=new_notes), lambda _: "Name and notes saved.")

with st.expander("Delete this dataset"):
    preview = svc.deletion_preview(dataset_id)
    st.warning(f"Deleting **{plain(info.name)}** removes {preview.describe()}: the stack, every mask version of every "
               "slice, and the runs that trained on it with their checkpoints. This cannot be undone.")
    refused = refused or preview.refused
    if refused:
        st.caption(refused)
    confirm = st.text_input("Type the dataset's name to confirm", key=f"confirm_delete_{dataset_id}",
                            disabled=bool(refused))
    if st.button("Delete dataset", type="primary", disabled=bool(refused) or confirm.strip() != info.name,
                 key=f"delete_{dataset_id}"):
        def deleted(removed: Deleted) -> str:
            state.forget_dataset()
            st.query_params.pop("dataset", None)
            drafts = state.drafts_if_any()
            for key in [k for k in drafts if k[0] == dataset_id]:
                del drafts[key]
            return f"Deleted **{plain(info.name)}**: {removed.describe()}."

        attempt(lambda: svc.delete_dataset(dataset_id), deleted)
