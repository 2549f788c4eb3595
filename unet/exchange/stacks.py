"""A stack on disk opened as an array read slice by slice (:func:`open_stack`): a TIFF one page at a time
(:class:`TiffSlices`), or a zarr or OME-Zarr folder: the whole stack is never in memory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

from unet.exchange.io import iter_slices
from unet.exchange.limits import Limits
from unet.exchange.tiff_codecs import check_page, open_tiff


class TiffSlices:
    """A TIFF stack read one slice (one page) at a time, as ``stack[z]`` or ``stack[z, rows, cols]``: the
    whole stack is never in memory (:func:`iter_slices`'s header checks first). The slice read last is
    kept, so the tiles and row bands of one slice read its page once."""

    def __init__(self, path: str | os.PathLike, limits: Limits | None = None):
        self.path = str(path)
        info, _ = iter_slices(self.path, limits=limits)  # checks the header; reads nothing yet
        self.shape, self.dtype = info.shape, np.dtype(info.dtype)
        self.ndim = 3
        self._tif = open_tiff(self.path)
        self._tif.filehandle.set_lock(True)  # (threads share this file: each page's seek and read is one step)
        pages = list(self._tif.series[0].pages)
        if len(pages) != self.shape[0]:
            self._tif.close()
            raise ValueError(f"{Path(self.path).name}: its slices are not stored one page each; save it again as "
                             "a plain multi-page TIFF (Fiji: File › Save As › Tiff…) or as OME-Zarr")
        self._pages = pages
        self._first = next((page for page in pages if page is not None), None)  # (every page's shape and type)
        self._kept: tuple[int, np.ndarray] | None = None

    def _slice(self, z: int) -> np.ndarray:
        z = int(z)
        if not -self.shape[0] <= z < self.shape[0]:
            raise IndexError(f"slice {z} is not in a stack of {self.shape[0]}")
        z %= self.shape[0]
        if self._kept is None or self._kept[0] != z:
            if self._pages[z] is not None:  # (a picture inside may be larger than the page)
                check_page(self._pages[z], Path(self.path).name, z, self._first)
            try:
                plane = np.asarray(self._pages[z].asarray(maxworkers=1)).reshape(self.shape[1:])
            except Exception as exc:
                raise ValueError(f"{Path(self.path).name}: slice {z + 1} of {self.shape[0]} could not be read; the "
                                 f"file is probably truncated or damaged ({type(exc).__name__}: {exc})") from exc
            self._kept = (z, plane)
        return self._kept[1]

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self._slice(key)
        return self._slice(key[0])[key[1:]]

    def __len__(self) -> int:
        return self.shape[0]


def open_stack(path: str | os.PathLike):
    """A stack on disk as an array read slice by slice: a TIFF (:class:`TiffSlices`), or a zarr or
    OME-Zarr folder (its full-resolution array). Opened once per process."""
    key = str(Path(path).resolve())
    if key not in _OPENED:
        if Path(key).is_dir():
            found = zarr.open(key, mode="r")
            array = found if isinstance(found, zarr.Array) else found["0"]
            if array.ndim != 3:
                raise ValueError(f"{Path(key).name}: a stack of (Z, Y, X) is expected, not shape {array.shape}")
            _OPENED[key] = array
        else:
            _OPENED[key] = TiffSlices(key)
    return _OPENED[key]


_OPENED: dict[str, object] = {}
