"""Train, Predict and Runs under AppTest over a real store, with real background processes: a tiny run
submitted from the Train page trains in its worker to FINISHED, Predict segments slices in its own
process and shows overlays and metrics, the correction of a slice is saved as "predicted→painted", and
Runs lists, compares and deletes."""

import io
import os
import re
import select
from pathlib import Path

import numpy as np
import pytest
import tifffile
from streamlit.testing.v1 import AppTest

from storage.service import Neuroseg
from storage.settings import Settings
from tests.accounts import make_user
from tests.app.test_pages import PAGES, draw, texts, walk
from unet.network.config import preset
from unet.training.labels import MEMBRANE

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def wait_exit(pid: int | None, timeout: float = 300) -> None:
    """Block until process ``pid`` has exited (a pidfd becomes readable then), without polling."""
    assert pid, "no process recorded"
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"process {pid} still running after {timeout} s"
    finally:
        os.close(fd)


def open_page(title: str, user: str = "ann", role: str = "annotator") -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.session_state["auth_token"] = make_user(os.environ["NEUROSEG_DATA_DIR"], user, role)
    at.run()
    at.switch_page(PAGES[title]).run()
    assert not at.exception, at.exception
    return at


def test_pages_say_what_is_missing_with_an_empty_store(app_data_dir):
    assert "No dataset has labelled slices yet" in texts(open_page("Train").info)
    assert "No datasets yet" in texts(open_page("Predict").info)
    assert "No runs yet" in texts(open_page("Runs").info)


