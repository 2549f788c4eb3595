"""The file store: bytes under the data directory, named from database ids only (never from what a user
typed), written atomically (temporary file, fsync, rename) and checked against their sha256 on read."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import tifffile

from unet.io import write_tiff_atomic


class IntegrityError(RuntimeError):
    """A stored file is missing or its bytes are not the ones recorded."""


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
        """The dataset's volume: an OME-Zarr folder (:mod:`storage.volumes`)."""
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

    def worker_log(self, run_id: int) -> Path:
        return self.run_dir(run_id) / "worker.log"

    def prediction_folder(self, prediction_id: int) -> str:
        """The folder of a prediction: its output TIFFs and its process's log."""
        return f"predictions/{int(prediction_id)}"

    def prediction_output(self, prediction_id: int, output: str) -> str:
        """One output of a prediction: an OME-Zarr image (:mod:`storage.blockwise`); earlier versions wrote
        ``<output>.tif``, recorded as such on their rows."""
        return f"{self.prediction_folder(prediction_id)}/{output}.ome.zarr"

    def prediction_log(self, prediction_id: int) -> Path:
        return self.root / self.prediction_folder(prediction_id) / "predict.log"

    def tmp_file(self, suffix: str = ".tif") -> Path:
        """A fresh temporary file's path (an upload being received); see :meth:`remove_stale_tmp`."""
        folder = self.root / "tmp"
        folder.mkdir(exist_ok=True)
        return folder / f"{uuid.uuid4().hex}{suffix}"

    def remove_stale_tmp(self, older_than_s: float = 24 * 3600) -> None:
        """Temporary upload copies left behind by a killed server (a day old: another server on the same
        data directory may be receiving one right now)."""
        for path in (self.root / "tmp").glob("*.tif"):
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > older_than_s:
                    path.unlink()

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
