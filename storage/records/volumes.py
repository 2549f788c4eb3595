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
import itertools
import json
import math
import os
import re
import shutil
import stat
import struct
import uuid
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, ZstdCodec
from zarr.storage import LocalStore

from storage.records.files import IntegrityError, import_roots, inside
from unet.exchange.io import CHUNK
from unet.exchange.limits import Limits

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
    from skimage.transform import downscale_local_mean

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
        from ome_zarr.writer import write_multiscales_metadata

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
            _fsync_dir(self.path.parent)
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
        _fsync_dir(Path(root))
    return size


def _fsync_dir(folder: Path) -> None:
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


# --- stacks on the server, read where they lie ----------------------------------------------------------

#: What every refusal of a path says, whatever the reason: a refusal tells nothing of what the server holds.
REFUSED = ("this path cannot be imported: it must be an OME-Zarr, zarr or N5 folder inside the import folders "
           "this server allows, with no links or special files")
#: The files zarr (and the N5 reader) read whole to learn what an array is: a few kilobytes when honest.
METADATA_FILES = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata", "attributes.json"})
MAX_METADATA_BYTES = 1 << 20
#: Chunks so small that one slice needs more files than this are refused (a slice would take minutes).
MAX_CHUNKS_PER_SLICE = 1 << 16
#: A folder with more entries than this, or nested deeper, is refused before it is read (the walk alone of
#: an endless tree would keep a server busy, and no stack needs it).
MAX_TREE_ENTRIES = 1_000_000
MAX_TREE_DEPTH = 32
_SAFE_KEY = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


class Refused(ValueError):
    """A path (or a file under it) that may not be read. Its message is :data:`REFUSED` whatever the reason;
    ``reason`` is for the server's log and the tests, never for the user."""

    def __init__(self, reason: str):
        super().__init__(REFUSED)
        self.reason = reason


def _identity(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # a stat opens nothing
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_folder(path: str | os.PathLike, roots: Sequence[Path], protected: Sequence[Path] = ()) -> Path:
    """The folder ``path`` names, resolved, if this server may read it: an absolute path to a real folder
    (not a link to one) that resolves inside one of ``roots`` and neither lies in nor holds a ``protected``
    path (the data directory, the database file and its folder). :class:`Refused` otherwise. Cheap (one
    ``lstat``, no walk): a linked dataset checks it on every read, since its folder may change."""
    if not roots:
        raise Refused("importing from the server is off (no import folders)")
    given = Path(str(path)).expanduser()
    if not given.is_absolute():
        raise Refused("not an absolute path")
    resolved = Path(os.path.realpath(given))
    if not any(inside(resolved, root) for root in roots):
        raise Refused("outside the import folders")
    for guarded in protected:
        guarded = Path(os.path.realpath(guarded))
        if inside(resolved, guarded) or inside(guarded, resolved):
            raise Refused(f"holds or lies in the protected {guarded}")
    try:
        st = os.lstat(given)
    except OSError:
        raise Refused("nothing there, or not readable") from None
    if not stat.S_ISDIR(st.st_mode):
        raise Refused("not a folder (or a link to one)")
    return resolved


def check_tree(top: Path, protected: Sequence[Path] = ()) -> int:
    """Walk a folder before zarr or the N5 reader opens anything in it, following no link: every entry must
    be a folder or a plain file with one name (a hard link may be the database: reading it in the server
    drops SQLite's locks and loses later commits), never a symlink, a device, a FIFO or a socket, nor a
    ``protected`` file or folder by identity (a bind mount); metadata files must be small; at most
    :data:`MAX_TREE_ENTRIES` entries, :data:`MAX_TREE_DEPTH` folders deep. Returns how many files it holds;
    :class:`Refused` otherwise (nothing has been opened but folders)."""
    banned = {ident for ident in map(_identity, protected) if ident}
    pending, files, seen = [(str(top), 0)], 0, 0
    try:
        while pending:
            folder, depth = pending.pop()
            with os.scandir(folder) as entries:
                for entry in entries:
                    seen += 1
                    if seen > MAX_TREE_ENTRIES:
                        raise Refused(f"{top} holds more than {MAX_TREE_ENTRIES:,} files and folders")
                    st = entry.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) in banned:
                        raise Refused(f"{entry.path} is a protected file or folder")
                    if stat.S_ISDIR(st.st_mode):
                        if depth + 1 > MAX_TREE_DEPTH:
                            raise Refused(f"{entry.path} lies more than {MAX_TREE_DEPTH} folders deep")
                        pending.append((entry.path, depth + 1))
                    elif not stat.S_ISREG(st.st_mode):
                        raise Refused(f"{entry.path} is a link or a special file")
                    elif st.st_nlink != 1:
                        raise Refused(f"{entry.path} has {st.st_nlink} names (a hard link)")
                    elif entry.name in METADATA_FILES and st.st_size > MAX_METADATA_BYTES:
                        raise Refused(f"{entry.path}: metadata of {st.st_size:,} bytes")
                    else:
                        files += 1
    except OSError as exc:
        raise Refused(f"cannot walk {top}: {exc}") from None
    return files


