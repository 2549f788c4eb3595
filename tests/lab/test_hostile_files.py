"""Hostile files and folders against a real store: folders on the server whose chunks are links to the
database (or hard links, FIFOs, linked subfolders), imports that are off unless an admin names folders and
whose refusals say nothing about what exists, metadata that declares gigabytes, exports a viewer could aim
at the app's own code, truncated and badly described TIFFs, an id SQLite hands out twice, and spool files
a killed server left. Every file here is real: written by zarr, tifffile and os in tmp_path."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import resource
import sqlite3
import struct
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
import pytest
import tifffile
import zarr
from sqlalchemy import text

from storage.records.external import External
from storage.records.files import FileStore
from storage.records.server_folders import METADATA_FILES, REFUSED
from storage.service import Actor, Neuroseg, UserError, settings_from_env

GOOD = "a-good-password"


class Upload(io.BytesIO):
    """What Streamlit's file_uploader hands over: a BytesIO with a name and a size."""

    def __init__(self, name: str, content: bytes):
        super().__init__(content)
        self.name, self.size = name, len(content)


@pytest.fixture
def svc(tmp_path, monkeypatch):
    for name in ("NEUROSEG_IMPORT_ROOTS", "NEUROSEG_EXPORT_ROOT", "NEUROSEG_MAX_SLICE_PIXELS",
                 "NEUROSEG_MAX_LINKED_SLICE_PIXELS", "NEUROSEG_MAX_CHUNK_BYTES", "NEUROSEG_MAX_STACK_BYTES",
                 "NEUROSEG_MAX_SLICES"):
        monkeypatch.delenv(name, raising=False)
    service = Neuroseg(settings_from_env(str(tmp_path / "data"), None), supervise=False)
    yield service
    service.close()


def user(svc: Neuroseg, name: str, role: str) -> Actor:
    """A signed-in user of ``role`` who has chosen their password."""
    from storage.auth import accounts

    svc.create_user(name, role, GOOD)
    svc._tx(lambda s: setattr(accounts.user_by_name(s, name), "must_change_password", False))
    return svc.sign_in(name, GOOD)[0]


def zarr_stack(path, shape=(2, 32, 32), chunks=None, seed=0):
    """A real zarr v3 array written by zarr: the folder a lab would point at."""
    data = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
    array = zarr.create_array(str(path), shape=shape, chunks=chunks or shape, dtype="uint8", zarr_format=3)
    array[...] = data
    return data


def chunk_files(folder) -> list[str]:
    return sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                  if f not in METADATA_FILES)


def stored_dataset_folders(svc: Neuroseg) -> list[str]:
    folder = svc.store.root / "datasets"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- links to the database ---------------------------------------------------------------------------------

def _symlink_to_db(svc, folder):
    chunk = chunk_files(folder)[0]
    os.unlink(chunk)
    os.symlink(svc.store.root / "neuroseg.db", chunk)


def _hard_link_to_db(svc, folder):
    chunk = chunk_files(folder)[0]
    os.unlink(chunk)
    os.link(svc.store.root / "neuroseg.db", chunk)


def _linked_subfolder(svc, folder):
    inner = folder / "c"  # zarr v3's chunk folder, replaced by a link to a copy elsewhere
    os.rename(inner, folder.parent / "moved-chunks")
    os.symlink(folder.parent / "moved-chunks", inner)


def _fifo_chunk(svc, folder):
    chunk = chunk_files(folder)[0]
    os.unlink(chunk)
    os.mkfifo(chunk)


@pytest.mark.parametrize("make", [_symlink_to_db, _hard_link_to_db, _linked_subfolder, _fifo_chunk],
                         ids=["symlinked chunk", "hard-linked chunk", "symlinked subfolder", "FIFO chunk"])
def test_a_folder_reaching_the_database_is_refused_and_the_database_keeps_its_commits(svc, tmp_path, monkeypatch,
                                                                                      make):
    # the import root is tmp_path itself: the data directory lies inside it, the harder case
    monkeypatch.setenv("NEUROSEG_IMPORT_ROOTS", str(tmp_path))
    folder = tmp_path / "lab" / "stack.zarr"
    zarr_stack(folder)
    make(svc, folder)
    for link in (False, True):
        with pytest.raises(UserError) as refused:
            svc.import_path(str(folder), link=link)
        assert str(refused.value) == REFUSED
    assert svc.datasets() == [] and stored_dataset_folders(svc) == []
    with pytest.raises(ValueError, match="holds a link or a special file"):  # read bypassing the import's walk:
        External(folder)[0]  # the chunk is checked as it is opened
    # the server goes on: later commits are kept and the database is whole
    demo = svc.load_demo()
    user(svc, "ann", "annotator")
    svc.close()
    with sqlite3.connect(svc.store.root / "neuroseg.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    again = Neuroseg(settings_from_env(str(tmp_path / "data"), None), supervise=False)
    try:
        assert [d.id for d in again.datasets()] == [demo.id]
        assert "ann" in {u.username for u in again.users()}
        with again.sessions() as s:
            assert s.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    finally:
        again.close()


def test_import_is_off_by_default_and_every_refusal_of_a_path_says_the_same(svc, tmp_path, monkeypatch):
    lab = tmp_path / "lab"
    data = zarr_stack(lab / "good.zarr", shape=(3, 40, 30), chunks=(1, 40, 30))
    zarr_stack(tmp_path / "elsewhere" / "other.zarr")
    with pytest.raises(UserError, match=r"off on this server.*NEUROSEG_IMPORT_ROOTS"):
        svc.import_path(str(lab / "good.zarr"))
    assert svc.server_folders() == ([], None)
    monkeypatch.setenv("NEUROSEG_IMPORT_ROOTS", str(lab))
    os.symlink(lab / "good.zarr", lab / "alias.zarr")
    os.symlink(tmp_path / "elsewhere", lab / "door")
    refusals = {}
    for path in [tmp_path / "elsewhere" / "other.zarr",  # exists, outside the root
                 tmp_path / "elsewhere" / "nothing.zarr",  # does not exist, outside
                 lab / "nothing.zarr",  # does not exist, inside
                 lab / "alias.zarr",  # a link to a good folder
                 lab / "door" / "other.zarr",  # through a link out of the root
                 lab / ".." / "elsewhere" / "other.zarr",
                 svc.store.root, svc.store.root / "datasets", "/", "relative/path.zarr"]:
        with pytest.raises(UserError) as refused:
            svc.import_path(str(path))
        refusals[str(path)] = str(refused.value)
    assert set(refusals.values()) == {REFUSED}, refusals
    info = svc.import_path(str(lab / "good.zarr"), link=True)  # what is allowed still works
    np.testing.assert_array_equal(svc.volume(info.id)[2], data[2])
    monkeypatch.delenv("NEUROSEG_IMPORT_ROOTS")  # turned off again: a linked stack is no longer read
    svc._arrays.clear()
    with pytest.raises(UserError, match="may not be read now"):
        svc.volume(info.id)


def test_a_linked_folder_is_checked_again_on_every_read(svc, tmp_path, monkeypatch):
    import tensorstore as ts

    monkeypatch.setenv("NEUROSEG_IMPORT_ROOTS", str(tmp_path / "lab"))
    data = zarr_stack(tmp_path / "lab" / "stack.zarr", shape=(3, 40, 30), chunks=(1, 40, 30))
    n5 = tmp_path / "lab" / "stack.n5"
    ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(n5)}, "create": True,
             "metadata": {"dimensions": [3, 40, 30], "blockSize": [1, 20, 30], "dataType": "uint8",
                          "compression": {"type": "gzip"}}}).result()[...] = data
    linked = {kind: svc.import_path(str(tmp_path / "lab" / f"stack.{kind}"), link=True) for kind in ("zarr", "n5")}
    for info in linked.values():
        np.testing.assert_array_equal(svc.volume(info.id)[1], data[1])
    db = svc.store.root / "neuroseg.db"
    for chunk in (tmp_path / "lab" / "stack.zarr" / "c" / "1" / "0" / "0", n5 / "1" / "0" / "0"):
        chunk.unlink()
        chunk.symlink_to(db)  # after the import's walk: the read checks each file as it opens it
    for info in linked.values():
        volume = svc.volume(info.id)
        with pytest.raises(ValueError, match="holds a link or a special file"):
            volume[1]
        np.testing.assert_array_equal(volume[2], data[2])  # the other slices still read
    kept = svc.volume(linked["zarr"].id)  # what a page holds between visits
    os.rename(tmp_path / "lab" / "stack.zarr", tmp_path / "moved.zarr")
    os.symlink(tmp_path / "moved.zarr", tmp_path / "lab" / "stack.zarr")  # the folder itself becomes a link
    with pytest.raises(ValueError, match="the folder is now a link"):
        kept[2]
    svc._arrays.clear()
    with pytest.raises(UserError, match="may not be read now"):
        svc.volume(linked["zarr"].id)
    kept = svc.volume(linked["n5"].id)
    monkeypatch.setenv("NEUROSEG_IMPORT_ROOTS", str(tmp_path / "elsewhere"))  # the admin narrows the folders
    with pytest.raises(ValueError, match="outside the import folders"):
        kept[2]
    user(svc, "ann", "annotator")  # and the database took no harm
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# --- a writer racing the server ----------------------------------------------------------------------------

