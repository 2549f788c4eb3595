"""Predict: segment a dataset's slices with a checkpoint in the background, look at the result as
overlays (probability, mask, contours, instances, errors against the labels), read the metrics, export
TIFFs, and send a slice to Annotate to correct it."""

from __future__ import annotations

import streamlit as st

import pages.state as state
from domain.kinds import RunKind, RunStatus
from domain.records import aware
from pages.common import (
    attempt,
    can,
    data_table,
    dataset_picker,
    flash,
    select_dataset,
    start_page,
    still_signed_in,
    volume_or_stop,
)
from pages.upload import upload_stack
from storage.service import UserError
from ui.paint import View
from ui.prediction import (
    CARDS,
    DEVICES,
    LAYERS,
    METRICS,
    POSTPROCESS,
    POSTPROCESS_CHOICES,
    compose,
    describe_error,
    focus,
    largest_errors,
    legend_bar,
    metric_rows,
    neuron_rows,
    scoring_note,
    sections,
    seen_word,
    slices_words,
    split_scores,
)
from ui.prediction import progress as job_progress
from ui.prediction import speed as job_speed
from ui.text import plain, said_by_job
from ui.training import checkpoint_label, default_checkpoint

svc = start_page("Predict")

datasets = svc.datasets()
if not datasets:
    st.info("No datasets yet: load the demo on the home page or upload a stack on **Datasets**.")
    st.stop()
checkpoints = {c.id: c for c in svc.checkpoint_choices()}


top = st.columns([3, 3])
with top[1]:
    dataset_id = dataset_picker(datasets, key="dataset_pick_predict")  # (a key of its own on each page)
    with st.popover("Upload a new stack"):
        upload_stack(svc, "predict_upload", lambda new: f"Stored **{plain(new.name)}**; it is selected for prediction.")
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
    if any(s.run_id == checkpoints[checkpoint_id].run_id and s.worse_than_parent
           for s in svc.held_out_scores(dataset_id)):
        st.warning(f"Run {checkpoints[checkpoint_id].run_id} scores worse than its parent on this dataset's "
                   "held-out slices (Runs): its parent may predict better.", icon=":material/trending_down:")
info = svc.dataset(dataset_id)

with st.form("predict_form"):
    slices_text = st.text_input("Slices", "all", help=f"all, or e.g. 0-4,9 (the stack has 0-{info.shape[0] - 1})",
                                key="predict_slices")
    postprocess = st.selectbox(
        "Neurons by", POSTPROCESS_CHOICES, format_func=POSTPROCESS.get, key="predict_postprocess",
        help="How the neuron instances are made from the probability map. The first is the default: it "
             "scored best on ISBI 2012 (docs/benchmarks.md, bench.quality).")
    tta = st.checkbox(
        "Average 8 flips (test-time augmentation)", key="predict_tta",
        help="The network answers each tile flipped and turned eight ways, and the answers are averaged: "
             "fewer errors at the borders (the starter's twin on ISBI: pixel error 0.068 instead of 0.071), "
             "for 8× the prediction time.")
    go = st.form_submit_button("Predict", type="primary", key="predict_go", disabled=not can("predict"))
PREDICTION = "prediction_id"  # (this page's own key: the prediction shown)


def _start() -> tuple:
    slices = svc.parse_slices(slices_text, info.shape[0])
    return svc.predict(checkpoint_id, dataset_id, slices, postprocess=postprocess, tta=tta), slices


def _started(started: tuple) -> None:
    job, slices = started
    st.session_state[PREDICTION] = job.id
    flash(f"Prediction #{job.id} started on {len(slices)} slice{'s' if len(slices) != 1 else ''}.", "info")


if go:
    attempt(_start, _started, failed=lambda exc: f"Not started: {plain(exc)}", errors=(ValueError, UserError))

predictions = svc.predictions(dataset_id=dataset_id)
if not predictions:
    st.caption("No prediction of this dataset yet.")
    st.stop()
ids = [p.id for p in reversed(predictions)]
wanted = st.session_state.get(PREDICTION)  # the one just started, or the one the user picked
if wanted not in ids:  # else the URL's (a reload, a bookmark), else the newest
    wanted = next((i for i in ids if str(i) == st.query_params.get("prediction")), None)
