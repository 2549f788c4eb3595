"""Datasets: a stack validated and stored once (its labels become the first mask version of each
slice), listed, renamed, read back. Functions take a ``Session`` (the caller owns the transaction) and
the :class:`~storage.records.files.FileStore`; they return :mod:`domain.records`."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from domain.kinds import MaskKind, RunKind
from domain.records import DatasetInfo
from storage import text
from storage.models import Dataset, MaskVersion, Prediction, Run, RunMask, row_or_missing
from storage.records.external import External
from storage.records.files import FileStore, IntegrityError, import_roots
from storage.records.masks import add_staged_masks, staged_mask
from storage.records.server_folders import Refused, check_folder
from storage.records.volumes import FORMAT, Volume, VolumeWriter, fsync_dir, write_volume
from unet.exchange.io import iter_slices
from unet.exchange.limits import Limits
from unet.prediction.blocks import OUTPUT_DTYPES, create_output, output_path, write_slice
from unet.training.labels import IGNORE, LABEL_SCHEMES, labels_to_target

log = logging.getLogger(__name__)

LINK = "link"  # a dataset whose stack is read where it lies on the server (volume_format)


def _dataset_info(session: Session, row: Dataset) -> DatasetInfo:
    labelled = session.scalar(select(func.count(func.distinct(MaskVersion.slice_index)))
                              .where(MaskVersion.dataset_id == row.id)) or 0
    return DatasetInfo(row.id, row.name, (row.z, row.y, row.x), row.dtype, row.source_name, row.pixel_size_nm,
                       row.sha256, row.size_bytes, row.created, row.notes, int(labelled), row.owner_id,
                       row.owner.username if row.owner else "")


def _display_name(source: str | os.PathLike | BinaryIO, given: str | None) -> str:
    """The name shown in the app: what the user gave, else the file's base name; never used on disk."""
    raw = given or (Path(source).name if isinstance(source, str | os.PathLike)
                    else Path(getattr(source, "name", "") or "upload").name)
    return text.clean_name(raw, cut=True) or "untitled"  # (no bidi or control characters, at most 120)


def _check_room(store: FileStore, shape: tuple[int, ...], dtype: np.dtype | str) -> None:
    """Refuse a stack the disk cannot hold (EM compresses little: about its own size, its pyramid a third more)."""
    needed = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    free = shutil.disk_usage(store.root).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"the stack needs about {needed / 2**30:.1f} GiB and the disk has "
                                    f"{free / 2**30:.1f} GiB free")


def protected_paths(session: Session, store: FileStore) -> list[Path]:
    """What no import may read nor hold: the data directory, and the database file with its folder (its
    journal and WAL beside it) when it is a SQLite file elsewhere. Why: a server that reads its own
    database file drops SQLite's locks on it, and later commits are lost."""
    paths = [store.root]
    url = session.get_bind().url
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:" \
            and not url.database.startswith("file:"):
        database = Path(url.database).expanduser().resolve()
        paths += [database, database.parent, Path(f"{database}-wal"), Path(f"{database}-shm"),
                  Path(f"{database}-journal")]
    return paths


def _claim_folder(store: FileStore, dataset_id: int) -> None:
    """Make room for a new row's files: a folder ``datasets/<id>/`` already on disk belongs to no row (this
    transaction holds the new id), so a crash left it behind after its row was rolled back, and SQLite has
    handed the id out again. It is moved aside into ``orphans/`` (never deleted unread: it may be worth a
    look; the admin page shows its size and deletes it) so the new dataset starts in an empty folder instead
    of failing with "Directory not empty"."""
    folder = store.abspath(store.dataset_dir(dataset_id))
    if not os.path.lexists(folder):
        return
    aside = store.root / "orphans" / f"dataset-{int(dataset_id)}-{uuid.uuid4().hex[:8]}"  # (users.ORPHANS)
    aside.parent.mkdir(exist_ok=True)
    os.replace(folder, aside)
    log.warning(f"datasets/{int(dataset_id)} was left by a crash (no row owns it): moved to "
                f"{aside.relative_to(store.root)}")


