"""Scores a lab can trust: a held-out score never includes a slice the run, or a run it was fine-tuned
from, trained on; freezing such a slice names the runs it taints; the best run is chosen among runs that
saw none of them, by a metric the page names; Predict's headline is on the slices the model never trained
on. One store is built once for the module (three real runs and a prediction); the service, the pages
(AppTest) and a real browser each check it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from domain.scores import Score
from storage.models import Run
from storage.service import Neuroseg
from storage.settings import Settings
from tests.store.test_jobs import wait_for
from tests.store.test_live import upload
from ui.training import checkpoint_label, scored_message
from unet.network.config import preset


@dataclass
class Journey:
    data_dir: Path
    svc: Neuroseg
    ds: int
    a: int  # trained on 0–3 before 2 and 5 were frozen as held out
    b: int  # trained on 0, 1: never saw a held-out slice
    c: int  # fine-tuned from a on 0, 1: saw slice 2 through its parent
    frozen_seen_by: dict
    prediction: int  # b's best checkpoint on every slice


@pytest.fixture(scope="module")
def journey(tmp_path_factory, synthetic):
    """The new user's journey: run A trains on 0–3; only then are 2 and 5 frozen as held out; then B (on
    0, 1) and C (fine-tuned from A on 0, 1) train, and B's best predicts the whole stack."""
    folder = tmp_path_factory.mktemp("journey")
    svc = Neuroseg(Settings.from_env(folder / "data"), supervise=False)
    ds = upload(svc, folder, synthetic, "tainted")
    recipe = preset("tiny", steps=8, patch_size=48, val_every=1000, checkpoint_every=1000)
    a = svc.submit_training([{"dataset_id": ds, "slices": [0, 1, 2, 3]}], [{"dataset_id": ds, "slices": [4]}],
                            recipe, preset="tiny")
    wait_for(lambda: svc.run(a.id).status == "FINISHED", what="run A")
    frozen = svc.set_held_out(ds, [2, 5])
    svc.score_run(a.id)
    b = svc.submit_training([{"dataset_id": ds, "slices": [0, 1]}], [], recipe, preset="tiny")
    best_a = next(c.id for c in svc.checkpoints(a.id) if c.kind == "best")
    c = svc.submit_training([{"dataset_id": ds, "slices": [0, 1]}], [], recipe, preset="tiny",
                            parent_checkpoint_id=best_a)
    wait_for(lambda: {svc.run(b.id).status, svc.run(c.id).status} == {"FINISHED"}, what="runs B and C")
    job = svc.predict(next(k.id for k in svc.checkpoints(b.id) if k.kind == "best"), ds, list(range(6)))
    wait_for(lambda: svc.prediction(job.id).status == "FINISHED", what="the prediction")
    try:
        yield Journey(folder / "data", svc, ds, a.id, b.id, c.id, frozen.seen_by, job.id)
    finally:
        svc.close()