def _n5(path, data, compression=None, block=(1, 16, 16)):
    """A real N5 dataset written by tensorstore; returns the tensorstore array."""
    import tensorstore as ts

    array = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(path)}, "create": True,
                     "metadata": {"dimensions": list(data.shape), "blockSize": list(block), "dataType": data.dtype.name,
                                  "compression": compression or {"type": "raw"}}}).result()
    array[...] = data
    return array


def _lock_held(path) -> bool:
    """Whether another process finds ``path`` locked (a POSIX lock, as SQLite takes on its database)."""
    probe = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\ntry:\n    fcntl.lockf(fd, fcntl.LOCK_EX | "
             "fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)")
    return subprocess.run([sys.executable, "-S", "-c", probe, str(path)], timeout=30).returncode == 3


class _Racer:
    """A writer in the import folder racing the server at its worst, deterministically: every ``stat`` of a
    file sees ``entry`` as it was walked, and right after it (and before every ``open``) ``entry`` is
    swapped for something that reaches the locked file (``make``), put back by ``undo``."""

    def __init__(self, entry, make, undo):
        self.entry, self.side, self.make, self.undo, self.hostile = entry, entry.parent / ".real", make, undo, False

    def honest(self):
        if self.hostile:
            self.undo(self.entry)
            os.rename(self.side, self.entry)
            self.hostile = False

    def swap(self):
        if not self.hostile:
            os.rename(self.entry, self.side)
            self.make(self.entry)
            self.hostile = True

    def install(self, monkeypatch):
        def seen(call):
            def stat_then_swap(*args, **kwargs):
                self.honest()
                try:
                    return call(*args, **kwargs)
                finally:
                    self.swap()
            return stat_then_swap

        def swapped(call):
            def swap_then_open(*args, **kwargs):
                self.swap()
                return call(*args, **kwargs)
            return swap_then_open

        for name, wrap in (("lstat", seen), ("stat", seen), ("open", swapped)):
            monkeypatch.setattr(os, name, wrap(getattr(os, name)))


