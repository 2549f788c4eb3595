"""A dataset's shared queue of where to work next (issue 29): regions of slices ranked by the likely gain of a
correction there (:func:`unet.prediction.review.rank_regions`), one queue per dataset for everyone on it.

**Ranking** (:func:`rank`) reads what the store knows of each slice, newest first:

- the dataset's live session's prediction of the slice: its uncertainty is how much the last weights changed
  it (kept by :mod:`storage.jobs.live_worker`);
- else the newest finished prediction that covered it: its uncertainty is the map's own doubt (with test-time
  flips, where the eight disagree), and its neurons are checked against the neighbouring slices' (a neuron
  that splits or merges between slices, tiny fragments: :func:`unet.prediction.review.suspects`);
- a region's doubt counts the uncertainty of its few most doubtful neurons (those a correction there touches:
  the live prediction's connected neurons, or the finished prediction's instances);
- a slice that nobody has corrected scores more; one without any prediction is an item of its own.

Ranking replaces the open items nobody works on (never taken, or taken over an hour ago and left); the ones
taken since, and the done ones, stay, and a region someone works on is not ranked twice. **Next** (:func:`take`) gives
the best open item to a user and marks it taken (another user's Next skips it for an hour); a mask saved on
the slice by someone who took one of its items marks those done (:func:`done`), with the version.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from domain.kinds import RunStatus
from domain.records import aware
from domain.review import WorkItemInfo, WorkList, live_source, prediction_source
from storage.models import Dataset, LiveSlice, WorkItem, row_or_missing
from storage.records import live, masks, predictions
from storage.records.files import FileStore
from unet.prediction.review import W_UNCORRECTED, margin, objects_of, rank_regions, suspect_mask, suspects

log = logging.getLogger(__name__)

PER_SLICE = 3  # the best regions of a slice that enter the queue
MAX_SLICES = 64  # slices ranked at most (spread over the stack): a page waits for this
TAKEN_FOR = timedelta(hours=1)  # another user's Next skips an item taken this recently
DONE_SHOWN = 20


def item_info(row: WorkItem) -> WorkItemInfo:
    return WorkItemInfo(row.id, row.dataset_id, row.slice_index, (row.y0, row.x0, row.h, row.w), row.score,
                        row.reasons, row.source, aware(row.created), row.taken_by, aware(row.taken_at),
                        row.done_by, aware(row.done_at), row.mask_version_id)


def work_list(session: Session, dataset_id: int) -> WorkList:
    """The dataset's queue: open items best first, done ones newest first."""
    row_or_missing(session, Dataset, dataset_id, "dataset")
    rows = list(session.scalars(select(WorkItem).where(WorkItem.dataset_id == dataset_id)))
    open_items = sorted((r for r in rows if r.done_at is None), key=lambda r: (-r.score, r.slice_index, r.id))
    done_items = sorted((r for r in rows if r.done_at is not None), key=lambda r: r.done_at, reverse=True)
    ranked = max((aware(r.created) for r in open_items if r.taken_by is None), default=None)
    return WorkList(dataset_id, [item_info(r) for r in open_items], [item_info(r) for r in done_items[:DONE_SHOWN]],
                    ranked)


def _spread(count: int, n: int) -> list[int]:
    if count <= n:
        return list(range(count))
    return sorted({round(i * (count - 1) / (n - 1)) for i in range(n)})


def _finished_prediction(session: Session, dataset_id: int):
    """The dataset's newest finished prediction, or None."""
    done = [p for p in predictions.list_predictions(session, dataset_id=dataset_id)
            if p.status == RunStatus.FINISHED]
    return done[-1] if done else None


