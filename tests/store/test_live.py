"""The live loop: a worker process that fine-tunes while the user annotates, takes in masks saved after it
started, predicts the viewers' slices, yields its device to a normal run, is shared by two users, and
ends as an ordinary run; and the replay that keeps a fine-tune from forgetting."""

from __future__ import annotations

import os
import select
import signal
from dataclasses import replace

import numpy as np
import pytest
import tifffile
from sqlalchemy import select as sql_select

from domain.kinds import Tool
from domain.records import UserError
from storage.models import LiveSlice, RunMask
from storage.records import starter
from storage.service import Neuroseg
from storage.settings import Settings
from tests.drafts import new_draft, start_options
from tests.store.test_jobs import wait_for
from tests.store.test_starter import tiny_starter
from unet.network.config import preset
from unet.prediction.metrics import pixel_error
from unet.prediction.review import margin
from unet.training.forest import PixelForest
from unet.training.labels import IGNORE, MEMBRANE, NEURON, labels_to_target
from unet.training.live import LiveTrainer, live_config
from unet.training.synthetic import make_synthetic_em


def wait_exit(pid: int) -> None:
    fd = os.pidfd_open(pid)
    select.select([fd], [], [])
    os.close(fd)


def test_replaying_the_older_slices_keeps_a_fine_tune_from_forgetting(tmp_path):
    """Learn slice A, then fine-tune on a new slice B that looks different (inverted contrast): with replay
    A stays right, without it the network forgets A."""
    import torch

    torch.manual_seed(0)
    volume, labels = make_synthetic_em((4, 96, 96), np.random.default_rng(3), cell_size=20)
    targets = labels_to_target(labels)
    a, b = (volume[0], targets[0]), (255 - volume[1], targets[1])
    base = preset("cpu-quick")
    config = replace(base, model=replace(base.model, initial_features=4, depth=2), patch_size=48, batch_size=4,
                     device="cpu", lr=3e-3)
    first = LiveTrainer(live_config(config, lr=3e-3), tmp_path / "first")
    first.set_slices({"A": a}, new=["A"])
    first.train_for(600, max_steps=300)
    assert pixel_error(first.predict(a[0]) > 0.5, a[1]) < 0.1  # it learned A
    first.save()
    errors = {}
    for replay in (True, False):
        tuned = LiveTrainer(live_config(config, lr=1e-3), tmp_path / f"replay-{replay}",
                            init_from=tmp_path / "first" / "best.pt", replay=replay)
        tuned.set_slices({"A": a, "B": b}, new=["B"])
        tuned.train_for(600, max_steps=200)
        errors[replay] = (pixel_error(tuned.predict(a[0]) > 0.5, a[1]), pixel_error(tuned.predict(b[0]) > 0.5, b[1]))
    assert errors[True][1] < 0.25 and errors[False][1] < 0.25  # both learned B
    assert errors[False][0] > 0.4  # without replay, A is forgotten
    assert errors[True][0] < errors[False][0] - 0.25  # with it, A is kept

    # a trained start (the starter) corrected with one-sided strokes (here: membrane only, as strokes
    # painted only where a model is wrong can be): without distillation the fine-tune drifts to calling
    # everything membrane; with the starting model's answer on the unpainted pixels it keeps its skill
    c_image, c_target = volume[2], targets[2]
    strokes = np.where(c_target == 0, c_target, 2).astype(np.uint8)
    kept = {}
    for distill in (0.3, 0.0):
        tuned = LiveTrainer(live_config(config, lr=1e-3), tmp_path / f"distill-{distill}",
                            init_from=tmp_path / "first" / "best.pt", distill=distill,
                            reference=tmp_path / "first" / "best.pt")
        tuned.set_slices({"C": (c_image, strokes)}, new=["C"])
        tuned.train_for(600, max_steps=250)
        kept[distill] = pixel_error(tuned.predict(a[0]) > 0.5, a[1])
    assert kept[0.3] < 0.08 and kept[0.0] > kept[0.3] + 0.04, kept


