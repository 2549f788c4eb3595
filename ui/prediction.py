"""What the Predict page shows of a prediction: how far its process is, the slice with the overlays asked
for, and its scores. Plain NumPy over the service's records (read by attribute)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ui.paint import (
    ERROR_COLOURS,
    auto_window,
    blend,
    boundaries,
    error_map,
    heatmap,
    instance_colours,
    overlay,
    window,
)

LAYERS = ("probability", "mask", "membrane contours", "instances", "errors")
METRICS = {"pixel_error": "pixel error", "dice": "Dice", "iou": "IoU", "rand_f": "Rand-F", "vi": "VI",
           # the field's own (unet.metrics): ISBI 2012's of the probability map, CREMI's of the instances
           "v_rand": "V_rand (ISBI)", "v_info": "V_info (ISBI)", "vi_split": "VI split", "vi_merge": "VI merge",
           "are": "adapted Rand error"}


def progress(job: Any) -> tuple[float, str]:
    """(fraction of the whole job done, what it is doing) for a progress bar that counts blocks: a block is
    one slice (or one tile of a slice larger than a tile) through the network, its mask and its neuron
    instances, written as soon as it is done. The worker's phase ``predict <blocks>`` says how many."""
    n = max(1, len(job.slices))
    if job.status == "QUEUED" or (job.status == "RUNNING" and not job.phase):
        return 0.0, "starting (loading the model; a cluster of workers when the stack has several slices)"
    if job.phase.startswith("instances"):  # a prediction of an earlier version, still running
        done = int(job.phase.split()[1].split("/")[0])
        return 0.6 + 0.35 * done / n, f"neuron instances of slice {min(done + 1, n)} of {n}"
    if job.phase.startswith("predict ") and job.phase.split()[1].isdigit():
        total = max(1, int(job.phase.split()[1]))
        what = "a slice, or a tile of a large slice" if total > n else "one slice"
        return min(1.0, job.done / total), f"{job.done} of {total} blocks written (a block is {what})"
    return min(1.0, job.done / n), f"{job.done} of {n} blocks written (a block is one slice)"


def compose(image: np.ndarray, prob: np.ndarray, layers: list[str], opacity: float, *,
            instances: np.ndarray | None = None, target: np.ndarray | None = None,
            threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(the slice alone, the slice with ``layers``) as RGB. "instances" needs ``instances``, "errors" a
    ``target`` (without one the layer is left out)."""
    plain = overlay(window(image, *auto_window(image)), None, 0)
    shown = plain
    mask = prob > threshold
    if "probability" in layers:
        shown = blend(shown, heatmap(prob), opacity)
    if "mask" in layers:
        shown = blend(shown, np.broadcast_to(np.array([0, 200, 255], np.uint8), shown.shape), opacity, where=mask)
    if "instances" in layers and instances is not None:
        shown = blend(shown, instance_colours(instances), opacity)
    if "membrane contours" in layers:
        shown = blend(shown, np.broadcast_to(np.array([255, 255, 0], np.uint8), shown.shape), 1.0,
                      where=boundaries(mask.astype(np.uint8)))
    if "errors" in layers and target is not None:
        for name, where in error_map(prob, target, threshold).items():
            shown = blend(shown, np.broadcast_to(np.array(ERROR_COLOURS[name], np.uint8), shown.shape), 0.8,
                          where=where)
    return plain, shown


def metric_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-slice scores and their mean as table rows."""
    rows = [{"slice": str(s), **{METRICS[k]: round(v, 4) for k, v in m.items() if k in METRICS}}
            for s, m in sorted(metrics["slices"].items(), key=lambda kv: int(kv[0]))]
    rows.append({"slice": "mean", **{METRICS[k]: round(v, 4) for k, v in metrics["mean"].items() if k in METRICS}})
    return rows
