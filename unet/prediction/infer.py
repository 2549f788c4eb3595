"""Tiled sliding-window inference for images of any size, slice by slice with bounded memory.

A network maps an input tile of ``T × T`` to an output of ``O × O`` whose top-left sits at ``offset``
inside the tile (``O = T``, ``offset = 0`` with same padding). The image is mirror-padded so that every
output pixel gets a full input context (with valid padding this is the paper's overlap-tile strategy),
output windows overlap and are blended with a weight that falls towards their edges, tiles go through the
network in batches, and optionally through the 8 flips/rotations (test-time augmentation)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from unet.network.device import amp_dtype, native_bf16
from unet.network.model import UNet
from unet.network.sizes import output_size, valid_input_sizes
from unet.training.augment import dihedral_vector
from unet.training.data import normalize_image


def _blend_window(size: int, overlap: int) -> np.ndarray:
    """1-D blending weights: 1 in the middle, a cosine ramp over ``overlap`` pixels at each end, never 0."""
    w = np.ones(size, np.float32)
    ramp = min(overlap, size // 2)
    if ramp > 0:
        t = (np.arange(ramp, dtype=np.float32) + 0.5) / ramp
        w[:ramp] = 0.5 - 0.5 * np.cos(np.pi * t)
        w[size - ramp :] = w[:ramp][::-1]
    return np.maximum(w, 1e-3)


def _starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


def choose_tile(model: UNet, tile: int | None, image_shape: tuple[int, int]) -> int:
    """A clean input tile size near ``tile`` (default 512, or less for small images)."""
    cfg = model.config
    target = tile or 512
    if cfg.padding == "same":
        # no need for a tile larger than the image (rounded up to the network's multiple)
        step = 2**cfg.depth
        target = min(target, max(step, -(-max(image_shape) // step) * step))
    sizes = valid_input_sizes(cfg, max(8, target // 2), target * 2)
    if not sizes:
        raise ValueError(f"no tile size near {target} fits this network ({cfg})")
    return min(sizes, key=lambda n: (abs(n - target), n))


D4 = [(k, flip) for k in range(4) for flip in (False, True)]


def _apply(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def _invert(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, -k, dims=(-2, -1))


def _shift(x: torch.Tensor, dy: float, dx: float) -> torch.Tensor:
    """``x`` (B, C, H, W) moved by a sub-pixel ``(dy, dx)``: bilinear, the edge repeated."""
    h, w = x.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32, device=x.device) - dy
    xs = torch.arange(w, dtype=torch.float32, device=x.device) - dx
    gy, gx = torch.meshgrid(2 * ys / max(h - 1, 1) - 1, 2 * xs / max(w - 1, 1) - 1, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).expand(x.shape[0], h, w, 2)
    return torch.nn.functional.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border",
                                           align_corners=True).to(x.dtype)


def _convention_move(offset: tuple[float, float], k: int, flip: bool) -> tuple[float, float]:
    """What a test-time flip does to a network that learned the labels' drawing convention ``offset``
    (:func:`unet.training.augment.augment_patch`): it draws the flipped tile's borders at ``offset`` there, which
    is ``T⁻¹(offset)`` once flipped back; the returned move puts them back at ``offset``. (A turn with the
    flip is its own inverse; without it, the inverse turns the other way.)"""
    dy, dx = dihedral_vector(offset, k if flip else -k % 4, flip)
    return offset[0] - dy, offset[1] - dx


@torch.inference_mode()
def _forward(model: UNet, batch: torch.Tensor, tta: bool, amp: torch.dtype | None) -> torch.Tensor:
    def run(x: torch.Tensor) -> torch.Tensor:
        if amp is not None:
            with torch.autocast(device_type=x.device.type, dtype=amp):
                return torch.sigmoid(model(x).float())
        return torch.sigmoid(model(x))

    if not tta:
        return run(batch)
    offset = tuple(getattr(model, "label_offset", None) or (0.0, 0.0))
    total = None
    for k, flip in D4:
        out = _invert(run(_apply(batch, k, flip)), k, flip)
        move = _convention_move(offset, k, flip)
        if max(abs(move[0]), abs(move[1])) > 1e-6:
            out = _shift(out, *move)
        total = out if total is None else total + out
    return total / len(D4)


def tile_plan(model: UNet, shape: tuple[int, int], tile: int | None = None, overlap: int | None = None
              ) -> tuple[int, int, int, list[int], list[int]]:
    """How :func:`predict_slice` covers an image of ``shape``: (input tile, output tile, overlap, output
    rows where tiles start, output columns where tiles start)."""
    t = choose_tile(model, tile, shape)
    o = output_size(model.config, t)
    if overlap is None:
        overlap = o // 8 if model.config.padding == "valid" else max(o // 4, 16)
    overlap = min(overlap, o // 2)
    stride = max(o - overlap, 1)
    return t, o, overlap, _starts(shape[0], o, stride), _starts(shape[1], o, stride)


class Interrupted(RuntimeError):
    """``should_stop`` said stop in the middle of a prediction."""


def predict_slice(model: UNet, image: np.ndarray, *, tile: int | None = None, overlap: int | None = None,
                  batch_size: int = 4, tta: bool = False, device: torch.device | str | None = None,
                  amp: torch.dtype | str | None = "auto", normalized: bool = False,
                  should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Neuron probability (float32, the image's shape) for one 2-D image of any size.

    Args:
        model: the network; its mode is restored afterwards.
        image: one 2-D slice (any dtype; normalised here unless ``normalized``).
        tile: the input tile edge in pixels (default: 512, or less for small images).
        overlap: output pixels shared by neighbouring tiles, blended with a cosine window.
        batch_size: tiles per forward pass.
        tta: average the 8 flips/rotations (test-time augmentation).
        device: where to compute (default: where the model is).
        amp: autocast dtype, None for full precision, or "auto": bf16 on a GPU that has it natively (the
            sigmoid in float32), full precision elsewhere.
        normalized: the image is already normalised float32.
        should_stop: asked between batches of tiles; when it says True, :class:`Interrupted` is raised
            (a cancelled run does not wait for a long validation).
    """
    if image.ndim != 2:
        raise ValueError(f"predict_slice expects one 2-D image, got shape {image.shape}")
    return predict_slices(model, [image], tile=tile, overlap=overlap, batch_size=batch_size, tta=tta, device=device,
                          amp=amp, normalized=normalized, should_stop=should_stop)[0]