def test_train_predict_correct_and_review(app_data_dir):
    svc = Neuroseg(Settings.from_env(app_data_dir), supervise=False)
    demo = svc.load_demo()

    # --- Train: the default split, the tiny preset, submitted from the page --------------------------
    at = open_page("Train")
    assert at.text_input(key=f"train_slices_{demo.id}").value == "0,1,2,3,4,5,6"
    assert at.text_input(key=f"val_slices_{demo.id}").value == "7"
    plan = at.dataframe[0].value
    assert list(plan["version"]) == ["v1"] * 8 and set(plan["kind"]) == {"uploaded"}
    assert not [w for w in at.warning if "No validation slices" in w.value]
    at.text_input(key=f"val_slices_{demo.id}").set_value("").run()  # none: the page says what that costs
    assert any("No validation slices: nothing measures this run" in w.value for w in at.warning)
    at.text_input(key=f"val_slices_{demo.id}").set_value("7").run()
    at.radio(key="train_preset").set_value("tiny").run()
    assert at.number_input(key="k_steps_tiny").value == 30
    at.button(key="train_submit").click().run()
    assert not at.exception, at.exception
    run = svc.runs()[0]
    assert run.spec["preset"] == "tiny" and run.config["steps"] == 30
    assert "Status: **QUEUED**" in texts(at.markdown) or "Status: **RUNNING**" in texts(at.markdown)
    wait_exit(svc.run(run.id).pid)
    at.run()
    assert "Status: **FINISHED**" in texts(at.markdown)
    assert "step 30 of 30" in str([e.proto for e in walk(at.main) if getattr(e, "type", "") == "progress"])
    assert sum(getattr(e, "type", "") == "plotly_chart" for e in walk(at.main)) == 2  # loss and validation
    assert [m.role for m in svc.run_masks(run.id)].count("val") == 1
    assert open_page("Train").radio(key="train_preset").value == "tiny", "a reload offers the recipe used last"
    assert open_page("Train", "bea").radio(key="train_preset").value != "tiny", "…by that user"

    # --- Predict: slices 0-1 in the background, then overlays, metrics, exports -------------------------
    at = open_page("Predict")
    at.text_input(key="predict_slices").set_value("0-1")
    at.button(key="predict_go").click().run()
    job = svc.predictions(dataset_id=demo.id)[-1]
    assert job.slices == [0, 1]
    wait_exit(job.pid)
    at.run()
    assert not at.exception, at.exception
    assert svc.prediction(job.id).status == "FINISHED"
    # how fast it ran, and where (slices per second on a GPU; seconds per slice on this CPU)
    assert re.search(r"Predicted 2 slices in [\d.]+ s on the CPU: [\d.]+ (s per slice|slices per second)\.",
                     texts(at.caption)), texts(at.caption)
    # the run trained on both slices: no headline passes their scores off as the model's accuracy
    assert not [m for m in at.metric if m.label == "pixel error"]
    assert any("trained on every labelled slice predicted here (slices 0, 1)" in w.value for w in at.warning)
    per_slice = next(d.value for d in at.dataframe if "the model" in d.value.columns)
    assert list(per_slice["the model"]) == ["trained on", "trained on", "2 slices"]
    assert at.selectbox(key="predict_postprocess").value == svc.prediction(job.id).postprocess
    # its slices' neurons linked into 3D neurons, with sections through the stack and their sizes
    count = svc.prediction(job.id).metrics["neurons"]["count"]
    assert any(f"3D neurons: {count} linked" in e.label for e in at.expander) and count >= 1
    neurons = tifffile.imread(io.BytesIO(svc.prediction_file(job.id, "neurons")))
    assert neurons.shape == (2, 256, 256) and len(np.unique(neurons[neurons > 0])) == count
    at.multiselect(key="pred_layers").set_value(["probability", "mask", "membrane contours", "instances",
                                                 "errors"]).run()
    assert not at.exception and "magenta = false neuron" in texts(at.caption)
    at.toggle(key="pred_side").set_value(True).run()
    assert sum(getattr(e, "type", "") == "image" for e in walk(at.main)) == 3  # two pictures, the colour legend
    at.toggle(key=f"neuron_sections_{job.id}").set_value(True).run()  # the XZ and YZ sections, when asked
    assert not at.exception and sum(getattr(e, "type", "") == "image" for e in walk(at.main)) == 5
    probabilities = tifffile.imread(io.BytesIO(svc.prediction_file(job.id, "probabilities")))
    assert probabilities.shape == (2, 256, 256) and probabilities.dtype == np.float32
    assert probabilities.min() >= 0 and probabilities.max() <= 1
    instances = tifffile.imread(io.BytesIO(svc.prediction_file(job.id, "instances")))
    assert instances.shape == (2, 256, 256) and instances.max() >= 1
    assert instances.dtype == np.uint16  # integer labels, as docs/user-guide.md promises (ImageJ's integer stack)

    # --- the largest merges and splits against the masks, each opening Annotate on its place -------------
    from ui.prediction import focus, largest_errors

    worst = largest_errors(svc.prediction(job.id).metrics)
    assert worst and worst[0]["kind"] in ("merge", "split")  # a network trained for seconds makes some
    assert any(e.label.startswith("Errors to fix") for e in at.expander)
    errors_at = open_page("Predict")
    errors_at.button(key=f"open_error_{job.id}_0").click().run()
    assert not errors_at.exception, errors_at.exception
    zoom, cy, cx = focus(worst[0]["box"], (256, 256))
    assert errors_at.title[0].value == "Annotate"  # on the error's slice, from this prediction, zoomed on it
    assert errors_at.session_state["drafts"][(demo.id, worst[0]["slice"])].source == "prediction"
    assert tuple(errors_at.session_state[k] for k in ("annotate_zoom", "annotate_cy", "annotate_cx")) == (zoom, cy, cx)

    # --- Correct this slice → Annotate starts from the prediction; the save is predicted→painted ---------
    at.button(key="correct_slice").click().run()
    assert at.title[0].value == "Annotate"
    draft = at.session_state["drafts"][(demo.id, 0)]
    assert (draft.source, draft.kind) == ("prediction", "predicted→painted")
    at.switch_page(PAGES["Annotate"])  # AppTest stays on the page it was last told, not where the app went
    draw(at, slice(0, 60), slice(0, 60), MEMBRANE)
    at.button(key="save_mask").click().run()
    saved = svc.history(demo.id, 0)[-1]
    assert (saved.version, saved.kind) == (2, "predicted→painted")
    assert (svc.mask(saved.id)[:15, :15] == MEMBRANE).all()

    # --- Next to fix: the edit keeps what was saved on the slice, with the tools on the prediction's neurons;
    # an unsaved edit kept in the store (another tab) is never replaced nor erased by a start nobody chose -----
    svc.rank_work(demo.id)
    top = svc.work_list(demo.id).open[0]
    assert top.source == f"prediction {job.id}"
    z, other = top.slice_index, 1 - top.slice_index  # (the prediction covers slices 0 and 1)
    at = open_page("Annotate")
    at.slider(key=f"annotate_slice_{demo.id}").set_value(other).run()  # this tab: a clean edit of the other slice
    tab = open_page("Annotate")  # another tab of the same user paints there and leaves it unsaved
    tab.slider(key=f"annotate_slice_{demo.id}").set_value(other).run()
    draw(tab, slice(0, 90), slice(0, 90), MEMBRANE)  # kept in the store as it is drawn
    unsaved = tab.session_state["drafts"][(demo.id, other)].working.copy()
    at.button(key="next_work").click().run()
    assert not at.exception, at.exception
    latest = svc.history(demo.id, z)[-1]
    draft = at.session_state["drafts"][(demo.id, z)]
    assert (draft.source, draft.source_mask_id, draft.prediction_id) == ("latest", latest.id, job.id)
    np.testing.assert_array_equal(draft.working, svc.mask(latest.id))
    assert at.button(key="accept_confident")  # the object tools are at hand
    ann = next(u.id for u in svc.users() if u.username == "ann")
    assert svc.stored_draft(demo.id, other, f"user:{ann}") is not None  # the other tab's edit is still kept
    at.session_state["start_request"] = (demo.id, other, job.id, True)  # what Next onto that slice asks for
    at.slider(key=f"annotate_slice_{demo.id}").set_value(other).run()
    assert not at.exception, at.exception
    kept = at.session_state["drafts"][(demo.id, other)]
    np.testing.assert_array_equal(kept.working, unsaved)  # brought back, not replaced
    assert kept.prediction_id == job.id and "unsaved changed pixels on this slice are kept" in texts(at.info)
    assert svc.stored_draft(demo.id, other, f"user:{ann}") is not None
    at.session_state["start_request"] = (demo.id, other, job.id, False)  # "Correct this slice" on it: not opened,
    at.run()  # and the page says so as long as the edit is unsaved (the canvas reruns the page at once)
    at.run()
    assert f"Prediction #{job.id} was not opened: this slice has" in texts(at.info), texts(at.info)
    # the tools' confidence is kept through a visit to another page, as the brush is
    at.slider(key="annotate_confidence").set_value(0.75).run()
    at.switch_page(PAGES["Datasets"]).run()
    at.switch_page(PAGES["Annotate"]).run()
    assert not at.exception and at.slider(key="annotate_confidence").value == 0.75

    # the same slice again, averaged over the 8 flips: a prediction of its own, marked so, with another map
    flips_at = open_page("Predict")
    flips_at.text_input(key="predict_slices").set_value("0")
    flips_at.checkbox(key="predict_tta").check()
    flips_at.button(key="predict_go").click().run()
    flipped = svc.predictions(dataset_id=demo.id)[-1]
    assert flipped.id != job.id and flipped.tta and not svc.prediction(job.id).tta
    wait_exit(flipped.pid)
    flips_at.run()
    assert svc.prediction(flipped.id).status == "FINISHED" and not flips_at.exception
    assert "8 flips" in flips_at.selectbox(key=f"pick_{demo.id}").format_func(flipped.id)
    plain = tifffile.imread(io.BytesIO(svc.prediction_file(job.id, "probabilities")))[0]
    averaged = tifffile.imread(io.BytesIO(svc.prediction_file(flipped.id, "probabilities")))[0]
    assert np.abs(averaged - plain).max() > 1e-3

    # --- a second run, fine-tuned from the first, then Runs: lineage, compare, delete -----------------------
    best = next(c for c in svc.checkpoints(run.id) if c.kind == "best")
    second = svc.submit_training([{"dataset_id": demo.id, "slices": [0, 1]}], [{"dataset_id": demo.id, "slices": [7]}],
                                 preset("tiny", lr=5e-3), preset="tiny", parent_checkpoint_id=best.id)
    wait_exit(second.pid)
    assert svc.run(second.id).status == "FINISHED"
    at = open_page("Runs", "boss", "admin")  # the second run is the system's: an admin deletes it
    table = at.dataframe[0].value
    assert list(table["run"]) == [second.id, run.id] and list(table["status"]) == ["FINISHED", "FINISHED"]
    assert list(table["parent"]) == [f"run {run.id}", ""]
    assert f"run {run.id} → **run {second.id}**" in texts(at.markdown)
    compare = at.dataframe[-1].value
    differing = compare[compare["differs"] == "●"]
    assert list(differing["setting"]) == ["lr"]
    assert list(differing[f"run {run.id}"]) == ["0.01"] and list(differing[f"run {second.id}"]) == ["0.005"]
    assert "1 setting(s) differ (marked ●)." in texts(at.caption)
    preview = svc.run_deletion_preview(second.id)
    assert preview.runs == 1 and preview.checkpoints == 2
    assert f"removes {preview.describe()}" in texts(at.warning)
    at.checkbox(key=f"sure_{second.id}").check().run()
    at.button(key=f"delete_run_{second.id}").click().run()
    assert f"Deleted run {second.id}: {preview.describe()}." in texts(at.success)
    assert [r.id for r in svc.runs()] == [run.id]
    assert not (app_data_dir / "runs" / str(second.id)).exists()


