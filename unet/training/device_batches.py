"""Training batches made where the network runs (issue 30): the slices are kept on the device, and patches are
cut, turned, deformed and coloured there with torch ops, in one pass per batch, without reading anything back
to the host. The same code runs on a CPU (and is tested there); :class:`unet.training.data.PatchSampler` (NumPy
and SciPy in the host's memory) stays as the reference it is compared with: the flips exactly, the deformation
statistically (``tests/engine/test_device_batches.py``).

One batch is a few gathers: each output pixel of a patch asks for a point of its padded slice,

    source = window origin + dihedral⁻¹(pixel + elastic displacement(pixel) − label move)

(the label move for the image only: see :func:`unet.training.augment.augment_patch`, whose order of steps this
follows), read bilinearly for the image and the weights and by the nearest pixel for the target. A flip or a
quarter turn without a deformation reads whole pixels, so it is exact. Slices are padded by the patch size,
reflected, as the reference pads them; a deformation reaches into the real surroundings of the window where
the reference reflects the window's own edge.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from unet.network.config import AugmentConfig
from unet.training.augment import dihedral_vector
from unet.training.data import PatchSampler
from unet.training.labels import IGNORE


class DeviceSampler:
    """Draws batches of augmented patches on ``device``, as :class:`~unet.training.data.PatchSampler` does
    (the same arguments, the same windows around labelled pixels, the same augmentations), and returns torch
    tensors there: ``x (B, 1, in, in)`` float32, ``y (B, 1, out, out)`` uint8 and the weights or None.

    ``windows``: where windows may be placed (default: where the targets are labelled); ``p``: the chance of
    each slice (default: its share of those pixels), which may be set afterwards."""

    def __init__(self, images: list[np.ndarray], targets: list[np.ndarray], in_size: int, out_size: int,
                 augment: AugmentConfig, *, device: str | torch.device = "cpu", seed: int = 0,
                 weights: list[np.ndarray] | None = None, label_offset: tuple[float, float] = (0.0, 0.0),
                 windows: list[np.ndarray] | None = None):
        self.device = torch.device(device)
        self.in_size, self.out_size = in_size, out_size
        self.offset = (in_size - out_size) // 2
        self.augment, self.label_offset = augment, (float(label_offset[0]), float(label_offset[1]))
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        pad = self.pad = in_size
        shapes = [t.shape for t in targets]
        height, width = max(s[0] for s in shapes) + 2 * pad, max(s[1] for s in shapes) + 2 * pad
        image_stack = np.zeros((len(images), height, width), np.float32)
        target_stack = np.full((len(images), height, width), IGNORE, np.uint8)
        weight_stack = np.zeros((len(images), height, width), np.float32) if weights is not None else None
        for k, (im, t) in enumerate(zip(images, targets, strict=True)):
            h, w = t.shape[0] + 2 * pad, t.shape[1] + 2 * pad
            image_stack[k, :h, :w] = np.pad(im, pad, mode="reflect" if min(im.shape) > 1 else "edge")
            target_stack[k, :h, :w] = np.pad(t, pad, constant_values=IGNORE)
            if weight_stack is not None:
                weight_stack[k, :h, :w] = np.pad(weights[k], pad, constant_values=0)
        self.stack_shape = (height, width)
        self.images = torch.from_numpy(image_stack).to(self.device).reshape(-1)
        self.targets = torch.from_numpy(target_stack).to(self.device).reshape(-1)
        self.weights = torch.from_numpy(weight_stack).to(self.device).reshape(-1) if weight_stack is not None else None
        # where windows go: a slice labelled everywhere needs no list of its pixels (its index is the pixel)
        marks = windows if windows is not None else [t != IGNORE for t in targets]
        flat = [np.flatnonzero(np.asarray(m, bool).ravel()) for m in marks]
        self.counts = np.array([len(f) for f in flat], np.int64)
        if self.counts.sum() == 0:
            raise ValueError("no labelled pixels to sample from")
        dense = np.array([len(f) == s[0] * s[1] for f, s in zip(flat, shapes, strict=True)])
        sparse = [f if not d else f[:0] for f, d in zip(flat, dense, strict=True)]
        starts = np.concatenate([[0], np.cumsum([len(s) for s in sparse])[:-1]]).astype(np.int64)
        listed = np.concatenate(sparse) if any(len(s) for s in sparse) else np.zeros(1, np.int64)
        self._listed = torch.from_numpy(listed.astype(np.int64)).to(self.device)
        self._starts = torch.from_numpy(starts).to(self.device)
        self._dense = torch.from_numpy(dense).to(self.device)
        self._counts = torch.from_numpy(self.counts).to(self.device)
        self._shapes = torch.tensor(shapes, dtype=torch.int64, device=self.device)
        self._height_width = [(s[0], s[1]) for s in shapes]
        # the label move of each dihedral (turn t, flip f → column 2t + f), made once: no copy to the device
        # in sample() (a copy from the host would wait for the device)
        off = self.label_offset
        self._moves = torch.tensor([[dihedral_vector(off, t, f)[i] - off[i] for t in range(4) for f in (False, True)]
                                    for i in (0, 1)], dtype=torch.float32, device=self.device)
        self.p = self.counts / self.counts.sum()

    @property
    def p(self) -> np.ndarray:
        return self._p_host

    @p.setter
    def p(self, value: np.ndarray) -> None:
        value = np.asarray(value, np.float64)
        if (value.shape != self.counts.shape or not np.isfinite(value).all() or (value < 0).any()
                or value.sum() <= 0 or (value[self.counts == 0] > 0).any()):
            raise ValueError(f"p must give each of the {len(self.counts)} slices a chance ≥ 0 (0 where a slice has no "
                             f"pixel to place a window at), not {value}")
        self._p_host = value / value.sum()
        self._p = torch.as_tensor(self._p_host, dtype=torch.float32, device=self.device)

    def target(self, k: int) -> np.ndarray:
        """Slice k's targets as they are sampled now (its own shape, on the host)."""
        h, w = self._height_width[k]
        view = self.targets.view(-1, *self.stack_shape)[k, self.pad:self.pad + h, self.pad:self.pad + w]
        return view.cpu().numpy()

    def set_target(self, k: int, target: np.ndarray) -> None:
        """Slice k's targets from now on (a teacher's new answer on the unpainted pixels): same shape, same
        windows."""
        h, w = self._height_width[k]
        if target.shape != (h, w):
            raise ValueError(f"slice {k} is {h} × {w}, the new targets {target.shape}")
        view = self.targets.view(-1, *self.stack_shape)
        view[k, self.pad:self.pad + h, self.pad:self.pad + w] = torch.from_numpy(
            np.ascontiguousarray(target, np.uint8)).to(self.device)

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self.device)

    def windows(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(slice, top, left)`` of each patch's input window in its padded slice, as PatchSampler places them."""
        o = self.out_size
        k = torch.multinomial(self._p, batch_size, replacement=True, generator=self.generator)
        count = self._counts[k]
        local = torch.minimum((torch.rand(batch_size, generator=self.generator, device=self.device,
                                          dtype=torch.float64) * count).long(), count - 1)  # (float64: > 2²⁴ pixels)
        index = (self._starts[k] + local).clamp(0, self._listed.numel() - 1)
        flat = torch.where(self._dense[k], local, self._listed[index])
        h, w = self._shapes[k, 0], self._shapes[k, 1]
        y, x = flat // w, flat % w
        oy = y - (self._rand(batch_size) * o).long()
        ox = x - (self._rand(batch_size) * o).long()
        oy = torch.where(h >= o, torch.minimum(oy.clamp(min=0), h - o), oy)
        ox = torch.where(w >= o, torch.minimum(ox.clamp(min=0), w - o), ox)
        return k, oy - self.offset + self.pad, ox - self.offset + self.pad

    def displacement(self, batch_size: int) -> torch.Tensor:
        """The elastic displacement of each patch, ``(B, 2, in, in)`` in pixels (zero where not drawn): normal
        steps of ``elastic_sigma`` on a coarse grid, bicubically interpolated (as
        :func:`unet.training.augment.elastic_fields`)."""
        a, n = self.augment, self.in_size
        if not (a.elastic_p and a.elastic_sigma > 0):
            return torch.zeros((batch_size, 2, n, n), device=self.device)
        coarse = torch.randn((batch_size, 2, a.elastic_grid, a.elastic_grid), generator=self.generator,
                             device=self.device) * a.elastic_sigma
        field = F.interpolate(coarse, size=(n, n), mode="bicubic", align_corners=False)
        drawn = (self._rand(batch_size) < a.elastic_p).float()
        return field * drawn[:, None, None, None]

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        n, o, off = self.in_size, self.out_size, self.offset
        a = self.augment
        k, top, left = self.windows(batch_size)
        if a.flips:
            turns = torch.randint(4, (batch_size,), generator=self.generator, device=self.device)
            flip = torch.randint(2, (batch_size,), generator=self.generator, device=self.device).bool()
        else:
            turns = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
            flip = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        d = self.displacement(batch_size)
        grid = torch.arange(n, dtype=torch.float32, device=self.device)
        qy = grid[None, :, None] + d[:, 0]
        qx = grid[None, None, :] + d[:, 1]
        x = self._read_image(k, top, left, *self._move(qy, qx, turns, flip))
        ty, tx = _undo_dihedral(qy, qx, turns, flip, n)
        yi, xi = self._clamp(k, top[:, None, None] + ty.round().long(), left[:, None, None] + tx.round().long())
        target = self.targets[self._flat(k, yi, xi)][:, off:off + o, off:off + o]
        w = None
        if self.weights is not None:
            w = _bilinear(self.weights, self, k, top[:, None, None] + ty, left[:, None, None] + tx)
            w = w[:, None, off:off + o, off:off + o].contiguous()
        x = self._colour(x)
        return x[:, None], target[:, None].contiguous(), w

    def _move(self, qy, qx, turns, flip):
        """Where the image is read for each output pixel: the label move of each patch's dihedral taken off
        (the labels stay where the annotators draw them), then the dihedral undone."""
        n = self.in_size
        if self.label_offset != (0.0, 0.0):
            which = turns * 2 + flip.long()
            qy = qy - self._moves[0, which][:, None, None]
            qx = qx - self._moves[1, which][:, None, None]
        return _undo_dihedral(qy, qx, turns, flip, n)

    def _read_image(self, k, top, left, sy, sx) -> torch.Tensor:
        return _bilinear(self.images, self, k, top[:, None, None] + sy, left[:, None, None] + sx)

    def _clamp(self, k, yi, xi):
        h = (self._shapes[k, 0] + 2 * self.pad - 1)[:, None, None]
        w = (self._shapes[k, 1] + 2 * self.pad - 1)[:, None, None]
        return torch.minimum(yi.clamp(min=0), h), torch.minimum(xi.clamp(min=0), w)

    def _flat(self, k, yi, xi) -> torch.Tensor:
        height, width = self.stack_shape
        return (k[:, None, None] * height + yi) * width + xi

    def _colour(self, x: torch.Tensor) -> torch.Tensor:
        """Intensity (contrast, brightness, gamma) and noise, each drawn per patch with its chance, as
        :func:`unet.training.augment.intensity` and the noise of :func:`~unet.training.augment.augment_patch`."""
        a, b = self.augment, x.shape[0]
        if a.intensity_p:
            lo = x.amin(dim=(1, 2), keepdim=True)
            hi = x.amax(dim=(1, 2), keepdim=True)
            span = (hi - lo).clamp(min=1e-12)
            gamma = 0.7 + 0.8 * self._rand(b)[:, None, None]
            toned = torch.where(hi > lo, ((x - lo) / span).clamp(min=0) ** gamma * (hi - lo) + lo, x)
            toned = toned * (0.7 + 0.6 * self._rand(b)[:, None, None]) + (self._rand(b)[:, None, None] * 0.6 - 0.3)
            x = torch.where((self._rand(b) < a.intensity_p)[:, None, None], toned, x)
        if a.noise_p and a.noise_std > 0:
            noise = torch.randn(x.shape, generator=self.generator, device=self.device) * a.noise_std
            x = x + noise * (self._rand(b) < a.noise_p).float()[:, None, None]
        return x


def _undo_dihedral(qy: torch.Tensor, qx: torch.Tensor, turns: torch.Tensor, flip: torch.Tensor, n: int):
    """Where pixel (qy, qx) of a patch turned by :func:`unet.training.augment.dihedral` ``(turns, flip)`` was in
    the window: the flip undone, then each quarter turn (``np.rot90``: out[i, j] = in[j, n − 1 − i])."""
    f = flip[:, None, None]
    qx = torch.where(f, (n - 1) - qx, qx)
    for t in range(3):
        turn = (turns > t)[:, None, None]
        qy, qx = torch.where(turn, qx, qy), torch.where(turn, (n - 1) - qy, qx)
    return qy, qx


def _bilinear(values: torch.Tensor, sampler: DeviceSampler, k, y, x) -> torch.Tensor:
    """``values`` (a flattened padded stack) read at float points (y, x) of slice k, bilinearly; a whole pixel
    reads exactly that pixel."""
    y0, x0 = y.floor(), x.floor()
    fy, fx = y - y0, x - x0
    y0, x0 = y0.long(), x0.long()
    out = 0
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yi, xi = sampler._clamp(k, y0 + dy, x0 + dx)
            out = out + values[sampler._flat(k, yi, xi)] * (wy * wx)
    return out


def make_sampler(config, device: torch.device, rng: np.random.Generator, images: list[np.ndarray],
                 targets: list[np.ndarray], out_size: int, weights: list[np.ndarray] | None = None,
                 label_offset: tuple[float, float] = (0.0, 0.0), windows: list[np.ndarray] | None = None):
    """The sampler a :class:`~unet.network.config.TrainConfig` asks for on ``device``: a :class:`DeviceSampler`
    there (seeded from ``rng``), or the host's :class:`~unet.training.data.PatchSampler` (drawing from ``rng``)."""
    if on_device(config.pipeline, device):
        return DeviceSampler(images, targets, config.patch_size, out_size, config.augment, device=device,
                             seed=int(rng.integers(2**62)), weights=weights, label_offset=label_offset,
                             windows=windows)
    return PatchSampler(images, targets, config.patch_size, out_size, config.augment, rng, weights, label_offset,
                        windows)


def on_device(pipeline: str, device: torch.device) -> bool:
    """Whether batches are made on ``device``: ``auto`` makes them there on a GPU, on the host on a CPU."""
    return pipeline == "device" or (pipeline == "auto" and device.type in ("cuda", "mps"))
