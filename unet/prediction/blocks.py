"""The blocks of a blockwise prediction and where they write (:mod:`unet.prediction.blockwise` predicts them,
:mod:`unet.prediction.schedule` hands them out, :mod:`unet.prediction.stitch` joins the tiles of a slice).

A slice up to ``tile``² pixels is one block; a larger slice is cut into tiles of ``tile``² pixels (on chunk
boundaries, so no two blocks ever write the same chunk), each a block of its own. Every block writes into
the prediction's OME-Zarr outputs (:func:`create_outputs`, :func:`write_slice`).

A slice is finished when its marker ``blocks/<i>.json`` (written last, atomically, with its scores and
the digests of what was written) exists; a tile when ``blocks/<i>-<t>.json`` does. Anything killed
half-way is simply done again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from unet.exchange.io import CHUNK

OUTPUT_DTYPES = {"probabilities": np.float32, "mask": np.uint8, "instances": np.int32, "neurons": np.int32}
TILE = 2048  # slices up to TILE² pixels are one block; larger ones are cut into tiles of TILE²
HALO = 128  # pixels of instance context around a tile, and the width of the bands neighbours compare


@dataclass(frozen=True)
class BlockJob:
    """What every block of one prediction needs (plain values: it travels to the Dask workers)."""

    checkpoint: str  # the checkpoint file (or, with ``package``, a BioImage.IO package exported by Neuroseg)
    volume: str  # the stack: the dataset's OME-Zarr volume, or a file ``opener`` opens
    out: str  # the prediction's folder: <output>.ome.zarr and blocks/
    slices: tuple[int, ...]  # output slice i is slice slices[i] of the volume
    threshold: float = 0.5
    with_instances: bool = True
    tta: bool = False
    device: str = "auto"  # "auto": the worker's GPU when it has one, else the CPU
    # opens ``volume`` as an array of (Z, Y, X) in each process that reads it (a picklable function: it
    # travels to the Dask workers); None: :func:`unet.exchange.stacks.open_stack` (a TIFF or zarr file, slice by slice)
    opener: Callable[[str], Any] | None = None
    package: bool = False  # ``checkpoint`` is a BioImage.IO package (its weights, never its code)
    network_tile: int = 0  # the network's input tile (0: the engine's choice, unet.prediction.infer.choose_tile)
    threads: int = 0  # CPU threads per worker (0: leave torch's default)
    tile: int = TILE  # the largest slice edge predicted whole; larger slices are cut into tiles of this edge
    halo: int = HALO
    method: str = "agglomerate"  # how neurons are made from the map (unet.prediction.postprocess.METHODS; the default)

    def __post_init__(self) -> None:
        if self.tile > CHUNK and self.tile % CHUNK:
            raise ValueError(f"a tile larger than a chunk must be a multiple of it ({CHUNK}), not {self.tile}")
        if not 0 < self.halo <= self.tile:
            raise ValueError(f"the halo must be between 1 and the tile ({self.tile}), not {self.halo}")

    @property
    def outputs(self) -> tuple[str, ...]:
        """What every block writes."""
        return ("probabilities", "mask", "instances") if self.with_instances else ("probabilities", "mask")

    @property
    def all_outputs(self) -> tuple[str, ...]:
        """The block outputs and, with instances, the 3D neurons linked from them (:func:`link_neurons`)."""
        return (*self.outputs, "neurons") if self.with_instances else self.outputs

    @property
    def chunk(self) -> int:
        """The outputs' chunk edge: tiles start on chunk boundaries."""
        return min(CHUNK, self.tile)


@dataclass(frozen=True)
class Block:
    """One unit of work: output slice ``index`` whole (``part`` None) or its tile ``part``."""

    index: int
    part: int | None
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def key(self) -> str:
        return str(self.index) if self.part is None else f"{self.index}-{self.part}"

    @property
    def pixels(self) -> int:
        return (self.rows[1] - self.rows[0]) * (self.cols[1] - self.cols[0])