def test_the_starting_models_answer_is_made_near_the_strokes_at_a_save_and_whole_once_prepared(tmp_path):
    """At a save on a slice the session had not prepared, the starting model answers only where training
    windows reach (a large slice answers in a fraction of the time); prepare() answers the rest later and
    the training targets take it in."""
    volume, labels = make_synthetic_em((1, 200, 200), np.random.default_rng(4), cell_size=20)
    target = labels_to_target(labels)[0]
    base = preset("cpu-quick")
    config = replace(base, model=replace(base.model, initial_features=4, depth=2), patch_size=32, batch_size=2,
                     device="cpu")
    start = LiveTrainer(live_config(config), tmp_path / "start")
    start.set_slices({"A": (volume[0], target)}, new=["A"])
    start.train_for(60, max_steps=2)
    start.save()
    tuned = LiveTrainer(live_config(config), tmp_path / "tuned", init_from=tmp_path / "start" / "best.pt",
                        distill=0.3, reference=tmp_path / "start" / "best.pt")
    strokes = np.full(target.shape, IGNORE, np.uint8)
    strokes[10:20, 10:20] = target[10:20, 10:20]
    tuned.set_slices({"A": (volume[0], strokes)}, new=["A"])
    pad = tuned.sampler.pad  # (the sampler pads each target by this much on every side)

    def unpadded(a):
        return a[pad:a.shape[0] - pad, pad:a.shape[1] - pad]

    near = unpadded(tuned.sampler.targets[0]).copy()
    assert near.shape == target.shape
    assert (near[:52, :52] != IGNORE).all(), "answered where training windows reach"
    assert (near[60:, :] == IGNORE).all() and (near[:, 60:] == IGNORE).all(), "and nowhere else yet"

    assert tuned.prepare("A", volume[0]) and not tuned.prepare("A", volume[0])  # the whole slice, once
    whole = unpadded(tuned.sampler.targets[0])
    assert (whole != IGNORE).all(), "the training targets took in the rest"
    agree = (whole[:52, :52] == near[:52, :52]).mean()
    assert agree > 0.9, agree  # the same model and normalisation (only the crop's edge sees less context)
    tuned.train_for(60, max_steps=2)

    # a zoomed viewer's region is prepared first: a save inside it finds the answer made
    zoomed = LiveTrainer(live_config(config), tmp_path / "zoomed", init_from=tmp_path / "start" / "best.pt",
                         distill=0.3, reference=tmp_path / "start" / "best.pt")
    assert zoomed.prepare("A", volume[0], box=(-32, -32, 100, 100))
    assert not zoomed.prepare("A", volume[0], box=(0, 0, 90, 90)), "inside what is answered: nothing to do"
    zoomed.set_slices({"A": (volume[0], strokes)}, new=["A"])
    boxed = unpadded(zoomed.sampler.targets[0])
    assert (boxed[:100, :100] != IGNORE).all() and (boxed[100:, :] == IGNORE).all()


def test_a_forest_on_the_strokes_teaches_a_network_from_scratch(tmp_path):
    """From random weights and a few painted disks (7% of one slice), the forest trained on them fills in
    the unpainted pixels: the network taught by it is right on the next slice, the one without a teacher
    is not."""
    import torch

    volume, labels = make_synthetic_em((2, 96, 96), np.random.default_rng(4), cell_size=20)
    targets = labels_to_target(labels)
    image, full = volume[0], targets[0]
    strokes = disk_strokes(full, seed=0)
    painted = strokes != IGNORE
    assert {MEMBRANE, NEURON} <= set(np.unique(strokes))

    forest = PixelForest(trees=10)
    assert forest.fit({"a": (image, strokes)}) and not forest.fit({"a": (image, strokes)})  # refit on change only
    assert pixel_error(forest.predict(volume[1]) > 0.5, targets[1]) < 0.1
    one_class = PixelForest(trees=10)
    one_class.fit({"a": (image, np.where(full == MEMBRANE, MEMBRANE, IGNORE).astype(np.uint8))})
    assert one_class.predict(image) is None  # nothing to tell apart yet

    base = preset("cpu-quick")
    config = replace(base, model=replace(base.model, initial_features=4, depth=2), patch_size=48, batch_size=4,
                     device="cpu")
    errors = {}
    for taught in (True, False):
        torch.manual_seed(0)
        learner = LiveTrainer(live_config(config, trained=False), tmp_path / f"taught-{taught}",
                              distill=0.3 if taught else 0.0, reference=PixelForest(trees=10) if taught else None)
        learner.set_slices({"a": (image, strokes)}, new=["a"])
        if taught:  # unpainted pixels carry the forest's mask, painted ones the strokes
            pad = learner.sampler.pad
            target = learner.sampler.targets[0][pad:-pad, pad:-pad]
            teacher = np.where(learner.forest.predict(image) > 0.5, NEURON, MEMBRANE)
            assert np.array_equal(target[~painted], teacher[~painted])
            assert np.array_equal(target[painted], strokes[painted])
        learner.train_for(600, max_steps=200)
        errors[taught] = pixel_error(learner.predict(volume[1]) > 0.5, targets[1])
    assert errors[True] < 0.15 and errors[False] > errors[True] + 0.15, errors


def disk_strokes(target: np.ndarray, seed: int, disks: int = 6, radius: int = 6) -> np.ndarray:
    """The target inside a few random disks, IGNORE elsewhere (strokes of a brush)."""
    from skimage.draw import disk

    h, w = target.shape
    painted = np.zeros(target.shape, bool)
    for cy, cx in np.random.default_rng(seed).integers(8, min(h, w) - 8, size=(disks, 2)):
        painted[disk((cy, cx), radius, shape=target.shape)] = True
    return np.where(painted, target, IGNORE).astype(np.uint8)


