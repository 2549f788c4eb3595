"""Datasets: a stack validated and stored once (its labels become the first mask version of each
slice), listed, renamed, read back. Functions take a ``Session`` (the caller owns the transaction) and
the :class:`~storage.files.FileStore`; they return :mod:`storage.records`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.files import FileStore
from storage.masks import add_mask
from storage.models import Dataset, MaskVersion, Run, RunMask
from storage.records import DatasetInfo, NotFound
from unet.io import DEFAULT_MAX_BYTES, inspect_stack, read_labels, read_stack
from unet.labels import labels_to_target


def _dataset_info(session: Session, row: Dataset) -> DatasetInfo:
    labelled = session.scalar(select(func.count(func.distinct(MaskVersion.slice_index)))
                              .where(MaskVersion.dataset_id == row.id)) or 0
    return DatasetInfo(row.id, row.name, (row.z, row.y, row.x), row.dtype, row.source_name, row.pixel_size_nm,
                       row.sha256, row.size_bytes, row.created, row.notes, int(labelled))


def _display_name(source: str | os.PathLike | BinaryIO, given: str | None) -> str:
    """The name shown in the app: what the user gave, else the file's base name; never used on disk."""
    raw = given or (Path(source).name if isinstance(source, str | os.PathLike)
                    else Path(getattr(source, "name", "") or "upload").name)
    cleaned = " ".join(raw.replace("\x00", "").split())[:200]
    return cleaned or "untitled"


def import_dataset(session: Session, store: FileStore, volume: str | os.PathLike | BinaryIO,
                   labels: str | os.PathLike | BinaryIO | None = None, *, name: str | None = None,
                   author: str = "", max_bytes: int = DEFAULT_MAX_BYTES, source_name: str | None = None,
                   progress: Callable[[str, float], None] | None = None, channels_as_z: bool = False) -> DatasetInfo:
    """Validate a volume (and its labels) completely, then store them. A file that fails validation
    leaves no row and no file behind; so does a failure while writing. ``progress(stage, fraction)`` is
    told what is happening."""
    report = progress or (lambda _stage, _fraction: None)
    report("reading and checking the volume", 0.0)
    data = read_stack(volume, max_bytes=max_bytes, channels_as_z=channels_as_z)  # ValueError with the reason
    pixel_size = inspect_stack(volume, channels_as_z).pixel_size_nm
    targets = None
    if labels is not None:
        report("reading and checking the labels", 0.3)
        targets = labels_to_target(read_labels(labels, data.shape, max_bytes=max_bytes, channels_as_z=channels_as_z))
    source_name = _display_name(source_name or volume, None)
    row = Dataset(name=_display_name(volume, name), z=data.shape[0], y=data.shape[1], x=data.shape[2],
                  dtype=str(data.dtype), source_name=source_name, pixel_size_nm=pixel_size, sha256="",
                  size_bytes=0, notes="")
    session.add(row)
    session.flush()  # the id names the files
    try:
        report("storing the volume", 0.5)
        row.sha256, row.size_bytes = store.write_stack(store.volume_path(row.id), data, pixel_size)
        if targets is not None:
            for z in range(data.shape[0]):
                report(f"storing the labels of slice {z + 1} of {data.shape[0]}", 0.6 + 0.4 * z / data.shape[0])
                add_mask(session, store, row.id, z, targets[z], "uploaded", author, None, 1)
        session.flush()
    except BaseException:
        store.delete_tree(store.dataset_dir(row.id))
        raise
    report("stored", 1.0)
    return _dataset_info(session, row)


def count_datasets(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Dataset)) or 0)


def list_datasets(session: Session) -> list[DatasetInfo]:
    return [_dataset_info(session, r) for r in session.scalars(select(Dataset).order_by(Dataset.id))]


def get_dataset(session: Session, dataset_id: int) -> DatasetInfo:
    row = dataset_row(session, dataset_id)
    return _dataset_info(session, row)


def load_volume(session: Session, store: FileStore, dataset_id: int) -> np.ndarray:
    row = dataset_row(session, dataset_id)
    data = store.read_stack(store.volume_path(row.id), row.sha256)
    return data.reshape(row.z, row.y, row.x)


def update_dataset(session: Session, dataset_id: int, *, name: str | None = None,
                   notes: str | None = None) -> DatasetInfo:
    row = dataset_row(session, dataset_id)
    if name is not None:
        cleaned = " ".join(name.split())[:200]
        if not cleaned:
            raise ValueError("a dataset needs a name")
        row.name = cleaned
    if notes is not None:
        row.notes = notes
    session.flush()
    return _dataset_info(session, row)


def runs_using_dataset(session: Session, dataset_id: int) -> list[int]:
    """The runs that trained on the dataset, and its live sessions (one may not have learned a mask yet)."""
    live = [r.id for r in session.scalars(select(Run).where(Run.kind == "live"))
            if int(r.spec.get("dataset_id", -1)) == dataset_id]
    return sorted(set(session.scalars(
        select(RunMask.run_id).join(MaskVersion, RunMask.mask_version_id == MaskVersion.id)
        .where(MaskVersion.dataset_id == dataset_id))) | set(live))


def dataset_row(session: Session, dataset_id: int) -> Dataset:
    row = session.get(Dataset, dataset_id)
    if row is None:
        raise NotFound(f"dataset {dataset_id} does not exist")
    return row
