"""Volumes in the OME-Zarr store: converted page by page, read lazily, checked chunk by chunk, and moved
there from the TIFF files of earlier versions without losing a byte."""

import errno
import hashlib
import tracemalloc

import numpy as np
import pytest
import tifffile
from sqlalchemy import text
from zarr.storage import LocalStore

from storage.db import make_engine, open_store, upgrade
from storage.models import MaskVersion
from storage.records import datasets, masks
from storage.records.files import FileStore, IntegrityError, sha256_of
from storage.records.volumes import CHUNK, DiskFull, Volume, level_shapes, remove_partials, write_volume
from storage.settings import Settings
from unet.exchange.io import iter_slices
from unet.exchange.writing import write_tiff_atomic
from unet.training.labels import labels_to_target


def _settings(tmp_path) -> Settings:
    return Settings.from_env(tmp_path / "data", f"sqlite:///{tmp_path / 'data' / 'neuroseg.db'}")


def _stack(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_a_stack_is_converted_page_by_page_and_read_back_lazily(tmp_path):
    volume = _stack((48, 512, 512))  # 12 MiB
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, volume, imagej=True, metadata={"axes": "ZYX"})
    sessions, store = open_store(_settings(tmp_path), migrate=True)
    with sessions.begin() as s:  # a first small import loads the modules the conversion imports lazily
        datasets.import_dataset(s, store, write_tiff_atomic(tmp_path / "small.tif", volume[:1, :8, :8]))
    tracemalloc.start()
    with sessions.begin() as s:
        info = datasets.import_dataset(s, store, path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < volume.nbytes / 4, f"the import held {peak / 2**20:.1f} MiB for a 12 MiB stack"
    assert info.sha256 == hashlib.sha256(volume.tobytes()).hexdigest()  # the voxels' own digest
    with sessions.begin() as s:
        stored = datasets.load_volume(s, store, info.id)
    assert isinstance(stored, Volume) and stored.shape == volume.shape
    np.testing.assert_array_equal(stored[17], volume[17])
    np.testing.assert_array_equal(stored[3, 100:300, 400:512], volume[3, 100:300, 400:512])


def test_other_users_can_write_while_a_stack_converts_and_its_staging_folder_goes(tmp_path):
    """The volume (and the labels) are written before the dataset's row exists: SQLite holds a database from a
    transaction's first write to its end, so a row added first kept every other save waiting (30 s, then
    "database is locked") while a large stack converted."""
    import sqlite3

    volume = _stack((6, 64, 64), seed=7)
    sessions, store = open_store(_settings(tmp_path), migrate=True)
    with sessions.begin() as s:
        first = datasets.import_dataset(s, store, write_tiff_atomic(tmp_path / "a.tif", volume[:1]))
    written = []

    def another_user_saves(stage: str, _fraction: float) -> None:
        if stage.startswith("storing slice 4 "):  # half-way: another connection writes, and does not wait
            with sqlite3.connect(store.root / "neuroseg.db", timeout=0.5) as other:
                other.execute("UPDATE datasets SET notes = 'renamed meanwhile' WHERE id = ?", (first.id,))
            written.append(stage)
            assert [p.name for p in (store.root / "tmp").iterdir() if p.name.startswith("staging-")]

    labels = (volume > 128).astype(np.uint8) * 255
    with sessions.begin() as s:
        info = datasets.import_dataset(s, store, write_tiff_atomic(tmp_path / "v.tif", volume),
                                       write_tiff_atomic(tmp_path / "l.tif", labels), progress=another_user_saves)
    assert written and info.shape == volume.shape
    with sessions.begin() as s:
        assert datasets.get_dataset(s, first.id).notes == "renamed meanwhile"
        np.testing.assert_array_equal(datasets.load_volume(s, store, info.id)[5], volume[5])
        kept = masks.slice_kinds(s, info.id)  # the labels, recorded once the row existed
        assert sorted(kept) == list(range(6)) and {m.version for m in kept.values()} == {1}
        np.testing.assert_array_equal(store.read_stack(s.get(MaskVersion, kept[3].id).file,
                                                       s.get(MaskVersion, kept[3].id).sha256),
                                      labels_to_target(labels[3]))
    assert not [p for p in (store.root / "tmp").iterdir() if p.name.startswith("staging-")]
    # a staging folder a killed import left goes at the next start; one another server is filling stays
    with store.staging() as busy:
        left = store.root / "tmp" / "staging-left"
        (left / "volume.ome.zarr").mkdir(parents=True)
        (left / ".lock").touch()
        assert store.clean_spool() == 1 and not left.exists() and busy.is_dir()


def test_the_store_is_ome_zarr_with_a_pyramid_that_its_readers_open(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    volume = _stack((3, 1100, 700), seed=1)
    path = tmp_path / "wide.tif"
    tifffile.imwrite(path, volume, imagej=True, metadata={"axes": "ZYX"})
    sessions, store = open_store(_settings(tmp_path), migrate=True)
    with sessions.begin() as s:
        info = datasets.import_dataset(s, store, path)
        stored = datasets.load_volume(s, store, info.id)
    assert [level.shape for level in stored.levels] == [(3, 1100, 700), (3, 550, 350), (3, 275, 175)]
    assert level_shapes(1100, 700)[-1] == (275, 175) and max(level_shapes(8192, 8192)[-1]) <= CHUNK
    np.testing.assert_allclose(stored.levels[1][2].astype(float),
                               volume[2].reshape(550, 2, 350, 2).mean(axis=(1, 3)), atol=0.5)
    # what napari's and neuroglancer's OME-Zarr reader sees
    node = next(iter(Reader(parse_url(str(store.abspath(store.volume_path(info.id)))))()))
    pyramid = node.data
    assert len(pyramid) == 3
    np.testing.assert_array_equal(np.asarray(pyramid[0][1]), volume[1])


def test_a_damaged_or_missing_chunk_is_refused_with_its_name(tmp_path):
    volume = _stack((4, 64, 64), seed=2)
    sessions, store = open_store(_settings(tmp_path), migrate=True)
    with sessions.begin() as s:
        info = datasets.import_dataset(s, store, write_tiff_atomic(tmp_path / "v.tif", volume))
        stored = datasets.load_volume(s, store, info.id)
    folder = store.abspath(store.volume_path(info.id))
    chunk = folder / "0" / "c" / "2" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-3] + b"xyz")
    with pytest.raises(IntegrityError, match=r"volume.ome.zarr: a chunk is damaged"):
        stored[2]
    chunk.unlink()
    with pytest.raises(IntegrityError, match=r"chunk 0/c/2/0/0 is missing"):
        stored[2]
    np.testing.assert_array_equal(stored[3], volume[3])  # the rest of the stack still reads
    (folder / "zarr.json").unlink()
    with pytest.raises(IntegrityError, match="is missing"), sessions.begin() as s:
        datasets.load_volume(s, store, info.id)