@pytest.mark.parametrize("pipeline", ["host", "device"])
def test_after_a_save_the_forest_answers_on_older_slices_are_renewed_between_bursts(tmp_path, pipeline):
    """A new save refits the forest; the older slice keeps its out-of-date answer (so the new one trains at
    once) until refresh_teacher renews it with the new forest's; with batches made on the host or (as on a
    GPU) on the device."""
    volume, labels = make_synthetic_em((2, 96, 96), np.random.default_rng(4), cell_size=20)
    targets = labels_to_target(labels)
    a, b = (volume[0], disk_strokes(targets[0], seed=0)), (volume[1], disk_strokes(targets[1], seed=1))
    base = preset("cpu-quick")
    config = replace(base, model=replace(base.model, initial_features=4, depth=2), patch_size=48, batch_size=4,
                     device="cpu", pipeline=pipeline)
    learner = LiveTrainer(live_config(config, trained=False), tmp_path, distill=0.3, reference=PixelForest(trees=10))

    def target_of(key):
        return learner.sampler.target(learner.keys.index(key)).copy()

    learner.set_slices({"a": a}, new=["a"])
    before = target_of("a")
    learner.set_slices({"a": a, "b": b}, new=["b"])
    assert np.array_equal(target_of("a"), before)  # out of date, not yet renewed
    assert learner.refresh_teacher(10.0) == 1 and learner.refresh_teacher(10.0) == 0
    unpainted = a[1] == IGNORE
    teacher = np.where(learner.forest.predict(a[0]) > 0.5, NEURON, MEMBRANE)
    assert np.array_equal(target_of("a")[unpainted], teacher[unpainted])  # the new forest's answer
    assert not np.array_equal(target_of("a"), before)
    assert np.array_equal(target_of("a")[~unpainted], a[1][~unpainted])  # the strokes themselves stay
    assert learner.train_for(10.0, max_steps=3) == 3  # and training draws from them


def test_the_forest_reads_a_large_slice_tile_by_tile_and_only_near_the_strokes():
    """Features computed tile by tile (with the filters' margin) are those of the whole slice, and a
    prediction asked only near the strokes leaves the far tiles out (memory and time do not grow with the
    slice)."""
    from unet.training.forest import TILE, pixel_features, tile_features, tiles

    volume, labels = make_synthetic_em((1, 300, 1100), np.random.default_rng(6), cell_size=24)
    image, target = volume[0], labels_to_target(labels)[0]
    whole = pixel_features(image)
    mean, std = float(image.astype(np.float32).mean()), float(image.astype(np.float32).std())
    for tile in tiles(image.shape, 128):
        assert np.allclose(tile_features(image, tile, mean, std), whole[tile], atol=1e-4), tile
    strokes = np.full(target.shape, IGNORE, np.uint8)
    strokes[20:80, 20:200] = target[20:80, 20:200]  # in the first tile only
    forest = PixelForest(trees=10)
    forest.fit({0: (image, strokes)})
    near = forest.predict(image, near=strokes != IGNORE, reach=48)
    assert not np.isnan(near[:, :TILE]).any() and np.isnan(near[:, TILE:]).all()
    everywhere = forest.predict(image)
    assert np.array_equal(near[:, :TILE], everywhere[:, :TILE]) and not np.isnan(everywhere).any()
    assert pixel_error(everywhere > 0.5, target) < 0.15


@pytest.fixture
def live_env(tmp_path, monkeypatch):
    """A service on a fresh store with a tiny starter model and an unlabelled synthetic stack."""
    folder = tmp_path / "models"
    tiny_starter(folder, monkeypatch, step=1, patch_size=48)
    svc = Neuroseg(Settings.from_env(tmp_path / "data"), supervise=False)
    with svc.sessions.begin() as s:
        starter.register(s, svc.store, folder)
    volume, labels = make_synthetic_em((5, 64, 64), np.random.default_rng(5), cell_size=16)
    tifffile.imwrite(tmp_path / "v.tif", volume, photometric="minisblack")
    with open(tmp_path / "v.tif", "rb") as fh:
        ds = svc.import_upload(fh, name="live stack")
    yield svc, ds.id, labels_to_target(labels), svc.checkpoint_choices()[0].id
    for run in svc.runs():  # leave no worker behind
        if run.active:
            svc.cancel_run(run.id)
            if run.pid:
                wait_exit(run.pid)
    svc.close()