def rank(session: Session, store: FileStore, dataset_id: int, *, per_slice: int = PER_SLICE,
         max_slices: int = MAX_SLICES) -> WorkList:
    """Rank the dataset's slices and regions again from what the store knows now (see the module's text)."""
    row_or_missing(session, Dataset, dataset_id, "dataset")
    # one ranking of a dataset at a time (PostgreSQL: the row's lock; SQLite: its single writer)
    count, height, width = session.execute(select(Dataset.z, Dataset.y, Dataset.x).where(Dataset.id == dataset_id)
                                           .with_for_update()).one()
    corrected = set(masks.slice_kinds(session, dataset_id))
    now = datetime.now(UTC)
    session_now = live.current(session, dataset_id)
    live_slices: set[int] = set()
    if session_now is not None:
        live_slices = {z for (z,) in session.execute(
            select(LiveSlice.slice_index).where(LiveSlice.run_id == session_now.run_id))}
    job = _finished_prediction(session, dataset_id)
    probs = inst = None
    if job is not None:
        try:
            probs = predictions.load_output(session, store, job.id, "probabilities")
            inst = predictions.load_output(session, store, job.id, "instances")
        except Exception as exc:  # (a damaged output: the queue goes on without it, and the log says why)
            log.warning("prediction %s is not used for the queue: %s", job.id, exc)
            probs = inst = None
    index = {z: i for i, z in enumerate(job.slices)} if job is not None and probs is not None else {}
    new: list[WorkItem] = []
    wanted = sorted(set(_spread(int(count), max_slices)) | live_slices)
    wanted = [wanted[i] for i in _spread(len(wanted), max_slices)]  # (a long session's slices too: at most this)
    now_taken = {(r.slice_index, r.y0, r.x0, r.h, r.w) for r in session.scalars(select(WorkItem).where(
        WorkItem.dataset_id == dataset_id, WorkItem.done_at.is_(None), WorkItem.taken_by.is_not(None),
        WorkItem.taken_at >= now - TAKEN_FOR))}
    for z in wanted:
        uncorrected = z not in corrected
        regions, source = None, ""
        seen = live.prediction(session, store, session_now.run_id, z, True) if z in live_slices else None
        if seen is not None:
            known = None
            if seen.partial and seen.region is not None:  # (the rest was never predicted: no answer, no doubt)
                y0, x0, h, w = seen.region
                known = np.zeros(seen.probabilities.shape, bool)
                known[y0:y0 + h, x0:x0 + w] = True
            regions = rank_regions(seen.uncertainty, uncorrected=uncorrected, known=known,
                                   objects=objects_of(seen.probabilities))
            source = live_source(session_now.run_id)
        elif z in index:
            i = index[z]
            here = np.asarray(inst[i])
            below = np.asarray(inst[index[z - 1]]) if z - 1 in index else None
            above = np.asarray(inst[index[z + 1]]) if z + 1 in index else None
            found = suspects(here, below, above)
            regions = rank_regions(margin(np.asarray(probs[i])), suspect_mask=suspect_mask(here, found),
                                   suspect_labels=here, uncorrected=uncorrected, objects=here)
            source = prediction_source(job.id)
        if regions is None:
            if uncorrected:
                new.append(WorkItem(dataset_id=dataset_id, slice_index=z, y0=0, x0=0, h=int(height), w=int(width),
                                    score=W_UNCORRECTED,
                                    reasons="never corrected, no prediction of it yet", source="", created=now))
            continue
        for r in regions[:per_slice]:
            new.append(WorkItem(dataset_id=dataset_id, slice_index=z, y0=r.y0, x0=r.x0, h=r.h, w=r.w,
                                score=round(r.score, 4), reasons=r.reasons[:255], source=source, created=now))
    # the open items nobody works on go (never taken, or taken over an hour ago and left); a region someone
    # is working on is not ranked twice
    session.execute(delete(WorkItem).where(
        WorkItem.dataset_id == dataset_id, WorkItem.done_at.is_(None),
        or_(WorkItem.taken_by.is_(None), WorkItem.taken_at < now - TAKEN_FOR)))
    session.add_all([w for w in new if (w.slice_index, w.y0, w.x0, w.h, w.w) not in now_taken])
    session.flush()
    return work_list(session, dataset_id)


def take(session: Session, dataset_id: int, owner: str) -> WorkItemInfo | None:
    """Next: the best open item nobody else took in the last hour, now taken by ``owner`` (None: the queue
    is empty). An item ``owner`` took before and left is offered again only when nothing else is."""
    row_or_missing(session, Dataset, dataset_id, "dataset")
    now = datetime.now(UTC)
    rows = list(session.scalars(select(WorkItem).where(
        WorkItem.dataset_id == dataset_id, WorkItem.done_at.is_(None),
        or_(WorkItem.taken_by.is_(None), WorkItem.taken_by == owner, WorkItem.taken_at < now - TAKEN_FOR))))
    if not rows:
        return None
    rows.sort(key=lambda r: (r.taken_by == owner, -r.score, r.slice_index, r.id))
    for row in rows:  # taken only if still free as it is written: two Nexts at once never get the same item
        taken = session.execute(update(WorkItem).where(
            WorkItem.id == row.id, WorkItem.done_at.is_(None),
            or_(WorkItem.taken_by.is_(None), WorkItem.taken_by == owner, WorkItem.taken_at < now - TAKEN_FOR))
            .values(taken_by=owner, taken_at=now).execution_options(synchronize_session=False))
        if taken.rowcount == 1:
            session.refresh(row)
            return item_info(row)
    return None


def done(session: Session, dataset_id: int, slice_index: int, mask_version_id: int, who: str) -> int:
    """A mask of the slice was saved by ``who``: the open items of that slice that ``who`` took are done by that
    version. Returns how many."""
    rows = list(session.scalars(select(WorkItem).where(
        WorkItem.dataset_id == dataset_id, WorkItem.slice_index == slice_index, WorkItem.done_at.is_(None),
        WorkItem.taken_by == who)))
    now = datetime.now(UTC)
    for row in rows:
        row.done_by, row.done_at, row.mask_version_id = who, now, mask_version_id
    return len(rows)