@pytest.mark.parametrize("swap", ["symlinked file", "symlinked folder on the way", "hard link", "the file itself"])
@pytest.mark.parametrize("kind", ["zarr", "N5"])
def test_a_file_swapped_between_its_check_and_its_open_is_never_opened(tmp_path, monkeypatch, kind, swap):
    # The server's database is the locked file: opening and closing it in the server drops SQLite's locks
    # (commits are lost). A writer in the folder swaps a chunk after each check and before each open; the
    # server must never open the locked file, whatever it reads. (Races for real made tensorstore open it
    # 302 times in 20 s.)
    data = np.full((2, 16, 16), 7, np.uint8)
    folder, decoy = tmp_path / "lab" / f"stack.{kind}", tmp_path / "decoy"
    if kind == "zarr":
        zarr.create_array(str(folder), shape=(2, 16, 16), chunks=(1, 16, 16), dtype="uint8")[...] = data
        zarr.create_array(str(decoy), shape=(2, 16, 16), chunks=(1, 16, 16), dtype="uint8")[...] = 255
        key = ("c", "1", "0", "0")
    else:
        _n5(folder, data)
        _n5(decoy, np.full((2, 16, 16), 255, np.uint8))
        key = ("1", "0", "0")
    locked = tmp_path / "elsewhere" / "0"  # "the database": a valid chunk of 255s, locked by this process
    locked.parent.mkdir()
    os.rename(decoy.joinpath(*key), locked)
    entry = folder.joinpath(*key)
    fd = os.open(locked, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    try:
        make, undo = {"symlinked file": (lambda e: os.symlink(locked, e), os.unlink),
                      "symlinked folder on the way": (lambda e: os.symlink(locked.parent, e), os.unlink),
                      "hard link": (lambda e: os.link(locked, e), os.unlink),
                      "the file itself": (lambda e: os.rename(locked, e), lambda e: os.rename(e, locked))}[swap]
        racer = _Racer(entry.parent if swap == "symlinked folder on the way" else entry, make, undo)
        stack = External(folder, protected=[locked])
        assert _lock_held(locked)
        outcomes = set()
        with monkeypatch.context() as m:
            racer.install(m)
            for _ in range(3):
                try:
                    plane = stack[1]
                    assert not (plane == 255).any(), "the server read the locked file"
                    outcomes.add("read")
                except ValueError as exc:
                    assert "holds a link or a special file" in str(exc), str(exc)
                    outcomes.add("refused")
            racer.honest()
        assert _lock_held(locked), "the server opened (and closed) the locked file: its locks are gone"
        assert outcomes == {"refused"}  # every open saw the swapped file: every read refused it
        np.testing.assert_array_equal(stack[1], data[1])  # and reads again once the folder is honest
    finally:
        os.close(fd)


def test_n5_is_read_here_as_tensorstore_wrote_it_and_tensorstore_never_opens_the_folder(svc, tmp_path, monkeypatch):
    import tensorstore as ts

    monkeypatch.setenv("NEUROSEG_IMPORT_ROOTS", str(tmp_path / "lab"))
    data = np.random.default_rng(5).integers(0, 60000, (3, 45, 38), dtype=np.uint16)  # blocks overhang the edges
    folders = []
    for i, compression in enumerate([{"type": "raw"}, {"type": "gzip"}, {"type": "gzip", "useZlib": True},
                                     {"type": "zstd"}, {"type": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1},
                                     {"type": "bzip2"}, {"type": "xz"}]):
        folders.append(tmp_path / "lab" / f"{i}.n5")
        _n5(folders[-1], data, compression, block=(2, 16, 16))
    (folders[0] / "1" / "1" / "1").unlink()  # a block never written reads as zeros, as tensorstore reads it
    with_hole = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(folders[0])}}).result()
    with_hole = with_hole.read().result()
    assert (with_hole[2, 16:32, 16:32] == 0).all()

    def refuse(*args, **kwargs):
        raise AssertionError("tensorstore opened a folder on the server (it follows links)")

    monkeypatch.setattr(ts, "open", refuse)
    for folder in folders:
        stack = External(folder)
        want = with_hole if folder == folders[0] else data
        assert (stack.shape, stack.dtype, stack.kind) == ((3, 45, 38), np.uint16, "N5")
        np.testing.assert_array_equal(stack[...], want)
        np.testing.assert_array_equal(stack[2, 5:40:3, 1::4], want[2, 5:40:3, 1::4])
        np.testing.assert_array_equal(stack[1:3, 30:, :17], want[1:3, 30:, :17])
    copied, linked = svc.import_path(str(folders[3])), svc.import_path(str(folders[4]), link=True)
    for info in (copied, linked):
        np.testing.assert_array_equal(np.asarray(svc.volume(info.id)[...]), data)


def test_zarr_reads_walk_every_name_without_following_links_on_both_read_paths(tmp_path):
    folder = tmp_path / "lab" / "stack.zarr"
    data = zarr_stack(folder, shape=(2, 16, 16), chunks=(1, 16, 16))
    stack = External(folder)
    store = stack._array.store  # what zarr reads through: its async and its sync read path
    from zarr.core.buffer.core import default_buffer_prototype
    from zarr.core.sync import sync

    os.rename(folder / "c" / "1", tmp_path / "moved")
    os.symlink(tmp_path / "moved", folder / "c" / "1")  # a link on the way, not at the file itself
    for read in (lambda key: store.get_sync(key), lambda key: sync(store.get(key, default_buffer_prototype()))):
        with pytest.raises(ValueError, match=REFUSED):
            read("c/1/0/0")
        assert read("c/0/0/0") is not None
    with pytest.raises(ValueError, match="holds a link or a special file"):
        stack[1]
    np.testing.assert_array_equal(stack[0], data[0])


# --- what metadata declares --------------------------------------------------------------------------------

def _declared(path, shape, chunks, dtype="uint8", zarr_format=3) -> None:
    """Metadata only, as an 8 KB folder would hold: no chunk is written."""
    zarr.create_array(str(path), shape=shape, chunks=chunks, dtype=dtype, zarr_format=zarr_format)
    assert chunk_files(path) == []


