"""Background training with real worker subprocesses on a real SQLite file."""

import os
import signal
import time

import pytest
import tifffile

from storage import api, jobs
from storage.db import open_store
from storage.settings import Settings
from unet.checkpoint import load_checkpoint
from unet.config import preset


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    """Poll the database for a state the worker writes (there is no event to wait on across processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def env(tmp_path, synthetic):
    settings = Settings.from_env(tmp_path / "data")
    sessions, store = open_store(settings)
    volume, labels = synthetic
    tifffile.imwrite(tmp_path / "v.tif", volume, photometric="minisblack")
    tifffile.imwrite(tmp_path / "l.tif", labels, photometric="minisblack")
    with sessions.begin() as s:
        ds = api.import_dataset(s, store, tmp_path / "v.tif", tmp_path / "l.tif", name="demo")
    spec = {"train": [{"dataset_id": ds.id, "slices": [0, 1, 2, 3]}], "val": [{"dataset_id": ds.id, "slices": [4]}]}
    return settings, sessions, store, spec


def status(sessions, run_id):
    with sessions.begin() as s:
        return jobs.get_run(s, run_id).status


def test_worker_trains_to_finished_and_the_queue_moves_on(env):
    settings, sessions, store, spec = env
    with sessions.begin() as s:
        first = jobs.submit_training(s, spec, preset("tiny", steps=20))
        second = jobs.submit_training(s, spec, preset("tiny", steps=10))
    procs = jobs.start_queued(sessions, settings)
    assert len(procs) == 1  # one device, one run at a time
    assert jobs.start_queued(sessions, settings) == []  # a repeated click starts nothing new
    procs[0].wait(timeout=300)
    assert status(sessions, first.id) == "FINISHED"
    wait_for(lambda: status(sessions, second.id) == "FINISHED", what="the queued run to finish")
    with sessions.begin() as s:
        losses = jobs.run_metrics(s, first.id, "loss")
        checkpoints = {c["kind"]: c for c in jobs.run_checkpoints(s, first.id)}
        assert [step for step, _, _ in losses] == list(range(1, 21))
        assert jobs.run_metrics(s, first.id, "val_pixel_error")
    assert set(checkpoints) == {"best", "latest"} and checkpoints["latest"]["step"] == 20
    assert load_checkpoint(store.abspath(checkpoints["latest"]["file"])).meta["step"] == 20


def test_a_second_worker_for_the_same_run_does_nothing(env):
    settings, sessions, _, spec = env
    with sessions.begin() as s:
        run = jobs.submit_training(s, spec, preset("tiny", steps=10))
    a = jobs.launch_worker(settings, run.id)
    b = jobs.launch_worker(settings, run.id)  # a double click that got past the page
    assert a.wait(timeout=300) == 0 and b.wait(timeout=300) == 0
    assert status(sessions, run.id) == "FINISHED"
    with sessions.begin() as s:
        assert [step for step, _, _ in jobs.run_metrics(s, run.id, "loss")] == list(range(1, 11))


def test_cancel_then_resume(env):
    settings, sessions, _, spec = env
    with sessions.begin() as s:
        run = jobs.submit_training(s, spec, preset("tiny", steps=100000, checkpoint_every=5))
    proc = jobs.start_queued(sessions, settings)[0]
    wait_for(lambda: jobs_latest_step(sessions, run.id) >= 5, what="a first checkpoint")
    with sessions.begin() as s:
        assert jobs.cancel_run(s, run.id).cancel_requested
    proc.wait(timeout=120)
    assert status(sessions, run.id) == "CANCELLED"
    with sessions.begin() as s:
        with pytest.raises(ValueError, match="only cancelled, failed or lost"):
            jobs.resume_run(s, _finished_run(s, spec))
        jobs.resume_run(s, run.id)
    assert status(sessions, run.id) == "QUEUED"


def _finished_run(session, spec):
    from storage.models import Run

    row = Run(status="FINISHED", spec=spec, config={}, device="cpu")
    session.add(row)
    session.flush()
    return row.id


def jobs_latest_step(sessions, run_id):
    with sessions.begin() as s:
        latest = [c for c in jobs.run_checkpoints(s, run_id) if c["kind"] == "latest"]
    return latest[0]["step"] if latest else 0


def test_kill_9_becomes_lost_and_resume_finishes(env):
    settings, sessions, store, spec = env
    with sessions.begin() as s:
        run = jobs.submit_training(s, spec, preset("tiny", steps=400, checkpoint_every=5, val_every=1000))
    proc = jobs.start_queued(sessions, settings)[0]
    wait_for(lambda: jobs_latest_step(sessions, run.id) >= 10, what="checkpoints")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    with sessions.begin() as s:
        info = jobs.get_run(s, run.id)  # a status read reconciles
    assert info.status == "LOST" and "worker process is gone" in info.error
    killed_at = jobs_latest_step(sessions, run.id)
    with sessions.begin() as s:
        path = store.abspath(next(c["file"] for c in jobs.run_checkpoints(s, run.id) if c["kind"] == "latest"))
        assert load_checkpoint(path).meta["step"] == killed_at  # the latest checkpoint is whole
        jobs.resume_run(s, run.id)
    jobs.start_queued(sessions, settings)[0].wait(timeout=300)
    assert status(sessions, run.id) == "FINISHED"
    with sessions.begin() as s:
        steps = [step for step, _, _ in jobs.run_metrics(s, run.id, "loss")]
    assert steps[-1] == 400 and killed_at + 1 in steps  # it continued after the checkpoint
