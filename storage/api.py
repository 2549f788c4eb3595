"""The store's functions. Each takes a ``Session`` (the caller owns the transaction:
``with sessions.begin() as s:``) and a :class:`FileStore`, and returns plain frozen dataclasses: pages
never see ORM rows."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import astuple, dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session

from storage.files import FileStore
from storage.models import MASK_KINDS, Checkpoint, Dataset, MaskVersion, Prediction, Run, RunMask
from unet.io import DEFAULT_MAX_BYTES, inspect_stack, read_labels, read_stack
from unet.labels import IGNORE, labels_to_target


class MaskConflict(RuntimeError):
    """A save was based on a version that is no longer the latest of its slice."""


class NotFound(LookupError):
    pass


@dataclass(frozen=True)
class DatasetInfo:
    id: int
    name: str
    shape: tuple[int, int, int]
    dtype: str
    source_name: str
    pixel_size_nm: float | None
    sha256: str
    size_bytes: int
    created: datetime
    notes: str
    labelled_slices: int


@dataclass(frozen=True)
class MaskInfo:
    id: int
    dataset_id: int
    slice_index: int
    version: int
    kind: str
    author: str
    parent_id: int | None
    labelled_pixels: int
    created: datetime
    restored_from_id: int | None = None  # a restore: the old version it copies


@dataclass(frozen=True)
class Deleted:
    """What a deletion removed."""

    datasets: int = 0
    mask_versions: int = 0
    runs: int = 0
    checkpoints: int = 0
    files: int = 0
    predictions: int = 0

    def __add__(self, other: Deleted) -> Deleted:
        return Deleted(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def describe(self) -> str:
        parts = [f"{n} {label}" for n, label in ((self.datasets, "dataset(s)"), (self.mask_versions, "mask version(s)"),
                                                 (self.runs, "run(s)"), (self.checkpoints, "checkpoint(s)"),
                                                 (self.predictions, "prediction(s)"), (self.files, "file(s)")) if n]
        return ", ".join(parts) or "nothing"


def _dataset_info(session: Session, row: Dataset) -> DatasetInfo:
    labelled = session.scalar(select(func.count(func.distinct(MaskVersion.slice_index)))
                              .where(MaskVersion.dataset_id == row.id)) or 0
    return DatasetInfo(row.id, row.name, (row.z, row.y, row.x), row.dtype, row.source_name, row.pixel_size_nm,
                       row.sha256, row.size_bytes, row.created, row.notes, int(labelled))


def _mask_info(row: MaskVersion) -> MaskInfo:
    return MaskInfo(row.id, row.dataset_id, row.slice_index, row.version, row.kind, row.author, row.parent_id,
                    row.labelled_pixels, row.created, row.restored_from_id)


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
                _add_mask(session, store, row.id, z, targets[z], "uploaded", author, None, 1)
        session.flush()
    except BaseException:
        store.delete_tree(store.dataset_dir(row.id))
        raise
    report("stored", 1.0)
    return _dataset_info(session, row)


def _add_mask(session: Session, store: FileStore, dataset_id: int, slice_index: int, target: np.ndarray,
              kind: str, author: str, parent_id: int | None, version: int) -> MaskVersion:
    row = MaskVersion(dataset_id=dataset_id, slice_index=slice_index, version=version, kind=kind,
                      author=author[:100], parent_id=parent_id,
                      labelled_pixels=int(np.count_nonzero(target != IGNORE)), file="", sha256="")
    session.add(row)
    session.flush()
    row.file = store.mask_path(dataset_id, row.id)
    row.sha256, _ = store.write_stack(row.file, target.astype(np.uint8))
    return row


def list_datasets(session: Session) -> list[DatasetInfo]:
    return [_dataset_info(session, r) for r in session.scalars(select(Dataset).order_by(Dataset.id))]


def get_dataset(session: Session, dataset_id: int) -> DatasetInfo:
    row = session.get(Dataset, dataset_id)
    if row is None:
        raise NotFound(f"dataset {dataset_id} does not exist")
    return _dataset_info(session, row)


def load_volume(session: Session, store: FileStore, dataset_id: int) -> np.ndarray:
    row = session.get(Dataset, dataset_id)
    if row is None:
        raise NotFound(f"dataset {dataset_id} does not exist")
    data = store.read_stack(store.volume_path(row.id), row.sha256)
    return data.reshape(row.z, row.y, row.x)


def update_dataset(session: Session, dataset_id: int, *, name: str | None = None,
                   notes: str | None = None) -> DatasetInfo:
    row = session.get(Dataset, dataset_id)
    if row is None:
        raise NotFound(f"dataset {dataset_id} does not exist")
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
    return sorted(set(session.scalars(
        select(RunMask.run_id).join(MaskVersion, RunMask.mask_version_id == MaskVersion.id)
        .where(MaskVersion.dataset_id == dataset_id))))


def delete_run(session: Session, store: FileStore, run_id: int) -> Deleted:
    """Delete a finished or stopped run: its rows (metrics, checkpoints, predictions, lineage) and then its
    folder of checkpoints and logs. A queued or running run must be cancelled first."""
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    if run.status in ("QUEUED", "RUNNING"):
        raise ValueError(f"run {run_id} is {run.status}: cancel it before deleting it")
    _refuse_while_predicting(session, Prediction.checkpoint_id.in_(
        select(Checkpoint.id).where(Checkpoint.run_id == run_id)), f"a checkpoint of run {run_id}")
    checkpoints = session.scalar(select(func.count()).where(Checkpoint.run_id == run_id)) or 0
    predictions = _predictions_of(session, Prediction.checkpoint_id.in_(
        select(Checkpoint.id).where(Checkpoint.run_id == run_id)))
    session.delete(run)
    session.flush()
    files = store.delete_tree(f"runs/{int(run_id)}")
    files += sum(store.delete_tree(f"predictions/{p}") for p in predictions)
    return Deleted(runs=1, checkpoints=int(checkpoints), files=files, predictions=len(predictions))


def _predictions_of(session: Session, condition) -> list[int]:
    return list(session.scalars(select(Prediction.id).where(condition)))


def _refuse_while_predicting(session: Session, condition, what: str) -> None:
    """A prediction process still running would fail half-way once its rows and files are gone: say
    which ones to wait for (a process that died meanwhile does not count)."""
    from storage.procs import is_alive

    rows = session.scalars(select(Prediction).where(condition, Prediction.status.in_(("QUEUED", "RUNNING"))))
    running = [p.id for p in rows if p.pid is None or p.pid == 0 or is_alive(p.pid, p.pid_started)]
    if running:
        names = ", ".join(f"#{p}" for p in running)
        raise ValueError(f"prediction {names} is running on {what}: wait until it has finished (Predict shows "
                         "its progress), then delete")


def run_preview(session: Session, store: FileStore, run_id: int) -> Deleted:
    """What :func:`delete_run` would remove, changing nothing."""
    if session.get(Run, run_id) is None:
        raise NotFound(f"run {run_id} does not exist")
    checkpoints = session.scalar(select(func.count()).where(Checkpoint.run_id == run_id)) or 0
    predictions = _predictions_of(session, Prediction.checkpoint_id.in_(
        select(Checkpoint.id).where(Checkpoint.run_id == run_id)))
    files = store.count_files(f"runs/{int(run_id)}") + sum(store.count_files(f"predictions/{p}") for p in predictions)
    return Deleted(runs=1, checkpoints=int(checkpoints), files=files, predictions=len(predictions))


def deletion_preview(session: Session, store: FileStore, dataset_id: int) -> Deleted:
    """What :func:`delete_dataset` would remove, changing nothing: for the confirmation."""
    if session.get(Dataset, dataset_id) is None:
        raise NotFound(f"dataset {dataset_id} does not exist")
    run_ids = runs_using_dataset(session, dataset_id)
    masks = session.scalar(select(func.count()).where(MaskVersion.dataset_id == dataset_id)) or 0
    checkpoints = session.scalar(select(func.count()).where(Checkpoint.run_id.in_(run_ids))) if run_ids else 0
    predictions = set(_predictions_of(session, Prediction.dataset_id == dataset_id))
    if run_ids:
        predictions |= set(_predictions_of(session, Prediction.checkpoint_id.in_(
            select(Checkpoint.id).where(Checkpoint.run_id.in_(run_ids)))))
    files = store.count_files(store.dataset_dir(dataset_id)) + sum(store.count_files(f"runs/{int(r)}")
                                                                      for r in run_ids)
    files += sum(store.count_files(f"predictions/{p}") for p in predictions)
    return Deleted(datasets=1, mask_versions=int(masks), runs=len(run_ids), checkpoints=int(checkpoints or 0),
                   files=files, predictions=len(predictions))


def delete_dataset(session: Session, store: FileStore, dataset_id: int) -> Deleted:
    """Delete a dataset with its mask versions, the runs that trained on it, and all their files. Rows
    go first: if the transaction fails the files are all still there."""
    row = session.get(Dataset, dataset_id)
    if row is None:
        raise NotFound(f"dataset {dataset_id} does not exist")
    run_ids = runs_using_dataset(session, dataset_id)
    active = [r for r in run_ids if session.get(Run, r).status in ("QUEUED", "RUNNING")]
    if active:
        raise ValueError(f"runs {active} are training on this dataset: cancel them before deleting it")
    _refuse_while_predicting(session, Prediction.dataset_id == dataset_id, "this dataset")
    removed = Deleted()
    for run_id in run_ids:
        removed += delete_run(session, store, run_id)
    masks = session.scalar(select(func.count()).where(MaskVersion.dataset_id == dataset_id)) or 0
    predictions = _predictions_of(session, Prediction.dataset_id == dataset_id)
    session.delete(row)
    session.flush()
    files = store.delete_tree(store.dataset_dir(dataset_id))
    files += sum(store.delete_tree(f"predictions/{p}") for p in predictions)
    return removed + Deleted(datasets=1, mask_versions=int(masks), files=files, predictions=len(predictions))


def mask_history(session: Session, dataset_id: int, slice_index: int) -> list[MaskInfo]:
    rows = session.scalars(select(MaskVersion).where(MaskVersion.dataset_id == dataset_id,
                                                     MaskVersion.slice_index == slice_index)
                           .order_by(MaskVersion.version))
    return [_mask_info(r) for r in rows]


def slice_kinds(session: Session, dataset_id: int) -> dict[int, MaskInfo]:
    """The latest mask version of every slice that has one."""
    rows = session.scalars(select(MaskVersion).where(MaskVersion.dataset_id == dataset_id)
                           .order_by(MaskVersion.slice_index, MaskVersion.version))
    return {r.slice_index: _mask_info(r) for r in rows}


def latest_mask(session: Session, dataset_id: int, slice_index: int) -> MaskInfo | None:
    history = mask_history(session, dataset_id, slice_index)
    return history[-1] if history else None


def load_mask(session: Session, store: FileStore, mask_id: int) -> np.ndarray:
    row = session.get(MaskVersion, mask_id)
    if row is None:
        raise NotFound(f"mask version {mask_id} does not exist")
    return store.read_stack(row.file, row.sha256)


def save_mask(session: Session, store: FileStore, dataset_id: int, slice_index: int, target: np.ndarray, *,
              kind: str, author: str = "", parent_id: int | None, latest_id: int | object | None = ...
              ) -> MaskInfo:
    """Add a new version of a slice's mask. ``parent_id`` is the version the edit started from (None for
    a scribble on nothing) and ``latest_id`` the slice's latest version when the edit began (by default
    the parent): when that is not the latest any more (someone saved in between), the save is refused
    with :class:`MaskConflict` instead of silently overwriting their work."""
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} does not exist")
    if not 0 <= slice_index < dataset.z:
        raise ValueError(f"slice {slice_index} is outside the dataset's slices 0-{dataset.z - 1}")
    if target.shape != (dataset.y, dataset.x):
        raise ValueError(f"mask shape {target.shape} does not match the slice shape {(dataset.y, dataset.x)}")
    if target.dtype != np.uint8 or (target.size and target.max() > IGNORE):
        raise ValueError(f"a mask holds uint8 values 0 (membrane), 1 (neuron) or {IGNORE} (unlabelled)")
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
            row = _add_mask(session, store, dataset_id, slice_index, target, kind, author, parent_id, version)
    except DBIntegrityError as exc:  # a concurrent save took this version number first
        raise MaskConflict(f"slice {slice_index} was saved by someone else at the same moment; reload it") from exc
    return _mask_info(row)


def restore_mask(session: Session, store: FileStore, mask_id: int, *, author: str = "") -> MaskInfo:
    """Make an old version the newest again, as a new version (nothing is overwritten)."""
    row = session.get(MaskVersion, mask_id)
    if row is None:
        raise NotFound(f"mask version {mask_id} does not exist")
    latest = latest_mask(session, row.dataset_id, row.slice_index)
    saved = save_mask(session, store, row.dataset_id, row.slice_index, load_mask(session, store, mask_id),
                      kind=row.kind, author=author, parent_id=latest.id if latest else None)
    session.get(MaskVersion, saved.id).restored_from_id = row.id
    session.flush()
    return _mask_info(session.get(MaskVersion, saved.id))