def test_a_declared_giant_is_refused_before_any_read(svc, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROSEG_IMPORT_ROOTS", str(tmp_path / "lab"))
    giant = tmp_path / "lab" / "giant.zarr"
    _declared(giant, (2, 16000, 16000), (1, 512, 512), zarr_format=2)
    one_chunk = tmp_path / "lab" / "one-chunk.zarr"
    _declared(one_chunk, (2, 4096, 4096), (2, 4096, 4096), dtype="float32")
    wide = tmp_path / "lab" / "wide.zarr"  # fine to copy (it gets a pyramid), too wide to link
    _declared(wide, (2, 6000, 6000), (1, 512, 512))
    tracemalloc.start()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        for folder, link, reason in [(giant, False, "16000 × 16000 pixels, more than the 67,108,864"),
                                     (giant, True, "16000 × 16000 pixels"),
                                     (one_chunk, False, "128.0 MiB.*NEUROSEG_MAX_CHUNK_BYTES"),
                                     (one_chunk, True, "NEUROSEG_MAX_CHUNK_BYTES"),
                                     (wide, True, "too large to link.*Import a copy instead")]:
            with pytest.raises(UserError, match=reason):
                svc.import_path(str(folder), link=link)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated while refusing"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200 * 1024
    assert svc.datasets() == [] and stored_dataset_folders(svc) == []
    monkeypatch.setenv("NEUROSEG_MAX_SLICE_PIXELS", "100")  # the limits are the admin's
    small = tmp_path / "lab" / "small.zarr"
    zarr_stack(small, shape=(2, 20, 20))
    with pytest.raises(UserError, match="20 × 20 pixels, more than the 100"):
        svc.import_path(str(small))


def test_a_declared_depth_is_limited_before_any_read_and_slice_lists_are_bounded(svc, tmp_path, monkeypatch):
    """An 8 KB zarr declaring 10¹² slices of 64 × 64 is refused in both modes from its metadata (Predict's
    "all" used to list every one of them), and no slice list is built beyond the limit."""
    from unet.exchange.io import parse_slices
    from unet.exchange.limits import Limits

    monkeypatch.setenv("NEUROSEG_IMPORT_ROOTS", str(tmp_path / "lab"))
    deep = tmp_path / "lab" / "deep.zarr"
    _declared(deep, (10**12, 64, 64), (1, 64, 64))
    for link in (True, False):
        with pytest.raises(UserError, match=r"1,000,000,000,000 slices, more than the 100,000.*NEUROSEG_MAX_SLICES"):
            svc.import_path(str(deep), link=link)
    with pytest.raises(ValueError, match="NEUROSEG_MAX_SLICES"):
        External(deep, linked=True, limits=Limits())
    assert chunk_files(deep) == [] and svc.datasets() == [] and stored_dataset_folders(svc) == []
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)  # a list of 10¹² ints fails at once, not in swap
    with open("/proc/self/status") as status:
        held = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    limit = held + (512 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        for text in ("0-5", "all"):
            with pytest.raises(ValueError, match=r"1,000,000,000,000 slices, more than the 100,000"):
                parse_slices(text, 10**12)
        with pytest.raises(ValueError, match="name more than the 100,000 slices"):
            parse_slices(",".join(["0-99999"] * 3), 100_000)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert parse_slices("all", 100_000)[-1] == 99_999
    monkeypatch.setenv("NEUROSEG_MAX_SLICES", "3")  # the limit is the admin's
    shallow = tmp_path / "lab" / "shallow.zarr"
    zarr_stack(shallow, shape=(4, 16, 16))
    with pytest.raises(UserError, match="4 slices, more than the 3"):
        svc.import_path(str(shallow), link=True)
    with pytest.raises(ValueError, match="4 slices, more than the 3"):
        parse_slices("all", 4)


def test_bad_ome_zarr_metadata_is_a_clear_refusal(svc, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROSEG_IMPORT_ROOTS", str(tmp_path / "lab"))
    for i, (multiscales, reason) in enumerate([
            ("abc", "'multiscales' must be a list"),
            ([{"datasets": "0"}], "'datasets' must be a list"),
            ([{"datasets": [{"path": 5}]}], "'path' must name an array inside the folder"),
            ([{"datasets": [{"path": "../../elsewhere"}]}], "'path' must name an array inside the folder"),
            ([{"axes": [{"name": "x", "unit": "micrometer"}],
               "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": "big"}]}]}],
             "'scale' must be a list of positive numbers"),
            ([{"datasets": [{"path": "nothing-here"}]}], "names the array 'nothing-here'")]):
        folder = tmp_path / "lab" / f"bad-{i}.ome.zarr"
        group = zarr.open_group(str(folder), mode="w", zarr_format=3)
        group.create_array("0", shape=(2, 16, 16), chunks=(1, 16, 16), dtype="uint8")[...] = 1
        group.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}
        with pytest.raises(UserError, match=r"malformed|cannot be opened") as refused:
            svc.import_path(str(folder))
        assert reason.replace("'", "") in str(refused.value).replace("'", ""), str(refused.value)
    assert svc.datasets() == []


def test_nan_voxels_in_a_server_folder_are_refused_as_in_an_upload(svc, tmp_path, monkeypatch):
    """One NaN voxel makes a slice's normalisation NaN, and training and prediction on it are spoiled: a TIFF
    upload refuses them, and so does a zarr copied or linked from a server folder (chunks never written read
    as the array's fill value, NaN here). A linked stack is read where it lies: the slices it checks when it is
    linked (first and last), and every slice as it is read afterwards."""
    monkeypatch.setenv("NEUROSEG_IMPORT_ROOTS", str(tmp_path / "lab"))
    data = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
    data[1, 5:9, 5:9] = np.nan
    data[2, 0, 0] = np.inf
    zarr.create_array(str(tmp_path / "lab" / "nan.zarr"), shape=data.shape, chunks=(1, 32, 32), dtype="float32",
                      zarr_format=3)[...] = data
    unwritten = zarr.create_array(str(tmp_path / "lab" / "fill.zarr"), shape=data.shape, chunks=(1, 32, 32),
                                  dtype="float32", zarr_format=3, fill_value=float("nan"))
    unwritten[0] = unwritten[2] = np.nan_to_num(data[0])
    for name, link, reason in (("nan", False, "slice 1 has 16 voxels"), ("nan", True, "slice 2 has 1 voxels"),
                               ("fill", False, "slice 1 has 1,024 voxels")):
        with pytest.raises(UserError, match=f"{reason} that are NaN or infinite"):
            svc.import_path(str(tmp_path / "lab" / f"{name}.zarr"), link=link)
    assert svc.datasets() == [] and stored_dataset_folders(svc) == []
    linked = svc.import_path(str(tmp_path / "lab" / "fill.zarr"), link=True)  # its first and last are whole
    with pytest.raises(ValueError, match="slice 1 has 1,024 voxels that are NaN or infinite"):
        svc.volume(linked.id)[1]


# --- chunks that declare more than they hold ---------------------------------------------------------------

def _zstd_rle_frame(size: int, declare: bool) -> bytes:
    """A real zstd frame of ``size`` zero bytes in a few bytes per 128 KiB (RLE blocks), its content size
    declared in its header or not (as a streaming writer leaves it)."""
    frame = bytearray(struct.pack("<I", 0xFD2FB528))
    frame += bytes([0xC0, 7 << 3]) + struct.pack("<Q", size) if declare else bytes([0x00, 7 << 3])
    left = size
    while left:
        n = min(1 << 17, left)
        left -= n
        frame += (int(left == 0) | 1 << 1 | n << 3).to_bytes(3, "little") + b"\x00"
    return bytes(frame)


def _gzip_of_zeros(size: int) -> bytes:
    stream, zeros = zlib.compressobj(9, zlib.DEFLATED, 31), bytes(1 << 20)
    return b"".join([*(stream.compress(zeros) for _ in range(size >> 20)), stream.flush()])


def _blosc_declaring(size: int) -> bytes:
    import numcodecs

    chunk = bytearray(numcodecs.Blosc().encode(np.zeros(1024, np.uint8)))
    struct.pack_into("<I", chunk, 4, size)  # what blosc allocates before it decompresses
    return bytes(chunk)


