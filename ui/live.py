"""What the Annotate page says about a live session, and how it turns a live prediction into a mask; kept
out of Streamlit so that plain tests can check it."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from domain.kinds import RunStatus
from domain.live import LiveInfo, LivePrediction, Region
from ui.paint import boundaries, heatmap
from ui.text import plain
from unet.training.labels import MEMBRANE, NEURON

REFRESH_S = 2.0  # how often the page looks for a newer live prediction
SCRATCH = 0  # the "Start from" choice of a live session from random weights (checkpoint ids start at 1)


def predicted_mask(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """NEURON where the neuron probability is above ``threshold``, MEMBRANE elsewhere (a full label)."""
    return np.where(probabilities > threshold, NEURON, MEMBRANE).astype(np.uint8)


#: How the live prediction can be laid over the canvas, as the page offers them.
OVERLAYS = {"outlines": "outlines (yellow: where it puts membranes)", "membranes": "membranes (yellow fill)",
            "probability": "probability (heatmap)", "uncertainty": "uncertainty (where to look)"}
_YELLOW = (255, 230, 0)
_MAGENTA = (255, 0, 200)


def overlay_picture(probabilities: np.ndarray, how: str, opacity: float, threshold: float = 0.5,
                    uncertainty: np.ndarray | None = None) -> np.ndarray:
    """The live prediction as an RGBA picture to lay over the canvas (the slice and the user's mask show
    through): "outlines" draws the edges of the predicted neurons, "membranes" fills what it calls membrane,
    "probability" is the heatmap, "uncertainty" paints magenta where the prediction is unsure (how much the
    last weights changed it: the more, the more opaque); ``opacity`` (the page's mask opacity) sets how much
    it covers."""
    prob = np.asarray(probabilities, np.float32)
    rgba = np.zeros((*prob.shape, 4), np.uint8)
    alpha = round(255 * min(1.0, max(0.0, opacity)))
    if how == "uncertainty":
        doubt = np.clip(np.asarray(uncertainty if uncertainty is not None else 1 - np.abs(2 * prob - 1), np.float32),
                        0, 1)
        rgba[..., :3] = _MAGENTA
        rgba[..., 3] = np.round(np.sqrt(doubt) * max(alpha, 160)).astype(np.uint8)  # (small doubts still show)
        return rgba
    if how == "probability":
        rgba[..., :3] = heatmap(prob)
        rgba[..., 3] = alpha
        return rgba
    where = boundaries((prob > threshold).astype(np.uint8)) if how == "outlines" else prob <= threshold
    rgba[where] = (*_YELLOW, max(alpha, 200) if how == "outlines" else alpha)
    return rgba


def under(rgb: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    """``rgba`` laid over ``rgb`` (both of one shape), as the browser lays the overlay over the canvas."""
    a = rgba[..., 3:].astype(np.float32) / 255
    return (rgb * (1 - a) + rgba[..., :3] * a + 0.5).astype(np.uint8)


def predicted_region(prediction: LivePrediction, asked: Region | None) -> Region | None:
    """Where an Accept may copy a live prediction: ``asked`` (None: the whole slice), cut to the region the
    session has predicted when it has never predicted the rest of the slice (``partial``: those pixels read
    0.5, not an answer). A width or height of 0 means nothing there is predicted yet."""
    if not prediction.partial or prediction.region is None:
        return asked
    py0, px0, ph, pw = prediction.region
    if asked is None:
        return prediction.region
    y0, x0 = max(asked[0], py0), max(asked[1], px0)
    y1, x1 = min(asked[0] + asked[2], py0 + ph), min(asked[1] + asked[3], px0 + pw)
    return (y0, x0, max(0, y1 - y0), max(0, x1 - x0))


def viewer_name(owner: str) -> str:
    """A viewer as people read it: the name a user gave (owners are "name:…", or a browser's id)."""
    return owner.split(":", 1)[1] if owner.startswith("name:") else "someone without a name"


def status_text(info: LiveInfo, owner: str) -> str:
    """One line: which session, what it does, who shares it."""
    run = info.run
    names = getattr(info, "names", {}) or {}
    others = [plain(names.get(v) or viewer_name(v)) for v in info.viewers if v != owner]  # (shown as Markdown)
    shared = f" · shared with {', '.join(others)}" if others else ""
    if run.status == RunStatus.QUEUED and info.paused_for is not None:
        what = f"paused while run #{info.paused_for} trains on {run.device}; it carries on afterwards"
    elif run.status == RunStatus.QUEUED:
        what = run.phase or "starting (loading the model and the stack)"  # ("waiting for the device", "paused…")
    elif run.cancel_requested:
        what = "stopping: saving its weights"
    else:
        what = run.phase or "starting"
    masks = f"{info.learned} saved mask{'s' if info.learned != 1 else ''}"
    return f"Live session #{run.id} ({masks} learned) · {what}{shared}"


def prediction_caption(prediction: LivePrediction, now: datetime | None = None) -> str:
    age = ((now or datetime.now(UTC)) - prediction.created).total_seconds()
    region = prediction.region
    return (f"Live prediction of slice {prediction.slice_index}: weights of step {prediction.step:,}, "
            f"{max(0, age):.0f} s ago" + (" (the zoomed region first; the rest of the slice follows when "
                                          "the session has nothing else to do)" if region else ""))
