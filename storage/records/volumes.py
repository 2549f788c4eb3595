"""Volumes in the file store as OME-Zarr (NGFF 0.5 on zarr v3): written slice by slice, read lazily.

Why zarr-python with ome-zarr-py (and not tensorstore): both are the libraries napari, ome-zarr's
viewers and the BioImage.IO tools read with, they install from PyPI as pure Python wheels on every
platform we run on, and ome-zarr writes the multiscale metadata that napari and neuroglancer expect.

The layout of ``datasets/<id>/volume.ome.zarr``:

- level ``0``: the stack at full resolution, ``(Z, Y, X)``, chunks of one slice by ``CHUNK``² pixels,
  so a page reads one slice or one tile, never the stack;
- levels ``1, 2, …``: each slice halved in Y and X (the mean of 2 × 2 pixels) until the longest side is
  at most ``COARSEST`` pixels: the overview a page shows of a slice larger than its canvas;
- every chunk compressed with zstd and closed with a CRC32C checksum (a damaged chunk is refused when
  read, not returned as wrong pixels), and every chunk written even when it is all zeros, so a missing
  chunk file is an error (zarr would otherwise read it as zeros).

A volume is written into a ``.partial-…`` folder beside its final name and renamed when whole: a crash
leaves either no volume or a complete one (:func:`remove_partials` clears the leftovers). The dataset
row's ``sha256`` is the digest of the voxels themselves (C order, slice after slice), the same whatever
the file format: the migration from the old TIFF files compares it before the old file goes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from skimage.transform import downscale_local_mean
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from storage.records.external import External
from storage.records.files import IntegrityError
from unet.exchange.io import CHUNK

COARSEST = 512  # the pyramid stops when a level's longest side is at most this
FORMAT = "ome-zarr"


class DiskFull(OSError):
    """The disk filled while a volume was being written (nothing of it is left behind)."""


class _MissingChunk(KeyError):
    pass


class _StrictStore(LocalStore):
    """A read-only local store for which a missing chunk is an error, not the fill value."""

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        buffer = await super().get(key, prototype, byte_range)
        if buffer is None and "/c/" in f"/{key}":
            raise _MissingChunk(key)
        return buffer


def level_shapes(y: int, x: int) -> list[tuple[int, int]]:
    """The (Y, X) size of every pyramid level, full resolution first."""
    shapes = [(y, x)]
    while max(shapes[-1]) > COARSEST:
        py, px = shapes[-1]
        shapes.append(((py + 1) // 2, (px + 1) // 2))
    return shapes


def halve(plane: np.ndarray) -> np.ndarray:
    """A slice at half the resolution: the mean of each 2 × 2 block (the last row or column repeated
    when the size is odd), in the slice's own dtype."""
    pad = ((0, plane.shape[0] % 2), (0, plane.shape[1] % 2))
    small = downscale_local_mean(np.pad(plane, pad, mode="edge"), (2, 2))
    if plane.dtype.kind in "ui":
        small = np.rint(small)
    return small.astype(plane.dtype)


