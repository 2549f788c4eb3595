"""The training loop: ``train(config, data, reporter, out_dir)``.

The loop knows nothing of databases or web pages: it talks through a *reporter* (``on_step``,
``on_validation``, ``on_checkpoint``, ``should_stop``), implemented by the CLI (tqdm), the background
worker (database rows) and the tests (lists). It keeps ``best.pt`` and ``latest.pt`` in ``out_dir``,
resumes from ``latest``, fine-tunes from any checkpoint and returns the loss history.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet.exchange.checkpoint import load_checkpoint, save_checkpoint
from unet.network.config import TrainConfig
from unet.network.device import amp_dtype, autocast, pick_device
from unet.network.losses import segmentation_loss
from unet.network.model import UNet
from unet.network.sizes import check_input_size
from unet.network.threads import usable_cores
from unet.prediction.infer import Interrupted, predict_slice
from unet.prediction.metrics import evaluate_slice, mean_metrics
from unet.training.data import PatchSampler, TrainData
from unet.training.ddp import agree, agree_values, distributed, share
from unet.training.device_batches import DeviceSampler, make_sampler
from unet.training.labels import IGNORE, border_weights, label_offset
from unet.training.reporting import NullReporter, Reporter


@dataclass
class TrainResult:
    steps_done: int
    reason: str  # finished | stopped | early_stop | time_limit
    history: list[dict[str, float]]  # one row per step: step, loss, lr, seconds
    validations: list[dict[str, float]]  # one row per validation: step, seconds, val_* metrics
    best: dict[str, float] | None
    out_dir: Path
    device: str


#: Steps between two reads of the loss back to the host (:meth:`Trainer.flush`): a read waits for the device.
LOSS_EVERY = 10

#: The validation metric that picks the ``best`` checkpoint and drives early stopping (lower is better).
BEST_METRIC = "val_loss"


def lr_at(config: TrainConfig, step: int, seconds: float) -> float:
    """Linear warm-up, then cosine decay to 2% of ``lr``. Progress is the further along of steps and
    (when ``max_seconds`` is set) wall-clock time, so a budgeted run anneals before its time is up."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = step / config.steps
    if config.max_seconds:
        progress = max(progress, seconds / config.max_seconds)
    progress = min(max(progress, 0.0), 1.0)
    floor = 0.02
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _validation_metrics(model: UNet, data: TrainData, config: TrainConfig, device: torch.device,
                        amp: torch.dtype | None, reporter: Reporter) -> dict[str, float]:
    """The validation metrics; raises :class:`Interrupted` as soon as the reporter says stop."""
    rows = []
    n = len(data.val_images)
    # on a CPU a batch of tiles takes seconds: small batches let a cancel through quickly
    batch = max(config.batch_size, 1) if device.type == "cuda" else min(max(config.batch_size, 1), 2)
    for i, (image, target) in enumerate(zip(data.val_images, data.val_targets, strict=True)):
        reporter.on_phase(f"validating slice {i + 1} of {n}")
        prob = predict_slice(model, image, device=device, amp=amp, tta=config.tta_validation,
                             normalized=True, batch_size=batch, should_stop=reporter.should_stop)
        if not (target != IGNORE).any():
            continue
        # the training loss itself, on the whole slice (logits recovered from the blended probabilities)
        logits = torch.logit(torch.from_numpy(prob), eps=1e-6)[None, None]
        loss = float(segmentation_loss(logits, torch.from_numpy(target)[None, None], config.loss))
        rows.append({"loss": loss, **evaluate_slice(prob, target)})
    return {f"val_{k}": v for k, v in mean_metrics(rows).items()} if rows else {}


def _batches(sampler: PatchSampler | DeviceSampler, batch_size: int, device: torch.device, seed: int):
    """Endless batches. A :class:`DeviceSampler` makes them on the device, queued behind the steps before; the
    host's sampler makes them in worker processes on CUDA while the GPU computes, in this process elsewhere."""
    if device.type != "cuda" or isinstance(sampler, DeviceSampler):
        while True:
            yield sampler.sample(batch_size)
    workers = max(1, min(8, usable_cores() - 1))
    seeds = np.random.SeedSequence(seed).spawn(workers)

    class _Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            sampler.rng = np.random.default_rng(seeds[info.id if info else 0])
            while True:
                yield sampler.sample(batch_size)

    loader = torch.utils.data.DataLoader(_Stream(), batch_size=None, num_workers=workers,
                                         pin_memory=True, prefetch_factor=4, persistent_workers=True)
    yield from loader