def slice_blocks(job: BlockJob, index: int, shape: tuple[int, int]) -> list[Block]:
    """The blocks of output slice ``index``: the whole slice, or its tiles in row-major order."""
    y, x = shape
    if y <= job.tile and x <= job.tile:
        return [Block(index, None, (0, y), (0, x))]
    rows = [(r, min(r + job.tile, y)) for r in range(0, y, job.tile)]
    cols = [(c, min(c + job.tile, x)) for c in range(0, x, job.tile)]
    return [Block(index, part, r, c) for part, (r, c) in enumerate((r, c) for r in rows for c in cols)]


def plan(job: BlockJob, shape: tuple[int, int]) -> dict[int, list[Block]]:
    """Every output slice's blocks."""
    return {index: slice_blocks(job, index, shape) for index in range(len(job.slices))}


def output_path(folder: str | os.PathLike, name: str) -> Path:
    return Path(folder) / f"{name}.ome.zarr"


def marker_path(job: BlockJob, key: str | int) -> Path:
    return Path(job.out) / "blocks" / f"{key}.json"


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def create_output(final: Path, name: str, shape: tuple[int, int, int], slices: list[int],
                  pixel_size_nm: float | None = None, chunk: int = CHUNK) -> None:
    """One output image ``(len(slices), Y, X)``, created whole in a partial folder and renamed."""
    from ome_zarr.writer import write_multiscales_metadata  # it imports dask.array and xarray (~2 s): not in the server

    n, y, x = shape
    partial = final.with_name(f"{final.name}.partial-{uuid.uuid4().hex[:12]}")
    try:
        group = zarr.open_group(LocalStore(partial), mode="w", zarr_format=3)
        group.create_array("0", shape=(n, y, x), chunks=(1, min(chunk, y), min(chunk, x)), dtype=OUTPUT_DTYPES[name],
                           compressors=[ZstdCodec(level=3), Crc32cCodec()], fill_value=0,
                           config={"write_empty_chunks": True})
        xy = float(pixel_size_nm or 1.0)
        unit = {"unit": "nanometer"} if pixel_size_nm else {}
        write_multiscales_metadata(group, name=name, axes=[{"name": a, "type": "space", **unit} for a in "zyx"],
                                   datasets=[{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [1.0, xy, xy]}]}])
        group.attrs["neuroseg"] = {"slices": list(slices)}
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def create_outputs(job: BlockJob, shape: tuple[int, int], pixel_size_nm: float | None = None) -> None:
    """Create the output arrays ``(len(slices), Y, X)`` (each an OME-Zarr image; chunks of one slice by
    ``job.chunk``² pixels, zstd and CRC32C); outputs that exist already (a resumed prediction) are kept."""
    for name in job.all_outputs:
        final = output_path(job.out, name)
        if not (final / "zarr.json").is_file():
            create_output(final, name, (len(job.slices), *shape), list(job.slices), pixel_size_nm, job.chunk)


def write_slice(path: Path, index: int, data: np.ndarray, rows: tuple[int, int] | None = None,
                cols: tuple[int, int] | None = None) -> None:
    """Write slice ``index`` of an output (or its region ``rows`` × ``cols``), every chunk of it even when
    all zeros (the setting is not kept in the array's metadata, so it is set again here: a missing chunk
    must always mean damage)."""
    # (the array's own setting, not zarr's global config: threads of unet.prediction.pipeline write at once)
    array = zarr.open_array(LocalStore(path), path="0", mode="r+").with_config({"write_empty_chunks": True})
    if rows is None:
        array[index] = data
    else:
        array[index, rows[0]:rows[1], cols[0]:cols[1]] = data


def finished_blocks(job: BlockJob) -> dict[int, dict[str, Any]]:
    """The output slices already finished (index → their marker: scores and digests)."""
    done = {}
    for index in range(len(job.slices)):
        marker = read_marker(marker_path(job, index))
        if marker is not None:
            done[index] = marker
    return done

def raw_path(job: BlockJob, index: int) -> Path:
    return Path(job.out) / "blocks" / f"{index}.raw.zarr"

def combined_sha256(markers: Mapping[int, dict[str, Any]], name: str) -> str:
    """One digest for an output: the sha256 of its slices' digests in order."""
    digest = hashlib.sha256()
    for index in sorted(markers):
        digest.update(markers[index]["sha256"][name].encode())
    return digest.hexdigest()
