"""Losses that skip IGNORE pixels. ``logits`` and ``target`` are ``(B, 1, H, W)``; targets hold
NEURON (1), MEMBRANE (0) or IGNORE (2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unet.training.labels import IGNORE


def masked_bce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy averaged over labelled pixels (optionally weighted per pixel)."""
    mask = (target != IGNORE).to(logits.dtype)
    if weights is not None:
        mask = mask * weights
    bce = F.binary_cross_entropy_with_logits(logits, (target == 1).to(logits.dtype), reduction="none")
    return (bce * mask).sum() / mask.sum().clamp_min(1.0)


def masked_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − soft Dice, averaged over the two classes (neuron, membrane) on labelled pixels, so the thin
    membrane class counts as much as the large neuron class."""
    mask = (target != IGNORE).to(logits.dtype)
    prob = torch.sigmoid(logits) * mask
    neuron = (target == 1).to(logits.dtype)
    membrane = (target == 0).to(logits.dtype)
    dims = (0, 2, 3)
    inter_n = (prob * neuron).sum(dims)
    dice_n = (2 * inter_n + eps) / (prob.sum(dims) + neuron.sum(dims) + eps)
    prob_m = (1 - torch.sigmoid(logits)) * mask
    inter_m = (prob_m * membrane).sum(dims)
    dice_m = (2 * inter_m + eps) / (prob_m.sum(dims) + membrane.sum(dims) + eps)
    return 1 - 0.5 * (dice_n + dice_m).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce+dice",
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    logits = logits.float()
    if kind == "bce":
        return masked_bce(logits, target, weights)
    if kind == "dice":
        return masked_dice(logits, target)
    if kind == "bce+dice":
        return masked_bce(logits, target, weights) + masked_dice(logits, target)
    raise ValueError(f"unknown loss {kind!r}")
