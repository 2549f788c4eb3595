"""The supervisor settles jobs on its own: no page, no service, no status read needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import tifffile

from storage.db import open_store
from storage.records import datasets, runs
from storage.settings import PROJECT_ROOT, Settings
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


def test_a_hung_worker_is_terminated_by_the_supervisor_with_no_page_open(tmp_path, synthetic):
    settings = Settings.from_env(tmp_path / "data")
    sessions, store = open_store(settings, migrate=True)
    volume, labels = synthetic
    tifffile.imwrite(tmp_path / "v.tif", volume)
    tifffile.imwrite(tmp_path / "l.tif", labels)
    with sessions.begin() as s:
        ds = datasets.import_dataset(s, store, tmp_path / "v.tif", tmp_path / "l.tif")
        run = runs.submit_training(s, {"train": [{"dataset_id": ds.id, "slices": [0, 1]}], "val": []},
                                   preset("tiny"))
    env = {**os.environ, "NEUROSEG_DATA_DIR": str(settings.data_dir), "DATABASE_URL": settings.database_url}
    hung = subprocess.Popen([sys.executable, "-c", HUNG, str(run.id)], cwd=PROJECT_ROOT, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert hung.stdout.readline() == "claimed\n"
        with sessions.begin() as s:  # the user pressed Cancel, then closed the tab
            assert runs.cancel_run(s, run.id).cancel_requested

        supervisor = subprocess.Popen(
            [sys.executable, "-m", "storage.jobs.supervisor", "--interval", "0.2", "--cancel-grace", "1",
             "--exit-when-idle"], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert hung.wait(timeout=60) == -signal.SIGTERM  # it ignored the cancel: the supervisor stopped it
        out, err = supervisor.communicate(timeout=60)  # … then settled the run and, idle, exited
    finally:
        if hung.poll() is None:
            os.killpg(hung.pid, signal.SIGKILL)
    assert supervisor.returncode == 0, err
    assert f"run {run.id}: sent SIGTERM to its worker" in out and f"cancelled: {run.id}" in out
    with sessions.begin() as s:
        info = runs.get_run(s, run.id)
    assert info.status == "CANCELLED" and info.finished is not None