def test_a_disk_that_fills_during_conversion_leaves_nothing(tmp_path, monkeypatch):
    volume = _stack((6, 64, 64), seed=3)
    labels = (volume > 128).astype(np.uint8) * 255
    sessions, store = open_store(_settings(tmp_path), migrate=True)
    real_set = LocalStore.set
    writes = []

    async def set_until_full(self, key, value):
        writes.append(key)
        if key.startswith("0/c/4/"):  # slice 4's chunk: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", set_until_full)
    with pytest.raises(DiskFull, match="the disk of the data directory is full"), sessions.begin() as s:
        datasets.import_dataset(s, store, write_tiff_atomic(tmp_path / "v.tif", volume),
                                write_tiff_atomic(tmp_path / "l.tif", labels))
    assert any(k.startswith("0/c/3/") for k in writes), "slices 0-3 were written before the disk filled"
    with sessions.begin() as s:
        assert datasets.list_datasets(s) == []
    assert [p for p in store.root.rglob("*") if p.is_file() and "datasets" in p.parts] == []


def test_a_store_of_an_earlier_version_is_converted_on_start_without_losing_a_byte(tmp_path, capfd):
    """The schema of the previous version (Alembic 0005) with two datasets stored as TIFF files, as that
    version left them; one of the files is damaged. Starting the new version converts the good one
    (voxels identical, TIFF gone) and leaves the damaged one as it was, saying why."""
    settings = _settings(tmp_path)
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.database_url)
    upgrade(engine, "0005")
    old = FileStore(settings.data_dir)
    volumes = {1: _stack((5, 700, 600), seed=4), 2: _stack((2, 32, 32), seed=5)}
    with engine.begin() as conn:
        for dataset_id, volume in volumes.items():
            relative = old.legacy_volume_path(dataset_id)
            sha, size = old.write_stack(relative, volume, pixel_size_nm=4.0)
            z, y, x = volume.shape
            conn.execute(text("INSERT INTO datasets (id, name, z, y, x, dtype, source_name, pixel_size_nm, sha256, "
                              "size_bytes, created, notes, held_out_version) VALUES (:id, 'old', :z, :y, :x, 'uint8', "
                              "'old.tif', 4.0, :sha, :size, CURRENT_TIMESTAMP, '', 0)"),
                         {"id": dataset_id, "z": z, "y": y, "x": x, "sha": sha, "size": size})
    damaged = old.abspath(old.legacy_volume_path(2))
    raw = bytearray(damaged.read_bytes())
    raw[-5] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    damaged_sha = sha256_of(damaged)
    engine.dispose()

    sessions, store = open_store(settings, migrate=True)
    with sessions.begin() as s:
        good = datasets.load_volume(s, store, 1)
        assert isinstance(good, Volume)
        np.testing.assert_array_equal(good[...], volumes[1])
        assert datasets.get_dataset(s, 1).sha256 == hashlib.sha256(volumes[1].tobytes()).hexdigest()
        with pytest.raises(IntegrityError, match="does not match its recorded checksum"):
            datasets.load_volume(s, store, 2)
    assert not store.abspath(store.legacy_volume_path(1)).exists()
    assert sha256_of(damaged) == damaged_sha and not store.abspath(store.volume_path(2)).exists()
    err = capfd.readouterr().err
    assert "dataset #1: volume converted to OME-Zarr" in err
    assert "dataset #2: its volume stays in datasets/2/volume.tif for now" in err