def test_cancel_resume_and_a_reload_finds_the_run(app_data_dir):
    svc = Neuroseg(Settings.from_env(app_data_dir), supervise=False)
    demo = svc.load_demo()
    at = open_page("Train")
    at.radio(key="train_preset").set_value("tiny").run()
    at.number_input(key="k_steps_tiny").set_value(100_000).run()
    at.button(key="train_submit").click().run()
    run = svc.runs()[0]
    assert run.config["steps"] == 100_000
    at.button(key=f"cancel_{run.id}").click().run()
    assert svc.run(run.id).status == "CANCELLED" or svc.run(run.id).cancel_requested
    wait_exit(run.pid)
    at.run()
    assert "Status: **CANCELLED**" in texts(at.markdown)

    fresh = open_page("Train")  # a reload: a new browser session finds the run in the store
    assert f"### Run {run.id}" in texts(fresh.markdown) and "Status: **CANCELLED**" in texts(fresh.markdown)
    fresh.button(key=f"resume_{run.id}").click().run()
    resumed = svc.run(run.id)
    assert resumed.status in ("QUEUED", "RUNNING") and resumed.pid
    svc.cancel_run(run.id)
    wait_exit(resumed.pid)
    assert svc.run(run.id).status == "CANCELLED"
    assert demo.id in svc.run(run.id).dataset_ids


