"""Segmentation metrics as plain functions of arrays.

Pixel metrics compare neuron masks; pixels whose target is IGNORE are skipped. Instance metrics are
scikit-image's: Rand-F = 1 − ``adapted_rand_error`` and VI = the sum of the two conditional entropies of
``variation_of_information``; ground-truth label 0 (membrane) is ignored, as in the ISBI 2012 challenge.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import adapted_rand_error, variation_of_information

from unet.labels import IGNORE, NEURON, target_to_instances
from unet.postprocess import instances, to_mask


def _masks(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    valid = target != IGNORE
    return (pred.astype(bool))[valid], (target == NEURON)[valid]


def pixel_error(pred: np.ndarray, target: np.ndarray) -> float:
    """Fraction of labelled pixels whose class is wrong (``pred`` is a 0/1 neuron mask)."""
    p, t = _masks(pred, target)
    return float(np.mean(p != t)) if p.size else float("nan")


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of the neuron class: 2|P∩T| / (|P| + |T|); 1.0 when both are empty."""
    p, t = _masks(pred, target)
    denom = p.sum() + t.sum()
    return float(2 * np.logical_and(p, t).sum() / denom) if denom else 1.0


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of the neuron class; 1.0 when both are empty."""
    p, t = _masks(pred, target)
    union = np.logical_or(p, t).sum()
    return float(np.logical_and(p, t).sum() / union) if union else 1.0


def rand_f(seg: np.ndarray, gt_instances: np.ndarray) -> float:
    """1 − adapted Rand error of a segmentation against ground-truth instances (0 ignored)."""
    error, _, _ = adapted_rand_error(gt_instances, seg, ignore_labels=(0,))
    return float(1.0 - error)


def vi(seg: np.ndarray, gt_instances: np.ndarray) -> float:
    """Variation of information (split + merge, in nats); lower is better."""
    split, merge = variation_of_information(gt_instances, seg, ignore_labels=(0,))
    return float(split + merge)


def pixel_metrics(pred_mask: np.ndarray, target: np.ndarray) -> dict[str, float]:
    return {"pixel_error": pixel_error(pred_mask, target), "dice": dice(pred_mask, target),
            "iou": iou(pred_mask, target)}


def evaluate_slice(prob: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """All metrics of one slice from a neuron probability map and its target."""
    result = pixel_metrics(to_mask(prob), target)
    if np.any(target != IGNORE):
        seg = instances(prob)
        gt = target_to_instances(target)
        result["rand_f"] = rand_f(seg, gt)
        result["vi"] = vi(seg, gt)
    return result


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: float(np.nanmean([r[k] for r in rows if k in r])) for k in keys}
