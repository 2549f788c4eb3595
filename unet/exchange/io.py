"""Reading and checking TIFF stacks (writing them: :mod:`unet.exchange.writing`; opening one slice by slice:
:mod:`unet.exchange.stacks`), and the slices a user names (:func:`parse_slices`).

Every stack comes back as a ``(Z, Y, X)`` array. Anything we cannot segment as a grey-scale EM stack
(RGB, several channels, an empty file, NaN, a truncated file, a dtype we do not handle) raises a
``ValueError`` whose message says what was found and what is expected, before any large allocation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tifffile

from unet.exchange.limits import DEFAULT_MAX_BYTES, Limits
from unet.exchange.tiff_codecs import PagesLeftOut, check_page, check_pages, check_series, open_tiff

VOLUME_DTYPES = (np.uint8, np.uint16, np.float32)
LABEL_DTYPES = (np.bool_, np.uint8, np.uint16, np.uint32, np.int8, np.int16, np.int32, np.int64, np.uint64)
#: A stack whose slices are not one page each is read whole: only up to this many bytes of pixels.
WHOLE_READ_BYTES = 1024**3
CHUNK = 512  # pixels per side of a chunk in Y and X (stored volumes and blockwise outputs)

Source = str | os.PathLike | BinaryIO


@dataclass(frozen=True)
class StackInfo:
    """What a TIFF holds, read from its header without loading the pixels."""

    shape: tuple[int, int, int]  # (Z, Y, X)
    dtype: str
    axes: str  # as tifffile reports them, before squeezing to ZYX
    pixel_size_nm: float | None  # lateral pixel size when the file says it


def _describe(source: Source) -> str:
    if isinstance(source, str | os.PathLike):
        return Path(source).name
    return getattr(source, "name", "the upload")


class ChannelsMaybeSlices(ValueError):
    """A grey file whose only stack axis is "channels": often Z slices saved without axis names (ImageJ
    and ``tifffile.imwrite(..., imagej=True)`` do that), so it can be read as slices when the user says so."""

    def __init__(self, message: str, count: int):
        super().__init__(message)
        self.count = count


_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"BM", "a BMP image"), (b"\x89HDF", "an HDF5 file"), (b"PK\x03\x04", "a ZIP archive"),
          (b"\x1f\x8b", "a gzip archive"), (b"%PDF", "a PDF document"))


def _not_a_tiff(source: Source, what: str) -> str:
    """Why a file is not a TIFF, in words: what it looks like instead."""
    try:
        if isinstance(source, str | os.PathLike):
            with open(source, "rb") as fh:
                head = fh.read(8)
        else:
            source.seek(0)  # type: ignore[union-attr]
            head = source.read(8)  # type: ignore[union-attr]
    except OSError:
        head = b""
    kind = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if not head:
        return f"{what}: the file is empty"
    found = f"this is {kind}, not a TIFF" if kind else "this is not a TIFF file (it does not start like one)"
    return f"{what}: {found}. Save the stack as a multi-page TIFF (Fiji: File › Save As › Tiff…)"


def _zyx_shape(shape: tuple[int, ...], axes: str, what: str, channels_as_z: bool = False) -> tuple[int, int, int]:
    """Map a tifffile series shape/axes to (Z, Y, X), refusing colour and multi-channel data (unless
    ``channels_as_z``: then a channel axis, or the samples of one colour image stored as separate planes, is
    read as the slices)."""
    if len(shape) != len(axes):
        raise ValueError(f"{what}: inconsistent TIFF header (shape {shape}, axes {axes!r})")
    planar = ("S" in axes and "Y" in axes and "X" in axes and axes.index("S") < min(axes.index("Y"), axes.index("X"))
              and not [a for a, n in zip(axes, shape, strict=True) if a not in "YXS" and n > 1])
    if planar and shape[axes.index("S")] > 1:  # one colour image of separate planes, and nothing else
        count = shape[axes.index("S")]
        if not channels_as_z:
            raise ChannelsMaybeSlices(
                f"{what}: the file says it holds one colour image of {count} separate planes (axes {axes!r}), "
                f"not {count} slices. tifffile saves a grey stack of 3 or 4 slices like this when it is not told "
                "otherwise: read the planes as Z slices if they are slices; convert the image to grey first if "
                "it is colour", count)
        return _zyx_shape(shape, axes.replace("S", "Z"), what)
    if "S" in axes and shape[axes.index("S")] > 1:
        raise ValueError(
            f"{what}: colour image ({shape[axes.index('S')]} samples per pixel, shape {shape}); "
            "expected a grey-scale stack. Convert it to 8-bit or 16-bit grey first (Fiji: Image › Type)."
        )
    others = [a for a, n in zip(axes, shape, strict=True) if a not in "YXSC" and n > 1]
    if "C" in axes and shape[axes.index("C")] > 1 and not channels_as_z:
        count = shape[axes.index("C")]
        if not others:
            raise ChannelsMaybeSlices(
                f"{what}: the file says it holds {count} channels of one image (axes {axes!r}), not {count} "
                "slices. Grey stacks saved without axis names (ImageJ, tifffile) look like this: read the "
                "channels as Z slices if they are slices; split them and upload the EM channel alone if they "
                "are colour channels", count)
        raise ValueError(
            f"{what}: {count} channels (axes {axes!r}, shape {shape}); expected one "
            "grey-scale channel. Split the channels and upload the EM channel alone."
        )
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"{what}: no image plane in the TIFF (axes {axes!r}, shape {shape})")
    skip = "YXS" if channels_as_z else "YXSC"
    stack_axes = [(a, n) for a, n in zip(axes, shape, strict=True) if a not in skip and n > 1]
    if len(stack_axes) > 1:
        raise ValueError(
            f"{what}: {len(shape)}-D data with more than one stack axis ({stack_axes}); expected a "
            "single Z series (Z × Y × X). Reduce it to one time point / one series first."
        )
    z = stack_axes[0][1] if stack_axes else 1
    y, x = shape[axes.index("Y")], shape[axes.index("X")]
    if z == 0 or y == 0 or x == 0:
        raise ValueError(f"{what}: the stack is empty (shape {shape})")
    return z, y, x


def _pixel_size_nm(tif: tifffile.TiffFile) -> float | None:
    """Lateral pixel size in nm from the ImageJ metadata or the resolution tags, when present."""
    try:
        page = tif.pages.first
        tags = page.tags
        if "XResolution" not in tags:
            return None
        num, den = tags["XResolution"].value
        if not num or not den:
            return None
        pixels_per_unit = num / den
        if pixels_per_unit <= 0 or pixels_per_unit == 1:
            return None  # 1 pixel per unit is the default when nothing was set
        unit = (tif.imagej_metadata or {}).get("unit", "")
        scale = {"nm": 1.0, "nanometer": 1.0, "micron": 1e3, "µm": 1e3, "um": 1e3, "\\u00B5m": 1e3}
        if unit in scale:
            return scale[unit] / pixels_per_unit
        res_unit = tags.get("ResolutionUnit")
        if res_unit is not None and int(res_unit.value) == 3:  # centimetre
            return 1e7 / pixels_per_unit
        return None
    except Exception:  # metadata is a nicety: never refuse a stack because of it
        return None


def inspect_stack(source: Source, channels_as_z: bool = False) -> StackInfo:
    """Read the header of a TIFF: shape as (Z, Y, X), dtype, axes, pixel size. Raises ValueError
    (:class:`ChannelsMaybeSlices` for a grey file of channels, unless ``channels_as_z``)."""
    what = _describe(source)
    if hasattr(source, "seek"):
        source.seek(0)  # type: ignore[union-attr]
    try:
        with open_tiff(source) as tif:
            if len(tif.pages) == 0 or not tif.series:
                raise _Empty
            series = tif.series[0]
            raw_shape, axes, dtype = tuple(int(n) for n in series.shape), str(series.axes), np.dtype(series.dtype)
            check_series(tif, what)
            images = _imagej_images(tif)
            pixel_size = _pixel_size_nm(tif)
    except _Empty:
        raise ValueError(f"{what}: the TIFF holds no image (is the file truncated or damaged?)") from None
    except PagesLeftOut:
        raise
    except tifffile.TiffFileError as exc:
        if "not a TIFF" in str(exc):
            raise ValueError(_not_a_tiff(source, what)) from exc
        raise ValueError(f"{what}: the TIFF header could not be read; the file is probably damaged") from exc
    except Exception as exc:  # tifffile raises many kinds of errors on broken headers and OME-XML
        raise ValueError(f"{what}: the TIFF header or its metadata (OME-XML, ImageJ) could not be read "
                         f"({type(exc).__name__}: {exc}); the file is damaged, or was written by a tool that "
                         "got its metadata wrong: save it again as a plain multi-page TIFF (Fiji: File › Save As "
                         "› Tiff…)") from None
    # the pixel type and the shape come from tifffile's reading of the header (checked below), never trusted
    planes = int(np.prod([n for n, a in zip(raw_shape, axes, strict=False) if a not in "YXS"], dtype=np.int64))
    if images is not None and images > planes:
        raise ValueError(f"{what}: the ImageJ header says the stack holds {images} images but the file holds "
                         f"{planes}: the file is truncated (copied or saved only in part). Copy or save it again")
    shape = _zyx_shape(raw_shape, axes, what, channels_as_z)
    return StackInfo(shape, str(dtype), axes, pixel_size)


class _Empty(Exception):
    pass


def _imagej_images(tif: tifffile.TiffFile) -> int | None:
    """How many images an ImageJ header says the file holds (None: not ImageJ, or it does not say). Why:
    tifffile reads a truncated ImageJ stack as the pages that are left, and it would be stored as fewer
    slices without a word."""
    if not tif.is_imagej:
        return None
    value = (tif.imagej_metadata or {}).get("images")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        raise ValueError(f"the ImageJ header's image count is not a number ({value!r})") from None


def _check_size(source: Source, info: StackInfo, what: str, dtype: np.dtype, max_bytes: int,
                max_slice_pixels: int | None = None, max_slices: int | None = None) -> None:
    """Refuse a header that declares more pixels than allowed (in all, or in one slice, which is read
    whole), more slices than a stack may have, or far more pixels than its file could hold: before any pixel
    is read."""
    if max_slices is not None and info.shape[0] > max_slices:
        raise ValueError(f"{what}: the header declares {info.shape[0]:,} slices, more than the {max_slices:,} a "
                         "stack may have on this server ($NEUROSEG_MAX_SLICES); split the stack first")
    nbytes = int(np.prod(info.shape, dtype=np.int64)) * dtype.itemsize
    if nbytes > max_bytes:
        raise ValueError(
            f"{what}: the header declares {info.shape} {dtype.name} = {nbytes / 1024**3:.1f} GiB of pixels, "
            f"more than the {max_bytes / 1024**3:.1f} GiB allowed"
        )
    y, x = info.shape[1:]
    if max_slice_pixels is not None and y * x > max_slice_pixels:
        raise ValueError(
            f"{what}: the header declares slices of {y} × {x} pixels, more than the {max_slice_pixels:,} pixels "
            "a slice may have on this server ($NEUROSEG_MAX_SLICE_PIXELS); crop or bin the stack first"
        )
    size = _file_size(source)
    # Uncompressed data cannot be larger than its file; compressed data rarely beats 1000:1.
    if size is not None and nbytes > 1000 * max(size, 1):
        raise ValueError(f"{what}: the header declares {nbytes:,} bytes of pixels in a {size:,}-byte file; "
                         "the file is damaged or not what it claims to be")


def _file_size(source: Source) -> int | None:
    if isinstance(source, str | os.PathLike):
        return os.path.getsize(source)
    try:  # (an upload: a file object)
        where = source.tell()
        size = source.seek(0, os.SEEK_END)
        source.seek(where)
        return size
    except (AttributeError, OSError, ValueError):
        return None


def _read(source: Source, what: str, dtypes: tuple, max_bytes: int, kind: str,
          channels_as_z: bool = False) -> np.ndarray:
    info = inspect_stack(source, channels_as_z)
    dtype = np.dtype(info.dtype)
    if dtype.type not in dtypes:
        allowed = ", ".join(np.dtype(d).name for d in dtypes)
        raise ValueError(f"{what}: pixel type {dtype.name} is not supported for {kind}; expected {allowed}")
    _check_size(source, info, what, dtype, max_bytes)
    check_pages(source, what)
    try:
        if hasattr(source, "seek"):
            source.seek(0)  # type: ignore[union-attr]
        with open_tiff(source) as tif:
            data = tif.series[0].asarray(maxworkers=1)
    except Exception as exc:
        raise ValueError(
            f"{what}: the pixel data could not be read; the file is probably truncated or damaged "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    data = np.asarray(data)
    axes = info.axes if len(info.axes) == data.ndim else ""
    if channels_as_z and "C" in axes and axes.index("C") > min(axes.index("Y"), axes.index("X")):
        data = np.moveaxis(data, axes.index("C"), 0)  # channels stored after the plane (rare)
    data = data.reshape(info.shape)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise ValueError(f"{what}: {bad:,} pixels are NaN or infinite; replace them before uploading")
    return data


def read_stack(source: Source, max_bytes: int = DEFAULT_MAX_BYTES, channels_as_z: bool = False) -> np.ndarray:
    """Read a grey-scale image stack (multi-page TIFF, ImageJ hyperstack or one 2-D image) as
    ``(Z, Y, X)`` uint8, uint16 or float32. Raises ``ValueError`` with the reason on anything else.

    Args:
        source: a path or a binary file object.
        max_bytes: refuse stacks whose pixels would take more memory than this.
        channels_as_z: read a grey file whose only stack axis is "channels" as Z slices.
    """
    return _read(source, _describe(source), VOLUME_DTYPES, max_bytes, "an image stack", channels_as_z)


def _check_dtype(info: StackInfo, what: str, dtypes: tuple, kind: str) -> np.dtype:
    dtype = np.dtype(info.dtype)
    if dtype.type not in dtypes:
        allowed = ", ".join(np.dtype(d).name for d in dtypes)
        raise ValueError(f"{what}: pixel type {dtype.name} is not supported for {kind}; expected {allowed}")
    return dtype


def iter_slices(source: Source, kind: str = "volume", channels_as_z: bool = False,
                max_bytes: int | None = None, limits: Limits | None = None) -> tuple[StackInfo, Iterator[np.ndarray]]:
    """The header of a stack and its ``(Y, X)`` slices one at a time, read page by page, so a stack larger
    than memory can be converted. ``kind`` is "volume" (uint8, uint16, float32) or "labels" (integers,
    bool). The header is checked before anything is read, against ``limits`` (:class:`Limits`, from the
    environment when not given; ``max_bytes`` overrides its stack size): a slice is read whole, so its
    size is bounded too. A slice that cannot be read (a truncated file) or holds NaN raises ``ValueError``
    naming it. Files whose slices are not one page each (rare: channels stored after the image plane) are
    read whole, only up to :data:`WHOLE_READ_BYTES`."""
    what = _describe(source)
    limits = limits or Limits.from_env()
    max_bytes = limits.stack_bytes if max_bytes is None else max_bytes
    info = inspect_stack(source, channels_as_z)
    dtypes, name = (VOLUME_DTYPES, "an image stack") if kind == "volume" else (LABEL_DTYPES, "labels")
    dtype = _check_dtype(info, what, dtypes, name)
    _check_size(source, info, what, dtype, max_bytes, limits.slice_pixels, limits.slices)
    z, y, x = info.shape

    def pages() -> Iterator[np.ndarray]:
        if hasattr(source, "seek"):
            source.seek(0)  # type: ignore[union-attr]
        with open_tiff(source) as tif:
            try:
                series = tif.series[0]
                planes = list(series.pages)
            except Exception as exc:  # the header was read once already: this is a file changed meanwhile
                raise ValueError(f"{what}: the TIFF header could not be read again ({type(exc).__name__}: "
                                 f"{exc})") from None
            if len(planes) != z or any(p is None or int(np.prod(p.shape)) != y * x for p in planes[:1]):
                whole_bytes = z * y * x * dtype.itemsize
                if whole_bytes > min(max_bytes, WHOLE_READ_BYTES):
                    raise ValueError(f"{what}: its slices are not stored one page each, so it would be read whole "
                                     f"({whole_bytes / 1024**3:.1f} GiB): save it again as a plain multi-page "
                                     "TIFF (Fiji: File › Save As › Tiff…)")
                whole = _read(source, what, dtypes, max_bytes, name, channels_as_z)
                yield from whole
                return
            for index, page in enumerate(planes):
                if page is not None:  # (before it is decoded: a picture inside may be larger than the page)
                    check_page(page, what, index, planes[0])
                try:
                    plane = np.asarray(page.asarray(maxworkers=1)).reshape(y, x)
                except Exception as exc:
                    raise ValueError(f"{what}: slice {index + 1} of {z} could not be read; the file is probably "
                                     f"truncated or damaged ({type(exc).__name__}: {exc})") from exc
                if plane.dtype.kind == "f" and not np.isfinite(plane).all():
                    bad = int(np.count_nonzero(~np.isfinite(plane)))
                    raise ValueError(f"{what}: slice {index + 1} has {bad:,} pixels that are NaN or infinite; "
                                     "replace them before uploading")
                yield plane

    return info, pages()

def read_labels(source: Source, volume_shape: tuple[int, ...] | None = None,
                max_bytes: int = DEFAULT_MAX_BYTES, channels_as_z: bool = False) -> np.ndarray:
    """Read a label stack as ``(Z, Y, X)``: binary (0/255, 0/1, bool) or instance labels. When
    ``volume_shape`` is given, a label stack of another shape is refused."""
    what = _describe(source)
    labels = _read(source, what, LABEL_DTYPES, max_bytes, "labels", channels_as_z)
    if volume_shape is not None and tuple(labels.shape) != tuple(volume_shape):
        raise ValueError(
            f"{what}: labels have shape {tuple(labels.shape)} but the image stack has shape "
            f"{tuple(volume_shape)}; they must match slice for slice and pixel for pixel"
        )
    return labels

def parse_slices(text: str, n_slices: int) -> list[int]:
    """Parse ``"0-24"``, ``"0,3,5-7"`` or ``"all"`` into sorted slice indices within ``[0, n_slices)``.
    Ranges are inclusive, as a person reads them. ``ValueError`` before any list is built when the stack
    has more slices than :class:`Limits` allows (``$NEUROSEG_MAX_SLICES``), or the ranges name more."""
    limit = Limits.from_env().slices
    if n_slices > limit:
        raise ValueError(f"the stack has {n_slices:,} slices, more than the {limit:,} a stack may have on this "
                         "server ($NEUROSEG_MAX_SLICES)")
    text = text.strip().lower()
    if text in ("all", "*", ""):
        return list(range(n_slices))
    picked: set[int] = set()
    named = 0
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
            else:
                lo = hi = int(part)
        except ValueError:
            raise ValueError(f"slice range {part!r} is not a number or a range like 0-24") from None
        if lo > hi:
            raise ValueError(f"slice range {part!r} runs backwards")
        if lo < 0 or hi >= n_slices:
            raise ValueError(f"slice range {part!r} is outside the stack's slices 0-{n_slices - 1}")
        named += hi - lo + 1
        if named > limit:  # (overlapping ranges repeated: each one is bounded, their number is not)
            raise ValueError(f"the slice ranges name more than the {limit:,} slices a stack may have")
        picked.update(range(lo, hi + 1))
    return sorted(picked)