_O_PATH = getattr(os, "O_PATH", 0)  # Linux: a descriptor that reads nothing, and whose closing drops no lock
_PROC_FD = _O_PATH and os.path.isdir("/proc/self/fd")


class _Folder:
    """A folder on the server that is not ours, read one file at a time without following any link, even
    while someone writing in it swaps its files for links between two of our calls.

    Each read opens the folder afresh and checks it is still the folder that was checked (by identity:
    device and inode), then walks to the file one name at a time from that descriptor, never following a
    link (``O_NOFOLLOW`` at every step, not only the last). On Linux each step is opened with ``O_PATH``:
    that reads nothing, and closing it releases no lock. The file found is checked by its descriptor (a
    plain file with one name, not a ``banned`` file such as the database), and only then opened for reading
    through ``/proc/self/fd``: the very file that was checked, whatever now lies at its name. Why so
    careful: a server that opens its own database file, even only to read it, drops SQLite's locks on it
    when it closes that descriptor, and later commits are lost."""

    def __init__(self, path: str | os.PathLike, protected: Sequence[Path] = ()):
        self.top = os.path.realpath(path)
        self.banned = frozenset(ident for ident in map(_identity, protected) if ident)
        try:
            given = os.lstat(path)
        except OSError:
            raise Refused("nothing there, or not readable") from None
        if not stat.S_ISDIR(given.st_mode):
            raise Refused("not a folder (or a link to one)")
        self.identity = (given.st_dev, given.st_ino)
        os.close(self._open_top())  # the folder named is the one its resolved path leads to

    def _open_top(self) -> int:
        try:
            fd = os.open(self.top, (_O_PATH or os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            raise Refused(f"{self.top} is gone or became a link") from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self.identity:
            os.close(fd)
            raise Refused(f"{self.top} is no longer the folder that was checked")
        return fd

    def _step(self, name: str, folder: int, last: bool, key: str) -> tuple[int, os.stat_result] | None:
        """Open ``name`` in the folder ``folder`` without following a link: its descriptor (``O_PATH`` on
        Linux) and stat; None when it is not there (or, ``last``, when it is a folder). ``key``: for messages."""
        try:
            if _O_PATH:
                fd = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
                st = os.fstat(fd)
            else:  # no O_PATH: look before opening (a narrow race remains on such systems)
                st = os.stat(name, dir_fd=folder, follow_symlinks=False)
                fd = -1
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            path = f"{name} (on the way to {key} in {self.top})"
            if (st.st_dev, st.st_ino) in self.banned:
                raise Refused(f"{path} is a protected file or folder")
            if stat.S_ISDIR(st.st_mode) and not last:
                if fd < 0:
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
                return fd, st
            if stat.S_ISDIR(st.st_mode) or (stat.S_ISREG(st.st_mode) and not last):
                return None  # a folder where a file should be, or the other way round: no such key
            if not stat.S_ISREG(st.st_mode):
                raise Refused(f"{path} is a link or a special file")
            if st.st_nlink != 1:
                raise Refused(f"{path} has {st.st_nlink} names (a hard link)")
            if fd < 0:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=folder)
            return fd, st
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    def read(self, key: str, limit: int, byte_range: tuple[int, int | None] | None = None) -> bytes | None:
        """The bytes of the file ``key`` (``a/b/c`` under the folder), or of ``byte_range`` (start, end;
        a negative start counts from the end) of it; None when it is not there. :class:`Refused` when any
        name on the way is a link, a special file, a hard link or a protected file; ValueError when the
        part to read is larger than ``limit``."""
        parts = key.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise Refused(f"{key!r} is not a name inside the folder")
        opened = [self._open_top()]
        try:
            for i, part in enumerate(parts):
                found = self._step(part, opened[-1], i == len(parts) - 1, key)
                if found is None:
                    return None
                opened.append(found[0])
            checked = found[1]
            flags = os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
            if _PROC_FD:  # open for reading the very file checked, through its O_PATH descriptor
                opened.append(os.open(f"/proc/self/fd/{opened[-1]}", flags))
            elif _O_PATH:  # (no /proc: by its name again, compared below)
                opened.append(os.open(parts[-1], flags | os.O_NOFOLLOW, dir_fd=opened[-2]))
            st = os.fstat(opened[-1])
            if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino) or not stat.S_ISREG(st.st_mode):
                raise Refused(f"{os.path.join(self.top, key)} changed while it was opened")
            start, end = 0, st.st_size
            if byte_range is not None:
                start, stop = byte_range
                start = max(0, st.st_size + start) if start < 0 else start
                end = st.st_size if stop is None else min(stop, st.st_size)
            if end - start > limit:
                raise ValueError(f"{key} is {end - start:,} bytes, more than the {limit:,} a chunk or its metadata "
                                 "may have")
            chunks, at = [], start
            while at < end and (chunk := os.pread(opened[-1], min(end - at, 1 << 24), at)):
                chunks.append(chunk)
                at += len(chunk)
            return b"".join(chunks)
        finally:
            for fd in reversed(opened):
                os.close(fd)


