"""The object tools (unet.prediction.objects) on small label arrays whose answer is known pixel by pixel."""

import numpy as np
import pytest

from ui.paint import View
from ui.tools import SPLIT_LINE, Tool, line_points, neurons_from, run_tool, saved_as
from unet.prediction import objects, review
from unet.training.labels import IGNORE, MEMBRANE, NEURON


@pytest.fixture
def scene():
    """Three neurons of a watershed (every pixel belongs to one): 1 and 2 side by side (touching at column
    10), 3 below both; the edit starts unlabelled."""
    instances = np.zeros((20, 20), np.int32)
    instances[:10, :10], instances[:10, 10:], instances[10:, :] = 1, 2, 3
    mask = np.full((20, 20), IGNORE, np.uint8)
    return mask, instances


def test_accept_makes_a_neuron_with_a_ring_of_membrane(scene):
    mask, instances = scene
    out = objects.accept(mask, instances, 1, ring=2)
    assert (mask == IGNORE).all(), "the given mask is never written"
    assert (out[instances != 1] == IGNORE).all()
    # its border with neurons 2 and 3 is membrane two pixels wide; the slice's own edge is not a border
    assert (out[:8, :8] == NEURON).all()
    assert (out[:10, 8:10] == MEMBRANE).all() and (out[8:10, :10] == MEMBRANE).all()


def test_accept_confident_takes_the_neurons_over_the_threshold(scene):
    mask, instances = scene
    prob = np.where(instances == 2, 0.95, 0.6).astype(np.float32)
    out, chosen = objects.accept_confident(mask, instances, prob, threshold=0.9)
    assert chosen == [2]
    assert (out[instances == 1] == IGNORE).all() and (out[:8, 12:] == NEURON).all()
    assert objects.accept_confident(mask, instances, prob, threshold=0.99)[1] == []


def test_merge_turns_the_membrane_between_two_neighbours_into_neuron(scene):
    mask, instances = scene
    both = objects.accept(objects.accept(mask, instances, 1), instances, 2)
    assert (both[4, 8:12] == MEMBRANE).all()
    merged = objects.merge(both, instances, 1, 2, contact=3)
    assert (merged[2:8, 7:13] == NEURON).all(), "the membrane between them is neuron now"
    assert (merged[10:] == IGNORE).all() and (merged[0, 3] == NEURON)
    with pytest.raises(ValueError, match="do not touch"):
        apart = instances.copy()
        apart[:10, 9:11] = 0
        objects.merge(both, apart, 1, 2, contact=1)
    with pytest.raises(ValueError, match="two different"):
        objects.merge(both, instances, 1, 1)


def test_split_by_seeds_follows_the_boundary_map_inside_the_neuron(scene):
    mask, instances = scene
    boundary = np.zeros((20, 20), np.float32)
    boundary[10:, 13] = 1.0  # a faint membrane the network missed, across neuron 3 at column 13
    out = objects.split_seeds(mask, instances, boundary, [(15, 3), (15, 18)])
    cut = np.argwhere(out == MEMBRANE)
    assert cut.size and set(np.unique(cut[:, 1])) <= {12, 13, 14}, "the cut lies on the membrane"
    assert set(np.unique(cut[:, 0])) == set(range(10, 20)), "it crosses the whole neuron"
    assert (out[:10] == IGNORE).all(), "nothing outside the neuron changes"
    with pytest.raises(ValueError, match="same neuron"):
        objects.split_seeds(mask, instances, boundary, [(2, 2), (15, 18)])


def test_split_along_a_line_stays_inside_the_neurons_it_crosses(scene):
    mask, instances = scene
    instances = instances.copy()
    instances[:, 0] = 0  # a column that is no neuron
    out = objects.split_line(mask, instances, [(15, 0), (15, 19)], width=0)
    assert (out[15, 1:] == MEMBRANE).all() and out[15, 0] == IGNORE
    assert np.count_nonzero(out == MEMBRANE) == 19


