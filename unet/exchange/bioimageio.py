"""A model exported as a BioImage.IO package (bioimageio.spec 0.5): the ``.zip`` that ilastik, deepImageJ,
napari and ``bioimageio.core`` run (read back by :mod:`unet.exchange.package_reader`; another tool's
TorchScript package runs through :mod:`unet.exchange.foreign_model`).

The package holds ``rdf.yaml``; the weights twice, as a PyTorch state dict with the architecture's source
(``unet/network/arch.py``, PyTorch only, callable ``NeurosegUNet`` with the model's config as kwargs) and as
TorchScript; a test input (a crop of a slice from the model's own data) with the output the model gives
for it; the pre-processing (zero mean, unit variance per image: what training did) and the
post-processing (a sigmoid: the weights give logits, the package gives the neuron probability) in the
spec's terms; a cover image; authors, licence and citations; a model card in which every piece of user
text is escaped (:func:`card_text`: no HTML, no Markdown image or link comes from a name or a note).
:func:`export_package` validates it with ``bioimageio.spec`` (reading no URL: :func:`package_files` checks
the files it names) and runs ``bioimageio.core``'s model test before it returns: a package that fails is
never handed out.

Reading a package back (:func:`unet.exchange.package_reader.load_package`,
:func:`unet.exchange.package_reader.check_test_tensors`) never imports its Python: its
``rdf.yaml`` is read only when small and free of YAML anchors and aliases (:func:`read_rdf`), its model
config must be within :class:`unet.network.config.ModelConfig`'s caps, its state dict must fit the architecture
built on the ``meta`` device (keys, shapes, at most 200 M parameters:
:func:`unet.exchange.checkpoint.check_state_dict`) before the network is built for real, the state dict is read
with ``weights_only=True`` into our own architecture and our model is run on the package's test input.
Another tool's TorchScript is run only after :mod:`unet.exchange.torchscript_guard` accepted it; what remains is
that an accepted one then runs unbounded (memory, time) in the prediction worker on real slices."""

from __future__ import annotations

import hashlib
import html
import json
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from unet.exchange.checkpoint import Checkpoint
from unet.network.sizes import output_size, valid_input_sizes
from unet.training.data import normalize_image

ARCH_FILE = Path(__file__).resolve().parent.parent / "network" / "arch.py"
UNET_CITE = ("Ronneberger, Fischer and Brox (2015): U-Net: Convolutional Networks for Biomedical Image "
             "Segmentation. MICCAI 2015.", "10.1007/978-3-319-24574-4_28")
ISBI_CITE = ("Arganda-Carreras et al. (2015): Crowdsourcing the creation of image segmentation algorithms for "
             "connectomics. Frontiers in Neuroanatomy 9:142 (the ISBI 2012 EM segmentation challenge data, "
             "Cardona et al. 2010).", "10.3389/fnana.2015.00142")


class PackageError(ValueError):
    """A package that could not be made, or that failed its validation or its test, with the reason."""


@dataclass
class ExportInfo:
    """What goes into the package beyond the weights."""

    name: str
    description: str
    authors: list[str] = field(default_factory=lambda: ["Neuroseg"])
    license: str = "CC-BY-4.0"
    cite: list[tuple[str, str]] = field(default_factory=lambda: [UNET_CITE])  # (text, DOI)
    tags: list[str] = field(default_factory=lambda: ["electron-microscopy", "neurons", "membrane", "unet", "2d",
                                                     "semantic-segmentation", "neuroseg"])
    documentation: str = ""  # markdown: the model card
    pixel_size_nm: float | None = None


@dataclass(frozen=True)
class Validation:
    """What the checks said: the spec's validation and the core's model test."""

    valid: bool
    tested: bool
    details: str


# (what Markdown reads as syntax; & < > become HTML character references instead)
_MARKDOWN = re.compile(r"([\\`*_\[\]()!#|~${}])")
_LINE_START = re.compile(r"^([ \t]*)([-+=]|\d+(?=\.))(\.?)", re.MULTILINE)
_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c\x00-\x08\x0b-\x1f\x7f-\x9f]")


def card_text(text: object, *, lines: bool = False) -> str:
    """User text (a model's name and notes, a dataset's name) for the exported model card, which model hubs
    render as Markdown with HTML: shown as the characters typed. ``& < >`` become character references (no
    tag survives), every Markdown metacharacter is backslash-escaped (``![x](http://…)`` is text, not an
    image a reader's browser would load, nor a link), list and heading markers at a line's start too;
    bidirectional and control characters are dropped. One line unless ``lines``."""
    cleaned = _CONTROLS.sub("", "" if text is None else str(text))
    if not lines:
        cleaned = " ".join(cleaned.split())
    escaped = _MARKDOWN.sub(r"\\\1", html.escape(cleaned, quote=False))
    return _LINE_START.sub(lambda m: m[1] + (m[2] + "\\." if m[3] else "\\" + m[2]), escaped)


