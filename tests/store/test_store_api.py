"""Datasets and mask versions on a real SQLite file and a real file store in tmp_path."""

import io

import numpy as np
import pytest
import tifffile
from sqlalchemy import func, select

from domain.records import MaskConflict
from storage.db import make_engine, session_factory, upgrade
from storage.models import Dataset, MaskVersion
from storage.records import datasets, deletion, masks
from storage.records.files import FileStore, IntegrityError
from unet.training.labels import IGNORE, NEURON


@pytest.fixture
def store(tmp_path, database_url):
    """A migrated database (SQLite and PostgreSQL) and a file store, both empty."""
    engine = make_engine(database_url)
    upgrade(engine)
    yield session_factory(engine), FileStore(tmp_path / "files")
    engine.dispose()


def _tif(path, data, **kw):
    tifffile.imwrite(path, data, **({"photometric": "minisblack"} | kw))
    return path


def _files(fs: FileStore) -> list:
    return [p for p in fs.root.rglob("*") if p.is_file()]


def test_import_browse_rename_delete(store, tmp_path, synthetic):
    sessions, fs = store
    volume, labels = synthetic
    with sessions.begin() as s:
        info = datasets.import_dataset(s, fs, _tif(tmp_path / "v.tif", volume), _tif(tmp_path / "l.tif", labels),
                                  name="demo", author="ana")
    assert info.shape == volume.shape and info.labelled_slices == volume.shape[0] and info.name == "demo"
    with sessions.begin() as s:
        np.testing.assert_array_equal(datasets.load_volume(s, fs, info.id), volume)
        first = masks.latest_mask(s, info.id, 2)
        assert first.kind == "uploaded" and first.version == 1 and first.author == "ana"
        assert datasets.update_dataset(s, info.id, name="  renamed  ", notes="n").name == "renamed"
        assert [d.name for d in datasets.list_datasets(s)] == ["renamed"]
    assert fs.count_files(fs.volume_path(info.id)) == 1  # an OME-Zarr folder counts as one stored file
    with sessions.begin() as s:
        gone = deletion.execute(s, fs, deletion.plan_dataset(s, fs, info.id))
    assert gone.datasets == 1 and gone.mask_versions == volume.shape[0] and gone.files == volume.shape[0] + 1
    assert _files(fs) == []
    with sessions.begin() as s:
        assert s.scalar(select(func.count()).select_from(MaskVersion)) == 0


HOSTILE = {
    "truncated": lambda p: p.write_bytes(_bytes(np.ones((5, 64, 64), np.uint8))[:3000]),
    "empty": lambda p: p.write_bytes(b""),
    "not a tiff": lambda p: p.write_bytes(b"GIF89a" + b"\0" * 100),
    "rgb": lambda p: tifffile.imwrite(p, np.zeros((16, 16, 3), np.uint8), photometric="rgb"),
    "channels": lambda p: tifffile.imwrite(p, np.zeros((2, 3, 16, 16), np.uint8), imagej=True,
                                           metadata={"axes": "ZCYX"}),
    "float64": lambda p: _tif(p, np.zeros((2, 8, 8), np.float64)),
    "int32": lambda p: _tif(p, np.zeros((2, 8, 8), np.int32)),
    "nan": lambda p: _tif(p, np.full((2, 8, 8), np.nan, np.float32)),
    "infinite": lambda p: _tif(p, np.full((2, 8, 8), np.inf, np.float32)),
}


def _bytes(data):
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, photometric="minisblack")
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_volumes_leave_no_row_and_no_file(store, tmp_path, case):
    sessions, fs = store
    path = tmp_path / f"{case}.tif"
    HOSTILE[case](path)
    with pytest.raises(ValueError, match=f"^{case}\\.tif: "), sessions.begin() as s:  # names the file
        datasets.import_dataset(s, fs, path)
    with sessions.begin() as s:
        assert s.scalar(select(func.count()).select_from(Dataset)) == 0
    assert _files(fs) == []


def test_labels_of_another_shape_and_huge_sizes_leave_nothing(store, tmp_path):
    sessions, fs = store
    v = _tif(tmp_path / "v.tif", np.zeros((3, 16, 16), np.uint8))
    l_bad = _tif(tmp_path / "l.tif", np.zeros((3, 16, 17), np.uint8))
    with pytest.raises(ValueError, match="labels have shape"), sessions.begin() as s:
        datasets.import_dataset(s, fs, v, l_bad)
    with pytest.raises(ValueError, match="GiB allowed"), sessions.begin() as s:
        datasets.import_dataset(s, fs, v, max_bytes=100)
    with sessions.begin() as s:
        assert datasets.list_datasets(s) == []
    assert _files(fs) == []