class _GuardedStore(LocalStore):
    """A read-only zarr store for a folder that is not ours: every file is read through :class:`_Folder`
    (no link followed anywhere on the way, the file checked before it is opened for reading), and no read
    returns more than ``max_bytes`` (a chunk; ``MAX_METADATA_BYTES`` for metadata). Both of zarr's read
    paths (``get`` and ``get_sync``) go through it. Why: a linked folder is read on every page visit, long
    after it was walked at import, and its files may have changed."""

    def __init__(self, folder: _Folder, max_bytes: int):
        super().__init__(folder.top, read_only=True)
        self._folder, self._max = folder, max_bytes

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        import asyncio

        from zarr.core.buffer.core import default_buffer_prototype

        if not self._is_open:
            await self._open()
        return await asyncio.to_thread(self._read, key, prototype or default_buffer_prototype(), byte_range)

    def get_sync(self, key: str, *, prototype: Any = None, byte_range: Any = None) -> Any:
        from zarr.core.buffer.core import default_buffer_prototype

        self._ensure_open_sync()
        return self._read(key, prototype or default_buffer_prototype(), byte_range)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    def _read(self, key: str, prototype: Any, byte_range: Any) -> Any:
        from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

        span: tuple[int, int | None] | None = None
        if isinstance(byte_range, RangeByteRequest):
            span = (byte_range.start, byte_range.end)
        elif isinstance(byte_range, OffsetByteRequest):
            span = (byte_range.offset, None)
        elif isinstance(byte_range, SuffixByteRequest):
            span = (-byte_range.suffix, None) if byte_range.suffix else (0, 0)
        elif byte_range is not None:
            raise TypeError(f"unexpected byte range {byte_range!r}")
        limit = MAX_METADATA_BYTES if os.path.basename(key) in METADATA_FILES else self._max
        data = self._folder.read(key, limit, span)
        return None if data is None else prototype.buffer.from_bytes(data)


# --- chunks that declare more than they may hold -------------------------------------------------------------

class DecompressionBomb(ValueError):
    """A chunk whose compressed bytes declare more data than a chunk of its array holds (a decompression
    bomb: a few kilobytes that would make the server allocate gigabytes), or that cannot be checked."""


_Bomb = DecompressionBomb


#: The codecs a zarr array imported from the server may use (anything else, e.g. a pickle filter that runs
#: code as it decodes, is refused before a chunk is read).
ALLOWED_CODECS = "bytes, transpose, crc32c, zstd, blosc, gzip and zlib (and sharding of those)"
_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_BLOCK = 128 << 10
_ZSTD_WINDOW_FLOOR = 16 << 20  # what a streaming decoder may allocate for its window, at least
_XZ_MEMORY = 96 << 20  # xz's largest preset needs 65 MiB to decode


def _room(expected: int) -> int:
    """How many bytes one stage of decoding a chunk of ``expected`` bytes may produce: the chunk, or a
    compressed stream of it (nested codecs), which may be a little longer."""
    return expected + expected // 16 + 4096


