"""Image stacks on the server, read where they lie (:class:`External`): an OME-Zarr image, a plain zarr array
or an N5 dataset, every file read through :class:`storage.records.server_folders.Folder` (no link followed)
and every chunk decoded within bounds (:mod:`storage.records.decoding`); what the metadata declares is
checked against the server's limits before a pixel is read."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import re
import stat
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer.core import default_buffer_prototype
from zarr.storage import LocalStore

from storage.records.decoding import bound_decoding, decompress
from storage.records.files import import_roots, inside
from storage.records.server_folders import (
    MAX_CHUNKS_PER_SLICE,
    MAX_METADATA_BYTES,
    METADATA_FILES,
    Folder,
    Refused,
)
from unet.exchange.limits import Limits

_SAFE_KEY = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


class _GuardedStore(LocalStore):
    """A read-only zarr store for a folder that is not ours: every file is read through :class:`Folder`
    (no link followed anywhere on the way, the file checked before it is opened for reading), and no read
    returns more than ``max_bytes`` (a chunk; ``MAX_METADATA_BYTES`` for metadata). Both of zarr's read
    paths (``get`` and ``get_sync``) go through it. Why: a linked folder is read on every page visit, long
    after it was walked at import, and its files may have changed."""

    def __init__(self, folder: Folder, max_bytes: int):
        super().__init__(folder.top, read_only=True)
        self._folder, self._max = folder, max_bytes

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        if not self._is_open:
            await self._open()
        return await asyncio.to_thread(self._read, key, prototype or default_buffer_prototype(), byte_range)

    def get_sync(self, key: str, *, prototype: Any = None, byte_range: Any = None) -> Any:
        self._ensure_open_sync()
        return self._read(key, prototype or default_buffer_prototype(), byte_range)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    def _read(self, key: str, prototype: Any, byte_range: Any) -> Any:
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



# --- N5, read here -----------------------------------------------------------------------------------------

_N5_TYPES = {"uint8": ">u1", "uint16": ">u2", "uint32": ">u4", "uint64": ">u8", "int8": ">i1", "int16": ">i2",
             "int32": ">i4", "int64": ">i8", "float32": ">f4", "float64": ">f8"}
_N5_COMPRESSIONS = frozenset({"raw", "gzip", "zstd", "bzip2", "xz", "blosc"})


class _N5Array:
    """An N5 dataset read block by block through :class:`Folder` (never by tensorstore, which opens its
    files by path and follows links). ``array[index]`` takes an int or a slice per axis, as tensorstore
    did, and so do the axes: those of ``attributes.json`` in order, a block ``<i>/<j>/<k>`` in the same
    order. A block is a big-endian header (``mode: u16`` = 0, ``ndim: u16``, its size ``u32 × ndim``) then
    its voxels, compressed as ``compression`` says, big-endian with the first axis fastest; a block at the
    border may be smaller than ``blockSize``, a missing one reads as zeros."""

    def __init__(self, folder: Folder, where: str, max_block_bytes: int):
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
        raw = decompress(self._compression, memoryview(data)[header:], expected)
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
    metadata declares is checked against ``limits`` (:class:`unet.exchange.io.Limits`, from the environment): the
    pixel type, the size of a slice (``linked``: the smaller limit of a stack without an overview pyramid)
    and of a chunk, and which codecs the chunks use (:data:`ALLOWED_CODECS`). Every file is read through
    :class:`Folder` (no link followed, each file checked before it is opened; ``protected``, the data
    directory and the database, never opened at all), and every chunk's compressed header is checked
    against the size of a chunk before it is decompressed (:class:`DecompressionBomb`)."""

    def __init__(self, path: str | os.PathLike, *, limits: Limits | None = None, linked: bool = False,
                 protected: Sequence[Path] = ()):
        self.path = Path(path)
        self.limits = limits or Limits.from_env()
        where = str(self.path)
        self._folder = Folder(self.path, protected)  # Refused unless a real folder
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
        bound_decoding(node, where)  # only allowed codecs, each checking a chunk's header before decoding it
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
        if data.dtype.kind == "f" and not np.isfinite(data).all():  # (as a TIFF's are refused: one NaN spoils a slice)
            bad = int(np.count_nonzero(~np.isfinite(data)))
            raise ValueError(f"{self.path}: slice {z_key} has {bad:,} voxels that are NaN or infinite (a chunk never "
                             "written reads as the array's fill value); replace them, then import it again")
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

