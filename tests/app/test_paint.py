"""The mask merge of the Annotate page, on hand-made strokes: painted pixels change, every other pixel
keeps its value exactly, at every zoom."""

import numpy as np
import pytest

from ui.paint import (
    NOT_PAINTED,
    PALETTE,
    STROKE_ALPHA,
    View,
    auto_window,
    merge_strokes,
    overlay,
    stroke_classes,
    window,
)
from unet.training.labels import IGNORE, MEMBRANE, NEURON


def strokes(shape, painted: dict[int, tuple[slice, slice]], alpha: float = STROKE_ALPHA) -> np.ndarray:
    """RGBA as the canvas returns it: each class's rectangle in its colour (later ones on top)."""
    rgba = np.zeros((*shape, 4), np.uint8)
    for cls, (rows, cols) in painted.items():
        rgba[rows, cols, :3] = PALETTE[cls]
        rgba[rows, cols, 3] = round(255 * alpha)
    return rgba


def test_colours_map_to_classes_and_faint_edges_do_not_count():
    rgba = strokes((4, 6), {NEURON: (slice(0, 1), slice(None)), MEMBRANE: (slice(1, 2), slice(None)),
                            IGNORE: (slice(2, 3), slice(None))})
    rgba[3, :3, :3] = PALETTE[NEURON]
    rgba[3, :3, 3] = 40  # antialiased fringe: under half the stroke's alpha
    classes = stroke_classes(rgba)
    assert (classes[0] == NEURON).all() and (classes[1] == MEMBRANE).all() and (classes[2] == IGNORE).all()
    assert (classes[3] == NOT_PAINTED).all()


def test_overlapping_translucent_strokes_take_the_class_on_top():
    # a membrane stroke (alpha 0.6) painted over a neuron stroke: "source over" compositing, unpremultiplied
    a_top, a_bottom = STROKE_ALPHA, STROKE_ALPHA
    alpha = a_top + a_bottom * (1 - a_top)
    colour = (np.array(PALETTE[MEMBRANE]) * a_top + np.array(PALETTE[NEURON]) * a_bottom * (1 - a_top)) / alpha
    rgba = np.zeros((1, 1, 4), np.uint8)
    rgba[0, 0, :3] = np.round(colour)
    rgba[0, 0, 3] = round(255 * alpha)
    assert stroke_classes(rgba)[0, 0] == MEMBRANE


def test_merge_changes_painted_pixels_only():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 3, (40, 50)).astype(np.uint8)
    view = View.fit(mask.shape, target=50)
    assert view.scale == 1 and view.display_shape == (40, 50)
    rgba = strokes((40, 50), {NEURON: (slice(5, 9), slice(10, 30)), IGNORE: (slice(20, 22), slice(0, 50))})
    merged = merge_strokes(mask, rgba, view)
    painted = stroke_classes(rgba) != NOT_PAINTED
    assert (merged[~painted] == mask[~painted]).all()
    assert (merged[5:9, 10:30] == NEURON).all() and (merged[20:22] == IGNORE).all()
    assert merged is not mask and (mask == rng.integers(0, 3, (40, 50)).astype(np.uint8)).any()  # input untouched


def test_zoomed_strokes_map_back_to_the_right_image_pixels():
    mask = np.full((64, 64), NEURON, np.uint8)
    view = View.fit(mask.shape, zoom=4, centre=(0.25, 0.75), target=64)
    assert (view.h, view.w, view.scale) == (16, 16, 4)
    assert (view.y0, view.x0) == (8, 40)
    rgba = np.zeros((*view.display_shape, 4), np.uint8)
    # image pixel (row 2, col 3) of the crop fully painted; (row 5, col 5) only one display pixel of 16
    rgba[8:12, 12:16] = (*PALETTE[MEMBRANE], 153)
    rgba[20, 20] = (*PALETTE[MEMBRANE], 153)
    # a block painted half membrane, half "unlabelled" plus neuron: membrane wins the majority
    rgba[40:44, 40:42] = (*PALETTE[MEMBRANE], 153)
    rgba[40:42, 42:44] = (*PALETTE[IGNORE], 153)
    merged = merge_strokes(mask, rgba, view)
    expected = mask.copy()
    expected[8 + 2, 40 + 3] = MEMBRANE
    expected[8 + 10, 40 + 10] = MEMBRANE
    np.testing.assert_array_equal(merged, expected)