def _check_zstd(data: memoryview, cap: int) -> None:
    """Refuse a zstd chunk unless it is one frame that decodes to at most ``cap`` bytes, judged from its
    headers alone: the content size its frame header declares, else the sum of its blocks' largest sizes
    (a frame without a declared size is decoded by streaming, whose window is checked too)."""
    n = len(data)
    if n < 6 or int.from_bytes(data[:4], "little") != _ZSTD_MAGIC:
        raise _Bomb("a zstd chunk that does not start with a zstd frame")
    fhd, pos = data[4], 5
    single, checksum = (fhd >> 5) & 1, (fhd >> 2) & 1
    if fhd & 0x08:
        raise _Bomb("a zstd frame with a reserved bit set")
    window = 0
    if not single:
        exponent, mantissa = data[pos] >> 3, data[pos] & 7
        base = 1 << (10 + exponent)
        window, pos = base + (base >> 3) * mantissa, pos + 1
    dict_size = (0, 1, 2, 4)[fhd & 3]
    if dict_size and int.from_bytes(data[pos:pos + dict_size], "little"):
        raise _Bomb("a zstd frame that needs a dictionary")
    pos += dict_size
    fcs_size = (single, 2, 4, 8)[fhd >> 6]
    content = None
    if fcs_size:
        if pos + fcs_size > n:
            raise _Bomb("a truncated zstd frame header")
        content = int.from_bytes(data[pos:pos + fcs_size], "little") + (256 if fcs_size == 2 else 0)
        pos += fcs_size
        if content > cap:
            raise _Bomb(f"a zstd chunk declares {content:,} bytes once decompressed, more than the {cap:,} a chunk "
                       "of this array holds")
    if single:
        window = content or 0
    elif content is None and window > max(cap, _ZSTD_WINDOW_FLOOR):
        raise _Bomb(f"a zstd chunk declares a window of {window:,} bytes")
    largest, bound, blocks = min(window, _ZSTD_BLOCK), 0, 0
    most_blocks = cap // 1024 + 64  # real blocks hold up to 128 KiB each
    while True:
        if pos + 3 > n:
            raise _Bomb("a truncated zstd frame")
        header = int.from_bytes(data[pos:pos + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        pos, blocks = pos + 3, blocks + 1
        if kind == 3 or size > largest or blocks > most_blocks:
            raise _Bomb("a zstd frame with a malformed block")
        bound += largest if kind == 2 else size
        pos += 1 if kind == 1 else size
        if content is None and bound > cap:
            raise _Bomb(f"a zstd chunk that decompresses to more than the {cap:,} bytes a chunk of this array holds")
        if last:
            break
    if pos + 4 * checksum != n:
        raise _Bomb("a zstd chunk that is not exactly one frame")


def _check_blosc(data: memoryview, cap: int) -> None:
    """Refuse a blosc chunk whose header declares more than ``cap`` bytes (blosc allocates what it says)."""
    if len(data) < 16:
        raise _Bomb("a blosc chunk shorter than its header")
    nbytes, blocksize, cbytes = struct.unpack_from("<III", data, 4)
    if nbytes > cap:
        raise _Bomb(f"a blosc chunk declares {nbytes:,} bytes once decompressed, more than the {cap:,} a chunk of "
                   "this array holds")
    if cbytes != len(data) or blocksize > nbytes:
        raise _Bomb("a blosc chunk whose header does not match its size")


def _inflate(data: memoryview, cap: int, wbits: int) -> bytes:
    """A gzip (``wbits`` 31, one member or more) or zlib (15) stream decoded to at most ``cap`` bytes."""
    out, rest = bytearray(), bytes(data)
    while True:
        stream = zlib.decompressobj(wbits)
        try:
            out += stream.decompress(rest, cap + 1 - len(out))
        except zlib.error as exc:
            raise ValueError(f"a damaged {'gzip' if wbits == 31 else 'zlib'} chunk ({exc})") from None
        if len(out) > cap:
            raise _Bomb(f"a compressed chunk decompresses to more than the {cap:,} bytes a chunk of this array holds")
        if not stream.eof:
            raise ValueError("a truncated compressed chunk")
        rest = stream.unused_data
        if wbits != 31 or not rest:
            return bytes(out)


def _decompress(kind: str, data: Any, cap: int, decode: Any = None) -> bytes:
    """``data`` decompressed (``kind``: raw, gzip, zlib, zstd, blosc, bzip2, xz), refused (:class:`DecompressionBomb`)
    when its headers declare, or its stream yields, more than ``cap`` bytes; before anything is allocated
    for it. ``decode`` decodes zstd and blosc once checked (numcodecs' by default)."""
    import bz2
    import lzma

    import numcodecs.blosc
    import numcodecs.zstd

    view = memoryview(data).cast("B")
    if kind == "raw":
        out = bytes(view)
    elif kind in ("gzip", "zlib"):
        out = _inflate(view, cap, 31 if kind == "gzip" else 15)
    elif kind == "zstd":
        _check_zstd(view, cap)
        out = (decode or numcodecs.zstd.decompress)(view)
    elif kind == "blosc":
        _check_blosc(view, cap)
        out = (decode or numcodecs.blosc.decompress)(view)
    elif kind in ("bzip2", "xz"):
        stream = bz2.BZ2Decompressor() if kind == "bzip2" else lzma.LZMADecompressor(memlimit=_XZ_MEMORY)
        try:
            out = stream.decompress(bytes(view), cap + 1)
        except (OSError, lzma.LZMAError) as exc:
            raise ValueError(f"a damaged {kind} chunk ({exc})") from None
        if len(out) <= cap and not stream.eof:
            raise ValueError(f"a truncated {kind} chunk")
    else:
        raise ValueError(f"chunks compressed with {kind!r}, which is not read from a server folder")
    if len(memoryview(out)) > cap:  # (decode may return an array)
        raise _Bomb(f"a chunk decompresses to more than the {cap:,} bytes a chunk of this array holds")
    return out


def _chunk_bytes(spec: Any) -> int:
    return math.prod(spec.shape) * spec.dtype.to_native_dtype().itemsize


class _BoundedZstd(ZstdCodec):
    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        _check_zstd(memoryview(chunk_bytes.as_numpy_array()), _room(_chunk_bytes(chunk_spec)))
        return super()._decode_sync(chunk_bytes, chunk_spec)


class _BoundedBlosc(BloscCodec):
    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        _check_blosc(memoryview(chunk_bytes.as_numpy_array()), _room(_chunk_bytes(chunk_spec)))
        return super()._decode_sync(chunk_bytes, chunk_spec)


class _BoundedGzip(GzipCodec):
    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        data = _inflate(memoryview(chunk_bytes.as_numpy_array()), _room(_chunk_bytes(chunk_spec)), 31)
        return chunk_spec.prototype.buffer.from_bytes(data)


class _BoundedCompressor:
    """A zarr v2 array's compressor (numcodecs: zstd, blosc, gzip or zlib), decoding at most ``cap`` bytes."""

    def __init__(self, codec: Any, cap: int):
        self.codec, self.cap, self.codec_id = codec, cap, codec.codec_id

    def decode(self, buf: Any, out: Any = None) -> bytes:
        return _decompress(self.codec_id, buf, self.cap, self.codec.decode)

    def encode(self, buf: Any) -> bytes:
        raise TypeError("a server folder is read only")

    def get_config(self) -> dict[str, Any]:
        return self.codec.get_config()


def _bounded_codecs(codecs: Sequence[Any], where: str, nested: bool = False) -> list[Any]:
    """A zarr v3 array's codecs, each allowed one (:data:`ALLOWED_CODECS`) replaced by one that checks what
    a chunk declares before decoding it; ValueError for any other."""
    from dataclasses import fields

    from zarr.codecs import BytesCodec, ShardingCodec, TransposeCodec

    bounded: list[Any] = []
    for codec in codecs:
        kind = type(codec)
        if kind in (BytesCodec, TransposeCodec, Crc32cCodec):
            bounded.append(codec)
        elif kind in (ZstdCodec, BloscCodec, GzipCodec):
            wrapper = {ZstdCodec: _BoundedZstd, BloscCodec: _BoundedBlosc, GzipCodec: _BoundedGzip}[kind]
            copy = object.__new__(wrapper)  # the same settings, already checked by zarr
            for field in fields(codec):
                object.__setattr__(copy, field.name, getattr(codec, field.name))
            bounded.append(copy)
        elif kind is ShardingCodec and not nested:
            if math.prod(codec.chunk_shape) < 1:
                raise ValueError(f"{where}: a sharded array with empty inner chunks")
            bounded.append(ShardingCodec(chunk_shape=codec.chunk_shape,
                                         codecs=_bounded_codecs(codec.codecs, where, True),
                                         index_codecs=_bounded_codecs(codec.index_codecs, where, True),
                                         index_location=codec.index_location))
        else:
            name = getattr(codec, "codec_name", None) or getattr(codec, "codec_id", None) or kind.__name__
            raise ValueError(f"{where}: its chunks are encoded with {name!r}, which Neuroseg does not read from a "
                             f"server folder (it reads {ALLOWED_CODECS}); rewrite it, e.g. with zstd")
    return bounded


def _bound_decoding(array: zarr.Array, where: str) -> None:
    """Let ``array`` decode its chunks only with allowed codecs (:data:`ALLOWED_CODECS`; ValueError for
    others, before any chunk is read), each refusing a chunk that declares more bytes than a chunk of
    the array holds (:class:`DecompressionBomb`) before allocating them."""
    from zarr.codecs._v2 import V2Codec
    from zarr.core.metadata import ArrayV2Metadata
    from zarr.registry import get_pipeline_class

    metadata = array.metadata
    if isinstance(metadata, ArrayV2Metadata):
        if metadata.filters:
            names = ", ".join(repr(getattr(f, "codec_id", type(f).__name__)) for f in metadata.filters)
            raise ValueError(f"{where}: its chunks are encoded with the filters {names}, which Neuroseg does not read "
                             f"from a server folder (it reads {ALLOWED_CODECS}); rewrite it without filters")
        compressor = metadata.compressor
        if compressor is not None and getattr(compressor, "codec_id", None) not in ("zstd", "blosc", "gzip", "zlib"):
            raise ValueError(f"{where}: its chunks are compressed with "
                             f"{getattr(compressor, 'codec_id', type(compressor).__name__)!r}, which Neuroseg does not "
                             f"read from a server folder (it reads {ALLOWED_CODECS}); rewrite it, e.g. with zstd")
        cap = _room(math.prod(metadata.chunks) * np.dtype(array.dtype).itemsize)
        codecs: list[Any] = [V2Codec(filters=None, compressor=compressor and _BoundedCompressor(compressor, cap))]
    else:
        codecs = _bounded_codecs(metadata.codecs, where)
        shards, inner = metadata.chunk_grid.chunk_shape, tuple(array.chunks)
        if math.prod(-(-int(s) // int(c)) for s, c in zip(shards, inner, strict=True)) > MAX_CHUNKS_PER_SLICE:
            raise ValueError(f"{where}: shards of {' × '.join(map(str, shards))} hold more than "
                             f"{MAX_CHUNKS_PER_SLICE:,} chunks each; rewrite it with larger chunks or smaller shards")
    object.__setattr__(array._async_array, "codec_pipeline", get_pipeline_class().from_codecs(codecs))


# --- N5, read here -----------------------------------------------------------------------------------------

_N5_TYPES = {"uint8": ">u1", "uint16": ">u2", "uint32": ">u4", "uint64": ">u8", "int8": ">i1", "int16": ">i2",
             "int32": ">i4", "int64": ">i8", "float32": ">f4", "float64": ">f8"}
_N5_COMPRESSIONS = frozenset({"raw", "gzip", "zstd", "bzip2", "xz", "blosc"})


class _N5Array:
    """An N5 dataset read block by block through :class:`_Folder` (never by tensorstore, which opens its
    files by path and follows links). ``array[index]`` takes an int or a slice per axis, as tensorstore
    did, and so do the axes: those of ``attributes.json`` in order, a block ``<i>/<j>/<k>`` in the same
    order. A block is a big-endian header (``mode: u16`` = 0, ``ndim: u16``, its size ``u32 × ndim``) then
    its voxels, compressed as ``compression`` says, big-endian with the first axis fastest; a block at the
    border may be smaller than ``blockSize``, a missing one reads as zeros."""

    def __init__(self, folder: _Folder, where: str, max_block_bytes: int):
        self._folder, self._where = folder, where
        raw = folder.read("attributes.json", MAX_METADATA_BYTES)
        if raw is None:
            raise Refused("N5 attributes missing")
        try:
            attrs = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{where}: its N5 attributes.json cannot be read ({exc})") from None
        attrs = attrs if isinstance(attrs, dict) else {}
        shape, block, kind = attrs.get("dimensions"), attrs.get("blockSize"), attrs.get("dataType")
        settings = attrs.get("compression", {"type": attrs.get("compressionType", "raw")})
        compression = settings.get("type") if isinstance(settings, dict) else None
        if not (isinstance(shape, list) and isinstance(block, list) and len(shape) == len(block) and 0 < len(shape) <= 8
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
                and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in block)
                and kind in _N5_TYPES):
            raise ValueError(f"{where}: an N5 folder that cannot be read as a dataset (its attributes.json needs "
                             "'dimensions', 'blockSize' and a numeric 'dataType')")
        if compression not in _N5_COMPRESSIONS:
            raise ValueError(f"{where}: N5 blocks compressed with {compression!r}, which Neuroseg does not read "
                             f"(it reads {', '.join(sorted(_N5_COMPRESSIONS))})")
        zlib_stream = compression == "gzip" and settings.get("useZlib") is True  # gzip's deflate without its header
        self.shape, self.chunks, self._compression = tuple(shape), tuple(block), "zlib" if zlib_stream else compression
        self._stored = np.dtype(_N5_TYPES[kind])
        self.dtype = self._stored.newbyteorder("=")
        self._max = max_block_bytes + 4 + 4 * len(shape)

    def _block(self, cell: tuple[int, ...]) -> np.ndarray | None:
        key = "/".join(map(str, cell))
        data = self._folder.read(key, self._max)
        if data is None:
            return None
        ndim = len(self.shape)
        header = 4 + 4 * ndim
        if len(data) < header:
            raise ValueError(f"N5 block {key} is shorter than its header")
        mode, dims_count = struct.unpack_from(">HH", data)
        if mode != 0 or dims_count != ndim:
            raise ValueError(f"N5 block {key}: mode {mode} with {dims_count} dimensions; expected mode 0 with {ndim}")
        dims = struct.unpack_from(f">{ndim}I", data, 4)
        if any(not 0 < d <= b for d, b in zip(dims, self.chunks, strict=True)):
            raise ValueError(f"N5 block {key} is {dims}, larger than the blocks of {self.chunks}")
        expected = math.prod(dims) * self._stored.itemsize
        raw = _decompress(self._compression, memoryview(data)[header:], expected)
        if len(memoryview(raw)) != expected:
            raise ValueError(f"N5 block {key} holds {len(memoryview(raw)):,} bytes, expected {expected:,}")
        return np.frombuffer(raw, self._stored).reshape(dims[::-1]).T  # the first axis varies fastest

    def __getitem__(self, index: tuple) -> np.ndarray:
        picks, keep = [], []
        for n, key in zip(self.shape, index, strict=True):
            if isinstance(key, slice):
                picked = range(n)[key]
                picks.append(np.arange(picked.start, picked.stop, picked.step))
                keep.append(True)
            else:
                picks.append(np.array([range(n)[int(key)]]))
                keep.append(False)
        result_shape = tuple(len(p) for p, k in zip(picks, keep, strict=True) if k)
        if any(len(p) == 0 for p in picks):
            return np.zeros(result_shape, self.dtype)
        low = [int(p.min()) for p in picks]
        high = [int(p.max()) + 1 for p in picks]
        box = np.zeros([h - lo for lo, h in zip(low, high, strict=True)], self.dtype)
        cells = [range(lo // c, (h - 1) // c + 1) for lo, h, c in zip(low, high, self.chunks, strict=True)]
        for cell in itertools.product(*cells):
            block = self._block(cell)
            if block is None:
                continue  # a block never written: zeros, as N5 readers (and tensorstore) read it
            origin = [i * c for i, c in zip(cell, self.chunks, strict=True)]
            src, dst = [], []
            for o, d, lo, h in zip(origin, block.shape, low, high, strict=True):
                a, b = max(o, lo), min(o + d, h)
                if a >= b:
                    break
                src.append(slice(a - o, b - o))
                dst.append(slice(a - lo, b - lo))
            else:
                box[tuple(dst)] = block[tuple(src)]
        return box[np.ix_(*[p - lo for p, lo in zip(picks, low, strict=True)])].reshape(result_shape)


class External:
    """An image stack on the server, read slice by slice where it lies: an OME-Zarr image (NGFF 0.4 on
    zarr v2 or 0.5 on zarr v3; its full-resolution level), a plain zarr array, or an N5 dataset (read
    here, :class:`_N5Array`). ``kind`` says which; ``shape`` is (Z, Y, X) after dropping axes of length 1 (time,
    channel). Anything else raises ValueError with the reason.

    The folder must have been checked by :func:`check_folder` and walked by :func:`check_tree` (the import
    does both; a linked dataset's read checks the folder again). Here, before a pixel is read, what the
    metadata declares is checked against ``limits`` (:class:`unet.exchange.limits.Limits`, from the environment): the
    pixel type, the size of a slice (``linked``: the smaller limit of a stack without an overview pyramid)
    and of a chunk, and which codecs the chunks use (:data:`ALLOWED_CODECS`). Every file is read through
    :class:`_Folder` (no link followed, each file checked before it is opened; ``protected``, the data
    directory and the database, never opened at all), and every chunk's compressed header is checked
    against the size of a chunk before it is decompressed (:class:`DecompressionBomb`)."""

    def __init__(self, path: str | os.PathLike, *, limits: Limits | None = None, linked: bool = False,
                 protected: Sequence[Path] = ()):
        self.path = Path(path)
        self.limits = limits or Limits.from_env()
        where = str(self.path)
        self._folder = _Folder(self.path, protected)  # Refused unless a real folder
        self._top, self._linked = self._folder.top, linked
        self.pixel_size_nm: float | None = None
        n5 = (self.path / "attributes.json").is_file() and not (self.path / "zarr.json").is_file()
        self._open_n5(where) if n5 else self._open_zarr(where)
        self.dtype = np.dtype(self.dtype)
        if self.dtype.type not in (np.uint8, np.uint16, np.float32):
            raise ValueError(f"{where}: pixel type {self.dtype.name} is not supported for an image stack; expected "
                             "uint8, uint16 or float32")
        shape = tuple(int(n) for n in self._shape)
        keep = [i for i, n in enumerate(shape) if n > 1]
        if len(keep) > 3 or (len(shape) >= 3 and len(keep) < 2) or 0 in shape or len(shape) < 2:
            raise ValueError(f"{where}: an array of shape {shape}; expected one grey-scale Z × Y × X stack "
                             "(axes of length 1, such as one channel or one time point, are fine)")
        self._squeeze = [i for i in range(len(shape)) if shape[i] == 1 and i < len(shape) - 2 and
                         (len(keep) == 3 or i != len(shape) - 3)]
        rest = [n for i, n in enumerate(shape) if i not in self._squeeze]
        self.shape = (1, *rest) if len(rest) == 2 else tuple(rest)
        self._check_declared(where, linked)

    def _check_declared(self, where: str, linked: bool) -> None:
        """Refuse what the metadata declares beyond the limits, before anything but metadata is read: a few
        kilobytes of JSON can declare terabytes (a server read 9.9 GB for one 8 KB folder)."""
        limits, (z, y, x) = self.limits, self.shape
        if z > limits.slices:  # (pages and predictions list slices one by one)
            raise ValueError(f"{where}: {z:,} slices, more than the {limits.slices:,} a stack may have on this server "
                             "($NEUROSEG_MAX_SLICES)")
        if y * x > limits.slice_pixels:
            raise ValueError(f"{where}: slices of {y} × {x} pixels, more than the {limits.slice_pixels:,} a slice "
                             "may have on this server ($NEUROSEG_MAX_SLICE_PIXELS)")
        if linked and y * x > limits.linked_slice_pixels:
            raise ValueError(f"{where}: slices of {y} × {x} pixels are too large to link (at most "
                             f"{limits.linked_slice_pixels:,} pixels, $NEUROSEG_MAX_LINKED_SLICE_PIXELS): a linked "
                             "stack has no overview, so every page would read whole slices. Import a copy instead")
        chunks = tuple(int(c) for c in self._chunks)
        chunk_bytes = math.prod(chunks) * self.dtype.itemsize
        if len(chunks) != len(self._shape) or chunk_bytes > limits.chunk_bytes or 0 in chunks:
            raise ValueError(f"{where}: chunks of {' × '.join(map(str, chunks))} {self.dtype.name} "
                             f"({chunk_bytes / 2**20:,.1f} MiB), more than the {limits.chunk_bytes / 2**20:,.0f} MiB "
                             "a chunk may have ($NEUROSEG_MAX_CHUNK_BYTES): reading one pixel decompresses its whole "
                             "chunk. Rechunk it, e.g. to 1 × 512 × 512")
        dims = [i for i in range(len(self._shape)) if i not in self._squeeze][-2:]
        per_slice = math.prod(-(-int(self._shape[i]) // chunks[i]) for i in dims)
        if per_slice > MAX_CHUNKS_PER_SLICE:
            raise ValueError(f"{where}: chunks of {' × '.join(map(str, chunks))} are so small that one slice is read "
                             f"from {per_slice:,} files; rechunk it, e.g. to 1 × 512 × 512")

    def _open_zarr(self, where: str) -> None:
        try:
            node = zarr.open(_GuardedStore(self._folder, self.limits.chunk_bytes), mode="r")
        except Refused:
            raise
        except Exception as exc:
            raise ValueError(f"{where}: not a zarr or N5 folder that can be read "
                             f"({type(exc).__name__}: {exc})") from None
        if isinstance(node, zarr.Group):
            level, self.pixel_size_nm = _multiscale_level(dict(node.attrs), where)
            try:
                node = node[level]
            except Refused:
                raise
            except Exception as exc:
                raise ValueError(f"{where}: its OME-Zarr metadata names the array {level!r}, which cannot be "
                                 f"opened ({type(exc).__name__}: {exc})") from None
            if not isinstance(node, zarr.Array):
                raise ValueError(f"{where}: its OME-Zarr metadata names {level!r}, which is not an array")
            self.kind = "OME-Zarr"
        else:
            self.kind = "zarr"
        _bound_decoding(node, where)  # only allowed codecs, each checking a chunk's header before decoding it
        self._array = node
        self._shape, self.dtype, self._chunks = node.shape, node.dtype, node.chunks  # inner chunks when sharded

    def _open_n5(self, where: str) -> None:
        self._array = _N5Array(self._folder, where, self.limits.chunk_bytes)
        self.kind = "N5"
        self._shape, self.dtype, self._chunks = self._array.shape, self._array.dtype, self._array.chunks

    def _recheck(self) -> None:
        """Before every read, cheaply (a page keeps this object between visits): the folder is still a real
        folder where it was, and a linked one still lies inside the import folders (an admin may have
        narrowed them, or turned importing off)."""
        try:
            st = os.lstat(self.path)
        except OSError:
            raise Refused("the folder is gone") from None
        if not stat.S_ISDIR(st.st_mode) or os.path.realpath(self.path) != self._top:
            raise Refused("the folder became a link")
        if self._linked and not any(inside(Path(self._top), root) for root in import_roots()):
            raise Refused("the folder is no longer inside the import folders")

    def __getitem__(self, key: Any) -> np.ndarray:
        """``stack[z]``, ``stack[z, y0:y1, x0:x1]`` (steps too) or ``stack[...]``, as on a ZYX array."""
        if key is Ellipsis:
            key = (slice(None),)
        key = key if isinstance(key, tuple) else (key,)
        z_key, y_key, x_key = (*key, slice(None), slice(None))[:3]
        rest = [i for i in range(len(self._shape)) if i not in self._squeeze]
        planar = len(rest) == 2  # one image: the stack's only slice
        picks = {rest[-2]: y_key, rest[-1]: x_key}
        if not planar:
            picks[rest[0]] = z_key
        index = tuple(0 if i in self._squeeze else picks[i] for i in range(len(self._shape)))
        try:
            self._recheck()
            data = self._array[index]
        except Refused as exc:
            raise ValueError(f"{self.path}: slice {z_key} cannot be read: the folder is now a link or holds a link "
                             "or a special file, or a file outside it, or lies outside the import folders") from exc
        except Exception as exc:
            raise ValueError(f"{self.path}: slice {z_key} cannot be read ({type(exc).__name__}: {exc})") from None
        data = np.asarray(data, dtype=self.dtype)
        if planar:
            data = data[None][z_key] if not isinstance(z_key, int) else data
        return data

    def iter_slices(self) -> Iterator[np.ndarray]:
        for z in range(self.shape[0]):
            yield self[z]


def _multiscale_level(attrs: dict[str, Any], where: str) -> tuple[str, float | None]:
    """The full-resolution array of an OME-Zarr group's ``multiscales`` metadata and its lateral pixel size
    in nm (None when the metadata does not say it in a unit we know). Metadata of the wrong shape (wrong
    types, missing keys, a path that leaves the folder) raises ValueError that says what is wrong."""
    bad = f"{where}: its OME-Zarr metadata (multiscales) is malformed"
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs
    multiscales = ome.get("multiscales")
    if not multiscales:
        raise ValueError(f"{where}: a zarr group without OME-Zarr multiscales metadata; point at the array "
                         "folder itself, or at an OME-Zarr image")
    if not isinstance(multiscales, list) or not isinstance(multiscales[0], dict):
        raise ValueError(f"{bad}: 'multiscales' must be a list of objects")
    first = multiscales[0]
    levels = first.get("datasets")
    if not isinstance(levels, list) or not levels or not isinstance(levels[0], dict):
        raise ValueError(f"{bad}: 'datasets' must be a list of objects, the full resolution first")
    level = levels[0].get("path")
    if not isinstance(level, str) or not _SAFE_KEY.fullmatch(level) or ".." in level.split("/"):
        raise ValueError(f"{bad}: the first dataset's 'path' must name an array inside the folder")
    axes, transforms = first.get("axes", []), levels[0].get("coordinateTransformations", [])
    if not isinstance(axes, list) or not isinstance(transforms, list):
        raise ValueError(f"{bad}: 'axes' and 'coordinateTransformations' must be lists")
    unit = axes[-1].get("unit") if axes and isinstance(axes[-1], dict) else None
    factor = {"nanometer": 1.0, "micrometer": 1e3, "micron": 1e3}.get(unit if isinstance(unit, str) else "")
    pixel_size = None
    for transform in transforms:
        if not isinstance(transform, dict):
            raise ValueError(f"{bad}: each coordinate transformation must be an object")
        if transform.get("type") == "scale" and axes:
            scale = transform.get("scale")
            if (not isinstance(scale, list) or not scale or isinstance(scale[-1], bool)
                    or not isinstance(scale[-1], int | float) or not math.isfinite(scale[-1]) or scale[-1] <= 0):
                raise ValueError(f"{bad}: a 'scale' must be a list of positive numbers")
            pixel_size = float(scale[-1]) * factor if factor else None
    return level, pixel_size


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
