"""Mask versions: every save of a slice's mask is a new version (nothing is overwritten); a save based
on a version that is no longer the latest is refused with :class:`~domain.records.MaskConflict`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session

from domain.kinds import MaskKind, Tool
from domain.records import MaskConflict, MaskInfo
from storage.models import Dataset, MaskVersion, row_or_missing
from storage.records.files import FileStore, sha256_of
from storage.records.volumes import fsync_dir
from unet.exchange.writing import write_tiff_atomic
from unet.training.labels import IGNORE


def mask_info(row: MaskVersion) -> MaskInfo:
    return MaskInfo(row.id, row.dataset_id, row.slice_index, row.version, MaskKind(row.kind), row.author, row.parent_id,
                    row.labelled_pixels, row.created, row.restored_from_id, tuple(row.tools or ()))


def labelled(target: np.ndarray) -> int:
    return int(np.count_nonzero(target != IGNORE))


def _row(dataset_id: int, slice_index: int, kind: str, author: str, labelled_pixels: int, *, version: int = 1,
         parent_id: int | None = None, tools: Sequence[str] = (), sha256: str = "") -> MaskVersion:
    """A mask version's row, its file not named yet (its id names it)."""
    return MaskVersion(dataset_id=dataset_id, slice_index=slice_index, version=version, kind=kind, author=author[:100],
                       parent_id=parent_id, tools=sorted(set(tools)) or None, labelled_pixels=labelled_pixels,
                       file="", sha256=sha256)


def add_mask(session: Session, store: FileStore, dataset_id: int, slice_index: int, target: np.ndarray,
              kind: str, author: str, parent_id: int | None, version: int, tools: Sequence[str] = ()
              ) -> MaskVersion:
    row = _row(dataset_id, slice_index, kind, author, labelled(target), version=version, parent_id=parent_id,
               tools=tools)
    session.add(row)
    session.flush()
    row.file = store.mask_path(dataset_id, row.id)
    row.sha256, _ = store.write_stack(row.file, target.astype(np.uint8))
    return row


def staged_mask(staging: Path, slice_index: int, target: np.ndarray) -> tuple[Path, str, int]:
    """A mask written before its dataset's row exists (an upload's labels): the file in ``staging``, its sha256
    and its labelled pixels, for :func:`add_staged_masks`."""
    path = write_tiff_atomic(staging / f"mask-{int(slice_index)}.tif", target.astype(np.uint8))
    return path, sha256_of(path), labelled(target)


def add_staged_masks(session: Session, store: FileStore, dataset_id: int, staged: dict[int, tuple[Path, str, int]],
                     kind: str, author: str) -> None:
    """The first version of each slice's mask from :func:`staged_mask` files: their rows in one insert, then the
    files moved in under the names the rows' ids give (a few milliseconds a slice of database time)."""
    rows = {z: _row(dataset_id, z, kind, author, pixels, sha256=sha) for z, (_, sha, pixels) in staged.items()}
    session.add_all(rows.values())
    session.flush()
    folder = None
    for z, row in rows.items():
        row.file = store.mask_path(dataset_id, row.id)
        target = store.abspath(row.file)
        if folder is None:
            folder = target.parent
            folder.mkdir(parents=True, exist_ok=True)
        os.replace(staged[z][0], target)
    if folder is not None:
        fsync_dir(folder)
    session.flush()


def mask_history(session: Session, dataset_id: int, slice_index: int) -> list[MaskInfo]:
    rows = session.scalars(select(MaskVersion).where(MaskVersion.dataset_id == dataset_id,
                                                     MaskVersion.slice_index == slice_index)
                           .order_by(MaskVersion.version))
    return [mask_info(r) for r in rows]


def slice_kinds(session: Session, dataset_id: int) -> dict[int, MaskInfo]:
    """The latest mask version of every slice that has one."""
    rows = session.scalars(select(MaskVersion).where(MaskVersion.dataset_id == dataset_id)
                           .order_by(MaskVersion.slice_index, MaskVersion.version))
    return {r.slice_index: mask_info(r) for r in rows}