def test_held_out_scores_leave_out_the_slices_a_lineage_trained_on(journey, monkeypatch):
    svc, ds, a, b, c = journey.svc, journey.ds, journey.a, journey.b, journey.c
    assert journey.frozen_seen_by == {2: [a]}  # freezing names the run it taints (only A had trained then)
    scores = {s.run_id: s for s in svc.held_out_scores(ds)}
    assert set(scores) == {a, b, c}
    assert (scores[a].slices, scores[a].seen) == ((5,), (2,))
    assert not scores[a].honest and scores[a].best_run_id != a  # a tainted run is never the best
    card = svc.model_card(next(k.id for k in svc.checkpoints(a) if k.kind == "best"))
    assert card["held_out"][str(ds)]["seen"] == [2] and card["held_out"][str(ds)]["slices"] == [5]
    assert card["held_out"][str(ds)]["metrics"] == scores[a].metrics  # the card repeats the honest figure
    # B never saw a held-out slice: it is the best; C, fine-tuned from A, saw slice 2 through its parent
    assert scores[b].honest and (scores[b].slices, scores[b].seen) == ((2, 5), ())
    assert {s.best_run_id for s in scores.values()} == {b}
    assert (scores[c].slices, scores[c].seen) == ((5,), (2,))
    assert scores[c].parent == scores[a].metrics  # compared with its parent on slice 5 only
    assert svc.held_out_seen(ds).seen_by == {2: [a, c]}

    # the pages say so: Runs names the metric that picks the best and marks the tainted runs;
    # Datasets names the runs that trained on a held-out slice
    monkeypatch.setenv("NEUROSEG_DATA_DIR", str(journey.data_dir))
    monkeypatch.setenv("NEUROSEG_ISBI_DIR", str(journey.data_dir.parent / "no-isbi"))
    from tests.app.test_pages import app

    at = app("Runs")
    table = next(d.value for d in at.dataframe if "flag" in d.value.columns)
    flags = dict(zip(table["run"], table["flag"], strict=True))
    measured = dict(zip(table["run"], table["measured on slices"], strict=True))
    assert "★ best by Rand-F" in flags[f"run {b}"]
    assert "saw some held-out slices" in flags[f"run {a}"] and "★" not in flags[f"run {a}"]
    assert measured[f"run {a}"] == "5" and measured[f"run {b}"] == "2, 5"
    # a scored run is not offered the scoring again; one whose score is gone is, and the message says which
    # slices the new score counts (not "1 new score(s)" when its lineage trained on some of them)
    at.selectbox(key="runs_pick").select(a).run()
    assert not [b for b in at.button if b.label == "Score on the held-out slices"]
    svc._tx(lambda s: setattr(s.get(Run, a), "held_out", None))
    at = app("Runs")
    at.selectbox(key="runs_pick").select(a).run()
    next(b for b in at.button if b.label == "Score on the held-out slices").click().run()
    assert not at.exception, at.exception
    said = [m.value for m in at.success]
    assert said == [f"Run {a} scored on held-out slices 5 of tainted (left out, it trained on them: 2)."], said
    assert {s.run_id: s.metrics for s in svc.held_out_scores(ds)}[a] == scores[a].metrics
    # Predict's headline is on the slices the model never trained on; the others are beside it, marked
    at = app("Predict")
    assert any("On the 4 labelled slices this model never trained on** (slices 2, 3, 4, 5)" in m.value
               for m in at.markdown), [m.value for m in at.markdown]
    metrics = svc.prediction(journey.prediction).metrics["slices"]
    unseen = sum(metrics[str(z)]["pixel_error"] for z in (2, 3, 4, 5)) / 4
    assert next(m.value for m in at.metric if m.label == "pixel error") == f"{unseen:.3f}"
    assert any("Trained on slices 0, 1: mean" in m.value for m in at.caption)
    rows = next(d.value for d in at.dataframe if "the model" in d.value.columns)
    assert list(rows["the model"]) == ["trained on", "trained on", "held out", "never trained on",
                                       "never trained on", "held out", "4 slices", "2 slices"]
    at = app("Datasets")  # (the newest dataset, this one, is shown)
    assert any(f"slice 2 by runs {a}, {c}" in w.value for w in at.warning), [w.value for w in at.warning]


@pytest.mark.slow
def test_in_the_browser_the_best_is_untainted_and_predicts_headline_is_on_unseen_slices(journey):
    """What a user reads, in a real browser: Runs says which run is best, by which metric, and which runs
    were left out because they trained on a held-out slice; Predict's headline is on never-trained slices."""
    from playwright.sync_api import expect

    from tests.browser import app_server, chromium, signed_in

    a, b, c = journey.a, journey.b, journey.c
    metrics = journey.svc.prediction(journey.prediction).metrics["slices"]
    unseen = sum(metrics[str(z)]["pixel_error"] for z in (2, 3, 4, 5)) / 4
    with app_server(journey.data_dir) as url, chromium() as browser:
        page = signed_in(browser.new_context().new_page(), url, "rita", "annotator")
        page.set_default_timeout(90_000)
        page.goto(f"{url}/runs")
        summary = page.locator('[data-testid="stMarkdownContainer"]').filter(has_text="Best by Rand-F")
        summary.wait_for()
        expect(summary).to_contain_text(f"Best by Rand-F: run {b} (Rand-F ")
        expect(summary).to_contain_text("on held-out slices 2, 5, none of which it trained on")
        expect(summary).to_contain_text(f"run {a} (trained on 2; its figures count only slices 5)")
        expect(summary).to_contain_text(f"run {c} (trained on 2; its figures count only slices 5)")

        page.goto(f"{url}/predict")
        headline = page.locator('[data-testid="stMarkdownContainer"]').filter(
            has_text="this model never trained on").first
        headline.wait_for()
        expect(headline).to_contain_text("On the 4 labelled slices this model never trained on (slices 2, 3, 4, 5)")
        card = page.locator('[data-testid="stMetric"]').filter(has_text="pixel error").first
        expect(card).to_contain_text(f"{unseen:.3f}")
        page.get_by_text(re.compile(r"Trained on slices 0, 1: mean")).first.wait_for()

        page.goto(f"{url}/datasets")
        page.get_by_text("some runs trained on them").first.wait_for()  # the held-out section opens and says so
        page.get_by_text(f"slice 2 by runs {a}, {c}", exact=False).first.wait_for()


