"""What a TIFF's compressed pages may decode to, checked before a pixel is decoded.

tifffile decodes the general-purpose codecs (LZW, Deflate, PackBits, Zstd, LZMA …) into a buffer of the size the
page's header declares, which :mod:`unet.exchange.io` has already checked. The image codecs are different: a
strip or tile stored as a JPEG, PNG, JPEG 2000, WebP or JPEG XL picture decodes to whatever that picture's own
header says, so a file of a few hundred kB can hold a 30,000² picture behind a 64² page (a decompression bomb).

- **JPEG** (compression 7, what some microscopes and TrakEM2 exports write): each segment's frame header (its
  SOF marker) is read, and the picture may be no larger than the strip or tile it stands for.
- **The other image codecs** are refused with what to do instead: EM stacks are saved uncompressed or with a
  general-purpose codec, and no size check of their pictures is written here.
"""

from __future__ import annotations

import tifffile

JPEG = 7
# the frame headers (SOF0-15, but DHT, JPG and DAC)
SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
HEAD = 1 << 20  # bytes of a segment read to find its frame header (tables and APP blocks come first)
SAVE_AGAIN = ("save the stack again uncompressed or with LZW, Deflate or Zstd (Fiji: File › Save As › Tiff…; "
              "tifffile: compression='zlib')")


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG stream's frame header, or None when there is none before the scan (or a
    height of 0, which leaves the height to a marker after the scan)."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # (fill bytes before a marker)
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # (markers without a length)
            i += 2
            continue
        if marker == 0xDA:  # the scan starts: no frame header came
            return None
        if marker in SOF:
            if i + 9 > len(data):
                return None
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return (height, width) if height > 0 else None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def check_page(page: tifffile.TiffPage, what: str, index: int) -> None:
    """``ValueError`` unless the compressed segments of ``page`` (slice ``index``, from 0) decode to no more than
    its header declares (see the module's text)."""
    key = page.keyframe  # (a page of an ImageJ or shaped series can be a frame: its first page says how)
    compression = int(key.compression)
    if compression not in tifffile.TIFF.IMAGE_COMPRESSIONS:
        return
    name = getattr(key.compression, "name", str(compression))
    if compression != JPEG:
        raise ValueError(f"{what}: slice {index + 1} is stored as {name} pictures inside the TIFF, which Neuroseg "
                         f"does not read (such a picture can decode to far more than the file's header says); "
                         f"{SAVE_AGAIN}")
    if key.is_tiled:
        most = (key.tilelength, key.tilewidth)
    else:
        most = (min(key.rowsperstrip or key.imagelength, key.imagelength), key.imagewidth)
    handle = page.parent.filehandle
    for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False):
        if not count:
            continue
        handle.seek(offset)
        size = jpeg_size(handle.read(min(count, HEAD)))
        if size is None or size[0] > most[0] or size[1] > most[1]:
            found = "no readable size" if size is None else f"{size[0]} × {size[1]} pixels"
            raise ValueError(f"{what}: slice {index + 1} holds a JPEG picture of {found} where its header declares "
                             f"at most {most[0]} × {most[1]}; the file is damaged or not what it claims to be")


def check_pages(source, what: str) -> None:
    """:func:`check_page` for every page of the TIFF ``source`` (a path or a binary file, rewound after)."""
    if hasattr(source, "seek"):
        source.seek(0)
    with tifffile.TiffFile(source) as tif:
        for index, page in enumerate(tif.pages):
            check_page(page, what, index)
    if hasattr(source, "seek"):
        source.seek(0)