def test_erase_and_fill_and_the_click_that_picks_a_neuron(scene):
    mask, instances = scene
    assert (objects.erase(mask, instances, 3)[10:] == MEMBRANE).all()
    assert (objects.erase(mask, instances, 3, value=IGNORE)[10:] == IGNORE).all()
    accepted = objects.accept(mask, instances, 1)
    filled = objects.fill(accepted, 3, 3, IGNORE)  # the accepted core marked "don't know"
    assert (filled[:8, :8] == IGNORE).all() and (filled[:10, 8:10] == MEMBRANE).all()
    ridge = instances.copy()
    ridge[:10, 9:11] = 0  # a membrane two pixels wide between 1 and 2
    assert objects.object_at(ridge, 4, 9) == 1 and objects.object_at(ridge, 4, 10) == 2
    assert objects.object_at(ridge, 4, 9, snap=0) == 0
    with pytest.raises(ValueError, match="no neuron 7"):
        objects.accept(mask, instances, 7)


def test_a_tool_on_a_4096_slice_touches_only_its_neuron():
    """An action costs the object: on a 4096² slice only the neuron's box is read and written."""
    instances = np.zeros((4096, 4096), np.int32)
    instances[2000:2040, 3000:3050] = 5
    mask = np.full(instances.shape, IGNORE, np.uint8)
    out = objects.accept(mask, instances, 5)
    changed = np.argwhere(out != mask)
    assert changed.min(axis=0).tolist() == [2000, 3000] and changed.max(axis=0).tolist() == [2039, 3049]


def test_clicks_off_the_slice_are_refused_and_forged_canvas_values_stay_in_the_view(scene):
    """A negative index would wrap around to the other side of the slice; the canvas's value comes from the
    browser, so whatever it says lands inside the view shown, or is skipped."""
    from ui.paint import View
    from ui.tools import click_points

    mask, instances = scene
    with pytest.raises(ValueError, match="outside the slice"):
        objects.fill(mask, -1, 3, IGNORE)
    with pytest.raises(ValueError, match="outside the slice"):
        objects.split_seeds(mask, instances, np.zeros((20, 20), np.float32), [(15, 3), (15, -2)])
    view = View(4, 6, 10, 10, 2)  # rows 4–13, columns 6–15, each pixel drawn 2 × 2
    sent = {"objects": [
        {"type": "Circle", "left": 10, "top": 8, "radius": 5, "strokeWidth": 2},  # a click at (8, 16) on screen
        {"type": "circle", "left": -900, "top": 1e9, "radius": 0},  # forged: far outside
        {"type": "circle", "left": "x", "top": 1}, {"type": "circle", "left": float("nan"), "top": 1},
        {"type": "path", "left": 1, "top": 1}, "junk"]}
    assert click_points(sent, view) == [(8, 14), (13, 6)]
    assert click_points({"objects": "junk"}, view) == [] and click_points(None, view) == []


def test_a_line_drawn_on_the_canvas_splits_the_neuron_it_crosses(scene):
    """Split along a line: the free-hand path the canvas sends (display pixels of the view) becomes slice
    pixels, and the membrane is drawn along it inside the neuron only; a forged path is cut short or skipped."""
    mask, instances = scene
    view = View(0, 0, 20, 20, 4)  # each slice pixel drawn 4 × 4
    path = {"objects": [{"type": "Path", "path": [["M", 2.0, 60.0], ["Q", 20.0, 60.0, 38.0, 60.0],
                                                   ["L", 38.0, 60.0]]}]}  # across row 15, columns 0 to 9
    points = line_points(path, view)
    assert points == [(15, 0), (15, 9), (15, 9)]
    out = run_tool(SPLIT_LINE, mask, instances, np.zeros((20, 20), np.float32), points, NEURON)
    assert saved_as(SPLIT_LINE) == "split"
    assert (out[14:17, :10] == MEMBRANE).all() and (out[:13] == IGNORE).all() and (out[:, 11:] == IGNORE).all()
    forged = {"objects": [{"type": "path", "path": [["M", "x", None], ["L", float("inf"), 1.0], ["L", 1e9, -5.0]]}]}
    assert line_points(forged, view) == [(0, 19)]  # (the one readable point, kept inside the view)
    assert line_points({"objects": "not a list"}, view) == [] and line_points(None, view) == []
    shrunk = View(0, 0, 4096, 4096, 1, 4)  # a 4096² slice shown at 1/4: 1e308 / ¼ is infinite, still kept inside
    huge = {"objects": [{"type": "path", "path": [["M", 1e308, -1e308]]}]}
    assert line_points(huge, shrunk) == [(0, 4095)]
    with pytest.raises(ValueError, match="draw a line"):
        run_tool(SPLIT_LINE, mask, instances, np.zeros((20, 20), np.float32), [(1, 1)], NEURON)


