"""An edit's own history: every change of a draft (:class:`ui.annotation.Draft`) is a :class:`Step` that undo
takes back and redo makes again, stored as compactly as the change allows, within a memory budget."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: How much one draft's undo history may hold (bytes), and how many steps; the oldest steps are forgotten
#: first, but never the newest (an Accept of a whole 4096² slice is ~34 MB). Across a session's drafts,
#: :data:`SESSION_UNDO_BYTES` (the histories of the other slices go first: :func:`trim_histories`).
UNDO_BYTES = 96 * 2**20
UNDO_STEPS = 200
SESSION_UNDO_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Step:
    """One change of a draft: which pixels went from ``before`` to ``after`` (in flat order). ``where`` is
    int32 flat indices for a sparse change (a stroke), or a packed bit mask of the slice for a dense one (an
    Accept, a Discard), whichever is smaller. ``kinds`` = (kind before, kind after) when the change also
    changed what the save will be called (an Accept)."""

    where: np.ndarray
    before: np.ndarray
    after: np.ndarray
    size: int  # pixels in the slice
    kinds: tuple[str, str] | None = None
    tool: str | None = None  # what made it (domain.kinds.Tool): a save records the tools of its steps

    @classmethod
    def between(cls, old: np.ndarray, new: np.ndarray, kinds: tuple[str, str] | None = None,
                tool: str | None = None) -> Step:
        changed = (old != new).ravel()
        n = int(np.count_nonzero(changed))
        where = (np.packbits(changed) if n * 4 > changed.size // 8
                 else np.flatnonzero(changed).astype(np.int32))
        return cls(where, old.ravel()[changed], new.ravel()[changed], changed.size, kinds, tool)

    def indices(self) -> np.ndarray:
        if self.where.dtype == np.uint8:  # packed bits
            return np.flatnonzero(np.unpackbits(self.where, count=self.size))
        return self.where

    @property
    def nbytes(self) -> int:
        return self.where.nbytes + self.before.nbytes + self.after.nbytes

    def apply(self, mask: np.ndarray, backwards: bool = False) -> np.ndarray:
        out = mask.copy()
        out.ravel()[self.indices()] = self.before if backwards else self.after
        out.setflags(write=False)
        return out

    def undoes(self, old: np.ndarray, new: np.ndarray) -> bool:
        """Whether going from ``old`` to ``new`` is exactly this step taken back (or, for a step of the redo
        list, taken again: call it on that step's reverse)."""
        changed = np.flatnonzero(old != new)
        return np.array_equal(changed, self.indices()) and np.array_equal(new.ravel()[changed], self.before)

    def split(self, old: np.ndarray, new: np.ndarray) -> tuple[Step, Step] | None:
        """When going from ``old`` to ``new`` takes back only part of this step (the canvas toolbar's undo of
        one of two strokes that reached the server together): (the part that stays done, the part undone);
        else None."""
        changed = np.flatnonzero(old != new)
        mine = self.indices()
        inside = np.isin(changed, mine, assume_unique=True)
        if not changed.size or not inside.all() or changed.size >= mine.size:
            return None
        at = np.searchsorted(mine, changed)
        if not np.array_equal(new.ravel()[changed], self.before[at]):
            return None
        rest = np.ones(mine.size, bool)
        rest[at] = False
        kept = Step(mine[rest].astype(np.int32), self.before[rest], self.after[rest], self.size, self.kinds,
                    self.tool)
        undone = Step(changed.astype(np.int32), self.before[at], self.after[at], self.size, tool=self.tool)
        return kept, undone

    def reverse(self) -> Step:
        return Step(self.where, self.after, self.before, self.size,
                    None if self.kinds is None else (self.kinds[1], self.kinds[0]), self.tool)