@pytest.mark.parametrize("bomb", ["zstd", "zstd, size not declared", "blosc", "gzip", "N5 zstd", "N5 gzip"])
def test_a_chunk_declaring_more_than_a_chunk_holds_is_refused_before_it_is_decompressed(svc, tmp_path, monkeypatch,
                                                                                          bomb):
    import numcodecs
    from zarr.codecs import GzipCodec

    monkeypatch.setenv("NEUROSEG_IMPORT_ROOTS", str(tmp_path / "lab"))
    folder = tmp_path / "lab" / "bomb"
    shape, big = (2, 32, 32), 256 << 20  # chunks of 1 KiB; the bomb declares 256 MiB
    if bomb.startswith("N5"):
        _n5(folder, np.ones(shape, np.uint8), {"type": bomb.split()[1]}, block=(1, 32, 32))
        payload = _zstd_rle_frame(big, True) if bomb == "N5 zstd" else _gzip_of_zeros(64 << 20)
        chunk, content = folder / "1" / "0" / "0", struct.pack(">HH3I", 0, 3, 1, 32, 32) + payload
    else:
        compressors = {"blosc": dict(zarr_format=2, compressors=numcodecs.Blosc()),
                       "gzip": dict(compressors=[GzipCodec()])}.get(bomb, {})
        zarr.create_array(str(folder), shape=shape, chunks=(1, 32, 32), dtype="uint8", **compressors)[...] = 1
        chunk = folder / "1.0.0" if bomb == "blosc" else folder / "c" / "1" / "0" / "0"  # (v2, v3)
        content = {"zstd": lambda: _zstd_rle_frame(big, True),
                   "zstd, size not declared": lambda: _zstd_rle_frame(big, False),
                   "blosc": lambda: _blosc_declaring(big), "gzip": lambda: _gzip_of_zeros(64 << 20)}[bomb]()
    chunk.write_bytes(content)
    assert len(content) < 200_000
    stack = External(folder)
    tracemalloc.start()
    try:
        np.testing.assert_array_equal(stack[0], 1)  # the honest chunk reads
        refusal = r"DecompressionBomb: .*(declares [\d,]+ bytes|decompresses to more than the [\d,]+)"
        with pytest.raises(ValueError, match=refusal):
            stack[1]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated to refuse one chunk"
    with pytest.raises(UserError, match="slice 1 cannot be read"):
        svc.import_path(str(folder), link=True)  # a link reads the first and the last slice
    with pytest.raises(UserError, match="slice 1 cannot be read"):
        svc.import_path(str(folder))
    assert svc.datasets() == [] and stored_dataset_folders(svc) == []


def test_only_known_codecs_decode_chunks_from_a_server_folder(svc, tmp_path, monkeypatch):
    import numcodecs
    import zarr.codecs.numcodecs as zarr_numcodecs

    monkeypatch.setenv("NEUROSEG_IMPORT_ROOTS", str(tmp_path / "lab"))
    lz4 = tmp_path / "lab" / "lz4.zarr"
    zarr.create_array(str(lz4), shape=(2, 8, 8), dtype="uint8", zarr_format=2, compressors=numcodecs.LZ4())[...] = 1
    lzma = tmp_path / "lab" / "lzma.zarr"  # lzma decodes what its stream says, unbounded
    zarr.create_array(str(lzma), shape=(2, 8, 8), dtype="uint8", compressors=[zarr_numcodecs.LZMA()])[...] = 1
    delta = tmp_path / "lab" / "delta.zarr"
    zarr.create_array(str(delta), shape=(2, 8, 8), dtype="uint8", zarr_format=2, filters=[numcodecs.Delta("u1")])
    for folder, name in [(lz4, "'lz4'"), (lzma, "'numcodecs.lzma'"), (delta, "the filters 'delta'")]:
        for link in (False, True):
            with pytest.raises(UserError, match=f"{name}, which Neuroseg does not read from a server folder"):
                svc.import_path(str(folder), link=link)
    assert svc.datasets() == []
    # what zarr writes by default, and the codecs allowed, still import
    from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, TransposeCodec

    data = np.random.default_rng(3).integers(0, 255, (3, 40, 30), dtype=np.uint8)
    for i, options in enumerate([dict(zarr_format=2), dict(zarr_format=2, compressors=numcodecs.GZip()),
                                 dict(zarr_format=2, compressors=numcodecs.Zlib()),
                                 dict(filters=[TransposeCodec(order=(0, 2, 1))],
                                      compressors=[BloscCodec(), Crc32cCodec()]),
                                 dict(compressors=[GzipCodec()], shards=(1, 40, 32), chunks=(1, 20, 16))]):
        good = tmp_path / "lab" / f"good-{i}.zarr"
        zarr.create_array(str(good), shape=data.shape, dtype="uint8", **{"chunks": (1, 20, 16), **options})[...] = data
        np.testing.assert_array_equal(np.asarray(svc.volume(svc.import_path(str(good), link=True).id)[...]), data)


def test_a_folder_too_large_or_too_deep_to_walk_is_refused(svc, tmp_path, monkeypatch, capfd):
    from storage.records import server_folders

    monkeypatch.setenv("NEUROSEG_IMPORT_ROOTS", str(tmp_path / "lab"))
    monkeypatch.setattr(server_folders, "MAX_TREE_ENTRIES", 40)  # (1,000,000 and 32 on a server)
    monkeypatch.setattr(server_folders, "MAX_TREE_DEPTH", 5)
    zarr_stack(tmp_path / "lab" / "many.zarr", shape=(30, 8, 8), chunks=(1, 8, 8))  # 30 chunks in 34 folders
    deep = tmp_path / "lab" / "deep.zarr"
    zarr_stack(deep, shape=(2, 8, 8), chunks=(1, 8, 8))
    (deep / "a" / "b" / "c" / "d" / "e" / "f").mkdir(parents=True)
    for folder, reason in [("many.zarr", "more than 40 files and folders"), ("deep.zarr", "more than 5 folders deep")]:
        with pytest.raises(UserError) as refused:
            svc.import_path(str(tmp_path / "lab" / folder))
        assert str(refused.value) == REFUSED and reason in capfd.readouterr().err
    (deep / "a" / "b" / "c" / "d" / "e" / "f").rmdir()
    assert svc.import_path(str(deep)).shape == (2, 8, 8)


# --- TIFF uploads ------------------------------------------------------------------------------------------

def _tiff(data: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, **kw)
    return buf.getvalue()


def _declare_size(raw: bytes, height: int, width: int) -> bytes:
    """A small TIFF whose header now says its image is ``height`` × ``width`` (the tags patched in place)."""
    patched = bytearray(raw)
    with tifffile.TiffFile(io.BytesIO(raw)) as tif:
        for page in tif.pages:
            for name, value in (("ImageLength", height), ("ImageWidth", width)):
                tag = page.tags[name]
                code = "<H" if tag.dtype == 3 else "<I"
                struct.pack_into(code, patched, tag.valueoffset, value)
    return bytes(patched)


