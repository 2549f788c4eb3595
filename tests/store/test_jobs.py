"""Background training with real worker subprocesses on a real SQLite file."""

import dataclasses
import os
import shutil
import signal
import time

import pytest
import tifffile

from domain.records import NotFound
from storage.db import open_store
from storage.jobs import queue
from storage.records import datasets, deletion, masks, runs
from storage.records.checkpoints import checkpoints as run_checkpoints
from storage.service import Neuroseg
from storage.settings import Settings
from unet.exchange.checkpoint import load_checkpoint
from unet.network.config import preset


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
    sessions, store = open_store(settings, migrate=True)
    volume, labels = synthetic
    tifffile.imwrite(tmp_path / "v.tif", volume, photometric="minisblack")
    tifffile.imwrite(tmp_path / "l.tif", labels, photometric="minisblack")
    with sessions.begin() as s:
        ds = datasets.import_dataset(s, store, tmp_path / "v.tif", tmp_path / "l.tif", name="demo")
    spec = {"train": [{"dataset_id": ds.id, "slices": [0, 1, 2, 3]}], "val": [{"dataset_id": ds.id, "slices": [4]}]}
    return settings, sessions, store, spec


def status(sessions, run_id):
    with sessions.begin() as s:
        return runs.get_run(s, run_id).status


def test_worker_trains_to_finished_and_the_queue_moves_on(env):
    settings, sessions, store, spec = env
    with sessions.begin() as s:
        first = runs.submit_training(s, spec, preset("tiny", steps=20))
        second = runs.submit_training(s, spec, preset("tiny", steps=10))
    procs = queue.start_queued(sessions, settings)
    assert len(procs) == 1  # one device, one run at a time
    assert queue.start_queued(sessions, settings) == []  # a repeated click starts nothing new
    procs[0].wait(timeout=300)
    assert status(sessions, first.id) == "FINISHED"
    wait_for(lambda: status(sessions, second.id) == "FINISHED", what="the queued run to finish")
    with sessions.begin() as s:
        losses = runs.run_metrics(s, first.id, "loss")
        checkpoints = {c.kind: c for c in run_checkpoints(s, first.id)}
        assert [step for step, _, _ in losses] == list(range(1, 21))
        assert runs.run_metrics(s, first.id, "val_pixel_error")
    assert set(checkpoints) == {"best", "latest"} and checkpoints["latest"].step == 20
    assert load_checkpoint(store.abspath(checkpoints["latest"].file)).meta["step"] == 20
    # the worker's own lines reach the run's log, whose tail the Train page shows
    log = store.worker_log(first.id).read_text()
    assert f"storage.jobs.train_worker: run {first.id}: finished after 20 steps" in log


def test_a_second_worker_for_the_same_run_does_nothing(env):
    settings, sessions, _, spec = env
    with sessions.begin() as s:
        run = runs.submit_training(s, spec, preset("tiny", steps=10))
    a = queue.launch_worker(settings, run.id)
    b = queue.launch_worker(settings, run.id)  # a double click that got past the page
    assert a.wait(timeout=300) == 0 and b.wait(timeout=300) == 0
    assert status(sessions, run.id) == "FINISHED"
    with sessions.begin() as s:
        assert [step for step, _, _ in runs.run_metrics(s, run.id, "loss")] == list(range(1, 11))


def test_cancel_then_resume(env):
    settings, sessions, _, spec = env
    with sessions.begin() as s:
        run = runs.submit_training(s, spec, preset("tiny", steps=100000, checkpoint_every=5))
    proc = queue.start_queued(sessions, settings)[0]
    wait_for(lambda: jobs_latest_step(sessions, run.id) >= 5, what="a first checkpoint")
    with sessions.begin() as s:
        assert runs.cancel_run(s, run.id).cancel_requested
    proc.wait(timeout=120)
    assert status(sessions, run.id) == "CANCELLED"
    with sessions.begin() as s:
        with pytest.raises(ValueError, match="only cancelled, failed or lost"):
            runs.resume_run(s, _finished_run(s, spec))
        runs.resume_run(s, run.id)
    assert status(sessions, run.id) == "QUEUED"


def _finished_run(session, spec):
    from storage.models import Run

    row = Run(status="FINISHED", spec=spec, config={}, device="cpu")
    session.add(row)
    session.flush()
    return row.id