def save(svc, dataset_id: int, z: int, target: np.ndarray, author: str = "ann", tool: Tool | None = None):
    """``target`` saved as slice z's next version: painted, or made by one object tool (``tool``)."""
    draft = new_draft(svc, dataset_id, z, start_options(svc, dataset_id, z)[0])
    edit = target.astype(np.uint8)
    edit.setflags(write=False)
    if tool is not None:
        draft.use_tool(edit, tool)
    else:
        draft.working = edit
        draft.revision += 1
    return svc.save_draft(draft, author, owner=author)


def live_slice(svc, run_id: int, z: int):
    with svc.sessions.begin() as s:
        row = s.get(LiveSlice, (run_id, z))
        return (row.step, row.masks_seen) if row else None


def test_live_takes_in_a_mask_saved_after_it_started_and_stop_leaves_an_ordinary_run(live_env):
    svc, ds, targets, starter_id = live_env
    first = save(svc, ds, 0, targets[0])
    session, what = svc.live_start(ds, starter_id, "ann")
    assert what == "started" and session.run.kind == "live"
    svc.live_see(session.run_id, "ann", 2)
    wait_for(lambda: svc.run(session.run_id).status == "RUNNING", what="the live worker to start")
    wait_for(lambda: live_slice(svc, session.run_id, 2), what="a first live prediction of slice 2")
    prediction = svc.live_prediction(session.run_id, 2, uncertainty=True)
    assert prediction.probabilities.shape == (64, 64) and 0 <= prediction.probabilities.min() <= 1
    # its uncertainty: a first prediction has no weights before it to differ from, so its own doubt
    assert prediction.uncertainty.shape == (64, 64)
    assert np.abs(prediction.uncertainty - margin(prediction.probabilities)).max() <= 2 / 255
    wait_for(lambda: all(live_slice(svc, session.run_id, z) for z in (1, 3)), what="the slices beside it")
    assert prediction.region is None  # the whole slice

    # zoomed in: the region on screen is predicted first …
    svc.live_see(session.run_id, "ann", 2, (16, 8, 24, 32))
    part = wait_for(lambda: (p := svc.live_prediction(session.run_id, 2)) is not None
                    and p.region == (16, 8, 24, 32) and p, what="a live prediction of the zoomed region")
    assert part.probabilities.shape == (64, 64) and part.step >= prediction.step

    later = save(svc, ds, 4, targets[4], tool=Tool.ACCEPT)  # made by an object tool, saved while it runs
    assert svc.history(ds, 4)[-1].tools == ("accept",)
    seen = wait_for(lambda: (v := live_slice(svc, session.run_id, 2)) and v[1] >= later.id and v,
                    what="a live prediction from weights that learned the new mask")
    assert seen[1] == later.id
    # … and the rest of the slice follows when nothing else waits (it missed a save)
    wait_for(lambda: (p := svc.live_prediction(session.run_id, 2)) is not None and p.masks_seen == later.id
             and p.region is None, what="the whole zoomed slice predicted again after the save")
    with svc.sessions.begin() as s:
        learned = set(s.scalars(sql_select(RunMask.mask_version_id).where(RunMask.run_id == session.run_id)))
    assert learned == {first.id, later.id}  # the tool's save is learned as the strokes' is
    assert svc.live(ds).learned == 2
    # the shared queue ranks the slices the session predicted by their uncertainty; the others, unsaved, by
    # having no prediction yet; the saved slices without a live prediction are not in it
    with svc.sessions.begin() as s:
        predicted = set(s.scalars(sql_select(LiveSlice.slice_index).where(LiveSlice.run_id == session.run_id)))
    work = svc.rank_work(ds)
    assert 2 in predicted and [i.score for i in work.open] == sorted((i.score for i in work.open), reverse=True)
    for z in range(5):
        sources = {i.source for i in work.open if i.slice_index == z}
        expected = {f"live {session.run_id}"} if z in predicted else set() if z in (0, 4) else {""}
        assert sources == expected, (z, sources)

    pid = svc.run(session.run_id).pid
    svc.live_stop(session.run_id)
    wait_exit(pid)
    run = svc.run(session.run_id)
    assert (run.status, run.kind) == ("FINISHED", "live")
    assert svc.live(ds) is None
    assert {c.kind for c in svc.checkpoints(run.id)} == {"best", "latest"}
    assert run.id in [r.id for r in svc.runs()]  # an ordinary run for Runs …
    assert run.id in {c.run_id for c in svc.checkpoint_choices()}  # … and Predict
    assert {m.slice for m in svc.run_masks(run.id)} == {0, 4}
    assert svc.curves(run.id)["loss"]  # its curves, as any run's


