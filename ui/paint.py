"""Painting masks in the browser, without the browser: the pictures the Annotate page shows (slice with
its mask as a translucent overlay, cropped and scaled for zoom) and the merge of the strokes the canvas
returns back into a mask.

A mask holds the classes of :mod:`unet.training.labels` (0 membrane, 1 neuron, 2 unlabelled). The canvas returns
the strokes alone as an RGBA image in display pixels; each class is painted in its own colour, and a
display pixel counts as painted when its alpha is at least half the stroke's. An image pixel covered by
several display pixels (zoom) takes the class that covers most of them, and changes only when at least
half of them are painted. Pixels nobody painted keep their value exactly."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from unet.training.labels import IGNORE, MEMBRANE, NEURON

# The colour of each class, on the overlay and on the brush (RGB). Far apart so that a blend of two
# overlapping translucent strokes is still nearest to the colour of the one on top.
PALETTE: dict[int, tuple[int, int, int]] = {
    NEURON: (0, 200, 255),
    MEMBRANE: (255, 40, 40),
    IGNORE: (255, 215, 0),
}
STROKE_ALPHA = 0.6
NOT_PAINTED = 255


def brush_color(cls: int) -> str:
    """The CSS colour the canvas paints class ``cls`` with."""
    r, g, b = PALETTE[cls]
    return f"rgba({r}, {g}, {b}, {STROKE_ALPHA})"


def window(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map grey values in [low, high] linearly onto 0-255 (uint8), clipping outside: the contrast
    controls."""
    if high <= low:
        high = low + 1e-6
    scaled = (image.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def auto_window(image: np.ndarray, lower_pct: float = 0.5, upper_pct: float = 99.5) -> tuple[float, float]:
    low, high = np.percentile(image, [lower_pct, upper_pct])
    if high <= low:
        low, high = float(image.min()), float(image.max())
    return float(low), float(high) if high > low else float(low) + 1.0


def overlay(grey: np.ndarray, mask: np.ndarray | None, opacity: float) -> np.ndarray:
    """RGB uint8 picture: the grey uint8 image with every labelled pixel tinted in its class's colour.
    Unlabelled pixels (IGNORE) are left untinted, so a scribble shows as strokes over the image."""
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    if mask is not None and opacity > 0:
        if mask.shape != grey.shape:
            raise ValueError(f"mask shape {mask.shape} does not match the image shape {grey.shape}")
        for cls in (NEURON, MEMBRANE):
            where = mask == cls
            rgb[where] = rgb[where] * (1 - opacity) + np.asarray(PALETTE[cls], np.float32) * opacity
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class View:
    """Which part of a slice the canvas shows, and how large: the crop ``[y0:y0+h, x0:x0+w]`` of the
    image, each image pixel drawn as ``scale`` × ``scale`` display pixels, or (for a slice larger than
    the page) each ``shrink`` × ``shrink`` block of image pixels drawn as one display pixel."""

    y0: int
    x0: int
    h: int
    w: int
    scale: int
    shrink: int = 1

    @classmethod
    def fit(cls, shape: tuple[int, int], zoom: int = 1, centre: tuple[float, float] = (0.5, 0.5),
            target: int = 768) -> View:
        """The view of an image of ``shape`` at ``zoom`` (1 = whole slice) around ``centre`` (fractions
        of height and width), about ``target`` display pixels across at most. Small images are scaled up
        by a whole factor; an image larger than ``target`` is shown at 1/2, 1/4, … so that it fits the
        page, and zoom brings its full resolution (and more) back."""
        height, width = shape
        zoom = max(1, int(zoom))
        h, w = max(1, -(-height // zoom)), max(1, -(-width // zoom))
        largest = max(height, width)
        if largest <= target:
            scale, shrink = max(1, target // largest) * zoom, 1
        else:
            fit_shrink = 1
            while largest / fit_shrink > target:
                fit_shrink *= 2
            scale, shrink = (zoom // fit_shrink, 1) if zoom >= fit_shrink else (1, fit_shrink // zoom)
        y0 = round(centre[0] * height - h / 2)
        x0 = round(centre[1] * width - w / 2)
        y0 = min(max(0, y0), height - h)
        x0 = min(max(0, x0), width - w)
        return cls(y0, x0, h, w, scale, shrink)

    @property
    def display_shape(self) -> tuple[int, int]:
        return -(-self.h // self.shrink) * self.scale, -(-self.w // self.shrink) * self.scale

    @property
    def ratio(self) -> float:
        """Display pixels per image pixel (0.5 when a slice is shown at half size)."""
        return self.scale / self.shrink

    def describe(self) -> str:
        """The scale in words, for the caption."""
        if self.shrink > 1:
            return (f"1/{self.shrink} size (one screen pixel shows {self.shrink}×{self.shrink} image pixels: "
                    "zoom in to paint fine membranes)")
        return f"{self.scale}×" if self.scale > 1 else "full size (one screen pixel per image pixel)"

    def crop(self, image: np.ndarray) -> np.ndarray:
        return image[self.y0:self.y0 + self.h, self.x0:self.x0 + self.w]

    def render(self, picture: np.ndarray) -> np.ndarray:
        """Crop a full-slice picture (H, W[, C]) and scale it: up by pixel repetition, down by averaging
        each block (the edge is padded by repetition to whole blocks)."""
        part = self.crop(picture)
        if self.shrink > 1:
            s = self.shrink
            dh, dw = -(-part.shape[0] // s), -(-part.shape[1] // s)
            pad = [(0, dh * s - part.shape[0]), (0, dw * s - part.shape[1])] + [(0, 0)] * (part.ndim - 2)
            blocks = np.pad(part, pad, mode="edge").reshape(dh, s, dw, s, *part.shape[2:])
            part = (blocks.mean(axis=(1, 3), dtype=np.float32) + 0.5).astype(picture.dtype)
        if self.scale > 1:
            part = np.repeat(np.repeat(part, self.scale, axis=0), self.scale, axis=1)
        return np.ascontiguousarray(part)


def decode_strokes(data_url: object, shape: tuple[int, int]) -> np.ndarray | None:
    """The canvas's strokes (RGBA, ``shape`` display pixels) from the PNG data URL it sends, or None for anything
    else: the value comes from the browser, and the canvas library's own decoder opens whatever Pillow reads,
    whole, before the size is looked at (a 0.75 MB PNG of 12,000² pixels took 549 MiB per rerun). Here the PNG's
    header is read first, and only a picture of the canvas's own size is decoded."""
    if not isinstance(data_url, str) or not data_url.startswith("data:image/png;base64,"):
        return None
    height, width = shape
    if len(data_url) > 64 + 2 * 4 * (height * width + height):  # (base64 of an RGBA PNG, however badly packed)
        return None
    try:
        raw = base64.b64decode(data_url.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as picture:
            if picture.size != (width, height) or picture.mode != "RGBA":
                return None
            return np.asarray(picture)
    except (ValueError, OSError, SyntaxError, Image.DecompressionBombError):  # (not base64, not a PNG, damaged)
        return None


def stroke_classes(rgba: np.ndarray) -> np.ndarray:
    """Per display pixel: the class painted there, or ``NOT_PAINTED`` (uint8)."""
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"expected RGBA strokes of shape (H, W, 4), got {rgba.shape}")
    classes = np.full(rgba.shape[:2], NOT_PAINTED, np.uint8)
    painted = rgba[..., 3] >= round(255 * STROKE_ALPHA / 2)
    if not painted.any():
        return classes
    colours = rgba[painted, :3].astype(np.int32)
    keys = list(PALETTE)
    palette = np.asarray([PALETTE[k] for k in keys], np.int32)
    distance = ((colours[:, None, :] - palette[None, :, :]) ** 2).sum(axis=2)
    classes[painted] = np.asarray(keys, np.uint8)[distance.argmin(axis=1)]
    return classes


def merge_strokes(mask: np.ndarray, rgba: np.ndarray | None, view: View) -> np.ndarray:
    """The mask after the strokes: a new array; only painted pixels differ from ``mask``."""
    result = mask.copy()
    if rgba is None:
        return result
    classes = stroke_classes(rgba)
    dh, dw = view.display_shape
    if classes.shape != (dh, dw):
        raise ValueError(f"the canvas returned {classes.shape[1]}×{classes.shape[0]} pixels, "
                         f"the view is {dw}×{dh}")
    s = view.scale
    if view.shrink > 1:  # one display pixel stands for a block of image pixels: it paints all of them
        image_classes = np.repeat(np.repeat(classes, view.shrink, axis=0), view.shrink, axis=1)[:view.h, :view.w]
    elif s == 1:
        image_classes = classes
    else:
        blocks = classes.reshape(view.h, s, view.w, s).transpose(0, 2, 1, 3).reshape(view.h, view.w, s * s)
        counts = np.stack([(blocks == k).sum(axis=2) for k in PALETTE], axis=-1)
        winner = np.asarray(list(PALETTE), np.uint8)[counts.argmax(axis=-1)]
        image_classes = np.where(counts.sum(axis=-1) * 2 >= s * s, winner, NOT_PAINTED).astype(np.uint8)
    region = view.crop(result)
    painted = image_classes != NOT_PAINTED
    region[painted] = image_classes[painted]
    return result


# --- prediction overlays ------------------------------------------------------------------------------
_HEAT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)  # inferno
ERROR_COLOURS = {"false neuron": (255, 0, 255), "missed neuron": (0, 255, 0)}


def heatmap(prob: np.ndarray) -> np.ndarray:
    """RGB uint8 of a probability map in [0, 1] (inferno-like: dark = membrane, bright = neuron)."""
    x = np.clip(prob.astype(np.float32), 0, 1) * (len(_HEAT) - 1)
    low = np.minimum(x.astype(np.int32), len(_HEAT) - 2)
    t = (x - low)[..., None]
    return (_HEAT[low] * (1 - t) + _HEAT[low + 1] * t + 0.5).astype(np.uint8)


def boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another label (contours of a mask or of instances)."""
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def instance_colours(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """RGB uint8: every instance in its own random colour (the same colour for the same label)."""
    palette = np.random.default_rng(seed).integers(40, 256, (int(labels.max()) + 1, 3)).astype(np.uint8)
    palette[0] = 0
    return palette[labels]


def error_map(prob: np.ndarray, target: np.ndarray, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Where the prediction is wrong against a mask: neuron predicted on membrane ("false neuron") and
    membrane predicted on neuron ("missed neuron"); unlabelled pixels are never errors."""
    pred = prob > threshold
    return {"false neuron": pred & (target == MEMBRANE), "missed neuron": ~pred & (target == NEURON)}


def blend(base: np.ndarray, layer: np.ndarray, opacity: float, where: np.ndarray | None = None) -> np.ndarray:
    """``base`` RGB with ``layer`` RGB on top at ``opacity`` (only ``where``, when given)."""
    out = base.astype(np.float32)
    mixed = out * (1 - opacity) + layer.astype(np.float32) * opacity
    out = mixed if where is None else np.where(where[..., None], mixed, out)
    return (out + 0.5).astype(np.uint8)


def png_data_url(rgb: np.ndarray) -> str:
    """An RGB image as a PNG ``data:`` URL (the canvas's background)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def middle_of(volume, z: int, sample: int = 1024) -> np.ndarray:
    """Slice ``z``'s middle ``sample``² pixels at full resolution (the whole slice when it is smaller)."""
    height, width = volume.shape[1:]
    y0, x0 = max(0, (height - sample) // 2), max(0, (width - sample) // 2)
    return np.asarray(volume[z, y0:y0 + sample, x0:x0 + sample])


def slice_window(volume, z: int, sample: int = 1024) -> tuple[float, float]:
    """The automatic contrast of slice ``z``, from its middle ``sample``² pixels (:func:`middle_of`), so a
    huge slice is not read whole for its percentiles."""
    return auto_window(middle_of(volume, z, sample))


def view_picture(volume, z: int, view: View, mask: np.ndarray | None, opacity: float,
                 contrast: tuple[float, float]) -> np.ndarray:
    """What the canvas shows of slice ``z`` in ``view`` (display pixels, RGB): only the view's region is
    read from the stack, and a view that shows the slice shrunk reads the pyramid level of that size (the
    stored overview) instead of the full resolution. ``mask`` is the full-resolution mask of the slice."""
    levels = getattr(volume, "levels", None) or [volume]
    k = 0
    while view.shrink > 1 and k + 1 < len(levels) and 2 ** (k + 1) <= view.shrink:
        k += 1
    s = 2 ** k
    height, width = levels[k].shape[1:]
    y0, x0 = view.y0 // s, view.x0 // s
    y1, x1 = min(height, -(-(view.y0 + view.h) // s)), min(width, -(-(view.x0 + view.w) // s))
    grey = window(np.asarray(levels[k][z, y0:y1, x0:x1]), *contrast)
    part = None
    if mask is not None:
        part = mask[view.y0:view.y0 + view.h:s, view.x0:view.x0 + view.w:s][:y1 - y0, :x1 - x0]
        if part.shape != grey.shape:  # an odd edge: the level rounds up where the mask has no pixel
            part = np.pad(part, ((0, grey.shape[0] - part.shape[0]), (0, grey.shape[1] - part.shape[1])),
                          constant_values=IGNORE)
    local = View(0, 0, y1 - y0, x1 - x0, view.scale, max(1, view.shrink // s))
    return local.render(overlay(grey, part, opacity))
