"""What the Predict page shows of a prediction: how far its process is, the slice with the overlays asked
for, and its scores. Plain NumPy over the service's records (read by attribute)."""

from __future__ import annotations

from typing import Any

import numpy as np

from domain.kinds import PredictionStage, RunStatus
from domain.records import PredictionInfo
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
from unet.prediction.metrics import SCORING, mean_metrics
from unet.prediction.postprocess import DEFAULT_METHOD, METHODS
from unet.prediction.review import margin

LAYERS = ("probability", "mask", "membrane contours", "instances", "errors", "uncertainty")
#: How a prediction's neurons are made from its map (unet.prediction.postprocess), the default first.
POSTPROCESS = {
    "agglomerate": "agglomeration (fragments merged along weak membranes)",
    "watershed": "seeded watershed (of the mask's distance transform)",
    "threshold": "threshold (connected components of the mask)",
}
#: Where a prediction computed (its worker says as it starts; earlier ones did not).
DEVICES = {"cpu": "on the CPU", "cuda": "on the GPU", "dask": "on the Dask cluster"}
POSTPROCESS_CHOICES = (DEFAULT_METHOD, *(m for m in METHODS if m != DEFAULT_METHOD))
METRICS = {"pixel_error": "pixel error", "dice": "Dice", "iou": "IoU", "rand_f": "Rand-F", "vi": "VI",
           # the field's own (unet.prediction.metrics): ISBI 2012's of the probability map, CREMI's of the instances
           "v_rand": "V_rand (ISBI)", "v_info": "V_info (ISBI)", "vi_split": "VI split", "vi_merge": "VI merge",
           "are": "adapted Rand error"}


def progress(job: PredictionInfo) -> tuple[float, str]:
    """(fraction of the whole job done, what it is doing) for a progress bar that counts blocks: a block is
    one slice (or one tile of a slice larger than a tile) through the network, its mask and its neuron
    instances, written as soon as it is done. The worker counts them: ``done`` of ``total``."""
    n = max(1, len(job.slices))
    if job.status == RunStatus.QUEUED or (job.status == RunStatus.RUNNING and job.stage == PredictionStage.STARTING):
        return 0.0, "starting (loading the model; a cluster of workers when the stack has several slices)"
    if job.stage == PredictionStage.LINKING:
        return 0.99, ("every block written; linking the slices' neurons into 3D neurons"
                      + ("; stopping" if job.stopping else ""))
    total = job.total or n
    what = "a slice, or a tile of a large slice" if total > n else "one slice"
    stopping = "; stopping after the blocks it is on" if job.stopping else ""
    return min(1.0, job.done / total), f"{job.done} of {total} blocks written (a block is {what}){stopping}"


def speed(job: PredictionInfo) -> str | None:
    """How fast a finished prediction ran (its worker's ``timing``), or None when it did not say."""
    timing = (job.metrics or {}).get("timing") or {}
    try:
        done, seconds, rate = float(timing["slices"]), float(timing["seconds"]), float(timing["slices_per_s"])
    except (KeyError, TypeError, ValueError):
        return None
    where = f" {DEVICES[job.device]}" if job.device in DEVICES else ""
    slices = f"{done:g} slice{'s' if done != 1 else ''}"
    resumed = " (this attempt; the rest were written before it was resumed)" if round(done) < len(job.slices) else ""
    pace = f"{rate:.1f} slices per second" if rate >= 0.1 else f"{1 / max(rate, 1e-9):.0f} s per slice"
    return f"Predicted {slices} in {seconds:.1f} s{where}: {pace}{resumed}."


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
    if "uncertainty" in layers:  # the map's own doubt (with test-time flips, where the eight disagree)
        doubt = np.sqrt(margin(prob))[..., None]
        shown = (shown * (1 - opacity * doubt) + np.array([255, 0, 200]) * opacity * doubt + 0.5).astype(np.uint8)
    if "errors" in layers and target is not None:
        for name, where in error_map(prob, target, threshold).items():
            shown = blend(shown, np.broadcast_to(np.array(ERROR_COLOURS[name], np.uint8), shown.shape), 0.8,
                          where=where)
    return plain, shown


#: The scores shown as cards above the per-slice table (all of METRICS are in the table).
CARDS = ("pixel_error", "rand_f", "v_rand", "v_info", "vi_split", "vi_merge")


def section(image: np.ndarray, neurons: np.ndarray, opacity: float = 0.5, stretch: int = 1) -> np.ndarray:
    """An orthogonal section through the stack (rows are slices) as RGB: the grey image with each 3D
    neuron in its own colour, every slice drawn ``stretch`` rows high so that a thin stack is visible."""
    rgb = blend(overlay(window(image, *auto_window(image)), None, 0), instance_colours(neurons), opacity,
                where=neurons > 0)
    return np.repeat(rgb, max(1, stretch), axis=0)


