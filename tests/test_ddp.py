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

from unet.checkpoint import load_checkpoint
from unet.synthetic import make_synthetic_em


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
    done = subprocess.run([*launcher, "-m", "unet", *args], capture_output=True, text=True, timeout=300, env=env)
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


def test_a_distributed_run_resumes_from_its_latest_checkpoint(stack):
    _train(stack, stack / "run", 2, 8)
    assert load_checkpoint(stack / "run" / "latest.pt").meta["step"] == 8
    _train(stack, stack / "run", 2, 14, "--resume")
    latest = load_checkpoint(stack / "run" / "latest.pt")
    assert latest.meta["step"] == 14 and [h["step"] for h in latest.meta["history"]] == list(range(1, 15))
