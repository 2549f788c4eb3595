"""Predictions as records: a checkpoint applied to some slices of a dataset. :func:`submit_prediction`
records one (QUEUED); :func:`storage.jobs.queue.launch_prediction` starts its process
(:mod:`storage.jobs.predict_worker`), which writes the outputs and the metrics. Reads change nothing."""

from __future__ import annotations

import contextlib
import operator
import os
import re
import shutil
import stat
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from domain.kinds import ACTIVE, PredictionStage, RunStatus
from domain.records import NotFound, PredictionInfo
from storage.models import Checkpoint, Prediction, row_or_missing
from storage.records.datasets import dataset_row
from storage.records.files import EXPORT_ROOT_ENV, FileStore, export_root, inside
from storage.records.volumes import Volume
from storage.settings import PROJECT_ROOT
from unet.exchange.writing import write_tiff_slices
from unet.prediction.postprocess import DEFAULT_METHOD, METHODS


def prediction_info(row: Prediction, run_id: int) -> PredictionInfo:
    stage = row.phase if row.phase in {s.value for s in PredictionStage} else PredictionStage.STARTING
    return PredictionInfo(row.id, row.checkpoint_id, run_id, row.dataset_id, list(row.slices), RunStatus(row.status),
                          row.done, row.error, row.metrics, row.created, row.pid, PredictionStage(stage),
                          row.total or 0, row.postprocess or "watershed", row.owner_id,
                          row.owner.username if row.owner else "", bool(row.tta), row.device or "",
                          row.cancel_requested is not None and row.status in ACTIVE)


def submit_prediction(session: Session, checkpoint_id: int, dataset_id: int, slices: list[int],
                      postprocess: str = DEFAULT_METHOD, tta: bool = False) -> PredictionInfo:
    if postprocess not in METHODS:
        raise ValueError(f"unknown post-processing {postprocess!r}: choose one of {', '.join(METHODS)}")
    checkpoint = row_or_missing(session, Checkpoint, checkpoint_id, "checkpoint")
    dataset = dataset_row(session, dataset_id)
    try:  # (whole numbers only: 1.5 is not quietly slice 1, nor "12" slices 1 and 2)
        slices = sorted({operator.index(z) for z in slices}) if not isinstance(slices, str | bytes) else None
    except TypeError:
        slices = None
    if slices is None:
        raise ValueError("slices are whole numbers, e.g. 0, 3, 7")
    if not slices:
        raise ValueError("choose at least one slice to predict")
    if slices[0] < 0 or slices[-1] >= dataset.z:
        raise ValueError(f"slices must be within 0-{dataset.z - 1}")
    row = Prediction(checkpoint_id=checkpoint_id, dataset_id=dataset_id, slices=slices, status=RunStatus.QUEUED,
                     done=0, file="", sha256="", files={}, postprocess=postprocess,
                     tta=bool(tta))
    session.add(row)
    session.flush()
    return prediction_info(row, checkpoint.run_id)


def cancel_prediction(session: Session, prediction_id: int) -> PredictionInfo:
    """Ask a prediction to stop. A queued one that no process has taken yet is cancelled at once; a running
    one stops after the block it is on, keeping the blocks it wrote (:func:`resume_prediction` goes on from
    them). Asking twice changes nothing; a cancelled one is left as it is."""
    row = row_or_missing(session, Prediction, prediction_id, "prediction")
    if row.status == RunStatus.CANCELLED:  # (a second click, or another tab's: already done)
        return get_prediction(session, prediction_id)
    if row.status not in ACTIVE:
        raise ValueError(f"prediction {prediction_id} is {row.status.lower()}; only a waiting or running one can "
                         "be cancelled")
    now = datetime.now(UTC)
    taken = session.execute(update(Prediction).where(Prediction.id == prediction_id,
                                                     Prediction.status == RunStatus.QUEUED)
                            .values(status=RunStatus.CANCELLED, cancel_requested=now,
                                    error="cancelled before it started")).rowcount == 0
    if taken:  # (its process has it: it stops at its next block)
        session.execute(update(Prediction).where(Prediction.id == prediction_id,
                                                 Prediction.cancel_requested.is_(None)).values(cancel_requested=now))
    session.expire(row)
    return get_prediction(session, prediction_id)


def resume_prediction(session: Session, prediction_id: int) -> PredictionInfo:
    """Queue a FAILED or CANCELLED prediction again (its process was killed, failed or asked to stop); the
    blocks it wrote are kept and the new process does only the rest (:mod:`unet.prediction.blockwise`)."""
    row = row_or_missing(session, Prediction, prediction_id, "prediction")
    if row.status not in (RunStatus.FAILED, RunStatus.CANCELLED):
        raise ValueError(f"prediction {prediction_id} is {row.status.lower()}; only a failed or cancelled one can "
                         "be resumed")
    row.status, row.pid, row.pid_started, row.error = RunStatus.QUEUED, None, None, None
    row.cancel_requested = None
    row.phase = PredictionStage.STARTING
    session.flush()
    return get_prediction(session, prediction_id)


def get_prediction(session: Session, prediction_id: int) -> PredictionInfo:
    row = row_or_missing(session, Prediction, prediction_id, "prediction")
    return prediction_info(row, session.get(Checkpoint, row.checkpoint_id).run_id)


def list_predictions(session: Session, *, dataset_id: int | None = None, run_id: int | None = None
                     ) -> list[PredictionInfo]:
    """The predictions of a dataset, of a run's checkpoints, or all; oldest first."""
    query = select(Prediction, Checkpoint.run_id).join(Checkpoint, Prediction.checkpoint_id == Checkpoint.id)
    if dataset_id is not None:
        query = query.where(Prediction.dataset_id == dataset_id)
    if run_id is not None:
        query = query.where(Checkpoint.run_id == run_id)
    return [prediction_info(row, rid) for row, rid in session.execute(query.order_by(Prediction.id))]