def test_a_conversion_killed_halfway_leaves_no_partial_volume(tmp_path):
    volume = _stack((3, 40, 40), seed=6)
    _, store = open_store(_settings(tmp_path), migrate=True)
    info, planes = iter_slices(write_tiff_atomic(tmp_path / "v.tif", volume))
    from storage.records.volumes import VolumeWriter

    writer = VolumeWriter(store.abspath("datasets/9/volume.ome.zarr"), info.shape, info.dtype)
    writer.write(next(planes))  # ... and the process is killed here
    assert list((store.root / "datasets" / "9").glob("volume.ome.zarr.partial-*"))
    assert not (store.root / "datasets" / "9" / "volume.ome.zarr").exists()
    assert remove_partials(store.root) == 1
    assert not list((store.root / "datasets" / "9").iterdir())


def test_a_folder_on_the_server_is_imported_by_path_copied_or_linked(tmp_path, monkeypatch):
    import tensorstore as ts
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    from domain.records import UserError
    from storage.service import Neuroseg

    volume = _stack((5, 70, 90), seed=8)
    v04 = tmp_path / "lab" / "old.ome.zarr"  # NGFF 0.4 on zarr v2, as many tools still write it
    group = zarr.open_group(str(v04), mode="w", zarr_format=2)
    write_image(volume, group, axes="zyx", fmt=FormatV04(), scale_factors=[])
    n5 = tmp_path / "lab" / "stack.n5"
    ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(n5)}, "create": True,
             "metadata": {"dimensions": list(volume.shape), "blockSize": [1, 32, 32], "dataType": "uint8",
                          "compression": {"type": "gzip"}}}).result()[...] = volume
    wrong = zarr.open_array(str(tmp_path / "lab" / "rgb.zarr"), mode="w", shape=(5, 70, 90, 3), dtype="uint8")
    wrong[...] = 1
    svc = Neuroseg(Settings.from_env(tmp_path / "data"), supervise=False)
    monkeypatch.setenv("NEUROSEG_IMPORT_ROOTS", str(tmp_path))  # off unless an admin names folders
    try:
        copied = svc.import_path(str(v04), name="old")
        from_n5 = svc.import_path(str(n5))
        linked = svc.import_path(str(v04), link=True, name="in place")
        for info in (copied, from_n5, linked):
            assert info.shape == volume.shape and info.dtype == "uint8"
            np.testing.assert_array_equal(svc.volume(info.id)[3], volume[3])
        assert copied.sha256 == hashlib.sha256(volume.tobytes()).hexdigest()
        assert from_n5.source_name.startswith("N5: ") and linked.source_name.startswith("OME-Zarr: ")
        assert not svc.store.abspath(svc.store.volume_path(linked.id)).exists()  # nothing copied
        assert svc.value_range(linked.id) == (float(volume[2].min()), float(volume[2].max()))
        before = len(svc.datasets())
        for path, reason in [(tmp_path / "nowhere", "this path cannot be imported"),
                             (tmp_path / "lab" / "rgb.zarr", "expected one grey-scale Z × Y × X stack"),
                             (tmp_path / "lab", "not a zarr or N5 folder"),
                             (svc.store.root / "datasets", "this path cannot be imported")]:
            with pytest.raises(UserError, match=reason):
                svc.import_path(str(path))
        monkeypatch.setenv("NEUROSEG_IMPORT_ROOTS", str(tmp_path / "elsewhere"))
        with pytest.raises(UserError, match="this path cannot be imported"):
            svc.import_path(str(v04))
        assert len(svc.datasets()) == before
        assert not [p for p in (svc.store.root / "datasets").iterdir()
                    if int(p.name) not in {copied.id, from_n5.id}]
    finally:
        svc.close()


