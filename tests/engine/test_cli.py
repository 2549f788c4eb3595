"""The command line, run as a user would: real subprocesses on real TIFF files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "unet", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_train_predict_evaluate(tmp_path, synthetic):
    volume, labels = synthetic
    tifffile.imwrite(tmp_path / "volume.tif", volume, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "labels.tif", labels, imagej=True, metadata={"axes": "ZYX"})
    run("train", "--volume", str(tmp_path / "volume.tif"), "--labels", str(tmp_path / "labels.tif"),
        "--train-slices", "0-3", "--val-slices", "4-5", "--preset", "tiny", "--steps", "20",
        "--out", str(tmp_path / "run"))
    assert (tmp_path / "run" / "best.pt").exists() and (tmp_path / "run" / "latest.json").exists()
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["steps"]) == 20 and history["validations"]

    run("predict", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--volume", str(tmp_path / "volume.tif"),
        "--slices", "4-5", "--out", str(tmp_path / "pred"))
    with tifffile.TiffFile(tmp_path / "pred" / "probabilities.tif") as tif:
        assert tif.is_imagej and tif.series[0].shape == (2, 96, 96)
        probs = tif.asarray()
    assert probs.dtype == np.float32 and probs.min() >= 0 and probs.max() <= 1
    masks = tifffile.imread(tmp_path / "pred" / "mask.tif")
    assert set(np.unique(masks).tolist()) <= {0, 255}
    instances = tifffile.imread(tmp_path / "pred" / "instances.tif")
    assert instances.max() >= 1 and instances.dtype == np.uint16  # integer labels
    assert not (tmp_path / "pred" / ".neuroseg-blocks").exists()  # the engine's work folder is gone

    out = run("evaluate", "--prediction", str(tmp_path / "pred" / "probabilities.tif"),
              "--labels", str(tmp_path / "labels.tif"), "--slices", "4-5", "--json", str(tmp_path / "m.json"))
    assert "mean" in out.stdout and "rand_f" in out.stdout and "v_rand" in out.stdout and "vi_merge" in out.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())["mean"]
    assert 0 <= metrics["pixel_error"] <= 1 and 0 <= metrics["rand_f"] <= 1
    assert 0 <= metrics["v_rand"] <= 1 and 0 <= metrics["v_info"] <= 1 and metrics["vi_split"] >= 0


KILLED_AFTER_TWO_BLOCKS = """
import os, signal, sys
import unet.cli
from unet.cli import main
engine = unet.cli.run_blocks
def killed_after_two(job, shape, progress=None, **kw):
    def report(done, total):
        progress(done, total)
        if done == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # right after its second block was written
    return engine(job, shape, progress=report, **kw)
unet.cli.run_blocks = killed_after_two
main(sys.argv[1:])
"""


def test_a_stopped_prediction_resumes_from_the_blocks_it_wrote(tmp_path, synthetic):
    """``python -m unet predict`` is the app's blockwise engine (bounded memory): killed half-way, the same
    command goes on from the blocks already written, and ends with the outputs of a run never stopped;
    other options start afresh."""
    from unet.exchange.checkpoint import save_checkpoint
    from unet.network.config import preset
    from unet.network.model import UNet

    config = preset("tiny")
    save_checkpoint(tmp_path / "m.pt", UNet(config.model), meta={"kind": "best", "step": 1,
                                                                 "train_config": config.to_dict()})
    volume, _ = synthetic
    tifffile.imwrite(tmp_path / "v.tif", volume, photometric="minisblack")
    args = ["predict", "--checkpoint", str(tmp_path / "m.pt"), "--volume", str(tmp_path / "v.tif"), "--workers", "1",
            "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_TWO_BLOCKS, *args, "--out", str(tmp_path / "a")],
                            cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert killed.returncode == -9
    blocks = tmp_path / "a" / ".neuroseg-blocks" / "blocks"
    assert sorted(p.name for p in blocks.glob("?.json")) == ["0.json", "1.json"]
    resumed = run(*args, "--out", str(tmp_path / "a"))
    assert "resuming the prediction" in resumed.stdout
    run(*args, "--out", str(tmp_path / "b"))
    for name in ("probabilities", "mask", "instances", "neurons"):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "a" / f"{name}.tif"),
                                      tifffile.imread(tmp_path / "b" / f"{name}.tif"))
    # another threshold in the same folder: the blocks of the other prediction are not reused
    stopped = subprocess.run([sys.executable, "-c", KILLED_AFTER_TWO_BLOCKS, *args, "--out", str(tmp_path / "b")],
                            cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert stopped.returncode == -9
    probabilities = tifffile.imread(tmp_path / "a" / "probabilities.tif")
    threshold = float(np.round(np.median(probabilities), 4))  # (an untrained network's maps sit near one value)
    again = run(*args, "--threshold", str(threshold), "--out", str(tmp_path / "b"))
    assert "holds another prediction" in again.stdout and "resuming" not in again.stdout
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "b" / "mask.tif"),
                                  (probabilities > threshold).astype(np.uint8) * 255)


def test_cli_reports_bad_input_clearly(tmp_path):
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((3, 32, 32), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "l.tif", np.zeros((3, 32, 40), np.uint8), photometric="minisblack")
    proc = run("train", "--volume", str(tmp_path / "v.tif"), "--labels", str(tmp_path / "l.tif"),
               "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2
    assert "labels have shape (3, 32, 40) but the image stack has shape (3, 32, 32)" in proc.stderr
    assert "Traceback" not in proc.stderr
