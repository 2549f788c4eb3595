"""What the Annotate page says about a live session, and how it turns a live prediction into a mask; kept
out of Streamlit so that plain tests can check it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np

from ui.text import plain
from unet.labels import MEMBRANE, NEURON

REFRESH_S = 2.0  # how often the page looks for a newer live prediction
SCRATCH = 0  # the "Start from" choice of a live session from random weights (checkpoint ids start at 1)


def predicted_mask(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """NEURON where the neuron probability is above ``threshold``, MEMBRANE elsewhere (a full label)."""
    return np.where(probabilities > threshold, NEURON, MEMBRANE).astype(np.uint8)


def viewer_name(owner: str) -> str:
    """A viewer as people read it: the name a user gave (owners are "name:…", or a browser's id)."""
    return owner.split(":", 1)[1] if owner.startswith("name:") else "someone without a name"


def status_text(info: Any, owner: str) -> str:
    """One line: which session, what it does, who shares it."""
    run = info.run
    names = getattr(info, "names", {}) or {}
    others = [plain(names.get(v) or viewer_name(v)) for v in info.viewers if v != owner]  # (shown as Markdown)
    shared = f" · shared with {', '.join(others)}" if others else ""
    if run.status == "QUEUED" and info.paused_for is not None:
        what = f"paused while run #{info.paused_for} trains on {run.device}; it carries on afterwards"
    elif run.status == "QUEUED":
        what = "starting (loading the model and the stack)" if not run.phase.startswith("paused") else run.phase
    elif run.cancel_requested:
        what = "stopping: saving its weights"
    else:
        what = run.phase or "starting"
    return f"Live session #{run.id} ({info.learned} saved mask(s) learned) · {what}{shared}"


def prediction_caption(prediction: Any, now: datetime | None = None) -> str:
    age = ((now or datetime.now(UTC)) - prediction.created).total_seconds()
    return (f"Live prediction of slice {prediction.slice_index}: weights of step {prediction.step:,}, "
            f"{max(0, age):.0f} s ago")