def test_a_tiff_header_that_declares_a_huge_slice_is_refused_before_its_pixels(svc):
    raw = _declare_size(_tiff(np.zeros((2, 64, 64), np.uint8)), 20000, 20000)
    with tifffile.TiffFile(io.BytesIO(raw)) as tif:
        assert tif.pages[0].shape == (20000, 20000)  # what a reader believes
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=r"slices of 20000 × 20000 pixels.*NEUROSEG_MAX_SLICE_PIXELS"):
            svc.import_upload(Upload("huge.tif", raw))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20 and svc.datasets() == [] and stored_dataset_folders(svc) == []


def _patched(raw: bytes, page: int, stream: bytes, tags: dict[str, int], segments: str) -> bytes:
    """``raw`` with ``stream`` appended as page ``page``'s one strip or tile (``segments``: "Strip" or "Tile")
    and the other ``tags`` of that page patched in place."""
    patched = bytearray(raw) + stream
    with tifffile.TiffFile(io.BytesIO(raw)) as tif:
        for name, value in {**tags, f"{segments}Offsets": len(raw), f"{segments}ByteCounts": len(stream)}.items():
            tag = tif.pages[page].tags[name]
            struct.pack_into({3: "<H", 4: "<I", 16: "<Q"}[int(tag.dtype)], patched, tag.valueoffset, value)
    return bytes(patched)


@pytest.mark.parametrize("where", ["a tile larger than its page", "a later page larger than the first"])
def test_a_tiff_whose_segment_inflates_beyond_its_slice_is_refused_before_it_is_decoded(svc, where):
    """A Deflate stream of zeros is 1000× smaller than what it inflates to, and tifffile inflates a strip or tile
    into a buffer of the size its tags declare. Two 64² stacks of about 100 kB: one declares a 10240² tile
    for each page, one declares its last page 10240² (the stack's size is read from the first page). Both would
    inflate 100 MiB per page (a real bomb: 4 billion² pixels); both are refused before that page is decoded."""
    side = 10240
    packer = zlib.compressobj(9)
    stream = b"".join(packer.compress(bytes(side * 256)) for _ in range(side // 256)) + packer.flush()
    if where.startswith("a tile"):
        raw = _tiff(np.zeros((64, 64), np.uint8), tile=(64, 64), compression="zlib", photometric="minisblack")
        bomb = _patched(raw, 0, stream, {"TileWidth": side, "TileLength": side}, "Tile")
        refusal = f"slice 1 declares tiles of {side} × {side} pixels for a slice of 64 × 64"
    else:
        raw = _tiff(np.zeros((3, 64, 64), np.uint8), photometric="minisblack")
        bomb = _patched(raw, 2, stream, {"ImageWidth": side, "ImageLength": side, "RowsPerStrip": side,
                                         "Compression": 8}, "Strip")
        refusal = f"slice 3 declares {side} × {side} pixels where the stack's slices are 64 × 64"
    assert len(bomb) < 200_000
    with tifffile.TiffFile(io.BytesIO(bomb)) as tif:  # what a reader believes
        page = tif.series[0].pages[-1]
        assert (page.tilelength, page.tilewidth) == (side, side) if page.is_tiled else page.shape == (side, side)
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=re.escape(refusal)):
            svc.import_upload(Upload("bomb.tif", bomb))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20 and svc.datasets() == [] and stored_dataset_folders(svc) == []
    # an honest tiled stack whose slices are smaller than one tile is stored
    honest = np.random.default_rng(4).integers(0, 255, (2, 40, 50), dtype=np.uint8)
    stored = svc.import_upload(Upload("small.tif", _tiff(honest, tile=(256, 256), compression="zlib",
                                                          photometric="minisblack")))
    assert stored.shape == (2, 40, 50)
    np.testing.assert_array_equal(svc.volume(stored.id)[...], honest)
    # and one whose tile is larger than its slice (4096² uint16 tiles, 32 MiB, on a 3000² slice), as tifffile
    # writes without a word
    big = _tiff(np.zeros((1, 3000, 3000), np.uint16), tile=(4096, 4096), compression="zlib", photometric="minisblack")
    assert svc.import_upload(Upload("big tiles.tif", big)).shape == (1, 3000, 3000)


def _strip_swapped(raw: bytes, stream: bytes) -> bytes:
    """A one-page TIFF whose strip is now ``stream`` (appended; its offset and byte count patched in place)."""
    patched = bytearray(raw) + stream
    with tifffile.TiffFile(io.BytesIO(raw)) as tif:
        for name, value in (("StripOffsets", len(raw)), ("StripByteCounts", len(stream))):
            tag = tif.pages[0].tags[name]
            struct.pack_into({3: "<H", 4: "<I", 16: "<Q"}[int(tag.dtype)], patched, tag.valueoffset, value)
    return bytes(patched)


@pytest.mark.parametrize("codec", ["png", "jpeg"])
def test_a_picture_inside_a_tiff_larger_than_its_page_is_refused_before_it_is_decoded(svc, codec):
    """A 64² page whose strip is a 6000² picture of zeros (a decompression bomb: the picture's own header says
    how large it decodes, not the TIFF's). A JPEG-compressed stack with honest strips and tiles is stored."""
    import imagecodecs

    picture = np.zeros((6000, 6000), np.uint8)
    stream = imagecodecs.png_encode(picture, level=9) if codec == "png" else imagecodecs.jpeg8_encode(picture)
    raw = _strip_swapped(_tiff(np.zeros((64, 64), np.uint8), compression=codec), stream)
    tracemalloc.start()
    try:  # what a reader without the check decodes: the whole picture (then cropped to the page)
        with tifffile.TiffFile(io.BytesIO(raw)) as tif:
            assert tif.pages[0].asarray().shape == (64, 64)
        _, decoded = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded > 6000 * 6000
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="PNG pictures inside the TIFF, which Neuroseg does not read" if codec ==
                           "png" else "a JPEG picture of 6000 × 6000 pixels where its header declares at most 64 × 64"):
            svc.import_upload(Upload("bomb.tif", raw))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20 and svc.datasets() == [] and stored_dataset_folders(svc) == []
    if codec == "jpeg":
        stack = np.random.default_rng(2).integers(0, 255, (3, 100, 150), dtype=np.uint8)
        for layout in ({}, {"tile": (64, 64)}):
            stored = svc.import_upload(Upload("honest.tif", _tiff(stack, compression="jpeg", photometric="minisblack",
                                                                  **layout)))
            assert stored.shape == (3, 100, 150)


