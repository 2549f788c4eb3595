"""The supervisor settles jobs on its own: no page, no service, no status read needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import tifffile

from storage.db import open_store
from storage.records import datasets, predictions, runs, starter
from storage.settings import PROJECT_ROOT, Settings
from tests.store.test_starter import tiny_starter
from unet.network.config import preset

# A worker stuck inside a step: it claimed its run like the real one, then never looks at the cancel flag
# again (and never beats: the supervisor must not wait for the 90 s heartbeat limit either).
HUNG = """
import os, sys, time
from storage.db import open_store
from storage.jobs.procs import start_time
from storage.jobs.queue import claim
from storage.settings import Settings
sessions, _ = open_store(Settings.from_env())
with sessions.begin() as s:
    assert claim(s, int(sys.argv[1]), os.getpid(), start_time(os.getpid()))
print("claimed", flush=True)
while True:
    time.sleep(3600)
"""
# A prediction process stuck inside a block: it took its prediction as the real one does, then never reports
HUNG_PREDICTION = """
import os, sys, time
from sqlalchemy import update
from storage.db import open_store
from storage.jobs.procs import start_time
from storage.models import Prediction
from storage.settings import Settings
sessions, _ = open_store(Settings.from_env())
with sessions.begin() as s:
    s.execute(update(Prediction).where(Prediction.id == int(sys.argv[1]))
              .values(status="RUNNING", pid=os.getpid(), pid_started=start_time(os.getpid()), device="cpu"))
print("claimed", flush=True)
while True:
    time.sleep(3600)
"""


def test_a_hung_worker_is_terminated_by_the_supervisor_with_no_page_open(tmp_path, synthetic, monkeypatch):
    tiny_starter(tmp_path / "models", monkeypatch)
    settings = Settings.from_env(tmp_path / "data")
    sessions, store = open_store(settings, migrate=True)
    volume, labels = synthetic
    tifffile.imwrite(tmp_path / "v.tif", volume)
    tifffile.imwrite(tmp_path / "l.tif", labels)
    with sessions.begin() as s:
        ds = datasets.import_dataset(s, store, tmp_path / "v.tif", tmp_path / "l.tif")
        run = runs.submit_training(s, {"train": [{"dataset_id": ds.id, "slices": [0, 1]}], "val": []},
                                   preset("tiny"))
        model = starter.register(s, store, tmp_path / "models").checkpoint_id
        job = predictions.submit_prediction(s, model, ds.id, [0, 1])
    env = {**os.environ, "NEUROSEG_DATA_DIR": str(settings.data_dir), "DATABASE_URL": settings.database_url}
    hung = subprocess.Popen([sys.executable, "-c", HUNG, str(run.id)], cwd=PROJECT_ROOT, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, text=True)
    stuck = subprocess.Popen([sys.executable, "-c", HUNG_PREDICTION, str(job.id)], cwd=PROJECT_ROOT, env=env,
                             start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert hung.stdout.readline() == "claimed\n" and stuck.stdout.readline() == "claimed\n"
        with sessions.begin() as s:  # the user pressed Cancel on both, then closed the tab
            assert runs.cancel_run(s, run.id).cancel_requested
            assert predictions.cancel_prediction(s, job.id).stopping

        supervisor = subprocess.Popen(
            [sys.executable, "-m", "storage.jobs.supervisor", "--interval", "0.2", "--cancel-grace", "1",
             "--exit-when-idle"], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert hung.wait(timeout=60) == -signal.SIGTERM  # it ignored the cancel: the supervisor stopped it
        assert stuck.wait(timeout=60) == -signal.SIGTERM  # so did the prediction's process
        out, err = supervisor.communicate(timeout=60)  # … then settled both and, idle, exited
    finally:
        for process in (hung, stuck):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert supervisor.returncode == 0, err
    assert f"run {run.id}: sent SIGTERM to its worker" in out and f"cancelled: {run.id}" in out
    assert f"prediction {job.id}: sent SIGTERM to its process" in out and f"cancelled prediction: {job.id}" in out
    with sessions.begin() as s:
        info = runs.get_run(s, run.id)
        ended = predictions.get_prediction(s, job.id)
    assert info.status == "CANCELLED" and info.finished is not None
    assert ended.status == "CANCELLED" and ended.error == "cancelled: its process was stopped"