def latest_mask(session: Session, dataset_id: int, slice_index: int) -> MaskInfo | None:
    history = mask_history(session, dataset_id, slice_index)
    return history[-1] if history else None


def load_mask(session: Session, store: FileStore, mask_id: int) -> np.ndarray:
    row = row_or_missing(session, MaskVersion, mask_id, "mask version")
    return store.read_stack(row.file, row.sha256)


def check_slice(slice_index: object, dataset: Dataset) -> int:
    """``slice_index`` as a slice of ``dataset``, or :class:`ValueError` (a string, a bool, a float, one past
    the end: what a forged request sends)."""
    if not isinstance(slice_index, int | np.integer) or isinstance(slice_index, bool) \
            or not 0 <= slice_index < dataset.z:
        raise ValueError(f"slice {str(slice_index)[:40]} is outside the dataset's slices 0-{dataset.z - 1}")
    return int(slice_index)


def save_mask(session: Session, store: FileStore, dataset_id: int, slice_index: int, target: np.ndarray, *,
              kind: str, author: str = "", parent_id: int | None, latest_id: int | object | None = ...,
              tools: Sequence[str] = ()) -> MaskInfo:
    """Add a new version of a slice's mask. ``parent_id`` is the version the edit started from (None for
    a scribble on nothing) and ``latest_id`` the slice's latest version when the edit began (by default
    the parent): when that is not the latest any more (someone saved in between), the save is refused
    with :class:`MaskConflict` instead of silently overwriting their work."""
    if kind not in tuple(MaskKind):
        raise ValueError(f"mask kind must be one of {[k.value for k in MaskKind]}, got {kind!r}")
    if unknown := set(tools) - {t.value for t in Tool}:
        raise ValueError(f"unknown tools {sorted(unknown)}: a version is made by {[t.value for t in Tool]}")
    dataset = row_or_missing(session, Dataset, dataset_id, "dataset")
    slice_index = check_slice(slice_index, dataset)
    if target.shape != (dataset.y, dataset.x):
        raise ValueError(f"mask shape {target.shape} does not match the slice shape {(dataset.y, dataset.x)}")
    if target.dtype != np.uint8 or (target.size and target.max() > IGNORE):
        raise ValueError(f"a mask holds uint8 values 0 (membrane), 1 (neuron) or {IGNORE} (unlabelled)")
    if parent_id is not None:  # the history says what an edit started from: a version of this very slice
        parent = session.get(MaskVersion, parent_id)
        if parent is None or (parent.dataset_id, parent.slice_index) != (dataset_id, slice_index):
            raise ValueError(f"mask version {parent_id} is not a version of slice {slice_index} of this dataset")
    latest = latest_mask(session, dataset_id, slice_index)
    expected = parent_id if latest_id is ... else latest_id
    if (latest.id if latest else None) != expected:
        who = f" by {latest.author}" if latest and latest.author else ""
        raise MaskConflict(
            f"slice {slice_index} has a newer version (v{latest.version if latest else 0}{who}) than the one this "
            "edit started from"
        )
    version = (latest.version if latest else 0) + 1
    try:
        with session.begin_nested():
            row = add_mask(session, store, dataset_id, slice_index, target, kind, author, parent_id, version, tools)
    except DBIntegrityError as exc:  # a concurrent save took this version number first
        raise MaskConflict(f"slice {slice_index} was saved by someone else at the same moment; reload it") from exc
    return mask_info(row)


def restore_mask(session: Session, store: FileStore, mask_id: int, *, author: str = "") -> MaskInfo:
    """Make an old version the newest again, as a new version (nothing is overwritten)."""
    row = row_or_missing(session, MaskVersion, mask_id, "mask version")
    latest = latest_mask(session, row.dataset_id, row.slice_index)
    saved = save_mask(session, store, row.dataset_id, row.slice_index, load_mask(session, store, mask_id),
                      kind=row.kind, author=author, parent_id=latest.id if latest else None)
    session.get(MaskVersion, saved.id).restored_from_id = row.id
    session.flush()
    return mask_info(session.get(MaskVersion, saved.id))