def test_the_canvas_reads_only_its_region_and_the_overview_from_the_pyramid(tmp_path):
    from ui.paint import View, auto_window, overlay, slice_window, view_picture, window
    from unet.training.labels import IGNORE, NEURON
    from unet.training.synthetic import make_synthetic_em

    volume, _ = make_synthetic_em((2, 1100, 700), np.random.default_rng(9), cell_size=40)
    write_volume(tmp_path / "v.ome.zarr", iter(volume), volume.shape, volume.dtype)
    stored = Volume(tmp_path / "v.ome.zarr")
    reads = []

    class Spy:
        def __init__(self, level, k):
            self.level, self.k, self.shape = level, k, level.shape

        def __getitem__(self, key):
            reads.append((self.k, key))
            return self.level[key]

    class Watched:
        def __init__(self):
            self.levels = [Spy(level, k) for k, level in enumerate(stored.levels)]
            self.shape = stored.shape

        def __getitem__(self, key):
            return self.levels[0][key]

    mask = np.full(volume.shape[1:], IGNORE, np.uint8)
    mask[100:300, 50:200] = NEURON
    contrast = slice_window(Watched(), 1, sample=512)
    assert [(k, key[1]) for k, key in reads] == [(0, slice(294, 806))]  # its middle only

    whole = View.fit((1100, 700))  # the whole slice shrunk 2×: level 1, never the full resolution
    reads.clear()
    picture = view_picture(Watched(), 1, whole, mask, 0.4, contrast)
    assert [k for k, _ in reads] == [1] and picture.shape[:2] == whole.display_shape
    old = whole.render(overlay(window(volume[1], *contrast), mask, 0.4))  # what the page drew before
    assert np.abs(picture.astype(int) - old.astype(int)).mean() < 12  # the same picture, to the eye
    zoomed = View.fit((1100, 700), zoom=4, centre=(0.2, 0.3))  # full resolution, its region only
    reads.clear()
    picture = view_picture(Watched(), 1, zoomed, mask, 0.4, contrast)
    (k, key), = reads
    assert k == 0 and key[1:] == (slice(zoomed.y0, zoomed.y0 + zoomed.h), slice(zoomed.x0, zoomed.x0 + zoomed.w))
    np.testing.assert_array_equal(picture, zoomed.render(overlay(window(volume[1], *contrast), mask, 0.4)))
    assert contrast[1] - contrast[0] > 50 and contrast == pytest.approx(auto_window(volume[1]), abs=25)


def test_prediction_outputs_of_an_earlier_version_are_converted_on_start(tmp_path, monkeypatch):
    from storage.models import Prediction
    from storage.records import predictions
    from storage.service import Neuroseg
    from tests.store.test_starter import tiny_starter

    tiny_starter(tmp_path / "models", monkeypatch)
    settings = _settings(tmp_path)
    svc = Neuroseg(settings)
    info = svc.load_demo()
    start = svc.checkpoint_choices()[0].id
    svc.close()
    rng = np.random.default_rng(10)
    outputs = {"probabilities": rng.random((2, 256, 256), dtype=np.float32),
               "mask": (rng.random((2, 256, 256)) > 0.5).astype(np.uint8) * 255,
               "instances": rng.integers(0, 900, (2, 256, 256)).astype(np.uint16)}
    sessions, store = open_store(settings)
    with sessions.begin() as s:  # a finished prediction as an earlier version stored it: one TIFF per output
        job = predictions.submit_prediction(s, start, info.id, [3, 5])
        row = s.get(Prediction, job.id)
        files = {}
        for name, data in outputs.items():
            relative = f"{store.prediction_folder(job.id)}/{name}.tif"
            files[name] = {"file": relative, "sha256": store.write_stack(relative, data)[0]}
        row.status, row.files, row.file, row.sha256 = "FINISHED", files, files["probabilities"]["file"], \
            files["probabilities"]["sha256"]
    sessions, store = open_store(settings, migrate=True)  # the new version starts
    with sessions.begin() as s:
        for name, data in outputs.items():
            stored = predictions.load_output(s, store, job.id, name)
            assert isinstance(stored, Volume)
            np.testing.assert_array_equal(stored[...], data)
        tiff = predictions.prediction_file(s, store, job.id, "instances")
    assert not list(store.abspath(store.prediction_folder(job.id)).glob("*.tif"))
    import io

    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(tiff)), outputs["instances"])
