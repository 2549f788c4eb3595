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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from unet.checkpoint import load_checkpoint, save_checkpoint
from unet.config import TrainConfig
from unet.data import PatchSampler, TrainData
from unet.device import amp_dtype, autocast, pick_device
from unet.infer import Interrupted, predict_slice
from unet.labels import IGNORE, border_weights
from unet.losses import segmentation_loss
from unet.metrics import evaluate_slice, mean_metrics
from unet.model import UNet, check_input_size


class Reporter(Protocol):
    def on_step(self, step: int, loss: float, lr: float, seconds: float) -> None: ...
    def on_validation(self, step: int, metrics: dict[str, float], seconds: float) -> None: ...
    def on_checkpoint(self, kind: str, path: Path, step: int, metrics: dict[str, float]) -> None: ...
    def should_stop(self) -> bool: ...
    def on_phase(self, text: str) -> None: ...


class NullReporter:
    """A reporter that ignores everything; subclass it and override what you need."""

    def on_step(self, step: int, loss: float, lr: float, seconds: float) -> None:
        pass

    def on_validation(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        pass

    def on_checkpoint(self, kind: str, path: Path, step: int, metrics: dict[str, float]) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def on_phase(self, text: str) -> None:
        """What the trainer does now ("training", "validating slice 2 of 3"), for a progress display."""


@dataclass
class ListReporter(NullReporter):
    """Keeps everything in lists; ``stop_at`` asks the loop to stop after that step."""

    steps: list[tuple[int, float]] = field(default_factory=list)
    validations: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    checkpoints: list[tuple[str, Path, int]] = field(default_factory=list)
    stop_at: int | None = None

    def on_step(self, step: int, loss: float, lr: float, seconds: float) -> None:
        self.steps.append((step, loss))

    def on_validation(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        self.validations.append((step, metrics))

    def on_checkpoint(self, kind: str, path: Path, step: int, metrics: dict[str, float]) -> None:
        self.checkpoints.append((kind, path, step))

    def should_stop(self) -> bool:
        return self.stop_at is not None and bool(self.steps) and self.steps[-1][0] >= self.stop_at


@dataclass
class TrainResult:
    steps_done: int
    reason: str  # finished | stopped | early_stop | time_limit
    history: list[dict[str, float]]  # one row per step: step, loss, lr, seconds
    validations: list[dict[str, float]]  # one row per validation: step, seconds, val_* metrics
    best: dict[str, float] | None
    out_dir: Path
    device: str


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


def _batches(sampler: PatchSampler, batch_size: int, device: torch.device, seed: int):
    """Endless batches. On CUDA, worker processes prepare them while the GPU computes."""
    if device.type != "cuda":
        while True:
            yield sampler.sample(batch_size)
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
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


def train(config: TrainConfig, data: TrainData, reporter: Reporter | None = None, *,
          out_dir: str | os.PathLike, resume: bool = False,
          init_from: str | os.PathLike | None = None) -> TrainResult:
    """Train a U-Net; write ``best.pt`` / ``latest.pt`` (and their JSON) into ``out_dir``.

    ``resume=True`` continues from ``out_dir/latest.pt`` when it exists (the step count, optimiser,
    history and sampling state carry on); ``init_from`` starts from another checkpoint's weights
    (fine-tuning; the architecture must match). Stops when the steps are done, the time budget runs out,
    early stopping triggers, or ``reporter.should_stop()`` says so; always leaves a ``latest``."""
    reporter = reporter or NullReporter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    amp = amp_dtype(device, config.amp)
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    out_size = check_input_size(config.model, config.patch_size)

    torch.manual_seed(config.seed)
    model = UNet(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    step, seconds_before = 0, 0.0
    history: list[dict[str, float]] = []
    validations: list[dict[str, float]] = []
    best: dict[str, float] | None = None
    stale = 0

    latest_path = out_dir / "latest.pt"
    if resume and latest_path.exists():
        ckpt = load_checkpoint(latest_path)
        if ckpt.model_config != config.model:
            raise ValueError("cannot resume: the checkpoint's model differs from the configured model")
        model.load_state_dict(ckpt.state_dict)
        if ckpt.optimizer_state:
            optimizer.load_state_dict(ckpt.optimizer_state)
        step = int(ckpt.meta.get("step", 0))
        seconds_before = float(ckpt.meta.get("seconds", 0.0))
        history = list(ckpt.meta.get("history", []))
        validations = list(ckpt.meta.get("validations", []))
        best = ckpt.meta.get("best")
        stale = int(ckpt.meta.get("stale", 0))
        if ckpt.meta.get("rng_state"):
            rng.bit_generator.state = ckpt.meta["rng_state"]
    elif init_from is not None:
        parent = load_checkpoint(init_from)
        if parent.model_config != config.model:
            raise ValueError(
                f"cannot fine-tune from {Path(init_from).name}: it is a {parent.model_config} network, "
                f"the run asks for {config.model}"
            )
        model.load_state_dict(parent.state_dict)

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # optimizer state tensors must live where the parameters are
    for state in optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    weights = None
    if config.border_weight > 0:
        weights = [border_weights(t, config.border_weight, config.border_sigma) for t in data.train_targets]
    sampler = PatchSampler(data.train_images, data.train_targets, config.patch_size, out_size,
                           config.augment, rng, weights)

    start = time.perf_counter()

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - start

    def save(kind: str, metrics: dict[str, float]) -> None:
        meta: dict[str, Any] = {
            "kind": kind, "step": step, "seconds": elapsed(), "metrics": metrics,
            "train_config": config.to_dict(), "device": str(device),
        }
        if kind == "latest":
            meta.update(history=history, validations=validations, best=best, stale=stale,
                        rng_state=rng.bit_generator.state)
        path = save_checkpoint(out_dir / f"{kind}.pt", model, meta=meta,
                               optimizer=optimizer if kind == "latest" else None)
        reporter.on_checkpoint(kind, path, step, metrics)

    def validate() -> bool:
        """Run validation, keep ``best``; return True when early stopping says stop. A stop asked for
        during the validation ends it at once (nothing recorded for it)."""
        nonlocal best, stale
        has_val = bool(data.val_images)
        try:
            metrics = _validation_metrics(model, data, config, device, amp, reporter) if has_val else {}
        except Interrupted:
            return False
        finally:
            reporter.on_phase("training")
        if metrics:
            row = {"step": step, "seconds": elapsed(), **metrics}
            validations.append(row)
            reporter.on_validation(step, metrics, elapsed())
            if best is None or metrics[BEST_METRIC] < best[BEST_METRIC]:
                best, stale = {"step": step, **metrics}, 0
                save("best", metrics)
            else:
                stale += 1
        return bool(config.early_stop_patience and stale >= config.early_stop_patience)

    reason = "finished"
    batches = _batches(sampler, config.batch_size, device, config.seed)
    reporter.on_phase("training")
    model.train()
    while step < config.steps:
        if reporter.should_stop():
            reason = "stopped"
            break
        if config.max_seconds is not None and elapsed() >= config.max_seconds:
            reason = "time_limit"
            break
        lr = lr_at(config, step, elapsed())
        for group in optimizer.param_groups:
            group["lr"] = lr
        xs, ys, ws = next(batches)
        x = torch.as_tensor(xs).to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.as_tensor(ys).to(device, non_blocking=True)
        w = torch.as_tensor(ws).to(device, non_blocking=True) if ws is not None else None
        with autocast(device, amp):
            logits = model(x)
        loss = segmentation_loss(logits, y, config.loss, w)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            # keep the last good `latest` on disk: saving now would store the broken weights
            raise FloatingPointError(
                f"the loss became {loss_value} at step {step}; try a lower learning rate "
                f"(now {config.lr}) or turn AMP off"
            )
        history.append({"step": step, "loss": loss_value, "lr": lr, "seconds": elapsed()})
        reporter.on_step(step, loss_value, lr, elapsed())
        stop_early = False
        if step % config.val_every == 0 and step < config.steps:
            stop_early = validate()
        if step % config.checkpoint_every == 0 and step < config.steps:
            save("latest", {})
        if stop_early:
            reason = "early_stop"
            break

    if reason != "stopped" and (not validations or validations[-1]["step"] != step):
        validate()  # a cancelled run should stop promptly, not validate first
    save("latest", validations[-1] if validations and validations[-1]["step"] == step else {})
    if not data.val_images:  # nothing to choose by: the last weights are the best we know
        save("best", {})
    return TrainResult(step, reason, history, validations, best, out_dir, str(device))
