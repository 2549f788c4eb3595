"""BioImage.IO packages in and out of the store. Out: :func:`storage.runs.export_model`. In: an uploaded
``.zip`` becomes a checkpoint (a finished run of kind ``imported``) that Predict, Live and "Start from"
offer like any other, after checks that leave nothing behind when one fails:

1. the zip itself: no member outside the package (absolute paths, ``..``, links), at most 2,000 members,
   at most 4 GB unpacked and no member that unpacks to more than 200 times its size (a zip bomb);
2. ``bioimageio.spec`` validates its ``rdf.yaml`` (a model description);
3. its tensors: one input and one output, each one channel and two space axes (a 3-D or multi-input model
   is refused, saying what it has);
4. its weights: the state dict of a package Neuroseg exported (read with ``weights_only=True``; it round-
   trips exactly), or the TorchScript weights of another tool's package, run with its own pre-processing
   (zero mean and unit variance, or percentile scaling) and read as a probability or its logits
   (:class:`unet.bioimageio.ForeignModel`; a boundary map is inverted). A state dict of another tool would
   run the package's Python code (its architecture file) and is refused; a TorchScript import predicts
   but cannot be fine-tuned (no state dict);
5. ``bioimageio.core``'s model test on the package's own test tensors passes.
"""

from __future__ import annotations

import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from sqlalchemy.orm import Session

from storage.files import FileStore, sha256_of
from storage.models import Checkpoint, Run
from storage.records import RunStatus

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
        total = 0
        for info in members:
            name = info.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise PackageRefused(f"the zip has a member outside itself: {name!r}")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise PackageRefused(f"the zip has a link: {name!r}")
            total += info.file_size
            if info.file_size > 10 << 20 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                raise PackageRefused(f"{name!r} unpacks to {info.file_size:,} bytes from {info.compress_size:,} "
                                     "(a zip bomb?)")
        if total > MAX_UNPACKED:
            raise PackageRefused(f"the zip unpacks to {total:,} bytes (at most {MAX_UNPACKED:,})")
        return members


def _unpack(path: Path, folder: Path) -> Path:
    members = check_zip(path)
    with zipfile.ZipFile(path) as archive:
        for info in members:
            if info.is_dir():
                continue
            target = folder / PurePosixPath(info.filename.replace("\\", "/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as dst:
                remaining = info.file_size + 1  # never more than the header says
                while chunk := src.read(min(1 << 20, remaining)):
                    remaining -= len(chunk)
                    if remaining <= 0:
                        raise PackageRefused(f"{info.filename!r} is larger than its header says")
                    dst.write(chunk)
    rdfs = sorted(folder.rglob("rdf.yaml"), key=lambda p: len(p.parts)) or sorted(folder.rglob("*.bioimageio.yaml"))
    if not rdfs:
        raise PackageRefused("no rdf.yaml in it: not a BioImage.IO package")
    return rdfs[0]


WEIGHT_FORMATS = ("pytorch_state_dict", "torchscript", "onnx", "keras_hdf5", "keras_v3",
                  "tensorflow_saved_model_bundle", "tensorflow_js")


def precheck(rdf: Path) -> None:
    """What the rdf.yaml says before anything is loaded: a model, one input and one output of two space
    axes and one channel, weights in a format Neuroseg runs; :class:`PackageRefused` says what it found."""
    import yaml

    try:
        data = yaml.safe_load(rdf.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PackageRefused(f"its rdf.yaml cannot be read: {exc}") from None
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
    """The model description, validated, of one channel in and out (after :func:`precheck`), or
    :class:`PackageRefused`."""
    from bioimageio.spec import InvalidDescr, load_description
    from bioimageio.spec.model import v0_5

    description = load_description(rdf, perform_io_checks=True, format_version="latest")
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


def import_package(session: Session, store: FileStore, upload: BinaryIO, filename: str) -> Imported:
    """Check an uploaded package (see the module) and keep it as a checkpoint; nothing stays when a check
    fails (the caller's transaction is rolled back, the unpacked files are removed)."""
    from unet.bioimageio import PackageError, load_package
    from unet.checkpoint import save_checkpoint

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
        if ours:
            try:
                checkpoint = load_package(spooled)
            except PackageError as exc:
                raise PackageRefused(str(exc)) from None
        elif "torchscript" in formats:
            from unet.bioimageio import foreign_plan

            try:
                config, plan = foreign_plan(description)
            except PackageError as exc:
                raise PackageRefused(str(exc)) from None
            source = description.weights.torchscript.source
            weights = unpacked / str(getattr(source, "path", source))
            if not weights.is_file():
                weights = rdf.parent / Path(str(source)).name
            foreign = (config, plan, weights)
        else:
            raise PackageRefused(f"its weights ({', '.join(formats)}) are a state dict of another tool, whose "
                                 "architecture is Python code in the package: Neuroseg does not run it (a "
                                 "TorchScript export of the same model is taken)")
        from bioimageio.core import test_model

        tested = test_model(rdf)
        if tested.status != "passed":
            failed = [f"{d.name}: {'; '.join(str(e.msg) for e in d.errors)}" for d in tested.details if d.errors]
            raise PackageRefused("it fails its own model test: " + " | ".join(failed[:3]))
        now = datetime.now(UTC)
        name = str(description.name)
        spec = {"preset": "imported", "train": [], "val": [], "source": filename[:200], "package": name,
                "weights": "torchscript" if foreign else "state dict"}
        config = ({"model": foreign[0].to_dict(), "foreign": True} if foreign else
                  checkpoint.meta.get("train_config") or {"model": checkpoint.model_config.to_dict()})
        run = Run(kind="imported", status=RunStatus.FINISHED, device="cpu", created=now, started=now, finished=now,
                  spec=spec, config=config)
        session.add(run)
        session.flush()
        target = store.run_dir(run.id) / "best.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if foreign:
                from unet.checkpoint import load_checkpoint, save_torchscript

                save_torchscript(target, foreign[2], foreign[0], {"kind": "best", "step": 0, "package": foreign[1],
                                                                   "imported_from": filename[:200]})
                load_checkpoint(target).build_model("cpu")  # it loads, or the reason
            else:
                save_checkpoint(target, checkpoint.build_model("cpu"),
                                meta={**checkpoint.meta, "kind": "best", "imported_from": filename[:200]})
            row = Checkpoint(run_id=run.id, kind="best", file=str(target.relative_to(store.root)),
                             step=0 if foreign else int(checkpoint.meta.get("step", 0) or 0), sha256=sha256_of(target),
                             metrics={})
            session.add(row)
            session.flush()
        except BaseException:
            shutil.rmtree(target.parent, ignore_errors=True)
            raise
        return Imported(run.id, row.id, name)