@contextlib.contextmanager
def _new_volume(session: Session, store: FileStore, row: Dataset, staging: Path) -> Iterator[VolumeWriter]:
    """The writer of a new dataset's volume, written into ``staging`` (:meth:`FileStore.staging`) before the row
    exists: a SQLite database is held from the first write of a transaction to its end, so a row added first
    would keep every other user from saving while a large stack converts. When the block ends the volume is
    finished, the row added (its id names the folder) and the volume moved in. When anything fails, nothing
    of the dataset is left on disk."""
    writer = VolumeWriter(staging / "volume.ome.zarr", (row.z, row.y, row.x), row.dtype, row.pixel_size_nm)
    placed = False
    try:
        yield writer
        row.sha256, row.size_bytes = writer.finish()
        session.add(row)
        session.flush()  # the id names the files
        placed = True
        _claim_folder(store, row.id)
        target = store.abspath(store.volume_path(row.id))
        target.parent.mkdir(parents=True)
        os.replace(writer.path, target)
        fsync_dir(target.parent)
    except BaseException:
        writer.abort()
        if placed:
            store.delete_tree(store.dataset_dir(row.id))
        raise


def import_dataset(session: Session, store: FileStore, volume: str | os.PathLike | BinaryIO,
                   labels: str | os.PathLike | BinaryIO | None = None, *, name: str | None = None,
                   author: str = "", max_bytes: int | None = None, source_name: str | None = None,
                   progress: Callable[[str, float], None] | None = None, channels_as_z: bool = False,
                   labels_as: str = "auto") -> DatasetInfo:
    """Check a volume's header (and its labels', read as ``labels_as``: :data:`LABEL_SCHEMES`), then convert
    it slice by slice into the OME-Zarr store (:mod:`storage.records.volumes`): the stack is never held whole,
    so it may be larger than memory. A file that fails a check, a slice that cannot be read and a disk that
    fills all leave no row and no file behind; ``progress(stage, fraction)`` is told what is happening."""
    report = progress or (lambda _stage, _fraction: None)
    report("reading and checking the volume", 0.0)
    limits = Limits.from_env()  # the header's shape and type are checked against them before a pixel is read
    info, planes = iter_slices(volume, "volume", channels_as_z, max_bytes, limits)  # ValueError with the reason
    label_planes = None
    if labels is not None:
        if labels_as not in LABEL_SCHEMES:
            raise ValueError(f"labels are read as one of {', '.join(LABEL_SCHEMES)}, not {str(labels_as)[:40]!r}")
        report("checking the labels", 0.02)
        label_info, label_planes = iter_slices(labels, "labels", channels_as_z, max_bytes, limits)
        if label_info.shape != info.shape:
            raise ValueError(
                f"{_display_name(labels, None)}: labels have shape {label_info.shape} but the image stack has shape "
                f"{info.shape}; they must match slice for slice and pixel for pixel")
    _check_room(store, info.shape, info.dtype)
    source_name = _display_name(source_name or volume, None)
    z_count, y, x = info.shape
    row = Dataset(name=_display_name(volume, name), z=z_count, y=y, x=x, dtype=info.dtype, source_name=source_name,
                  pixel_size_nm=info.pixel_size_nm, sha256="", size_bytes=0, notes="", volume_format=FORMAT)
    staged: dict[int, tuple[Path, str, int]] = {}
    with store.staging() as staging:
        with _new_volume(session, store, row, staging) as writer:
            for z, plane in enumerate(planes):
                also = f" and the labels of slice {z + 1}" if label_planes else ""
                report(f"storing slice {z + 1} of {z_count}{also}", 0.05 + 0.9 * z / z_count)
                writer.write(plane)
                if label_planes is not None:  # (written aside until the row exists: its id names the masks' files)
                    try:
                        target = labels_to_target(next(label_planes), labels_as, ask=True)
                    except ValueError as exc:
                        raise ValueError(f"{_display_name(labels, None)}, slice {z + 1}: {exc}") from None
                    if (target != IGNORE).any():  # (a slice of classes with nothing labelled has no mask)
                        staged[z] = staged_mask(staging, z, target)
            report("writing the overview pyramid's metadata", 0.96)
        try:
            if staged:
                report(f"recording the labels of {z_count} slices", 0.98)
                add_staged_masks(session, store, row.id, staged, MaskKind.UPLOADED, author)
        except BaseException:
            store.delete_tree(store.dataset_dir(row.id))
            raise
    report("stored", 1.0)
    return _dataset_info(session, row)


