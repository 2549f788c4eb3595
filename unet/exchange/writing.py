"""Writing files atomically (:func:`atomic_write`: the old file or the new one, never half a file), and
stacks as ImageJ TIFFs that Fiji opens as Z slices (:func:`write_tiff_atomic`, :func:`write_tiff_slices`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tifffile


def write_tiff_atomic(path: str | os.PathLike, data: np.ndarray, *, pixel_size_nm: float | None = None,
                      imagej: bool = True) -> Path:
    """Write a stack as an ImageJ-compatible TIFF that Fiji opens as Z slices, atomically: the bytes go
    to a temporary file in the same folder, are fsynced, then renamed over ``path``.

    ImageJ knows uint8, uint16 and float32 only: other integer types are converted to uint16 when their
    values fit, else to float32."""
    path = Path(path)
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"write_tiff_atomic expects (Z, Y, X) or (Y, X), got shape {data.shape}")
    if data.dtype == np.bool_:
        data = data.astype(np.uint8) * 255
    elif data.dtype not in (np.uint8, np.uint16, np.float32):
        if data.dtype.kind in "iu" and data.size and data.min() >= 0 and data.max() < 2**16:
            data = data.astype(np.uint16)
        else:
            data = data.astype(np.float32)
    kwargs: dict = {"imagej": imagej, "metadata": {"axes": "ZYX"}}
    if pixel_size_nm:
        kwargs["resolution"] = (1e3 / pixel_size_nm, 1e3 / pixel_size_nm)
        kwargs["metadata"]["unit"] = "micron"
    return atomic_write(path, lambda fh: tifffile.imwrite(fh, data, **kwargs))


def write_tiff_slices(volume, path: str | os.PathLike, pixel_size_nm: float | None = None) -> Path:
    """Write a stored image as an ImageJ TIFF (Fiji opens it as a Z stack), one slice in memory at a time,
    atomically. ImageJ knows uint8, uint16 and float32: integer labels (instances) stay integers, uint16
    when every label fits (an ImageJ stack), else a plain uint32 TIFF (Fiji opens it with Bio-Formats)."""
    dtype = np.dtype(volume.dtype)
    imagej = True
    if dtype.kind in "iu" and dtype not in (np.uint8, np.uint16):
        top = max((int(np.asarray(volume[z]).max(initial=0)) for z in range(volume.shape[0])), default=0)
        dtype, imagej = (np.dtype(np.uint16), True) if top <= np.iinfo(np.uint16).max else (np.dtype(np.uint32), False)
    elif dtype not in (np.uint8, np.uint16, np.float32):
        dtype = np.dtype(np.float32)
    kwargs: dict[str, Any] = {"metadata": {"axes": "ZYX"}}
    if pixel_size_nm:
        kwargs["resolution"] = (1e3 / pixel_size_nm, 1e3 / pixel_size_nm)
        kwargs["metadata"]["unit"] = "micron"
        if not imagej:
            kwargs["resolutionunit"] = "CENTIMETER"
            kwargs["resolution"] = (1e7 / pixel_size_nm, 1e7 / pixel_size_nm)
            kwargs["metadata"] = {"axes": "ZYX"}

    def write(fh) -> None:
        with tifffile.TiffWriter(fh, imagej=imagej) as tif:
            tif.write((np.asarray(volume[z]).astype(dtype, copy=False) for z in range(volume.shape[0])),
                      shape=tuple(volume.shape), dtype=dtype, **kwargs)

    return atomic_write(path, write)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``:
    a crash leaves the old file or the new one, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