def jobs_latest_step(sessions, run_id):
    with sessions.begin() as s:
        latest = [c for c in run_checkpoints(s, run_id) if c.kind == "latest"]
    return latest[0].step if latest else 0


def test_kill_9_becomes_lost_and_resume_finishes(env):
    settings, sessions, store, spec = env
    with sessions.begin() as s:
        run = runs.submit_training(s, spec, preset("tiny", steps=400, checkpoint_every=5, val_every=1000))
    proc = queue.start_queued(sessions, settings)[0]
    wait_for(lambda: jobs_latest_step(sessions, run.id) >= 10, what="checkpoints")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert status(sessions, run.id) == "RUNNING"  # a read changes nothing: the supervisor settles it
    with sessions.begin() as s:
        assert queue.reconcile(s).lost == [run.id]
        info = runs.get_run(s, run.id)
    assert info.status == "LOST" and "worker process is gone" in info.error
    recorded = jobs_latest_step(sessions, run.id)
    with sessions.begin() as s:
        path = store.abspath(next(c.file for c in run_checkpoints(s, run.id) if c.kind == "latest"))
        # the latest checkpoint is whole; the kill may land after its rename and before its row is updated,
        # so the file can be one checkpoint ahead of the row (resume goes on from the file)
        killed_at = load_checkpoint(path).meta["step"]
        assert killed_at in (recorded, recorded + 5)
        runs.resume_run(s, run.id)
    queue.start_queued(sessions, settings)[0].wait(timeout=300)
    assert status(sessions, run.id) == "FINISHED"
    with sessions.begin() as s:
        steps = [step for step, _, _ in runs.run_metrics(s, run.id, "loss")]
    assert steps[-1] == 400 and killed_at + 1 in steps  # it continued after the checkpoint


def test_deleting_a_dataset_takes_its_runs_and_says_so(env):
    settings, sessions, store, spec = env
    with sessions.begin() as s:
        run = runs.submit_training(s, spec, preset("tiny", steps=5))
    queue.start_queued(sessions, settings)[0].wait(timeout=300)
    run_dir = store.root / "runs" / str(run.id)
    assert (run_dir / "latest.pt").exists()
    with sessions.begin() as s:
        dataset_id = spec["train"][0]["dataset_id"]
        assert datasets.runs_using_dataset(s, dataset_id) == [run.id]
        plan = deletion.plan_dataset(s, store, dataset_id)
        announced = deletion.preview(store, plan)
        gone = deletion.execute(s, store, plan)
    assert gone == announced  # the confirmation said exactly what went
    assert (gone.datasets, gone.runs, gone.checkpoints, gone.mask_versions) == (1, 1, 2, 6)
    assert "1 run, 2 checkpoints" in gone.describe()
    assert not run_dir.exists() and not any(store.root.rglob("*.tif"))
    with sessions.begin() as s:
        with pytest.raises(NotFound):
            runs.get_run(s, run.id)
        assert runs.run_metrics(s, run.id, "loss") == []


def test_active_runs_block_deletion(env):
    _, sessions, store, spec = env
    with sessions.begin() as s:
        run = runs.submit_training(s, spec, preset("tiny", steps=5))
        with pytest.raises(ValueError, match="cancel it before deleting"):
            deletion.execute(s, store, deletion.plan_run(s, store, run.id))
        with pytest.raises(ValueError, match="training on this dataset"):
            deletion.execute(s, store, deletion.plan_dataset(s, store, spec["train"][0]["dataset_id"]))


HAMMER = """
import sys, time
from storage.db import make_engine, session_factory
from storage.models import Metric
sessions = session_factory(make_engine(sys.argv[1]))
end, n = time.monotonic() + float(sys.argv[3]), 0
while time.monotonic() < end:
    with sessions.begin() as s:
        s.add_all([Metric(run_id=int(sys.argv[2]), key="hammer", step=n * 10 + i, value=float(i), time=0.0)
                   for i in range(10)])
    n += 1
print(n)
"""