def test_from_random_weights_the_worker_learns_strokes_with_a_forest_as_teacher(live_env):
    """A session from random initialisation (Annotate's last "Start from" choice), the live worker a real
    process: a few painted disks saved after it started join, a forest of them teaches the rest (its phase
    says so), and the session ends as a run without a parent whose weights were trained that way."""
    from skimage.draw import disk

    from unet.exchange.checkpoint import load_checkpoint

    svc, ds, targets, _ = live_env
    session, what = svc.live_start(ds, None, "ann", scratch=True)
    assert what == "started" and session.run.parent_checkpoint_id is None
    svc.live_see(session.run_id, "ann", 1)
    wait_for(lambda: live_slice(svc, session.run_id, 1), what="a first live prediction from random weights")
    painted = np.zeros(targets[1].shape, bool)
    for cy, cx in ((16, 16), (32, 40), (48, 24), (20, 50)):
        painted[disk((cy, cx), 6, shape=painted.shape)] = True
    strokes = save(svc, ds, 1, np.where(painted, targets[1], IGNORE))
    wait_for(lambda: (v := live_slice(svc, session.run_id, 1)) and v[1] >= strokes.id,
             what="a live prediction from weights that learned the strokes")
    phase = wait_for(lambda: "forest" in (p := svc.run(session.run_id).phase or "") and p,
                     what="the phase to name the forest")
    assert phase.startswith("learning from 1 slice(s)")
    pid = svc.run(session.run_id).pid
    svc.live_stop(session.run_id)
    wait_exit(pid)
    run = svc.run(session.run_id)
    assert run.status == "FINISHED" and {m.slice for m in svc.run_masks(run.id)} == {1}
    best = next(c for c in svc.checkpoints(run.id) if c.kind == "best")
    meta = load_checkpoint(svc.store.abspath(best.file)).meta
    assert meta["step"] > 0 and meta["train_config"]["loss"] == "bce"  # the taught pixels' weighted loss
    assert meta["train_config"]["model"]["initial_features"] == 8  # cpu-quick's network, not the tiny starter's
    assert svc.live_start(ds, None, "ann", scratch=True)[1] == "started"  # a new session, not the old one


def test_two_users_share_one_session_and_a_normal_run_takes_the_device_first(live_env):
    svc, ds, targets, starter_id = live_env
    save(svc, ds, 0, targets[0])
    mine, what = svc.live_start(ds, starter_id, "ann")
    theirs, joined = svc.live_start(ds, starter_id, "bob")
    assert (what, joined) == ("started", "joined") and theirs.run_id == mine.run_id
    assert svc.live(ds).viewers == ["ann", "bob"]
    wait_for(lambda: svc.run(mine.run_id).status == "RUNNING", what="the live worker to start")
    live_pid = svc.run(mine.run_id).pid
    wait_for(lambda: svc.checkpoints(mine.run_id) or svc.live(ds).run.phase.startswith("learning"),
             what="the live session to train")

    normal = svc.submit_training([{"dataset_id": ds, "slices": [0]}], [], preset("tiny", steps=5, patch_size=48),
                                 preset="tiny")
    wait_exit(live_pid)  # the live session yields: it checkpoints and steps aside …
    paused = svc.live(ds)
    assert paused is not None and paused.run.status in ("QUEUED", "RUNNING")
    assert {c.kind for c in svc.checkpoints(mine.run_id)} == {"best", "latest"}  # … keeping its weights
    wait_for(lambda: svc.run(normal.id).status == "FINISHED", what="the normal run to finish")
    wait_for(lambda: svc.run(mine.run_id).status == "RUNNING", what="the live session to carry on")
    assert svc.run(mine.run_id).pid != live_pid


def upload(svc, folder, stack, name: str) -> int:
    """A stack and its labels written as TIFFs and uploaded as a dataset: its id."""
    volume, labels = stack
    tifffile.imwrite(folder / "v.tif", volume, photometric="minisblack")
    tifffile.imwrite(folder / "l.tif", labels, photometric="minisblack")
    with open(folder / "v.tif", "rb") as v, open(folder / "l.tif", "rb") as lab:
        return svc.import_upload(v, lab, name=name).id


