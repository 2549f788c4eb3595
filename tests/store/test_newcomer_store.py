"""The store and engine side of issue 9, on a real SQLite store in tmp_path: drafts kept per user and
slice, a cancel that interrupts a validation, a resume that says where it went on from and stores no
step twice, deletes that wait for a running prediction, samples loaded once, and the time estimate."""

from __future__ import annotations

import importlib
import os
import tempfile

import numpy as np
import pytest

from storage.jobs.procs import start_time
from storage.service import AlreadyLoaded, DraftClash, MaskConflict, Neuroseg, UserError
from storage.settings import Settings
from tests.drafts import new_draft, start_options
from ui.annotation import Draft
from ui.paint import PALETTE, View
from unet.training.labels import MEMBRANE, NEURON


@pytest.fixture
def svc(tmp_path):
    return Neuroseg(Settings.from_env(tmp_path / "data"), supervise=False)


def painted_draft(svc: Neuroseg, dataset_id: int, z: int, cls: int):
    draft = new_draft(svc, dataset_id, z, start_options(svc, dataset_id, z)[0])
    view = View.fit((256, 256), target=256)
    draft.set_view(view)
    rgba = np.zeros((*view.display_shape, 4), np.uint8)
    rgba[10:20, 10:40] = (*PALETTE[cls], 153)
    draft.apply(rgba)
    return draft


def test_drafts_are_kept_per_user_and_slice_and_come_back_as_they_were(svc):
    demo = svc.load_demo()
    ann, bob = painted_draft(svc, demo.id, 0, MEMBRANE), painted_draft(svc, demo.id, 0, NEURON)
    svc.keep_draft(ann, "name:ann")
    svc.keep_draft(bob, "name:bob")
    third = painted_draft(svc, demo.id, 3, MEMBRANE)
    svc.keep_draft(third, "name:ann")
    assert [(d.slice_index, d.changed_pixels) for d in svc.drafts_of("name:ann")] == [(0, ann.changed_pixels),
                                                                                       (3, third.changed_pixels)]
    stored = svc.stored_draft(demo.id, 0, "name:ann")
    back, when = Draft.from_stored(stored), stored.updated
    np.testing.assert_array_equal(back.working, ann.working)
    np.testing.assert_array_equal(back.original, ann.original)
    assert (back.source, back.source_mask_id, back.latest_id, back.kind) == (
        ann.source, ann.source_mask_id, ann.latest_id, ann.kind) and back.dirty and when is not None
    assert (svc.stored_draft(demo.id, 0, "name:bob").working[15, 15]) == NEURON, "each user has their own"
    assert svc.stored_draft(demo.id, 1, "name:ann") is None

    # a restored draft saves like the original (and the kept copy goes), with the tools that made it (a reload
    # lost them: the version listed none); a clean one is not kept
    assert ann.tools == ("brush",) and stored.tools == ("brush",) and back.tools == ("brush",)
    saved = svc.save_draft(back, "ann", owner="name:ann")
    assert saved.version == 2 and svc.stored_draft(demo.id, 0, "name:ann") is None
    assert svc.history(demo.id, 0)[-1].tools == ("brush",)
    assert svc.stored_draft(demo.id, 0, "name:bob") is not None
    clean = new_draft(svc, demo.id, 3, start_options(svc, demo.id, 3)[0])  # (another tab, which never saw it)
    with pytest.raises(DraftClash, match="another tab or browser of yours changed"):
        svc.keep_draft(clean, "name:ann")
    assert [d.slice_index for d in svc.drafts_of("name:ann")] == [3]
    third.discard()
    svc.keep_draft(third, "name:ann")  # discarding = keeping an unchanged draft: forgotten
    assert [d.slice_index for d in svc.drafts_of("name:ann")] == []

    # a damaged kept file does not block the slice: the draft is dropped
    svc.keep_draft(painted_draft(svc, demo.id, 5, MEMBRANE), "name:ann")
    (svc.store.root / "datasets" / str(demo.id) / "drafts").joinpath(
        sorted(os.listdir(svc.store.root / "datasets" / str(demo.id) / "drafts"))[-1]).write_bytes(b"broken")
    assert svc.stored_draft(demo.id, 5, "name:ann") is None and svc.drafts_of("name:ann") == []

    # deleting the dataset takes its drafts (rows and files) with it, and the preview counts them
    preview = svc.deletion_preview(demo.id)
    assert svc.delete_dataset(demo.id) == preview
    assert svc.drafts_of("name:bob") == []


