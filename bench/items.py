"""Where the tools' annotator of :mod:`bench.loop` works next (issue 29), as a person on Annotate does: a few
actions on one item, save, then the next item.

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

from unet.prediction.review import tile_size

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
