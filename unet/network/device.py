"""Choosing the device and the precision."""

from __future__ import annotations

import contextlib

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU. A named device that is not there raises a clear error
    instead of silently training somewhere else."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {requested!r} was asked for, but no CUDA GPU is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {requested!r}: only {torch.cuda.device_count()} GPU(s) here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("device 'mps' was asked for, but Apple MPS is not available here")
    return device


def describe_device(device: torch.device | None = None) -> str:
    """A short human name: the GPU's name, or ``CPU only (N threads)``."""
    device = device or pick_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (MPS)"
    threads = torch.get_num_threads()
    return f"CPU only ({threads} thread{'s' if threads != 1 else ''})"


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, or None for full precision. AMP is only used on
    CUDA: on CPUs bf16 autocast was measured 15–25× slower (see bench/speed.py)."""
    if amp == "off" or device.type != "cuda":
        return None
    if amp == "bf16" or (amp == "auto" and native_bf16(device)):
        return torch.bfloat16
    return torch.float16


def native_bf16(device: torch.device) -> bool:
    """Whether this GPU computes in bf16 natively (Ampere, compute capability 8, and later). CUDA-only.
    ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated (a T4 or V100: slow, or
    without cuDNN kernels), and asks the current GPU, not this one."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
