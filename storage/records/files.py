"""The file store: bytes under the data directory, named from database ids only (never from what a user
typed), written atomically (temporary file, fsync, rename) and checked against their sha256 on read."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from unet.exchange.writing import write_tiff_atomic


class IntegrityError(RuntimeError):
    """A stored file is missing or its bytes are not the ones recorded."""


IMPORT_ROOTS_ENV = "NEUROSEG_IMPORT_ROOTS"
EXPORT_ROOT_ENV = "NEUROSEG_EXPORT_ROOT"


STAGING = "staging-"  # the name of a staging folder in tmp/ (FileStore.staging) starts so


def import_roots() -> list[Path]:
    """The folders a user may import stacks from (``$NEUROSEG_IMPORT_ROOTS``, separated by ``:``),
    resolved; none (the default) turns importing from the server off. Why off by default: the server's
    user can read far more than its users should (keys, other labs' data, Neuroseg's own database)."""
    raw = os.environ.get(IMPORT_ROOTS_ENV, "")
    return [Path(r).expanduser().resolve() for r in raw.split(os.pathsep) if r.strip()]


def export_root() -> Path | None:
    """The one folder exports to the server go into (``$NEUROSEG_EXPORT_ROOT``, resolved); None (the
    default) turns them off: a download is all a user gets."""
    raw = os.environ.get(EXPORT_ROOT_ENV, "").strip()
    return Path(raw).expanduser().resolve() if raw else None


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (both already resolved)."""
    return path == folder or folder in path.parents


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FileStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    # names: ids only
    def dataset_dir(self, dataset_id: int) -> str:
        return f"datasets/{int(dataset_id)}"

    def volume_path(self, dataset_id: int) -> str:
        """The dataset's volume: an OME-Zarr folder (:mod:`storage.records.volumes`)."""
        return f"{self.dataset_dir(dataset_id)}/volume.ome.zarr"

    def legacy_volume_path(self, dataset_id: int) -> str:
        """Where versions before the OME-Zarr store kept a volume (one TIFF), until it is converted."""
        return f"{self.dataset_dir(dataset_id)}/volume.tif"

    def mask_path(self, dataset_id: int, mask_id: int) -> str:
        return f"{self.dataset_dir(dataset_id)}/masks/{int(mask_id)}.tif"

    def draft_path(self, dataset_id: int, draft_id: int) -> str:
        return f"{self.dataset_dir(dataset_id)}/drafts/{int(draft_id)}.tif"

    def run_folder(self, run_id: int) -> str:
        """The folder of a training run: its checkpoints and its worker's log."""
        return f"runs/{int(run_id)}"

    def run_dir(self, run_id: int) -> Path:
        return self.root / self.run_folder(run_id)

    def live_slice(self, run_id: int, slice_index: int) -> str:
        """A live session's newest prediction of a slice (uint8 probabilities, NumPy's format)."""
        return f"{self.run_folder(run_id)}/live/{int(slice_index)}.npy"

    def live_uncertainty(self, run_id: int, slice_index: int) -> str:
        """Beside it: how much it changed from the prediction of the weights before (uint8, 255 = all)."""
        return f"{self.run_folder(run_id)}/live/{int(slice_index)}-uncertainty.npy"

    def worker_log(self, run_id: int) -> Path:
        return self.run_dir(run_id) / "worker.log"

    def prediction_folder(self, prediction_id: int) -> str:
        """The folder of a prediction: its output TIFFs and its process's log."""
        return f"predictions/{int(prediction_id)}"

    def prediction_output(self, prediction_id: int, output: str) -> str:
        """One output of a prediction: an OME-Zarr image (:mod:`unet.prediction.blocks`); earlier versions wrote
        ``<output>.tif``, recorded as such on their rows."""
        return f"{self.prediction_folder(prediction_id)}/{output}.ome.zarr"

    def prediction_log(self, prediction_id: int) -> Path:
        return self.root / self.prediction_folder(prediction_id) / "predict.log"

    def tmp_file(self, suffix: str = ".tif") -> Path:
        """A fresh temporary file's path, not locked: :meth:`clean_spool` removes it at the next start
        unless it is gone by then (the store's own code uses :meth:`spool`)."""
        folder = self.root / "tmp"
        folder.mkdir(exist_ok=True)
        return folder / f"{uuid.uuid4().hex}{suffix}"

    @contextlib.contextmanager
    def spool(self, suffix: str = ".tif") -> Iterator[Path]:
        """A fresh temporary file (an upload being received, a TIFF being made for a download), removed when
        the block ends. The file is locked (``flock``, shared) as long as it is in use, so that
        :meth:`clean_spool` at a server's start removes every spool file a killed process left, and none
        that another server on the same data directory is still using."""
        folder = self.root / "tmp"
        folder.mkdir(exist_ok=True)
        path = folder / f"{uuid.uuid4().hex}{suffix}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield path
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh folder for files made before their row exists (a dataset's volume while it converts: no
        database write is held meanwhile), removed with what is left in it when the block ends. Its ``.lock``
        is held as a spool file is, so :meth:`clean_spool` removes the staging folders a killed process left
        and none that another server on the same data directory is still filling."""
        name = uuid.uuid4().hex
        making = self.root / "tmp" / f".making-{name}"  # (locked before it takes the name a cleaner looks for)
        making.mkdir(parents=True)
        fd = os.open(making / ".lock", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        folder = self.root / "tmp" / f"{STAGING}{name}"
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.rename(making, folder)
            yield folder
        finally:
            shutil.rmtree(folder if folder.exists() else making, ignore_errors=True)
            os.close(fd)

    def _clean_staging(self, path: str) -> int:
        """Remove a staging folder nobody holds (returns 1); one in use raises ``BlockingIOError`` and stays."""
        try:
            fd = os.open(os.path.join(path, ".lock"), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:  # (killed before its lock was made)
            shutil.rmtree(path, ignore_errors=True)
            return 1
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: in use
            shutil.rmtree(path, ignore_errors=True)
            return 1
        finally:
            os.close(fd)

    def clean_spool(self) -> int:
        """Remove the spool files no process uses (left by a killed server or worker: an upload of gigabytes
        each); returns how many went. A file another process holds locked (:meth:`spool`) is kept. Called
        at every server start."""
        gone = 0
        folder = self.root / "tmp"
        if not folder.is_dir():
            return 0
        for entry in os.scandir(folder):
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode) and entry.name.startswith(STAGING):
                    gone += self._clean_staging(entry.path)
                    continue
                if not stat.S_ISREG(mode) or entry.stat(follow_symlinks=False).st_nlink > 1:
                    if not stat.S_ISDIR(mode):  # a link is removed, never opened: only the store writes here
                        os.unlink(entry.path)
                        gone += 1
                    continue
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: in use
                    os.unlink(entry.path)
                    gone += 1
                finally:
                    os.close(fd)
            except OSError:
                continue
        return gone

    def abspath(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if self.root not in path.parents:
            raise ValueError(f"refusing a path outside the data directory: {relative!r}")
        return path

    def write_stack(self, relative: str, data: np.ndarray, pixel_size_nm: float | None = None) -> tuple[str, int]:
        """Write a (Z, Y, X) or (Y, X) array as an ImageJ TIFF; return (sha256, size in bytes)."""
        path = write_tiff_atomic(self.abspath(relative), data, pixel_size_nm=pixel_size_nm)
        return sha256_of(path), path.stat().st_size

    def verified(self, relative: str, sha256: str) -> Path:
        """The absolute path of a stored file, after checking it is there and matches its checksum."""
        path = self.abspath(relative)
        if not path.is_file():
            raise IntegrityError(f"stored file {relative} is missing")
        if sha256_of(path) != sha256:
            raise IntegrityError(f"stored file {relative} does not match its recorded checksum (damaged?)")
        return path

    def read_stack(self, relative: str, sha256: str) -> np.ndarray:
        return tifffile.imread(self.verified(relative, sha256))

    def count_files(self, relative: str) -> int:
        """How many stored files a folder holds; an OME-Zarr volume (a folder of chunks) counts as one."""
        path = self.abspath(relative)
        return _count_stored(path) if path.exists() else 0

    def delete_file(self, relative: str) -> int:
        """Remove one stored file; return 1 when it was there."""
        path = self.abspath(relative)
        if not path.is_file():
            return 0
        path.unlink()
        path.with_name(path.name + ".checked.json").unlink(missing_ok=True)  # a TorchScript file's verdict
        return 1

    def delete_tree(self, relative: str) -> int:
        """Remove a folder of the store; return how many files went."""
        path = self.abspath(relative)
        if not path.exists():
            return 0
        count = _count_stored(path)
        shutil.rmtree(path)
        return count


def _count_stored(folder: Path) -> int:
    if folder.name.endswith(".ome.zarr"):
        return 1
    count = 0
    for entry in folder.iterdir():
        count += _count_stored(entry) if entry.is_dir() else 1
    return count