def test_a_prediction_whose_checkpoint_is_damaged_fails_with_the_reason(app_data_dir):
    from unet.network.config import preset as make

    svc = Neuroseg(Settings.from_env(app_data_dir), supervise=False)
    demo = svc.load_demo()
    run = svc.submit_training([{"dataset_id": demo.id, "slices": [0]}], [], make("tiny", steps=2), preset="tiny")
    wait_exit(run.pid)
    checkpoint = svc.checkpoints(run.id)[0]
    (app_data_dir / checkpoint.file).write_bytes(b"not a checkpoint")
    job = svc.predict(checkpoint.id, demo.id, [0])
    wait_exit(job.pid)
    failed = svc.prediction(job.id)
    assert failed.status == "FAILED" and "does not match its recorded checksum" in failed.error
    at = open_page("Predict")
    assert f"Prediction #{job.id} failed" in texts(at.error)
    assert at.button(key=f"delete_prediction_{job.id}").disabled  # the system's: not an annotator's to delete
    at = open_page("Predict", "boss", "admin")
    preview = svc.prediction_deletion_preview(job.id)
    assert preview.predictions == 1 and f"removes {preview.describe()}" in texts(at.warning)
    at.button(key=f"delete_prediction_{job.id}").click().run()
    assert f"Deleted prediction #{job.id}: {preview.describe()}." in texts(at.success)
    assert svc.predictions(run_id=run.id) == [] and not (app_data_dir / "predictions" / str(job.id)).exists()
    job = svc.predict(checkpoint.id, demo.id, [0])  # another, which the checkpoint's delete takes with it
    wait_exit(job.pid)
    runs_page = open_page("Runs", "boss", "admin")  # (the run is the system's: an admin's to delete from)
    runs_page.button(key=f"del_ckpt_{checkpoint.id}").click().run()
    assert f"Deleted the {checkpoint.kind} checkpoint of run {run.id}" in texts(runs_page.success)
    assert [c.id for c in svc.checkpoints(run.id)] != [] and checkpoint.id not in [
        c.id for c in svc.checkpoints(run.id)]
    assert not (app_data_dir / checkpoint.file).exists() and svc.predictions(run_id=run.id) == []
    assert not (app_data_dir / "predictions" / str(job.id)).exists()
    at = open_page("Predict")
    # a new stack can be uploaded right there, and is selected for prediction
    stack = io.BytesIO()
    tifffile.imwrite(stack, np.random.default_rng(0).integers(0, 255, (5, 64, 80), dtype=np.uint8))
    at.file_uploader(key="predict_upload_file").upload("new stack.tif", stack.getvalue(), "image/tiff")
    at.button(key="predict_upload_go").click().run()
    assert "Stored **new stack**; it is selected for prediction." in texts(at.success)
    new = svc.datasets()[-1]
    assert new.shape == (5, 64, 80) and at.selectbox(key="dataset_pick_predict").value == new.id