@pytest.mark.slow
def test_concurrent_writers_for_twenty_seconds_never_see_a_locked_database(env, tmp_path):
    import subprocess
    import sys

    import numpy as np

    from storage.settings import PROJECT_ROOT

    settings, sessions, store, spec = env
    # 20 s by default keeps CI under its limit; NEUROSEG_SOAK_SECONDS=600 soaks for longer by hand
    seconds = float(os.environ.get("NEUROSEG_SOAK_SECONDS", "20"))
    with sessions.begin() as s:
        run = runs.submit_training(s, spec, preset("tiny", steps=10**6, checkpoint_every=20, val_every=50,
                                                   max_seconds=seconds))
    worker = queue.start_queued(sessions, settings)[0]
    hammer = subprocess.Popen([sys.executable, "-c", HAMMER, settings.database_url, str(run.id), str(seconds)],
                              cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dataset_id = spec["train"][0]["dataset_id"]
    saves, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:  # the UI side: save mask versions and read the run, as fast as it can
        with sessions.begin() as s:
            parent = masks.latest_mask(s, dataset_id, 5)
            mask = np.full((96, 96), saves % 2, np.uint8)
            masks.save_mask(s, store, dataset_id, 5, mask, kind="painted", parent_id=parent.id if parent else None)
            runs.get_run(s, run.id)
        saves += 1
    out, err = hammer.communicate(timeout=120)
    assert hammer.returncode == 0, err
    assert worker.wait(timeout=300) == 0
    log = (store.root / "runs" / str(run.id) / "worker.log").read_text()
    assert "locked" not in log and "locked" not in err
    assert status(sessions, run.id) == "FINISHED"
    with sessions.begin() as s:
        assert len(masks.mask_history(s, dataset_id, 5)) == saves + 1  # + the uploaded version
        assert len(runs.run_metrics(s, run.id, "hammer")) == int(out) * 10
        assert runs.run_metrics(s, run.id, "loss")
    print(f"{saves} mask saves, {int(out) * 10} hammered metric rows, {seconds:.0f} s, no lock errors")


def test_server_start_marks_runs_orphaned_by_a_crash_as_lost(env):
    from datetime import UTC, datetime

    from storage.models import Run

    settings, sessions, _, spec = env
    dead = subprocess_that_exited()
    with sessions.begin() as s:
        row = Run(status="RUNNING", spec=spec, config=preset("tiny").to_dict(), device="cpu", pid=dead,
                  pid_started=1.0, heartbeat=datetime.now(UTC), started=datetime.now(UTC))
        s.add(row)
        s.flush()
        run_id = row.id
    svc = Neuroseg(settings)  # what the server does once when it starts (migrate, then supervise)
    try:
        info = svc.run(run_id)
    finally:
        svc.close()
    assert info.status == "LOST" and f"pid {dead}" in info.error


def subprocess_that_exited() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _running_row(sessions, spec, proc, heartbeat_age_s: float, cancel_age_s: float | None = None) -> int:
    from datetime import UTC, datetime, timedelta

    from storage.jobs.procs import start_time
    from storage.models import Run

    now = datetime.now(UTC)
    with sessions.begin() as s:
        row = Run(status="RUNNING", spec=spec, config=preset("tiny").to_dict(), device="cpu", pid=proc.pid,
                  pid_started=start_time(proc.pid), heartbeat=now - timedelta(seconds=heartbeat_age_s),
                  started=now, cancel_requested=None if cancel_age_s is None else now - timedelta(seconds=cancel_age_s))
        s.add(row)
        s.flush()
        return row.id


def test_a_silent_worker_becomes_lost_and_is_terminated(env):
    import subprocess

    _, sessions, _, spec = env
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)  # alive, but never beats
    run_id = _running_row(sessions, spec, proc, heartbeat_age_s=600)
    with sessions.begin() as s:
        assert runs.get_run(s, run_id).status == "RUNNING" and proc.poll() is None  # reads are pure
        assert queue.reconcile(s).signalled == [(run_id, "SIGTERM")]
        info = runs.get_run(s, run_id)
    assert info.status == "LOST" and "no heartbeat since" in info.error
    assert proc.wait(timeout=30) == -signal.SIGTERM


def test_an_unheeded_cancel_is_escalated_to_sigterm_after_the_grace_period(env):
    import subprocess

    _, sessions, _, spec = env
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    fresh = _running_row(sessions, spec, proc, heartbeat_age_s=1, cancel_age_s=1)
    with sessions.begin() as s:
        assert queue.reconcile(s).signalled == []  # still within the grace period
        assert runs.get_run(s, fresh).status == "RUNNING"
    assert proc.poll() is None
    _age_cancel(sessions, fresh, queue.CANCEL_GRACE * 1.5)  # … and later, past it
    with sessions.begin() as s:
        assert queue.reconcile(s).signalled == [(fresh, "SIGTERM")]
    assert proc.wait(timeout=30) == -signal.SIGTERM
    with sessions.begin() as s:  # the worker is gone: the cancel it was asked for is what happened
        assert queue.reconcile(s).cancelled == [fresh]
        assert runs.get_run(s, fresh).status == "CANCELLED"


