"""Datasets: upload a stack (and its labels), list what is stored, browse a dataset slice by slice with
its masks, rename it, delete it."""

from __future__ import annotations

import streamlit as st

from pages.common import attempt, can, dataset_picker, flash, select_dataset, start_page, volume_or_stop
from storage.service import NAME_MAX, ChannelsQuestion, UserError
from ui.figures import histogram
from ui.paint import View, auto_window, middle_of, view_picture
from ui.text import plain
from ui.training import seen_words

svc = start_page("Datasets")

# --- upload -------------------------------------------------------------------------------------
datasets = svc.datasets()
with st.expander("Upload a stack", expanded=not datasets):
    # the form keeps its files after a refusal (nothing to attach again); a new form key clears it on success
    form = st.session_state.setdefault("upload_form", 0)
    with st.form(f"upload_{form}"):
        volume = st.file_uploader("Volume: a multi-page TIFF (Z × Y × X), 8- or 16-bit or float32",
                                  type=["tif", "tiff"], key=f"upload_volume_{form}")
        labels = st.file_uploader("Labels (optional): a TIFF of the same shape; 255 or 1 = neuron, 0 = membrane, "
                                  "or instance labels", type=["tif", "tiff"], key=f"upload_labels_{form}")
        c1, c2 = st.columns([1, 2])
        name = c1.text_input("Name", placeholder="the file name", max_chars=200, key=f"upload_name_{form}")
        notes = c2.text_area("Notes", height=68, placeholder="sample, microscope, pixel size, …",
                             key=f"upload_notes_{form}")
        submitted = st.form_submit_button("Upload and check", type="primary", disabled=not can("create"))
    as_slices = st.session_state.pop("_channels_as_z", False)  # the user answered the channels question
    if submitted or as_slices:
        if volume is None:
            st.error("Choose a volume TIFF first.")
        else:
            what = plain(f"{volume.name} and {labels.name}" if labels is not None else volume.name)
            bar = st.progress(0.0, text=f"Receiving {volume.name} …")
            try:
                info = svc.import_upload(volume, labels, name=name, notes=notes, channels_as_z=as_slices,
                                         author=st.session_state.get("author", ""),
                                         progress=lambda stage, f: bar.progress(min(max(f, 0.0), 1.0), text=stage))
            except ChannelsQuestion as exc:
                bar.empty()
                st.warning(f"**{what}** {'were' if labels is not None else 'was'} not stored yet: "
                           f"{str(exc).rstrip('.')}.", icon=":material/help:")
                st.button(f"Read the {exc.count} channels as Z slices and store", type="primary",
                          on_click=lambda: st.session_state.update(_channels_as_z=True), key="channels_as_z")
            except UserError as exc:
                bar.empty()
                st.error(f"**{what}** {'were' if labels is not None else 'was'} not stored: "
                         f"{str(exc).rstrip('.')}. The files are still attached: fix the cause, or choose "
                         "others.")
            else:
                bar.empty()
                select_dataset(info.id)
                st.session_state["upload_form"] = form + 1
                flash(f"Stored **{plain(info.name)}**: {info.shape[0]} × {info.shape[1]} × {info.shape[2]} {info.dtype}"
                      f"{f', {info.labelled_slices} labelled slices' if info.labelled_slices else ''}.")
                st.rerun()

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
            try:
                info = svc.import_path(path, link=link, name=path_name, author=st.session_state.get("author", ""),
                                       progress=lambda stage, f: bar.progress(min(max(f, 0.0), 1.0), text=stage))
            except UserError as exc:
                bar.empty()
                st.error(f"The folder was not imported: {plain(str(exc).rstrip('.'))}.")
            else:
                bar.empty()
                select_dataset(info.id)
                flash(f"{'Linked' if link else 'Imported'} **{plain(info.name)}**: {info.shape[0]} × "
                      f"{info.shape[1]} × {info.shape[2]} {info.dtype}.")
                st.rerun()

if not datasets:
    st.info("No datasets yet: upload a stack above, or load the demo dataset from the home page.")
    st.stop()

# --- the list -------------------------------------------------------------------------------------
st.dataframe(
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
    if refused:
        st.caption(refused)
    confirm = st.text_input("Type the dataset's name to confirm", key=f"confirm_delete_{dataset_id}",
                            disabled=bool(refused))
    if st.button("Delete dataset", type="primary", disabled=bool(refused) or confirm.strip() != info.name,
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
            flash(f"Deleted **{plain(info.name)}**: {removed.describe()}.")
            st.rerun()
