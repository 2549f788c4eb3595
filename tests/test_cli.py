"""The command line, run as a user would: real subprocesses on real TIFF files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parent.parent


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
    assert tifffile.imread(tmp_path / "pred" / "instances.tif").max() >= 1

    out = run("evaluate", "--prediction", str(tmp_path / "pred" / "probabilities.tif"),
              "--labels", str(tmp_path / "labels.tif"), "--slices", "4-5", "--json", str(tmp_path / "m.json"))
    assert "mean" in out.stdout and "rand_f" in out.stdout and "v_rand" in out.stdout and "vi_merge" in out.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())["mean"]
    assert 0 <= metrics["pixel_error"] <= 1 and 0 <= metrics["rand_f"] <= 1
    assert 0 <= metrics["v_rand"] <= 1 and 0 <= metrics["v_info"] <= 1 and metrics["vi_split"] >= 0


def test_cli_reports_bad_input_clearly(tmp_path):
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((3, 32, 32), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "l.tif", np.zeros((3, 32, 40), np.uint8), photometric="minisblack")
    proc = run("train", "--volume", str(tmp_path / "v.tif"), "--labels", str(tmp_path / "l.tif"),
               "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2
    assert "labels have shape (3, 32, 40) but the image stack has shape (3, 32, 32)" in proc.stderr
    assert "Traceback" not in proc.stderr