def test_a_tiff_with_more_slices_than_a_stack_may_have_is_refused_before_its_pixels(svc, monkeypatch):
    monkeypatch.setenv("NEUROSEG_MAX_SLICES", "5")
    with pytest.raises(UserError, match=r"6 slices, more than the 5 a stack may have.*NEUROSEG_MAX_SLICES"):
        svc.import_upload(Upload("deep.tif", _tiff(np.zeros((6, 8, 8), np.uint8), photometric="minisblack")))
    assert svc.datasets() == [] and stored_dataset_folders(svc) == []
    assert svc.import_upload(Upload("ok.tif", _tiff(np.zeros((5, 8, 8), np.uint8), photometric="minisblack"))).shape \
        == (5, 8, 8)


def test_a_truncated_imagej_stack_is_refused_not_stored_short(svc):
    whole = _tiff(np.random.default_rng(1).integers(0, 255, (6, 64, 64), dtype=np.uint8), imagej=True,
                  metadata={"axes": "ZYX"})
    with pytest.raises(UserError, match=r"says the stack holds 6 images but the file holds 1.*truncated"):
        svc.import_upload(Upload("cut.tif", whole[: len(whole) // 2]))
    assert svc.datasets() == [] and stored_dataset_folders(svc) == []
    assert svc.import_upload(Upload("whole.tif", whole)).shape == (6, 64, 64)


def _pages(odd: np.ndarray, shaped: bool, odd_at: int = 3) -> bytes:
    """Five pages of 64² uint8 but the one at ``odd_at``, ``odd``; ``shaped``: one series by tifffile's own
    header."""
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        for z in range(5):
            tw.write(odd if z == odd_at else np.full((64, 64), 7, np.uint8), contiguous=False, metadata=None,
                     description=json.dumps({"shape": [5, 64, 64]}) if shaped and z == 0 else None)
    return buf.getvalue()


def test_slices_written_one_by_one_are_one_stack_and_previews_are_no_slices(svc):
    """A script's ``for z: TiffWriter.write(slice)`` gives tifffile one series per slice (its first slice was
    stored, the rest dropped); a microscope's reduced preview after each slice is no slice."""
    volume = np.random.default_rng(3).integers(0, 255, (6, 48, 40), dtype=np.uint8)
    one_by_one, previews = io.BytesIO(), io.BytesIO()
    with tifffile.TiffWriter(one_by_one) as tw:
        for plane in volume:
            tw.write(plane)
    with tifffile.TiffWriter(previews) as tw:
        for plane in volume:
            tw.write(plane, metadata=None)
            tw.write(plane[::4, ::4], subfiletype=1, metadata=None)
    for name, raw in (("one-by-one.tif", one_by_one), ("previews.tif", previews)):
        info = svc.import_upload(Upload(name, raw.getvalue()))
        assert info.shape == (6, 48, 40) and np.array_equal(svc.volume(info.id), volume), name


def _ome_counting(planes: int) -> bytes:
    raw = _tiff(np.random.default_rng(2).integers(0, 255, (3, 64, 64), dtype=np.uint8), ome=True,
                metadata={"axes": "ZYX"})
    return raw.replace(b'SizeZ="3"', f'SizeZ="{planes}"'.encode())


@pytest.mark.parametrize("case, message", [
    ("a NaN page read as the first page's uint8", r"slice 4 is not stored as slice 1 is \(pixel type float64 "
                                                  r"instead of uint8; bits per sample 64 instead of 8; sample "
                                                  r"format ieeefp instead of uint\)"),
    ("a float page among plain pages", r"page 4 is not stored as the stack's first page \(pixel type float32 "
                                       r"instead of uint8;.*\), so it would be left out \(1 such page\)"),
    ("a smaller page among plain pages", r"page 4 is not stored as the stack's first page \(32 × 64 pixels "
                                         r"instead of 64 × 64"),
    ("an OME header counting 2 planes of 3", r"its OME-XML header describes 2 planes but the file holds 3 pages"),
    ("a last page of another type", r"page 5 is not stored as the stack's first page \(pixel type uint16 instead "
                                    r"of uint8; bits per sample 16 instead of 8\), so it would be left out"),
])
def test_a_tiff_whose_pages_would_be_read_wrong_or_left_out_is_refused(svc, case, message):
    raw = {"a NaN page read as the first page's uint8": lambda: _pages(np.full((64, 64), np.nan), shaped=True),
           "a float page among plain pages": lambda: _pages(np.full((64, 64), 1.5, np.float32), shaped=False),
           "a smaller page among plain pages": lambda: _pages(np.ones((32, 64), np.uint8), shaped=False),
           "an OME header counting 2 planes of 3": lambda: _ome_counting(2),
           "a last page of another type": lambda: _pages(np.ones((64, 64), np.uint16), shaped=False, odd_at=4)}[case]()
    with pytest.raises(UserError, match=message):
        svc.import_upload(Upload("odd.tif", raw))
    if case.startswith("a NaN"):  # (labels are read the same way)
        with pytest.raises(UserError, match=message):
            svc.import_upload(Upload("v.tif", _tiff(np.zeros((5, 64, 64), np.uint8))), Upload("l.tif", raw))
    assert svc.datasets() == [] and stored_dataset_folders(svc) == []
    alike = _pages(np.full((64, 64), 9, np.uint8), shaped=case.startswith("a NaN"))
    assert svc.import_upload(Upload("alike.tif", alike)).shape == (5, 64, 64)
    assert svc.import_upload(Upload("ome.tif", _ome_counting(3))).shape == (3, 64, 64)


def test_bad_ome_xml_in_a_tiff_is_a_clear_refusal(svc):
    pixels = 'DimensionOrder="XYCZT" Type="uint8" SizeX="32" SizeY="32" SizeC="1" SizeZ="abc" SizeT="1"'
    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           f'<Image ID="Image:0"><Pixels ID="Pixels:0" {pixels}><Channel ID="Channel:0:0" SamplesPerPixel="1"/>'
           '<TiffData/></Pixels></Image></OME>')
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf, ome=False) as tw:
        for z in range(3):
            tw.write(np.full((32, 32), z, np.uint8), description=xml if z == 0 else None, metadata=None)
    with pytest.raises(UserError, match=r"bad\.ome\.tif: the TIFF header or its metadata \(OME-XML, ImageJ\) "
                                        "could not be read"):
        svc.import_upload(Upload("bad.ome.tif", buf.getvalue()))
    assert svc.datasets() == []


# --- ids, spool files ---------------------------------------------------------------------------------------

def test_a_folder_left_by_a_crash_does_not_break_the_next_upload(svc):
    first = svc.import_upload(Upload("a.tif", _tiff(np.zeros((2, 16, 16), np.uint8))))
    # a crashed upload took the next id, moved its folder in and never committed: the id is handed out again
    # (a rolled-back insert does not use it up), and its folder is there
    leftover = svc.store.root / "datasets" / str(first.id + 1)
    (leftover / "volume.ome.zarr").mkdir(parents=True)
    (leftover / "volume.ome.zarr" / "zarr.json").write_text(json.dumps({"left": "behind"}))
    data = np.random.default_rng(2).integers(0, 255, (4, 16, 16), dtype=np.uint8)
    second = svc.import_upload(Upload("b.tif", _tiff(data, photometric="minisblack")))
    assert second.id == first.id + 1
    np.testing.assert_array_equal(svc.volume(second.id)[...], data)
    assert [p.name.split("-")[:2] for p in (svc.store.root / "orphans").iterdir()] == [["dataset", str(second.id)]]
    svc.delete_dataset(second.id)  # a deleted dataset's id is not handed out again (migration 0019)
    assert svc.import_upload(Upload("c.tif", _tiff(data, photometric="minisblack"))).id == second.id + 1


def test_spool_files_left_by_a_killed_server_go_at_the_next_start(svc, tmp_path):
    store = svc.store
    left = store.tmp_file()
    left.write_bytes(b"x" * 1000)  # an upload a killed server was receiving, just now
    with store.spool() as busy:  # one another server on the same data directory is receiving
        busy.write_bytes(b"y" * 1000)
        again = Neuroseg(settings_from_env(str(tmp_path / "data"), None), supervise=False)
        again.close()
        assert not left.exists() and busy.exists()
    assert not busy.exists()
    assert FileStore(store.root).clean_spool() == 0


# --- exports ------------------------------------------------------------------------------------------------

@pytest.fixture
def finished(svc, tmp_path, monkeypatch):
    """A finished prediction of the demo (its outputs written as the worker writes them), made without a
    worker; returns its id."""
    from storage.models import Prediction
    from storage.records import predictions
    from tests.store.test_starter import tiny_starter
    from unet.prediction.blocks import OUTPUT_DTYPES, create_output, output_path, write_slice

    tiny_starter(tmp_path / "models", monkeypatch)
    from storage.records import starter

    svc._tx(starter.register, svc.store)
    demo = svc.load_demo()
    checkpoint = svc.checkpoint_choices()[0].id
    with svc.sessions.begin() as s:
        job = predictions.submit_prediction(s, checkpoint, demo.id, [0, 1])
        folder = svc.store.abspath(svc.store.prediction_folder(job.id))
        files = {}
        for name in ("probabilities", "mask"):
            create_output(output_path(folder, name), name, (2, 256, 256), [0, 1])
            for i in range(2):
                write_slice(output_path(folder, name), i, np.full((256, 256), i, OUTPUT_DTYPES[name]))
            files[name] = {"file": svc.store.prediction_output(job.id, name), "sha256": ""}
        row = s.get(Prediction, job.id)
        row.status, row.files = "FINISHED", files
    return job.id


def test_exports_go_only_into_the_export_folder_and_only_for_those_who_may_write(svc, tmp_path, monkeypatch,
                                                                                 finished):
    viewer, ann = user(svc, "vic", "viewer"), user(svc, "ann", "annotator")
    as_ann = svc.acting_as(ann)
    with pytest.raises(UserError, match="off on this server"):
        as_ann.export_prediction(finished, str(tmp_path / "anywhere"))
    assert not (tmp_path / "anywhere").exists()
    root = tmp_path / "exports"
    root.mkdir()
    monkeypatch.setenv("NEUROSEG_EXPORT_ROOT", str(root))
    pages = tmp_path / "app-pages"
    pages.mkdir()
    os.symlink(pages, root / "pages-link")
    with pytest.raises(UserError, match=r"Your role \(viewer\)"):
        svc.acting_as(viewer).export_prediction(finished, "")
    for folder, reason in [(str(pages), "exports go into"), ("../app-pages", "plain names"),
                           ("sub/../../app-pages", "plain names"), (f"{root}/../app-pages", "exports go into"),
                           ("pages-link", "not a folder inside the export folder"),
                           ("pages-link/deeper", "not a folder inside the export folder"), (".hidden", "plain names")]:
        with pytest.raises(UserError, match=reason):
            as_ann.export_prediction(finished, folder)
    assert list(pages.iterdir()) == [] and sorted(p.name for p in root.iterdir()) == ["pages-link"]
    written = as_ann.export_prediction(finished, "lab/2026-12")
    assert sorted(written) == [str(root / "lab" / "2026-12" / f"prediction-{finished}-{name}.ome.zarr")
                               for name in ("mask", "probabilities")]
    np.testing.assert_array_equal(np.asarray(zarr.open_group(written[0], mode="r")["0"][1]), 1)
    assert as_ann.export_prediction(finished, "")[0].startswith(str(root / f"prediction-{finished}-"))
    with pytest.raises(UserError, match="exists already"):
        as_ann.export_prediction(finished, "")
    refused = [(r.username, r.outcome) for r in svc.audit_trail(action="export to server")]
    assert ("vic", "refused") in refused


def test_a_prediction_reads_a_linked_stack_through_the_same_guard(tmp_path, monkeypatch):
    """The prediction's blocks (another process) read a linked stack with the store's protected files in
    hand: a chunk that is a hard link to one of them is refused there too."""
    from functools import partial

    from storage.records.volumes import open_block_volume
    from unet.prediction.blocks import BlockJob
    from unet.prediction.blockwise import volume_of

    monkeypatch.setenv("NEUROSEG_IMPORT_ROOTS", str(tmp_path / "lab"))
    folder = tmp_path / "lab" / "stack.zarr"
    data = zarr_stack(folder)
    precious = tmp_path / "data" / "neuroseg.db"
    precious.parent.mkdir(parents=True)
    precious.write_bytes(b"SQLite format 3\0" + bytes(4080))
    job = BlockJob(checkpoint="unused.pt", volume=str(folder), out=str(tmp_path / "out"), slices=(0,),
                   opener=partial(open_block_volume, linked=True, protected=(str(precious), str(precious.parent))))
    np.testing.assert_array_equal(volume_of(job)[0], data[0])
    chunk = chunk_files(folder)[0]
    os.unlink(chunk)
    os.link(precious, chunk)
    with pytest.raises(ValueError):
        volume_of(job)[0]
