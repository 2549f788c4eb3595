"""The object tools as the Annotate page offers them (issue 29): their names, how many clicks each takes,
where a click on the canvas lands in the slice, and one call that runs a tool on an edit's mask. The tools
themselves are :mod:`unet.prediction.objects`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from domain.kinds import Tool
from ui.paint import View
from unet.prediction import objects
from unet.prediction.postprocess import segment
from unet.training.labels import IGNORE

BRUSH = "brush"
SPLIT_LINE = "split line"  # (a split drawn as a line: saved as Tool.SPLIT)
#: tool → (what the picker says, how many clicks it takes; 0 for a line drawn on the canvas)
TOOLS: dict[str, tuple[str, int]] = {
    BRUSH: ("Brush", 0), Tool.ACCEPT: ("Accept a neuron", 1), Tool.MERGE: ("Merge two", 2),
    Tool.SPLIT: ("Split (two seeds)", 2), SPLIT_LINE: ("Split along a line", 0), Tool.ERASE: ("Erase a neuron", 1),
    Tool.FILL: ("Fill a region", 1), Tool.DONT_KNOW: ("Don't know (a region)", 1)}
#: tool → its key on the keyboard (Annotate's buttons answer to them)
SHORTCUTS = {BRUSH: "B", Tool.ACCEPT: "A", Tool.MERGE: "M", Tool.SPLIT: "S", SPLIT_LINE: "L", Tool.ERASE: "E",
             Tool.FILL: "F", Tool.DONT_KNOW: "D"}
LINE_POINTS_MAX = 2000  # points of a drawn line that count (a forged path of millions is cut short)


def saved_as(tool: str) -> Tool:
    """What a saved version records for ``tool``."""
    return Tool.SPLIT if tool == SPLIT_LINE else Tool(tool)


def _in_view(y: float, x: float, view: View) -> tuple[int, int]:
    """Display pixel (y, x) of ``view`` as a slice pixel, kept inside the view (clamped before it becomes an
    integer: a forged 1e308 divided by a ratio under 1 is infinite)."""
    yy = min(max(0.0, y / view.ratio), view.h - 1.0)
    xx = min(max(0.0, x / view.ratio), view.w - 1.0)
    return view.y0 + int(yy), view.x0 + int(xx)


def line_points(json_data: dict[str, Any] | None, view: View) -> list[tuple[int, int]]:
    """The last line drawn on the canvas (a free-hand path) as (y, x) pixels of the slice: the end point of
    each of its commands ("M", "L", "Q", …), whose coordinates are the canvas's display pixels of ``view``."""
    objects_sent = json_data.get("objects", []) if isinstance(json_data, dict) else []
    paths = [o for o in objects_sent if isinstance(o, dict) and str(o.get("type", "")).lower() == "path"] \
        if isinstance(objects_sent, list) else []
    if not paths or not isinstance(paths[-1].get("path"), list):
        return []
    points = []
    for command in paths[-1]["path"][:LINE_POINTS_MAX]:
        try:
            x, y = float(command[-2]), float(command[-1])
        except (TypeError, ValueError, OverflowError, IndexError, KeyError):  # (a forged value: no point)
            continue
        if math.isfinite(x) and math.isfinite(y):
            points.append(_in_view(y, x, view))
    return points


def click_points(json_data: dict[str, Any] | None, view: View) -> list[tuple[int, int]]:
    """The canvas's point clicks as (y, x) pixels of the slice. streamlit-drawable-canvas draws a point as a
    circle whose ``left`` sits its radius and half its stroke left of the click and whose ``top`` is the
    click's height, in display pixels of ``view``."""
    points = []
    objects_sent = json_data.get("objects", []) if isinstance(json_data, dict) else []
    for obj in objects_sent if isinstance(objects_sent, list) else []:
        if not isinstance(obj, dict) or str(obj.get("type", "")).lower() != "circle":  # (fabric 6: "Circle")
            continue
        try:  # (the browser sends these: a forged value is skipped, or kept inside the view shown)
            x = float(obj.get("left", 0)) + float(obj.get("radius", 0)) + float(obj.get("strokeWidth", 0)) / 2
            y = float(obj.get("top", 0))
        except (TypeError, ValueError, OverflowError):  # (a forged value: no point)
            continue
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        points.append(_in_view(y, x, view))
    return points


FILL_MOST = 0.5  # of a slice: a Fill or Don't know that would change more is refused (its region leaks)


def run_tool(tool: str, mask: np.ndarray, instances: np.ndarray, prob: np.ndarray, points: list[tuple[int, int]],
             paint: int) -> np.ndarray:
    """``mask`` as ``tool`` leaves it after its clicks ``points`` (y, x) on the neurons ``instances`` of a
    prediction (``prob`` its neuron probabilities; Fill fills with ``paint``). ValueError says what was
    wrong with the clicks."""
    if tool == SPLIT_LINE:
        if len(points) < 2:
            raise ValueError("draw a line across the neuron")
        return objects.split_line(mask, instances, points)
    needed = TOOLS[tool][1]
    if len(points) < needed:
        raise ValueError(f"{TOOLS[tool][0]} takes {needed} click(s)")
    points = points[:needed]
    if tool in (Tool.FILL, Tool.DONT_KNOW):
        out = objects.fill(mask, *points[0], IGNORE if tool == Tool.DONT_KNOW else paint)
        changed = int(np.count_nonzero(out != mask))
        if changed > FILL_MOST * mask.size:  # (a leak, not a region: one click would relabel the slice)
            raise ValueError(f"it would change {changed:,} pixels, {changed / mask.size:.0%} of the slice: the "
                             "region under the click is not closed (nothing painted around it yet, or a gap in "
                             "its outline). Close its outline with the brush first, or take the prediction's "
                             "neuron whole with Accept")
        return out
    labels = [objects.object_at(instances, y, x) for y, x in points]
    if 0 in labels:
        raise ValueError("click inside a neuron of the prediction")
    if tool == Tool.ACCEPT:
        return objects.accept(mask, instances, labels[0], prob=prob)
    if tool == Tool.ERASE:
        return objects.erase(mask, instances, labels[0])
    if tool == Tool.MERGE:
        return objects.merge(mask, instances, labels[0], labels[1])
    if tool == Tool.SPLIT:
        return objects.split_seeds(mask, instances, 1.0 - prob, points)
    raise ValueError(f"{tool!r} is not an object tool")


WHOLE_MAX = 2048 * 2048  # px: a larger live prediction is cut into neurons only around the view shown
HALO = 64  # px of context around the view


def neurons_from(prob: np.ndarray, view: View | None = None) -> np.ndarray:
    """The neurons of a probability map (a live prediction's), as Predict makes them: on a slice larger than
    2048², only in ``view`` and :data:`HALO` pixels around it (0 elsewhere), so a click answers in a second."""
    if view is None or prob.size <= WHOLE_MAX:
        return segment(prob)
    h, w = prob.shape
    y0, x0 = max(0, view.y0 - HALO), max(0, view.x0 - HALO)
    y1, x1 = min(h, view.y0 + view.h + HALO), min(w, view.x0 + view.w + HALO)
    out = np.zeros(prob.shape, np.int32)
    out[y0:y1, x0:x1] = segment(np.asarray(prob[y0:y1, x0:x1]))
    return out


def accept_confident(mask: np.ndarray, instances: np.ndarray, prob: np.ndarray,
                     threshold: float) -> tuple[np.ndarray, list[int]]:
    """Every neuron whose mean probability is at least ``threshold``, accepted (the labels accepted)."""
    return objects.accept_confident(mask, instances, prob, threshold)