def _age_cancel(sessions, run_id, by) -> None:
    from storage.models import Run

    with sessions.begin() as s:
        row = s.get(Run, run_id)
        row.cancel_requested = row.cancel_requested - by


def test_a_worker_that_ignores_sigterm_too_gets_sigkill(env):
    _, sessions, _, spec = env
    proc = _stubborn()
    run_id = _running_row(sessions, spec, proc, heartbeat_age_s=1, cancel_age_s=1)
    _age_cancel(sessions, run_id, queue.CANCEL_GRACE * 1.5)
    with sessions.begin() as s:
        assert queue.reconcile(s).signalled == [(run_id, "SIGTERM")]
    assert proc.poll() is None  # ignored
    _age_cancel(sessions, run_id, queue.CANCEL_GRACE)
    with sessions.begin() as s:
        assert queue.reconcile(s).signalled == [(run_id, "SIGKILL")]
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_a_supervisor_that_starts_late_still_warns_before_it_kills(env):
    """The cancel is long past when the supervisor first looks (it was down): SIGTERM first all the same,
    and SIGKILL only a grace period after that SIGTERM."""
    from datetime import UTC, datetime

    _, sessions, _, spec = env
    proc = _stubborn()
    run_id = _running_row(sessions, spec, proc, heartbeat_age_s=1, cancel_age_s=1)
    _age_cancel(sessions, run_id, queue.CANCEL_GRACE * 5)
    sent: dict = {}
    for _ in range(2):  # at once, and again within the grace of that SIGTERM
        with sessions.begin() as s:
            assert queue.reconcile(s, sigterm_sent=sent).signalled == [(run_id, "SIGTERM")]
    assert proc.poll() is None and list(sent) == [(run_id, proc.pid)]
    sent[(run_id, proc.pid)] = datetime.now(UTC) - queue.CANCEL_GRACE * 1.5
    with sessions.begin() as s:
        assert queue.reconcile(s, sigterm_sent=sent).signalled == [(run_id, "SIGKILL")]
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _stubborn():
    """A process that ignores SIGTERM (its handler is in place when this returns)."""
    import subprocess
    import sys

    code = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
            "time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_a_run_whose_data_is_damaged_fails_with_the_reason(env):
    settings, sessions, store, spec = env
    with sessions.begin() as s:
        run = runs.submit_training(s, spec, preset("tiny", steps=5))
    shutil.rmtree(store.abspath(store.volume_path(spec["train"][0]["dataset_id"])))  # the disk lost it
    queue.start_queued(sessions, settings)[0].wait(timeout=120)
    with sessions.begin() as s:
        info = runs.get_run(s, run.id)
    assert info.status == "FAILED"
    assert "Traceback" in info.error and "volume.ome.zarr is missing" in info.error