class VolumeWriter:
    """Write a volume slice by slice (``write`` in Z order, then ``finish``); ``abort`` removes it all.

    Args:
        path: the final folder (``…/volume.ome.zarr``); it must not exist yet.
        shape: ``(Z, Y, X)``.
        dtype: uint8, uint16 or float32.
        pixel_size_nm: the lateral pixel size, when known (written as the OME-Zarr scale).
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int, int], dtype: np.dtype | str,
                 pixel_size_nm: float | None = None, name: str = "volume"):
        self.path = Path(path)
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        self.pixel_size_nm, self.name = pixel_size_nm, name
        self.partial = self.path.with_name(f"{self.path.name}.partial-{uuid.uuid4().hex[:12]}")
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.digest = hashlib.sha256()
        self.next_z = 0
        self.low, self.high = np.inf, -np.inf
        try:
            group = zarr.open_group(LocalStore(self.partial), mode="w", zarr_format=3)
            z = self.shape[0]
            self.levels = [
                group.create_array(str(i), shape=(z, ly, lx), chunks=(1, min(CHUNK, ly), min(CHUNK, lx)),
                                   dtype=self.dtype, compressors=[ZstdCodec(level=3), Crc32cCodec()],
                                   fill_value=0, config={"write_empty_chunks": True})
                for i, (ly, lx) in enumerate(level_shapes(*self.shape[1:]))]
            self.group = group
        except BaseException as exc:
            self.abort()
            raise _disk_full(exc) from exc

    def write(self, plane: np.ndarray) -> None:
        """The next slice (``(Y, X)``, the volume's dtype)."""
        plane = np.ascontiguousarray(plane)
        if plane.shape != self.shape[1:] or plane.dtype != self.dtype:
            raise ValueError(f"slice {self.next_z} is {plane.shape} {plane.dtype}, expected "
                             f"{self.shape[1:]} {self.dtype}")
        if self.next_z >= self.shape[0]:
            raise ValueError(f"the volume has {self.shape[0]} slices; no room for another")
        try:
            self.digest.update(plane.data)
            if plane.size:
                self.low, self.high = min(self.low, float(plane.min())), max(self.high, float(plane.max()))
            for i, level in enumerate(self.levels):
                if i:
                    plane = halve(plane)
                level[self.next_z] = plane
        except BaseException as exc:
            self.abort()
            raise _disk_full(exc) from exc
        self.next_z += 1

    def finish(self) -> tuple[str, int]:
        """Write the OME-Zarr metadata, make the files durable and put the folder in place; returns the
        voxels' sha256 and the bytes on disk."""
        from ome_zarr.writer import write_multiscales_metadata  # loads dask (1.4 s): kept off the server start

        if self.next_z != self.shape[0]:
            self.abort()
            raise ValueError(f"the volume got {self.next_z} of its {self.shape[0]} slices")
        try:
            xy = float(self.pixel_size_nm or 1.0)
            unit = {"unit": "nanometer"} if self.pixel_size_nm else {}
            datasets = [{"path": str(i), "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, xy * 2 ** i, xy * 2 ** i]}]} for i in range(len(self.levels))]
            write_multiscales_metadata(self.group, datasets=datasets, name=self.name,
                                       axes=[{"name": a, "type": "space", **unit} for a in "zyx"])
            self.group.attrs["neuroseg"] = {"sha256": self.digest.hexdigest(), "min": _finite(self.low),
                                            "max": _finite(self.high)}
            size = _fsync_tree(self.partial)
            os.replace(self.partial, self.path)
            fsync_dir(self.path.parent)
        except BaseException as exc:
            self.abort()
            raise _disk_full(exc) from exc
        return self.digest.hexdigest(), size

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _disk_full(exc: BaseException) -> BaseException:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not isinstance(exc, DiskFull):
        return DiskFull(errno.ENOSPC, "the disk of the data directory is full; nothing of this stack was kept. "
                        "Free some space (or delete old predictions) and try again")
    return exc


def _fsync_tree(folder: Path) -> int:
    size = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                size += os.fstat(fd).st_size
            finally:
                os.close(fd)
        fsync_dir(Path(root))
    return size


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_partials(root: Path) -> int:
    """Remove the half-written volumes a killed process left under ``root``; returns how many."""
    gone = 0
    for path in [*Path(root).glob("datasets/*/*.partial-*"), *Path(root).glob("predictions/*/*.partial-*")]:
        shutil.rmtree(path, ignore_errors=True)
        gone += 1
    return gone


class _Level:
    """One pyramid level, read-only: ``level[z]``, ``level[z, y0:y1, x0:x1]``; damage raises IntegrityError."""

    def __init__(self, array: zarr.Array, label: str):
        self._array, self._label = array, label
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self._array[key])
        except _MissingChunk as exc:
            raise IntegrityError(f"stored volume {self._label}: chunk {exc.args[0]} is missing") from None
        except (FileNotFoundError, PermissionError) as exc:
            raise IntegrityError(f"stored volume {self._label} cannot be read ({exc})") from None
        except (ValueError, RuntimeError) as exc:
            raise IntegrityError(f"stored volume {self._label}: a chunk is damaged ({exc})") from None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[...]
        return data if dtype is None else data.astype(dtype)


class Volume(_Level):
    """A stored volume, read lazily: index it like a ``(Z, Y, X)`` array (``volume[z]`` reads one slice);
    ``levels`` holds the pyramid, full resolution first; ``value_range`` the voxels' min and max."""

    def __init__(self, path: str | os.PathLike, label: str | None = None):
        path = Path(path)
        label = label or path.name
        self.path = path
        if not (path / "zarr.json").is_file():
            raise IntegrityError(f"stored volume {label} is missing")
        try:
            group = zarr.open_group(_StrictStore(path, read_only=True), mode="r")
            multiscale = group.attrs["ome"]["multiscales"][0]
            arrays = [group[d["path"]] for d in multiscale["datasets"]]
            own = dict(group.attrs.get("neuroseg", {}))
        except (KeyError, IndexError, TypeError, ValueError, OSError) as exc:
            raise IntegrityError(f"stored volume {label}: its metadata cannot be read ({exc})") from None
        super().__init__(arrays[0], label)
        self.levels = [self] + [_Level(a, label) for a in arrays[1:]]
        self.sha256: str = own.get("sha256", "")
        self.value_range = (own.get("min"), own.get("max"))

    def iter_slices(self) -> Iterator[np.ndarray]:
        for z in range(self.shape[0]):
            yield self[z]

    def voxel_sha256(self) -> str:
        """The digest of the voxels as read back now (every chunk read and checked)."""
        digest = hashlib.sha256()
        for plane in self.iter_slices():
            digest.update(np.ascontiguousarray(plane).data)
        return digest.hexdigest()


def write_volume(path: str | os.PathLike, slices: Iterator[np.ndarray] | np.ndarray, shape: tuple[int, int, int],
                 dtype: np.dtype | str, pixel_size_nm: float | None = None) -> tuple[str, int]:
    """Write a whole volume from its slices; returns (voxel sha256, bytes on disk)."""
    writer = VolumeWriter(path, shape, dtype, pixel_size_nm)
    try:
        for plane in slices:
            writer.write(plane)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


def open_block_volume(path: str, linked: bool = False, protected: tuple[str, ...] = ()) -> Volume | External:
    """A dataset's volume for the blockwise engine (``unet.prediction.blocks.BlockJob.opener``, bound with
    ``functools.partial``): its OME-Zarr volume in the store, or a linked stack on the server read through
    the guarded reader with the store's protected files in hand."""
    if linked:
        return External(path, linked=True, protected=[Path(p) for p in protected])
    return Volume(path)
