"""The prediction process: ``python -m storage.predict_worker --prediction-id N`` (started by
:func:`storage.queue.launch_prediction`). It loads the checkpoint and the stack, runs
:func:`unet.segment.segment_stack` (the same pipeline as ``python -m unet predict``), tells its phase to
the page as it goes (``done`` counts the slices through the network), stores the outputs and the scores
against each predicted slice's latest mask, and records how it ended (:mod:`storage.outcome`, shared
with the training worker)."""

from __future__ import annotations

import os
import sys

from sqlalchemy import update

from storage.datasets import load_volume
from storage.db import open_store
from storage.masks import latest_mask, load_mask
from storage.models import Checkpoint, Prediction
from storage.outcome import Outcome, job_main, run_to_end, unwind_on_sigterm
from storage.procs import start_time
from storage.records import RunStatus
from storage.settings import Settings


def run_prediction(prediction_id: int, settings: Settings) -> int:
    from unet.checkpoint import load_checkpoint
    from unet.device import pick_device
    from unet.segment import segment_stack

    sessions, store = open_store(settings)  # the server has migrated it
    with sessions.begin() as s:
        row = s.get(Prediction, prediction_id)
        if row is None or row.status != RunStatus.QUEUED:
            print(f"prediction {prediction_id} is not queued; nothing to do")
            return 0
        row.status, row.pid, row.pid_started = RunStatus.RUNNING, os.getpid(), start_time(os.getpid())
        # (the launcher records the same pid: whichever writes first, a dead process is noticed)
    unwind_on_sigterm()

    def phase(stage: str, done: int, total: int) -> None:
        values = ({"phase": "predict", "done": done} if stage == "predict" else
                  {"phase": f"{stage} {done}/{total}"} if stage == "instances" else {"phase": stage})
        with sessions.begin() as s:
            s.execute(update(Prediction).where(Prediction.id == prediction_id).values(**values))

    def body(outcome: Outcome) -> None:
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
        result = segment_stack(model, volume, slices, targets=targets, progress=phase, device=device)
        phase("write", 0, 1)
        files = {}
        for name, data in result.outputs().items():
            relative = store.prediction_output(prediction_id, name)
            files[name] = {"file": relative, "sha256": store.write_stack(relative, data)[0]}
        with sessions.begin() as s:
            row = s.get(Prediction, prediction_id)
            row.file, row.sha256 = files["probabilities"]["file"], files["probabilities"]["sha256"]
            row.files, row.metrics = files, result.metrics
        print(f"prediction {prediction_id}: finished", flush=True)

    return run_to_end(sessions, Prediction, prediction_id, body)


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, "storage.predict_worker", "--prediction-id", run_prediction)


if __name__ == "__main__":
    sys.exit(main())