def predict_slices(model: UNet, images: list[np.ndarray], *, tile: int | None = None, overlap: int | None = None,
                   batch_size: int = 4, tta: bool = False, device: torch.device | str | None = None,
                   amp: torch.dtype | str | None = "auto", normalized: bool = False,
                   should_stop: Callable[[], bool] | None = None) -> list[np.ndarray]:
    """:func:`predict_slice` for several 2-D images at once: their tiles share the batches (a batch of
    ``batch_size`` tiles may hold tiles of several slices, which fills a GPU when a slice is a tile or two), and
    the next batch goes to the device before the last one's probabilities are blended on the host. Each image
    gets the same answer as alone."""
    if any(im.ndim != 2 for im in images):
        raise ValueError(f"predict_slices expects 2-D images, got shapes {[im.shape for im in images]}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if amp == "auto":  # bf16 only where the GPU has it natively (fp16 could overflow a model trained without AMP)
        amp = torch.bfloat16 if device.type == "cuda" and native_bf16(device) else None
    elif isinstance(amp, str):
        amp = amp_dtype(device, amp)
    was_training = model.training
    model.eval()
    try:
        plans, positions = [], []
        for i, image in enumerate(images):
            x = image.astype(np.float32) if normalized else normalize_image(image)
            h, w = x.shape
            t, o, overlap_i, oys, oxs = tile_plan(model, (h, w), tile, overlap)
            off = (t - o) // 2
            # Mirror-pad: `off` before, enough after that every output window and its context fit.
            pad_y = (off, max(oys[-1] + t - off - h, 0))
            pad_x = (off, max(oxs[-1] + t - off - w, 0))
            padded = np.pad(x, (pad_y, pad_x), mode="reflect" if min(h, w) > 1 else "edge")
            acc = np.zeros((max(h, oys[-1] + o), max(w, oxs[-1] + o)), np.float32)
            weight = np.outer(_blend_window(o, overlap_i if len(oys) > 1 else 0),
                              _blend_window(o, overlap_i if len(oxs) > 1 else 0))
            plans.append((padded, acc, np.zeros_like(acc), weight, t, o, h, w))
            positions += [(i, oy, ox) for oy in oys for ox in oxs]
        channels_last = device.type == "cuda"
        # tiles of one input size go together (images of other sizes may need other tiles)
        positions.sort(key=lambda p: plans[p[0]][4])
        chunks, i = [], 0
        while i < len(positions):
            size = plans[positions[i][0]][4]
            chunk = [p for p in positions[i:i + batch_size] if plans[p[0]][4] == size]
            chunks.append(chunk)
            i += len(chunk)
        pending = None  # (chunk, probabilities still on the device): blended while the next batch computes
        for chunk in chunks:
            if should_stop is not None and should_stop():
                raise Interrupted("stopped during a prediction")
            tiles = np.stack([plans[k][0][oy:oy + plans[k][4], ox:ox + plans[k][4]] for k, oy, ox in chunk])[:, None]
            batch = torch.from_numpy(tiles).to(device, non_blocking=True)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            probs = _forward(model, batch, tta, amp)[:, 0].float()
            done = None
            if device.type == "cuda":  # the copy back queued behind the batch: the host blends meanwhile
                host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
                host.copy_(probs, non_blocking=True)
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(device))  # (the copy's device's stream, not GPU 0's)
                probs = host
            if pending is not None:
                _blend(plans, *pending)
            pending = (chunk, probs, done)
        if pending is not None:
            _blend(plans, *pending)
        return [(acc / norm)[:h, :w] for _, acc, norm, _, _, _, h, w in plans]
    finally:
        model.train(was_training)


