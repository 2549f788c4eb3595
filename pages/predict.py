"""Predict: segment a dataset's slices with a checkpoint in the background, look at the result as
overlays (probability, mask, contours, instances, errors against the labels), read the metrics, export
TIFFs, and send a slice to Annotate to correct it."""

from __future__ import annotations

import streamlit as st

from pages.common import dataset_picker, flash, select_dataset, start_page, volume_or_stop
from storage.service import RunStatus, UserError
from ui.paint import View
from ui.prediction import LAYERS, METRICS, compose, metric_rows
from ui.prediction import progress as job_progress
from ui.training import checkpoint_label, default_checkpoint

svc = start_page("Predict")

datasets = svc.datasets()
if not datasets:
    st.info("No datasets yet: load the demo on the home page or upload a stack on **Datasets**.")
    st.stop()
checkpoints = {c.id: c for c in svc.checkpoint_choices()}


top = st.columns([3, 3])
with top[1]:
    dataset_id = dataset_picker(datasets)
    with st.popover("Upload a new stack"), st.form("predict_upload", clear_on_submit=True):
        upload = st.file_uploader("A multi-page TIFF (Z × Y × X)", type=["tif", "tiff"], key="predict_upload_file")
        if st.form_submit_button("Upload and check", key="predict_upload_go") and upload is not None:
            bar = st.progress(0.0, text=f"Receiving {upload.name} …")
            try:
                new = svc.import_upload(upload, author=st.session_state.get("author", ""),
                                        progress=lambda stage, f: bar.progress(min(max(f, 0.0), 1.0), text=stage))
            except UserError as exc:
                bar.empty()
                st.error(f"**{upload.name}** was not stored: {str(exc).rstrip('.')}.")
            else:
                select_dataset(new.id)
                flash(f"Stored **{new.name}**; it is selected for prediction.")
                st.rerun()
with top[0]:
    if not checkpoints:
        st.info("No trained model yet: start a run on **Train**; its checkpoints appear here.")
        st.page_link("pages/train.py", label="Go to Train", icon=":material/model_training:")
        st.stop()
    ids = list(checkpoints)  # each dataset has its own choice; a new one starts from the starter model
    chosen = default_checkpoint(list(checkpoints.values()), svc.runs(), dataset_id, svc.default_model(dataset_id))
    checkpoint_id = st.selectbox("Checkpoint", ids, index=ids.index(chosen) if chosen in ids else 0,
                                 key=f"predict_checkpoint_{dataset_id}",
                                 format_func=lambda i: checkpoint_label(checkpoints[i]))
info = svc.dataset(dataset_id)

with st.form("predict_form"):
    slices_text = st.text_input("Slices", "all", help=f"all, or e.g. 0-4,9 (the stack has 0-{info.shape[0] - 1})",
                                key="predict_slices")
    go = st.form_submit_button("Predict", type="primary", key="predict_go")
if go:
    try:
        slices = svc.parse_slices(slices_text, info.shape[0])
        job = svc.predict(checkpoint_id, dataset_id, slices)
    except (ValueError, UserError) as exc:
        st.error(f"Not started: {exc}")
    else:
        st.session_state["prediction_id"] = job.id
        flash(f"Prediction #{job.id} started on {len(slices)} slice(s).", "info")
        st.rerun()

predictions = svc.predictions(dataset_id=dataset_id)
if not predictions:
    st.caption("No prediction of this dataset yet.")
    st.stop()
ids = [p.id for p in reversed(predictions)]
wanted = st.session_state.get("prediction_id")  # the one just started, or the one the user picked
pick_key = f"pick_{dataset_id}"
if st.session_state.get(pick_key) != (wanted if wanted in ids else ids[0]):  # only then (an open menu stays)
    st.session_state[pick_key] = wanted if wanted in ids else ids[0]


def _picked() -> None:
    st.session_state["prediction_id"] = st.session_state[pick_key]


pick = st.selectbox("Prediction", ids, key=pick_key, on_change=_picked,
                    format_func=lambda i: next(f"#{p.id} · run {p.run_id} · {len(p.slices)} slice(s)"
                                               for p in predictions if p.id == i))
st.session_state["prediction_id"] = pick


def progress(prediction_id: int, was_active: bool) -> None:
    job = svc.prediction(prediction_id)
    if job.active:
        fraction, text = job_progress(job)
        st.progress(fraction, text=f"Prediction #{job.id} · {job.status.lower()}: {text}")
    elif job.status in (RunStatus.FAILED, RunStatus.CANCELLED):
        last = (job.error or "").strip().splitlines()[-1:]
        st.error(f"Prediction #{job.id} {'failed' if job.status == RunStatus.FAILED else 'was stopped'}: "
                 f"{last[0] if last else 'no reason recorded'}")
        if job.status == RunStatus.FAILED:
            kept = f" ({job.done} of {len(job.slices)} blocks are written and kept)" if job.done else ""
            if st.button(f"Resume{kept}", key=f"resume_prediction_{job.id}", type="primary"):
                try:
                    svc.resume_prediction(job.id)
                except UserError as exc:
                    st.error(str(exc))
                else:
                    flash(f"Prediction #{job.id} goes on from the blocks already written.")
                    st.rerun()
    if was_active and not job.active:
        st.rerun()


