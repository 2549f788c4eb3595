"""What a TIFF's compressed pages may decode to, checked before a pixel is decoded.

tifffile decodes the general-purpose codecs (LZW, Deflate, PackBits, Zstd, LZMA …) into a buffer of the size the
page's header declares: the page's strips or tiles. :mod:`unet.exchange.io` checks the stack's size from its
first page, so every page is checked here against it (decompression bombs of a few MB that inflate to GiB):

- **Each page declares the first page's shape**: a later page of a series may declare a 32,768² slice of its
  own, which tifffile would decode whole before anything noticed.
- **Each page is stored as the first page is** (pixel type, samples, colour space, compression): tifffile
  reads the later pages of a series as frames, with the first page's tags, so a page of float NaN behind a
  uint8 first page would be read as uint8 garbage without a word. Each page's own tags are read to check.
- **A tile decodes to no more than four of its slices**, rounded up to the tile grid of 16, or 64 MiB when
  that is more (an image smaller than one tile is legal): the tags allow tiles of 4 billion² pixels behind a
  64² page. A strip is cut to the page's rows by tifffile itself.

The image codecs are different: a
strip or tile stored as a JPEG, PNG, JPEG 2000, WebP or JPEG XL picture decodes to whatever that picture's own
header says, so a file of a few hundred kB can hold a 30,000² picture behind a 64² page (a decompression bomb).

- **JPEG** (compression 7, what some microscopes and TrakEM2 exports write): each segment's frame header (its
  SOF marker) is read, and the picture may be no larger than the strip or tile it stands for.
- **The other image codecs** are refused with what to do instead: EM stacks are saved uncompressed or with a
  general-purpose codec, and no size check of their pictures is written here.
"""

from __future__ import annotations

import contextlib

import tifffile

