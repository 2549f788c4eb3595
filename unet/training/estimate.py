"""How long a training run will take on this machine, from its recipe and the size of its data.

The network's floating-point operations are counted on PyTorch's meta device (nothing is computed).
What the machine makes of them is measured once per process and network: a real training step
(forward, backward, optimiser) on random patches, drawing and augmenting a batch, and a forward pass at
the tile size validation uses, so a narrow, memory-bound network is not mistaken for one that runs at
the machine's peak. A validation predicts every validation slice tile by tile as
:func:`unet.prediction.infer.predict_slice` does (eight times over with test-time augmentation) and scores it.
How close the estimate comes to real runs: ``docs/benchmarks.md``."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from unet.network.config import ModelConfig, TrainConfig
from unet.network.device import amp_dtype, autocast
from unet.network.model import UNet
from unet.network.sizes import output_size, valid_input_sizes
from unet.prediction.infer import tile_plan
from unet.training.data import PatchSampler

STARTUP_S = 5.0  # a worker's interpreter, the torch import and reading the data (measured: 3-4 s)
STEP_OVERHEAD = 1.1  # the loss, clipping and reporting, on top of forward, backward and the optimiser


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
            if s >= 2 * 86400:
                return f"{s / 86400:.0f} days"
            if s >= 2 * 3600:
                return f"{s / 3600:.0f} h"
            return f"{s / 60:.0f} min" if s >= 90 else f"{max(1, round(s))} s"

        checks = (f"{fmt(self.validation_s)} for {self.validations} validation{'s' if self.validations != 1 else ''}"
                  if self.validations else "no validation")
        return f"about {fmt(self.total_s)} here: {fmt(self.training_s)} of training, {checks}, " \
               f"{fmt(self.startup_s)} to start"


@functools.lru_cache(maxsize=64)
def forward_flops(model: ModelConfig, size: int, batch: int = 1) -> float:
    """Floating-point operations of one forward pass of a ``batch`` × 1 × ``size`` × ``size`` input."""
    with torch.device("meta"):
        net = UNet(model)
        x = torch.empty(batch, 1, size, size)
    with FlopCounterMode(display=False) as counter:
        net(x)
    return float(counter.get_total_flops())


PROBE_FLOPS = 20e9  # a probe larger than this is measured smaller and scaled (a wide net on a CPU)
METRICS_S_PER_MPIX = 0.7  # scoring a validation slice: watershed instances, Rand, VI (per megapixel, CPU)


def _probe_size(model: ModelConfig, size: int, batch: int) -> int:
    """The valid input size nearest under ``size`` whose forward pass stays under :data:`PROBE_FLOPS`
    (operations grow with the square of the size)."""
    sizes = valid_input_sizes(model, 64, max(96, size))
    if not sizes:
        raise ValueError(f"no input size near {size} fits this network ({model})")
    largest = sizes[-1]
    flops = forward_flops(model, largest, batch)
    cheap = [n for n in sizes if flops * (n / largest) ** 2 <= PROBE_FLOPS]
    return cheap[-1] if cheap else sizes[0]


@functools.lru_cache(maxsize=64)
def seconds_per_flop(model: ModelConfig, size: int, batch: int, device: str = "cpu") -> float:
    """Measured: a forward pass of this network on a ``batch`` of ``size``² tiles (or the largest cheap
    size under it), timed after a warm-up run. Narrow networks are memory-bound: their seconds per
    operation depend on the tile, so the probe uses the size the run will use."""
    size = _probe_size(model, size, batch)
    net, x, amp = _probe(model, size, batch, device)
    net.eval()
    times = []
    try:
        with torch.inference_mode(), autocast(torch.device(device), amp):
            for _ in range(2):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                net(x)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
    finally:
        del net, x
        _release(device)
    return times[-1] / forward_flops(model, size, batch)


def _probe(model: ModelConfig, size: int, batch: int, device: str) -> tuple[UNet, torch.Tensor, torch.dtype | None]:
    """The network and a batch as training computes them on ``device``: on a GPU channels-last, with the AMP
    dtype a run chooses by default (an fp32 probe there took 2–3× a bf16 step)."""
    net = UNet(model).to(device)
    x = torch.randn(batch, 1, size, size, device=device)
    amp = amp_dtype(torch.device(device), "auto")
    if device.startswith("cuda"):  # CUDA-only
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return net, x, amp


def _release(device: str) -> None:
    """Give a GPU probe's memory back (the server measures, and a run may be training on the same GPU)."""
    if device.startswith("cuda"):  # CUDA-only
        torch.cuda.empty_cache()