pick_key = f"pick_{dataset_id}"
if st.session_state.get(pick_key) != (wanted if wanted in ids else ids[0]):  # only then (an open menu stays)
    st.session_state[pick_key] = wanted if wanted in ids else ids[0]


def model_words(p) -> str:
    """The prediction's model as the checkpoint picker names it ("starter model …"), else its run."""
    c = checkpoints.get(p.checkpoint_id)
    return checkpoint_label(c) if c is not None and c.run_kind != RunKind.TRAIN else f"run {p.run_id}"


def _picked() -> None:
    st.session_state[PREDICTION] = st.session_state[pick_key]


pick = st.selectbox("Prediction", ids, key=pick_key, on_change=_picked,
                    format_func=lambda i: next(f"#{p.id} · {model_words(p)} · {len(p.slices)} "
                                               f"slice{'s' if len(p.slices) != 1 else ''} · "
                                               f"neurons by {p.postprocess}" + (" · 8 flips" if p.tta else "")
                                               + (f" · {DEVICES.get(p.device, p.device)}" if p.device else "")
                                               for p in predictions if p.id == i))
st.session_state[PREDICTION] = pick
if st.query_params.get("prediction") != str(pick):  # in the URL too: a reload opens this prediction
    st.query_params["prediction"] = str(pick)


def progress(prediction_id: int, was_active: bool) -> None:
    if not still_signed_in():
        return
    job = svc.prediction(prediction_id)
    if job.active:
        fraction, text = job_progress(job)
        st.progress(fraction, text=f"Prediction #{job.id} · {job.status.lower()}: {text}")
        if not job.stopping:
            refused = svc.refusal("manage", "prediction", job.id)
            if st.button("Cancel", key=f"cancel_prediction_{job.id}", disabled=bool(refused),
                         help=refused or "Stops after the blocks it is on; the blocks written are kept, and "
                                         "Resume goes on from them."):
                attempt(lambda: svc.cancel_prediction(job.id),
                        lambda info: f"Prediction #{job.id} " + (
                            "is stopping after the blocks it is on." if info.active else "is cancelled."
                            if info.status == RunStatus.CANCELLED else f"had already ended ({info.status.lower()})."))
            if refused:
                st.caption(refused)
    elif job.status in (RunStatus.FAILED, RunStatus.CANCELLED):
        said = said_by_job(job.error)
        if job.status == RunStatus.FAILED:
            st.error(f"Prediction #{job.id} failed: {said}")
        else:  # (asked for: not an error)
            st.warning(f"Prediction #{job.id} was stopped: {said}", icon=":material/stop_circle:")
        kept = f" ({job.done} block{'s are' if job.done != 1 else ' is'} written and kept)" if job.done else ""
        refused = svc.refusal("manage", "prediction", job.id)
        if st.button(f"Resume{kept}", key=f"resume_prediction_{job.id}", type="primary",
                     disabled=bool(refused), help=refused or None):
            attempt(lambda: svc.resume_prediction(job.id),
                    lambda _: f"Prediction #{job.id} goes on from the blocks already written.")
        if refused:
            st.caption(refused)
    elif (said := job_speed(job)) is not None:
        st.caption(said)
    if was_active and not job.active:
        st.rerun()


def delete_view(job) -> None:
    """Delete a prediction that has ended: its outputs go, its model, stack and masks stay (the owner's or
    an admin's; the service checks the call again)."""
    with st.expander("Delete this prediction"):
        preview = svc.prediction_deletion_preview(job.id)
        st.warning(f"Deleting prediction #{job.id} removes {preview.describe()}: its probabilities, masks, "
                   "instances and neurons. Its model, the stack and the masks stay.")
        refused = svc.refusal("manage", "prediction", job.id)
        if refused:
            st.caption(refused)
        if st.button("Delete prediction", type="primary", disabled=bool(refused), key=f"delete_prediction_{job.id}"):
            def deleted(removed) -> str:
                st.session_state.pop(PREDICTION, None)
                return f"Deleted prediction #{job.id}: {removed.describe()}."

            attempt(lambda: svc.delete_prediction(job.id), deleted)


