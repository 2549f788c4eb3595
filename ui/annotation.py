"""The state of an edit on the Annotate page, kept out of Streamlit so that plain tests can drive it.

A :class:`Draft` is one slice being edited: the mask it started from, the mask as it is now, and the view the
canvas shows. The canvas returns all strokes drawn since it was mounted; ``apply`` merges them into the mask
the canvas was mounted over (``view_base``), so undo and redo in the canvas's toolbar just work. When the view
changes (zoom, region), the strokes so far are baked into the mask and the canvas starts empty over the new
view (a new ``canvas_key``). Every change of the edit is also kept as a step of the draft's own history
(``undo``/``redo``), which outlives the canvas: a change of zoom, region or opacity, a visit to another slice,
an Accept or a Discard can all be undone, and the canvas toolbar's undo walks the same history (a stroke
undone there is a step back, not a new change). Drafts live in the browser session and, as the user paints, in
the store (``revision`` counts the changes, so the page keeps each one once): going to another slice or page,
reloading or opening a new tab loses nothing."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from domain.kinds import MaskKind, RunStatus, Tool
from domain.records import DraftStart, MaskInfo, PredictionInfo, StoredDraft
from ui.history import SESSION_UNDO_BYTES, UNDO_BYTES, UNDO_STEPS, Step
from ui.paint import View, decode_strokes, merge_strokes
from unet.training.labels import IGNORE


def kind_after_edit(source: str, source_kind: str | None) -> MaskKind:
    """The kind of the version a save makes: painting over a prediction (or over a corrected one) is
    "predicted→painted"; painting on nothing, or adding to a scribble, stays a "scribble"."""
    if source == "prediction" or source_kind in (MaskKind.PREDICTED, MaskKind.CORRECTED):
        return MaskKind.CORRECTED
    if source == "nothing" or source_kind == MaskKind.SCRIBBLE:
        return MaskKind.SCRIBBLE
    return MaskKind.PAINTED


@dataclass(frozen=True)
class StartOption:
    """One thing an edit of a slice can start from, as the "Start from" choice lists it."""

    source: str  # latest | uploaded | prediction | nothing
    label: str
    mask_id: int | None
    prediction_id: int | None = None


def start_options(history: Sequence[MaskInfo], predictions: Sequence[PredictionInfo],
                  slice_index: int) -> list[StartOption]:
    """What an edit of a slice can start from, best first: its latest version, the uploaded labels (when
    edited since), the newest finished prediction of the slice, or nothing. ``history`` is the slice's
    mask versions (oldest first; ``id``, ``version``, ``kind``), ``predictions`` the dataset's (``id``,
    ``run_id``, ``status``, ``slices``)."""
    options = []
    if history:
        last = history[-1]
        options.append(StartOption("latest", f"latest version (v{last.version}, {last.kind})", last.id))
    uploaded = [m for m in history if m.kind == MaskKind.UPLOADED]
    if uploaded and uploaded[-1].id != (history[-1].id if history else None):
        options.append(StartOption("uploaded", f"uploaded labels (v{uploaded[-1].version})", uploaded[-1].id))
    for p in reversed(predictions):
        if p.status == RunStatus.FINISHED and slice_index in p.slices:
            options.append(StartOption("prediction", f"prediction #{p.id} (run {p.run_id})", None, p.id))
            break
    options.append(StartOption("nothing", "nothing (scribble: only painted pixels count)", None))
    return options


def history_rows(history: Sequence[MaskInfo]) -> list[dict[str, Any]]:
    """A slice's mask versions as table rows, newest first, each saying what it came from."""
    by_id = {m.id: m for m in history}
    return [{"version": f"v{m.version}", "kind": m.kind, "author": m.author, "labelled pixels": m.labelled_pixels,
             "from": (f"restores v{by_id[m.restored_from_id].version}" if m.restored_from_id in by_id
                      else f"v{by_id[m.parent_id].version}" if m.parent_id in by_id else ""),
             "tools": ", ".join(m.tools), "saved": m.created.strftime("%Y-%m-%d %H:%M:%S")} for m in reversed(history)]


