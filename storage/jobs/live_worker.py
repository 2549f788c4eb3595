"""The live worker: ``python -m storage.jobs.live_worker --run-id N`` (started by :mod:`storage.jobs.queue` for a run
of kind ``live``; what a live session is: :mod:`storage.records.live`).

A loop, each turn a few seconds long: take every mask version of the dataset saved since the last turn
into the training set (recorded on the run as it joins; held-out slices never join), train
(:class:`unet.training.live.LiveTrainer`, replaying the older slices; from random weights, with a random forest
on the same strokes as teacher), re-predict the slices its viewers look at (and, when nothing else
waits, the ones beside them), checkpoint every minute.

What a save waits for is kept short, and training keeps most of the CPU: the store is looked at every
quarter second while training and predicting (:meth:`LiveLoop.news`), so a save, or a viewer turning to
another slice, ends what runs; a save is learned for :data:`LEARN_S` and the viewer's slice is predicted
at once with those weights. Otherwise the viewers' slices are re-predicted after :data:`PREDICT_EVERY_S`
of training, and the slices beside them only when their prediction misses a save and nothing waits.

It ends when the session is stopped (FINISHED, with a last checkpoint and its held-out scores), pauses
when a normal run is queued on its device (QUEUED again; the queue restarts it afterwards), and keeps a
heartbeat like a training worker."""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from domain.kinds import RunStatus
from domain.live import Region
from storage.db import open_store
from storage.jobs.lifecycle import DatabaseReporter, run_job, start_segment
from storage.jobs.outcome import Outcome, job_main
from storage.jobs.procs import start_time
from storage.jobs.queue import claim
from storage.models import Checkpoint, LiveSlice, MaskVersion, Run, RunMask
from storage.records.datasets import load_volume
from storage.records.files import FileStore
from storage.records.heldout import held_out, score_run
from storage.records.live import focus_slices, region_text, viewed_regions, waiting_normal_run
from storage.records.masks import load_mask, slice_kinds
from storage.settings import Settings
from unet.exchange.writing import atomic_write
from unet.network.config import TrainConfig
from unet.network.threads import choose_threads, usable_cores
from unet.prediction.infer import Interrupted
from unet.training.forest import PixelForest
from unet.training.live import LiveTrainer

log = logging.getLogger(__spec__.name if __spec__ else __name__)  # its real name, run as `python -m` too

LEARN_S = 1.0  # training on a new save before the viewer's slice is predicted with it
PREDICT_EVERY_S = 6.0  # otherwise, training between two predictions of the viewers' slices
NEWS_EVERY_S = 0.25  # how often training and predicting look at the store for a save or a new slice
# a zoomed viewer's region is predicted first, with this margin of context around it (pixels): the network
# answers its middle as it would in the whole slice; the rest of the slice comes when nothing else waits
REGION_HALO = 64
SLOW_S = 3.0  # a step of the loop that takes longer is written to the worker's log (where the time goes)