def test_a_prediction_is_cancelled_from_its_page_by_its_owner_only(app_data_dir, monkeypatch):
    import signal
    import subprocess

    from sqlalchemy import update

    from storage.auth.accounts import user_by_name
    from storage.jobs.procs import start_time
    from storage.models import Prediction
    from storage.records import predictions
    from tests.store.test_starter import tiny_starter

    tiny_starter(app_data_dir.parent / "models", monkeypatch)
    svc = Neuroseg(Settings.from_env(app_data_dir))  # (it registers the starter model)
    demo = svc.load_demo()
    start = svc.checkpoint_choices()[0].id
    make_user(app_data_dir, "ann")

    def recorded(**values) -> int:  # a prediction of ann's as its process leaves it (no process is started)
        with svc.sessions.begin() as s:
            job = predictions.submit_prediction(s, start, demo.id, [0, 1, 2])
            values["owner_id"] = user_by_name(s, "ann").id
            s.execute(update(Prediction).where(Prediction.id == job.id).values(**values))
        return job.id

    waiting = recorded()
    viewer = open_page("Predict", "val", "viewer")
    assert viewer.button(key=f"cancel_prediction_{waiting}").disabled  # (and the service refuses it too)
    assert any("Your role (viewer) can look and export only" in c.value for c in viewer.caption)  # (said, not hovered)
    at = open_page("Predict")
    assert "queued: starting" in " ".join(p.text for p in at.get("progress"))
    at.button(key=f"cancel_prediction_{waiting}").click().run()
    assert not at.exception, at.exception
    assert f"Prediction #{waiting} is cancelled." in texts(at.success)
    assert f"Prediction #{waiting} was stopped: cancelled before it started" in texts(at.warning)
    assert not at.button(key=f"resume_prediction_{waiting}").disabled

    # a running one's process: a stand-in that never reports (the supervisors see a live process)
    busy = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        running = recorded(status="RUNNING", pid=busy.pid, pid_started=start_time(busy.pid), phase="predict",
                           done=1, total=3, device="cpu")
        at = open_page("Predict")
        at.button(key=f"cancel_prediction_{running}").click().run()
        assert f"Prediction #{running} is stopping after the blocks it is on." in texts(at.success)
        bar = " ".join(p.text for p in at.get("progress"))
        assert "1 of 3 blocks written" in bar and "stopping after the blocks it is on" in bar, bar
        assert not [b for b in at.button if b.key == f"cancel_prediction_{running}"]  # asked once
        assert svc.prediction(running).stopping and svc.prediction(running).status == "RUNNING"
    finally:
        os.killpg(busy.pid, signal.SIGKILL)
        busy.wait()
        svc.close()


