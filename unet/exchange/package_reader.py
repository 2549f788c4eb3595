"""A BioImage.IO package read back without running its Python: its ``rdf.yaml`` read as plain data when small
and free of YAML anchors and aliases (:func:`read_rdf`), a package Neuroseg exported read as a checkpoint
(:func:`load_package`), and its model test run with our own code (:func:`check_test_tensors`)."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import yaml

from unet.exchange.bioimageio import PackageError, model_logits
from unet.exchange.checkpoint import Checkpoint, check_state_dict, state_dict_bytes
from unet.exchange.torchscript_rules import TorchScriptRefused, compare, read_tensor
from unet.network.config import ModelConfig
from unet.training.data import normalize_image

MAX_RDF_BYTES = 1 << 20  # of a package's rdf.yaml (ours are a few kB)
MAX_RDF_NESTING = 64  # collections inside collections in it (ours nest fewer than ten)


def read_rdf(data: bytes, name: str = "rdf.yaml") -> Any:
    """A package's ``rdf.yaml`` read as plain data, or :class:`PackageError` with the reason: at most
    :data:`MAX_RDF_BYTES`, UTF-8, and its YAML tokens scanned before any parser builds anything (the scan
    builds nothing: it is linear in the text): no anchor or alias (``&a`` / ``*a``, which let a few kB stand
    for billions of values, "billion laughs"), no collection nested more than :data:`MAX_RDF_NESTING` deep.
    Only then ``yaml.safe_load`` (and later ``bioimageio.spec``) reads it."""
    if len(data) > MAX_RDF_BYTES:
        raise PackageError(f"its {name} has {len(data):,} bytes (at most {MAX_RDF_BYTES:,} are read)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PackageError(f"its {name} is not UTF-8 text ({exc})") from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    opening = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
               yaml.FlowSequenceStartToken)
    closing = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)
    try:
        depth = 0
        for token in yaml.scan(text, Loader=loader):
            if isinstance(token, yaml.AliasToken | yaml.AnchorToken):
                kind = "alias" if isinstance(token, yaml.AliasToken) else "anchor"
                line = getattr(getattr(token, "start_mark", None), "line", -1) + 1
                raise PackageError(f"its {name} uses a YAML {kind}{f' (line {line})' if line > 0 else ''}: Neuroseg "
                                   "reads no anchors or aliases (a few of them can stand for billions of values)")
            depth += isinstance(token, opening) - isinstance(token, closing)
            if depth > MAX_RDF_NESTING:
                raise PackageError(f"its {name} nests more than {MAX_RDF_NESTING} levels deep")
        return yaml.load(text, Loader=loader)  # (a safe loader: plain data only)
    except yaml.YAMLError as exc:
        raise PackageError(f"its {name} cannot be read: {exc}") from None
    except RecursionError:
        raise PackageError(f"its {name} nests too deep to be read") from None


def _normal(name: str) -> tuple[str, ...]:
    """A zip member's path as unpacked ("./a/b" and "a//b" are "a/b")."""
    return PurePosixPath(name.replace("\\", "/")).parts


def _weights_bytes(archive: zipfile.ZipFile, name: str, config: ModelConfig, package: str) -> bytes:
    """The weights member, read only when it, and the records in it (PyTorch's format is a zip of its own,
    which ``torch.load`` inflates), unpack to no more than a state dict of ``config``'s network can hold."""
    limit = state_dict_bytes(config)
    size = archive.getinfo(name).file_size
    if size > limit:
        raise PackageError(f"{package}: its weights have {size:,} bytes, more than its network's {limit:,}")
    data = archive.read(name)
    try:
        inner = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:  # (PyTorch's legacy format: no records to inflate)
        return data
    with inner:
        unpacked = sum(info.file_size for info in inner.infolist())
    if unpacked > limit:
        raise PackageError(f"{package}: its weights unpack to {unpacked:,} bytes, more than its network's {limit:,}")
    return data