@functools.lru_cache(maxsize=32)
def seconds_per_step(model: ModelConfig, patch: int, batch: int, device: str = "cpu") -> float:
    """Measured: one real training step (forward, backward, AdamW) of this network on random patches
    (scaled from a smaller patch when the real one would take long to probe)."""
    size = _probe_size(model, patch, batch)
    net, x, amp = _probe(model, size, batch, device)
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    times = []
    try:
        for _ in range(2):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with autocast(torch.device(device), amp):
                out = net(x)
            out.float().mean().backward()
            optimizer.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    finally:
        del net, x, optimizer
        _release(device)
    return times[-1] * forward_flops(model, patch, batch) / forward_flops(model, size, batch)


def seconds_per_batch(config: TrainConfig) -> float:
    """Measured (once per process and recipe): drawing and augmenting one batch of patches (elastic
    deformation dominates on a CPU), with the move that keeps a labels' drawing convention where the
    recipe keeps one."""
    return _seconds_per_batch(config.augment, config.patch_size, output_size(config.model, config.patch_size),
                              config.batch_size)


@functools.lru_cache(maxsize=32)
def _seconds_per_batch(augment, patch: int, out: int, batch: int) -> float:
    rng = np.random.default_rng(0)
    side = max(2 * patch, 256)
    image = rng.integers(0, 255, (side, side), dtype=np.uint8)
    target = rng.integers(0, 2, (side, side), dtype=np.uint8)
    # the flips keep a drawing convention by moving each patch (a spline shift) when the labels have one:
    # time the dearer case, since the offset is only measured once training starts
    offset = (0.5, 0.5) if augment.flips and augment.keep_label_offset else (0.0, 0.0)
    sampler = PatchSampler([image], [target], patch, out, augment, rng, label_offset=offset)
    sampler.sample(batch)
    start = time.perf_counter()
    for _ in range(3):
        sampler.sample(batch)
    return (time.perf_counter() - start) / 3


def estimate_training(config: TrainConfig, val_shapes: list[tuple[int, int]], device: str = "cpu") -> Estimate:
    """How long ``config`` takes on ``device`` here, validating on slices of ``val_shapes`` (Y, X).

    Args:
        config: the recipe (network, patch, batch, steps, validation interval, time budget).
        val_shapes: the shape of every validation slice.
        device: "cpu" or a CUDA device; the speed of this network on it is measured (once per process).
    """
    step_s = seconds_per_step(config.model, config.patch_size, config.batch_size, device) * STEP_OVERHEAD
    step_s += seconds_per_batch(config) if device == "cpu" else 0.0  # on a GPU, loader workers hide it
    training_s = config.steps * step_s
    validations = math.ceil(config.steps / config.val_every) if val_shapes else 0
    one_validation = 0.0
    if val_shapes:
        with torch.device("meta"):
            net = UNet(config.model)
        network = 0.0
        for shape in val_shapes:  # tile by tile, as predict_slice covers it
            tile, _, _, rows, cols = tile_plan(net, shape)
            network += len(rows) * len(cols) * forward_flops(config.model, tile) * seconds_per_flop(
                config.model, tile, 2, device)
        network *= 8 if config.tta_validation else 1
        one_validation = network + METRICS_S_PER_MPIX * sum(h * w for h, w in val_shapes) / 1e6
    validation_s = validations * one_validation
    if config.max_seconds is not None and training_s + validation_s > config.max_seconds:
        share = config.max_seconds / (training_s + validation_s)  # the budget stops it: both shrink
        training_s, validation_s = training_s * share, validation_s * share + one_validation
        validations = max(1, math.ceil(validations * share))
    return Estimate(STARTUP_S, training_s, validation_s, validations)
