"""How long a training run will take on this machine, from its recipe and the size of its data.

The network's floating-point operations are counted on PyTorch's meta device (nothing is computed);
seconds per operation are measured once per process and network by timing a forward pass of that very
network on a small tile, so a narrow, memory-bound network is not mistaken for one that runs at the
machine's peak. A training step costs about three forward passes (forward and backward); a validation
predicts every validation slice tile by tile (eight times over with test-time augmentation)."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from unet.config import ModelConfig, TrainConfig
from unet.model import UNet, output_size, valid_input_sizes

STARTUP_S = 5.0  # a worker's interpreter, the torch import and reading the data (measured: 3-4 s)
STEP_OVERHEAD = 1.25  # sampling, augmentation and the optimiser, on top of forward + backward
TILE_OVERLAP = 1.3  # tiles overlap and pad the slice's edges: pixels computed per pixel predicted


@dataclass(frozen=True)
class Estimate:
    """Seconds for each part of a run, and in all.

    Args:
        startup_s: starting the worker process and reading the data.
        training_s: the training steps.
        validation_s: all validations together.
        validations: how many validations the run makes.
    """

    startup_s: float
    training_s: float
    validation_s: float
    validations: int

    @property
    def total_s(self) -> float:
        return self.startup_s + self.training_s + self.validation_s

    def describe(self) -> str:
        def fmt(s: float) -> str:
            return f"{s / 60:.0f} min" if s >= 90 else f"{max(1, round(s))} s"

        return (f"about {fmt(self.total_s)} here: {fmt(self.training_s)} of training, {fmt(self.validation_s)} "
                f"for {self.validations} validation(s), {fmt(self.startup_s)} to start")


@functools.lru_cache(maxsize=64)
def forward_flops(model: ModelConfig, size: int, batch: int = 1) -> float:
    """Floating-point operations of one forward pass of a ``batch`` × 1 × ``size`` × ``size`` input."""
    with torch.device("meta"):
        net = UNet(model)
        x = torch.empty(batch, 1, size, size)
    with FlopCounterMode(display=False) as counter:
        net(x)
    return float(counter.get_total_flops())


def _probe_size(model: ModelConfig) -> int:
    sizes = valid_input_sizes(model, 96, 256)
    if not sizes:
        raise ValueError(f"no input size between 96 and 256 fits this network ({model})")
    return min(sizes, key=lambda n: abs(n - 128))


@functools.lru_cache(maxsize=32)
def seconds_per_flop(model: ModelConfig, device: str = "cpu") -> float:
    """Measured: one forward pass of this network on a small tile, timed (after a warm-up run)."""
    size = _probe_size(model)
    net = UNet(model).to(device).eval()
    x = torch.randn(2, 1, size, size, device=device)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            net(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return min(times[1:]) / forward_flops(model, size, 2)


def estimate_training(config: TrainConfig, val_shapes: list[tuple[int, int]], device: str = "cpu") -> Estimate:
    """How long ``config`` takes on ``device`` here, validating on slices of ``val_shapes`` (Y, X).

    Args:
        config: the recipe (network, patch, batch, steps, validation interval, time budget).
        val_shapes: the shape of every validation slice.
        device: "cpu" or a CUDA device; the speed of this network on it is measured (once per process).
    """
    spf = seconds_per_flop(config.model, device)
    step_s = 3 * forward_flops(config.model, config.patch_size, config.batch_size) * spf * STEP_OVERHEAD
    training_s = config.steps * step_s
    validations = math.ceil(config.steps / config.val_every) if val_shapes else 0
    tile = _probe_size(config.model)
    per_pixel = forward_flops(config.model, tile) / output_size(config.model, tile) ** 2
    one_validation = sum(h * w for h, w in val_shapes) * per_pixel * TILE_OVERLAP * spf
    if config.tta_validation:
        one_validation *= 8
    validation_s = validations * one_validation
    if config.max_seconds is not None and training_s + validation_s > config.max_seconds:
        share = config.max_seconds / (training_s + validation_s)  # the budget stops it: both shrink
        training_s, validation_s = training_s * share, validation_s * share + one_validation
        validations = max(1, math.ceil(validations * share))
    return Estimate(STARTUP_S, training_s, validation_s, validations)
