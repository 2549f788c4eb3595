"""Hostile BioImage.IO packages, imported by an annotator through the real service on a SQLite store: a
payload in the architecture file never runs, a TorchScript model that reads a file is refused unread, no
URL a package names is fetched, a model that eats memory or time is stopped, and what users typed is text
in an exported model card. Real files, real child processes, a real loopback HTTP server; no mocks."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.engine.test_bioimageio import _nothing_left, _rdf_edit, _rezip, small_export, torchscript_package
from unet.exchange import torchscript_guard, torchscript_rules
from unet.exchange.bioimageio import card_text, code_block, validate
from unet.exchange.package_reader import load_package, read_rdf
from unet.prediction.infer import predict_slice

pytest.importorskip("bioimageio.core", reason="bioimageio.core is in requirements.txt")


@pytest.fixture(scope="module")
def stack():
    from unet.training.synthetic import make_synthetic_em

    return make_synthetic_em((2, 200, 232), np.random.default_rng(4), cell_size=18)[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, stack):
    """One of our exports (the export runs bioimageio.core's test on the package it just built)."""
    return small_export(tmp_path_factory.mktemp("exported"), stack[0])


@pytest.fixture
def service(tmp_path):
    from storage.service import Neuroseg
    from storage.settings import Settings

    svc = Neuroseg(Settings.from_env(tmp_path / "data"), supervise=False)
    yield svc
    svc.close()


@pytest.fixture
def annotator(service):
    from tests.lab.test_accounts import user

    return service.acting_as(user(service, "ann", "annotator"))


def _import(svc, package: Path):
    with open(package, "rb") as fh:
        return svc.import_model(fh, package.name)


def _no_tmp_left(svc) -> None:
    tmp = svc.store.root / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


# --- a payload in the architecture file ------------------------------------------------------------------------
def _payload_package(exported: Path, target: Path, marker: Path, *, ours: bool) -> Path:
    """Our own export with code appended to its architecture file that writes ``marker`` when imported, the
    file's sha256 in rdf.yaml made to match (``ours=False``: and the package made another tool's state dict)."""
    import yaml

    payload = f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('the package ran code')\n".encode()
    with zipfile.ZipFile(exported) as z:
        arch = z.read("neuroseg_unet.py") + payload

    def change(name, data):
        if name == "neuroseg_unet.py":
            return name, arch
        if name == "rdf.yaml":
            rdf = yaml.safe_load(data)
            rdf["weights"]["pytorch_state_dict"]["architecture"]["sha256"] = hashlib.sha256(arch).hexdigest()
            if not ours:
                rdf["config"].pop("neuroseg")
                rdf["weights"].pop("torchscript")
            return name, yaml.safe_dump(rdf).encode()
        return name, data

    return _rezip(exported, target, change)


@pytest.mark.parametrize("ours", [True, False], ids=["our export", "another tool's state dict"])
def test_a_payload_in_the_architecture_file_never_runs(service, annotator, exported, stack, tmp_path, ours):
    marker = tmp_path / "payload-ran"
    package = _payload_package(exported, tmp_path / "payload.zip", marker, ours=ours)
    if ours:  # read as ours: its state dict in our architecture, our model on its test tensors
        imported = _import(annotator, package)
        choice = next(c for c in service.checkpoint_choices() if c.id == imported.checkpoint_id)
        from unet.exchange.checkpoint import load_checkpoint

        stored = load_checkpoint(service.store.abspath(choice.file)).build_model("cpu")
        np.testing.assert_array_equal(predict_slice(stored, stack[1][:64, :64]),
                                      predict_slice(load_package(exported).build_model("cpu"), stack[1][:64, :64]))
        checked = validate(package)  # the export's validation: valid, but its model test would run the file
        assert checked.valid and not checked.tested and "not Neuroseg's file" in checked.details
    else:
        from storage.service import UserError

        with pytest.raises(UserError, match="state dict of another tool, whose architecture is Python code"):
            _import(annotator, package)
        _nothing_left(service)
        assert [(r.username, r.outcome) for r in service.audit_trail(action="import model")] == [("ann", "failed")]
    assert not marker.exists()
    _no_tmp_left(service)

    # the payload is live: importing the package's architecture file (what bioimageio.core's test_model did
    # on every import) runs it
    arch = tmp_path / "neuroseg_unet.py"
    arch.write_bytes(zipfile.ZipFile(package).read("neuroseg_unet.py"))
    done = subprocess.run([sys.executable, str(arch)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    assert marker.read_text() == "the package ran code"


# --- TorchScript that reaches for files ---------------------------------------------------------------------
class _Reader(torch.nn.Module):
    """A model that adds the first bytes of a server file to its output."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = torch.from_file(self.path, shared=False, size=16, dtype=torch.uint8)
        return x + data.float().sum()


def test_a_torchscript_model_that_reads_a_file_is_refused_unread(service, annotator, tmp_path):
    from storage.service import UserError

    secret = tmp_path / "secret"
    os.mkfifo(secret)  # whoever opens it to read wakes the writer below: a read cannot go unseen
    opened = threading.Event()

    def writer():
        fd = os.open(secret, os.O_WRONLY)  # blocks until a reader opens the other end
        opened.set()
        os.write(fd, b"0123456789abcdef")
        os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    folder = tmp_path / "reader"
    folder.mkdir()
    torch.jit.script(_Reader(str(secret))).save(str(folder / "reader.pt"))
    raw = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    package = torchscript_package(folder, folder / "reader.pt", raw, np.full((1, 1, 32, 32), 0.5, np.float32),
                                  name="A model that reads files")
    started = time.monotonic()
    with pytest.raises(UserError, match=r"uses the operator aten::from_file, which Neuroseg does not run"):
        _import(annotator, package)
    assert time.monotonic() - started < 60  # refused, not stuck opening the pipe
    assert not opened.is_set()  # the file was never opened
    _nothing_left(service)
    release = os.open(secret, os.O_RDONLY | os.O_NONBLOCK)  # (let the writer finish)
    thread.join(timeout=10)
    os.close(release)


class _Stateful(torch.nn.Module):
    """A model whose ``__setstate__`` (which ``torch.jit.load`` runs) would read a file."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return self.path, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        torch.from_file(self.path, shared=False, size=1, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Chatty(torch.nn.Module):
    """A harmless model that prints: its output must not spoil the check's verdict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print('{"ok": false, "reason": "printed by the model"}')
        return torch.sigmoid(x)


@pytest.fixture
def tiny_tensors(tmp_path):
    x = np.random.default_rng(1).random((1, 1, 16, 16), dtype=np.float32)
    np.save(tmp_path / "in.npy", x)
    np.save(tmp_path / "out.npy", 1 / (1 + np.exp(-x)))
    return tmp_path / "in.npy", tmp_path / "out.npy"


def _unprivileged_uid() -> int:
    """The user the check's child runs as: ``nobody`` when the tests run as root, else the tests' own."""
    import pwd

    return pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()


def test_load_time_code_is_refused_before_loading_and_a_models_prints_do_not_spoil_the_verdict(tmp_path,
                                                                                               tiny_tensors):
    torch.jit.script(_Stateful(str(tmp_path / "absent"))).save(str(tmp_path / "stateful.pt"))
    with pytest.raises(torchscript_rules.TorchScriptRefused, match="defines __setstate__"):
        torchscript_guard.check(tmp_path / "stateful.pt", *tiny_tensors, {})
    torch.jit.script(_Chatty()).save(str(tmp_path / "chatty.pt"))
    verdict = torchscript_guard.check(tmp_path / "chatty.pt", *tiny_tensors, {})
    assert "prim::Print" in verdict.ops and "aten::sigmoid" in verdict.ops and verdict.max_error < 1e-6
    # the child ran as nobody when we are root (it read its copy of the files from a folder only root may
    # enter: pytest's tmp_path), and it hashed the file it checked
    assert verdict.uid == _unprivileged_uid() and verdict.tested
    assert verdict.sha256 == hashlib.sha256((tmp_path / "chatty.pt").read_bytes()).hexdigest()


# --- a TorchScript file that shows two zip readers two archives ------------------------------------------------
class _Writer(torch.nn.Module):
    """A model whose ``__setstate__`` (which ``torch.jit.load`` runs) writes "pwned!!!" into a file through a
    shared memory map of it (``torch.from_file(..., shared=True)``), as the review's proof of concept did."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return self.path, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        mapped = torch.from_file(state[0], shared=True, size=8, dtype=torch.uint8)
        mapped[0:8] = torch.tensor([112, 119, 110, 101, 100, 33, 33, 33], dtype=torch.uint8)
        self.path = state[0] + str(int(mapped.sum()))  # (uses the write: TorchScript drops a dead one)
        self.training = state[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def two_archives(source: Path, out: Path) -> Path:
    """The review's crafted file (its ``mk3.py``): ``source`` (a TorchScript file with a ``__setstate__``)
    whose members PyTorch's zip reader finds, and in front of them a harmless copy (``__setstatf__``) that
    Python's ``zipfile`` finds instead: the file has two central directories, and its end records give the
    first one's offset as if the harmless members were not there. Python shifts every member by the
    difference between that offset and the directory it reads; PyTorch does not."""
    import struct
    import zlib

    original = source.read_bytes()
    archive = zipfile.ZipFile(source)
    infos = archive.infolist()
    e64 = original.rfind(b"PK\x06\x06")
    assert e64 > 0  # (torch.jit.save writes ZIP64 end records)
    cd_size, cd_off = struct.unpack("<QQ", original[e64 + 40:e64 + 56])
    a_locals, cd_a = original[:cd_off], bytearray(original[cd_off:cd_off + cd_size])
    b_locals, b_offsets, contents = bytearray(), [], []
    for info in infos:
        data = archive.read(info).replace(b"__setstate__", b"__setstatf__")
        name = info.filename.encode()
        contents.append(data)
        b_offsets.append(len(b_locals))
        b_locals += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data),
                                len(name), 0) + name + data
    pad = bytes(cd_size)
    shift = len(pad) + len(b_locals)
    cd_a_off = shift + len(a_locals)
    cd_b_off = cd_a_off + cd_size
    concat = cd_b_off - cd_a_off

    def walk(directory, fix):
        at = 0
        for i in range(len(infos)):
            assert directory[at:at + 4] == b"PK\x01\x02"
            name_len, extra_len, comment_len = struct.unpack("<HHH", directory[at + 28:at + 34])
            fix(directory, at, i)
            at += 46 + name_len + extra_len + comment_len

    walk(cd_a, lambda d, at, i: struct.pack_into("<I", d, at + 42, struct.unpack("<I", d[at + 42:at + 46])[0] + shift))
    cd_b = bytearray(cd_a)

    def fix_b(d, at, i):
        struct.pack_into("<H", d, at + 10, 0)  # stored
        struct.pack_into("<III", d, at + 16, zlib.crc32(contents[i]), len(contents[i]), len(contents[i]))
        struct.pack_into("<I", d, at + 42, len(pad) + b_offsets[i] - concat)

    walk(cd_b, fix_b)
    tail = bytearray(original[e64:])
    struct.pack_into("<Q", tail, 48, cd_a_off)  # the ZIP64 end record: PyTorch's reader reads directory A here
    struct.pack_into("<Q", tail, tail.rfind(b"PK\x06\x07") + 8, cd_b_off + cd_size)
    end = tail.rfind(b"PK\x05\x06")
    if struct.unpack("<I", tail[end + 16:end + 20])[0] != 0xFFFFFFFF:
        struct.pack_into("<I", tail, end + 16, cd_a_off)
    out.write_bytes(pad + b_locals + a_locals + cd_a + cd_b + tail)
    return out


def test_a_file_that_shows_two_zip_readers_two_archives_is_refused_and_its_load_time_code_never_runs(
        tmp_path, tiny_tensors):
    target = tmp_path / "server-file.txt"
    target.write_bytes(b"the server's own file\n")
    before = target.read_bytes()
    torch.jit.script(_Writer(str(target))).save(str(tmp_path / "writer.pt"))
    evil = two_archives(tmp_path / "writer.pt", tmp_path / "evil.pt")
    # Python's zipfile sees the harmless copy (what the first version of the check scanned)
    python_view = zipfile.ZipFile(evil)
    assert not any(b"__setstate__" in python_view.read(i) for i in python_view.infolist())
    assert any(b"__setstatf__" in python_view.read(i) for i in python_view.infolist())

    with pytest.raises(torchscript_rules.TorchScriptRefused, match="does not start with a zip member"):
        torchscript_guard.check(evil, *tiny_tensors, {})
    assert target.read_bytes() == before
    # each layer on its own: the frame, and the two readers compared (PyTorch's reader finds __setstate__)
    with pytest.raises(torchscript_rules.TorchScriptRefused, match="does not start with a zip member"):
        torchscript_rules.check_layout(evil)
    with pytest.raises(torchscript_rules.TorchScriptRefused, match="not the same member to PyTorch's zip reader"):
        torchscript_rules.check_members(evil)
    assert target.read_bytes() == before

    # the payload is live: torch.jit.load runs the copy Python's zipfile did not show
    torch.jit.load(str(evil))
    assert target.read_bytes().startswith(b"pwned!!!")


def test_a_zip_frame_that_two_readers_could_read_apart_is_refused(tmp_path):
    import struct

    torch.jit.script(_Chatty()).save(str(tmp_path / "plain.pt"))
    plain = (tmp_path / "plain.pt").read_bytes()
    torchscript_rules.check_archive(tmp_path / "plain.pt")  # (what torch.jit.save writes passes)
    cd_end = plain.rfind(b"PK\x06\x06")
    locator = plain.rfind(b"PK\x06\x07")
    moved = bytearray(plain[:cd_end] + bytes(16) + plain[cd_end:])  # 16 bytes between directory and end records
    struct.pack_into("<Q", moved, locator + 16 + 8, cd_end + 16)  # (its locator still finds the ZIP64 record)
    cases = {
        "data before the first member": (b"\0" * 64 + plain, "does not start with a zip member"),
        "a flatbuffer magic": (plain[:4] + b"PTMF" + plain[8:], "also a PyTorch flatbuffer file"),
        "a comment": (plain[:-2] + b"\x04\x00" + b"junk", "plain zip end record"),
        "a directory elsewhere": (bytes(moved), "central directory is not where its end record says"),
    }
    for data, message in cases.values():
        (tmp_path / "case.pt").write_bytes(data)
        with pytest.raises(torchscript_rules.TorchScriptRefused, match=message):
            torchscript_rules.check_archive(tmp_path / "case.pt")


# --- TorchScript checkpoints stored before the check --------------------------------------------------------------
def test_a_stored_torchscript_checkpoint_is_checked_once_before_it_is_loaded(tmp_path, monkeypatch):
    from unet.exchange.checkpoint import checked_file, load_checkpoint, save_torchscript
    from unet.network.config import ModelConfig

    config = ModelConfig(depth=2, initial_features=8, padding="same")
    meta = {"kind": "best", "step": 0, "package": {"pre": [], "sigmoid": False}}
    target = tmp_path / "server-file.txt"
    target.write_bytes(b"the server's own file\n")
    torch.jit.script(_Writer(str(target))).save(str(tmp_path / "writer.pt"))
    torch.jit.script(_Reader(str(target))).save(str(tmp_path / "reader.pt"))
    torch.jit.script(torch.nn.Sigmoid()).save(str(tmp_path / "sigmoid.pt"))
    stored = tmp_path / "run" / "best.pt"

    # imported before the check existed: the crafted file, then a model that reads files
    save_torchscript(stored, two_archives(tmp_path / "writer.pt", tmp_path / "evil.pt"), config, meta)
    with pytest.raises(ValueError, match=r"best\.pt: this TorchScript model is not loaded: .*zip member"):
        load_checkpoint(stored)
    assert target.read_bytes() == b"the server's own file\n"
    save_torchscript(stored, tmp_path / "reader.pt", config, meta)
    with pytest.raises(ValueError, match="uses the operator aten::from_file"):
        load_checkpoint(stored)
    assert not checked_file(stored).exists()

    # a harmless one is checked once: the verdict is kept with the file's sha256
    save_torchscript(stored, tmp_path / "sigmoid.pt", config, meta)
    model = load_checkpoint(stored).build_model("cpu")
    assert torch.equal(model(torch.zeros(1, 1, 8, 8)), torch.zeros(1, 1, 8, 8))  # sigmoid(0) = 0.5: logit 0
    kept = json.loads(checked_file(stored).read_text())
    assert kept["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()

    def no_second_check(*args, **kwargs):
        raise torchscript_rules.TorchScriptRefused("checked again")

    monkeypatch.setattr(torchscript_guard, "check", no_second_check)
    load_checkpoint(stored)  # (the kept verdict)
    save_torchscript(stored, tmp_path / "reader.pt", config, meta)  # other bytes: the verdict does not count
    with pytest.raises(ValueError, match="checked again"):
        load_checkpoint(stored)


def test_the_allowlist_takes_our_own_torchscript_export(exported):
    scripted = torch.jit.load(io.BytesIO(zipfile.ZipFile(exported).read("weights_torchscript.pt")))
    kinds = torchscript_rules.op_kinds(scripted)
    assert "aten::conv2d" in kinds and "aten::cat" in kinds and "prim::If" in kinds
    assert torchscript_rules.forbidden_ops(scripted) == []
    assert not torchscript_rules.allowed("aten::from_file") and not torchscript_rules.allowed("aten::save")
    assert not torchscript_rules.allowed("prim::CallMethod") and not torchscript_rules.allowed("myops::anything")


# --- limits -------------------------------------------------------------------------------------------------
class _Hungry(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.ones([1 << 29]).sum()  # 2 GB


class _Endless(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        while bool(x.sum() > -1.0):  # never false
            x = x + 1.0
        return x


@pytest.mark.parametrize(("model", "message"), [
    (_Hungry, r"needed more memory than its check allows \(512 MB\)"),
    (_Endless, r"ran past its time limit \(1 s of computing\)"),
])
def test_a_model_that_eats_memory_or_time_is_stopped(tmp_path, tiny_tensors, model, message):
    torch.jit.script(model()).save(str(tmp_path / "model.pt"))
    started = time.monotonic()
    with pytest.raises(torchscript_rules.TorchScriptRefused, match=message):
        torchscript_guard.check(tmp_path / "model.pt", *tiny_tensors, {}, memory_mb=512, seconds=1)
    assert time.monotonic() - started < 30


# --- a tiny package that asks for a huge network --------------------------------------------------------------
@contextlib.contextmanager
def _address_space(extra_mb: int):
    """This process may map at most ``extra_mb`` more while in the block (``RLIMIT_AS``'s soft limit, put
    back after): what would allocate a huge network fails at once instead of eating the machine."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        held = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    limit = held + (extra_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _model_config_edit(**changes):
    def edit(rdf):
        rdf["config"]["neuroseg"]["model_config"].update(changes)
    return edit


@pytest.mark.parametrize(("changes", "message"), [
    ({"initial_features": 100_000}, "initial_features must be at most 256"),  # ~90 G parameters at depth 1
    ({"out_channels": 1 << 20}, "out_channels must be at most 16"),
    ({"depth": 6, "initial_features": 256}, r"would have [\d,]+ parameters \(at most 200,000,000"),  # ~8 G
    ({"initial_features": 8}, r"in_features\.conv\.weight has the shape \[4, 1, 1, 1\], the architecture \[8, 1,"),
    ({"padding": "sideways"}, "its model config is not one Neuroseg builds"),
])
def test_a_package_that_asks_for_a_huge_or_other_network_is_refused_before_it_is_built(exported, tmp_path, changes,
                                                                                       message):
    from unet.exchange.bioimageio import PackageError

    package = _rezip(exported, tmp_path / "huge.zip", _rdf_edit(_model_config_edit(**changes)))
    started = time.monotonic()
    with _address_space(1024), pytest.raises(PackageError, match=message):
        load_package(package)  # (the weights are the tiny network's: 4 features, depth 2)
    assert time.monotonic() - started < 10


def test_the_import_says_why_a_huge_network_is_refused_and_keeps_nothing(service, annotator, exported, tmp_path):
    from storage.service import UserError

    package = _rezip(exported, tmp_path / "huge.zip", _rdf_edit(_model_config_edit(initial_features=100_000)))
    with _address_space(1024), pytest.raises(UserError, match="initial_features must be at most 256"):
        _import(annotator, package)
    _nothing_left(service)
    _no_tmp_left(service)


def test_a_packages_meta_never_says_what_network_is_built(service, annotator, exported, tmp_path):
    """A tiny valid package whose ``config.neuroseg.meta`` names a ~8 G-parameter network (as the side
    file's ``model_config``, its ``format`` and its recipe's model) is stored as the tiny network it holds;
    a side file that says otherwise (written before this was fixed) is refused before anything is built."""
    from unet.exchange.checkpoint import TORCHSCRIPT_FORMAT, load_checkpoint, side_file

    small = load_package(exported).model_config
    giant = {**small.to_dict(), "depth": 6, "initial_features": 256}

    def edit(rdf):  # (and a step no database column holds: the model card's step is then 0)
        rdf["config"]["neuroseg"]["meta"].update(model_config=dict(giant), format=TORCHSCRIPT_FORMAT,
                                                 train_config={"model": dict(giant), "steps": 5}, step=10**30)

    package = _rezip(exported, tmp_path / "meta.zip", _rdf_edit(edit))
    started = time.monotonic()
    with _address_space(1024):
        imported = _import(annotator, package)
        stored = service.store.abspath(next(c for c in service.checkpoint_choices()
                                            if c.id == imported.checkpoint_id).file)
        checkpoint = load_checkpoint(stored)
        assert checkpoint.model_config == small and checkpoint.meta["format"] == "neuroseg-unet-1"
        assert checkpoint.meta["step"] == 0 == next(c for c in service.checkpoints(imported.run_id)).step
        checkpoint.build_model("cpu")
        assert service.run(imported.run_id).config["model"] == small.to_dict()
        side = json.loads(side_file(stored).read_text())
        side_file(stored).write_text(json.dumps({**side, "model_config": giant}))
        with pytest.raises(ValueError, match=r"would have [\d,]+ parameters \(at most 200,000,000"):
            load_checkpoint(stored)
    assert time.monotonic() - started < 30


def test_a_meta_step_that_is_no_step_is_taken_as_zero():
    from storage.records.packages import _step

    assert [_step(v) for v in (5, "7", 3.0, [1], {"a": 1}, True, "x", 10**30, 1e308, float("nan"), -2, None)] == \
        [5, 7, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]


def _zip(entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytearray:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in entries:
            z.writestr(name, data)
    return bytearray(buf.getvalue())


def _headers(raw: bytearray, local: int, central: int, fmt: str, change) -> bytes:
    """Every local and central header's field at those offsets, changed by ``change(old)``."""
    for signature, offset in ((b"PK\x03\x04", local), (b"PK\x01\x02", central)):
        i = 0
        while (i := raw.find(signature, i)) >= 0:
            struct.pack_into(fmt, raw, i + offset, change(struct.unpack_from(fmt, raw, i + offset)[0]))
            i += 4
    return bytes(raw)


def _bad_deflate(raw: bytearray) -> bytes:
    i = raw.find(b"PK\x03\x04")
    name, extra = struct.unpack_from("<HH", raw, i + 26)
    data = i + 30 + name + extra
    raw[data:data + 2] = b"\xff\xff"  # an invalid block type
    return bytes(raw)


RDF = b"type: model\nname: x\n"
ZIPS = {
    "another compression method": (lambda: _headers(_zip([("rdf.yaml", RDF * 50)], zipfile.ZIP_STORED), 8, 10, "<H",
                                                    lambda _: 99), "a compression method Python's zip reader"),
    "encrypted": (lambda: _headers(_zip([("rdf.yaml", RDF)]), 6, 8, "<H", lambda v: v | 1), "it is encrypted"),
    "a wrong checksum": (lambda: _headers(_zip([("rdf.yaml", RDF)]), 14, 16, "<I", lambda _: 0xDEADBEEF),
                         "the zip is damaged"),
    "a damaged stream": (lambda: _bad_deflate(_zip([("rdf.yaml", RDF * 100)])), "the zip is damaged"),
    "a member named '.'": (lambda: bytes(_zip([(".", b"x"), ("rdf.yaml", RDF)])), "name no file can have: '.'"),
    "a file that is a folder too": (lambda: bytes(_zip([("a", b"x"), ("a/b", b"y"), ("rdf.yaml", RDF)])),
                                    "'a' both as a file and as a folder"),
    "a name too long": (lambda: bytes(_zip([("x" * 300, b"x"), ("rdf.yaml", RDF)])), "name no file can have"),
    "two descriptions side by side": (lambda: bytes(_zip([("b/rdf.yaml", RDF), ("a/rdf.yaml", RDF)])),
                                      "two descriptions side by side (a/rdf.yaml and b/rdf.yaml)"),
}


@pytest.mark.parametrize("case", ZIPS)
def test_a_zip_python_cannot_unpack_is_refused_with_the_reason_and_audited(service, annotator, case):
    """Python's zip reader raises NotImplementedError, RuntimeError, BadZipFile or zlib.error for these: the
    page showed a traceback and the audit trail had nothing."""
    from storage.service import UserError

    build, reason = ZIPS[case]
    with pytest.raises(UserError, match=re.escape(reason)):
        annotator.import_model(io.BytesIO(build()), "package.zip")
    assert [(r.action, r.outcome) for r in service.audit_trail(action="import model")] == [("import model", "failed")]
    assert service.runs() == [] and not list((service.store.root / "runs").glob("*"))
    _no_tmp_left(service)


# --- YAML that expands --------------------------------------------------------------------------------------------
def _laughs(levels: int) -> str:
    """The review's rdf.yaml: ten aliases of ten aliases of … (10^levels values in a few hundred bytes)."""
    lines = ["type: model", "format_version: 0.5.4", "name: x", "config:", "  a0: &a0 [1,2,3,4,5,6,7,8,9,10]"]
    lines += [f"  a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_yaml_anchors_and_aliases_and_a_huge_rdf_are_refused_before_any_parser_runs(service, annotator, exported,
                                                                                   tmp_path):
    from storage.records.packages import PackageRefused, precheck
    from storage.service import UserError
    from unet.exchange.bioimageio import PackageError

    rdf = tmp_path / "rdf.yaml"
    rdf.write_text(_laughs(9))  # a billion values: bioimageio.spec's validation of it would take hours
    started = time.monotonic()
    with pytest.raises(PackageRefused, match=r"uses a YAML anchor \(line 5\): Neuroseg reads no anchors or aliases"):
        precheck(rdf)
    rdf.write_text("type: model\nname: x\ndocumentation: |\n" + "  x\n" * 600_000)  # 2.4 MB
    with pytest.raises(PackageRefused, match=r"2,400,0\d\d bytes \(at most 1,048,576 are read\)"):
        precheck(rdf)
    rdf.write_text("type: model\nconfig: " + "[" * 100 + "]" * 100 + "\n")
    with pytest.raises(PackageRefused, match="nests more than 64 levels deep"):
        precheck(rdf)
    assert time.monotonic() - started < 5

    def aliased(name, data):  # our own export with one harmless alias in it
        if name == "rdf.yaml":
            return name, data + b"\nx-note: &note [1, 2]\nx-again: *note\n"
        return name, data

    package = _rezip(exported, tmp_path / "aliased.zip", aliased)
    with pytest.raises(PackageError, match="uses a YAML anchor"):
        load_package(package)
    with pytest.raises(UserError, match="uses a YAML anchor"):
        _import(annotator, package)
    _nothing_left(service)
    _no_tmp_left(service)


# --- URLs in rdf.yaml ---------------------------------------------------------------------------------------
@pytest.fixture
def listener():
    """A loopback HTTP server that counts every request it gets: (base URL, the requests' paths)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        do_GET = do_HEAD = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def _urls_everywhere(base: str, *, weights: bool):
    def edit(rdf):
        rdf["covers"] = [{"source": f"{base}/cover.png"}]
        rdf["documentation"] = {"source": f"{base}/README.md"}
        rdf["git_repo"] = f"{base}/repo"
        rdf["cite"][0]["url"] = f"{base}/paper"
        if weights:
            rdf["weights"]["torchscript"] = {"source": f"{base}/weights.pt", "pytorch_version": "2.0"}
        else:
            rdf["weights"]["torchscript"]["source"] = f"{base}/weights.pt"
            rdf["weights"]["torchscript"].pop("sha256", None)
            rdf["weights"]["pytorch_state_dict"]["architecture"]["source"] = f"{base}/neuroseg_unet.py"
            rdf["weights"]["pytorch_state_dict"]["architecture"].pop("sha256", None)
    return edit


@pytest.mark.parametrize("case", ["our export, files by URL", "foreign TorchScript by URL", "test input by URL"])
def test_no_url_a_package_names_is_fetched(service, annotator, exported, stack, listener, tmp_path, case):
    from storage.service import UserError

    base, seen = listener
    if case == "our export, files by URL":
        package = _rezip(exported, tmp_path / "urls.zip", _rdf_edit(_urls_everywhere(base, weights=False)))
        imported = _import(annotator, package)  # the state dict is in it: nothing by URL is needed
        assert service.run(imported.run_id).kind == "imported"
        checked = validate(package)  # the export's validation refuses a package that names URLs, unfetched
        assert not checked.valid and f"{base}/" in checked.details
    else:
        folder = tmp_path / "foreign"
        folder.mkdir()
        torch.jit.script(torch.nn.Sigmoid()).save(str(folder / "sigmoid.pt"))
        raw = stack[0][:32, :32].astype(np.float32)
        foreign = torchscript_package(folder, folder / "sigmoid.pt", raw, np.full((1, 1, 32, 32), 0.5, np.float32))

        def edit(rdf):
            if case == "test input by URL":
                rdf["inputs"][0]["test_tensor"] = {"source": f"{base}/in.npy"}
            else:
                _urls_everywhere(base, weights=True)(rdf)

        package = _rezip(foreign, tmp_path / "urls.zip", _rdf_edit(edit))
        with pytest.raises(UserError, match="by URL: Neuroseg fetches nothing for a package"):
            _import(annotator, package)
        _nothing_left(service)
    _no_tmp_left(service)
    assert seen == []  # not one request reached the listener


# --- the exported model card ---------------------------------------------------------------------------------
HOSTILE = ("<script>alert(1)</script> <img src=x onerror=alert(2)> ![pixel](http://evil.example/p.png) "
           "[click](javascript:alert(3))")


def test_user_text_in_an_exported_model_card_is_text(service, annotator, exported):
    imported = _import(annotator, exported)
    annotator.update_model(imported.checkpoint_id, name="Membranes " + HOSTILE[:80], notes="# Notes\n" + HOSTILE)
    data, _ = annotator.export_model(imported.checkpoint_id)
    card = zipfile.ZipFile(io.BytesIO(data)).read("README.md").decode()
    assert "## Notes" in card and "evil.example" in card  # the notes are there, as text
    name = read_rdf(zipfile.ZipFile(io.BytesIO(data)).read("rdf.yaml"))["name"]  # the card's name, as the spec
    assert name.startswith("Membranes ") and len(name) <= 128 and set(name) <= set(  # lets it be
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_+- ()")
    for raw in ("<script", "<img", "![", "](", "[click]"):
        assert raw not in card, raw
    assert "&lt;script&gt;alert\\(1\\)&lt;/script&gt;" in card
    assert "\\!\\[pixel\\]\\(http://evil.example/p.png\\)" in card
    assert "\n\\# Notes" in card  # a heading typed in the notes is not a heading
    assert card_text("a\n- b", lines=True) == "a\n\\- b" and card_text("two\nlines") == "two lines"
    assert code_block("x ```` y", "json") == "`````json\nx ```` y\n`````"