def sections(volume: Any, neurons: Any, slices: list[int], y: int, x: int, step: int = 1,
             stretch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The XZ section at row ``y`` and the YZ section at column ``x`` through the predicted ``slices``
    (``neurons[i]`` is slice ``slices[i]``), every ``step``-th pixel, read a row or a column at a time."""
    xz = section(np.stack([volume[z, y, ::step] for z in slices]),
                 np.stack([neurons[i, y, ::step] for i in range(len(slices))]), stretch=stretch)
    yz = section(np.stack([volume[z, ::step, x] for z in slices]),
                 np.stack([neurons[i, ::step, x] for i in range(len(slices))]), stretch=stretch)
    return xz, yz


def largest_errors(metrics: dict[str, Any], limit: int = 10) -> list[dict[str, Any]]:
    """The largest merges and splits over all slices, largest first: slice, kind, pixels, parts, box."""
    found = [{"slice": int(z), **e} for z, errors in (metrics.get("errors") or {}).items() for e in errors]
    return sorted(found, key=lambda e: -e["pixels"])[:limit]


def describe_error(error: dict[str, Any]) -> str:
    y0, x0, y1, x1 = error["box"]
    what = (f"merge of {error['parts']} neurons" if error["kind"] == "merge"
            else f"neuron split in {error['parts']}")
    return f"slice {error['slice']}: {what}, {error['pixels']:,} pixels wrong, at rows {y0}-{y1}, columns {x0}-{x1}"


def focus(box: list[int], shape: tuple[int, int]) -> tuple[int, int, int]:
    """Annotate's zoom (1, 2, 4 or 8) and region centre (percent down, across) that show ``box``
    (y0, x0, y1, x1) of a slice of ``shape`` with room around it."""
    y0, x0, y1, x1 = box
    height, width = shape
    zoom = 1
    for z in (2, 4, 8):
        if height / z >= 1.5 * (y1 - y0) and width / z >= 1.5 * (x1 - x0):
            zoom = z
    return zoom, round(100 * (y0 + y1) / 2 / height), round(100 * (x0 + x1) / 2 / width)


def neuron_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The largest 3D neurons as table rows."""
    return [{"neuron": label, "voxels": voxels} for label, voxels in info.get("largest", [])]


def legend_bar(width: int = 256, height: int = 14) -> np.ndarray:
    """The probability overlay's colours from 0 to 1, as a picture to put beside it (RGB uint8)."""
    return np.ascontiguousarray(np.broadcast_to(heatmap(np.linspace(0, 1, width, dtype=np.float32)),
                                                (height, width, 3)))


def seen_word(z: int, trained: set[int], held: set[int]) -> str:
    """Whether the model saw a slice: what a score on it means."""
    if z in trained:
        return "trained on"
    return "held out" if z in held else "never trained on"


def split_scores(metrics: dict[str, Any], trained: set[int]) -> tuple[list[int], dict[str, float], list[int],
                                                                       dict[str, float]]:
    """(slices the model never trained on, their mean; slices it trained on, their mean): the first is the
    model's accuracy, the second flatters it."""
    slices = sorted(int(z) for z in (metrics.get("slices") or {}))
    unseen = [z for z in slices if z not in trained]
    seen = [z for z in slices if z in trained]

    def mean(zs: list[int]) -> dict[str, float]:
        return mean_metrics([metrics["slices"][str(z)] for z in zs]) if zs else {}

    return unseen, mean(unseen), seen, mean(seen)


def slices_words(zs: list[int], verb: str = "") -> str:
    """ "slices 1, 2, 5" (the first 12), "slice 3"; with ``verb`` ("have"), its form for that many ("has")."""
    listed = f"slice{'s' if len(zs) > 1 else ''} {', '.join(map(str, zs[:12]))}{' …' if len(zs) > 12 else ''}"
    if not verb:
        return listed
    return f"{listed} {verb if len(zs) > 1 else {'have': 'has'}.get(verb, verb)}"


def scoring_note(metrics: dict[str, Any]) -> str:
    """What the instance scores count, and the slices that have none (too few neurons outlined whole)."""
    if metrics.get("scoring", 1) != SCORING:
        return ("Scored the earlier way (before Neuroseg counted only the neurons a mask outlines whole, and took "
                "V_rand and V_info as the ISBI 2012 challenge does): its neuron scores may count neurons an "
                "unlabelled area cut in two. Predict again to score it the current way.")
    bare = sorted(int(z) for z, m in (metrics.get("slices") or {}).items() if "rand_f" not in m)
    note = ("Rand-F, VI and the field's scores count the neurons a mask outlines whole: a neuron that touches "
            "unlabelled pixels is left out, and a slice needs two such neurons for them. The means of V_rand and "
            "V_info are ISBI 2012's: at the one threshold best for those slices together (each slice's row: its "
            "own best).")
    if bare:
        note += (f" {slices_words(bare, 'have').capitalize()} pixel scores only: outline two neurons whole (membrane "
                 "all round) to score the neurons there.")
    return note


def metric_rows(metrics: dict[str, Any], trained: set[int] = frozenset(), held: set[int] = frozenset()
                ) -> list[dict[str, Any]]:
    """The per-slice scores, each with whether the model saw the slice, and the means of the slices it
    never trained on and of those it did (none without scores)."""
    if not metrics.get("slices"):
        return []
    rows = [{"slice": str(s), "the model": seen_word(int(s), trained, held),
             **{METRICS[k]: round(v, 4) for k, v in m.items() if k in METRICS}}
            for s, m in sorted(metrics["slices"].items(), key=lambda kv: int(kv[0]))]
    unseen, unseen_mean, seen, seen_mean = split_scores(metrics, trained)
    for label, zs, mean in (("mean, never trained on", unseen, unseen_mean), ("mean, trained on", seen, seen_mean)):
        if zs:
            scored = sum("rand_f" in metrics["slices"][str(z)] for z in zs)
            rows.append({"slice": label, "the model": f"{len(zs)} slice{'s' if len(zs) > 1 else ''}" + (
                         f" (neuron scores: {scored})" if scored != len(zs) else ""),
                         **{METRICS[k]: round(v, 4) for k, v in mean.items() if k in METRICS}})
    return rows