JPEG = 7
BASIC_SOF = {0xC0, 0xC1, 0xC2, 0xC3}  # baseline, extended, progressive, lossless: what TIFF's JPEG holds
OTHER_SOF = {0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # hierarchical and arithmetic frames
TILE_SLACK = 64 << 20  # bytes a tile may decode to whatever its slice's size (an image smaller than a tile)
TILE_SLICES = 4  # … and a tile may hold as many slices' bytes as this (4096² tiles on 3000² slices are legal)
HEAD = 1 << 20  # bytes of a segment read to find its frame header (tables and APP blocks come first)
SAVE_AGAIN = ("save the stack again uncompressed or with LZW, Deflate or Zstd (Fiji: File › Save As › Tiff…; "
              "tifffile: compression='zlib')")


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG stream's one frame, read strictly up to its scan; None unless the headers
    before the scan are plain marker segments with exactly one frame header, of a kind TIFF holds (baseline,
    extended, progressive or lossless) and a height above 0. Why strictly: imagecodecs falls back to another
    decoder (liblj92) on some errors, which reads the headers its own way; anything two readers could read
    differently (a second frame header, restart markers or fill bytes before the scan) is refused."""
    if data[:2] != b"\xff\xd8":
        return None
    i, size = 2, None
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xDA:  # the scan starts
            return size
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8 or marker in OTHER_SOF:
            return None  # (fill bytes, TEM, RST, a second SOI, frames TIFF does not hold)
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            return None
        if marker in BASIC_SOF:
            if size is not None or i + 9 > len(data):
                return None
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            if height == 0:  # (left to a DNL marker after the scan)
                return None
            size = (height, width)
        i += 2 + length
    return None


def _most(page) -> tuple[int, int]:
    """The largest strip or tile a page's tags allow: (rows, columns)."""
    if page.is_tiled:
        return page.tilelength, page.tilewidth
    return min(page.rowsperstrip or page.imagelength, page.imagelength), page.imagewidth


# what every page of a stack declares as its first page does (a frame is read with its keyframe's)
FORMAT = {"dtype": "pixel type", "samplesperpixel": "samples per pixel", "bitspersample": "bits per sample",
          "sampleformat": "sample format", "photometric": "colour space", "planarconfig": "sample layout",
          "compression": "compression", "predictor": "predictor", "fillorder": "bit order"}


def check_page(page: tifffile.TiffPage, what: str, index: int, first: tifffile.TiffPage | None = None) -> None:
    """``ValueError`` unless the compressed segments of ``page`` (slice ``index``, from 0) decode to no more than
    its header declares, and (with ``first``, the series' first page) it declares that page's shape and is stored
    as it is (see the module's text). A page of a series is decoded with its keyframe's settings (a frame has no
    others), so both that page's tags and its own must pass."""
    try:
        _check_layout(page, what, index, first)
        _check_page(page, what, index)
    except ValueError:
        raise
    except Exception as exc:  # (tags a damaged file lacks, offsets past its end: it is not read)
        raise ValueError(f"{what}: slice {index + 1} could not be read; the file is probably truncated or damaged "
                         f"({type(exc).__name__}: {exc})") from None


def open_tiff(source) -> tifffile.TiffFile:
    """``tifffile.TiffFile(source)``, but a stack written one slice per ``TiffWriter.write`` (tifffile's own
    header on each page: as many one-page series) is opened as the one stack of pages it is, as Fiji reads
    it; tifffile's first series was its first slice, and the rest was left out."""
    tif = tifffile.TiffFile(source)
    series = tif.series
    if len(series) > 1 and all(s.kind == "shaped" and len(s.pages) == 1 for s in series):
        tif.close()
        if hasattr(source, "seek"):
            source.seek(0)
        tif = tifffile.TiffFile(source, is_shaped=False)
    return tif


class PagesLeftOut(ValueError):
    pass


def check_series(tif: tifffile.TiffFile, what: str) -> None:
    """:class:`PagesLeftOut` (a ``ValueError``) if the stack read from ``tif`` (its first series) would leave
    out pages of the file without a word: in a plain TIFF, any full-size page that tifffile puts in another
    series (another size, pixel type or layout, before, among or after the stack's pages); in a file whose
    header shapes its series (ImageJ, OME, tifffile's own), a page among the stack's pages; and pages that an
    OME-XML header does not count (``SizeZ`` says fewer planes than the file holds). A reduced page (a preview
    or thumbnail that says it is one, as some microscopes write after each slice) is not a slice."""
    if not tif.series:
        return
    series = tif.series[0]
    indices = sorted(p.index for p in series.pages if p is not None and isinstance(p.index, int))
    if not indices:
        return
    kept = set(indices)
    around = range(len(tif.pages)) if series.kind in ("generic", "uniform") else range(indices[0], indices[-1])
    odd = [i for i in around if i not in kept and not getattr(own_tags(tif.pages[i]), "is_reduced", False)]
    if odd:
        page, like = own_tags(tif.pages[odd[0]]), own_tags(tif.pages[indices[0]])
        differs = "; ".join(_differences(page, like, layout=True)) or "another series of the file"
        raise PagesLeftOut(f"{what}: page {odd[0] + 1} is not stored as the stack's first page ({differs}), so it "
                           f"would be left out ({len(odd)} such page{'s' if len(odd) != 1 else ''}); save the stack "
                           "again with one size and pixel type for every slice (Fiji: Image › Type, then File › "
                           "Save As › Tiff…)")
    if tif.is_ome:
        counted = sum(1 for s in tif.series for p in s.pages if p is not None)
        if counted < len(tif.pages):
            raise PagesLeftOut(f"{what}: its OME-XML header describes {counted} plane{'s' if counted != 1 else ''} "
                               f"but the file holds {len(tif.pages)} pages, so some would be left out; the header "
                               "is wrong: save the stack again (Fiji: File › Save As › OME-TIFF…, or Tiff…)")


def _differences(own, first, layout: bool = False) -> list[str]:
    """How page ``own`` is stored unlike page ``first``: :data:`FORMAT`'s tags, and (``layout``) its size,
    strips and tiles."""
    said = []
    if layout and tuple(own.shape) != tuple(first.shape):
        said.append(f"{' × '.join(map(str, own.shape))} pixels instead of {' × '.join(map(str, first.shape))}")
    said += [f"{label} {_named(tag, getattr(own, tag, None))} instead of {_named(tag, getattr(first, tag, None))}"
             for tag, label in FORMAT.items() if getattr(own, tag, None) != getattr(first, tag, None)]
    if layout:
        for tag, label in (("rowsperstrip", "rows per strip"), ("tilewidth", "tile width"),
                           ("tilelength", "tile height")):
            if getattr(own, tag, None) != getattr(first, tag, None):
                said.append(f"{label} {getattr(own, tag, None)} instead of {getattr(first, tag, None)}")
    return said


def own_tags(page):
    """``page`` with its own tags: a :class:`tifffile.TiffFrame` is read again as the page it is (it holds only
    where its data lies, and is decoded with its keyframe's tags)."""
    if not isinstance(page, tifffile.TiffFrame):
        return page
    handle = page.parent.filehandle
    with handle.lock:
        at = handle.tell()
        try:
            handle.seek(page.offset)
            return tifffile.TiffPage(page.parent, index=page.index)
        finally:
            handle.seek(at)


def _named(tag: str, value: object) -> str:
    kind = {"sampleformat": tifffile.SAMPLEFORMAT, "photometric": tifffile.PHOTOMETRIC, "predictor": tifffile.PREDICTOR,
            "planarconfig": tifffile.PLANARCONFIG, "compression": tifffile.COMPRESSION}.get(tag)
    with contextlib.suppress(ValueError):
        value = kind(value) if kind is not None and value is not None else value
    return str(getattr(value, "name", value)).lower()


def _check_layout(page: tifffile.TiffPage, what: str, index: int, first: tifffile.TiffPage | None) -> None:
    own = own_tags(page)
    shape = None if first is None else first.shape
    for one in (page.keyframe, own):
        if shape is not None and tuple(one.shape) != tuple(shape):
            raise ValueError(f"{what}: slice {index + 1} declares {' × '.join(map(str, one.shape))} pixels where the "
                             f"stack's slices are {' × '.join(map(str, shape))}; the file is damaged or not what it "
                             "claims to be")
        if not isinstance(one, tifffile.TiffPage) or not one.is_tiled:
            continue
        grid = -(-one.imagelength // 16) * 16 * (-(-one.imagewidth // 16) * 16) * max(1, one.imagedepth)
        per_pixel = max(1, one.samplesperpixel) * max(1, -(-int(one.bitspersample) // 8))
        tile = one.tilelength * one.tilewidth * max(1, one.tiledepth)
        if tile * per_pixel > max(TILE_SLICES * grid * per_pixel, TILE_SLACK):
            raise ValueError(f"{what}: slice {index + 1} declares tiles of {one.tilelength} × {one.tilewidth} pixels "
                             f"for a slice of {one.imagelength} × {one.imagewidth}; the file is damaged or not what "
                             "it claims to be")
    if first is not None and own is not first:
        first = own_tags(first)
        differs = _differences(own, first)
        if differs:
            raise ValueError(f"{what}: slice {index + 1} is not stored as slice 1 is ({'; '.join(differs)}), and "
                             "would be read as if it were; save the stack again with one pixel type for every "
                             "slice (Fiji: Image › Type, then File › Save As › Tiff…)")


def _check_page(page: tifffile.TiffPage, what: str, index: int) -> None:
    pages = [page.keyframe] + ([page] if page is not page.keyframe and isinstance(page, tifffile.TiffPage) else [])
    for one in pages:
        compression = int(one.compression)
        if compression not in tifffile.TIFF.IMAGE_COMPRESSIONS:
            continue
        name = getattr(one.compression, "name", str(compression))
        if compression != JPEG:
            raise ValueError(f"{what}: slice {index + 1} is stored as {name} pictures inside the TIFF, which "
                             f"Neuroseg does not read (such a picture can decode to far more than the file's header "
                             f"says); {SAVE_AGAIN}")
    if not any(int(one.compression) == JPEG for one in pages):
        return
    most = tuple(min(dims) for dims in zip(*(_most(one) for one in pages), strict=True))
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
    """:func:`check_page` for every page of the first series of the TIFF ``source`` (what is read of it: a path
    or a binary file, rewound after)."""
    if hasattr(source, "seek"):
        source.seek(0)
    with open_tiff(source) as tif:
        pages = list(tif.series[0].pages) if tif.series else []
        first = next((page for page in pages if page is not None), None)
        for index, page in enumerate(pages):
            if page is not None:
                check_page(page, what, index, first)
    if hasattr(source, "seek"):
        source.seek(0)