def convert_legacy_predictions(session: Session, store: FileStore, say: Callable[[str], None] = log.info) -> int:
    """Move the TIFF outputs of predictions made by earlier versions into OME-Zarr outputs like the new
    ones (:mod:`unet.prediction.blocks`), without losing a byte: each TIFF's checksum is verified, it is
    converted slice by slice, the slices read back are compared with the TIFF's, then the row switches and
    the TIFF goes. A failure leaves the prediction as it was (still readable) and says why."""
    done = 0
    for row in session.scalars(select(Prediction).order_by(Prediction.id)):
        legacy = {name: entry for name, entry in (row.files or {}).items()
                  if str(entry.get("file", "")).endswith(".tif")}
        if not legacy:
            continue
        folder = store.abspath(store.prediction_folder(row.id))
        files = dict(row.files)
        try:
            for name, entry in legacy.items():
                path = store.verified(entry["file"], entry["sha256"])
                info, planes = iter_slices(path, "volume", channels_as_z=True)  # float32, uint8, uint16
                if info.shape[0] != len(row.slices):
                    raise ValueError(f"{entry['file']} holds {info.shape[0]} slices, the prediction "
                                     f"{len(row.slices)}")
                target = output_path(folder, name)
                shutil.rmtree(target, ignore_errors=True)
                create_output(target, name, info.shape, list(row.slices))
                digests = []
                for i, plane in enumerate(planes):
                    data = np.ascontiguousarray(plane, dtype=OUTPUT_DTYPES[name])
                    write_slice(target, i, data)
                    digests.append(hashlib.sha256(data.data).hexdigest())
                for i, plane in enumerate(Volume(target).iter_slices()):
                    if hashlib.sha256(np.ascontiguousarray(plane).data).hexdigest() != digests[i]:
                        raise IntegrityError(f"{entry['file']}: slice {i} does not read back the same")
                files[name] = {"file": store.prediction_output(row.id, name),
                               "sha256": hashlib.sha256("".join(digests).encode()).hexdigest()}
        except (OSError, ValueError, IntegrityError) as exc:
            for name in legacy:
                shutil.rmtree(output_path(folder, name), ignore_errors=True)
            say(f"prediction #{row.id}: its outputs stay TIFF files for now: {exc}")
            continue
        row.files = files
        if "probabilities" in files:
            row.file, row.sha256 = files["probabilities"]["file"], files["probabilities"]["sha256"]
        session.flush()
        session.commit()
        for entry in legacy.values():
            store.delete_file(entry["file"])
        say(f"prediction #{row.id}: outputs converted to OME-Zarr")
        done += 1
    return done


def import_external(session: Session, store: FileStore, path: str | os.PathLike, *, link: bool = False,
                    name: str | None = None, author: str = "",
                    progress: Callable[[str, float], None] | None = None) -> DatasetInfo:
    """A stack already on the server (an OME-Zarr, zarr or N5 folder, :class:`~storage.records.external.External`)
    as a new dataset: copied slice by slice into the store, or with ``link`` read where it lies (nothing
    is ever written there; the dataset breaks if the folder goes). Bad input raises ValueError. The folder
    must have been checked and walked first (:func:`storage.records.ingest.import_path` does it); here what its
    metadata declares is checked against the limits (:class:`unet.exchange.limits.Limits`) before a pixel is read."""
    report = progress or (lambda _stage, _fraction: None)
    limits = Limits.from_env()
    source = External(path, limits=limits, linked=link, protected=protected_paths(session, store))
    z_count, y, x = source.shape
    if not link and z_count * y * x * source.dtype.itemsize > limits.stack_bytes:
        raise ValueError(f"{path}: {z_count} × {y} × {x} {source.dtype.name} is "
                         f"{z_count * y * x * source.dtype.itemsize / 2**30:.1f} GiB, more than the "
                         f"{limits.stack_bytes / 2**30:.1f} GiB a stored stack may have ($NEUROSEG_MAX_STACK_BYTES); "
                         "link it instead, or crop it")
    shown = _display_name(Path(str(path).rstrip("/")).name, name)
    row = Dataset(name=shown, z=z_count, y=y, x=x, dtype=source.dtype.name,
                  source_name=f"{source.kind}: {source.path}"[:255],
                  pixel_size_nm=source.pixel_size_nm, sha256="", size_bytes=0, notes="",
                  volume_format=LINK if link else FORMAT, linked_path=str(source.path.resolve()) if link else None)
    if link:
        report("checking the first and last slices", 0.5)
        source[0], source[z_count - 1]
        session.add(row)
        session.flush()
        _claim_folder(store, row.id)  # its masks go there
        report("linked", 1.0)
        return _dataset_info(session, row)
    _check_room(store, source.shape, source.dtype)
    with store.staging() as staging, _new_volume(session, store, row, staging) as writer:
        for z in range(z_count):
            report(f"copying slice {z + 1} of {z_count}", 0.95 * z / z_count)
            writer.write(source[z])
    report("stored", 1.0)
    return _dataset_info(session, row)


