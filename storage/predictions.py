"""Predictions: a checkpoint applied to a dataset's slices, as a background process like training.

``submit_prediction`` records the row (QUEUED) and ``launch_prediction`` starts
``python -m storage.predictions --prediction-id N`` in its own process group. The process predicts slice
by slice (``done`` counts them, so the page shows progress), scores each slice that has a mask, and writes
three ImageJ TIFFs: the neuron probabilities (float32), the mask (0/255) and the neuron instances
(watershed). A process that dies is noticed on the next status read (FAILED, with the reason)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.api import NotFound, latest_mask, load_mask, load_volume
from storage.files import FileStore
from storage.models import Checkpoint, Dataset, Prediction
from storage.procs import is_alive, start_time
from storage.settings import Settings

OUTPUTS = ("probabilities", "mask", "instances")


@dataclass(frozen=True)
class PredictionInfo:
    id: int
    checkpoint_id: int
    run_id: int
    dataset_id: int
    slices: list[int]
    status: str
    done: int
    error: str | None
    metrics: dict[str, Any] | None
    created: datetime
    pid: int | None = None
    phase: str = ""  # "predict", "instances k/n", "write"


def _info(row: Prediction, run_id: int) -> PredictionInfo:
    return PredictionInfo(row.id, row.checkpoint_id, run_id, row.dataset_id, list(row.slices), row.status, row.done,
                          row.error, row.metrics, row.created, row.pid, row.phase or "")


def reconcile_predictions(session: Session) -> None:
    for row in session.scalars(select(Prediction).where(Prediction.status.in_(("QUEUED", "RUNNING")))):
        if row.pid is not None and not is_alive(row.pid, row.pid_started):
            row.status = "FAILED"
            row.error = f"the prediction process (pid {row.pid}) stopped before it finished; start it again"
    session.flush()


def submit_prediction(session: Session, checkpoint_id: int, dataset_id: int, slices: list[int]) -> PredictionInfo:
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None:
        raise NotFound(f"checkpoint {checkpoint_id} does not exist")
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} does not exist")
    slices = sorted(set(int(z) for z in slices))
    if not slices:
        raise ValueError("choose at least one slice to predict")
    if slices[0] < 0 or slices[-1] >= dataset.z:
        raise ValueError(f"slices must be within 0-{dataset.z - 1}")
    row = Prediction(checkpoint_id=checkpoint_id, dataset_id=dataset_id, slices=slices, status="QUEUED", done=0,
                     file="", sha256="", files={})
    session.add(row)
    session.flush()
    return _info(row, checkpoint.run_id)


def launch_prediction(settings: Settings, prediction_id: int) -> subprocess.Popen:
    from storage.jobs import launch

    return launch(settings, "storage.predictions", ["--prediction-id", str(int(prediction_id))],
                  settings.data_dir / "predictions" / str(int(prediction_id)) / "predict.log")


def get_prediction(session: Session, prediction_id: int) -> PredictionInfo:
    reconcile_predictions(session)
    row = session.get(Prediction, prediction_id)
    if row is None:
        raise NotFound(f"prediction {prediction_id} does not exist")
    return _info(row, session.get(Checkpoint, row.checkpoint_id).run_id)


def list_predictions(session: Session, *, dataset_id: int | None = None, run_id: int | None = None
                     ) -> list[PredictionInfo]:
    reconcile_predictions(session)
    query = select(Prediction, Checkpoint.run_id).join(Checkpoint, Prediction.checkpoint_id == Checkpoint.id)
    if dataset_id is not None:
        query = query.where(Prediction.dataset_id == dataset_id)
    if run_id is not None:
        query = query.where(Checkpoint.run_id == run_id)
    return [_info(row, rid) for row, rid in session.execute(query.order_by(Prediction.id))]


def prediction_file(session: Session, store: FileStore, prediction_id: int, output: str) -> bytes:
    """The bytes of one output TIFF, checked against its recorded checksum."""
    row = session.get(Prediction, prediction_id)
    if row is None or row.status != "FINISHED":
        raise NotFound(f"prediction {prediction_id} has no finished outputs")
    entry = row.files.get(output)
    if entry is None:
        raise NotFound(f"prediction {prediction_id} has no {output}")
    return store.verified(entry["file"], entry["sha256"]).read_bytes()


def load_output(session: Session, store: FileStore, prediction_id: int, output: str) -> np.ndarray:
    """One output as an array of shape (slices, Y, X): probabilities, mask or instances."""
    row = session.get(Prediction, prediction_id)
    if row is None or row.status != "FINISHED" or output not in row.files:
        raise NotFound(f"prediction {prediction_id} has no finished {output}")
    data = store.read_stack(row.files[output]["file"], row.files[output]["sha256"])
    return data.reshape(len(row.slices), *data.shape[-2:])


def delete_prediction(session: Session, store: FileStore, prediction_id: int) -> int:
    row = session.get(Prediction, prediction_id)
    if row is None:
        raise NotFound(f"prediction {prediction_id} does not exist")
    if row.status in ("QUEUED", "RUNNING") and is_alive(row.pid, row.pid_started):
        raise ValueError(f"prediction {prediction_id} is still running")
    session.delete(row)
    session.flush()
    return store.delete_tree(f"predictions/{int(prediction_id)}")


# --- the background process ---------------------------------------------------------------------------
def run_prediction(prediction_id: int, settings: Settings) -> int:
    from storage.db import open_store
    from unet.checkpoint import load_checkpoint
    from unet.device import pick_device
    from unet.infer import iter_predict_stack
    from unet.metrics import evaluate_slice, mean_metrics
    from unet.postprocess import instances, to_mask

    sessions, store = open_store(settings)
    with sessions.begin() as s:
        row = s.get(Prediction, prediction_id)
        if row is None or row.status != "QUEUED":
            print(f"prediction {prediction_id} is not queued; nothing to do")
            return 0
        row.status, row.pid, row.pid_started = "RUNNING", os.getpid(), start_time(os.getpid())
        # (the launcher records the same pid: whichever writes first, a dead process is noticed)
    try:
        with sessions.begin() as s:
            row = s.get(Prediction, prediction_id)
            checkpoint = s.get(Checkpoint, row.checkpoint_id)
            path = store.verified(checkpoint.file, checkpoint.sha256)
            volume = load_volume(s, store, row.dataset_id)
            slices = list(row.slices)
            targets = {}
            for z in slices:
                mask = latest_mask(s, row.dataset_id, z)
                if mask is not None and mask.labelled_pixels > 0:
                    targets[z] = load_mask(s, store, mask.id)
        device = pick_device("auto")
        model = load_checkpoint(path, map_location=device).build_model(device)
        probs = np.empty((len(slices), *volume.shape[1:]), np.float32)
        per_slice: dict[str, dict[str, float]] = {}
        def phase(text: str, done: int | None = None) -> None:
            with sessions.begin() as s:
                row = s.get(Prediction, prediction_id)
                row.phase = text
                if done is not None:
                    row.done = done

        phase("predict")
        for i, (z, prob) in enumerate(iter_predict_stack(model, volume, slices, device=device)):
            probs[i] = prob
            if z in targets:
                per_slice[str(z)] = evaluate_slice(prob, targets[z])
            phase("predict", i + 1)
            print(f"slice {z}: done ({i + 1}/{len(slices)})", flush=True)
        folder = f"predictions/{int(prediction_id)}"
        labels = np.empty(probs.shape, np.int32)
        for i, p in enumerate(probs):  # the watershed takes as long as the network on a CPU: say so
            phase(f"instances {i}/{len(slices)}")
            labels[i] = instances(p)
        phase("write")
        outputs = {"probabilities": probs, "mask": to_mask(probs) * np.uint8(255), "instances": labels}
        files = {}
        for name, data in outputs.items():
            relative = f"{folder}/{name}.tif"
            sha, _ = store.write_stack(relative, data)
            files[name] = {"file": relative, "sha256": sha}
        metrics = {"slices": per_slice, "mean": mean_metrics(list(per_slice.values()))} if per_slice else None
        with sessions.begin() as s:
            row = s.get(Prediction, prediction_id)
            row.file, row.sha256 = files["probabilities"]["file"], files["probabilities"]["sha256"]
            row.files, row.metrics, row.status = files, metrics, "FINISHED"
        print(f"prediction {prediction_id}: finished", flush=True)
        return 0
    except BaseException as exc:
        with sessions.begin() as s:
            row = s.get(Prediction, prediction_id)
            row.status, row.error = "FAILED", "".join(traceback.format_exception(exc))[-20000:]
        traceback.print_exc()
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one prediction job of the store (started by the app).")
    parser.add_argument("--prediction-id", type=int, required=True)
    args = parser.parse_args(argv)
    return run_prediction(args.prediction_id, Settings.from_env())


if __name__ == "__main__":
    sys.exit(main())