def test_scoring_a_run_that_trained_on_every_held_out_slice_says_it_has_no_figure():
    def score(dataset_id, slices, seen):
        return Score(7, dataset_id, 1, {}, None, None, None, [], [], slices, seen)

    names = {1: "ours", 2: "theirs"}.get
    text, kind = scored_message("Run 7", 1, [score(1, (), (2, 5))], names)
    assert kind == "info" and "No figure on ours (it trained on 2, 5)" in text and "scored on" not in text
    text, kind = scored_message("Run 7", 2, [score(1, (5,), (2,)), score(2, (), (0,))], names)
    assert kind == "success" and text.startswith("Run 7 scored on held-out slices 5 of ours (left out")
    assert "No figure on theirs (it trained on 0)" in text
    assert scored_message("Run 7", 0, [], names) == ("Run 7: nothing new to score (its scores are up to date).",
                                                     "info")


def test_the_last_weights_of_a_run_without_validation_are_not_called_its_best():
    from domain.records import CheckpointInfo

    fields = {"id": 4, "run_id": 3, "kind": "best", "step": 393, "file": "", "sha256": "", "metrics": {},
              "preset": "cpu-quick"}
    unmeasured = CheckpointInfo(**fields)
    assert checkpoint_label(unmeasured) == ("run 3 (cpu-quick) · final weights at step 393 (not validated: the run "
                                            "had no validation slices)")
    measured = CheckpointInfo(**{**fields, "metrics": {"val_pixel_error": 0.0812, "loss": 0.3}})
    assert checkpoint_label(measured) == "run 3 (cpu-quick) · best at step 393 · pixel error 0.081"


def test_a_model_trained_outside_the_store_is_never_said_to_be_measured_on_unseen_slices(tmp_path):
    """An imported model (or one fine-tuned from it) trained on data nobody recorded here, and the starter
    model trained on every slice of the ISBI 2012 training stack: Predict may not call their scores there
    "accuracy on data it has not seen" (an imported copy of a run was so praised on the slices it trained on)."""
    from storage.models import Checkpoint, Dataset, Run

    svc = Neuroseg(Settings.from_env(tmp_path / "data"), supervise=False)

    def rows(s):
        def dataset(source, shape):
            row = Dataset(name=source, z=shape[0], y=shape[1], x=shape[2], dtype="uint8", source_name=source,
                          sha256="0" * 64, size_bytes=0)
            s.add(row)
            s.flush()
            return row.id

        def checkpoint(kind, parent=None):
            run = Run(kind=kind, status="FINISHED", spec={}, config={}, parent_checkpoint_id=parent)
            s.add(run)
            s.flush()
            made = Checkpoint(run_id=run.id, step=1, kind="best", file="x", sha256="0" * 64)
            s.add(made)
            s.flush()
            return made.id

        imported, starter = checkpoint("imported"), checkpoint("starter")
        return (dataset("train-volume.tif", (30, 512, 512)), dataset("ours.tif", (5, 64, 64)), imported,
                checkpoint("train", imported), starter, checkpoint("train", starter), checkpoint("train"))

    isbi, ours, imported, tuned_import, starter, tuned_starter, own = svc._tx(rows)
    for model in (imported, tuned_import):
        assert "not known here" in svc.trained_elsewhere(model, ours)
    for model in (starter, tuned_starter):
        assert "ISBI 2012" in svc.trained_elsewhere(model, isbi) and svc.trained_elsewhere(model, ours) == ""
    assert svc.trained_elsewhere(own, ours) == "" == svc.trained_elsewhere(own, isbi)
    svc.close()


def test_where_no_held_out_slice_has_two_whole_neurons_pixel_error_picks_the_best_and_says_so():
    from domain.scores import Score
    from ui.training import score_rows, score_summary

    best = Score(1, 1, 1, {"pixel_error": 0.1}, None, None, 1, [], [], (3,), (), decides="pixel_error")
    summary = score_summary([best], lambda i: f"run {i}")
    assert "Best by pixel error: run 1** (pixel error 0.1000 on held-out slices 3" in summary
    assert "could not decide" in summary and "Rand-F" in summary
    assert "★ best by pixel error" in score_rows([best], lambda i: f"run {i}")[0]["flag"]