def count_datasets(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Dataset)) or 0)


def list_datasets(session: Session) -> list[DatasetInfo]:
    return [_dataset_info(session, r) for r in session.scalars(select(Dataset).order_by(Dataset.id))]


def get_dataset(session: Session, dataset_id: int) -> DatasetInfo:
    row = dataset_row(session, dataset_id)
    return _dataset_info(session, row)


def load_volume(session: Session, store: FileStore, dataset_id: int) -> Volume | External | np.ndarray:
    """The dataset's volume, read lazily (``volume[z]`` reads one slice; see :class:`~storage.records.volumes.Volume`).
    A volume an earlier version stored as TIFF and not converted yet is read whole, as it was then."""
    row = dataset_row(session, dataset_id)
    if row.volume_format == LINK:
        # checked again on every read, cheaply: the folder may have become a link, or left the import
        # folders (or they were turned off); each file is checked again as it is opened (storage.records.server_folders)
        try:
            protected = protected_paths(session, store)
            folder = check_folder(row.linked_path or "", import_roots(), protected)
            return External(folder, linked=True, protected=protected)  # never opened, whatever the folder holds
        except Refused:
            raise IntegrityError(f"the linked stack of dataset #{row.id} may not be read now: its folder is no "
                                 "longer a plain folder inside the import folders this server allows "
                                 "($NEUROSEG_IMPORT_ROOTS)") from None
        except ValueError as exc:
            raise IntegrityError(f"the linked stack of dataset #{row.id} cannot be read: {exc}") from None
    if row.volume_format != FORMAT:
        data = store.read_stack(store.legacy_volume_path(row.id), row.sha256)
        return data.reshape(row.z, row.y, row.x)
    volume = Volume(store.abspath(store.volume_path(row.id)), store.volume_path(row.id))
    if volume.shape != (row.z, row.y, row.x) or volume.sha256 != row.sha256:
        raise IntegrityError(f"stored volume {store.volume_path(row.id)} is not the one recorded for dataset "
                             f"#{row.id} (shape {volume.shape}, expected {(row.z, row.y, row.x)})")
    return volume


def convert_legacy_volumes(session: Session, store: FileStore, say: Callable[[str], None] = log.info) -> int:
    """Move every volume an earlier version stored as one TIFF into the OME-Zarr store, without losing a
    byte: the TIFF's file checksum is verified, it is converted slice by slice, the voxels read back from
    the new store are compared (sha256) with the TIFF's, and only then does the row switch and the TIFF
    go. A failure (a damaged file, a full disk) leaves the TIFF and the row as they were, and says why.
    Returns how many volumes were converted."""
    done = 0
    for row in session.scalars(select(Dataset).where(Dataset.volume_format == "tiff").order_by(Dataset.id)):
        legacy = store.legacy_volume_path(row.id)
        target = store.abspath(store.volume_path(row.id))
        try:
            path = store.verified(legacy, row.sha256)
            info, planes = iter_slices(path, "volume", channels_as_z=True)
            if info.shape != (row.z, row.y, row.x):
                raise ValueError(f"it holds {info.shape}, the dataset says {(row.z, row.y, row.x)}")
            if target.exists():  # a conversion killed after its rename: check it again from the start
                shutil.rmtree(target)
            digest, size = write_volume(target, planes, info.shape, info.dtype, row.pixel_size_nm)
            if Volume(target).voxel_sha256() != digest:
                shutil.rmtree(target)
                raise IntegrityError("the converted voxels do not read back the same")
        except (OSError, ValueError, IntegrityError) as exc:
            say(f"dataset #{row.id}: its volume stays in {legacy} for now: {exc}")
            continue
        row.sha256, row.size_bytes, row.volume_format = digest, size, FORMAT
        session.flush()
        session.commit()  # the row points at the new store before the old file goes
        store.delete_file(legacy)
        say(f"dataset #{row.id}: volume converted to OME-Zarr ({size / 2**20:.1f} MiB)")
        done += 1
    return done


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
    live = [r.id for r in session.scalars(select(Run).where(Run.kind == RunKind.LIVE))
            if int(r.spec.get("dataset_id", -1)) == dataset_id]
    return sorted(set(session.scalars(
        select(RunMask.run_id).join(MaskVersion, RunMask.mask_version_id == MaskVersion.id)
        .where(MaskVersion.dataset_id == dataset_id))) | set(live))


def dataset_row(session: Session, dataset_id: int) -> Dataset:
    row = row_or_missing(session, Dataset, dataset_id, "dataset")
    return row
