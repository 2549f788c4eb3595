"""Simulated annotators for :mod:`bench.loop`, counted in user actions (issue 29).

- :class:`Brush` paints a disk of true labels at the middle of the largest region predicted wrong: one disk is
  one action (the annotator ``bench.loop`` always had).
- :class:`Tools` uses Annotate's object tools (:mod:`ui.tools`, :mod:`unet.prediction.objects`): each action
  compares the predicted neurons with the true ones where it works and applies the one tool that fixes the
  largest error there: accept a correct neuron, merge the two largest pieces of a split neuron, split a
  merged one along the true border (the membrane a person would draw across it), or erase a false neuron.
  "Largest" counts the pixels the action labels right where the prediction was wrong (the errors it fixes),
  less the pixels it labels wrong, plus 1/20 for each pixel it labels right where the prediction was right
  already: a fixed error weighs as much as twenty confirmed pixels, so a large correct neuron is accepted
  when nothing more wrong is near. Each look at a slice starts with "Accept all confident neurons" (at 0.9,
  Annotate's default) when that gains by the same count, as a person does with a good prediction. A brush
  disk is used only where the prediction shows no neuron to click.
  A split draws what a person draws with "Split along a line": a one-pixel line along the true border (its
  skeleton), widened as the app's line is and kept inside the predicted neuron, so it can be off by a pixel
  or two as a hand-drawn line is.
  Where it works is a tile of the slice: the queue's best tile first (:func:`unet.prediction.review.rank_regions`
  on the live prediction's uncertainty and its fragments), or tiles in random order; a tile with nothing
  left to fix gives way to the next.

:func:`noc` counts the actions until a slice's own Rand-F reaches a target (NoC@0.95, as interactive
segmentation reports NoC@90): the slice's segmentation is the prediction seen, with the edited mask laid
over it (its neurons 1, its membranes 0).

Where the tools' annotator works next, as a person on Annotate does (a few actions on one item, a save, then
the next item; :class:`Round`):

- :class:`Queue` presses **Next** in the app: the dataset's shared queue ranked again by the service
  (:meth:`storage.service.Neuroseg.rank_work`, from the live session's predictions and their uncertainty) at
  the start of each round, then :meth:`~storage.service.Neuroseg.next_work` for each item. An item on a slice
  the annotator may not correct (a held-out slice, which the scorer's views make the session predict) is
  passed over.
- :class:`RandomOrder` takes the same number of items in random order: a random tile of a random slice, each
  tile once before any twice, the tiles the queue's regions are (:func:`unet.prediction.review.tile_size`).

Both give ``(slice, box)`` with box = (y0, x0, h, w); a box that covers the whole slice (the queue's item for a
slice with no prediction yet) leaves the choice of tiles inside it to the annotator.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

from unet.prediction import objects
from unet.prediction.metrics import rand_f
from unet.prediction.postprocess import segment
from unet.prediction.review import rank_regions, suspect_mask, suspects, tile_size
from unet.training.labels import IGNORE, MEMBRANE, NEURON, target_to_instances

MIN_PART = 20  # px: an overlap smaller than this is not a part of a merge or a split
BORDER = 6  # px: the true membrane between two neurons is within this of both
LINE_WIDTH = 1  # px either side of a drawn split line (objects.split_line's default)
CONFIDENT = 0.9  # "Accept all confident neurons" at Annotate's default threshold
CONFIRMED = 0.05  # what a pixel labelled right where the prediction was right already counts (an error fixed: 1)


def wrong_regions(prob: np.ndarray, target: np.ndarray, painted: np.ndarray, k: int,
                  radius: int = 8) -> list[tuple[int, int]]:
    """Where the annotator paints: the middles (the pixels deepest inside) of the largest regions predicted
    wrong and not painted yet, K in all. A region much larger than a disk (a membrane network predicted as
    neuron is one connected region) gets several disks, at least two radii apart, before the next one."""
    wrong = ((prob > 0.5) != (target == NEURON)) & (target != IGNORE) & ~painted
    regions, n = ndi.label(wrong)
    if n == 0:
        return []
    sizes = np.bincount(regions.ravel())[1:]
    depth = ndi.distance_transform_edt(wrong)
    free = np.ones(wrong.shape, bool)
    h, w = wrong.shape
    centres: list[tuple[int, int]] = []
    for label in np.argsort(sizes)[::-1] + 1:
        inside = regions == label
        while len(centres) < k:
            candidates = np.where(inside & free, depth, 0)
            flat = int(np.argmax(candidates))
            if candidates.flat[flat] == 0:
                break
            cy, cx = divmod(flat, w)
            centres.append((cy, cx))
            r = 2 * radius
            free[max(0, cy - r):min(h, cy + r + 1), max(0, cx - r):min(w, cx + r + 1)] = False
            if sizes[label - 1] < 4 * np.pi * radius ** 2:  # a small region: one disk covers it
                break
        if len(centres) >= k:
            break
    return centres


def paint(painted: np.ndarray, centres: list[tuple[int, int]], radius: int) -> None:
    h, w = painted.shape
    yy, xx = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    disk = yy ** 2 + xx ** 2 <= radius ** 2
    for cy, cx in centres:
        y0, y1, x0, x1 = max(0, cy - radius), min(h, cy + radius + 1), max(0, cx - radius), min(w, cx + radius + 1)
        painted[y0:y1, x0:x1] |= disk[y0 - cy + radius:y1 - cy + radius, x0 - cx + radius:x1 - cx + radius]


def corrected(prob: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The prediction seen with the edit laid over it: the mask's neurons 1, its membranes 0."""
    return np.where(mask == NEURON, 1.0, np.where(mask == MEMBRANE, 0.0, prob)).astype(np.float32)


