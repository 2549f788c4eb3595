"""How big a stack may be on this server (:class:`Limits`, from the environment), checked from a stack's
header or metadata before a byte of its pixels is read (:mod:`unet.exchange.io`, the store's readers)."""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Refuse stacks whose pixels would need more memory than this (override per call).
DEFAULT_MAX_BYTES = 16 * 1024**3


@dataclass(frozen=True)
class Limits:
    """What a stack may declare before a byte of its pixels is read, checked from its header (TIFF) or its
    metadata (zarr, N5, OME-Zarr). Why: a file of a few kilobytes can declare terabytes, and a server that
    believes it fills its memory for every visitor. Each limit is set by the environment (a lab server
    with large slices raises them), else its default:

    - ``NEUROSEG_MAX_STACK_BYTES`` (16 GiB): the pixels of a stack stored in the data directory;
    - ``NEUROSEG_MAX_SLICE_PIXELS`` (8192 × 8192): Y × X of one slice, which pages and training read and
      whose masks are kept whole (an 8192² float32 slice is 256 MiB);
    - ``NEUROSEG_MAX_LINKED_SLICE_PIXELS`` (4096 × 4096): Y × X of a stack linked where it lies; it has no
      overview pyramid, so every page visit reads a whole slice (at most 64 MiB as float32);
    - ``NEUROSEG_MAX_CHUNK_BYTES`` (64 MiB): one chunk of a zarr or N5 array, decompressed whole to read
      even one of its pixels;
    - ``NEUROSEG_MAX_SLICES`` (100,000): Z of a stack, whose slices pages list one by one (an 8 KB zarr
      can declare 10¹² of them).
    """

    stack_bytes: int = DEFAULT_MAX_BYTES
    slice_pixels: int = 8192 * 8192
    linked_slice_pixels: int = 4096 * 4096
    chunk_bytes: int = 64 * 1024**2
    slices: int = 100_000

    @classmethod
    def from_env(cls) -> Limits:
        """The limits this process runs with (read on every call: an admin's change needs no new code)."""
        names = {"stack_bytes": "NEUROSEG_MAX_STACK_BYTES", "slice_pixels": "NEUROSEG_MAX_SLICE_PIXELS",
                 "linked_slice_pixels": "NEUROSEG_MAX_LINKED_SLICE_PIXELS", "chunk_bytes": "NEUROSEG_MAX_CHUNK_BYTES",
                 "slices": "NEUROSEG_MAX_SLICES"}
        values = {}
        for field, env in names.items():
            raw = os.environ.get(env, "").strip().replace("_", "")
            if raw:
                try:
                    values[field] = max(1, int(raw))
                except ValueError:
                    raise ValueError(f"${env} must be a whole number, not {raw!r}") from None
        return cls(**values)
