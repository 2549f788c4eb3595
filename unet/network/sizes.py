"""Which input sizes a U-Net takes, and what comes out: plain arithmetic on its depth and padding (no
torch, no import of the config), so :class:`~unet.network.config.TrainConfig` can check a patch size without
building the network."""

from __future__ import annotations

from typing import Protocol


class ModelConfig(Protocol):
    """What the arithmetic needs of a :class:`unet.network.config.ModelConfig`."""

    @property
    def depth(self) -> int: ...

    @property
    def padding(self) -> str: ...


def _trace_sizes(config: ModelConfig, size: int) -> tuple[int, list[str], int]:
    """Follow one spatial dimension through the network.

    Returns the output size, the fatal problems, and how many max-pools see an odd size (allowed, as in
    the brief's 512 → 373, but then the output is not exactly centred on the input, so training patches
    and inference tiles prefer sizes without any: see :func:`valid_input_sizes`)."""
    shrink = 0 if config.padding == "same" else 2
    problems: list[str] = []
    odd_pools = 0
    sizes = [size]
    s = size
    for level in range(config.depth):
        s -= 2 * shrink
        if s < 2:
            problems.append(f"the features shrink to {s} pixels in contracting block {level + 1}")
            return 0, problems, odd_pools
        odd_pools += s % 2
        s //= 2
        sizes.append(s)
    sizes.pop()
    for level in range(config.depth):
        s = s * 2 - (1 if shrink else 0)  # upsample, then the 2×2 conv
        s = min(s, sizes[-1 - level])  # the crop to the skip connection's size
        s -= 2 * shrink
        if s < 1:
            problems.append(f"the features shrink to {s} pixels in expanding block {level + 1}")
            return 0, problems, odd_pools
    return s, problems, odd_pools


def output_size(config: ModelConfig, size: int) -> int:
    """The output length for an input length ``size`` (same for height and width)."""
    return _trace_sizes(config, size)[0]


def check_input_size(config: ModelConfig, size: int) -> int:
    """Raise ``ValueError`` explaining why ``size`` does not fit the network; return the output size."""
    out, problems, _ = _trace_sizes(config, size)
    if problems or out < 1:
        hint = valid_input_sizes(config, max(size - 64, 8), size + 64)
        near = f"; sizes that fit near it: {hint[:8]}" if hint else ""
        raise ValueError(
            f"input size {size} does not fit a depth-{config.depth} {config.padding}-padded U-Net: "
            f"{'; '.join(problems) or 'nothing is left'}{near}"
        )
    if config.padding == "same" and out != size:
        raise ValueError(
            f"with same padding the input size must be divisible by 2**depth = {2**config.depth}, got {size}"
        )
    return out


def valid_input_sizes(config: ModelConfig, lo: int, hi: int) -> list[int]:
    """The input sizes in ``[lo, hi]`` that go through the network cleanly: no max-pool of an odd size,
    so every such size puts the output at the same place relative to the input (training patches and
    inference tiles use these). With same padding, the multiples of ``2**depth``."""
    fits = []
    for n in range(max(lo, 1), hi + 1):
        out, problems, odd_pools = _trace_sizes(config, n)
        if problems or out < 1 or odd_pools:
            continue
        if config.padding == "valid" or out == n:
            fits.append(n)
    return fits