def code_block(text: str, language: str = "") -> str:
    """``text`` as a fenced Markdown code block whose fence no run of backticks in it can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def test_crop_size(checkpoint: Checkpoint, image_shape: tuple[int, int], wanted: int = 256) -> int:
    """A square input size the network takes (≥ ``wanted`` when the image allows, else the largest that fits)."""
    sizes = valid_input_sizes(checkpoint.model_config, 8, max(min(image_shape), 8))
    if not sizes:
        raise PackageError(f"the test slice ({image_shape[0]}×{image_shape[1]}) is smaller than the network's "
                           "smallest input")
    bigger = [s for s in sizes if s >= wanted]
    return bigger[0] if bigger else sizes[-1]


def model_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x[None, None].astype(np.float32))).numpy()


def _cover(image: np.ndarray, probability: np.ndarray, path: Path) -> None:
    def grey(a: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(a, (0.5, 99.5))
        return (np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)

    h = probability.shape[0]
    top = (image.shape[0] - h) // 2
    left = (image.shape[1] - probability.shape[1]) // 2
    crop = image[top:top + h, left:left + probability.shape[1]]
    both = np.concatenate([grey(crop), np.full((h, 8), 255, np.uint8), (probability * 255).astype(np.uint8)], 1)
    Image.fromarray(both).resize((both.shape[1] * 2, h * 2), Image.NEAREST).save(path)


def build_description(checkpoint: Checkpoint, test_image: np.ndarray, info: ExportInfo, folder: Path):
    """The ``ModelDescr`` of the checkpoint with every file it names written into ``folder``."""
    from bioimageio.spec.model import v0_5 as bio  # bioimageio.spec: ~1.5 s, not in the workers

    config = checkpoint.model_config
    if config.in_channels != 1 or config.out_channels != 1:
        raise PackageError("only single-channel models are exported (one image in, one map out)")
    if test_image.ndim != 2:
        raise PackageError(f"the test image must be one 2-D slice, not {test_image.shape}")
    size = test_crop_size(checkpoint, test_image.shape)
    top, left = (test_image.shape[0] - size) // 2, (test_image.shape[1] - size) // 2
    raw = np.asarray(test_image[top:top + size, left:left + size], dtype=np.float32)
    model = checkpoint.build_model("cpu")
    probability = 1 / (1 + np.exp(-model_logits(model, normalize_image(raw))))  # what the package must give
    np.save(folder / "test_input.npy", raw[None, None])
    np.save(folder / "test_output.npy", probability.astype(np.float32))
    _cover(raw, probability[0, 0], folder / "cover.png")

    torch.save(checkpoint.state_dict, folder / "weights.pt")
    scripted = torch.jit.script(model)
    scripted.save(str(folder / "weights_torchscript.pt"))
    shutil.copyfile(ARCH_FILE, folder / "neuroseg_unet.py")
    (folder / "README.md").write_text(info.documentation or  # (documentation is Markdown made by the caller)
                                      f"# {card_text(info.name)}\n\n{card_text(info.description, lines=True)}\n")

    sizes = valid_input_sizes(config, 8, 4096)
    step = sizes[1] - sizes[0]
    offset = output_size(config, sizes[0]) - sizes[0]  # the same for every valid size (0 with same padding)
    space_scale = {"scale": info.pixel_size_nm, "unit": "nanometer"} if info.pixel_size_nm else {}
    torch_version = bio.Version(torch.__version__.split("+")[0])
    from pydantic import ValidationError  # (pydantic comes with bioimageio.spec, imported above)

    try:
        return _describe(bio, checkpoint, info, folder, sizes, step, offset, space_scale, torch_version)
    except ValidationError as exc:  # what the spec refuses (a name of fewer than 5 characters, …)
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise PackageError(f"the package description is not valid: {problems}") from None


def spec_name(name: str, default: str = "Neuroseg U-Net") -> str:
    """``name`` as a package's ``name`` may be: the characters the spec allows, 5 to 128 of them (else
    ``default``)."""
    kept = " ".join(re.sub(r"[^A-Za-z0-9_+\- ()]", " ", name).split())[:128].strip()
    return kept if len(kept) >= 5 else default


def _describe(bio, checkpoint: Checkpoint, info: ExportInfo, folder: Path, sizes: list[int], step: int,
              offset: int, space_scale: dict, torch_version):
    config = checkpoint.model_config
    return bio.ModelDescr(
        name=spec_name(info.name),
        description=info.description,
        authors=[bio.Author(name=a) for a in info.authors],
        cite=[bio.CiteEntry(text=text, doi=bio.Doi(doi)) for text, doi in info.cite],
        license=bio.LicenseId(info.license),
        tags=info.tags,
        covers=[bio.FileDescr(source=folder / "cover.png")],
        documentation=bio.FileDescr(source=folder / "README.md"),
        inputs=[bio.InputTensorDescr(
            id=bio.TensorId("raw"),
            description="one EM slice, any grey values (normalised by the pre-processing)",
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier("raw")]),
                  bio.SpaceInputAxis(id=bio.AxisId("y"), size=bio.ParameterizedSize(min=sizes[0], step=step),
                                     **space_scale),
                  bio.SpaceInputAxis(id=bio.AxisId("x"), size=bio.ParameterizedSize(min=sizes[0], step=step),
                                     **space_scale)],
            test_tensor=bio.FileDescr(source=folder / "test_input.npy"),
            preprocessing=[bio.ZeroMeanUnitVarianceDescr(
                kwargs=bio.ZeroMeanUnitVarianceKwargs(axes=[bio.AxisId("y"), bio.AxisId("x")]))],
        )],
        outputs=[bio.OutputTensorDescr(
            id=bio.TensorId("neuron_probability"),
            description="probability that a pixel is inside a neuron (1 - membrane probability)",
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier("neuron")]),
                  bio.SpaceOutputAxis(id=bio.AxisId("y"), size=bio.SizeReference(
                      tensor_id=bio.TensorId("raw"), axis_id=bio.AxisId("y"), offset=offset), **space_scale),
                  bio.SpaceOutputAxis(id=bio.AxisId("x"), size=bio.SizeReference(
                      tensor_id=bio.TensorId("raw"), axis_id=bio.AxisId("x"), offset=offset), **space_scale)],
            test_tensor=bio.FileDescr(source=folder / "test_output.npy"),
            data=bio.IntervalOrRatioDataDescr(type="float32"),
            postprocessing=[bio.SigmoidDescr()],
        )],
        weights=bio.WeightsDescr(
            pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
                source=folder / "weights.pt",
                architecture=bio.ArchitectureFromFileDescr(source=folder / "neuroseg_unet.py",
                                                           callable=bio.Identifier("NeurosegUNet"),
                                                           kwargs=config.to_dict()),
                pytorch_version=torch_version),
            torchscript=bio.TorchscriptWeightsDescr(source=folder / "weights_torchscript.pt",
                                                    pytorch_version=torch_version, parent="pytorch_state_dict"),
        ),
        config=bio.Config(neuroseg={"format": "neuroseg-unet-1", "model_config": config.to_dict(),
                                    "meta": json.loads(json.dumps(checkpoint.meta, default=str))}),
    )


def validate(package: Path, *, run_test: bool = True) -> Validation:
    """The spec's validation and (``run_test``) ``bioimageio.core``'s model test of a package this process
    built. Nothing is fetched: the description is read with ``perform_io_checks=False`` and
    :func:`package_files` checks what it names instead (each file in the package, with its sha256; a URL
    makes the package invalid). The core's test imports the architecture file of state-dict weights, so it
    runs only when that file is ``unet/network/arch.py`` byte for byte (our own code); the app never calls this on
    an uploaded package (:mod:`storage.records.packages` checks those without running their Python)."""
    from bioimageio.spec import load_description  # bioimageio.spec: ~1.5 s, not in the workers

    description = load_description(package, perform_io_checks=False)
    summary = description.validation_summary
    if summary.status != "valid-format" and summary.status != "passed":
        return Validation(False, False, _summary_text(summary))
    package = Path(package)
    root = None if zipfile.is_zipfile(package) else package if package.is_dir() else package.parent
    try:
        files = package_files(description, root)
    except PackageError as exc:
        return Validation(False, False, str(exc))
    remote = sorted(str(f) for f in files.values() if isinstance(f, str))
    if remote:
        return Validation(False, False, f"it names files outside itself: {', '.join(remote[:3])}")
    if not run_test:
        return Validation(True, False, _summary_text(summary))
    state_dict = getattr(description.weights, "pytorch_state_dict", None)
    if state_dict is not None:
        arch = getattr(state_dict.architecture, "source", None)
        if arch is None or local_file(state_dict.architecture, root).read_bytes() != ARCH_FILE.read_bytes():
            return Validation(True, False, "not tested: its architecture is not Neuroseg's file "
                                           "(unet/network/arch.py), and the model test would run it")
    from bioimageio.core import test_model  # bioimageio.core (xarray: ~3 s) only for the model test

    tested = test_model(package)
    return Validation(True, tested.status == "passed", _summary_text(tested))


def local_file(descr: Any, root: Path | None = None) -> Any:
    """The file a ``FileDescr`` of a package names, checked and never fetched: a member of the package's
    zip, or a regular file inside ``root`` (the unpacked package; an absolute path or ``..`` elsewhere is
    refused), whose SHA-256 is the one the description gives (when it gives one). A URL is refused:
    Neuroseg reads nothing from the network for a package. :class:`PackageError` says which file."""
    from bioimageio.spec.common import RelativeFilePath, ZipPath  # bioimageio.spec: ~1.5 s, not in the workers

    source = descr.source
    named = str(source)
    if isinstance(source, RelativeFilePath):
        source = source.absolute()
    if isinstance(source, Path):
        resolved = source.resolve()
        if root is None or not resolved.is_relative_to(Path(root).resolve()):
            raise PackageError(f"it names a file outside itself: {named!r}")
        if not resolved.is_file():
            raise PackageError(f"it names {named!r}, which is not a file in it")
        source = resolved
    elif not isinstance(source, ZipPath):
        raise PackageError(f"it names {named!r} by URL: Neuroseg fetches nothing for a package")
    elif not source.is_file():
        raise PackageError(f"it names {named!r}, which is not a file in it")
    if descr.sha256 is not None:
        with source.open("rb") as fh:
            actual = hashlib.file_digest(fh, "sha256").hexdigest()
        if actual != str(descr.sha256):
            raise PackageError(f"{named!r} is not the file its rdf.yaml describes (its sha256 differs)")
    return source


def package_files(description: Any, root: Path | None = None) -> dict[str, Any]:
    """Every file a description names (``bioimageio.spec.get_package_content``), by its name in the package:
    each local one checked by :func:`local_file` (inside the package, its sha256), each URL given back as
    its text, unfetched, for the caller to judge (a cover or documentation by URL is harmless unread; weights
    or test tensors by URL are refused where they are read)."""
    from bioimageio.spec import get_package_content, get_validation_context  # bioimageio.spec: not in the workers
    from bioimageio.spec.common import FileDescr, RelativeFilePath, ZipPath  # (as the line above)

    try:  # (with I/O checks on, as they are by default, listing would download each URL to hash it)
        with get_validation_context().replace(perform_io_checks=False):
            content = get_package_content(description)
    except (ValueError, TypeError, OSError) as exc:
        raise PackageError(f"its files cannot be listed: {exc}") from None
    files: dict[str, Any] = {}
    for name, descr in content.items():
        if not isinstance(descr, FileDescr):
            continue  # (the description itself)
        local = isinstance(descr.source, RelativeFilePath | Path | ZipPath)
        files[str(name)] = local_file(descr, root) if local else str(descr.source)
    return files


def _summary_text(summary: Any) -> str:
    failed = [f"{d.name}: {'; '.join(str(e.msg) for e in d.errors)}" for d in summary.details if d.errors]
    return f"{summary.status}" + (": " + " | ".join(failed) if failed else "")


def export_package(checkpoint: Checkpoint, test_image: np.ndarray, info: ExportInfo, out: str | Path,
                   *, run_test: bool = True) -> Validation:
    """Write the checkpoint as a BioImage.IO ``.zip`` at ``out`` after it passed the spec's validation and
    the core's model test; :class:`PackageError` (and no file at ``out``) when it did not."""
    from bioimageio.spec import save_bioimageio_package  # bioimageio.spec: ~1.5 s, not in the workers

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        description = build_description(checkpoint, test_image, info, folder)
        package = folder / "package.zip"
        save_bioimageio_package(description, output_path=package)
        result = validate(package, run_test=run_test)
        if not result.valid or (run_test and not result.tested):
            raise PackageError(f"the package did not pass its checks: {result.details}")
        tmp_out = out.with_name(out.name + ".partial")
        shutil.copyfile(package, tmp_out)
        tmp_out.replace(out)
    return result


def package_bytes(checkpoint: Checkpoint, test_image: np.ndarray, info: ExportInfo) -> tuple[bytes, Validation]:
    """The package as bytes (for a download), checked as by :func:`export_package`."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "model.zip"
        result = export_package(checkpoint, test_image, info, target)
        return target.read_bytes(), result
__all__ = [
    "ISBI_CITE",
    "UNET_CITE",
    "ExportInfo",
    "PackageError",
    "Validation",
    "build_description",
    "card_text",
    "code_block",
    "export_package",
    "local_file",
    "package_bytes",
    "package_files",
    "validate",
]
