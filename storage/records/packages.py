"""BioImage.IO packages in and out of the store. Out: :func:`storage.records.checkpoints.export_model`. In: an
uploaded ``.zip`` becomes a checkpoint (a finished run of kind ``imported``) that Predict, Live and "Start from"
offer like any other, after checks that leave nothing behind when one fails. A package is hostile until
shown otherwise: its Python is never imported, no URL it names is fetched, and its TorchScript is loaded
in the server only after a sandboxed child process accepted it.

1. the zip itself: no member outside the package (absolute paths, ``..``, links), at most 2,000 members,
   no two members for one file (``rdf.yaml`` and ``./rdf.yaml``), at most 4 GB unpacked, and neither a member
   over 1 MiB nor the whole that unpacks to more than 200 times its size (a zip bomb);
2. its ``rdf.yaml`` is at most 1 MiB and its YAML tokens (scanned, nothing built) hold no anchor or alias
   (a "billion laughs" of a few kB would keep validation busy for hours) and nest at most 64 deep; only
   then ``bioimageio.spec`` validates it (a model description) with ``perform_io_checks=False``:
   it fetches nothing (a URL there would be a request from the server to wherever it points);
3. every file it names is a regular file inside the package with the SHA-256 the description gives
   (:func:`unet.exchange.bioimageio.package_files`; what the spec's I/O checks would have done, locally); a cover or
   documentation by URL stays unread, weights or test tensors by URL are refused;
4. its tensors: one input and one output, each one channel and two space axes (a 3-D or multi-input model
   is refused, saying what it has);
5. its weights, and its own model test:
   - a package Neuroseg exported (``config.neuroseg``): its state dict, read with ``weights_only=True``,
     goes into our own architecture (never the package's ``.py``, which may be anything), and our model
     must give its test output for its test input (:func:`unet.exchange.package_reader.check_test_tensors`);
   - a package of ours must ask for a network of at most 256 initial features and 16 channels each way
     (:class:`unet.network.config.ModelConfig`), whose state dict's keys and shapes are checked against the
     architecture built on the ``meta`` device (nothing allocated) and which has at most 200 M parameters
     (:func:`unet.exchange.checkpoint.check_state_dict`), before the network is built for real;
   - another tool's TorchScript: :func:`unet.exchange.torchscript_guard.check` loads it in a child process (no
     network, bounded memory, time and file writes, as ``nobody`` when the server is root), after reading
     its archive with PyTorch's own zip reader and Python's (they must agree; no ``__setstate__``), refuses
     any operator outside its allowlist (``aten::from_file`` reads server files, ``aten::save`` writes them)
     and runs its test there, with its own pre-processing (zero mean and unit variance, or percentile
     scaling); it is then read as a probability or its logits (:class:`unet.exchange.foreign_model.ForeignModel`; a
     boundary map is inverted) and predicts but cannot be fine-tuned (no state dict); the verdict is kept
     beside the stored file, which :func:`unet.exchange.checkpoint.load_checkpoint` checks the same way when it has
     none (a model imported before the check);
   - another tool's state dict would run the package's Python code (its architecture file) and is refused.

``bioimageio.core``'s ``test_model`` is not called on an upload: on state-dict weights it imports the
package's architecture file into the calling process.

What remains: a foreign TorchScript model that passed runs, in the prediction worker, on real slices
without the check's bounds (its operators are tensor arithmetic, but its memory and time there are not
limited, and it runs in the worker's process as the server's user).
"""

from __future__ import annotations

import contextlib
import lzma
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from sqlalchemy.orm import Session

from domain.kinds import CheckpointKind, RunKind, RunStatus
from storage.models import Checkpoint, Run
from storage.records.files import FileStore, sha256_of
from unet.exchange.bioimageio import PackageError, local_file, package_files
from unet.exchange.checkpoint import (
    load_checkpoint,
    record_torchscript_check,
    save_checkpoint,
    save_torchscript,
    without_reserved,
)
from unet.exchange.foreign_model import foreign_plan
from unet.exchange.package_reader import MAX_RDF_BYTES, check_test_tensors, load_package, read_rdf
from unet.exchange.torchscript_guard import check as check_torchscript
from unet.exchange.torchscript_rules import TorchScriptRefused

MAX_MEMBERS = 2_000
MAX_UNPACKED = 4 << 30
MAX_RATIO = 200
MAX_UPLOAD = 2 << 30


class PackageRefused(ValueError):
    """A package that is not taken, with what was found."""


@dataclass(frozen=True)
class Imported:
    run_id: int
    checkpoint_id: int
    name: str