def test_the_uncertainty_and_the_suspicious_neurons_rank_the_regions():
    prob = np.full((64, 64), 0.99, np.float32)
    prob[40:56, 8:24] = 0.5  # unsure in one place
    assert review.margin(prob)[48, 16] == pytest.approx(1.0) and review.margin(prob)[0, 0] == pytest.approx(0.02)
    # neuron 1 here is two neurons in the slice below (a merge here or a split there); 3 is a fragment
    here = np.zeros((64, 64), np.int32)
    here[:, :32], here[:, 32:62], here[0:4, 62:64] = 1, 2, 3
    below = np.zeros((64, 64), np.int32)
    below[:32, :32], below[32:, :32], below[:, 32:62] = 1, 2, 3
    found = review.suspects(here, below)
    assert found == {1: "splits between slices", 3: "fragment"}
    assert review.suspects(below, here) == {1: "merges between slices", 2: "merges between slices"}
    tiles = review.rank_regions(review.margin(prob), suspect_mask=review.suspect_mask(here, {3: "fragment"}),
                                suspect_labels=here, tile=32)
    assert [(t.y0, t.x0) for t in tiles][:2] == [(32, 0), (0, 32)]  # the unsure one, then the fragment's
    assert tiles[0].uncertainty > 0.1 and tiles[1].suspects == 1 and "1 suspicious" in tiles[1].reasons
    fresh = review.rank_regions(review.margin(prob), tile=32, uncorrected=True)
    assert all(t.score >= review.W_UNCORRECTED for t in fresh) and "never corrected" in fresh[0].reasons
    known = np.zeros((64, 64), bool)  # a live prediction of a zoomed region: the rest is not an answer
    known[:32, 32:] = True
    best = review.rank_regions(np.ones((64, 64), np.float32), tile=32, known=known)
    assert (best[0].y0, best[0].x0, best[0].uncertainty, best[1].uncertainty) == (0, 32, 1.0, 0.0)


def test_a_tile_whose_few_neurons_hold_the_doubt_ranks_above_a_busy_one():
    """Mean uncertainty ties a tile of many small neurons, each with a doubtful rim, with a tile of a few large
    neurons whose insides are doubtful; a person's few actions settle far more in the second, so it ranks
    first once the neurons are counted (``objects``)."""
    u = np.zeros((64, 128), np.float32)
    objects = np.zeros((64, 128), np.int32)
    label = 0
    for y in range(0, 64, 8):  # left tile: 64 neurons of 6 × 6 with a doubtful rim
        for x in range(0, 64, 8):
            label += 1
            objects[y + 1:y + 7, x + 1:x + 7] = label
            u[y:y + 8, x:x + 8] = 0.5
            u[y + 2:y + 6, x + 2:x + 6] = 0.0
    big = u[:, :64].sum() / (3 * 28 * 28)
    for i, y in enumerate((2, 33)):  # right tile: three neurons of 28 × 28 with doubtful insides
        objects[y:y + 28, 66:94] = 100 + 2 * i
        u[y:y + 28, 66:94] = big
    objects[2:30, 98:126] = 101
    u[2:30, 98:126] = big
    assert u[:, :64].mean() == pytest.approx(u[:, 64:].mean(), rel=1e-3)
    plain = review.rank_regions(u, tile=64)
    assert plain[0].score == pytest.approx(plain[1].score, rel=1e-3)
    counted = review.rank_regions(u, tile=64, objects=objects)
    assert (counted[0].x0, counted[1].x0) == (64, 0) and counted[0].score > 5 * counted[1].score
    assert review.objects_of(np.where(objects > 0, 0.9, 0.1)).max() == 67  # connected pixels above 0.5
    with pytest.raises(ValueError, match="neurons of shape"):
        review.rank_regions(u, objects=objects[:32])