def test_a_hostile_file_name_never_reaches_the_disk(store, tmp_path):
    sessions, fs = store
    buf = io.BytesIO(_bytes(np.zeros((2, 8, 8), np.uint8)))
    buf.name = "../../etc/passwd"
    with sessions.begin() as s:
        info = datasets.import_dataset(s, fs, buf)
    assert info.source_name == "passwd" and info.name == "passwd"
    assert {p.relative_to(fs.root).parts[:3] for p in _files(fs)} == {("datasets", str(info.id), "volume.ome.zarr")}


def test_mask_versions_conflicts_and_restore(store, tmp_path, synthetic):
    sessions, fs = store
    volume, labels = synthetic
    with sessions.begin() as s:
        ds = datasets.import_dataset(s, fs, _tif(tmp_path / "v.tif", volume), _tif(tmp_path / "l.tif", labels))
        v1 = masks.latest_mask(s, ds.id, 0)
        uploaded = masks.load_mask(s, fs, v1.id)
    painted = uploaded.copy()
    painted[10:20, 10:20] = NEURON
    with sessions.begin() as s:
        v2 = masks.save_mask(s, fs, ds.id, 0, painted, kind="painted", author="bo", parent_id=v1.id)
    assert (v2.version, v2.parent_id, v2.kind) == (2, v1.id, "painted")
    # a second editor who also started from v1 must not overwrite v2
    other = uploaded.copy()
    other[:5] = IGNORE
    with pytest.raises(MaskConflict, match="newer version \\(v2 by bo\\)"), sessions.begin() as s:
        masks.save_mask(s, fs, ds.id, 0, other, kind="scribble", author="cy", parent_id=v1.id)
    with sessions.begin() as s:
        v3 = masks.restore_mask(s, fs, v1.id, author="bo")
        assert [m.version for m in masks.mask_history(s, ds.id, 0)] == [1, 2, 3]
        np.testing.assert_array_equal(masks.load_mask(s, fs, v3.id), uploaded)
        np.testing.assert_array_equal(masks.load_mask(s, fs, v2.id), painted)  # nothing was overwritten
        assert v3.parent_id == v2.id and v3.labelled_pixels == uploaded.size


def test_bad_masks_are_refused(store, tmp_path, synthetic):
    sessions, fs = store
    volume, _ = synthetic
    with sessions.begin() as s:
        ds = datasets.import_dataset(s, fs, _tif(tmp_path / "v.tif", volume))
    good = np.zeros(volume.shape[1:], np.uint8)
    with sessions.begin() as s:
        with pytest.raises(ValueError, match="does not match the slice shape"):
            masks.save_mask(s, fs, ds.id, 0, good[:5], kind="painted", parent_id=None)
        with pytest.raises(ValueError, match="outside the dataset's slices"):
            masks.save_mask(s, fs, ds.id, 99, good, kind="painted", parent_id=None)
        with pytest.raises(ValueError, match="mask kind"):
            masks.save_mask(s, fs, ds.id, 0, good, kind="magic", parent_id=None)
        with pytest.raises(ValueError, match="uint8 values"):
            masks.save_mask(s, fs, ds.id, 0, good + 7, kind="painted", parent_id=None)


def test_damaged_files_are_detected_on_read(store, tmp_path, synthetic):
    sessions, fs = store
    volume, _ = synthetic
    with sessions.begin() as s:
        ds = datasets.import_dataset(s, fs, _tif(tmp_path / "v.tif", volume))
    chunk = fs.abspath(fs.volume_path(ds.id)) / "0" / "c" / "1" / "0" / "0"  # slice 1's first tile
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with sessions.begin() as s:
        stored = datasets.load_volume(s, fs, ds.id)
    np.testing.assert_array_equal(stored[0], volume[0])  # the other slices still read
    with pytest.raises(IntegrityError, match="damaged"):
        stored[1]
    chunk.unlink()
    with pytest.raises(IntegrityError, match=r"chunk 0/c/1/0/0 is missing"):
        stored[1]


def test_a_full_disk_during_import_leaves_nothing(store, tmp_path, synthetic, monkeypatch):
    import errno

    from storage.records import masks

    sessions, fs = store
    volume, labels = synthetic
    real_write = masks.write_tiff_atomic  # (an upload's masks are written aside while the volume converts)
    calls = []

    def write_until_full(path, data, *args, **kwargs):
        calls.append(path)
        if len(calls) > 2:  # two masks fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data, *args, **kwargs)

    monkeypatch.setattr(masks, "write_tiff_atomic", write_until_full)
    with pytest.raises(OSError, match="No space left"), sessions.begin() as s:
        datasets.import_dataset(s, fs, _tif(tmp_path / "v.tif", volume), _tif(tmp_path / "l.tif", labels))
    assert len(calls) == 3
    with sessions.begin() as s:
        assert s.scalar(select(func.count()).select_from(Dataset)) == 0
        assert s.scalar(select(func.count()).select_from(MaskVersion)) == 0
    assert _files(fs) == []
