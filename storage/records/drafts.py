"""Unsaved edits kept in the store, as the user paints: one row per (dataset, slice, owner) and one file
of two pages (the mask the edit started from, and the edit as it is now). A reload, a new tab or a
server restart finds them again; saving or discarding the edit removes them. The owner is the user's
name, or a browser's own id for a user who gave none. Functions take a ``Session`` (the caller owns the
transaction) and the :class:`FileStore`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from domain.records import DraftClash, DraftLike, DraftStart, MaskInfo, StoredDraft
from storage.models import Dataset, MaskVersion
from storage.models import Draft as DraftRow
from storage.records.datasets import dataset_row
from storage.records.files import FileStore
from storage.records.masks import check_slice, latest_mask, load_mask, save_mask
from storage.records.predictions import get_prediction, load_output
from unet.prediction.postprocess import to_mask
from unet.training.labels import IGNORE


def _record(row: DraftRow, original: np.ndarray | None = None, working: np.ndarray | None = None) -> StoredDraft:
    return StoredDraft(row.dataset_id, row.slice_index, row.owner, row.source, row.source_mask_id, row.latest_id,
                       row.prediction_id, row.kind, row.changed_pixels, row.updated, original, working, row.token,
                       tuple(str(t) for t in row.tools or ()))


def _find(session: Session, dataset_id: int, slice_index: int, owner: str) -> DraftRow | None:
    return session.scalar(select(DraftRow).where(DraftRow.dataset_id == dataset_id,
                                                 DraftRow.slice_index == slice_index, DraftRow.owner == owner))


def keep(session: Session, store: FileStore, draft: StoredDraft) -> str:
    """Write (or overwrite) the owner's draft of a slice; returns its new token. The file is written
    atomically before the row points at it, so a crash leaves the previous draft whole."""
    if draft.original is None or draft.working is None:
        raise ValueError("a draft to keep needs both masks")
    dataset = session.get(Dataset, draft.dataset_id)
    if dataset is None:
        raise LookupError(f"dataset {draft.dataset_id} does not exist")
    if draft.working.shape != (dataset.y, dataset.x) or draft.original.shape != draft.working.shape:
        raise ValueError(f"draft shape {draft.working.shape} does not match the slice shape {(dataset.y, dataset.x)}")
    check_slice(draft.slice_index, dataset)
    row = _find(session, draft.dataset_id, draft.slice_index, draft.owner)
    if row is None:
        row = DraftRow(dataset_id=draft.dataset_id, slice_index=draft.slice_index, owner=draft.owner[:200], file="",
                       sha256="", changed_pixels=0, source=draft.source, kind=draft.kind)
        session.add(row)
        session.flush()  # the id names the file
    row.file = store.draft_path(draft.dataset_id, row.id)
    row.sha256, _ = store.write_stack(row.file, np.stack([draft.original, draft.working]).astype(np.uint8))
    row.source, row.source_mask_id, row.latest_id = draft.source, draft.source_mask_id, draft.latest_id
    row.prediction_id, row.kind, row.changed_pixels = draft.prediction_id, draft.kind, draft.changed_pixels
    row.updated = datetime.now(UTC)
    row.tools = sorted({str(t) for t in draft.tools})
    row.token = uuid.uuid4().hex
    session.flush()
    return row.token


def load(session: Session, store: FileStore, dataset_id: int, slice_index: int, owner: str) -> StoredDraft | None:
    """The owner's kept draft of a slice with its masks, or None. A draft whose file is damaged is
    dropped (it cannot be shown) rather than blocking the slice."""
    row = _find(session, dataset_id, slice_index, owner)
    if row is None:
        return None
    try:
        pages = store.read_stack(row.file, row.sha256)
    except Exception:
        drop(session, store, dataset_id, slice_index, owner)
        return None
    return _record(row, pages[0], pages[1])


def drop(session: Session, store: FileStore, dataset_id: int, slice_index: int, owner: str) -> bool:
    """Forget the owner's draft of a slice (saved or discarded). Returns whether there was one."""
    row = _find(session, dataset_id, slice_index, owner)
    if row is None:
        return False
    path = store.abspath(row.file) if row.file else None
    session.delete(row)
    session.flush()
    if path is not None:
        path.unlink(missing_ok=True)
    return True