def test_the_regions_of_a_slice_are_about_equal_and_leave_no_thin_strip():
    """A 700 × 900 slice in tiles of 225 px left a strip of 25 rows at its bottom edge, which Next to fix
    opened first (a few doubtful pixels make a high score per pixel)."""
    u = np.zeros((700, 900), np.float32)
    u[690:, :200] = 0.5  # doubt at the bottom edge only
    tiles = review.rank_regions(u, tile=review.tile_size(u.shape))
    assert sorted({t.h for t in tiles}) == [175] and sorted({t.w for t in tiles}) == [225] and len(tiles) == 16
    assert (tiles[0].y0, tiles[0].x0, tiles[0].h) == (525, 0, 175)
    assert sum(t.h * t.w for t in tiles) == u.size


def test_a_large_live_prediction_is_cut_into_neurons_only_around_the_view():
    """On a slice over 2048² the neurons of a live prediction are made in the view and a halo around it, so a
    click answers at once; the rest of the slice stays 0 (no neuron to click there)."""
    prob = np.zeros((2100, 2100), np.float32)
    prob[1000:1040, 1000:1040] = prob[1050:1090, 1000:1040] = 0.95  # two neurons in view
    prob[10:50, 10:50] = 0.95  # one far away
    view = View(990, 990, 120, 120, 4)
    found = neurons_from(prob, view)
    assert found.shape == prob.shape and (found[:900] == 0).all() and (found[:, :900] == 0).all()
    assert found[1020, 1020] and found[1070, 1020] and found[1020, 1020] != found[1070, 1020]
    assert found[30, 30] == 0 and neurons_from(prob[:600, :600])[30, 30]  # (a small slice: all of it)


def test_accept_with_the_prediction_takes_its_membrane_as_the_ring(scene):
    """A watershed gives every pixel to a neuron, so a neuron holds its half of the membrane around it: with the
    probabilities, Accept labels what the prediction calls membrane there (here its last two rows and its
    last column) as MEMBRANE and the rest NEURON, instead of a ring of fixed width."""
    mask, instances = scene
    prob = np.full((20, 20), 0.9, np.float32)
    prob[8:10, :] = prob[:, 9] = 0.2
    out = objects.accept(mask, instances, 1, prob=prob)
    assert (out[8:10, :10] == MEMBRANE).all() and (out[:8, 9] == MEMBRANE).all()
    assert (out[:8, :9] == NEURON).all() and (out[instances != 1] == IGNORE).all()
    chosen = objects.accept_confident(mask, instances, np.where(instances == 3, 0.95, prob), 0.9)
    assert chosen[1] == [3] and (chosen[0][10:18, 2:18] == NEURON).all()  # (no membrane of its own: a ring)


def test_a_fill_that_would_relabel_most_of_the_slice_is_refused_and_a_closed_region_fills():
    """An empty edit (or an outline with a gap) is one region: one Fill click turned a whole slice into neuron."""
    mask = np.full((40, 40), IGNORE, np.uint8)
    prob, instances = np.zeros((40, 40), np.float32), np.zeros((40, 40), np.int32)
    for tool in (Tool.FILL, Tool.DONT_KNOW):
        start = mask if tool == Tool.FILL else np.full((40, 40), NEURON, np.uint8)
        with pytest.raises(ValueError, match=r"would change 1,600 pixels, 100% of the slice: the region under the "
                                             r"click is not closed"):
            run_tool(tool, start, instances, prob, [(20, 20)], NEURON)
    mask[10, 10:21] = mask[20, 10:21] = mask[10:21, 10] = mask[10:21, 20] = MEMBRANE  # a closed outline
    out = run_tool(Tool.FILL, mask, instances, prob, [(15, 15)], NEURON)
    assert (out[11:20, 11:20] == NEURON).all() and np.count_nonzero(out != mask) == 81
    mask[10, 15] = IGNORE  # a gap: the fill leaks out
    with pytest.raises(ValueError, match="not closed"):
        run_tool(Tool.FILL, mask, instances, prob, [(15, 15)], NEURON)