def trim_histories(drafts: Sequence[Draft], keep: Draft, budget: int = SESSION_UNDO_BYTES) -> None:
    """Forget the undo histories of other drafts (the earliest opened first) until a session's drafts hold
    at most ``budget`` bytes of history; ``keep``'s (the slice on screen) is never forgotten here."""
    total = sum(d.history_bytes for d in drafts)
    for d in drafts:
        if total <= budget:
            return
        if d is not keep and (d.done or d.undone):
            total -= d.history_bytes
            d.forget_history()


@dataclass
class Draft:
    dataset_id: int
    slice_index: int
    source: str
    source_mask_id: int | None  # the version the edit started from: the saved version's parent
    latest_id: int | None  # the slice's latest version when the edit began: a save checks it is still so
    kind: str
    original: np.ndarray
    working: np.ndarray = field(init=False)
    view_base: np.ndarray = field(init=False)
    view: View | None = None
    generation: int = 0
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    prediction_id: int | None = None  # the prediction whose neurons the object tools act on (the start, or Next's)
    revision: int = 0  # bumped whenever ``working`` changes
    kept_as: str = ""  # the token of the draft in the store this edit last kept or loaded (see DraftClash)
    forgotten_tools: set[str] = field(default_factory=set)  # the tools of steps the history had to forget
    done: list[Step] = field(default_factory=list, repr=False)  # the steps that undo takes back, newest last
    undone: list[Step] = field(default_factory=list, repr=False)  # the steps that redo takes again

    def __post_init__(self) -> None:
        self.original = np.ascontiguousarray(self.original, dtype=np.uint8)
        self.original.setflags(write=False)
        self.working = self.original
        self.view_base = self.original

    @classmethod
    def blank(cls, dataset_id: int, slice_index: int, shape: tuple[int, int], latest_id: int | None) -> Draft:
        return cls(dataset_id, slice_index, "nothing", None, latest_id, MaskKind.SCRIBBLE,
                   np.full(shape, IGNORE, np.uint8))

    @classmethod
    def begin(cls, start: DraftStart) -> Draft:
        """A new edit from what the service says it starts from (``Neuroseg.draft_start``)."""
        kind = kind_after_edit(start.source, start.source_kind)
        return cls(start.dataset_id, start.slice_index, start.source, start.source_mask_id, start.latest_id, kind,
                   start.mask, prediction_id=start.prediction_id)

    @classmethod
    def from_stored(cls, stored: StoredDraft) -> Draft:
        """An edit kept in the store (``Neuroseg.stored_draft``), as it was left."""
        draft = cls.restored(stored.dataset_id, stored.slice_index, stored.source, stored.source_mask_id,
                             stored.latest_id, stored.kind, stored.original, stored.working, stored.prediction_id)
        draft.kept_as = stored.token
        draft.forgotten_tools |= set(stored.tools)  # (its undo history stayed in the tab it was made in)
        return draft

    @classmethod
    def restored(cls, dataset_id: int, slice_index: int, source: str, source_mask_id: int | None,
                 latest_id: int | None, kind: str, original: np.ndarray, working: np.ndarray,
                 prediction_id: int | None = None) -> Draft:
        """A draft kept in the store, as it was left."""
        draft = cls(dataset_id, slice_index, source, source_mask_id, latest_id, kind, original,
                    prediction_id=prediction_id)
        edit = np.ascontiguousarray(working, dtype=np.uint8)
        edit.setflags(write=False)
        draft.working = draft.view_base = edit
        return draft

    @property
    def canvas_key(self) -> str:
        """Unique per draft and canvas mount: a new key is a new, empty canvas."""
        return f"canvas-{self.uid}-{self.generation}"

    @property
    def changed_pixels(self) -> int:
        return int(np.count_nonzero(self.working != self.original))

    @property
    def dirty(self) -> bool:
        return self.changed_pixels > 0

    def set_view(self, view: View) -> bool:
        """Show ``view``; when it differs from the current one, bake the strokes and start a new canvas.
        Returns whether the canvas changed."""
        if view == self.view:
            return False
        self.view_base = self.working
        self.view = view
        self.generation += 1
        return True

    def remount(self) -> None:
        """The canvas lost its strokes (it was off screen): keep them in the mask it will show."""
        if self.working is not self.view_base:
            self.view_base = self.working
            self.generation += 1

    def apply_canvas(self, data_url: object) -> None:
        """The canvas's strokes as it sends them (a PNG data URL): decoded only when it is a PNG of the canvas's
        own size (:func:`ui.paint.decode_strokes`), else ignored."""
        if self.view is None:
            raise RuntimeError("set_view before applying strokes")
        self.apply(decode_strokes(data_url, self.view.display_shape))

    def apply(self, rgba: np.ndarray | None) -> None:
        """The canvas's strokes (all of them since it was mounted, RGBA in display pixels)."""
        if self.view is None:
            raise RuntimeError("set_view before applying strokes")
        if rgba is None:
            return
        if rgba.shape[:2] != self.view.display_shape:
            return  # strokes of a canvas mounted for another view: already baked
        merged = merge_strokes(self.view_base, rgba, self.view)
        if np.array_equal(merged, self.working):
            return
        merged.setflags(write=False)
        if self.done and self.done[-1].undoes(self.working, merged):  # the canvas toolbar's undo
            self.undone.append(self.done.pop())
        elif self.undone and self.undone[-1].reverse().undoes(self.working, merged):  # … and its redo
            self.done.append(self.undone.pop())
        elif self.done and (parts := self.done[-1].split(self.working, merged)) is not None:
            self.done[-1] = parts[0]  # (its undo of one of two strokes that came in one send)
            self.undone.append(parts[1])
        else:
            self._record(merged, tool=Tool.BRUSH)
        self.working = merged
        self.revision += 1

    @property
    def tools(self) -> tuple[str, ...]:
        """What made this edit (a save records it): the tools of its changes still done (an undone one no
        longer counts), and of those the history forgot."""
        return tuple(sorted({s.tool for s in self.done if s.tool} | self.forgotten_tools))

    def use_tool(self, new: np.ndarray, tool: Tool) -> int:
        """A tool's result (:mod:`unet.prediction.objects`: the whole mask as the tool leaves it) as one change
        of the edit, which undo takes back whole. The object tools act on a prediction's neurons, so the save
        will be a corrected prediction. Returns how many pixels changed."""
        if new.shape != self.working.shape:
            raise ValueError(f"the tool's mask is {new.shape}, the slice {self.working.shape}")
        new = np.array(new, dtype=np.uint8)
        changed = int(np.count_nonzero(new != self.working))
        if not changed:
            return 0
        new.setflags(write=False)
        self._record(new, (self.kind, MaskKind.CORRECTED), Tool(tool))
        self.kind = MaskKind.CORRECTED
        self._jump(new)
        return changed

    def _record(self, new: np.ndarray, kinds: tuple[str, str] | None = None, tool: str | None = None) -> None:
        """Keep the change from ``working`` to ``new`` as a step undo can take back (redo's list is dropped,
        as a new change after an undo drops it in any editor)."""
        self.done.append(Step.between(self.working, new, kinds, tool))
        self.undone.clear()
        total = sum(step.nbytes for step in self.done)
        while len(self.done) > 1 and (total > UNDO_BYTES or len(self.done) > UNDO_STEPS):
            oldest = self.done.pop(0)
            total -= oldest.nbytes
            self.forgotten_tools |= {oldest.tool} - {None}

    @property
    def history_bytes(self) -> int:
        return sum(step.nbytes for step in self.done) + sum(step.nbytes for step in self.undone)

    @property
    def can_undo(self) -> bool:
        return bool(self.done)

    @property
    def can_redo(self) -> bool:
        return bool(self.undone)

    def undo(self) -> bool:
        """Take the newest change back (a new, empty canvas over the result). False when there is none."""
        if not self.done:
            return False
        step = self.done.pop()
        self.undone.append(step)
        self._jump(step.apply(self.working, backwards=True))
        if step.kinds is not None:
            self.kind = step.kinds[0]
        return True

    def redo(self) -> bool:
        """Make the newest undone change again. False when there is none."""
        if not self.undone:
            return False
        step = self.undone.pop()
        self.done.append(step)
        self._jump(step.apply(self.working))
        if step.kinds is not None:
            self.kind = step.kinds[1]
        return True

    def _jump(self, mask: np.ndarray) -> None:
        self.working = self.view_base = mask
        self.generation += 1
        self.revision += 1

    def forget_history(self) -> None:
        self.forgotten_tools |= {s.tool for s in self.done if s.tool}
        self.done.clear()
        self.undone.clear()

    def discard(self) -> None:
        """Back to where the edit started (a new, empty canvas); undo brings the changes back."""
        if self.working is not self.original and not np.array_equal(self.working, self.original):
            self._record(self.original)
        self.working = self.view_base = self.original
        self.generation += 1
        self.revision += 1

    def rebase(self, mask: np.ndarray, mask_id: int, kind: str) -> None:
        """Move the changes onto a newer version saved meanwhile by someone else: the pixels this edit
        changed take their new value, every other pixel is theirs."""
        changed = self.working != self.original
        rebased = np.where(changed, self.working, mask).astype(np.uint8)
        rebased.setflags(write=False)
        original = np.ascontiguousarray(mask, dtype=np.uint8)
        original.setflags(write=False)
        self.original, self.working, self.view_base = original, rebased, rebased
        self.forget_history()  # (its steps were taken on the version it left)
        self.source, self.source_mask_id, self.latest_id = "latest", mask_id, mask_id
        self.kind = kind_after_edit("latest", kind) if self.kind != MaskKind.CORRECTED else self.kind
        self.generation += 1
        self.revision += 1

    def accept(self, predicted: np.ndarray, region: tuple[int, int, int, int] | None = None) -> int:
        """Copy a prediction (a NEURON/MEMBRANE mask of the slice) into the edit, over the whole slice or
        ``region`` = (y0, x0, h, w); the pixels this edit already changed keep the user's strokes. The
        save will be a corrected prediction. Returns how many pixels changed."""
        if predicted.shape != self.working.shape:
            raise ValueError(f"the prediction is {predicted.shape}, the slice {self.working.shape}")
        inside = np.zeros(self.working.shape, bool)
        if region is None:
            inside[:] = True
        else:
            y0, x0, h, w = region
            inside[y0:y0 + h, x0:x0 + w] = True
        take = inside & (self.working == self.original)
        accepted = np.where(take, predicted, self.working).astype(np.uint8)
        changed = int(np.count_nonzero(accepted != self.working))
        accepted.setflags(write=False)
        if changed:
            self._record(accepted, (self.kind, MaskKind.CORRECTED), Tool.ACCEPT_PREDICTION)  # undone whole
        self.working = self.view_base = accepted
        self.kind = MaskKind.CORRECTED
        self.generation += 1
        self.revision += 1
        return changed

    def saved(self, mask_id: int, kind: str) -> None:
        """After a save: the saved version is the new starting point (undo starts afresh from it)."""
        self.forget_history()
        self.forgotten_tools.clear()
        self.original = self.working
        self.view_base = self.working
        self.source, self.source_mask_id, self.latest_id = "latest", mask_id, mask_id
        self.kind = kind_after_edit("latest", kind)
        self.generation += 1
        self.revision += 1