def of_owner(session: Session, owner: str) -> list[StoredDraft]:
    """The owner's kept drafts (without their masks), by dataset and slice."""
    rows = session.scalars(select(DraftRow).where(DraftRow.owner == owner)
                           .order_by(DraftRow.dataset_id, DraftRow.slice_index))
    return [_record(r) for r in rows]


def start(session: Session, store: FileStore, dataset_id: int, slice_index: int, source: str,
          mask_id: int | None = None, prediction_id: int | None = None) -> DraftStart:
    """What an edit of a slice starts from: the mask version ``mask_id``, the prediction ``prediction_id``
    (its mask of this slice), or nothing (every pixel unlabelled). With both, the edit starts from the mask
    version and keeps the prediction as the one its object tools act on (Next to fix on a slice someone
    corrected: the saved labels stay)."""
    dataset = dataset_row(session, dataset_id)
    latest = latest_mask(session, dataset_id, slice_index)
    latest_id = latest.id if latest else None
    if prediction_id is not None:
        if source == "prediction" and mask_id is not None:
            raise ValueError("an edit starts from a prediction or from a mask version, not both")
        prediction = get_prediction(session, prediction_id)
        if prediction.dataset_id != dataset_id or slice_index not in prediction.slices:
            raise ValueError(f"prediction #{prediction_id} did not predict slice {slice_index} of this dataset")
        if mask_id is None:
            prob = load_output(session, store, prediction_id, "probabilities")[prediction.slices.index(slice_index)]
            return DraftStart(dataset_id, slice_index, "prediction", None, "prediction", latest_id, to_mask(prob),
                              prediction_id)
    if mask_id is None:
        return DraftStart(dataset_id, slice_index, "nothing", None, None, latest_id,
                          np.full((dataset.y, dataset.x), IGNORE, np.uint8))
    version = session.get(MaskVersion, mask_id)
    if version is None or (version.dataset_id, version.slice_index) != (dataset_id, slice_index):
        raise ValueError(f"mask version {mask_id} is not a version of slice {slice_index}")
    return DraftStart(dataset_id, slice_index, source, mask_id, version.kind, latest_id,
                      load_mask(session, store, mask_id), prediction_id)


def save(session: Session, store: FileStore, draft: DraftLike, author: str = "", owner: str | None = None) -> MaskInfo:
    """Save the edit's mask as a new version, exactly as it is (refused with MaskConflict when the slice
    has a newer version than the one the edit began on), and forget the owner's kept copy."""
    info = save_mask(session, store, draft.dataset_id, draft.slice_index, np.array(draft.working), kind=draft.kind,
                     author=author, parent_id=draft.source_mask_id, latest_id=draft.latest_id,
                     tools=tuple(getattr(draft, "tools", ())))
    row = _find(session, draft.dataset_id, draft.slice_index, owner) if owner is not None else None
    if row is not None and _ours(row, draft):  # (another tab's newer edit stays: its save will meet this one)
        drop(session, store, draft.dataset_id, draft.slice_index, owner)
    return info


def _ours(row: DraftRow, draft: DraftLike) -> bool:
    """Whether the kept draft ``row`` is the one ``draft`` last kept or loaded (a draft kept before tokens
    were written is anyone's)."""
    return not row.token or row.token == getattr(draft, "kept_as", "")


def keep_edit(session: Session, store: FileStore, draft: DraftLike, owner: str, *, replace: bool = False) -> str:
    """Keep an edit as it is now, or forget it when nothing is changed; returns the kept draft's token (""
    when none is kept). :class:`DraftClash` when the kept draft is not the one this edit last kept or loaded
    (another tab or browser of the owner's), unless ``replace``: nothing is overwritten then."""
    row = _find(session, draft.dataset_id, draft.slice_index, owner)
    if row is not None and not replace and not _ours(row, draft):
        raise DraftClash(f"another tab or browser of yours changed {row.changed_pixels:,} pixels of slice "
                         f"{draft.slice_index} since this one last kept its edit", row.changed_pixels, row.updated)
    if not draft.changed_pixels:
        drop(session, store, draft.dataset_id, draft.slice_index, owner)
        return ""
    return keep(session, store, StoredDraft(draft.dataset_id, draft.slice_index, owner, draft.source,
                                            draft.source_mask_id, draft.latest_id, draft.prediction_id, draft.kind,
                                            draft.changed_pixels, datetime.now(UTC), np.asarray(draft.original),
                                            np.asarray(draft.working), tools=tuple(getattr(draft, "tools", ()))))