def test_a_fine_tune_that_scores_worse_on_the_held_out_slices_is_flagged(tmp_path, synthetic, monkeypatch):
    """Held-out slices are frozen, never train, score every run that ends (and its parent); a fine-tune on
    bad corrections (neuron and membrane swapped) is flagged against its parent, and the better run can
    be promoted to the dataset's default model."""
    svc = Neuroseg(Settings.from_env(tmp_path / "data"), supervise=False)
    try:
        _, labels = synthetic
        ds = upload(svc, tmp_path, synthetic, "held out")
        frozen = svc.set_held_out(ds, [5])
        assert (frozen.version, frozen.slices) == (1, [5])
        assert svc.default_split(ds) == ([0, 1, 2, 3, 4], [5])
        recipe = preset("tiny", steps=60, patch_size=48, val_every=1000, checkpoint_every=1000)
        train = [{"dataset_id": ds, "slices": [0, 1, 2, 3]}]
        with pytest.raises(UserError, match="held out"):
            svc.submit_training([{"dataset_id": ds, "slices": [4, 5]}], [], recipe)

        good = svc.submit_training(train, [], recipe, preset="tiny")
        wait_for(lambda: svc.run(good.id).status == "FINISHED", what="the first run")
        good_best = {c.kind: c for c in svc.checkpoints(good.id)}["best"]
        for z in range(4):  # someone "corrects" the slices with neuron and membrane swapped
            target = labels_to_target(labels[z])
            save(svc, ds, z, 1 - target)
        bad = svc.submit_training(train, [], recipe, preset="tiny", parent_checkpoint_id=good_best.id)
        wait_for(lambda: svc.run(bad.id).status == "FINISHED", what="the fine-tune")

        scores = {s.run_id: s for s in svc.held_out_scores(ds)}
        assert set(scores) == {good.id, bad.id}
        assert not scores[good.id].flagged and scores[good.id].parent is None
        assert scores[bad.id].flagged and "pixel_error" in scores[bad.id].worse_than_parent
        assert scores[bad.id].parent == scores[good.id].metrics
        assert scores[bad.id].best_run_id == good.id and scores[bad.id].worse_than_best

        # the Runs page shows the flag and promotes the best run (AppTest: the real script)
        monkeypatch.setenv("NEUROSEG_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.setenv("NEUROSEG_ISBI_DIR", str(tmp_path / "no-isbi"))
        from tests.app.test_pages import app

        at = app("Runs", user="boss", role="admin")  # promoting changes the dataset: its owner's or an admin's
        table = next(d.value for d in at.dataframe if "flag" in d.value.columns)  # the held-out table
        flags = dict(zip(table["run"], table["flag"], strict=True))
        assert flags[f"run {bad.id}"].startswith("⚠ worse than its parent")
        assert flags[f"run {good.id}"] == "★ best by Rand-F"
        assert any(f"run {bad.id}** scores worse than its parent" in w.value for w in at.warning)
        assert at.selectbox(key=f"promote_pick_{ds}").value == good_best.id  # the best is offered first
        predict = app("Predict", user="boss", role="admin")  # it offers the newest run first: it says so
        assert any(f"Run {bad.id} scores worse than its parent" in w.value for w in predict.warning)
        at.button(key="promote").click().run()
        assert not at.exception, at.exception
        assert svc.default_model(ds) == good_best.id
        again = svc.set_held_out(ds, [4, 5])  # changing the set is a new version: old scores do not compare
        assert again.version == 2 and svc.held_out_scores(ds) == []
        assert svc.score_run(good.id) == 1
        assert [s.run_id for s in svc.held_out_scores(ds)] == [good.id]
        # a score made before the default post-processing changed (Rand-F and VI depend on it) is redone
        from storage.models import Run

        with svc.sessions.begin() as session:
            row = session.get(Run, good.id)
            row.held_out = {str(ds): {**row.held_out[str(ds)], "postprocess": "watershed"}}
        assert svc.held_out_scores(ds) == []
        assert svc.score_run(good.id) == 1 and [s.run_id for s in svc.held_out_scores(ds)] == [good.id]
    finally:
        svc.close()


def test_a_server_restart_finds_the_session_and_a_dead_worker_is_resumed_by_turning_live_on(live_env):
    svc, ds, targets, starter_id = live_env
    first = save(svc, ds, 0, targets[0])
    session, _ = svc.live_start(ds, starter_id, "ann")
    wait_for(lambda: svc.run(session.run_id).status == "RUNNING", what="the live worker to start")
    pid = svc.run(session.run_id).pid

    restarted = Neuroseg(svc.settings)  # a server restart: its supervisor ticks at once
    try:
        found = restarted.live(ds)
        assert found is not None and (found.run_id, found.run.status, found.run.pid) == (session.run_id, "RUNNING", pid)
    finally:
        restarted.close()

    os.killpg(pid, signal.SIGKILL)  # the machine loses the worker
    wait_exit(pid)
    svc.supervisor.tick()
    assert svc.run(session.run_id).status == "LOST" and svc.live(ds) is None
    again, what = svc.live_start(ds, None, "ann")
    assert (what, again.run_id) == ("resumed", session.run_id)
    wait_for(lambda: (r := svc.run(session.run_id)).status == "RUNNING" and r.pid != pid, what="a new worker")
    svc.live_see(session.run_id, "ann", 1)
    wait_for(lambda: (p := svc.live_prediction(session.run_id, 1)) is not None and p.masks_seen == first.id,
             what="the resumed session to predict from what it learned")


def test_accept_copies_the_prediction_into_the_edit_but_keeps_the_users_strokes():
    from ui.annotation import Draft
    from ui.live import predicted_mask, status_text
    from unet.training.labels import IGNORE, MEMBRANE, NEURON

    draft = Draft.blank(1, 0, (6, 6), None)
    draft.working = np.where(np.eye(6, dtype=bool), MEMBRANE, IGNORE).astype(np.uint8)  # the user's strokes
    probabilities = np.full((6, 6), 0.9, np.float32)
    probabilities[:, 0] = 0.1
    predicted = predicted_mask(probabilities)
    assert (predicted[:, 0] == MEMBRANE).all() and (predicted[:, 1:] == NEURON).all()

    changed = draft.accept(predicted, region=(0, 0, 3, 6))  # the zoomed region: the top three rows
    assert changed == 3 * 6 - 3
    assert (draft.working[3:] == np.where(np.eye(6, dtype=bool), MEMBRANE, IGNORE)[3:]).all()  # outside: as it was
    assert draft.working[1, 1] == MEMBRANE and draft.working[0, 2] == NEURON and draft.working[2, 0] == MEMBRANE
    assert draft.kind == "predicted→painted" and draft.view_base is draft.working
    assert draft.accept(predicted) == 3 * 6 - 3  # the rest of the slice
    with pytest.raises(ValueError, match="prediction is"):
        draft.accept(predicted[:3])

    from ui.live import predicted_region

    class Part:  # a zoomed viewer's region, the rest of the slice never predicted
        region, partial = (2, 2, 3, 3), True

    assert predicted_region(Part(), None) == (2, 2, 3, 3), "Accept for the whole slice: only what is predicted"
    assert predicted_region(Part(), (0, 0, 4, 4)) == (2, 2, 2, 2)
    assert predicted_region(Part(), (0, 0, 2, 2))[2:] == (0, 0), "nothing predicted there yet"
    Part.partial = False
    assert predicted_region(Part(), None) is None and predicted_region(Part(), (0, 0, 2, 2)) == (0, 0, 2, 2)

    class Run:
        id, status, phase, device, cancel_requested = 7, "QUEUED", "paused: run #9 has the device", "cpu", False

    class Info:
        run, learned, viewers, paused_for = Run(), 3, ["name:ann", "name:bob", "browser:x1"], 9

    text = status_text(Info(), "name:ann")
    assert text.startswith("Live session #7 (3 saved masks learned) · paused while run #9 trains on cpu")
    assert text.endswith("shared with bob, someone without a name")
    Info.paused_for, Run.phase = None, "waiting for the device"  # queued behind a training: not "starting"
    assert "· waiting for the device ·" in status_text(Info(), "name:ann")


def test_the_live_overlay_covers_only_what_it_shows():
    from ui.live import OVERLAYS, overlay_picture

    prob = np.zeros((8, 8), np.float32)
    prob[2:6, 2:6] = 0.9  # one neuron in membrane
    outline = overlay_picture(prob, "outlines", 0.35)
    assert outline.shape == (8, 8, 4) and outline.dtype == np.uint8
    drawn = outline[..., 3] > 0
    assert drawn.any() and not drawn[3:5, 3:5].any() and not drawn[7, :].any(), "only the neuron's edge"
    membranes = overlay_picture(prob, "membranes", 0.35)
    assert (membranes[..., 3] > 0).sum() == 64 - 16 and membranes[0, 0, 3] == round(0.35 * 255)
    heat = overlay_picture(prob, "probability", 1.0)
    assert (heat[..., 3] == 255).all() and not np.array_equal(heat[0, 0, :3], heat[3, 3, :3])
    assert not overlay_picture(prob, "membranes", 0.0)[..., 3].any(), "opacity 0 hides it"
    assert set(OVERLAYS) == {"outlines", "membranes", "probability", "uncertainty"}
    doubt = np.zeros((8, 8), np.float32)
    doubt[0, :4] = 1.0  # where the last weights changed their mind
    unsure = overlay_picture(prob, "uncertainty", 0.35, uncertainty=doubt)
    assert (unsure[0, :4, 3] > 0).all() and not unsure[1:, :, 3].any() and not unsure[0, 4:, 3].any()
    # a prediction's (Predict's layer): its own doubt, at p = 0.5 most
    from ui.prediction import compose

    half = np.full((8, 8), 0.5, np.float32)
    half[:, 4:] = 1.0
    _, shown = compose(np.zeros((8, 8), np.float32), half, ["uncertainty"], 1.0)
    assert tuple(shown[0, 0]) == (255, 0, 200) and shown[0, 4, 1] == shown[0, 4, 0] == shown[0, 4, 2]


def test_the_live_rate_is_a_fine_tuning_rate_from_a_trained_start_and_a_held_rate_from_scratch():
    """Held flat with no end, a live session runs below the recipe's own peak: 2e-4 from trained weights,
    1e-3 from random ones (cpu-quick's 3e-3 made a from-scratch network swing between rounds), and never
    above a recipe that asks for less."""
    base = preset("cpu-quick")
    assert base.lr == 3e-3
    assert live_config(base).lr == 2e-4
    assert live_config(base, trained=False).lr == 1e-3
    assert live_config(replace(base, lr=5e-4), trained=False).lr == 5e-4
    assert live_config(base, trained=False).warmup_steps == 20 and live_config(base).max_seconds is None


def test_a_live_session_runs_where_the_machine_is_fastest_not_where_its_start_was_trained():
    """The starter's recipe (cpu-quick) names the CPU it trained on; a live session from it takes the
    machine's accelerator when there is one ("auto"), and a device named for the session wins."""
    base = preset("cpu-quick")
    assert base.device == "cpu"
    assert live_config(base).device == "auto" and live_config(base, trained=False).device == "auto"
    assert live_config(base, device="cuda:1").device == "cuda:1"


def test_a_live_session_with_a_moving_average_predicts_and_keeps_the_average(tmp_path):
    """With ``ema`` the overlay comes from the moving average of the weights and ``best.pt`` (what Predict
    and the Runs page use) holds that average; ``latest.pt`` keeps the newest weights to resume from."""
    import torch

    from unet.exchange.checkpoint import load_checkpoint
    from unet.prediction.infer import predict_slice

    torch.manual_seed(0)
    volume, labels = make_synthetic_em((1, 64, 64), np.random.default_rng(5), cell_size=16)
    base = preset("cpu-quick")
    config = replace(base, model=replace(base.model, initial_features=4, depth=2), patch_size=32, batch_size=2,
                     device="cpu")
    trainer = LiveTrainer(live_config(config, trained=False), tmp_path, ema=0.9)
    trainer.set_slices({0: (volume[0], labels_to_target(labels)[0])}, new=[0])
    assert trainer.train_for(60, max_steps=15) == 15
    image = volume[0]
    shown = trainer.predict(image)
    averaged = predict_slice(trainer.average.module, image)
    newest = predict_slice(trainer.trainer.model, image)
    assert np.array_equal(shown, averaged) and not np.allclose(shown, newest, atol=1e-4)
    trainer.save()
    best = load_checkpoint(tmp_path / "best.pt").build_model("cpu")
    latest = load_checkpoint(tmp_path / "latest.pt").build_model("cpu")
    assert np.allclose(predict_slice(best, image), averaged, atol=1e-6)
    assert np.allclose(predict_slice(latest, image), newest, atol=1e-6)
    assert trainer.trainer.model.training  # predicting leaves the trainer's own weights training


def test_a_live_session_keeps_its_starts_drawing_convention_until_a_slice_is_painted_all_over(tmp_path):
    """Strokes say nothing about where borders are drawn, so the flips keep the starting weights' convention;
    a fully painted slice shows the lab's own, measured on what was painted (never on a teacher's answers),
    and the session's checkpoints record it."""
    from scipy import ndimage as ndi

    from unet.exchange.checkpoint import load_checkpoint
    from unet.training.data import TrainData
    from unet.training.train import train

    volume, labels = make_synthetic_em((2, 128, 128), np.random.default_rng(3), noise=4.0)
    base = preset("tiny")
    drawn = np.stack([np.clip(ndi.shift(v.astype(np.float32), (0.6, -0.3), order=3, mode="reflect"), 0, 255)
                      for v in volume]).astype(np.uint8)  # these labels sit (-0.6, +0.3) from the membranes
    train(replace(base, steps=1), TrainData.from_stack(drawn, labels, [0, 1], []), out_dir=tmp_path / "start")
    parent = tuple(load_checkpoint(tmp_path / "start" / "latest.pt").meta["label_offset"])
    assert abs(parent[0] + 0.6) < 0.1
    learner = LiveTrainer(live_config(base), tmp_path / "live", init_from=tmp_path / "start" / "latest.pt",
                          distill=0.3, reference=tmp_path / "start" / "latest.pt")
    targets = labels_to_target(labels)
    learner.set_slices({0: (volume[0], disk_strokes(targets[0], seed=0))}, new=[0])
    assert learner.trainer.label_offset == parent  # the teacher fills the slice in; its answer is not measured
    learner.set_slices({0: (volume[0], disk_strokes(targets[0], seed=0)), 1: (volume[1], targets[1])}, new=[1])
    assert max(map(abs, learner.trainer.label_offset)) < 0.1  # this lab draws on the membranes
    learner.train_for(0.0, max_steps=1)
    learner.save()
    assert load_checkpoint(tmp_path / "live" / "latest.pt").meta["label_offset"] == list(learner.trainer.label_offset)
