"""Configuration of the model and of a training run.

Both are frozen dataclasses, checked in ``__post_init__`` with messages that state the rule, stored as
JSON (database, checkpoint side file, run folder) and rebuilt with ``from_dict``, which refuses keys it
does not know so that a typo in a stored config is an error, not a silently ignored knob.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from unet.network.sizes import check_input_size

Padding = Literal["valid", "same"]
Loss = Literal["bce", "dice", "bce+dice"]
Amp = Literal["auto", "off", "bf16", "fp16"]

_T = TypeVar("_T")

MAX_WIDTH = 256  # ModelConfig.initial_features (the full-width network is 64)
MAX_CHANNELS = 16  # ModelConfig.in_channels and out_channels (EM: 1 and 1)


def _from_dict(cls: type[_T], data: dict[str, Any]) -> _T:
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    return cls(**data)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a :class:`unet.network.model.UNet`.

    Args:
        in_channels: channels of the input image (1 for EM).
        out_channels: channels of the logits (1: neuron vs membrane).
        depth: contracting blocks (1-6); the input shrinks by ``2**depth`` at the bottleneck.
        initial_features: the brief's "hidden channels": the width after the first 1×1 convolution;
            each contracting block doubles it (at most 256; channels at most 16 each way).
        padding: ``"valid"`` is the original paper (512² in → 373² out at depth 4); ``"same"`` keeps the
            size when it is divisible by ``2**depth``.
        batch_norm: a batch norm after every 3×3 convolution.

    Raises:
        ValueError: a value out of range, with the rule it breaks.
    """

    in_channels: int = 1
    out_channels: int = 1
    depth: int = 4
    initial_features: int = 64
    padding: Padding = "valid"
    batch_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "depth", "initial_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.depth > 6:
            raise ValueError(f"ModelConfig.depth must be at most 6, got {self.depth}")
        for name, most in (("initial_features", MAX_WIDTH), ("in_channels", MAX_CHANNELS),
                           ("out_channels", MAX_CHANNELS)):
            if getattr(self, name) > most:  # (a config from outside must not ask for a network of any size)
                raise ValueError(f"ModelConfig.{name} must be at most {most}, got {getattr(self, name)}")
        if self.padding not in ("valid", "same"):
            raise ValueError(f"ModelConfig.padding must be 'valid' or 'same', got {self.padding!r}")
        if not isinstance(self.batch_norm, bool):
            raise ValueError(f"ModelConfig.batch_norm must be a bool, got {self.batch_norm!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class AugmentConfig:
    """On-the-fly augmentation of training patches; every probability is per patch.

    Args:
        flips: the 8 flips/90° rotations of the square.
        elastic_p: share of patches elastically deformed, as in the U-Net paper (``elastic_sigma``
            pixels of displacement on a coarse grid of ``elastic_grid`` points per side).
        intensity_p: share with brightness, contrast and gamma changed.
        noise_p: share with Gaussian noise of ``noise_std`` (normalised image units) added.
        keep_label_offset: with ``flips``, measure the training labels' drawing convention (where fully
            labelled slices put the membranes against the image, :func:`unet.training.labels.label_offset`) and
            keep it the same in every flipped or turned patch, so the network learns it.
    """

    flips: bool = True  # the 8 flips/90° rotations of the square
    elastic_p: float = 0.5  # elastic deformation, as in the U-Net paper
    elastic_sigma: float = 10.0  # displacement std in pixels on the coarse grid
    elastic_grid: int = 3  # coarse grid points per side
    intensity_p: float = 0.8  # brightness / contrast / gamma
    noise_p: float = 0.3  # additive Gaussian noise
    noise_std: float = 0.08  # in units of the normalised image
    keep_label_offset: bool = True  # flips keep the labels' sub-pixel drawing convention

    def __post_init__(self) -> None:
        for name in ("elastic_p", "intensity_p", "noise_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AugmentConfig.{name} is a probability in [0, 1], got {value!r}")
        if self.elastic_sigma < 0 or self.noise_std < 0:
            raise ValueError("AugmentConfig.elastic_sigma and noise_std must be >= 0")
        if self.elastic_grid < 2:
            raise ValueError(f"AugmentConfig.elastic_grid must be >= 2, got {self.elastic_grid}")

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls(flips=False, elastic_p=0.0, intensity_p=0.0, noise_p=0.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe.

    Args:
        model: the network (:class:`ModelConfig`).
        augment: on-the-fly augmentation of the training patches (:class:`AugmentConfig`).
        steps: optimiser steps.
        batch_size: patches per step.
        patch_size: the network's *input* tile; with valid padding the loss is computed on the smaller
            centred output. Checked against the network here (ValueError with sizes that fit).
        lr: peak learning rate of AdamW (linear warm-up over ``warmup_steps``, then cosine decay).
        weight_decay: AdamW's weight decay.
        warmup_steps: steps of linear warm-up.
        loss: ``"bce"``, ``"dice"`` or ``"bce+dice"``, over labelled pixels only.
        border_weight: w0 of the paper's border weights (0 disables them); ``border_sigma`` their width.
        grad_clip: the gradient norm is clipped to this (0 disables).
        val_every: validate every this many steps (and keep ``best.pt``).
        checkpoint_every: write ``latest.pt`` every this many steps.
        early_stop_patience: validations without improvement before stopping (0 disables).
        max_seconds: a wall-clock budget: training stops when it runs out, and the learning-rate schedule
            follows whichever of steps or time is further along, so a budgeted run still anneals.
        seed: initial weights and patch sampling.
        device: ``auto`` (cuda → mps → cpu), ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        amp: ``auto`` (bf16 on CUDA when supported, else fp16; never on CPU), ``off``, ``bf16``, ``fp16``.
        channels_last: the NHWC memory format (None: on for CUDA).
        tta_validation: validate with the 8 flips/rotations averaged.
        pipeline: where training batches are cut and augmented: ``device`` (torch ops where the network runs,
            :mod:`unet.training.device_batches`), ``host`` (NumPy and SciPy, in worker processes on CUDA,
            :class:`unet.training.data.PatchSampler`), ``auto`` (device on a GPU, host on a CPU).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    steps: int = 2000
    batch_size: int = 4
    patch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    loss: Loss = "bce+dice"
    border_weight: float = 0.0  # w0 of the paper's border weights; 0 disables them
    border_sigma: float = 5.0
    grad_clip: float = 1.0
    val_every: int = 100
    checkpoint_every: int = 100
    early_stop_patience: int = 0  # validations without improvement; 0 disables early stopping
    max_seconds: float | None = None
    seed: int = 0
    device: str = "auto"  # auto (cuda → mps → cpu), cpu, cuda, cuda:1, mps
    amp: Amp = "auto"  # auto = bf16 on CUDA when supported, else fp16 on CUDA; never on CPU
    channels_last: bool | None = None  # None = on for CUDA, off elsewhere
    tta_validation: bool = False
    pipeline: str = "auto"  # where batches are made: auto (device on a GPU, host on a CPU), device, host

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelConfig.from_dict(self.model))
        if isinstance(self.augment, dict):
            object.__setattr__(self, "augment", AugmentConfig.from_dict(self.augment))
        positive_ints = ("steps", "batch_size", "patch_size", "val_every", "checkpoint_every")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < 1):
            raise ValueError(f"TrainConfig.lr must be in (0, 1), got {self.lr!r}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.early_stop_patience < 0:
            raise ValueError("TrainConfig.weight_decay, warmup_steps and early_stop_patience must be >= 0")
        if self.loss not in ("bce", "dice", "bce+dice"):
            raise ValueError(f"TrainConfig.loss must be 'bce', 'dice' or 'bce+dice', got {self.loss!r}")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise ValueError(f"TrainConfig.amp must be auto, off, bf16 or fp16, got {self.amp!r}")
        if self.pipeline not in ("auto", "device", "host"):
            raise ValueError(f"TrainConfig.pipeline must be auto, device or host, got {self.pipeline!r}")
        if self.border_weight < 0 or self.border_sigma <= 0:
            raise ValueError("TrainConfig.border_weight must be >= 0 and border_sigma > 0")
        if self.max_seconds is not None and not (self.max_seconds > 0 and math.isfinite(self.max_seconds)):
            raise ValueError(f"TrainConfig.max_seconds must be a positive number, got {self.max_seconds!r}")
        if self.grad_clip < 0:
            raise ValueError(f"TrainConfig.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        # Fail here, not after minutes of data loading, when the patch cannot go through the network.
        check_input_size(self.model, self.patch_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        if isinstance(data.get("model"), dict):
            data["model"] = ModelConfig.from_dict(data["model"])
        if isinstance(data.get("augment"), dict):
            data["augment"] = AugmentConfig.from_dict(data["augment"])
        return _from_dict(cls, data)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A named recipe, optionally with some knobs changed (``model=`` takes a dict of model changes)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[name]
    model_changes = overrides.pop("model", None)
    if model_changes:
        overrides["model"] = dataclasses.replace(base.model, **model_changes)
    return dataclasses.replace(base, **overrides)


PRESETS: dict[str, TrainConfig] = {
    # Tuned to do well in about 10 minutes on 2 CPU cores (bench/quality.py; figures in docs/benchmarks.md): a narrow,
    # batch-normalised, same-padded network. Width 8 trains 3× more pixels per second than width 16
    # there (0.27 vs 0.09 Mpix/s), which buys more than the extra width does in that time.
    "cpu-quick": TrainConfig(
        model=ModelConfig(depth=4, initial_features=8, padding="same", batch_norm=True),
        steps=1500,
        batch_size=4,
        patch_size=160,
        lr=3e-3,
        warmup_steps=30,
        val_every=100,
        checkpoint_every=100,
        device="cpu",
    ),
    # The brief's full-width network (64 hidden channels, valid padding as in the paper) for a GPU.
    "gpu-full": TrainConfig(
        model=ModelConfig(depth=4, initial_features=64, padding="valid", batch_norm=True),
        steps=6000,
        batch_size=8,
        patch_size=572,
        lr=1e-3,
        warmup_steps=200,
        val_every=250,
        checkpoint_every=250,
        device="auto",
    ),
    # What the app offers by default on a GPU (issue 30): ISBI quality within 8 minutes. A same-padded width-32
    # network (2.0× the width-64 network's steps/s on an H200 in the bench.speed: 24.3 against 12.4 at
    # 8 × 512²), bf16 and channels-last (auto on CUDA), batches made on the device, patches of 256² (a larger
    # batch of smaller patches: more windows, more of the labels seen per second), cosine schedule to the
    # 8 minutes. Chosen from those figures and the CPU recipe's lessons, not yet by a run on a GPU: bench.gpu
    # measures it where one is lent.
    "gpu": TrainConfig(
        model=ModelConfig(depth=4, initial_features=32, padding="same", batch_norm=True),
        steps=20000,
        batch_size=16,
        patch_size=256,
        lr=2e-3,
        warmup_steps=200,
        val_every=500,
        checkpoint_every=500,
        max_seconds=480.0,
        device="auto",
        pipeline="auto",
    ),
    # A few seconds on a CPU: for tests and for trying the app out.
    "tiny": TrainConfig(
        model=ModelConfig(depth=2, initial_features=4, padding="same", batch_norm=True),
        steps=30,
        batch_size=2,
        patch_size=64,
        lr=1e-2,
        warmup_steps=0,
        val_every=10,
        checkpoint_every=10,
        device="cpu",
    ),
}