job = svc.prediction(pick)
st.fragment(progress, run_every=1.0 if job.active else None)(pick, job.active)
if job.status != RunStatus.FINISHED:
    if not job.active:
        delete_view(job)
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
    if "probability" in layers:
        controls.image(legend_bar(), caption="probability: 0 membrane → 1 neuron", width="stretch")
    if "uncertainty" in layers:
        controls.caption("Uncertainty: magenta where the prediction is unsure (near 0.5; with test-time flips, where "
                         "the eight disagree). Annotate's **Next to fix** goes there first.")
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
        trained = set(svc.trained_on(job.checkpoint_id, dataset_id))
        frozen = svc.held_out(dataset_id)
        held = set(frozen.slices) if frozen else set()
        unseen, unseen_mean, seen, seen_mean = split_scores(metrics, trained)

        elsewhere = svc.trained_elsewhere(job.checkpoint_id, dataset_id)
        if elsewhere:  # (an imported model, the starter on its own stack: "never trained on" is not known)
            st.warning(f"This model {elsewhere}. The scores below may flatter it: label a slice of a stack it "
                       "cannot have seen, or fine-tune it here and hold a slice out.", icon=":material/visibility:")
        if unseen:
            many = "s" if len(unseen) > 1 else ""
            st.markdown(f"**On the {len(unseen)} labelled slice{many} it did not train on here** "
                        f"({slices_words(unseen)})" if elsewhere else
                        f"**On the {len(unseen)} labelled slice{many} this model never trained on** "
                        f"({slices_words(unseen)}): its accuracy on data it has not seen.")
            cols = st.columns(len(CARDS))
            counted = sum("rand_f" in metrics["slices"][str(z)] for z in unseen)
            for col, key in zip(cols, CARDS, strict=True):
                value = unseen_mean.get(key)
                partly = (f"over the {counted} of these slices that outline two neurons whole"
                          if key != "pixel_error" and counted != len(unseen) else "")
                flattering = (f"on the {len(seen)} slices it trained on: {seen_mean[key]:.3f} (flattering)"
                              if seen and key in seen_mean else "")
                col.metric(METRICS[key], "–" if value is None or value != value else f"{value:.3f}",
                           help="; ".join(filter(None, (partly, flattering))) or None)
            if counted != len(unseen):
                st.caption(f"The neuron scores count {counted} of these {len(unseen)} slices: the others do not "
                           "outline two neurons whole (the table below says which).")
        else:
            st.warning(f"This model trained on every labelled slice predicted here ({slices_words(seen)}): its "
                       "scores below flatter it. Label a slice it has not seen, or hold one out on **Datasets**, "
                       "to measure it.", icon=":material/visibility:")
        if seen:
            st.caption(f"Trained on {slices_words(seen)}: mean " + " · ".join(
                f"{METRICS[k]} {seen_mean[k]:.3f}" for k in CARDS[:2] if k in seen_mean) + " (not its accuracy).")
        this = metrics["slices"].get(str(z))
        if this:
            st.caption(f"Slice {z} ({seen_word(z, trained, held)}): " + " · ".join(
                f"{METRICS[k]} {this[k]:.3f}" for k in CARDS if k in this))
        with st.expander("Metrics per slice (against each slice's mask when it was predicted)"):
            data_table(metric_rows(metrics, trained, held), hide_index=True, key="pred_metrics")
            st.caption(scoring_note(metrics))
    else:
        st.caption("No mask on the predicted slices when it ran: no metrics.")
    newer = [z for z in job.slices if z in kinds and kinds[z].labelled_pixels > 0
             and aware(kinds[z].created) > aware(job.created)]
    if newer:
        st.caption(f"{slices_words(newer, 'have').capitalize()} a mask saved since this prediction ran, which its "
                   "scores do not count: predict again to score against it.")
    if "neurons" in metrics:
        neurons_view(job, volume, metrics["neurons"])
    errors = largest_errors(metrics)
    if errors:
        with st.expander(f"Errors to fix: the {len(errors)} largest merges and splits against the masks"):
            st.caption("Each instance against the neurons of the slice's latest mask. **Open** shows the place on "
                       "Annotate, zoomed, with this prediction as the starting mask.")
            for i, error in enumerate(errors):
                text, button = st.columns([5, 1])
                text.markdown(describe_error(error))
                if button.button("Open", key=f"open_error_{job.id}_{i}", on_click=_open_error,
                                 args=(error, volume.shape[1:])):
                    st.switch_page("pages/annotate.py")
    return z


def _open_error(error, shape) -> None:
    """Annotate on the error's slice and region (zoom and centre), starting from this prediction."""
    zoom, cy, cx = focus(error["box"], shape)
    state.focus_annotate(zoom, cy, cx)
    _correct(error["slice"])


