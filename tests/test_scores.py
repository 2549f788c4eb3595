"""Scores a lab can trust: a held-out score never includes a slice the run, or a run it was fine-tuned
from, trained on; freezing such a slice names the runs it taints; the best run is chosen among runs that
saw none of them, by a metric the page names."""

from __future__ import annotations

from storage.service import Neuroseg
from storage.settings import Settings
from tests.test_jobs import wait_for
from tests.test_live import upload
from unet.config import preset


def test_held_out_scores_leave_out_the_slices_a_lineage_trained_on(tmp_path, synthetic, monkeypatch):
    svc = Neuroseg(Settings.from_env(tmp_path / "data"), supervise=False)
    try:
        ds = upload(svc, tmp_path, synthetic, "tainted")
        recipe = preset("tiny", steps=8, patch_size=48, val_every=1000, checkpoint_every=1000)

        # run A trains on 0–3; only then are 2 and 5 frozen as held out (the new user's journey)
        a = svc.submit_training([{"dataset_id": ds, "slices": [0, 1, 2, 3]}], [{"dataset_id": ds, "slices": [4]}],
                                recipe, preset="tiny")
        wait_for(lambda: svc.run(a.id).status == "FINISHED", what="run A")
        frozen = svc.set_held_out(ds, [2, 5])
        assert frozen.seen_by == {2: [a.id]}  # freezing names the run it taints
        assert svc.score_run(a.id) == 1
        [score_a] = svc.held_out_scores(ds)
        assert (score_a.slices, score_a.seen) == ((5,), (2,))
        assert not score_a.honest and score_a.best_run_id is None  # a tainted run is never the best
        card = svc.model_card(next(c.id for c in svc.checkpoints(a.id) if c.kind == "best"))
        assert card["held_out"][str(ds)]["seen"] == [2] and card["held_out"][str(ds)]["slices"] == [5]
        assert card["held_out"][str(ds)]["metrics"] == score_a.metrics  # the card repeats the honest figure

        # B never saw a held-out slice: it is the best; C, fine-tuned from A, saw slice 2 through its parent
        b = svc.submit_training([{"dataset_id": ds, "slices": [0, 1]}], [], recipe, preset="tiny")
        best_a = next(c.id for c in svc.checkpoints(a.id) if c.kind == "best")
        c = svc.submit_training([{"dataset_id": ds, "slices": [0, 1]}], [], recipe, preset="tiny",
                                parent_checkpoint_id=best_a)
        wait_for(lambda: {svc.run(b.id).status, svc.run(c.id).status} == {"FINISHED"}, what="runs B and C")
        scores = {s.run_id: s for s in svc.held_out_scores(ds)}
        assert set(scores) == {a.id, b.id, c.id}
        assert scores[b.id].honest and (scores[b.id].slices, scores[b.id].seen) == ((2, 5), ())
        assert {s.best_run_id for s in scores.values()} == {b.id}
        assert (scores[c.id].slices, scores[c.id].seen) == ((5,), (2,))
        assert scores[c.id].parent == scores[a.id].metrics  # compared with its parent on slice 5 only
        assert svc.held_out_seen(ds).seen_by == {2: [a.id, c.id]}

        # the pages say so: Runs names the metric that picks the best and marks the tainted runs;
        # Datasets names the runs that trained on a held-out slice
        monkeypatch.setenv("NEUROSEG_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.setenv("NEUROSEG_ISBI_DIR", str(tmp_path / "no-isbi"))
        from tests.test_pages import app

        at = app("Runs")
        table = next(d.value for d in at.dataframe if "flag" in d.value.columns)
        flags = dict(zip(table["run"], table["flag"], strict=True))
        measured = dict(zip(table["run"], table["measured on slices"], strict=True))
        assert "★ best by Rand-F" in flags[f"run {b.id}"]
        assert "saw some held-out slices" in flags[f"run {a.id}"] and "★" not in flags[f"run {a.id}"]
        assert measured[f"run {a.id}"] == "5" and measured[f"run {b.id}"] == "2, 5"
        # Predict's headline is on the slices the model never trained on; the others are beside it, marked
        job = svc.predict(next(c.id for c in svc.checkpoints(b.id) if c.kind == "best"), ds, list(range(6)))
        wait_for(lambda: svc.prediction(job.id).status == "FINISHED", what="the prediction")
        at = app("Predict")
        assert any("On the 4 labelled slices this model never trained on** (slices 2, 3, 4, 5)" in m.value
                   for m in at.markdown), [m.value for m in at.markdown]
        metrics = svc.prediction(job.id).metrics["slices"]
        unseen = sum(metrics[str(z)]["pixel_error"] for z in (2, 3, 4, 5)) / 4
        assert next(m.value for m in at.metric if m.label == "pixel error") == f"{unseen:.3f}"
        assert any("Trained on slices 0, 1: mean" in c.value for c in at.caption)
        rows = next(d.value for d in at.dataframe if "the model" in d.value.columns)
        assert list(rows["the model"]) == ["trained on", "trained on", "held out", "never trained on",
                                           "never trained on", "held out", "4 slices", "2 slices"]
        at = app("Datasets")  # (the newest dataset, this one, is shown)
        assert any(f"slice 2 by runs {a.id}, {c.id}" in w.value for w in at.warning), [w.value for w in at.warning]
    finally:
        svc.close()
