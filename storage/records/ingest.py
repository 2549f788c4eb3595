"""Getting stacks into the store: an upload (spooled to disk once, then validated completely and stored, or
refused with a message that names the user's file), the synthetic demo stack, and the ISBI 2012 sample.
Refusals raise :class:`~domain.records.UserError`; nothing is stored then."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from domain.records import AlreadyLoaded, ChannelsQuestion, DatasetInfo, UserError
from storage.records import datasets
from storage.records.files import IMPORT_ROOTS_ENV, FileStore, import_roots
from storage.records.server_folders import Refused, check_folder, check_tree
from storage.settings import PROJECT_ROOT
from unet.exchange.io import ChannelsMaybeSlices
from unet.exchange.writing import write_tiff_atomic
from unet.training.synthetic import make_synthetic_em

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
ISBI_FILES = ("train-volume.tif", "train-labels.tif")
DEMO_SHAPE = (8, 256, 256)
DEMO_NAME = "Demo: synthetic EM"
DEMO_SOURCE = "synthetic (unet.training.synthetic, seed 2012)"
ISBI_NAME = "ISBI 2012 training stack"


def isbi_dir() -> Path | None:
    """Where the ISBI 2012 files are: ``$NEUROSEG_ISBI_DIR``, else ``../shared/data/isbi2012`` beside the
    project; None when the files are not there."""
    folder = Path(os.environ.get("NEUROSEG_ISBI_DIR") or PROJECT_ROOT.parent / "shared" / "data" / "isbi2012")
    return folder if all((folder / f).is_file() for f in ISBI_FILES) else None


def disk_message(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "the disk holding the data directory is full: free some space and try again (nothing was stored)"
    return f"could not write to the data directory: {exc.strerror or exc} (nothing was stored)"


def _spool(path: Path, upload: BinaryIO, progress: Progress, what: str, start: float, span: float) -> Path:
    """Copy an upload to a spool file (:meth:`FileStore.spool`) once (then it is read from disk, not from
    memory)."""
    total = getattr(upload, "size", None) or 0
    upload.seek(0)
    done = 0
    with open(path, "wb") as out:
        while chunk := upload.read(16 << 20):
            out.write(chunk)
            done += len(chunk)
            progress(f"receiving the {what} ({done / 2**20:.0f} MiB)", start + span * min(1.0, done / total)
                     if total else start)
    return path


def import_upload(sessions: sessionmaker[Session], store: FileStore, volume: BinaryIO, labels: BinaryIO | None = None,
                  *, name: str = "", notes: str = "", author: str = "", progress: Progress | None = None,
                  channels_as_z: bool = False, labels_as: str = "auto") -> DatasetInfo:
    """Store an uploaded volume (and its labels, read as ``labels_as``: :data:`unet.training.labels.LABEL_SCHEMES`)
    as a new dataset. A grey file of "channels" raises :class:`ChannelsQuestion`; ``channels_as_z=True`` then
    reads them as Z slices."""
    report = progress or (lambda _stage, _fraction: None)
    with contextlib.ExitStack() as spools:  # the spool files go when this ends (or at the next start)
        spooled: list[Path] = []
        try:
            spooled.append(_spool(spools.enter_context(store.spool()), volume, report, "volume", 0.0,
                                  0.15 if labels is not None else 0.2))
            if labels is not None:
                spooled.append(_spool(spools.enter_context(store.spool()), labels, report, "labels", 0.15, 0.05))
        except OSError as exc:
            raise UserError(disk_message(exc)) from exc
        display = name.strip() or Path(getattr(volume, "name", "") or "upload").stem
        return import_files(sessions, store, spooled[0], spooled[1] if labels is not None else None, display,
                            notes=notes, author=author, progress=lambda stage, f: report(stage, 0.2 + 0.8 * f),
                            source_name=getattr(volume, "name", ""), labels_name=getattr(labels, "name", ""),
                            channels_as_z=channels_as_z, labels_as=labels_as)


def import_files(sessions: sessionmaker[Session], store: FileStore, volume: Path, labels: Path | None, name: str, *,
                 notes: str = "", author: str = "", progress: Progress | None = None, source_name: str = "",
                 labels_name: str = "", channels_as_z: bool = False, labels_as: str = "auto") -> DatasetInfo:
    """Store a volume file (and its labels) as a new dataset, in one transaction."""
    try:
        with sessions.begin() as s:
            info = datasets.import_dataset(s, store, volume, labels, name=name, author=author,
                                           source_name=source_name or None, progress=progress,
                                           channels_as_z=channels_as_z, labels_as=labels_as)
            return datasets.update_dataset(s, info.id, notes=notes) if notes else info
    except ValueError as exc:
        message = str(exc)
        if source_name:  # spooled copies have made-up names: say the user's
            message = message.replace(volume.name, source_name)
            if labels is not None:
                message = message.replace(labels.name, labels_name or "the labels")
        if isinstance(exc, ChannelsMaybeSlices):
            raise ChannelsQuestion(message, exc.count) from exc
        raise UserError(message) from exc
    except OSError as exc:
        raise UserError(disk_message(exc)) from exc


IMPORT_OFF = ("importing folders on the server is off on this server: an admin turns it on by naming the folders "
              f"it may import from in ${IMPORT_ROOTS_ENV} (separated by ':') and restarting Neuroseg")


def allowed_path(store: FileStore, path: str, protected: list[Path] | None = None) -> Path:
    """The folder a user asked to import, resolved, if this server lets them read it: importing is on
    (``$NEUROSEG_IMPORT_ROOTS`` names folders; off by default), the path is absolute and resolves inside
    one of them, is not a link, neither lies in nor holds the data directory or the database
    (``protected``), and the folder's whole tree holds plain folders and plain single-name files only
    (:func:`storage.records.server_folders.check_tree`, walked before zarr or the N5 reader opens a file). Every refusal
    says the same words (:data:`storage.records.server_folders.REFUSED`): which server paths exist is none of a user's
    business."""
    roots = import_roots()
    if not roots:
        raise UserError(IMPORT_OFF)
    if not path.strip():
        raise UserError("type the path of a folder on the server")
    try:
        folder = check_folder(path.strip(), roots, [store.root, *(protected or [])])
        check_tree(folder, [store.root, *(protected or [])])
    except Refused as exc:
        log.warning(f"import of {path.strip()!r} refused: {exc.reason}")
        raise UserError(str(exc)) from None
    return folder


def import_path(sessions: sessionmaker[Session], store: FileStore, path: str, *, link: bool = False, name: str = "",
                author: str = "", progress: Progress | None = None) -> DatasetInfo:
    """An OME-Zarr, zarr or N5 folder on the server as a new dataset, copied or (``link``) read in place
    (:func:`storage.records.datasets.import_external`), once :func:`allowed_path` lets it be read; refusals raise
    :class:`UserError`, nothing is stored then."""
    with sessions() as s:
        protected = datasets.protected_paths(s, store)
    folder = allowed_path(store, path, protected)  # outside any transaction: the walk may take a while
    try:
        with sessions.begin() as s:
            return datasets.import_external(s, store, folder, link=link, name=name.strip() or None, author=author,
                                            progress=progress)
    except Refused as exc:  # a file changed since the walk
        log.warning(f"import of {path.strip()!r} refused: {exc.reason}")
        raise UserError(str(exc)) from None
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    except OSError as exc:
        raise UserError(disk_message(exc)) from exc


def _refuse_second_copy(sessions: sessionmaker[Session], what: str, source_name: str,
                        shape: tuple[int, int, int] | None = None) -> None:
    """A sample is loaded once: a second click finds the copy already there (even renamed)."""
    with sessions.begin() as s:
        stored = datasets.list_datasets(s)
    for info in stored:
        if info.source_name == source_name and (shape is None or info.shape == shape):
            raise AlreadyLoaded(f"the {what} is already loaded as **{info.name}** (#{info.id})", info.id)


def load_demo(sessions: sessionmaker[Session], store: FileStore, author: str = "") -> DatasetInfo:
    """The synthetic EM stack with its labels, so a newcomer can try everything in a minute."""
    _refuse_second_copy(sessions, DEMO_NAME, DEMO_SOURCE)
    volume, labels = make_synthetic_em(DEMO_SHAPE, np.random.default_rng(2012))
    with store.spool() as volume_path, store.spool() as labels_path:
        write_tiff_atomic(volume_path, volume)
        write_tiff_atomic(labels_path, labels)
        return import_files(sessions, store, volume_path, labels_path, DEMO_NAME, author=author,
                            source_name=DEMO_SOURCE,
                            notes="A synthetic stack made by unet.training.synthetic: Voronoi cells with dark "
                                  "membranes, organelles and noise, with exact labels.")


def load_isbi(sessions: sessionmaker[Session], store: FileStore, author: str = "",
              progress: Progress | None = None) -> DatasetInfo:
    folder = isbi_dir()
    if folder is None:
        raise UserError("the ISBI 2012 files are not here: put train-volume.tif and train-labels.tif in "
                        "../shared/data/isbi2012/ or point NEUROSEG_ISBI_DIR at their folder")
    _refuse_second_copy(sessions, ISBI_NAME, ISBI_FILES[0], (30, 512, 512))
    return import_files(sessions, store, folder / ISBI_FILES[0], folder / ISBI_FILES[1], ISBI_NAME, author=author,
                        progress=progress, source_name=ISBI_FILES[0],
                        notes="ISBI 2012 EM segmentation challenge (Drosophila VNC, ssTEM). Cardona et al. 2010, "
                              "PLoS Biol 8(10):e1000502; Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142.")