def check_zip(path: Path) -> list[zipfile.ZipInfo]:
    """The members of a zip that is safe to unpack, or :class:`PackageRefused` saying what is wrong."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise PackageRefused(f"not a zip file ({exc})") from None
    with archive:
        members = archive.infolist()
        if len(members) > MAX_MEMBERS:
            raise PackageRefused(f"the zip has {len(members):,} members (at most {MAX_MEMBERS:,})")
        total, seen, files, folders = 0, set(), set(), set()
        for info in members:
            name = info.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise PackageRefused(f"the zip has a member outside itself: {name!r}")
            if not parts or len(name) > 1024 or any(len(p.encode()) > 255 for p in parts):
                raise PackageRefused(f"the zip has a member whose name no file can have: {name[:80]!r}")
            folders.update(parts[:i] for i in range(1, len(parts)))
            if stat.S_ISLNK(info.external_attr >> 16):
                raise PackageRefused(f"the zip has a link: {name!r}")
            # (two members unpacked to one file: what is checked on disk would not be what a reader of the zip
            # takes, e.g. "rdf.yaml" and "./rdf.yaml")
            if not info.is_dir() and parts in seen:
                raise PackageRefused(f"the zip has two members for {'/'.join(parts)!r}")
            seen.add(parts)
            if not info.is_dir():
                files.add(parts)
            total += info.file_size
            if info.file_size > 1 << 20 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                raise PackageRefused(f"{name!r} unpacks to {info.file_size:,} bytes from {info.compress_size:,} "
                                     "(a zip bomb?)")
        both = sorted("/".join(p) for p in files & folders)
        if both:  # ("a" and "a/b": one of them cannot be unpacked)
            raise PackageRefused(f"the zip has {both[0]!r} both as a file and as a folder")
        if total > MAX_UNPACKED:
            raise PackageRefused(f"the zip unpacks to {total:,} bytes (at most {MAX_UNPACKED:,})")
        packed = path.stat().st_size
        if total > 10 << 20 and total > MAX_RATIO * packed:  # (many members, each just under the rule above)
            raise PackageRefused(f"the zip unpacks to {total:,} bytes from {packed:,} (a zip bomb?)")
        return members


# what Python's zip reader raises for a member it cannot decode: another compression method, encryption, a
# wrong CRC, a damaged stream (bz2 says so with an OSError, which is no disk's: read apart from the writes)
UNREADABLE = (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error, lzma.LZMAError)


@contextlib.contextmanager
def _unpacking(info: zipfile.ZipInfo):
    try:
        yield
    except UNREADABLE as exc:
        why = ("it uses a compression method Python's zip reader does not read" if isinstance(exc, NotImplementedError)
               else "it is encrypted" if isinstance(exc, RuntimeError) else "the zip is damaged")
        raise PackageRefused(f"{info.filename[:200]!r} could not be unpacked: {why}; pack it again with a plain "
                             "zip (deflate, no password)") from None


def _read(src, info: zipfile.ZipInfo, size: int) -> bytes:
    try:
        return src.read(size)
    except OSError as exc:  # (a damaged bzip2 stream)
        raise PackageRefused(f"{info.filename[:200]!r} could not be unpacked: the zip is damaged ({exc})") from None


def _unpack(path: Path, folder: Path) -> Path:
    members = check_zip(path)
    with zipfile.ZipFile(path) as archive:
        for info in members:
            if info.is_dir():
                continue
            target = folder / PurePosixPath(info.filename.replace("\\", "/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            with _unpacking(info), archive.open(info) as src, open(target, "wb") as dst:
                remaining = info.file_size + 1  # never more than the header says
                while chunk := _read(src, info, min(1 << 20, remaining)):
                    remaining -= len(chunk)
                    if remaining <= 0:
                        raise PackageRefused(f"{info.filename!r} is larger than its header says")
                    dst.write(chunk)
    rdfs = sorted(folder.rglob("rdf.yaml"), key=lambda p: (len(p.parts), p.as_posix())) or sorted(
        folder.rglob("*.bioimageio.yaml"))
    if not rdfs:
        raise PackageRefused("no rdf.yaml in it: not a BioImage.IO package")
    if len(rdfs) > 1 and len(rdfs[1].parts) == len(rdfs[0].parts):  # (which is meant? the loader would guess)
        raise PackageRefused(f"it holds two descriptions side by side ({rdfs[0].relative_to(folder).as_posix()} and "
                             f"{rdfs[1].relative_to(folder).as_posix()}): one package is one model")
    return rdfs[0]


def _step(value: object) -> int:
    """The training step a package's meta says, when it is one (a whole number the store can hold); else 0:
    it is only what the model card shows."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return 0
    try:
        step = int(value)
    except (TypeError, ValueError, OverflowError):
        return 0
    return step if 0 <= step < 2**31 else 0


