"""Checkpoints: a state-dict file (``.pt``, tensors only) and a JSON side file with the configs, step
and metrics. Loading uses ``torch.load(..., weights_only=True)``: no pickled code ever runs.

A TorchScript checkpoint (a model imported from another tool, :func:`save_torchscript`) is code: before
the server loads one, :func:`load_checkpoint` has :func:`unet.exchange.torchscript_guard.check` scan its archive
and hold its operators against the allowlist in a sandboxed child process, once per file: the verdict is
kept beside it (``<file>.checked.json``: the file's sha256 and the check's fingerprint) and the bytes
loaded are the bytes hashed. A model imported before that check existed is checked on its first load the
same way; one that fails is refused with the reason. What remains: an accepted model runs unbounded in
the process that loaded it (the prediction worker) on real slices. Our own state-dict checkpoints are not
TorchScript and load as before.

:func:`check_state_dict` holds a state dict against a config's architecture built on the ``meta`` device
(its keys, shapes and parameter count) before anything is allocated: for weights that came from outside
(:func:`unet.exchange.package_reader.load_package`)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unet.exchange import torchscript_guard as guard
from unet.exchange.torchscript_rules import TorchScriptRefused
from unet.exchange.writing import atomic_write
from unet.network.config import ModelConfig
from unet.network.model import UNet


@dataclass(frozen=True)
class Checkpoint:
    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]  # train config, step, metrics, kind, … (JSON)
    optimizer_state: dict[str, Any] | None = None
    scripted: Any = None  # a TorchScript model imported from another tool (no state dict: it cannot be trained)

    def build_model(self, device: str | torch.device = "cpu") -> UNet:
        if self.scripted is not None:
            from unet.exchange.foreign_model import ForeignModel  # a cycle: foreign_model → bioimageio → checkpoint

            return ForeignModel(self.scripted, self.model_config, self.meta.get("package") or {}).to(device).eval()
        model = UNet(self.model_config)
        model.load_state_dict(self.state_dict)
        model.label_offset = tuple(self.meta.get("label_offset") or (0.0, 0.0))  # what test-time flips keep
        return model.to(device).eval()


TORCHSCRIPT_FORMAT = "neuroseg-torchscript-1"


def save_torchscript(path: str | os.PathLike, source: str | os.PathLike, model_config: ModelConfig,
                     meta: dict[str, Any]) -> Path:
    """Keep a TorchScript model of another tool as a checkpoint: the file as it is, and a side file whose
    ``package`` entry says how to feed it and read its output (:class:`unet.exchange.foreign_model.ForeignModel`)."""
    path = Path(path)
    atomic_write(path, lambda fh: fh.write(Path(source).read_bytes()))
    side = {**without_reserved(meta), "format": TORCHSCRIPT_FORMAT, "model_config": model_config.to_dict()}
    atomic_write(side_file(path), lambda fh: fh.write(json.dumps(side, indent=2, default=str).encode()))
    return path


RESERVED_KEYS = ("format", "model_config")  # of a side file: what the loader reads to decide what to build


def without_reserved(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` less the side file's :data:`RESERVED_KEYS`: a meta that came from outside (a package's
    ``config.neuroseg.meta``) never says what the loader builds (the savers also write them after it)."""
    return {k: v for k, v in meta.items() if k not in RESERVED_KEYS}