job = svc.prediction(pick)
st.fragment(progress, run_every=1.0 if job.active else None)(pick, job.active)
if job.status != RunStatus.FINISHED:
    st.stop()

# --- the viewer -----------------------------------------------------------------------------------
def viewer(job) -> int:
    """The prediction as overlays and its metrics; returns the slice shown. A function, so that the
    arrays it draws with are freed when it returns (page globals live on in the session with the
    fragment above, one set per viewer)."""
    probs = svc.prediction_output(job.id)
    volume = volume_or_stop(svc, dataset_id)
    kinds = svc.slice_kinds(dataset_id)
    controls, picture = st.columns([1, 3])
    with controls:
        z = st.select_slider("Slice", job.slices, key=f"pred_slice_{job.id}") if len(job.slices) > 1 else job.slices[0]
        layers = st.multiselect("Overlays", LAYERS, default=["mask"], key="pred_layers")
        opacity = st.slider("Opacity", 0.0, 1.0, 0.45, 0.05, key="pred_opacity")
        side_by_side = st.toggle("Side by side", key="pred_side")
    index = job.slices.index(z)
    # a slice larger than the picture is read every s-th pixel: the picture's size, never the whole slice
    s = View.fit(volume.shape[1:], target=640 if side_by_side else 768).shrink
    step = (slice(None, None, s), slice(None, None, s))
    image = volume[(z, *step)]
    target = svc.mask(kinds[z].id)[step] if z in kinds else None
    rgb, shown = compose(image, probs[(index, *step)], layers, opacity, target=target,
                         instances=svc.prediction_output(job.id, "instances")[(index, *step)]
                         if "instances" in layers else None)
    if "errors" in layers:
        controls.caption("Slice has no mask: no error map." if target is None else
                         "Errors: magenta = false neuron (neuron predicted on membrane), green = missed neuron.")
    view = View.fit(image.shape, target=640 if side_by_side else 768)
    with picture:
        if side_by_side:
            a, b = st.columns(2)
            a.image(view.render(rgb), caption=f"slice {z}")
            b.image(view.render(shown), caption=", ".join(layers) or "no overlay")
        else:
            st.image(view.render(shown), caption=f"slice {z}: {', '.join(layers) or 'no overlay'}")

    metrics = job.metrics or {}
    if metrics.get("slices"):
        this = metrics["slices"].get(str(z))
        cols = st.columns(len(METRICS))
        for col, (key, name) in zip(cols, METRICS.items(), strict=True):
            value = this.get(key) if this else None
            col.metric(f"{name} (slice {z})", "–" if value is None else f"{value:.3f}",
                       help=f"stack mean: {metrics['mean'].get(key, float('nan')):.3f}")
        with st.expander("Metrics per slice (against each slice's latest mask)"):
            st.dataframe(metric_rows(metrics), hide_index=True, key="pred_metrics")
    else:
        st.caption("No masks on the predicted slices: no metrics.")
    return z


z = viewer(job)

# --- export and correct ---------------------------------------------------------------------------
actions = st.columns(4)
for col, (output, label) in zip(actions, (("probabilities", "Probabilities (float32 TIFF)"),
                                          ("mask", "Mask (0/255 TIFF)"), ("instances", "Instances (TIFF)")),
                                strict=False):
    # the bytes are read when the button is clicked, not on every rerun of every viewer
    col.download_button(label, lambda output=output: svc.prediction_file(job.id, output),
                        file_name=f"prediction-{job.id}-{output}.tif", mime="image/tiff", key=f"download_{output}",
                        on_click="ignore")


with st.expander("Export as OME-Zarr to a folder on the server (napari, neuroglancer)"):
    with st.form("export_form"):
        target = st.text_input("Folder", placeholder="/data/exports", key="export_folder")
        go = st.form_submit_button("Export")
    if go:
        try:
            written = svc.export_prediction(job.id, target)
        except UserError as exc:
            st.error(f"Nothing was exported: {exc}.")
        else:
            st.success("Written: " + ", ".join(f"`{p}`" for p in written))


def _correct() -> None:
    select_dataset(dataset_id)
    st.session_state[f"annotate_slice_{dataset_id}"] = z
    st.session_state.setdefault("slice_of", {})[dataset_id] = z
    st.session_state["start_request"] = (dataset_id, z, job.id)


if actions[3].button("Correct this slice", key="correct_slice", on_click=_correct,
                     help="Open Annotate with this prediction as the starting mask"):
    st.switch_page("pages/annotate.py")