WEIGHT_FORMATS = ("pytorch_state_dict", "torchscript", "onnx", "keras_hdf5", "keras_v3",
                  "tensorflow_saved_model_bundle", "tensorflow_js")


def precheck(rdf: Path) -> None:
    """What the rdf.yaml says before anything is loaded: a model, one input and one output of two space
    axes and one channel, weights in a format Neuroseg runs; :class:`PackageRefused` says what it found.
    The file is read only when it is at most 1 MiB and has no YAML anchor or alias
    (:func:`unet.exchange.package_reader.read_rdf`): nothing else (nor ``bioimageio.spec`` after it) parses it
    before."""
    size = rdf.stat().st_size
    if size > MAX_RDF_BYTES:
        raise PackageRefused(f"its rdf.yaml has {size:,} bytes (at most {MAX_RDF_BYTES:,} are read)")
    try:
        data = read_rdf(rdf.read_bytes())
    except PackageError as exc:
        raise PackageRefused(str(exc)) from None
    if not isinstance(data, dict) or data.get("type") != "model":
        raise PackageRefused(f"it describes a {data.get('type') if isinstance(data, dict) else 'nothing'}, "
                             "not a model")
    inputs, outputs = data.get("inputs") or [], data.get("outputs") or []
    if len(inputs) != 1 or len(outputs) != 1:
        raise PackageRefused(f"the model has {len(inputs)} inputs and {len(outputs)} outputs; Neuroseg runs "
                             "models with one image in and one map out")
    for role, tensor in (("input", inputs[0]), ("output", outputs[0])):
        axes = tensor.get("axes") or []
        if isinstance(axes, str):  # format 0.4: "bcyx"
            kinds = ["space" if a in "zyx" else {"b": "batch", "c": "channel", "t": "time"}.get(a, a) for a in axes]
            names = [a for a in axes if a in "zyx"]
        else:
            kinds = [a.get("type", "") for a in axes if isinstance(a, dict)]
            names = [str(a.get("id", "?")) for a in axes if isinstance(a, dict) and a.get("type") == "space"]
        space = kinds.count("space")
        if space != 2:
            raise PackageRefused(f"its {role} has {space} space axes ({', '.join(names)}): a "
                                 f"{space}-D model; Neuroseg runs 2-D models")
        extra = sorted({k for k in kinds if k not in ("space", "batch", "channel")})
        if extra:
            raise PackageRefused(f"its {role} has {', '.join(extra)} axes; Neuroseg runs 2-D models")
    weights = [f for f in (data.get("weights") or {}) if (data.get("weights") or {}).get(f)]
    unknown = [f for f in weights if f not in WEIGHT_FORMATS]
    if not weights or unknown:
        raise PackageRefused(f"its weights ({', '.join(weights) or 'none'}) are in no format Neuroseg knows")
    if "pytorch_state_dict" not in weights and "torchscript" not in weights:
        raise PackageRefused(f"its weights ({', '.join(weights)}) are neither TorchScript nor a PyTorch state "
                             "dict")


def describe_and_check(rdf: Path):
    """The model description, validated without any I/O (no URL it names is fetched; :func:`import_package`
    checks its files itself), of one channel in and out (after :func:`precheck`), or :class:`PackageRefused`."""
    from bioimageio.spec import InvalidDescr, load_description  # 1.0 s to import (measured): not at the server start
    from bioimageio.spec.model import v0_5  # (loaded with bioimageio.spec above, when a package is checked)

    description = load_description(rdf, perform_io_checks=False, format_version="latest")  # (no fetch)
    if isinstance(description, InvalidDescr):
        problems = [f"{'.'.join(map(str, e.loc))}: {e.msg}" for d in description.validation_summary.details
                    for e in d.errors][:5]
        raise PackageRefused("its rdf.yaml is not a valid BioImage.IO description: " + "; ".join(problems))
    if getattr(description, "type", "") != "model" or not isinstance(description, v0_5.ModelDescr):
        raise PackageRefused(f"it describes a {getattr(description, 'type', 'resource')}, not a model")
    for role, tensor in (("input", description.inputs[0]), ("output", description.outputs[0])):
        # (its axes were read by precheck; the channels only the description knows, also of a 0.4 package)
        channels = [len(a.channel_names) for a in tensor.axes if getattr(a, "type", "") == "channel"]
        if channels and channels[0] != 1:
            raise PackageRefused(f"its {role} has {channels[0]} channels; Neuroseg runs one channel in and one "
                                 "map out")
    return description