def test_two_tabs_of_one_user_on_one_slice_never_overwrite_each_other_silently(svc):
    """Tab B paints and keeps; tab A, which opened the slice before, paints: its keep is refused (B's edit is
    not overwritten) until A says which to keep. A reload finds the edit kept last; a save forgets only the
    edit it was, so the other tab's edit stays for its own save (which then meets the new version)."""
    demo = svc.load_demo()
    a, b = painted_draft(svc, demo.id, 1, MEMBRANE), painted_draft(svc, demo.id, 1, NEURON)
    svc.keep_draft(b, "name:ann")
    with pytest.raises(DraftClash) as clash:
        svc.keep_draft(a, "name:ann")
    assert clash.value.changed_pixels == b.changed_pixels
    assert svc.stored_draft(demo.id, 1, "name:ann").working[15, 15] == NEURON, "B's edit is still kept"
    svc.keep_draft(b, "name:ann")  # B goes on keeping its own
    reloaded = Draft.from_stored(svc.stored_draft(demo.id, 1, "name:ann"))  # A opens B's edit instead
    svc.keep_draft(reloaded, "name:ann")
    with pytest.raises(DraftClash):  # now B's tab is the one behind
        svc.keep_draft(b, "name:ann")
    svc.keep_draft(a, "name:ann", replace=True)  # or A keeps its own, as asked to
    assert svc.stored_draft(demo.id, 1, "name:ann").working[15, 15] == MEMBRANE
    saved = svc.save_draft(reloaded, "ann", owner="name:ann")  # a tab that is behind saves what it shows…
    assert saved.version == 2 and svc.stored_draft(demo.id, 1, "name:ann").working[15, 15] == MEMBRANE  # …only
    with pytest.raises(MaskConflict):  # A's edit began before v2: its save is refused, and its edit kept
        svc.save_draft(a, "ann", owner="name:ann")
    assert svc.stored_draft(demo.id, 1, "name:ann") is not None


def test_samples_are_loaded_once(svc):
    first = svc.load_demo()
    svc.update(first.id, name="my demo")
    with pytest.raises(AlreadyLoaded, match=r"already loaded as \*\*my demo\*\*") as refused:
        svc.load_demo()
    assert refused.value.dataset_id == first.id and len(svc.datasets()) == 1


def test_a_delete_waits_for_a_running_prediction_and_says_which(svc):
    from datetime import UTC, datetime

    from storage.models import Prediction, WorkItem

    demo = svc.load_demo()
    run = svc.submit_training([{"dataset_id": demo.id, "slices": [0]}], [],
                              importlib.import_module("unet.network.config").preset("tiny", steps=1), preset="tiny")
    from tests.app.test_loop_pages import wait_exit

    wait_exit(svc.run(run.id).pid)
    checkpoint = svc.checkpoints(run.id)[0].id
    with svc.sessions.begin() as s:  # a prediction whose process is this (living) test process
        row = Prediction(checkpoint_id=checkpoint, dataset_id=demo.id, slices=[0], status="RUNNING", done=0, file="",
                         sha256="", files={}, pid=os.getpid(), pid_started=start_time(os.getpid()))
        s.add(row)
        s.flush()
        prediction = row.id
    with pytest.raises(UserError, match=rf"prediction #{prediction} is running on this dataset"):
        svc.delete_dataset(demo.id)
    with pytest.raises(UserError, match=rf"prediction #{prediction} is running on a checkpoint of run {run.id}"):
        svc.delete_run(run.id)
    with svc.sessions.begin() as s:  # its process died: the delete goes ahead
        s.get(Prediction, prediction).pid = 2**22 + 7
        # the queue's items ranked from that prediction and from the run's live session, one done, and another's
        for source, done in ((f"prediction {prediction}", False), (f"prediction {prediction}", True),
                             (f"live {run.id}", False), (f"prediction {prediction + 1}", False), ("", False)):
            s.add(WorkItem(dataset_id=demo.id, slice_index=0, y0=0, x0=0, h=8, w=8, score=1.0, source=source,
                           done_by="ann" if done else None, done_at=datetime.now(UTC) if done else None))
    lent = painted_draft(svc, demo.id, 1, MEMBRANE)  # a kept edit whose object tools act on that prediction
    lent.prediction_id = prediction
    svc.keep_draft(lent, "name:ann")
    assert svc.delete_run(run.id).runs == 1
    # the kept edit stays, without the prediction (a new one may get its id); Next no longer offers the open
    # items whose prediction is gone; what was done stays on record
    work = svc.work_list(demo.id)
    assert sorted(i.source for i in work.open) == ["", f"prediction {prediction + 1}"]
    assert [i.source for i in work.done] == [f"prediction {prediction}"]
    kept = svc.stored_draft(demo.id, 1, "name:ann")
    assert kept.prediction_id is None and (kept.working == lent.working).all()