def side_file(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


MAX_PARAMETERS = 200_000_000  # of weights from outside (the full-width gpu-full network has about 31 M)


def state_dict_bytes(model_config: ModelConfig, *, max_parameters: int = MAX_PARAMETERS) -> int:
    """The most bytes a stored state dict of ``model_config``'s network can take: its tensors in float64, plus
    1 MiB for the names and the pickle (the network built on the ``meta`` device; at most ``max_parameters``
    parameters are counted, a config of a larger one is refused when its weights are checked)."""
    with torch.device("meta"):
        reference = UNet(model_config)
    count = min(sum(t.numel() for t in reference.state_dict().values()), max_parameters)
    return 8 * count + (1 << 20)


def check_state_dict(model_config: ModelConfig, state_dict: Any, *, max_parameters: int = MAX_PARAMETERS) -> None:
    """``ValueError`` unless ``state_dict`` has exactly the keys and tensor shapes of the U-Net of
    ``model_config`` and that network has at most ``max_parameters`` parameters; the network is built on the
    ``meta`` device (shapes only: nothing is allocated), so a config of a huge network costs nothing here."""
    with torch.device("meta"):
        reference = UNet(model_config)
    count = sum(p.numel() for p in reference.parameters())
    if count > max_parameters:
        raise ValueError(f"its network would have {count:,} parameters (at most {max_parameters:,} are loaded)")
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError("its weights are not a state dict of tensors")
    missing, extra = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise ValueError(f"its weights do not fit its architecture: {len(missing)} missing "
                         f"({', '.join(missing[:3])}), {len(extra)} unexpected ({', '.join(map(str, extra[:3]))})")
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != shape:
            raise ValueError(f"its weights do not fit its architecture: {key} has the shape "
                             f"{list(state_dict[key].shape)}, the architecture {list(shape)}")


def checked_file(path: str | os.PathLike) -> Path:
    """Where the verdict of :mod:`unet.exchange.torchscript_guard` on a stored TorchScript checkpoint is kept."""
    path = Path(path)
    return path.with_name(path.name + ".checked.json")


def record_torchscript_check(path: str | os.PathLike, sha256: str, ops: list[str] | tuple[str, ...] = ()) -> None:
    """Keep the guard's acceptance of the TorchScript file at ``path`` (whose sha256 is ``sha256``) beside it,
    so that :func:`load_checkpoint` does not check it again. Best effort: a store that cannot be written
    means the next load checks again."""
    kept = {"sha256": sha256, "check": guard.fingerprint(), "ops": list(ops)}
    with contextlib.suppress(OSError):
        atomic_write(checked_file(path), lambda fh: fh.write(json.dumps(kept, indent=2).encode()))


def _checked_torchscript(path: Path) -> bytes:
    """The bytes of a stored TorchScript checkpoint that :func:`unet.exchange.torchscript_guard.check` accepted (its
    archive and its operators; the kept verdict when it is for these bytes and this check), or
    ``ValueError`` with the reason."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        kept = json.loads(checked_file(path).read_text())
    except (OSError, ValueError):
        kept = None
    if isinstance(kept, dict) and kept.get("sha256") == digest and kept.get("check") == guard.fingerprint():
        return data
    try:
        verdict = guard.check(path)
    except TorchScriptRefused as exc:
        raise ValueError(f"{path.name}: this TorchScript model is not loaded: {exc}") from None
    if verdict.sha256 != digest:
        raise ValueError(f"{path.name}: the TorchScript file changed while it was checked; it is not loaded")
    record_torchscript_check(path, digest, verdict.ops)
    return data


def save_checkpoint(path: str | os.PathLike, model: UNet, *, meta: dict[str, Any] | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write ``path`` (.pt) and its JSON side file, each atomically (JSON last: a checkpoint without its
    side file is incomplete and is not loaded)."""
    path = Path(path)
    payload: dict[str, Any] = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    atomic_write(path, lambda fh: torch.save(payload, fh))
    side = {**without_reserved(meta or {}), "format": "neuroseg-unet-1", "model_config": model.config.to_dict()}
    atomic_write(side_file(path), lambda fh: fh.write(json.dumps(side, indent=2, default=str).encode()))
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` (or :func:`save_torchscript`: loaded only after
    the guard accepted it, see the module). Raises ``ValueError`` with the reason when the file is missing,
    damaged, not ours, or a TorchScript model the guard refuses."""
    path = Path(path)
    side = side_file(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    if not side.is_file():
        raise ValueError(f"checkpoint {path.name} has no config file {side.name} beside it")
    try:
        meta = json.loads(side.read_text())
        model_config = ModelConfig.from_dict(meta.pop("model_config"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{side.name}: not a valid Neuroseg checkpoint config ({exc})") from exc
    if meta.get("format") == TORCHSCRIPT_FORMAT:  # code: checked in a sandbox first (once per file)
        data = _checked_torchscript(path)
        try:
            scripted = torch.jit.load(io.BytesIO(data), map_location=map_location)  # (the bytes checked)
        except Exception as exc:
            raise ValueError(f"{path.name}: the TorchScript model could not be read ({type(exc).__name__}: {exc})"
                             ) from exc
        return Checkpoint(model_config, {}, meta, None, scripted.eval())
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path.name}: the checkpoint could not be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or "model" not in payload:
        raise ValueError(f"{path.name}: not a Neuroseg checkpoint (no model weights inside)")
    try:  # its side file's network (size, keys, shapes) on the meta device before anything builds it for real
        check_state_dict(model_config, payload["model"])
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from None
    return Checkpoint(model_config, payload["model"], meta, payload.get("optimizer"))

