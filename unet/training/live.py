"""Live fine-tuning: a model that keeps training while its training set grows, and predicts between bursts.

The Annotate page's live loop (:mod:`storage.jobs.live_worker`) drives a :class:`LiveTrainer`: it hands over
the labelled slices whenever a mask is saved (:meth:`LiveTrainer.set_slices`), trains for a few seconds
(:meth:`LiveTrainer.train_for`), predicts the slices being looked at (:meth:`LiveTrainer.predict`), and
checkpoints now and then (:meth:`LiveTrainer.save`). It is the ordinary :class:`~unet.training.train.Trainer`
(same loss, augmentation, checkpoints and resume), with two differences:

- **No end.** The learning rate stays at the fine-tuning rate after a short warm-up (there is no cosine
  to anneal over: nobody knows how long the user will annotate).
- **Replay.** The slices saved most recently are where the user just corrected the model, so half of the
  patches come from them; the other half replays every older labelled slice (by labelled pixels). A
  fine-tune that saw only the new slices would forget what the older ones taught (the live tests show
  it does); ``replay=False`` is that naive fine-tune, kept for the comparison.
- **Distillation** (``distill``, from a trained start): a model that comes with its knowledge (the
  starter) has no older slices of this stack to replay, and strokes painted only where it is wrong pull
  it off course. So the pixels nobody painted keep the starting model's own answer as their target, at
  a weight of ``distill`` against the painted pixels' 1 (learning without forgetting).
- **A forest as teacher** (``reference=PixelForest()``, from random weights): a network learning from
  scratch has no answer of its own to keep, but an ilastik-style random forest (:mod:`unet.training.forest`)
  trained on the same strokes in a second or two already draws most membranes. It is refitted whenever
  the painted pixels change, and the pixels nobody painted take its answer as their target at the weight
  ``distill``, as a starting model's answer does above (Shallow2Deep's pseudo-labels, in its simplest
  form). The network soon does better than its teacher: it sees context the filters do not
  (``bench.livesim``).
- **Moving average** (``ema``, from random weights): held flat and fed strokes painted where it is wrong,
  a network learning from scratch swings from one burst to the next; the overlay and ``best`` then come
  from an exponential moving average of its weights (``torch.optim.swa_utils.AveragedModel``), while
  training goes on from the newest ones.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from unet.exchange.checkpoint import load_checkpoint
from unet.network.config import TrainConfig
from unet.prediction.infer import predict_slice
from unet.training.data import PatchSampler, TrainData, normalize_image
from unet.training.device_batches import DeviceSampler, make_sampler
from unet.training.forest import PixelForest
from unet.training.labels import IGNORE, MEMBRANE, NEURON, agreed_offset, border_weights, central, is_dense
from unet.training.reporting import NullReporter, Reporter
from unet.training.train import Trainer

NEW_SHARE = 0.5  # of the patches, drawn from the newest slices
RECENT = 2  # how many of the newest slices count as new


def live_config(base: TrainConfig, *, lr: float = 2e-4, device: str | None = None,
                trained: bool = True, scratch_lr: float = 1e-3) -> TrainConfig:
    """The recipe of a live session from the recipe of the model it starts from: the same network, patches
    and augmentation, a learning rate held flat after 20 warm-up steps (a fine-tuning rate, at most ``lr``,
    from ``trained`` weights; at most ``scratch_lr`` from untrained ones), no validation, no end,
    on the machine's accelerator when it has one (``device`` "auto" unless named: the recipe a model was
    trained with names where that run trained, the starter's the CPU, which says nothing about where a
    live session should run; on its device it yields to normal runs).

    The fine-tuning rate: strokes painted where a model is wrong are no sample of the stack, and at 1e-3
    they pulled the starter model off course (bench.loop on ISBI, K=10 disks of radius 8, four rounds:
    pixel error 0.119, 0.108, 0.107, 0.137); at 2e-4 it stayed nearer (0.079, 0.077, 0.103, 0.095).

    The rate from scratch: held flat, a from-scratch recipe's own peak (``cpu-quick``'s 3e-3, meant to be
    annealed) let the network swing from round to round on such strokes and fall back to one class
    (``bench.livesim`` on ISBI, 190 steps a round, three orders of the slices; rounds 6–10 averaged
    Rand-F 0.567, VI 2.01); at 1e-3 it held better (Rand-F 0.772, VI 0.93), better still predicting
    from a moving average of the weights (0.799, 0.75), and best with a random forest of the strokes
    teaching the unpainted pixels as well (0.858, 0.64; the forest's own loop on the same orders: 0.828,
    0.80)."""
    rate = min(lr, base.lr) if trained else min(scratch_lr, base.lr)
    return replace(base, lr=rate, warmup_steps=20, steps=10**12,
                   max_seconds=None, val_every=10**12, checkpoint_every=10**12, early_stop_patience=0,
                   device=device or "auto")


class LiveTrainer:
    """A :class:`~unet.training.train.Trainer` whose training slices change while it trains.

    Args:
        config: the live recipe (:func:`live_config`).
        out_dir: where ``latest.pt`` / ``best.pt`` go (``resume`` continues from ``latest.pt`` there).
        init_from: the checkpoint to fine-tune (ignored when resuming).
        replay: sample older slices too (see the module's note); False trains on the newest ones only.
        reporter: told every step and checkpoint, as a training run's is.
        distill: the weight of the teacher's answer on unpainted pixels (0: painted pixels only).
        reference: the teacher: a checkpoint (the starting model) or a :class:`~unet.training.forest.PixelForest`.
        ema: the decay of the moving average that predicts (0: the newest weights predict).
    """

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike, *, init_from: str | os.PathLike | None = None,
                 resume: bool = False, replay: bool = True, reporter: Reporter | None = None,
                 distill: float = 0.0, reference: str | os.PathLike | PixelForest | None = None, ema: float = 0.0):
        self.replay = replay
        self.keys: list[Hashable] = []
        self.order: dict[Hashable, int] = {}  # when each slice (last) arrived: newest is highest
        self._arrivals = 0
        dummy = TrainData([np.zeros((8, 8), np.float32)], [np.zeros((8, 8), np.uint8)], [], [])
        self.trainer = Trainer(config, dummy, reporter or NullReporter(), out_dir)
        self.trainer.restore(resume=resume and (Path(out_dir) / "latest.pt").exists(), init_from=init_from)
        self.sampler: PatchSampler | DeviceSampler | None = None
        self.inherited_offset = self.trainer.label_offset  # the starting weights' drawing convention
        self._offsets: dict[Hashable, tuple[np.ndarray, tuple[float, float]]] = {}  # key → (painted, offset)
        self.trainer.batches = self._batches()
        self.average = None  # the exponential moving average of the weights, what predicts and is "best"
        if ema > 0:
            self.average = AveragedModel(self.trainer.model, multi_avg_fn=get_ema_multi_avg_fn(ema), use_buffers=True)
        self.distill, self.reference, self.forest = distill, None, None
        self._pseudo: dict[Hashable, np.ndarray] = {}
        # slices whose starting model's answer covers only a box near the strokes (made at a save, when the
        # slice had not been prepared): key → (y0, x0, y1, x1); prepare() makes the whole of it later
        self._partial: dict[Hashable, tuple[int, int, int, int]] = {}
        self._stale: dict[Hashable, int] = {}  # slices whose forest answer predates the forest (→ its age)
        self._labelled: dict[Hashable, tuple[np.ndarray, np.ndarray]] = {}  # key → (image, painted)
        if distill > 0 and isinstance(reference, PixelForest):
            self.forest = reference
        elif distill > 0 and reference is not None:
            self.reference = load_checkpoint(reference).build_model(str(self.trainer.device)).eval()
        if self.taught:  # the unpainted pixels' targets are weighted, and only the BCE takes weights
            self.trainer.config = replace(self.trainer.config, loss="bce")

    @property
    def taught(self) -> bool:
        """Whether unpainted pixels learn a teacher's answer (a starting model's or a forest's)."""
        return self.reference is not None or self.forest is not None

    @property
    def steps(self) -> int:
        return self.trainer.step_count

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    def _batches(self):
        while True:
            if self.sampler is None:
                raise RuntimeError("no labelled slice yet: set_slices first")
            yield self.sampler.sample(self.trainer.config.batch_size)

    def set_slices(self, slices: dict[Hashable, tuple[np.ndarray, np.ndarray]], new: list[Hashable] = ()) -> None:
        """The training set from now on: ``key → (image, target)`` (targets as in training: NEURON,
        MEMBRANE, IGNORE). ``new`` names the slices that just arrived (a fresh save), newest last; their
        patches make up half of each batch when replay is on, all of it when off."""
        for key in new:
            self._arrivals += 1
            self.order[key] = self._arrivals
        for key in slices:
            self.order.setdefault(key, 0)
        labelled = {k: v for k, v in slices.items() if np.any(v[1] != IGNORE)}
        if not labelled:
            self.sampler = None
            self.keys = []
            return
        keys = sorted(labelled, key=lambda k: (self.order[k], str(k)))
        images = [normalize_image(labelled[k][0]) for k in keys]
        painted = [np.ascontiguousarray(labelled[k][1], dtype=np.uint8) for k in keys]
        config = self.trainer.config
        weights = ([border_weights(t, config.border_weight, config.border_sigma) for t in painted]
                   if config.border_weight > 0 else None)
        targets = painted
        if self.forest is not None:
            self._teach(labelled, new)
        if self.taught:  # the teacher's answer on what nobody painted, weighted down
            targets = [np.where(t != IGNORE, t, self._pseudo_target(k, labelled[k][0], t)).astype(np.uint8)
                       for k, t in zip(keys, painted, strict=True)]
            weights = [np.where(t != IGNORE, 1.0, self.distill).astype(np.float32) * (1 if weights is None else w)
                       for t, w in zip(painted, weights or [None] * len(painted), strict=True)]
        offset = self._label_offset(keys, images, painted)
        sampler = make_sampler(config, self.trainer.device, self.trainer.rng, images, targets, self.trainer.out_size,
                               weights, offset, windows=[t != IGNORE for t in painted] if self.taught else None)
        self.trainer.label_offset = self.trainer.model.label_offset = offset
        if self.average is not None:
            self.average.module.label_offset = offset
        newest = [i for i, k in enumerate(keys) if self.order[k] > 0][-RECENT:]
        if newest:
            recent = np.zeros(len(keys))
            recent[newest] = sampler.p[newest] / sampler.p[newest].sum()
            older = sampler.p.copy()
            older[newest] = 0
            if not self.replay or older.sum() == 0:
                sampler.p = recent
            else:
                sampler.p = NEW_SHARE * recent + (1 - NEW_SHARE) * older / older.sum()
        self.sampler, self.keys, self._labelled = sampler, keys, labelled

    def _label_offset(self, keys: list[Hashable], images: list[np.ndarray],
                      painted: list[np.ndarray]) -> tuple[float, float]:
        """The drawing convention the flips keep (as :meth:`unet.training.train.Trainer._label_offset`): the one the
        fully painted slices show (each measured once, the newest eight), else the starting weights'.
        Measured on what was painted, never on a teacher's answers."""
        augment = self.trainer.config.augment
        if not (augment.flips and augment.keep_label_offset):
            return (0.0, 0.0)
        found = []
        for key, image, target in zip(keys, images, painted, strict=True):
            if not is_dense(target):
                self._offsets.pop(key, None)
                continue
            cached = self._offsets.get(key)
            if cached is None or not np.array_equal(cached[0], target):
                cached = self._offsets[key] = (target, central(image, target))
            found.append(cached[1])
        measured = agreed_offset(found[-8:])
        return measured if measured is not None else self.inherited_offset

    def _teach(self, labelled: dict[Hashable, tuple[np.ndarray, np.ndarray]], new: list[Hashable]) -> None:
        """Refit the forest on the painted pixels. Its answers on the slices that just arrived are made at
        once (in :meth:`_pseudo_target`); those on the older slices are out of date, and
        :meth:`refresh_teacher` renews them between bursts, so that a save reaches the overlay first."""
        for key in list(self._pseudo):
            if key not in labelled:
                self._pseudo.pop(key)
                self._stale.pop(key, None)
        if not self.forest.fit(labelled):
            return
        for key in self._pseudo:
            self._stale[key] = self._stale.get(key, 0) + 1
        for key in new:
            self._pseudo.pop(key, None)
            self._stale.pop(key, None)

    def refresh_teacher(self, seconds: float) -> int:
        """Renew the forest's out-of-date answers on older slices, stalest first, for about ``seconds`` (at
        least one); returns how many slices were renewed. A 512² slice takes about 0.35 s on one thread."""
        if self.forest is None or self.sampler is None or not self._stale:
            return 0
        end, done = time.monotonic() + seconds, 0
        for key in sorted(self._stale, key=lambda k: -self._stale[k]):
            if done and time.monotonic() >= end:
                break
            del self._stale[key]
            self._pseudo.pop(key, None)
            if key not in self._labelled:
                continue
            image, painted = self._labelled[key]
            target = np.where(painted != IGNORE, painted, self._pseudo_target(key, image, painted)).astype(np.uint8)
            self.sampler.set_target(self.keys.index(key), target)
            done += 1
        self.trainer.flush()
        return done

    def _pseudo_target(self, key: Hashable, image: np.ndarray, painted: np.ndarray) -> np.ndarray:
        """The teacher's mask of a slice: the starting model's (computed once per slice) or the forest's
        (until the forest is refitted; only within a patch of the ``painted`` pixels, where training windows
        can reach, IGNORE elsewhere and everywhere while it cannot tell the classes apart)."""
        if key not in self._pseudo:
            if self.forest is not None:
                prob = self.forest.predict(image, near=painted != IGNORE, reach=self.trainer.config.patch_size)
                if prob is None:
                    self._pseudo[key] = np.full(np.shape(image), IGNORE, np.uint8)
                    return self._pseudo[key]
                self._pseudo[key] = np.where(np.isnan(prob), IGNORE,
                                             np.where(prob > 0.5, NEURON, MEMBRANE)).astype(np.uint8)
                return self._pseudo[key]
        elif self.forest is None and key in self._partial:
            box = self._near(painted)
            if box is not None and not _inside(box, self._partial[key]):
                self._pseudo.pop(key)  # strokes beyond what the answer covers: answer there too
        if key not in self._pseudo:
            box = self._near(painted)  # (only where training windows reach: the whole slice is for prepare)
            if key in self._partial and box is not None:
                box = _union(box, self._partial[key])
            self._reference_answer(key, image, box)
        return self._pseudo[key]

    def _near(self, painted: np.ndarray) -> tuple[int, int, int, int] | None:
        """The box (y0, x0, y1, x1) of the painted pixels and a patch around them: where training windows reach
        (None: nothing painted)."""
        ys, xs = np.nonzero(painted != IGNORE)
        if not ys.size:
            return None
        reach = self.trainer.config.patch_size
        h, w = painted.shape
        return (max(0, int(ys.min()) - reach), max(0, int(xs.min()) - reach),
                min(h, int(ys.max()) + reach + 1), min(w, int(xs.max()) + reach + 1))

    def _reference_answer(self, key: Hashable, image: np.ndarray, box: tuple[int, int, int, int] | None,
                          should_stop: Callable[[], bool] | None = None) -> None:
        """The starting model's mask of ``image`` inside ``box`` (None: the whole slice), IGNORE outside it,
        normalised as the whole slice is (as training normalises it)."""
        whole = np.asarray(image, np.float32)
        mean, std = float(whole.mean(dtype=np.float64)), float(whole.std(dtype=np.float64))
        y0, x0, y1, x1 = box if box is not None else (0, 0, *whole.shape)
        crop = (whole[y0:y1, x0:x1] - mean) / (std if std > 1e-6 else 1.0)
        with torch.no_grad():
            prob = predict_slice(self.reference, crop, device=self.trainer.device, amp=self.trainer.amp,
                                 normalized=True, should_stop=should_stop)
        answer = np.full(whole.shape, IGNORE, np.uint8)
        answer[y0:y1, x0:x1] = np.where(prob > 0.5, NEURON, MEMBRANE)
        self._pseudo[key] = answer
        if (y0, x0, y1, x1) == (0, 0, *whole.shape):
            self._partial.pop(key, None)
        else:
            self._partial[key] = (y0, x0, y1, x1)

    def prepare(self, key: Hashable, image: np.ndarray, should_stop: Callable[[], bool] | None = None, *,
                box: tuple[int, int, int, int] | None = None) -> bool:
        """Compute the starting model's answer on a slice ahead of its first save (a viewer looks at it),
        so that the save is learned without waiting for it; returns whether it was computed now. Only for
        a trained start (the forest's answers depend on the strokes); ``should_stop`` as in
        :meth:`predict` (:class:`unet.prediction.infer.Interrupted`: nothing is kept). ``box`` = (y0, x0, y1, x1): only
        there (a zoomed viewer's region and a patch around it, where their strokes will be), first."""
        if self.forest is not None or self.reference is None or (key in self._pseudo and key not in self._partial):
            return False
        if box is not None:
            h, w = np.shape(image)
            box = (max(0, box[0]), max(0, box[1]), min(h, box[2]), min(w, box[3]))
            if key in self._partial:
                if _inside(box, self._partial[key]):
                    return False
                box = _union(box, self._partial[key])
        kept = self._pseudo.get(key), self._partial.get(key)
        try:
            self._reference_answer(key, image, box, should_stop)
        except BaseException:
            if kept[0] is not None:  # (an answer near the strokes, made at a save, stays)
                self._pseudo[key], self._partial[key] = kept
            raise
        if self.sampler is not None and key in self._labelled:  # a slice in training: its targets get the rest
            painted = self._labelled[key][1]
            target = np.where(painted != IGNORE, painted, self._pseudo[key]).astype(np.uint8)
            self.sampler.set_target(self.keys.index(key), target)
        return True

    @property
    def ready(self) -> bool:
        """Whether there is anything to train on."""
        return self.sampler is not None

    def train_for(self, seconds: float, should_stop: Callable[[], bool] = lambda: False,
                  max_steps: int | None = None) -> int:
        """Train for about ``seconds`` (at least one step) or ``max_steps``; returns the steps done."""
        if self.sampler is None:
            return 0
        model = self.trainer.model
        model.train()
        done, end = 0, time.monotonic() + seconds
        while (done == 0 or time.monotonic() < end) and (max_steps is None or done < max_steps):
            if should_stop():
                break
            self.trainer.step()
            if self.average is not None:
                self.average.update_parameters(model)
            done += 1
        self.trainer.flush()
        return done

    @property
    def predictor(self) -> torch.nn.Module:
        """The weights that predict: the moving average when there is one, else the newest."""
        return self.average.module if self.average is not None else self.trainer.model

    @torch.no_grad()
    def predict(self, image: np.ndarray, should_stop: Callable[[], bool] | None = None, *,
                normalized: bool = False) -> np.ndarray:
        """The neuron probability of one slice (float32, the slice's shape), with today's weights;
        ``should_stop`` is asked between batches of tiles (:class:`unet.prediction.infer.Interrupted` when it says so).
        ``normalized``: ``image`` is already normalised (a region, with its whole slice's statistics)."""
        model = self.predictor
        model.eval()
        try:
            return predict_slice(model, image, device=self.trainer.device, amp=self.trainer.amp,
                                 normalized=normalized, should_stop=should_stop)
        finally:
            self.trainer.model.train()

    def save(self) -> Path:
        """Checkpoint ``latest`` (resumable) and ``best`` (the weights a prediction uses: a live session has
        no validation to pick by, so the weights that predict are its best: the moving average when there
        is one, else the newest)."""
        newest = self.trainer.model
        self.trainer.model = self.predictor
        try:
            self.trainer.save("best", {})
        finally:
            self.trainer.model = newest
        return self.trainer.save("latest", {})


def _inside(box: tuple[int, int, int, int], outer: tuple[int, int, int, int]) -> bool:
    return outer[0] <= box[0] and outer[1] <= box[1] and box[2] <= outer[2] and box[3] <= outer[3]


def _union(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])