def test_a_cancel_interrupts_a_running_validation():
    from unet.network.config import preset
    from unet.training.data import TrainData
    from unet.training.labels import labels_to_target
    from unet.training.reporting import NullReporter
    from unet.training.synthetic import make_synthetic_em
    from unet.training.train import train

    volume, labels = make_synthetic_em((4, 96, 96), np.random.default_rng(0), cell_size=20)
    targets = labels_to_target(labels)
    data = TrainData([volume[0]], [targets[0]], list(volume[1:]), list(targets[1:]))

    class CancelDuringValidation(NullReporter):
        def __init__(self):
            self.phases, self.validations = [], []

        def on_phase(self, text):
            self.phases.append(text)

        def on_validation(self, step, metrics, seconds):
            self.validations.append(step)

        def should_stop(self):  # the user presses Cancel while slice 2 of 3 is being validated
            return "validating slice 2 of 3" in self.phases

    reporter = CancelDuringValidation()
    result = train(preset("tiny", steps=50, val_every=5), data, reporter, out_dir=tempfile.mkdtemp())
    assert result.reason == "stopped" and result.steps_done == 5
    assert "validating slice 3 of 3" not in reporter.phases, "the validation did not run to its end"
    assert reporter.validations == [] and reporter.phases[-1] == "training"


def test_a_resume_stores_no_step_twice_and_says_where_it_went_on_from(svc):
    import json

    from storage.jobs.lifecycle import start_segment
    from storage.models import Metric, Run
    from unet.network.config import preset

    demo = svc.load_demo()
    with svc.sessions.begin() as s:
        run = Run(status="RUNNING", spec={}, config=preset("tiny").to_dict(), device="cpu")
        s.add(run)
        s.flush()
        run_id = run.id
        s.add_all([Metric(run_id=run_id, key="loss", step=k, value=1.0, time=float(k)) for k in range(1, 26)])
    out = svc.store.run_dir(run_id)
    out.mkdir(parents=True)
    assert start_segment(svc.sessions, run_id, out, resume=False) == 0  # killed before its first checkpoint
    progress = svc.snapshot(run_id).progress
    assert progress.resumes == [(0, 25)] and progress.step == 0 and "resume" not in svc.curves(run_id)

    with svc.sessions.begin() as s:
        s.add_all([Metric(run_id=run_id, key="loss", step=k, value=1.0, time=float(k)) for k in range(1, 31)])
    (out / "latest.json").write_text(json.dumps({"step": 20}))
    assert start_segment(svc.sessions, run_id, out, resume=True) == 20
    steps = [p[0] for p in svc.curves(run_id)["loss"]]
    assert steps == list(range(1, 21)), "the steps after the checkpoint go: they are trained again"
    assert svc.snapshot(run_id).progress.resumes == [(0, 25), (20, 30)]
    assert demo.id


def test_the_estimate_grows_with_what_a_run_does():
    from unet.network.config import preset
    from unet.training.estimate import estimate_training

    tiny = preset("tiny")
    one, three = estimate_training(tiny, [(256, 256)]), estimate_training(tiny, [(256, 256)] * 3)
    assert one.validations == three.validations == 3
    assert three.validation_s == pytest.approx(3 * one.validation_s) and three.training_s == one.training_s
    longer = estimate_training(preset("tiny", steps=300, val_every=100), [(256, 256)])
    assert longer.training_s == pytest.approx(10 * one.training_s)
    assert estimate_training(tiny, []).validations == 0
    assert "about" in three.describe() and "3 validations" in three.describe()