def _finished(session: Session, prediction_id: int, output: str) -> tuple[Prediction, dict[str, str]]:
    row = session.get(Prediction, prediction_id)
    if row is None or row.status != RunStatus.FINISHED or output not in row.files:
        raise NotFound(f"prediction {prediction_id} has no finished {output}")
    return row, row.files[output]


def prediction_file(session: Session, store: FileStore, prediction_id: int, output: str) -> bytes:
    """One output as the bytes of an ImageJ TIFF (written slice by slice from the OME-Zarr output; an
    output of an earlier version is its TIFF, checked against its recorded checksum)."""
    row, entry = _finished(session, prediction_id, output)
    if entry["file"].endswith(".tif"):
        return store.verified(entry["file"], entry["sha256"]).read_bytes()
    with store.spool() as tmp:
        pixel_size = dataset_row(session, row.dataset_id).pixel_size_nm
        write_tiff_slices(load_output(session, store, prediction_id, output), tmp, pixel_size)
        return tmp.read_bytes()


EXPORT_OFF = (f"exporting to a folder on the server is off on this server (an admin turns it on by naming the one "
              f"folder exports go into in ${EXPORT_ROOT_ENV}); download the outputs as TIFF files instead")
_FOLDER_NAME = re.compile(r"[\w-][\w .-]*")


def export_folder(store: FileStore, subfolder: str = "") -> Path:
    """The folder an export goes into: ``$NEUROSEG_EXPORT_ROOT`` (off when unset), or the ``subfolder``
    of it a user names (made when missing). Why so narrow: an export writes wherever the server may write,
    the app's own code included. The user names folders inside the root only: plain names (no ``..``, no
    hidden names), an absolute path only when it lies inside the root, each folder on the way a real one
    (never a link), and never the data directory or the app. ValueError says why not."""
    root = export_root()
    if root is None:
        raise ValueError(EXPORT_OFF)
    text = subfolder.strip()
    given = Path(text)
    if given.is_absolute():
        given = Path(os.path.normpath(given))
        if not inside(given, root):
            raise ValueError(f"exports go into {root} ($NEUROSEG_EXPORT_ROOT) or a folder inside it")
        given = given.relative_to(root)
    parts = given.parts if text else ()
    if any(not _FOLDER_NAME.fullmatch(part) for part in parts):
        raise ValueError("name a folder inside the export folder with plain names (letters, digits, spaces, '-', "
                         "'_' and '.', no '..' and no hidden names), such as lab/2026-12")
    try:
        if not stat.S_ISDIR(os.lstat(root).st_mode):
            raise FileNotFoundError(root)
    except FileNotFoundError:
        raise ValueError(f"the export folder {root} ($NEUROSEG_EXPORT_ROOT) is not a folder on the server: ask an "
                         "admin") from None
    folder = root
    for part in parts:
        folder = folder / part
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o755)
        if not stat.S_ISDIR(os.lstat(folder).st_mode):  # a link (or a file) on the way: never followed
            raise ValueError(f"{folder.relative_to(root)} is not a folder inside the export folder (a link or a "
                             "file); choose another")
    if Path(os.path.realpath(folder)) != folder or any(
            inside(folder, guarded) or inside(guarded, folder) for guarded in (store.root, PROJECT_ROOT)):
        raise ValueError(f"{folder} may not receive exports (it holds or lies in Neuroseg's own files)")
    return folder


def export_prediction(session: Session, store: FileStore, prediction_id: int, subfolder: str = "") -> list[Path]:
    """Copy a finished prediction's outputs into the export folder (:func:`export_folder`) as OME-Zarr
    images (napari and neuroglancer open them; chunk by chunk, never whole), named from its id only:
    ``prediction-<id>-<output>.ome.zarr``, each written beside its final name and renamed when complete.
    Returns the folders written."""
    return _export(session, store, prediction_id, export_folder(store, subfolder))


def _export(session: Session, store: FileStore, prediction_id: int, folder: Path) -> list[Path]:
    row = session.get(Prediction, prediction_id)
    if row is None or row.status != RunStatus.FINISHED:
        raise NotFound(f"prediction {prediction_id} has no finished outputs")
    written = []
    for name in row.files:
        load_output(session, store, prediction_id, name)  # refuses a damaged or missing output by name
        entry = row.files[name]
        source = store.abspath(entry["file"])
        target = folder / f"prediction-{int(prediction_id)}-{name}.ome.zarr"
        if target.exists():
            raise ValueError(f"{target} exists already; choose another folder or remove it")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            if entry["file"].endswith(".tif"):  # an output of an earlier version not converted yet
                raise ValueError(f"{entry['file']} is a TIFF of an earlier version; download it instead")
            shutil.copytree(source, partial)
            partial.rename(target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        written.append(target)
    return written


def load_output(session: Session, store: FileStore, prediction_id: int, output: str) -> Volume | np.ndarray:
    """One output, shape (slices, Y, X): probabilities, mask or instances; an OME-Zarr output is read
    lazily (``output[i]`` reads the i-th predicted slice)."""
    row, entry = _finished(session, prediction_id, output)
    if entry["file"].endswith(".tif"):  # written by an earlier version
        data = store.read_stack(entry["file"], entry["sha256"])
        return data.reshape(len(row.slices), *data.shape[-2:])
    return Volume(store.abspath(entry["file"]), entry["file"])
