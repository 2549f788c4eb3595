"""The prediction process: ``python -m storage.jobs.predict_worker --prediction-id N`` (started by
:func:`storage.jobs.queue.launch_prediction`). It predicts the stack block by block
(:mod:`unet.prediction.blockwise`, on Dask; the same network, mask and watershed as ``python -m unet predict``)
into OME-Zarr outputs, resuming from the blocks an earlier attempt wrote, tells its phase to
the page as it goes (``done`` counts the blocks written), stores the outputs and the scores against each
predicted slice's latest mask, and records how it ended (:mod:`storage.jobs.outcome`, shared
with the training worker)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from functools import partial

from sqlalchemy import select, update

from domain.kinds import PredictionStage, RunStatus
from storage.db import open_store
from storage.jobs.outcome import Cancelled, Outcome, job_main, run_to_end, unwind_on_sigterm
from storage.jobs.procs import start_time
from storage.jobs.queue import CoreShare
from storage.models import Checkpoint, Dataset, Prediction
from storage.records.datasets import load_volume, protected_paths
from storage.records.external import External
from storage.records.files import IntegrityError
from storage.records.masks import latest_mask, load_mask
from storage.records.volumes import Volume, open_block_volume
from storage.settings import Settings
from unet.network.device import pick_device
from unet.network.threads import usable_cores
from unet.prediction.blocks import BlockJob, combined_sha256
from unet.prediction.metrics import SCORING, mean_metrics
from unet.prediction.schedule import SCHEDULER_ENV, blocks_written, run_blocks
from unet.prediction.stitch import link_neurons

log = logging.getLogger(__spec__.name if __spec__ else __name__)  # its real name, run as `python -m` too


def run_prediction(prediction_id: int, settings: Settings) -> int:
    sessions, store = open_store(settings)  # the server has migrated it
    device = "dask" if os.environ.get(SCHEDULER_ENV) else pick_device("auto").type
    with sessions.begin() as s:  # (compare-and-set: a cancel or a second process may come first)
        claimed = s.execute(update(Prediction).where(Prediction.id == prediction_id,
                                                     Prediction.status == RunStatus.QUEUED)
                            .values(status=RunStatus.RUNNING, pid=os.getpid(), pid_started=start_time(os.getpid()),
                                    device=device)).rowcount == 1
        # (device: a CPU training beside it shares the cores only with CPU predictions; the launcher records
        # the same pid: whichever writes first, a dead process is noticed)
    if not claimed:
        log.info(f"prediction {prediction_id} is not queued; nothing to do")
        return 0
    unwind_on_sigterm()

    def phase(stage: PredictionStage, done: int = 0, total: int = 0, check: bool = True) -> None:
        """Tell the page where it is; stop here when it was asked to (:class:`Cancelled`, after a block)."""
        values = {"phase": stage}
        if stage == PredictionStage.PREDICT:
            values |= {"done": done, "total": total}
        with sessions.begin() as s:  # (and, in the same transaction, whether it was asked to stop)
            s.execute(update(Prediction).where(Prediction.id == prediction_id).values(**values))
            stop = check and s.scalar(select(Prediction.cancel_requested)
                                      .where(Prediction.id == prediction_id)) is not None
        if stop:
            raise Cancelled(f"cancelled on request; {kept(stage, done, total)}")

    def asked(default: bool | None = None) -> bool:
        """Whether a cancel was asked for (``default``, when given, where the store cannot say now)."""
        try:
            with sessions.begin() as s:
                return s.scalar(select(Prediction.cancel_requested).where(Prediction.id == prediction_id)) is not None
        except Exception:
            if default is None:
                raise
            return default

    def kept(stage: str, done: int, total: int) -> str:
        if stage == PredictionStage.LINKING:
            return "its blocks are all written and kept; its neurons were not linked yet"
        return f"{done} of {total} blocks are written and kept" if total else "no block was written yet"

    def body(outcome: Outcome) -> None:
        with sessions.begin() as s:
            row = s.get(Prediction, prediction_id)
            checkpoint = s.get(Checkpoint, row.checkpoint_id)
            path = store.verified(checkpoint.file, checkpoint.sha256)
            volume = load_volume(s, store, row.dataset_id)
            protected = protected_paths(s, store)
            dataset = s.get(Dataset, row.dataset_id)
            slices = list(row.slices)
            method = row.postprocess or "watershed"
            tta = bool(row.tta)
            targets = {}
            for z in slices:
                mask = latest_mask(s, row.dataset_id, z)
                if mask is not None and mask.labelled_pixels > 0:
                    targets[z] = load_mask(s, store, mask.id)
        if not isinstance(volume, Volume | External):
            raise IntegrityError(f"dataset #{row.dataset_id}'s volume is still a TIFF of an earlier version "
                                 "(its conversion failed: the server's log says why)")
        folder = store.abspath(store.prediction_folder(prediction_id))
        job = BlockJob(checkpoint=str(path), volume=str(volume.path), out=str(folder), slices=tuple(slices),
                       method=method, tta=tta,
                       opener=partial(open_block_volume, linked=isinstance(volume, External),
                                      protected=tuple(str(p) for p in protected)))
        # on the CPU, every usable core (worker processes; threads per process no more than $OMP_NUM_THREADS),
        # or its share of the cores while a training or other predictions run beside it, asked again as blocks
        # finish (bench.pipeline --beside)
        share = CoreShare(sessions, usable_cores(), prediction_id=prediction_id) if device == "cpu" else None
        if share and share() < share.chosen:
            log.info(f"prediction {prediction_id}: {share.threads} CPU core(s), {share.others} other CPU job(s) "
                     "beside it")
        counts: list[tuple[int, int, float]] = []  # (blocks done, in all, when): this attempt's speed

        def progress(done: int, total: int) -> None:
            counts.append((done, total, time.monotonic()))
            phase(PredictionStage.PREDICT, done, total)

        try:
            markers = run_blocks(job, volume.shape[1:], targets=targets, pixel_size_nm=dataset.pixel_size_nm,
                                 progress=progress, share=share)
        except (Cancelled, KeyboardInterrupt) as exc:  # (the workers are stopped by now: count what they wrote)
            if isinstance(exc, KeyboardInterrupt) and not asked(default=False):
                raise
            quiet()
            try:
                written, total = blocks_written(job, volume.shape[1:])
                phase(PredictionStage.PREDICT, written, total, check=False)
                what = kept(PredictionStage.PREDICT, written, total)
            except Exception:  # (the count is only a message: the one last stored says it, if less well)
                what = stored_kept()
            during = "" if isinstance(exc, Cancelled) else ", and stopped during a block"
            raise Cancelled(f"cancelled on request{during}; {what}") from None
        files = {name: {"file": store.prediction_output(prediction_id, name), "sha256": combined_sha256(markers, name)}
                 for name in job.outputs}
        scores = {str(m["slice"]): m["scores"] for m in markers.values() if m["scores"] is not None}
        metrics = ({"slices": scores, "mean": mean_metrics(list(scores.values())), "scoring": SCORING}
                   if scores else {})
        errors = {str(m["slice"]): m["errors"] for m in markers.values() if m.get("errors")}
        if errors:  # the largest merges and splits against each slice's mask
            metrics["errors"] = errors
        if speed := timing(counts, len(slices)):
            metrics["timing"] = speed
            log.info(f"prediction {prediction_id}: {speed['slices']} slice(s) in {speed['seconds']} s on {device}")
        if job.with_instances:
            phase(PredictionStage.LINKING)
            neurons = link_neurons(job, volume.shape[1:])
            files["neurons"] = {"file": store.prediction_output(prediction_id, "neurons"), "sha256": neurons["sha256"]}
            metrics["neurons"] = {"count": neurons["count"], "largest": neurons["largest"]}
        with sessions.begin() as s:
            row = s.get(Prediction, prediction_id)
            row.file, row.sha256 = files["probabilities"]["file"], files["probabilities"]["sha256"]
            row.files, row.metrics = files, metrics or None
        log.info(f"prediction {prediction_id}: finished ({len(markers)} blocks)")

    def stored_kept() -> str:
        try:
            with sessions.begin() as s:
                row = s.get(Prediction, prediction_id)
                return kept(row.phase or "", row.done or 0, row.total or 0)
        except Exception:
            return "the blocks written are kept"

    def quiet() -> None:
        """Stopping now: the supervisor's further SIGTERMs (one a tick until it kills) must not cut the count and
        the last write short."""
        with contextlib.suppress(ValueError):  # (not the main thread: nothing to do)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def stoppable(outcome: Outcome) -> None:
        try:
            body(outcome)
        except KeyboardInterrupt:  # the supervisor's SIGTERM after a cancel its block did not reach in time
            if not asked(default=False):
                raise
            quiet()
            raise Cancelled(f"cancelled on request, and stopped during a block; {stored_kept()}") from None

    return run_to_end(sessions, Prediction, prediction_id, stoppable)


def timing(counts: list[tuple[int, int, float]], slices: int) -> dict | None:
    """How fast this attempt predicted, from its progress reports (blocks done, blocks in all, when): the
    slices it predicted (a resumed one's earlier blocks left out), the seconds from its first report to its
    last, slices per second. None when it predicted nothing."""
    if len(counts) < 2 or counts[-1][0] <= counts[0][0] or not slices:
        return None
    (first, total, start), (last, _, end) = counts[0], counts[-1]
    done = (last - first) * slices / max(1, total)  # (a slice larger than a tile is several blocks)
    seconds = max(end - start, 1e-3)
    return {"slices": round(done, 2), "seconds": round(seconds, 2), "slices_per_s": round(done / seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, "storage.jobs.predict_worker", "--prediction-id", run_prediction)


if __name__ == "__main__":
    sys.exit(main())