class Brush:
    """A disk of true labels (radius ``radius``) at the middle of the largest region still predicted wrong."""

    name = "brush"

    def __init__(self, target: np.ndarray, radius: int = 8):
        self.target, self.radius = target, radius
        self.painted = np.zeros(target.shape, bool)

    def begin(self, prob: np.ndarray, uncertainty: np.ndarray | None = None) -> None:
        self.prob = prob

    def act(self, mask: np.ndarray) -> np.ndarray | None:
        centres = wrong_regions(corrected(self.prob, mask), self.target, self.painted, 1, self.radius)
        if not centres:
            return None
        paint(self.painted, centres, self.radius)
        return np.where(self.painted, self.target, mask).astype(np.uint8)


class Tools:
    """The object tools, working where the queue says (``where="queue"``) or at random (``"random"``)."""

    name = "tools"

    def __init__(self, target: np.ndarray, where: str = "queue", seed: int = 0, tile: int | None = None,
                 radius: int = 8):
        if where not in ("queue", "random"):
            raise ValueError(f"where is queue or random, not {where!r}")
        self.target, self.where, self.radius = target, where, radius
        self.gt = target_to_instances(target)
        self.gt_areas = np.bincount(self.gt.ravel())
        self.gt_boxes = ndi.find_objects(self.gt)
        self.valid = target != IGNORE
        self.rng = np.random.default_rng(seed)
        self.tile = tile or tile_size(target.shape)

    def begin(self, prob: np.ndarray, uncertainty: np.ndarray | None = None,
              box: tuple[int, int, int, int] | None = None) -> None:
        """A new look at the slice: the prediction shown, its neurons, and the order of the tiles (only ``box``,
        an item of :mod:`bench.items`, when it is given and smaller than the slice)."""
        self.prob, self.confident_tried = prob, False
        self.instances = segment(prob)
        self.areas = np.bincount(self.instances.ravel())
        self.boxes = ndi.find_objects(self.instances)
        self.boundary = 1.0 - prob
        wrong = (prob > 0.5) != (self.target == NEURON)
        self.wrong = wrong
        if box is not None and (box[2], box[3]) != prob.shape:
            self.tiles = [box]
        elif self.where == "queue":
            u = uncertainty if uncertainty is not None else 1.0 - np.abs(2.0 * prob - 1.0)
            found = suspects(self.instances)
            tiles = rank_regions(u, suspect_mask=suspect_mask(self.instances, found),
                                 suspect_labels=self.instances, tile=self.tile,
                                 objects=self.instances)
            self.tiles = [(t.y0, t.x0, t.h, t.w) for t in tiles]
        else:
            h, w = prob.shape
            self.tiles = [(y, x, min(self.tile, h - y), min(self.tile, w - x))
                          for y in range(0, h, self.tile) for x in range(0, w, self.tile)]
            self.rng.shuffle(self.tiles)

    def gain(self, before: np.ndarray, after: np.ndarray) -> float:
        """Errors fixed (pixels the action labels right where the prediction was wrong) + :data:`CONFIRMED` ×
        pixels confirmed (labelled right where it was right already) − pixels labelled wrong."""
        changed = after != before
        if not changed.any():
            return 0.0
        right_after = (after[changed] == self.target[changed]) & self.valid[changed]
        right_before = (before[changed] == self.target[changed]) & self.valid[changed]
        wrong_after = (after[changed] != IGNORE) & ~right_after & self.valid[changed]
        wrong_pred = self.wrong[changed]
        newly = right_after & ~right_before
        return float((newly & wrong_pred).sum() - wrong_after.sum() + CONFIRMED * (newly & ~wrong_pred).sum())

    def candidates(self, mask: np.ndarray, box: tuple[int, int, int, int]):
        """(tool, the mask after it) for each action a person would consider for the neurons in ``box``."""
        y0, x0, h, w = box
        inst, gt, target = self.instances, self.gt, self.target
        here = (slice(y0, y0 + h), slice(x0, x0 + w))
        labels = [int(k) for k in np.unique(inst[here]) if k]
        for k in labels:
            obj_box = self.boxes[k - 1]
            if obj_box is None:
                continue
            inside = inst[obj_box] == k
            area = int(inside.sum())
            membrane = int((inside & (target[obj_box] == MEMBRANE)).sum())
            parts, counts = np.unique(gt[obj_box][inside], return_counts=True)
            real = [(int(g), int(c)) for g, c in zip(parts, counts, strict=True)
                    if g and c >= MIN_PART and c >= 0.05 * area]
            if membrane >= 0.5 * area:
                yield "erase", objects.erase(mask, inst, k)
            elif len(real) >= 2:  # a merge: the true border of its two largest neurons, drawn as membrane
                (a, _), (b, _) = sorted(real, key=lambda gc: -gc[1])[:2]
                yield "split", self.border(mask, obj_box, inside, a, b)
            elif len(real) == 1:
                g, overlap = real[0]
                if overlap >= 0.8 * area and overlap >= 0.6 * self.gt_areas[g]:
                    yield "accept", objects.accept(mask, inst, k, prob=self.prob)
        for g in (int(v) for v in np.unique(gt[here]) if v):  # splits: one true neuron, several pieces
            g_box = self.gt_boxes[g - 1]
            pieces, counts = np.unique(inst[g_box][gt[g_box] == g], return_counts=True)
            real = sorted(((int(c), int(p)) for p, c in zip(pieces, counts, strict=True)
                           if p and c >= MIN_PART and c >= 0.5 * self.areas[p]), reverse=True)
            if len(real) >= 2:
                try:
                    yield "merge", objects.merge(mask, inst, real[0][1], real[1][1])
                except ValueError:  # (the two largest pieces do not touch)
                    continue

    def border(self, mask: np.ndarray, box, inside: np.ndarray, a: int, b: int) -> np.ndarray:
        """The line a person draws across a merged neuron: the true membrane between true neurons ``a`` and
        ``b`` (within :data:`BORDER` px of both), inside the merged neuron (grown by a pixel)."""
        gt = self.gt[box]
        near = ndi.binary_dilation(gt == a, iterations=BORDER) & ndi.binary_dilation(gt == b, iterations=BORDER)
        band = near & ndi.binary_dilation(inside, iterations=1) & (self.target[box] == MEMBRANE)
        line = ndi.binary_dilation(skeletonize(band), iterations=LINE_WIDTH) & inside  # (as objects.split_line)
        out = mask.copy()
        out[box][line] = MEMBRANE
        return out

    def disk(self, mask: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray | None:
        """The brush, which the picker offers too, for when no object tool helps in ``box``: a disk of true
        labels at the middle of its largest region still wrong once the edit is laid over the prediction (a
        prediction from random weights has no neurons to click)."""
        y0, x0, h, w = box
        elsewhere = np.ones(mask.shape, bool)
        elsewhere[y0:y0 + h, x0:x0 + w] = False
        centres = wrong_regions(corrected(self.prob, mask), self.target, elsewhere | (mask != IGNORE), 1,
                                self.radius)
        if not centres:
            return None
        disk = np.zeros(mask.shape, bool)
        paint(disk, centres, self.radius)
        return np.where(disk, self.target, mask).astype(np.uint8)

    def no_neurons(self, box: tuple[int, int, int, int]) -> bool:
        """Whether the prediction shows no neuron to click in ``box``: none at all, or only one that covers
        most of the slice (what an untrained network's map turns into)."""
        y0, x0, h, w = box
        labels = [int(k) for k in np.unique(self.instances[y0:y0 + h, x0:x0 + w]) if k]
        return not labels or all(self.areas[k] > 0.5 * self.instances.size for k in labels)

    def act(self, mask: np.ndarray) -> np.ndarray | None:
        """One action: "Accept all confident neurons" first, when it fixes more than it breaks (once a look);
        then the best object tool in the first tile that still has something to fix, or a brush disk
        there when the prediction shows no neuron in it (None: nothing left anywhere)."""
        if not self.confident_tried:  # (what a person does first with a good prediction: one click)
            self.confident_tried = True
            after, chosen = objects.accept_confident(mask, self.instances, self.prob, CONFIDENT)
            if chosen and self.gain(mask, after) > 0:
                self.last_tool = "accept confident"
                return after
        while self.tiles:
            best, best_gain = None, 0.0
            for tool, after in self.candidates(mask, self.tiles[0]):
                g = self.gain(mask, after)
                if g > best_gain:
                    best, best_gain, self.last_tool = after, g, tool
            if best is None and self.no_neurons(self.tiles[0]):  # (nothing to click: the brush)
                disk = self.disk(mask, self.tiles[0])
                if disk is not None and self.gain(mask, disk) > 0:
                    best, self.last_tool = disk, "brush"
            if best is not None:
                return best
            self.tiles.pop(0)
        return None


def slice_rand_f(prob: np.ndarray, mask: np.ndarray, gt: np.ndarray) -> float:
    return rand_f(segment(corrected(prob, mask)), gt)


def noc(make, prob: np.ndarray, uncertainty: np.ndarray | None, target: np.ndarray, mask: np.ndarray,
        goal: float = 0.95, cap: int = 30) -> int | None:
    """Actions until the slice's own Rand-F reaches ``goal`` (0 when it already does), by a fresh annotator
    ``make()`` on a copy of ``mask``; None when ``cap`` actions (or running out of things to fix) do not."""
    gt = target_to_instances(target)
    annotator = make()
    annotator.begin(prob, uncertainty)
    mask = mask.copy()
    for n in range(cap + 1):
        if slice_rand_f(prob, mask, gt) >= goal:
            return n
        if n == cap:
            break
        after = annotator.act(mask)
        if after is None:
            break
        mask = after
    return None


# --- where the tools' annotator works next ---------------------------------------------------------------
Box = tuple[int, int, int, int]


class Queue:
    """Next, as the app gives it, restricted to the slices in ``allowed``."""

    name = "queue"

    def __init__(self, svc, dataset_id: int, allowed: list[int], owner: str = "annotator"):
        self.svc, self.ds, self.allowed, self.owner = svc, dataset_id, set(allowed), owner
        self.passed = 0  # items on slices the annotator may not correct

    def rank(self) -> None:
        self.svc.rank_work(self.ds)

    def next(self) -> tuple[int, Box] | None:
        while (item := self.svc.next_work(self.ds, self.owner)) is not None:
            if item.slice_index in self.allowed:
                return item.slice_index, item.box
            self.passed += 1  # (taken and left: Next offers it again only when nothing else is open)
        return None


class RandomOrder:
    """A random tile of a random slice in ``allowed``; every tile once before any twice."""

    name = "random"

    def __init__(self, allowed: list[int], shape: tuple[int, int], seed: int = 0):
        self.rng = np.random.default_rng(seed)
        h, w = shape
        t = tile_size(shape)
        self.all = [(z, (y, x, min(t, h - y), min(t, w - x))) for z in allowed
                    for y in range(0, h, t) for x in range(0, w, t)]
        self.left: list[tuple[int, Box]] = []

    def rank(self) -> None:
        pass

    def next(self) -> tuple[int, Box] | None:
        if not self.left:
            self.left = [self.all[i] for i in self.rng.permutation(len(self.all))]
        return self.left.pop()


class Round:
    """One round of the tools' annotator: every slice it may correct looked at afresh (the live session predicts
    them all, with their uncertainty: what the queue ranks from; random order looks as well, so both leave the
    session the same time to train), then items from ``picker`` until ``k`` actions: at most ``per_item`` on
    each, then a save (which marks a queue item done) and the next. Counts the tools used in ``used``."""

    def __init__(self, svc, run_id: int, dataset_id: int, slices: list[int], picker, wait, save, fresh):
        self.svc, self.run_id, self.ds, self.slices, self.picker = svc, run_id, dataset_id, slices, picker
        self.wait, self.save, self.fresh = wait, save, fresh
        self.used: dict[str, int] = {}

    def look(self, since: float) -> dict:
        for z in self.slices:
            self.svc.live_see(self.run_id, f"queue-{z}", z)
        seen = {z: self.wait(f"a live prediction of slice {z}", self.fresh(z, since)) for z in self.slices}
        for z in self.slices:
            self.svc.live_leave(self.run_id, f"queue-{z}")
        return seen

    def run(self, masks: dict, make, since: float, k: int, per_item: int, max_empty: int = 100):
        """``make(z)``: a fresh annotator for slice z. Returns (the first item's slice, its mask before, its live
        prediction, the last item's slice, the version saved there, the actions taken)."""
        seen = self.look(since)
        self.picker.rank()
        first, saved, last, actions, empty = None, None, None, 0, 0
        self.used = {}
        while actions < k and empty < max_empty:
            nxt = self.picker.next()
            if nxt is None:
                break
            z, box = nxt
            annotator = make(z)
            annotator.begin(seen[z].probabilities, seen[z].uncertainty, box)
            before, n = masks[z], 0
            while n < min(per_item, k - actions):
                after = annotator.act(masks[z])
                if after is None:
                    break
                masks[z], n = after, n + 1
                self.used[annotator.last_tool] = self.used.get(annotator.last_tool, 0) + 1
            if n == 0:  # (nothing to fix there: Next)
                empty += 1
                continue
            self.svc.live_see(self.run_id, "annotator", z, None if (box[2], box[3]) == masks[z].shape else box)
            saved, last = self.save(z, masks[z]), z
            actions += n
            if first is None:
                first = (z, before, seen[z])
        if first is None:
            raise RuntimeError("the annotator found nothing to fix anywhere")
        return (*first, last, saved, actions)