def _blend(plans, chunk, probs: torch.Tensor, done=None) -> None:
    """Add a batch's probabilities into their slices' sums (``done``: the CUDA event of their copy back)."""
    if done is not None:
        done.synchronize()
    for (k, oy, ox), p in zip(chunk, probs.cpu().numpy(), strict=True):
        _, acc, norm, weight, _, o, _, _ = plans[k]
        acc[oy:oy + o, ox:ox + o] += p * weight
        norm[oy:oy + o, ox:ox + o] += weight


def iter_predict_stack(model: UNet, volume: np.ndarray, slices: list[int] | None = None, *, together: int = 1,
                       **kwargs) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(slice index, probability)`` one slice at a time, so a caller can write each slice
    out and report progress without holding the whole stack of probabilities. ``together`` slices are
    predicted at once, their tiles sharing the batches (:func:`predict_slices`)."""
    if volume.ndim == 2:
        volume = volume[None]
    chosen = list(slices if slices is not None else range(volume.shape[0]))
    for i in range(0, len(chosen), max(1, together)):
        group = chosen[i:i + max(1, together)]
        yield from zip(group, predict_slices(model, [volume[z] for z in group], **kwargs), strict=True)


def predict_stack(model: UNet, volume: np.ndarray, slices: list[int] | None = None,
                  progress: Callable[[int, int], None] | None = None, **kwargs) -> np.ndarray:
    """Probabilities for a ``(Z, Y, X)`` stack (or the chosen slices) as float32 ``(Z', Y, X)``."""
    if volume.ndim == 2:
        volume = volume[None]
    chosen = slices if slices is not None else list(range(volume.shape[0]))
    out = np.empty((len(chosen), *volume.shape[1:]), np.float32)
    for i, (_, prob) in enumerate(iter_predict_stack(model, volume, chosen, **kwargs)):
        out[i] = prob
        if progress is not None:
            progress(i + 1, len(chosen))
    return out
