"""Another tool's TorchScript model where the engine expects a U-Net: how its package is fed and read
(:func:`foreign_plan`) and the model that runs it so (:class:`ForeignModel`). It runs only after
:func:`unet.exchange.torchscript_guard.check` accepted it."""

from __future__ import annotations

from typing import Any

import torch

from unet.exchange.bioimageio import PackageError
from unet.exchange.torchscript_rules import preprocess
from unet.network.config import ModelConfig

PRE_TAKEN = ("zero_mean_unit_variance", "scale_range", "ensure_dtype")
POST_TAKEN = ("sigmoid", "ensure_dtype")


class ForeignModel(torch.nn.Module):
    """A package's TorchScript model where the engine expects a U-Net: its own pre-processing applied to
    each tile (zero mean and unit variance, or percentile scaling: both give the same on the engine's
    normalised slice as on the raw one, being blind to gain and offset), its output turned into the
    logits of the neuron probability (a boundary map is inverted; a map without a sigmoid in its
    post-processing is taken as a probability)."""

    def __init__(self, scripted: torch.jit.ScriptModule, config, package: dict):
        super().__init__()
        self.scripted = scripted
        self.config = config
        self.pre = list(package.get("pre") or [])
        self.sigmoid = bool(package.get("sigmoid"))
        self.invert = bool(package.get("invert"))
        self._anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)  # (the engine reads its device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.scripted(preprocess(x, self.pre))  # (the same steps its import check ran)
        if y.ndim == 4 and y.shape[1] != 1:
            y = y[:, :1]
        if self.sigmoid:
            logits = y
        else:
            p = y.clamp(1e-6, 1 - 1e-6)
            logits = torch.log(p) - torch.log1p(-p)
        return -logits if self.invert else logits


def foreign_plan(description) -> tuple[Any, dict]:
    """How a package of another tool runs here: (a ModelConfig for the engine's tiling, the ``package``
    entry of :class:`ForeignModel`), or :class:`PackageError` with what does not fit."""
    tensor_in, tensor_out = description.inputs[0], description.outputs[0]
    space_in = [a for a in tensor_in.axes if getattr(a, "type", "") == "space"]
    sizes = set()
    for axis in space_in:
        size = axis.size
        if not (hasattr(size, "min") and hasattr(size, "step")):
            raise PackageError(f"its input axis {axis.id} has the fixed size {size}: Neuroseg tiles slices of "
                               "any size and needs sizes of the form min + n·step")
        sizes.add((int(size.min), int(size.step)))
    if len(sizes) != 1:
        raise PackageError(f"its input axes differ in their sizes ({sorted(sizes)}): Neuroseg tiles square")
    lo, step = sizes.pop()
    if step < 2 or step & (step - 1) or step > 64 or lo % step:
        raise PackageError(f"its input sizes (from {lo} in steps of {step}) are not multiples of a power of two "
                           "up to 64, which Neuroseg's tiling needs")
    for axis in (a for a in tensor_out.axes if getattr(a, "type", "") == "space"):
        size, halo = axis.size, int(getattr(axis, "halo", 0) or 0)
        if halo or getattr(size, "offset", 0) or not hasattr(size, "tensor_id"):
            raise PackageError("its output is not the size of its input (a halo or an offset): not taken yet")
    pre = []
    for step_descr in tensor_in.preprocessing:
        name = str(step_descr.id)
        if name not in PRE_TAKEN:
            raise PackageError(f"its pre-processing {name!r} is not one Neuroseg applies "
                               f"({', '.join(PRE_TAKEN)})")
        if name != "ensure_dtype":
            kwargs = step_descr.kwargs.model_dump(exclude_none=True) if hasattr(step_descr, "kwargs") else {}
            if kwargs.get("reference_tensor"):
                raise PackageError("its percentile scaling refers to another tensor: not taken")
            pre.append({"id": name, **{k: v for k, v in kwargs.items() if k in ("eps", "min_percentile",
                                                                                 "max_percentile")}})
    post = [str(p.id) for p in tensor_out.postprocessing]
    if any(p not in POST_TAKEN for p in post):
        raise PackageError(f"its post-processing ({', '.join(post)}) is not one Neuroseg reads (a sigmoid, or "
                           "none: a probability map)")
    words = " ".join([str(tensor_out.id), str(tensor_out.description or "")] + [
        " ".join(map(str, getattr(a, "channel_names", []) or [])) for a in tensor_out.axes]).lower()
    invert = any(w in words for w in ("boundar", "membrane", "contour", "edge"))
    depth = step.bit_length() - 1
    config = ModelConfig(in_channels=1, out_channels=1, depth=depth, initial_features=8, padding="same")
    return config, {"pre": pre, "sigmoid": "sigmoid" in post, "invert": invert, "min": lo, "step": step,
                    "output": str(tensor_out.id)}