def test_a_reload_of_predict_opens_the_prediction_in_its_url(app_data_dir, monkeypatch):
    from storage.records import predictions
    from tests.store.test_starter import tiny_starter

    tiny_starter(app_data_dir.parent / "models", monkeypatch)
    svc = Neuroseg(Settings.from_env(app_data_dir))
    demo = svc.load_demo()
    start = svc.checkpoint_choices()[0].id
    with svc.sessions.begin() as s:  # (recorded only: no process is started)
        older, newer = (predictions.submit_prediction(s, start, demo.id, [z]).id for z in (0, 1))
    svc.close()
    at = open_page("Predict")
    assert at.selectbox(key=f"pick_{demo.id}").value == newer  # (a first visit: the newest)
    assert at.query_params["prediction"] == str(newer)
    at.selectbox(key=f"pick_{demo.id}").select(older).run()
    assert at.query_params["prediction"] == str(older)
    reloaded = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)  # a reload: a new session, same URL
    reloaded.session_state["auth_token"] = make_user(os.environ["NEUROSEG_DATA_DIR"], "ann")
    reloaded.query_params.update(dataset=str(demo.id), prediction=str(older))
    reloaded.run()
    reloaded.switch_page(PAGES["Predict"]).run()
    assert not reloaded.exception, reloaded.exception
    assert reloaded.selectbox(key=f"pick_{demo.id}").value == older


def test_an_ended_live_session_on_train_says_it_ended_not_its_last_phase(app_data_dir):
    """A live session stopped: Train followed it with "FINISHED · stopping: saving the weights"."""
    from storage.models import Run

    svc = Neuroseg(Settings.from_env(app_data_dir), supervise=False)
    demo = svc.load_demo()
    with svc.sessions.begin() as s:
        s.add(Run(kind="live", spec={"dataset_id": demo.id}, config={}, status="FINISHED",
                  phase="stopping: saving the weights"))
    svc.close()
    at = open_page("Train")
    shown = " ".join(m.value for m in at.markdown) + " ".join(c.value for c in at.caption)
    assert "**Live session** (Annotate) · step 0 · finished" in shown and "stopping" not in shown, shown


def test_a_run_that_its_time_budget_ended_says_so(app_data_dir):
    """A 1.5-minute budget ended a run at step 517 of 3000: Train said "FINISHED · step 517 of 3000" and only
    its worker log said why."""
    from storage.models import Metric, Run

    svc = Neuroseg(Settings.from_env(app_data_dir), supervise=False)
    demo = svc.load_demo()
    with svc.sessions.begin() as s:
        run = Run(kind="train", spec={"train": [{"dataset_id": demo.id, "slices": [0]}], "val": []},
                  config={**preset("tiny").to_dict(), "steps": 3000, "max_seconds": 90.0}, status="FINISHED")
        s.add(run)
        s.flush()
        s.add(Metric(run_id=run.id, key="loss", step=517, value=0.3, time=89.5))
    svc.close()
    at = open_page("Train")
    bar = " ".join(p.text for p in at.get("progress"))
    assert "step 517 of 3000: ended early, its time budget of 1.5 min ran out" in bar, bar