def test_the_view_stays_inside_the_image_and_small_images_are_scaled_up():
    view = View.fit((100, 300), zoom=2, centre=(1.0, 0.0), target=768)
    assert view.y0 == 50 and view.x0 == 0 and (view.h, view.w) == (50, 150)
    assert View.fit((96, 96)).scale == 8 and View.fit((768, 700)).scale == 1
    picture = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(View(1, 1, 2, 2, 2).render(picture),
                                  [[5, 5, 6, 6], [5, 5, 6, 6], [9, 9, 10, 10], [9, 9, 10, 10]])


def test_a_slice_larger_than_the_page_is_shown_smaller_and_zoom_brings_its_pixels_back():
    """A 1024² slice on a 768-pixel canvas: half size (not 1024 pixels behind a scrollbar); zoom ×2
    shows a quarter at full size, ×4 at 2×. Strokes on the half-size canvas paint whole 2×2 blocks."""
    whole = View.fit((1024, 1024), target=768)
    assert (whole.shrink, whole.scale, whole.display_shape) == (2, 1, (512, 512))
    assert "1/2 size" in whole.describe() and whole.ratio == 0.5
    assert (View.fit((1024, 1024), zoom=2).display_shape, View.fit((1024, 1024), zoom=2).ratio) == ((512, 512), 1)
    assert View.fit((1024, 1024), zoom=4).scale == 2
    assert View.fit((2048, 1500), target=768).shrink == 4 and View.fit((1000, 1001), target=768).display_shape == (
        500, 501)

    mask = np.full((1024, 1024), IGNORE, np.uint8)
    rgba = strokes(whole.display_shape, {MEMBRANE: (slice(10, 11), slice(20, 23))})
    merged = merge_strokes(mask, rgba, whole)
    expected = mask.copy()
    expected[20:22, 40:46] = MEMBRANE
    np.testing.assert_array_equal(merged, expected)

    picture = np.array([[0, 2, 10, 10, 7], [4, 6, 10, 10, 9]], np.uint8)
    np.testing.assert_array_equal(View(0, 0, 2, 5, 1, 2).render(picture), [[3, 10, 8]])  # block means, edge padded


def test_a_canvas_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="the canvas returned 10×10 pixels"):
        merge_strokes(np.zeros((8, 8), np.uint8), np.zeros((10, 10, 4), np.uint8), View.fit((8, 8), target=8))


def test_overlay_tints_labelled_pixels_and_window_stretches_contrast():
    grey = np.full((2, 3), 100, np.uint8)
    mask = np.array([[NEURON, MEMBRANE, IGNORE], [IGNORE, IGNORE, IGNORE]], np.uint8)
    rgb = overlay(grey, mask, 1.0)
    assert tuple(rgb[0, 0]) == PALETTE[NEURON] and tuple(rgb[0, 1]) == PALETTE[MEMBRANE]
    assert tuple(rgb[0, 2]) == (100, 100, 100)
    assert (overlay(grey, mask, 0.0) == 100).all()
    np.testing.assert_array_equal(window(np.array([10, 20, 30, 40]), 20, 30), [0, 0, 255, 255])
    image = np.concatenate([np.zeros(2), np.full(996, 5.0), np.full(2, 1000.0)])
    assert auto_window(image) == (0.0, 1000.0)  # percentiles collapse: fall back to the full range
    assert auto_window(np.full(10, 5.0)) == (5.0, 6.0)  # a flat image still gets a valid window


def test_prediction_overlays():
    from ui.paint import ERROR_COLOURS, blend, boundaries, error_map, heatmap, instance_colours

    prob = np.array([[0.0, 1.0], [0.9, 0.2]], np.float32)
    hot = heatmap(prob)
    assert hot.shape == (2, 2, 3) and hot[0, 1].sum() > hot[0, 0].sum()
    target = np.array([[NEURON, MEMBRANE], [IGNORE, NEURON]], np.uint8)
    errors = error_map(prob, target)
    np.testing.assert_array_equal(errors["false neuron"], [[False, True], [False, False]])
    np.testing.assert_array_equal(errors["missed neuron"], [[True, False], [False, True]])
    assert set(ERROR_COLOURS) == set(errors)
    labels = np.array([[1, 1, 2], [1, 1, 2]])
    np.testing.assert_array_equal(boundaries(labels), [[False, True, False], [False, True, False]])
    colours = instance_colours(labels)
    assert (colours[0, 0] == colours[1, 1]).all() and not (colours[0, 0] == colours[0, 2]).all()
    base = np.zeros((2, 3, 3), np.uint8)
    out = blend(base, np.full((2, 3, 3), 200, np.uint8), 0.5, where=boundaries(labels))
    assert out[0, 1, 0] == 100 and out[0, 0, 0] == 0