def neurons_view(job, volume, info) -> None:
    """The 3D neurons: how many, the largest, and sections through the stack along X and Y."""
    linked = "linked across the predicted slices" if len(job.slices) > 1 else "on the one predicted slice"
    with st.expander(f"3D neurons: {info['count']:,} {linked}", expanded=False):
        st.caption("Each slice's neurons are linked to the neighbouring slice's by overlap (each the other's best "
                   "match, covering half of the smaller). Slices that were not predicted break the chain.")
        data_table(neuron_rows(info), hide_index=True, key=f"neuron_sizes_{job.id}")
        # read only when asked: a section reads a row (or a column) of every predicted slice
        if not st.toggle("Sections through the stack (XZ and YZ)", key=f"neuron_sections_{job.id}"):
            return
        height, width = volume.shape[1:]
        a, b = st.columns(2)
        y = a.slider("XZ section at row", 0, height - 1, height // 2, key=f"neuron_y_{job.id}")
        x = b.slider("YZ section at column", 0, width - 1, width // 2, key=f"neuron_x_{job.id}")
        neurons = svc.prediction_output(job.id, "neurons")
        s = max(1, max(height, width) // 768)
        shown = job.slices[:512]  # at most 512 slices (a taller section would not fit the page anyway)
        stretch = max(1, min(8, max(height, width) // s // (4 * len(shown))))
        xz, yz = sections(volume, neurons, shown, y, x, s, stretch)
        a.image(xz, caption=f"XZ at row {y} (slices top to bottom)", width="stretch")
        b.image(yz, caption=f"YZ at column {x} (slices top to bottom)", width="stretch")


z = viewer(job)

# --- export and correct ---------------------------------------------------------------------------
downloads = [("probabilities", "Probabilities (float32 TIFF)"), ("mask", "Mask (0/255 TIFF)"),
             ("instances", "Instances (TIFF)")]
if "neurons" in (job.metrics or {}):
    downloads.append(("neurons", "3D neurons (TIFF)"))
actions = st.columns(len(downloads) + 1)
for col, (output, label) in zip(actions, downloads, strict=False):
    # the bytes are read when the button is clicked, not on every rerun of every viewer
    col.download_button(label, lambda output=output: svc.prediction_file(job.id, output),
                        file_name=f"prediction-{job.id}-{output}.tif", mime="image/tiff", key=f"download_{output}",
                        on_click="ignore")


_, export_root = svc.server_folders()
with st.expander("Export as OME-Zarr to a folder on the server (napari, neuroglancer)"):
    if export_root is None:  # off unless an admin names the one folder: an export writes on the server
        st.info("Exporting to a folder on the server is **off** on this server: download the outputs as TIFF "
                "files above. An admin turns it on by naming the folder exports go into in the environment "
                "variable `NEUROSEG_EXPORT_ROOT` and restarting Neuroseg.", icon=":material/block:")
    elif not can("create"):
        st.info("Exporting to the server needs the annotator role (it writes there): download the outputs as "
                "TIFF files above.", icon=":material/visibility:")
    else:
        st.caption(f"Exports go into `{export_root}`, or a folder inside it that you name, as "
                   f"`prediction-{job.id}-<output>.ome.zarr`.")
        with st.form("export_form"):
            target = st.text_input("Folder inside the export folder (optional)", placeholder="lab/2026-12",
                                   key="export_folder")
            go = st.form_submit_button("Export")
        if go:
            def _written(paths: list) -> None:
                st.success("Written: " + ", ".join(f"`{p}`" for p in paths))

            attempt(lambda: svc.export_prediction(job.id, target), _written, rerun=None,
                    failed=lambda exc: f"Nothing was exported: {plain(str(exc).rstrip('.'))}.")


def _correct(slice_index: int | None = None) -> None:
    shown = z if slice_index is None else slice_index
    select_dataset(dataset_id)
    state.open_annotate_at(dataset_id, shown)
    state.request_start(dataset_id, shown, job.id)


may_not = svc.refusal("annotate")
if actions[-1].button("Correct this slice", key="correct_slice", on_click=_correct, disabled=bool(may_not),
                     help=may_not or "Open Annotate with this prediction as the starting mask"):
    st.switch_page("pages/annotate.py")
delete_view(job)
