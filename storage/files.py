"""The file store: bytes under the data directory, named from database ids only (never from what a user
typed), written atomically (temporary file, fsync, rename) and checked against their sha256 on read."""

from __future__ import annotations

import hashlib
import shutil
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
        return f"{self.dataset_dir(dataset_id)}/volume.tif"

    def mask_path(self, dataset_id: int, mask_id: int) -> str:
        return f"{self.dataset_dir(dataset_id)}/masks/{int(mask_id)}.tif"

    def run_dir(self, run_id: int) -> Path:
        """The folder of a training run: its checkpoints and its worker's log."""
        return self.root / "runs" / str(int(run_id))

    def draft_path(self, dataset_id: int, draft_id: int) -> str:
        return f"{self.dataset_dir(dataset_id)}/drafts/{int(draft_id)}.tif"

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
        path = self.abspath(relative)
        return sum(1 for p in path.rglob("*") if p.is_file()) if path.exists() else 0

    def delete_tree(self, relative: str) -> int:
        """Remove a folder of the store; return how many files went."""
        path = self.abspath(relative)
        if not path.exists():
            return 0
        count = sum(1 for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path)
        return count
