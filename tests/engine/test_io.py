"""Reading stacks: the shapes we accept, and a clear ValueError for everything else."""

import numpy as np
import pytest
import tifffile

from unet.exchange.io import inspect_stack, parse_slices, read_labels, read_stack
from unet.exchange.writing import write_tiff_atomic


def test_multipage_stack(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (5, 32, 40), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "v.tif", data)
    out = read_stack(tmp_path / "v.tif")
    assert out.shape == (5, 32, 40) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, data)


def test_single_2d_image_becomes_one_slice(tmp_path):
    tifffile.imwrite(tmp_path / "one.tif", np.arange(12, dtype=np.uint16).reshape(3, 4))
    out = read_stack(tmp_path / "one.tif")
    assert out.shape == (1, 3, 4) and out.dtype == np.uint16


def test_imagej_hyperstack_with_singleton_axes(tmp_path):
    data = np.random.default_rng(1).random((1, 4, 1, 16, 16), dtype=np.float32)  # TZCYX
    tifffile.imwrite(tmp_path / "h.tif", data, imagej=True, metadata={"axes": "TZCYX"})
    out = read_stack(tmp_path / "h.tif")
    assert out.shape == (4, 16, 16) and out.dtype == np.float32


def test_imagej_time_series_is_read_as_slices(tmp_path):
    data = np.zeros((3, 8, 8), np.uint8)
    tifffile.imwrite(tmp_path / "t.tif", data, imagej=True, metadata={"axes": "TYX"})
    assert read_stack(tmp_path / "t.tif").shape == (3, 8, 8)


def test_file_like_upload(tmp_path):
    import io

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ones((2, 8, 8), np.uint8))
    buf.name = "upload.tif"
    buf.seek(5)  # a previous reader left it somewhere: reading must not depend on that
    assert read_stack(buf).shape == (2, 8, 8)


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: tifffile.imwrite(p, np.zeros((16, 16, 3), np.uint8), photometric="rgb"), "colour image"),
    (lambda p: tifffile.imwrite(p, np.zeros((2, 3, 16, 16), np.uint8), imagej=True,
                                metadata={"axes": "ZCYX"}), "3 channels"),
    (lambda p: tifffile.imwrite(p, np.zeros((2, 3, 16, 16), np.uint8), imagej=True,
                                metadata={"axes": "TZYX"}), "more than one stack axis"),
    (lambda p: tifffile.imwrite(p, np.zeros((2, 8, 8), np.float64)), "float64 is not supported"),
    (lambda p: tifffile.imwrite(p, np.zeros((2, 8, 8), np.int32)), "int32 is not supported"),
    (lambda p: tifffile.imwrite(p, np.full((2, 8, 8), np.nan, np.float32)), "NaN"),
    (lambda p: p.write_bytes(b"this is not a tiff at all"), "this is not a TIFF file"),
    (lambda p: p.write_bytes(b""), "the file is empty"),
])
def test_refusals_say_what_is_wrong(tmp_path, make, message):
    path = tmp_path / "bad.tif"
    make(path)
    with pytest.raises(ValueError, match=message):
        read_stack(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, (5, 64, 64), dtype=np.uint8))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"t\.tif: the pixel data could not be read"):
        read_stack(path)


def test_huge_declared_size_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="GiB allowed"):
        read_stack(path, max_bytes=1000)


def test_labels_must_match_the_volume(tmp_path):
    tifffile.imwrite(tmp_path / "l.tif", np.zeros((3, 8, 8), np.uint8), photometric="minisblack")
    with pytest.raises(ValueError, match=r"labels have shape \(3, 8, 8\) but the image stack has shape \(3, 8, 9\)"):
        read_labels(tmp_path / "l.tif", (3, 8, 9))
    assert read_labels(tmp_path / "l.tif", (3, 8, 8)).shape == (3, 8, 8)


def test_write_tiff_is_imagej_readable_with_pixel_size(tmp_path):
    probs = np.random.default_rng(0).random((3, 20, 30)).astype(np.float32)
    path = write_tiff_atomic(tmp_path / "out" / "p.tif", probs, pixel_size_nm=4.0)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej
        assert tif.imagej_metadata["images"] == 3
        assert tif.series[0].axes == "ZYX"
    np.testing.assert_array_equal(read_stack(path), probs)
    assert inspect_stack(path).pixel_size_nm == pytest.approx(4.0, rel=1e-3)
    assert not list((tmp_path / "out").glob("*.tmp"))  # no temporary left behind


def test_write_tiff_converts_what_imagej_cannot_hold(tmp_path):
    inst = np.array([[[0, 1], [2, 70000]]], np.int64)
    small = np.array([[[0, 1], [2, 300]]], np.int64)
    assert read_stack(write_tiff_atomic(tmp_path / "a.tif", inst)).dtype == np.float32
    assert read_stack(write_tiff_atomic(tmp_path / "b.tif", small)).dtype == np.uint16


@pytest.mark.parametrize(("text", "n", "expected"), [
    ("0-24", 30, list(range(25))), ("25-29", 30, [25, 26, 27, 28, 29]), ("1,3,5-6", 10, [1, 3, 5, 6]),
    ("all", 3, [0, 1, 2]),
])
def test_parse_slices(text, n, expected):
    assert parse_slices(text, n) == expected


@pytest.mark.parametrize(("text", "message"), [("0-30", "outside"), ("5-2", "backwards"), ("a-b", "not a number")])
def test_parse_slices_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_slices(text, 30)


def test_isbi_stacks_read(isbi_dir):
    volume = read_stack(isbi_dir / "train-volume.tif")
    labels = read_labels(isbi_dir / "train-labels.tif", volume.shape)
    assert volume.shape == (30, 512, 512) and volume.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == {0, 255}
    assert 0.15 < np.mean(labels == 0) < 0.30  # about 22% membrane


def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


def _frame(marker: int, height: int, width: int) -> bytes:
    return _segment(marker, bytes([8]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([1, 1, 0x11, 0]))


@pytest.mark.parametrize(("stream", "size"), [
    (_segment(0xE0, b"JFIF\0") + _frame(0xC0, 64, 48), (64, 48)),  # baseline, after an APP block
    (_frame(0xC3, 64, 48), (64, 48)),  # lossless (16-bit EM)
    (_frame(0xC0, 64, 48) + _frame(0xC3, 8192, 8192), None),  # two frames: two decoders could take either
    (_frame(0xC5, 64, 48), None),  # a hierarchical frame, which TIFF does not hold
    (b"\xff\xd0" + _frame(0xC0, 64, 48), None),  # a restart marker before the scan
    (_segment(0xFE, b"x") + b"\xff" + _frame(0xC0, 64, 48), None),  # a fill byte
    (_frame(0xC0, 0, 48), None),  # the height left to a marker after the scan
    (b"", None),  # no frame at all before the scan
])
def test_a_jpeg_strips_size_is_read_strictly_before_it_is_decoded(stream, size):
    from unet.exchange.tiff_codecs import jpeg_size

    assert jpeg_size(b"\xff\xd8" + stream + _segment(0xDA, bytes(8))) == size
