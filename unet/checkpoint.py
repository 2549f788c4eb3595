"""Checkpoints: a state-dict file (``.pt``, tensors only) and a JSON side file with the configs, step
and metrics. Loading uses ``torch.load(..., weights_only=True)``: no pickled code ever runs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unet.config import ModelConfig
from unet.io import atomic_write
from unet.model import UNet


@dataclass(frozen=True)
class Checkpoint:
    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]  # train config, step, metrics, kind, … (JSON)
    optimizer_state: dict[str, Any] | None = None
    scripted: Any = None  # a TorchScript model imported from another tool (no state dict: it cannot be trained)

    def build_model(self, device: str | torch.device = "cpu") -> UNet:
        if self.scripted is not None:
            from unet.bioimageio import ForeignModel

            return ForeignModel(self.scripted, self.model_config, self.meta.get("package") or {}).to(device).eval()
        model = UNet(self.model_config)
        model.load_state_dict(self.state_dict)
        model.label_offset = tuple(self.meta.get("label_offset") or (0.0, 0.0))  # what test-time flips keep
        return model.to(device).eval()


TORCHSCRIPT_FORMAT = "neuroseg-torchscript-1"


def save_torchscript(path: str | os.PathLike, source: str | os.PathLike, model_config: ModelConfig,
                     meta: dict[str, Any]) -> Path:
    """Keep a TorchScript model of another tool as a checkpoint: the file as it is, and a side file whose
    ``package`` entry says how to feed it and read its output (:class:`unet.bioimageio.ForeignModel`)."""
    path = Path(path)
    atomic_write(path, lambda fh: fh.write(Path(source).read_bytes()))
    side = {"format": TORCHSCRIPT_FORMAT, "model_config": model_config.to_dict(), **meta}
    atomic_write(side_file(path), lambda fh: fh.write(json.dumps(side, indent=2, default=str).encode()))
    return path


def side_file(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(path: str | os.PathLike, model: UNet, *, meta: dict[str, Any] | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write ``path`` (.pt) and its JSON side file, each atomically (JSON last: a checkpoint without its
    side file is incomplete and is not loaded)."""
    path = Path(path)
    payload: dict[str, Any] = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    atomic_write(path, lambda fh: torch.save(payload, fh))
    side = {"format": "neuroseg-unet-1", "model_config": model.config.to_dict(), **(meta or {})}
    atomic_write(side_file(path), lambda fh: fh.write(json.dumps(side, indent=2, default=str).encode()))
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`. Raises ``ValueError`` with the reason
    when the file is missing, damaged or not ours."""
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
    if meta.get("format") == TORCHSCRIPT_FORMAT:  # TorchScript runs no Python of the package's
        try:
            scripted = torch.jit.load(str(path), map_location=map_location)
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
    return Checkpoint(model_config, payload["model"], meta, payload.get("optimizer"))