def test_a_cpu_training_takes_its_share_of_the_cores_while_predictions_run_beside_it(env, monkeypatch):
    """Two processes of two torch threads on 2 cores trained 4× slower in all than one thread each
    (``bench.pipeline --beside``): a CPU training counts the app's other CPU jobs as it trains and keeps
    to its share of the cores, and takes its own choice again when they are done."""
    import torch

    from storage.jobs.lifecycle import DatabaseReporter
    from storage.models import Checkpoint, Prediction, Run
    from unet.network import threads
    from unet.network.threads import shared_threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 2)  # CI's machine, whatever this one has
    assert [shared_threads(2, n, cores=2) for n in (0, 1, 3)] == [2, 1, 1]
    assert [shared_threads(4, n, cores=16) for n in (0, 1, 3, 7)] == [4, 4, 4, 2]
    _, sessions, store, spec = env
    with sessions.begin() as s:
        training, done = (Run(status=status, spec=spec, config=preset("tiny").to_dict(), device="cpu")
                          for status in ("RUNNING", "FINISHED"))
        s.add_all([training, done])
        s.flush()
        checkpoint = Checkpoint(run_id=done.id, kind="best", file="best.pt", step=1, sha256="", metrics={})
        s.add(checkpoint)
        s.flush()
        # one whose worker has not said where it computes yet (counted), and one on a GPU (not counted)
        prediction, on_gpu = (Prediction(checkpoint_id=checkpoint.id, dataset_id=spec["train"][0]["dataset_id"],
                                         slices=[0], status="RUNNING", done=0, file="", sha256="", files={},
                                         device=device) for device in (None, "cuda"))
        s.add_all([prediction, on_gpu])
        s.flush()
        run_id, prediction_id = training.id, prediction.id
    with sessions.begin() as s:
        assert queue.cpu_jobs_beside(s, run_id=run_id) == 1  # the prediction
        assert queue.cpu_jobs_beside(s, prediction_id=prediction_id) == 1  # the training
        assert queue.cpu_jobs_beside(s) == 2
        s.get(Prediction, prediction_id).device = "cpu"
        assert queue.cpu_jobs_beside(s) == 2
    # a prediction's share, asked as its blocks finish: half the cores, then all of them once the training ends
    share = queue.CoreShare(sessions, 2, prediction_id=prediction_id)
    assert (share(), share.others) == (1, 1)
    with sessions.begin() as s:
        s.get(Run, run_id).status = "FINISHED"
    assert share() == 1  # (counted at most every SHARE_EVERY seconds)
    share.last = float("-inf")
    assert (share(), share.others) == (2, 0)
    with sessions.begin() as s:
        s.get(Run, run_id).status = "RUNNING"
    reporter = DatabaseReporter(sessions, store, run_id)
    before = torch.get_num_threads()
    try:
        reporter.use_cpu_threads(2)
        assert torch.get_num_threads() == shared_threads(2, 1) == 1
        with sessions.begin() as s:
            s.get(Prediction, prediction_id).status = "FINISHED"
        reporter.share_cores()  # (counted at most every SHARE_EVERY seconds)
        assert torch.get_num_threads() == shared_threads(2, 1)
        reporter.share.last = float("-inf")
        reporter.share_cores()
        assert torch.get_num_threads() == 2  # alone again: its own choice
    finally:
        torch.set_num_threads(before)


def test_a_predictions_speed_counts_only_the_slices_this_attempt_predicted():
    """Slices per second from the worker's progress reports (blocks done, in all, when): a resumed prediction's
    earlier blocks are left out, and a slice cut into tiles is several blocks."""
    from datetime import UTC, datetime

    from domain.kinds import RunStatus
    from domain.records import PredictionInfo
    from storage.jobs.predict_worker import timing
    from ui.prediction import speed

    # 3 slices of 2 tiles each, resumed with 2 tiles already written: 4 tiles (2 slices) in 8 s
    assert timing([(2, 6, 10.0), (3, 6, 12.0), (6, 6, 18.0)], 3) == {"slices": 2.0, "seconds": 8.0,
                                                                      "slices_per_s": 0.25}
    assert timing([(6, 6, 1.0)], 3) is None and timing([(2, 6, 1.0), (2, 6, 2.0)], 3) is None  # nothing left
    job = PredictionInfo(1, 1, 1, 1, [0, 1, 2], RunStatus.FINISHED, 6, None,
                         {"timing": {"slices": 2.0, "seconds": 8.0, "slices_per_s": 0.25}}, datetime.now(UTC),
                         device="cpu")
    assert speed(job) == ("Predicted 2 slices in 8.0 s on the CPU: 0.2 slices per second (this attempt; the rest "
                          "were written before it was resumed).")
    slow = dataclasses.replace(job, metrics={"timing": {"slices": 2.0, "seconds": 40.0, "slices_per_s": 0.05}})
    assert speed(slow).startswith("Predicted 2 slices in 40.0 s on the CPU: 20 s per slice")  # (below 0.1 per second)
    fast = PredictionInfo(1, 1, 1, 1, list(range(600)), RunStatus.FINISHED, 600, None,
                          {"timing": {"slices": 600, "seconds": 2.0, "slices_per_s": 300.0}}, datetime.now(UTC),
                          device="cuda")
    assert speed(fast) == "Predicted 600 slices in 2.0 s on the GPU: 300.0 slices per second."
    assert speed(PredictionInfo(1, 1, 1, 1, [0], RunStatus.FINISHED, 1, None, None, datetime.now(UTC))) is None