class Trainer:
    """One training run, step by step: :meth:`restore` (resume or fine-tune), :meth:`step`,
    :meth:`validate`, :meth:`save`; :meth:`run` loops them until the run ends.

    Args:
        config: the recipe (:class:`~unet.network.config.TrainConfig`).
        data: the training and validation slices with their targets (:class:`~unet.training.data.TrainData`).
        reporter: told every step, validation, checkpoint and phase; asked whether to stop.
        out_dir: where ``best.pt`` and ``latest.pt`` (and their JSON side files) go.
    """

    def __init__(self, config: TrainConfig, data: TrainData, reporter: Reporter | None, out_dir: str | os.PathLike):
        self.rank, self.world = distributed()
        # in a DistributedDataParallel run (torchrun), rank 0 reports, validates and writes the checkpoints
        self.config, self.data = config, data
        self.reporter = (reporter or NullReporter()) if self.rank == 0 else NullReporter()
        if config.batch_size % self.world:
            raise ValueError(f"a batch of {config.batch_size} patches cannot be shared by {self.world} processes; "
                             f"choose a batch size that is a multiple of {self.world}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(config.device)
        if self.world > 1 and self.device.type == "cuda":  # one process per GPU
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        self.amp = amp_dtype(self.device, config.amp)
        self.channels_last = config.channels_last if config.channels_last is not None else self.device.type == "cuda"
        self.out_size = check_input_size(config.model, config.patch_size)
        torch.manual_seed(config.seed)
        self.model = UNet(config.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.rng = np.random.default_rng(config.seed)
        self.step_count, self.seconds_before = 0, 0.0
        self.label_offset = (0.0, 0.0)  # the labels' drawing convention the flips keep (restore measures it)
        self.history: list[dict[str, float]] = []
        self.validations: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None
        self.stale = 0  # validations since the best one
        self._pending: list[tuple[int, torch.Tensor, float, float]] = []  # steps whose loss is not read yet
        self._started = time.perf_counter()
        self._agreed_seconds: float | None = None  # rank 0's elapsed() as last told to every process
        self._validated_at: int | None = None  # the step of the last validation (every rank knows it)
        self._interrupted = False  # a stop came during a validation

    def elapsed(self) -> float:
        """Training seconds over every start of the run."""
        return self.seconds_before + time.perf_counter() - self._started

    def restore(self, resume: bool = False, init_from: str | os.PathLike | None = None) -> None:
        """``resume``: continue from ``out_dir/latest.pt`` when it exists (step count, optimiser, history and
        sampling state carry on). ``init_from``: start from another checkpoint's weights (fine-tuning; the
        architecture must match). Then move everything to the device."""
        latest_path = self.out_dir / "latest.pt"
        inherited = None  # the labels' drawing convention the weights were trained to (their checkpoint's)
        if resume and latest_path.exists():
            ckpt = load_checkpoint(latest_path)
            if ckpt.model_config != self.config.model:
                raise ValueError("cannot resume: the checkpoint's model differs from the configured model")
            self.model.load_state_dict(ckpt.state_dict)
            if ckpt.optimizer_state:
                self.optimizer.load_state_dict(ckpt.optimizer_state)
            meta = ckpt.meta
            self.step_count, self.seconds_before = int(meta.get("step", 0)), float(meta.get("seconds", 0.0))
            self.history, self.validations = list(meta.get("history", [])), list(meta.get("validations", []))
            self._validated_at = self.validations[-1]["step"] if self.validations else None  # (every rank reads it)
            self.best, self.stale = meta.get("best"), int(meta.get("stale", 0))
            if meta.get("rng_state"):
                self.rng.bit_generator.state = meta["rng_state"]
            inherited = meta.get("label_offset")
        elif init_from is not None:
            parent = load_checkpoint(init_from)
            if parent.model_config != self.config.model:
                raise ValueError(f"cannot fine-tune from {Path(init_from).name}: it is a {parent.model_config} "
                                 f"network, the run asks for {self.config.model}")
            self.model.load_state_dict(parent.state_dict)
            inherited = parent.meta.get("label_offset")
        self.label_offset = self._label_offset(inherited)
        self.model.label_offset = self.label_offset
        if self.world > 1 and self.device.type == "cuda":  # batch statistics over the global batch
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # keeps the parameters
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward_model = self.model
        if self.world > 1:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        for state in self.optimizer.state.values():  # optimizer state lives where the parameters are
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    state[k] = v.to(self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        weights = None
        if self.config.border_weight > 0:
            weights = [border_weights(t, self.config.border_weight, self.config.border_sigma)
                       for t in self.data.train_targets]
        sampler = make_sampler(self.config, self.device, self.rng, self.data.train_images, self.data.train_targets,
                               self.out_size, weights, self.label_offset)
        self.batches = _batches(sampler, self.config.batch_size, self.device, self.config.seed)
        if self.world > 1:  # every process draws the same global batch (same seed) and trains on its share
            self.batches = share(self.batches, self.rank, self.world)
        self._started = time.perf_counter()

    def _label_offset(self, inherited) -> tuple[float, float]:
        """The drawing convention the flips keep (:func:`unet.training.augment.augment_patch`): the training labels'
        own where their fully labelled slices show one, else the starting weights' (scribbles say nothing
        about it, and the weights already follow theirs), else none."""
        augment = self.config.augment
        if not (augment.flips and augment.keep_label_offset):
            return (0.0, 0.0)
        measured = label_offset(self.data.train_images, self.data.train_targets)
        if measured is None and inherited:
            measured = (float(inherited[0]), float(inherited[1]))
        return measured or (0.0, 0.0)

    def step(self) -> torch.Tensor:
        """One optimiser step on a fresh batch; returns its loss as a tensor on the device, not read back: the
        host waits for nothing here (:meth:`flush` reads the losses every :data:`LOSS_EVERY` steps). A loss
        that is not finite raises :class:`FloatingPointError` then (the last good ``latest`` stays on disk)."""
        config, device = self.config, self.device
        # (in a distributed run, rank 0's clock as last agreed: every process steps with the same rate)
        lr = lr_at(config, self.step_count, self.elapsed() if self.world <= 1 else (self._agreed_seconds or 0.0))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        xs, ys, ws = next(self.batches)
        x = torch.as_tensor(xs).to(device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.as_tensor(ys).to(device, non_blocking=True)
        w = torch.as_tensor(ws).to(device, non_blocking=True) if ws is not None else None
        with autocast(device, self.amp):
            logits = self.forward_model(x)
        loss = segmentation_loss(logits, y, config.loss, w)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step_count += 1
        loss = loss.detach()
        self._pending.append((self.step_count, loss, lr, self.elapsed()))
        if len(self._pending) >= LOSS_EVERY:
            self.flush()
        return loss

    def flush(self) -> None:
        """Read the losses of the steps since the last read back to the host, in one transfer: record and report
        them, and raise :class:`FloatingPointError` if one is not finite (so at most :data:`LOSS_EVERY` steps
        late, and always before a checkpoint is written). In a distributed run every process calls it at the
        same steps (the curve is the global batch's: the mean over the processes)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        losses = torch.stack([loss.float() for _, loss, _, _ in pending]).to(torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(losses)
            losses = losses / self.world
        for (step, _, lr, seconds), value in zip(pending, losses.cpu().tolist(), strict=True):
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss became {value} at step {step}; try a lower learning rate "
                                         f"(now {self.config.lr}) or turn AMP off")
            self.history.append({"step": step, "loss": value, "lr": lr, "seconds": seconds})
            self.reporter.on_step(step, value, lr, seconds)

    def validate(self) -> bool:
        """Validate, keep ``best``; return True when early stopping says stop. A stop asked for during the
        validation ends it at once (nothing is recorded for it). In a distributed run rank 0 validates and
        the others learn its verdict."""
        self.flush()
        self._validated_at = self.step_count  # (every rank: whether the run ends with a validation is the same for all)
        if self.rank != 0:
            return agree(False, self.world)
        try:
            metrics = (_validation_metrics(self.model, self.data, self.config, self.device, self.amp, self.reporter)
                       if self.data.val_images else {})
        except Interrupted:  # stopped during it: every rank stops (each waits for rank 0's answer)
            self._interrupted = True
            return agree(True, self.world)
        finally:
            self.reporter.on_phase("training")
        if metrics:
            self.validations.append({"step": self.step_count, "seconds": self.elapsed(), **metrics})
            self.reporter.on_validation(self.step_count, metrics, self.elapsed())
            if self.best is None or metrics[BEST_METRIC] < self.best[BEST_METRIC]:
                self.best, self.stale = {"step": self.step_count, **metrics}, 0
                self.save("best", metrics)
            else:
                self.stale += 1
        patience = self.config.early_stop_patience
        return agree(bool(patience and self.stale >= patience), self.world)

    def save(self, kind: str, metrics: dict[str, float]) -> Path:
        """Write ``<kind>.pt``: ``latest`` carries the optimiser and everything needed to resume (in a
        distributed run, rank 0 writes; the others hold the same weights)."""
        self.flush()
        if self.rank != 0:
            return self.out_dir / f"{kind}.pt"
        meta: dict[str, Any] = {"kind": kind, "step": self.step_count, "seconds": self.elapsed(), "metrics": metrics,
                                "train_config": self.config.to_dict(), "device": str(self.device),
                                "label_offset": list(self.label_offset)}
        if kind == "latest":
            meta.update(history=self.history, validations=self.validations, best=self.best, stale=self.stale,
                        rng_state=self.rng.bit_generator.state)
        path = save_checkpoint(self.out_dir / f"{kind}.pt", self.model, meta=meta,
                               optimizer=self.optimizer if kind == "latest" else None)
        self.reporter.on_checkpoint(kind, path, self.step_count, metrics)
        return path

    def run(self) -> TrainResult:
        """Step until the steps are done, the time budget runs out, early stopping triggers or the reporter
        says stop; validate at the end (unless stopped) and always leave a ``latest``."""
        config, reporter = self.config, self.reporter
        reason = "finished"
        reporter.on_phase("training")
        self.model.train()
        while self.step_count < config.steps:
            stopped = late = False
            if self.world <= 1:
                stopped = reporter.should_stop()
                late = config.max_seconds is not None and self.elapsed() >= config.max_seconds
            elif self.step_count % LOSS_EVERY == 0 or self._agreed_seconds is None:
                # rank 0's clock and its reporter decide for all, every few steps (a round trip each)
                said = agree_values([float(reporter.should_stop()), float(
                    config.max_seconds is not None and self.elapsed() >= config.max_seconds), self.elapsed()],
                    self.world)
                stopped, late, self._agreed_seconds = bool(said[0]), bool(said[1]), said[2]
            if stopped:
                reason = "stopped"
                break
            if late:
                reason = "time_limit"
                break
            self.step()
            step = self.step_count
            stop_early = self.validate() if step % config.val_every == 0 and step < config.steps else False
            if step % config.checkpoint_every == 0 and step < config.steps:
                self.save("latest", {})
            if stop_early:
                reason = "stopped" if self._interrupted else "early_stop"
                break
        self.flush()
        if reason != "stopped" and self._validated_at != self.step_count:
            self.validate()  # a cancelled run should stop promptly, not validate first
        last = self.validations[-1] if self.validations and self.validations[-1]["step"] == self.step_count else {}
        self.save("latest", last)
        if not self.data.val_images:  # nothing to choose by: the last weights are the best we know
            self.save("best", {})
        return TrainResult(self.step_count, reason, self.history, self.validations, self.best, self.out_dir,
                           str(self.device))


def train(config: TrainConfig, data: TrainData, reporter: Reporter | None = None, *,
          out_dir: str | os.PathLike, resume: bool = False,
          init_from: str | os.PathLike | None = None) -> TrainResult:
    """Train a U-Net; write ``best.pt`` / ``latest.pt`` (and their JSON) into ``out_dir``.

    Args:
        config: the recipe (:class:`~unet.network.config.TrainConfig`).
        data: training and validation slices with their targets (:class:`~unet.training.data.TrainData`).
        reporter: told every step, validation, checkpoint and phase, asked whether to stop
            (:class:`NullReporter` by default).
        out_dir: the folder of the run's checkpoints.
        resume: continue from ``out_dir/latest.pt`` when it exists (the step count, optimiser, history
            and sampling state carry on).
        init_from: start from another checkpoint's weights (fine-tuning; the architecture must match).

    Returns:
        A :class:`TrainResult`: steps done, why it stopped, the loss and validation history, the best
        validation.
    """
    trainer = Trainer(config, data, reporter, out_dir)
    trainer.restore(resume=resume, init_from=init_from)
    return trainer.run()