def load_package(path: str | Path) -> Checkpoint:
    """A Neuroseg checkpoint from a BioImage.IO package that Neuroseg exported (its ``config.neuroseg``
    and its state-dict weights, loaded with ``weights_only=True``): the same network, bit for bit.
    :class:`PackageError` says why another package is not taken (this reads our own packages; the app's
    import, which also takes other TorchScript models, builds on it)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if len(names) != len({_normal(n) for n in names}):  # (what a reader unpacking it sees would differ)
                raise PackageError(f"{path.name} has two members for one file")
            # the shallowest rdf.yaml, as the app's import unpacks and checks it
            rdf_name = min((n for n in names if _normal(n)[-1:] == ("rdf.yaml",)),
                           key=lambda n: (len(_normal(n)), n), default="")
            if not rdf_name:
                raise PackageError(f"{path.name} is not a BioImage.IO package (no rdf.yaml in it)")
            if sum(len(_normal(n)) == len(_normal(rdf_name)) and _normal(n)[-1] == "rdf.yaml" for n in names) > 1:
                raise PackageError(f"{path.name} holds two descriptions side by side: one package is one model")
            if archive.getinfo(rdf_name).file_size > MAX_RDF_BYTES:
                raise PackageError(f"{path.name}: its rdf.yaml has {archive.getinfo(rdf_name).file_size:,} bytes "
                                   f"(at most {MAX_RDF_BYTES:,} are read)")
            rdf = read_rdf(archive.read(rdf_name))
            ours = ((rdf.get("config") or {}).get("neuroseg") or {}) if isinstance(rdf, dict) else {}
            weights = ((rdf.get("weights") or {}).get("pytorch_state_dict") or {}).get("source", "")
            if not ours or not weights:
                raise PackageError(f"{path.name} was not exported by Neuroseg (no config.neuroseg with "
                                   "pytorch_state_dict weights)")
            # (a file a package names lies beside its rdf.yaml: a package zipped with its folder has one more level)
            member = {_normal(n): n for n in names}.get(_normal(rdf_name)[:-1] + _normal(str(weights)))
            if member is None or not weights or ".." in _normal(str(weights)):
                raise PackageError(f"{path.name} names weights {weights!r} that are not in it")
            weights = member
            try:  # (before the weights are read: a config of a huge network is refused at once)
                if not isinstance(ours, dict) or not isinstance(ours.get("model_config"), dict):
                    raise TypeError("config.neuroseg.model_config is not a mapping")
                config = ModelConfig.from_dict(ours["model_config"])
            except (ValueError, TypeError) as exc:
                raise PackageError(f"{path.name}: its model config is not one Neuroseg builds ({exc})") from None
            state = torch.load(io.BytesIO(_weights_bytes(archive, weights, config, path.name)), map_location="cpu",
                               weights_only=True)
    except zipfile.BadZipFile as exc:
        raise PackageError(f"{path.name} is not a zip file: {exc}") from None
    except pickle.UnpicklingError as exc:  # (weights_only refused what the pickle asks for: nothing ran)
        raise PackageError(f"{path.name}: its weights are not plain tensors ({exc})") from None
    except (OSError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
        if isinstance(exc, PackageError):
            raise
        raise PackageError(f"{path.name} could not be read: {exc}") from None
    try:  # keys, shapes and size against the architecture built on the meta device: nothing allocated yet
        check_state_dict(config, state)
    except ValueError as exc:
        raise PackageError(f"{path.name}: {exc}") from None
    meta = dict(ours["meta"]) if isinstance(ours.get("meta"), dict) else {}
    meta["package"] = {"name": str(rdf.get("name", ""))[:200], "file": path.name}
    checkpoint = Checkpoint(config, state, meta)
    try:
        checkpoint.build_model("cpu")  # the weights fit the architecture, or the reason
    except RuntimeError as exc:
        raise PackageError(f"{path.name}: its weights do not fit its architecture: {exc}") from None
    return checkpoint


MAX_TEST_PIXELS = 1024 * 1024  # of a test input our model is run on in the server (an export writes ~256²)


def check_test_tensors(checkpoint: Checkpoint, test_input: Path, test_output: Path) -> float:
    """The model test of a package Neuroseg exported, with our own code: the checkpoint read from it (our
    architecture, its state dict) predicts its test input as an export computed its test output (zero mean
    and unit variance, the network, a sigmoid), within bioimageio.core's default tolerances. Returns the
    largest difference; :class:`PackageError` ("it fails its own model test: …") otherwise. This replaces
    ``bioimageio.core.test_model``, which would import the package's architecture file."""
    try:
        raw = read_tensor(test_input, max_elements=MAX_TEST_PIXELS, what="test input")
        expected = read_tensor(test_output, max_elements=MAX_TEST_PIXELS, what="test output")
        if raw.ndim != 4 or raw.shape[:2] != (1, 1):
            raise PackageError(f"it fails its own model test: its test input has the shape {list(raw.shape)}, "
                               "not one image of one channel")
        with np.errstate(over="ignore"):
            probability = 1 / (1 + np.exp(-model_logits(checkpoint.build_model("cpu"), normalize_image(raw[0, 0]))))
        return compare(probability, expected)
    except TorchScriptRefused as exc:
        raise PackageError(str(exc)) from None
    except (RuntimeError, ValueError) as exc:
        if isinstance(exc, PackageError):
            raise
        raise PackageError(f"it fails its own model test: {str(exc).splitlines()[0][:300]}") from None
