"""Training on several processes with DistributedDataParallel, launched by torchrun as on a multi-GPU
machine, here with the gloo backend on the CPU: the same loss curve as one process with the same global
batch, the same checkpoints, and resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from unet.exchange.checkpoint import load_checkpoint
from unet.training.synthetic import make_synthetic_em


@pytest.fixture
def stack(tmp_path):
    volume, labels = make_synthetic_em((4, 128, 128), np.random.default_rng(1), cell_size=20)
    for name, data in (("v.tif", volume), ("l.tif", labels)):
        tifffile.imwrite(tmp_path / name, data, imagej=True, metadata={"axes": "ZYX"})
    return tmp_path


def _train(stack, out, processes: int, steps: int, *extra: str) -> subprocess.CompletedProcess:
    args = ["train", "--volume", str(stack / "v.tif"), "--labels", str(stack / "l.tif"), "--train-slices", "0-3",
            "--preset", "tiny", "--steps", str(steps), "--batch-size", "4", "--seed", "3", "--out", str(out), *extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, "-m", "unet", *args], capture_output=True, text=True, timeout=300, env=env,
                          start_new_session=True)  # (torchrun signals its process group when a rank fails)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(out) -> list[float]:
    return [h["loss"] for h in json.loads((out / "history.json").read_text())["steps"]]


def test_two_processes_follow_the_loss_curve_of_one_with_the_same_global_batch(stack):
    _train(stack, stack / "one", 1, 20)
    two = _train(stack, stack / "two", 2, 20)
    assert "2 processes, DistributedDataParallel" in two.stdout
    one_curve, two_curve = np.array(_losses(stack / "one")), np.array(_losses(stack / "two"))
    assert len(one_curve) == len(two_curve) == 20
    # the same weights and the same global batch from the first step; batch norm sees 2 patches per process
    # instead of 4 (SyncBatchNorm needs GPUs) and each process averages its own pixels: close, not equal
    assert two_curve[0] == pytest.approx(one_curve[0], rel=1e-3)
    np.testing.assert_allclose(two_curve, one_curve, rtol=0.05)
    assert two_curve[-5:].mean() < two_curve[:5].mean()  # and it learns
    for kind in ("best", "latest"):
        assert load_checkpoint(stack / "two" / f"{kind}.pt").meta["step"] == 20


def test_a_distributed_run_that_stops_early_ends_on_every_process(stack):
    """Early stopping ends the loop right after a validation: rank 0 knew the run ends validated, the others
    did not and waited in a last validation's collective that rank 0 never made (a hang on GPUs, an abort with
    gloo). Every rank now knows where the last validation was. (A learning rate of 1e-9 leaves the weights as they
    are, so a validation soon fails to improve.)"""
    _train(stack, stack / "early", 2, 40, "--train-slices", "0-2", "--val-slices", "3", "--val-every", "1",
           "--patience", "1", "--lr", "1e-9")
    latest = load_checkpoint(stack / "early" / "latest.pt")
    assert latest.meta["step"] < 40 and latest.meta["validations"][-1]["step"] == latest.meta["step"]


def test_a_distributed_run_resumes_from_its_latest_checkpoint(stack):
    _train(stack, stack / "run", 2, 8)
    assert load_checkpoint(stack / "run" / "latest.pt").meta["step"] == 8
    _train(stack, stack / "run", 2, 14, "--resume")
    latest = load_checkpoint(stack / "run" / "latest.pt")
    assert latest.meta["step"] == 14 and [h["step"] for h in latest.meta["history"]] == list(range(1, 15))


def test_the_app_trains_a_run_on_two_processes_and_cancels_and_resumes_it(tmp_path, monkeypatch):
    """As on a machine with two GPUs: the run's worker is launched under torchrun (here gloo on the CPU),
    and the store sees one run with one curve, its checkpoints, a cancel and a resume."""
    from storage.db import open_store
    from storage.jobs import queue
    from storage.records import datasets, runs
    from storage.settings import Settings
    from unet.network.config import preset

    monkeypatch.setenv("NEUROSEG_TRAIN_PROCESSES", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    settings = Settings.from_env(tmp_path / "data")
    sessions, store = open_store(settings, migrate=True)
    volume, labels = make_synthetic_em((5, 96, 96), np.random.default_rng(2), cell_size=20)
    for name, data in (("v.tif", volume), ("l.tif", labels)):
        tifffile.imwrite(tmp_path / name, data, imagej=True, metadata={"axes": "ZYX"})
    with sessions.begin() as s:
        ds = datasets.import_dataset(s, store, tmp_path / "v.tif", tmp_path / "l.tif")
        spec = {"train": [{"dataset_id": ds.id, "slices": [0, 1, 2, 3]}], "val": [{"dataset_id": ds.id, "slices": [4]}]}
        run = runs.submit_training(s, spec, preset("tiny", steps=100000, batch_size=4, checkpoint_every=5))
    (proc,) = queue.start_queued(sessions, settings)
    try:
        _cancel_and_resume(sessions, store, run, proc, settings)
    finally:  # a failed assertion must not leave a training run behind
        queue.terminate(proc.pid, 9)


def _cancel_and_resume(sessions, store, run, proc, settings):
    from sqlalchemy import func, select

    from storage.jobs import queue
    from storage.models import Metric
    from storage.records import runs
    from tests.store.test_jobs import wait_for

    def losses():
        with sessions.begin() as s:
            return s.scalar(select(func.count()).select_from(Metric).where(Metric.run_id == run.id,
                                                                             Metric.key == "loss")) or 0

    wait_for(lambda: losses() >= 12, timeout=240, what="twelve steps")
    with sessions.begin() as s:
        assert runs.get_run(s, run.id).pid == proc.pid  # the launcher's process group is the worker
        runs.cancel_run(s, run.id)
    assert proc.wait(timeout=120) == 0
    with sessions.begin() as s:
        info = runs.get_run(s, run.id)
        assert info.status == "CANCELLED"
        steps = [m.step for m in s.scalars(select(Metric).where(Metric.run_id == run.id, Metric.key == "loss"))]
    assert steps == list(range(1, len(steps) + 1))  # one curve: only rank 0 reports
    log = store.worker_log(run.id).read_text()
    assert "(2 processes)" in log
    stopped_at = load_checkpoint(store.run_dir(run.id) / "latest.pt").meta["step"]
    assert stopped_at == len(steps)
    with sessions.begin() as s:
        runs.resume_run(s, run.id)
    (proc,) = queue.start_queued(sessions, settings)
    try:
        wait_for(lambda: losses() >= stopped_at + 6, timeout=240, what="six more steps")
        with sessions.begin() as s:
            runs.cancel_run(s, run.id)
        proc.wait(timeout=120)
    finally:
        queue.terminate(proc.pid, 9)
    assert f"resumed from step {stopped_at}" in store.worker_log(run.id).read_text()
