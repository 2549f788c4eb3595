"""Bounded decoding of the chunks of a folder on the server: only the codecs allowed (:data:`ALLOWED_CODECS`),
each checking what a chunk's compressed header declares before anything is allocated for it, so a few
kilobytes cannot make the server allocate gigabytes (:class:`DecompressionBomb`). ``bound_decoding`` fits
a zarr array with such codecs; ``decompress`` decodes one N5 block the same way."""

from __future__ import annotations

import bz2
import lzma
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numcodecs.blosc
import numcodecs.zstd
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, ShardingCodec, TransposeCodec, ZstdCodec
from zarr.codecs._v2 import V2Codec
from zarr.core.metadata import ArrayV2Metadata
from zarr.registry import get_pipeline_class

from storage.records.server_folders import MAX_CHUNKS_PER_SLICE


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


def decompress(kind: str, data: Any, cap: int, decode: Any = None) -> bytes:
    """``data`` decompressed (``kind``: raw, gzip, zlib, zstd, blosc, bzip2, xz), refused (:class:`DecompressionBomb`)
    when its headers declare, or its stream yields, more than ``cap`` bytes; before anything is allocated
    for it. ``decode`` decodes zstd and blosc once checked (numcodecs' by default)."""
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
        return decompress(self.codec_id, buf, self.cap, self.codec.decode)

    def encode(self, buf: Any) -> bytes:
        raise TypeError("a server folder is read only")

    def get_config(self) -> dict[str, Any]:
        return self.codec.get_config()


def _bounded_codecs(codecs: Sequence[Any], where: str, nested: bool = False) -> list[Any]:
    """A zarr v3 array's codecs, each allowed one (:data:`ALLOWED_CODECS`) replaced by one that checks what
    a chunk declares before decoding it; ValueError for any other."""
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


def bound_decoding(array: zarr.Array, where: str) -> None:
    """Let ``array`` decode its chunks only with allowed codecs (:data:`ALLOWED_CODECS`; ValueError for
    others, before any chunk is read), each refusing a chunk that declares more bytes than a chunk of
    the array holds (:class:`DecompressionBomb`) before allocating them."""
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