def _load_uint8(path, shape: tuple[int, ...]) -> np.ndarray | None:
    """A uint8 map of ``shape`` kept in NumPy's format, or None (missing, being replaced, or not one)."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return data if data.shape == shape and data.dtype == np.uint8 else None


def slow(what: str, since: float, run_id: int) -> None:
    took = time.monotonic() - since
    if took >= SLOW_S:
        log.info(f"live {run_id}: {what} took {took:.1f} s")


CHECKPOINT_EVERY_S = 60.0
# from a trained start, the unpainted pixels keep its answer at this weight (unet.training.live); $NEUROSEG_LIVE_DISTILL
DISTILL = float(os.environ.get("NEUROSEG_LIVE_DISTILL") or 0.3)
# from random weights, the overlay and "best" come from a moving average of the weights at this decay (a
# horizon of about 50 steps), which damps the swings between rounds (unet.training.live); $NEUROSEG_LIVE_EMA, 0 for none
EMA = float(os.environ.get("NEUROSEG_LIVE_EMA") or 0.98)
# from random weights, the unpainted pixels learn the answer of a random forest trained on the same strokes
# (unet.training.forest), at the weight DISTILL; $NEUROSEG_LIVE_FOREST=0 for none
FOREST = os.environ.get("NEUROSEG_LIVE_FOREST", "1") != "0"
TEACHER_REFRESH_S = 1.0  # a turn's time for renewing the forest's answers on older slices after a refit
# CPU threads of a live session: all cores but one, so the server answers the annotator while it trains
# (two busy processes with two threads each on two cores made each step 20× slower); $NEUROSEG_LIVE_THREADS
LIVE_THREADS = int(os.environ.get("NEUROSEG_LIVE_THREADS") or max(1, usable_cores() - 1))
IDLE_STOP_S = 600.0  # nobody has watched for this long: the session ends by itself (a FINISHED run)


class LiveLoop:
    def __init__(self, sessions: sessionmaker[Session], store: FileStore, run_id: int, reporter: DatabaseReporter):
        self.sessions, self.store, self.run_id, self.reporter = sessions, store, run_id, reporter
        with sessions.begin() as s:
            run = s.get(Run, run_id)
            self.dataset_id, self.device = int(run.spec["dataset_id"]), run.device
            self.config = TrainConfig.from_dict(run.config)
            parent = s.get(Checkpoint, run.parent_checkpoint_id) if run.parent_checkpoint_id else None
            self.parent_file = str(store.abspath(parent.file)) if parent else None
            self.trained_start = parent is not None and parent.step > 0
            # (after a restart: the slices whose live prediction is still a region only, the rest never made)
            partial = {row.slice_index: (row.region or "").endswith(",partial")
                       for row in s.scalars(select(LiveSlice).where(LiveSlice.run_id == run_id))}
            self.learned = {m.slice_index: m.mask_version_id for m in s.execute(
                select(RunMask.mask_version_id, MaskVersion.slice_index)
                .join(MaskVersion, RunMask.mask_version_id == MaskVersion.id).where(RunMask.run_id == run_id))}
            self.volume = load_volume(s, store, self.dataset_id)
        self.slices: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.slices_ids: dict[int, int] = {}  # slice → the mask version it trains on
        self.masks_seen = 0
        self.latest_mask = 0  # the newest mask version of the dataset absorbed (held-out ones included)
        self.focus: tuple[list[int], list[int]] = ([], [])  # the viewers' slices, and the ones beside them
        self.watched = time.monotonic()  # when a viewer was last seen
        self._looked = 0.0
        self._saved = False
        self._own: list[int] = []  # the viewers' slices when the store was last looked at
        self.parts: dict[int, tuple[tuple[int, int], Region]] = {}  # slice → (weights, region) predicted last
        self._partial: dict[int, bool] = partial  # slice → only regions of it were ever predicted (the rest: 128)
        self._steps: dict[int, int] = {}  # slice → the step of the weights that predicted it last (this process)
        self._stats: dict[int, tuple[float, float]] = {}  # slice → its mean and standard deviation
        self.regions: dict[int, Region] = {}  # the zoomed viewers' regions, as last read

    def news(self) -> bool:
        """Whether something should end the training or prediction under way: a stop, a mask version saved
        since the last absorb (:meth:`saved`), or a viewer on a slice not looked at before (the store is
        read at most every :data:`NEWS_EVERY_S`)."""
        if self.reporter.should_stop() or self.saved():
            return True
        return bool(set(self._own) - set(self.focus[0]))

    def saved(self) -> bool:
        """A mask version of the dataset saved since the last absorb (read at most every NEWS_EVERY_S)."""
        now = time.monotonic()
        if not self._saved and now - self._looked >= NEWS_EVERY_S:
            self._looked = now
            with self.sessions.begin() as s:
                newest = s.scalar(select(func.max(MaskVersion.id)).where(MaskVersion.dataset_id == self.dataset_id))
                self._own, _ = focus_slices(s, self.run_id, self.volume.shape[0])
            self._saved = (newest or 0) > self.latest_mask
        return self._saved

    def absorb(self, trainer: LiveTrainer, first: bool) -> list[int]:
        """Take the newest mask versions into the training set; returns the slices that changed."""
        with self.sessions.begin() as s:
            frozen = held_out(s, self.dataset_id)
            latest = {z: m for z, m in slice_kinds(s, self.dataset_id).items()  # held-out slices never train
                      if frozen is None or z not in frozen.slices}
            self._saved = False
            self.latest_mask = s.scalar(select(func.max(MaskVersion.id))
                                        .where(MaskVersion.dataset_id == self.dataset_id)) or 0
            changed = [z for z, m in latest.items() if z not in self.slices or
                       self.slices_ids.get(z) != m.id]
            gone = [z for z in self.slices if z not in latest]  # held out since, or its dataset changed
            if not changed and not gone:
                return []
            known = set(s.scalars(select(RunMask.mask_version_id).where(RunMask.run_id == self.run_id)))
            for z in changed:
                mask = latest[z]
                target = load_mask(s, self.store, mask.id)
                self.slices[z] = (self.volume[z], target)
                self.slices_ids[z] = mask.id
                if mask.id not in known:
                    s.add(RunMask(run_id=self.run_id, mask_version_id=mask.id, role="train"))
            for z in gone:
                self.slices.pop(z, None)
                self.slices_ids.pop(z, None)
            self.masks_seen = max(self.slices_ids.values(), default=0)
            spec = {"dataset_id": self.dataset_id, "preset": "live", "val": [],
                    "train": [{"dataset_id": self.dataset_id, "slices": sorted(self.slices)}]}
            s.execute(update(Run).where(Run.id == self.run_id).values(spec=spec))
        # on a restart every slice is "new" again, but only the ones saved since the last run are news
        news = [z for z in changed if not first or self.learned.get(z) != self.slices_ids[z]]
        trainer.set_slices(self.slices, new=sorted(news, key=lambda z: self.slices_ids[z]))
        return changed

    def predict(self, trainer: LiveTrainer, done: dict[int, tuple[int, int]], *, beside: bool,
                should_stop) -> int:
        """Re-predict the viewers' slices whose newest live prediction is older than these weights: only the
        region on screen of a slice that every viewer sees zoomed in. With ``beside`` (nothing else waits),
        also the whole of such a slice and the slices next to the viewers', where their prediction misses a
        save. Stops when ``should_stop`` says so; returns how many were written."""
        with self.sessions.begin() as s:
            self.focus = focus_slices(s, self.run_id, self.volume.shape[0])
            regions = self.regions = viewed_regions(s, self.run_id)
        own, near = self.focus
        if own:
            self.watched = time.monotonic()
        now = (trainer.steps, self.masks_seen)
        jobs: list[tuple[int, Region | None]] = []
        for z in own:
            region = regions.get(z)
            if region is None:
                if done.get(z) != now:
                    jobs.append((z, None))
            elif not beside:
                if done.get(z) != now and self.parts.get(z) != (now, region):
                    jobs.append((z, region))
            elif done.get(z, (0, -1))[1] != self.masks_seen:
                jobs.append((z, None))
        if beside:
            jobs += [(z, None) for z in near if done.get(z, (0, -1))[1] != self.masks_seen]
        count = 0
        for z, region in jobs:
            if should_stop():
                break
            relative = self.store.live_slice(self.run_id, z)
            began = time.monotonic()
            try:
                partial = False
                if region is None:
                    prob = np.round(trainer.predict(self.volume[z], should_stop=should_stop) * 255).astype(np.uint8)
                else:
                    prob, region, partial = self._predict_region(trainer, z, region, relative, should_stop)
            except Interrupted:  # a save or another slice came: it goes first
                break
            finally:
                slow(f"predicting slice {z}" + (f" (region {region})" if region else ""), began, self.run_id)
            doubt = self._uncertainty(z, relative, prob, region, trainer.steps)
            atomic_write(self.store.abspath(self.store.live_uncertainty(self.run_id, z)),
                         lambda fh, q=doubt: np.save(fh, q))
            atomic_write(self.store.abspath(relative), lambda fh, q=prob: np.save(fh, q))
            with self.sessions.begin() as s:
                row = s.get(LiveSlice, (self.run_id, z))
                if row is None:
                    row = LiveSlice(run_id=self.run_id, slice_index=z, file=relative, step=0, masks_seen=0)
                    s.add(row)
                row.step, row.masks_seen, row.created = trainer.steps, self.masks_seen, datetime.now(UTC)
                row.region = region_text(region, partial)
            self._partial[z], self._steps[z] = partial, trainer.steps
            if region is None:
                done[z] = now
            else:
                self.parts[z] = (now, regions[z])
            count += 1
        return count

    def _uncertainty(self, z: int, relative: str, prob: np.ndarray, region: Region | None, steps: int) -> np.ndarray:
        """Slice ``z``'s uncertainty (uint8, 255 = most) once ``prob`` replaces its live prediction: in the part
        predicted, the larger of the new map's own doubt (:func:`unet.prediction.review.margin`) and how much
        these weights changed it from the weights before (``|new − before|``); the
        rest keeps what it had. Predicted again by the same weights, it stays as it was (nothing was learned)."""
        kept = _load_uint8(self.store.abspath(self.store.live_uncertainty(self.run_id, z)), prob.shape)
        if kept is not None and self._steps.get(z) == steps:
            return kept
        before = _load_uint8(self.store.abspath(relative), prob.shape)
        y0, x0, h, w = region or (0, 0, *prob.shape)
        box = (slice(y0, y0 + h), slice(x0, x0 + w))
        out = kept if kept is not None else (255 - np.abs(2 * prob.astype(np.int16) - 255)).astype(np.uint8)
        new = prob[box].astype(np.int16)
        doubt = 255 - np.abs(2 * new - 255)
        if before is not None and not self._partial.get(z, False):
            doubt = np.maximum(doubt, np.abs(new - before[box].astype(np.int16)))
        out[box] = doubt.astype(np.uint8)
        return out

    def _predict_region(self, trainer: LiveTrainer, z: int, region: Region, relative: str,
                        should_stop) -> tuple[np.ndarray, Region, bool]:
        """Slice ``z``'s live prediction (uint8) with ``region`` predicted by today's weights (with
        :data:`REGION_HALO` of context) and the rest as it was (unknown, 128, where never predicted), the
        region as it fits the slice, and whether the rest has never been predicted."""
        height, width = (int(n) for n in self.volume.shape[1:])
        y0, x0 = min(max(0, region[0]), height - 1), min(max(0, region[1]), width - 1)
        y1, x1 = min(height, y0 + max(1, region[2])), min(width, x0 + max(1, region[3]))
        ya, xa = max(0, y0 - REGION_HALO), max(0, x0 - REGION_HALO)
        yb, xb = min(height, y1 + REGION_HALO), min(width, x1 + REGION_HALO)
        if z not in self._stats:  # the region is normalised as its whole slice is (training normalises so)
            image = np.asarray(self.volume[z], dtype=np.float32)
            self._stats[z] = (float(image.mean(dtype=np.float64)), float(image.std(dtype=np.float64)) or 1.0)
        mean, std = self._stats[z]
        crop = (np.asarray(self.volume[z, ya:yb, xa:xb], dtype=np.float32) - mean) / std
        part = trainer.predict(crop, should_stop=should_stop, normalized=True)
        try:
            whole = np.load(self.store.abspath(relative), allow_pickle=False)
        except (OSError, ValueError):
            whole = None
        partial = whole is None or whole.shape != (height, width) or whole.dtype != np.uint8
        if partial:  # never predicted whole: the rest is unknown (and said so: Accept leaves it alone)
            whole = np.full((height, width), 128, np.uint8)
        elif self._partial.get(z):
            partial = True  # (still a region only, of an earlier step)
        whole[y0:y1, x0:x1] = np.round(part[y0 - ya:y1 - ya, x0 - xa:x1 - xa] * 255).astype(np.uint8)
        return whole, (y0, x0, y1 - y0, x1 - x0), partial

    def run(self, outcome: Outcome) -> None:
        if self.device == "cpu":  # leave a core to the server (and the user's page), and no more threads than
            # train fastest here (see LIVE_THREADS, unet.network.threads); fewer while predictions run beside it
            self.reporter.use_cpu_threads(LIVE_THREADS if os.environ.get("NEUROSEG_LIVE_THREADS")
                                          else choose_threads(self.config, cores=LIVE_THREADS))
        out_dir = self.store.run_dir(self.run_id)
        resume = (out_dir / "latest.pt").exists()
        start_segment(self.sessions, self.run_id, out_dir, resume)
        if self.trained_start:  # the starting model teaches
            teacher, distill, ema = self.parent_file, DISTILL, 0.0
        else:  # a forest on the same strokes teaches, and a moving average predicts
            teacher, distill, ema = (PixelForest(), DISTILL, EMA) if FOREST else (None, 0.0, EMA)
        trainer = LiveTrainer(self.config, out_dir, init_from=None if resume else self.parent_file, resume=resume,
                              reporter=self.reporter, distill=distill, reference=teacher, ema=ema)
        done: dict[int, tuple[int, int]] = {}
        first, last_save = True, time.monotonic()
        stopping = self.reporter.should_stop
        for _turn in itertools.count():
            began = time.monotonic()
            changed = self.absorb(trainer, first)
            slow(f"taking in slice(s) {changed}", began, self.run_id)
            if changed and not first:
                log.info(f"live {self.run_id}: took in slice(s) {changed} at step {trainer.steps}")
            first = False
            idle = time.monotonic() - self.watched > IDLE_STOP_S
            if stopping() or idle:
                self.reporter.on_phase("stopping: saving the weights")
                trainer.save()
                if idle:
                    log.info(f"live {self.run_id}: nobody watched for {IDLE_STOP_S / 60:g} minutes: it ends")
                return
            with self.sessions.begin() as s:
                waiting = waiting_normal_run(s, self.device)
            if waiting is not None:
                self.reporter.on_phase(f"paused: run #{waiting} has the device; live carries on after it")
                trainer.save()
                outcome.status = RunStatus.QUEUED
                log.info(f"live {self.run_id}: paused for run {waiting} at step {trainer.steps}")
                return
            if trainer.ready:
                taught = " · a forest of the strokes fills in the rest" if trainer.forest is not None else ""
                self.reporter.on_phase(f"learning from {len(self.slices)} slice(s){taught} · step {trainer.steps}")
                if changed:  # a save: learn it, then show the viewer's slice with it at once
                    trainer.train_for(LEARN_S, should_stop=stopping)
                else:  # until it is time to show the viewers their slices again, or something new comes
                    trainer.train_for(PREDICT_EVERY_S, should_stop=self.news)
            else:
                self.reporter.on_phase("waiting for a saved mask · predicting with the starting weights")
            if self.saved() and not stopping():
                continue  # (a save came meanwhile: take it in first)
            shown = self.predict(trainer, done, beside=False, should_stop=self.news)
            if self.saved() or stopping():
                continue
            # nothing waits: the starting model's answer on the viewers' slices, ready for their save (it
            # teaches the unpainted pixels); the slices beside theirs (where they miss a save); the forest
            for z in self.focus[0]:
                began = time.monotonic()
                try:
                    if (region := self.regions.get(z)) is not None:  # zoomed: where the strokes will be, first
                        reach = trainer.trainer.config.patch_size
                        trainer.prepare(z, self.volume[z], should_stop=self.news, box=(
                            region[0] - reach, region[1] - reach,
                            region[0] + region[2] + reach, region[1] + region[3] + reach))
                    trainer.prepare(z, self.volume[z], should_stop=self.news)
                except Interrupted:
                    break
                finally:
                    slow(f"the starting model's answer on slice {z}", began, self.run_id)
            if self.news():
                continue
            shown += self.predict(trainer, done, beside=True, should_stop=self.news)
            if not self.news():
                trainer.refresh_teacher(TEACHER_REFRESH_S)
            if shown == 0 and not trainer.ready:  # nothing to learn from and nothing new to show
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline and not self.news():
                    time.sleep(NEWS_EVERY_S)
            if time.monotonic() - last_save >= CHECKPOINT_EVERY_S:
                trainer.save()
                last_save = time.monotonic()


def run_worker(run_id: int, settings: Settings) -> int:
    sessions, store = open_store(settings)
    with sessions.begin() as s:
        if not claim(s, run_id, os.getpid(), start_time(os.getpid())):
            log.info(f"live session {run_id} is not queued or its device is busy; nothing to do")
            return 0

    def body(outcome: Outcome, reporter: DatabaseReporter) -> None:
        LiveLoop(sessions, store, run_id, reporter).run(outcome)
        if outcome.status == RunStatus.FINISHED:
            score_run(sessions, store, run_id)

    return run_job(sessions, store, settings, run_id, body)


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, "storage.jobs.live_worker", "--run-id", run_worker)


if __name__ == "__main__":
    sys.exit(main())