def import_package(session: Session, store: FileStore, upload: BinaryIO, filename: str, *,
                   memory_mb: int | None = None, seconds: int | None = None) -> Imported:
    """Check an uploaded package (see the module) and keep it as a checkpoint; nothing stays when a check
    fails (the caller's transaction is rolled back, the unpacked files are removed). ``memory_mb`` and
    ``seconds`` bound the check of a foreign TorchScript model (:mod:`unet.exchange.torchscript_guard`'s defaults)."""
    with tempfile.TemporaryDirectory(dir=store.root / "tmp" if (store.root / "tmp").is_dir() else None) as tmp:
        folder = Path(tmp)
        spooled = folder / "upload.zip"
        size = 0
        with open(spooled, "wb") as out:
            while chunk := upload.read(1 << 20):
                size += len(chunk)
                if size > MAX_UPLOAD:
                    raise PackageRefused(f"the upload is larger than {MAX_UPLOAD >> 30} GB")
                out.write(chunk)
        unpacked = folder / "package"
        rdf = _unpack(spooled, unpacked)
        precheck(rdf)
        description = describe_and_check(rdf)
        formats = [f for f in WEIGHT_FORMATS if getattr(description.weights, f, None) is not None]
        ours = bool((description.config.model_extra or {}).get("neuroseg") if description.config else None)
        foreign = None
        try:
            package_files(description, unpacked)  # every file it holds is the one it describes
            tensors = (description.inputs[0].test_tensor, description.outputs[0].test_tensor)
            if any(t is None for t in tensors):
                raise PackageRefused("it has no test input and output: Neuroseg takes a model only after it gave "
                                     "its own test output")
            test_input, test_output = (local_file(t, unpacked) for t in tensors)
            if ours:  # our architecture, its weights (weights_only): no Python of the package's runs
                checkpoint = load_package(spooled)
                check_test_tensors(checkpoint, test_input, test_output)
            elif "torchscript" in formats:
                config, plan = foreign_plan(description)
                weights = local_file(description.weights.torchscript, unpacked)
                checked = sha256_of(weights)
                verdict = check_torchscript(weights, test_input, test_output, plan, memory_mb=memory_mb,
                                            seconds=seconds)
                if verdict.sha256 != checked:
                    raise PackageRefused("its TorchScript file changed while it was checked")
                foreign = (config, plan, weights, checked, verdict.ops)
            else:
                raise PackageRefused(f"its weights ({', '.join(formats)}) are a state dict of another tool, whose "
                                     "architecture is Python code in the package: Neuroseg does not run it (a "
                                     "TorchScript export of the same model is taken)")
        except (PackageError, TorchScriptRefused) as exc:
            raise PackageRefused(str(exc)) from None
        now = datetime.now(UTC)
        name = str(description.name)
        spec = {"preset": "imported", "train": [], "val": [], "source": filename[:200], "package": name,
                "weights": "torchscript" if foreign else "state dict"}
        if foreign:
            config = {"model": foreign[0].to_dict(), "foreign": True}
        else:  # its recipe, but always the network that was checked (a package's meta says what it likes)
            recipe = checkpoint.meta.get("train_config")
            config = {**(recipe if isinstance(recipe, dict) else {}), "model": checkpoint.model_config.to_dict()}
        step = 0 if foreign else _step(checkpoint.meta.get("step"))
        run = Run(kind=RunKind.IMPORTED, status=RunStatus.FINISHED, device="cpu", created=now, started=now,
                  finished=now, spec=spec, config=config)
        session.add(run)
        session.flush()
        target = store.run_dir(run.id) / "best.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if foreign:
                save_torchscript(target, foreign[2], foreign[0], {"kind": "best", "step": 0, "package": foreign[1],
                                                                   "imported_from": filename[:200]})
                if sha256_of(target) != foreign[3]:
                    raise PackageRefused("its TorchScript file changed after it was checked")
                record_torchscript_check(target, foreign[3], foreign[4])  # (loads do not check it again)
                load_checkpoint(target).build_model("cpu")  # (accepted by the check): it loads, or the reason
            else:
                save_checkpoint(target, checkpoint.build_model("cpu"),  # (its meta never says what is built)
                                meta={**without_reserved(checkpoint.meta), "kind": "best", "step": step,
                                      "imported_from": filename[:200]})
            row = Checkpoint(run_id=run.id, kind=CheckpointKind.BEST, file=str(target.relative_to(store.root)),
                             step=0 if foreign else step, sha256=sha256_of(target),
                             metrics={})
            session.add(row)
            session.flush()
        except BaseException:
            shutil.rmtree(target.parent, ignore_errors=True)
            raise
        return Imported(run.id, row.id, name)
