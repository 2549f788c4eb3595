"""One segmentation pipeline, used by ``python -m unet predict`` and by the app's prediction process:
network → neuron probabilities → mask (0/255) → neuron instances (:func:`unet.prediction.postprocess.segment` per
slice), scored against whatever labelled slices the caller has, written as ImageJ TIFFs under the same file
names everywhere."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet.exchange.writing import write_tiff_atomic
from unet.network.model import UNet
from unet.prediction.infer import iter_predict_stack
from unet.prediction.metrics import evaluate_slice, mean_metrics
from unet.prediction.postprocess import DEFAULT_METHOD, segment, to_mask

#: The outputs of a segmentation, in the order they are written; each is saved as ``<name>.tif``.
OUTPUTS = ("probabilities", "mask", "instances")
GPU_TOGETHER = 8  # slices predicted at once on a GPU, their tiles sharing the batches
GPU_BATCH = 16  # tiles per forward pass on a GPU

#: ``progress(stage, done, total)``: stage "predict" (slices through the network), "instances" (watershed).
Progress = Callable[[str, int, int], None]


def output_file(name: str) -> str:
    """The file name of one output: ``probabilities.tif``, ``mask.tif``, ``instances.tif``."""
    if name not in OUTPUTS:
        raise ValueError(f"unknown output {name!r}; one of {OUTPUTS}")
    return f"{name}.tif"


@dataclass
class Segmentation:
    """The outputs of :func:`segment_stack` for ``slices`` of a stack, each of shape (len(slices), Y, X)."""

    slices: list[int]
    probabilities: np.ndarray  # float32 in [0, 1], neuron probability
    mask: np.ndarray  # uint8, 255 = neuron, 0 = membrane
    instances: np.ndarray | None  # int32 neuron ids from 1 (None when not asked for)
    metrics: dict[str, Any] | None  # {"slices": {"z": {metric: value}}, "mean": {...}} where labels were given

    def outputs(self) -> dict[str, np.ndarray]:
        out = {"probabilities": self.probabilities, "mask": self.mask, "instances": self.instances}
        return {name: out[name] for name in OUTPUTS if out[name] is not None}

    def write(self, folder: str | os.PathLike, pixel_size_nm: float | None = None) -> dict[str, Path]:
        """Write every output into ``folder`` as an ImageJ TIFF (Fiji opens it as Z slices)."""
        return {name: write_tiff_atomic(Path(folder) / output_file(name), data, pixel_size_nm=pixel_size_nm)
                for name, data in self.outputs().items()}


def segment_stack(model: UNet, volume: np.ndarray, slices: list[int] | None = None, *,
                  targets: Mapping[int, np.ndarray] | None = None, threshold: float = 0.5,
                  with_instances: bool = True, progress: Progress | None = None,
                  device: torch.device | None = None, postprocess: str = DEFAULT_METHOD,
                  **predict_options: Any) -> Segmentation:
    """Segment slices of a stack.

    Args:
        model: a trained :class:`~unet.network.model.UNet` (``Checkpoint.build_model``).
        volume: the stack, (Z, Y, X) or one (Y, X) slice, any dtype the engine reads.
        slices: which slices, in this order; all by default.
        targets: {slice: target} of labelled slices (0 membrane, 1 neuron, 2 unlabelled), to score
            each predicted slice that has one (pixel error, Dice, IoU, Rand-F, VI).
        threshold: the neuron probability above which a pixel is neuron (the mask).
        with_instances: also make neuron instances (on a CPU it takes about as long as the network).
        postprocess: how (:data:`unet.prediction.postprocess.METHODS`), with the parameters chosen on ISBI 2012.
        progress: told ``(stage, done, total)`` after each slice of each stage.
        device: where the network runs (the model's device by default).
        **predict_options: passed to :func:`unet.prediction.infer.predict_slice` (``tile``, ``tta``, ``should_stop``).

    Returns:
        A :class:`Segmentation`; ``.write(folder)`` saves it.
    """
    if volume.ndim == 2:
        volume = volume[None]
    chosen = list(slices) if slices is not None else list(range(volume.shape[0]))
    report = progress or (lambda _stage, _done, _total: None)
    targets = targets or {}
    probs = np.empty((len(chosen), *volume.shape[1:]), np.float32)
    scores: dict[str, dict[str, float]] = {}
    report("predict", 0, len(chosen))
    where = torch.device(device) if device is not None else next(model.parameters()).device
    if where.type == "cuda":  # fill the GPU: tiles of several slices in each batch (issue 30)
        predict_options.setdefault("together", GPU_TOGETHER)
        predict_options.setdefault("batch_size", GPU_BATCH)
    for i, (z, prob) in enumerate(iter_predict_stack(model, volume, chosen, device=device, **predict_options)):
        probs[i] = prob
        if z in targets:
            scores[str(z)] = evaluate_slice(prob, targets[z], method=postprocess)  # (at 0.5, as in training)
        report("predict", i + 1, len(chosen))
    labels = None
    if with_instances:
        labels = np.empty(probs.shape, np.int32)
        for i, p in enumerate(probs):
            report("instances", i, len(chosen))
            labels[i] = segment(p, postprocess)
        report("instances", len(chosen), len(chosen))
    metrics = {"slices": scores, "mean": mean_metrics(list(scores.values()))} if scores else None
    return Segmentation(chosen, probs, to_mask(probs, threshold) * np.uint8(255), labels, metrics)
