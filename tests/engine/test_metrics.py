"""The field's scores on cases small enough to compute by hand: the ISBI 2012 challenge's V_rand and
V_info (foreground-restricted, after border thinning, best over thresholds) and CREMI's split and merge
VI and adapted Rand error."""

import numpy as np
import pytest

from unet.prediction.metrics import (
    cremi_scores,
    evaluate_slice,
    isbi_scores,
    isbi_scores_of,
    mean_metrics,
    rand_f,
    scored_neurons,
    segmentation_errors,
    thin_borders,
    v_rand_info,
    vi,
)
from unet.prediction.stitch import tile_scores
from unet.training.labels import IGNORE, MEMBRANE, NEURON, target_to_instances


def two_cells() -> np.ndarray:
    """10 × 21 pixels: two cells of 10 × 10 either side of a one-pixel membrane at x = 10."""
    target = np.full((10, 21), NEURON, np.uint8)
    target[:, 10] = MEMBRANE
    return target


def test_a_perfect_segmentation_scores_one_and_zero_errors():
    target = two_cells()
    prob = (target == NEURON).astype(np.float32)
    scores = isbi_scores(prob, target)
    assert scores["v_rand"] == pytest.approx(1.0) and scores["v_info"] == pytest.approx(1.0)
    cremi = cremi_scores(target_to_instances(target), target_to_instances(target))
    assert cremi == {"vi_split": 0.0, "vi_merge": 0.0, "are": 0.0}


def test_one_merge():
    """Both cells in one object: over the 200 cell pixels a = (½, ½), b = (1), p = (½, ½), so
    V_rand = 2·½ / (½ + 1) = ⅔; the proposal says nothing about which cell, so I(S;T) = 0 and V_info = 0;
    the merge costs H(gt | seg) = 1 bit and no split."""
    target = two_cells()
    scores = isbi_scores(np.ones(target.shape, np.float32), target)  # no membrane above any threshold
    assert scores["v_rand"] == pytest.approx(2 / 3) and scores["v_info"] == pytest.approx(0.0)
    cremi = cremi_scores(np.ones(target.shape, np.int32), target_to_instances(target))
    assert cremi["vi_merge"] == pytest.approx(1.0) and cremi["vi_split"] == pytest.approx(0.0)
    assert cremi["are"] > 0.2


def test_one_split():
    """The left cell cut by a membrane along row 5: 50 + 40 pixels and 10 border pixels, each an object
    of its own. Over n = 200: a = (½, ½); b = p = (¼, ⅕, ½) and ten times 1/200, so Σb² = Σp² =
    1/16 + 1/25 + 1/4 + 10/200², V_rand = 2Σp² / (½ + Σp²), and H(S|T) = H(S) − I: no merge."""
    target = two_cells()
    prob = (target == NEURON).astype(np.float32)
    prob[5, :10] = 0
    sum_p = 1 / 16 + 1 / 25 + 1 / 4 + 10 / 200**2
    h_t = np.log(2)
    b = np.array([50, 40, 100] + [1] * 10) / 200
    h_s = -np.sum(b * np.log(b))
    scores = isbi_scores(prob, target)
    assert scores["v_rand"] == pytest.approx(2 * sum_p / (0.5 + sum_p))
    assert scores["v_info"] == pytest.approx(2 * h_t / (h_s + h_t))  # I(S;T) = H(T): nothing merged
    seg = target_to_instances(target)
    seg[:5][seg[:5] == 1] = 3  # the same split as instances (every pixel labelled)
    cremi = cremi_scores(seg, target_to_instances(target))
    assert cremi["vi_split"] == pytest.approx(0.5) and cremi["vi_merge"] == pytest.approx(0.0)


def test_thinning_forgives_borders_thicker_or_thinner_than_the_labels():
    target = two_cells()
    thick = (target == NEURON).astype(np.float32)
    thick[:, 8:13] = 0  # a 5-pixel membrane where the labels draw one
    assert isbi_scores(thick, target)["v_rand"] == pytest.approx(1.0)
    assert isbi_scores(thick, target)["v_info"] == pytest.approx(1.0)
    # without thinning the 40 border pixels inside the cells would each count as an object of their own
    unthinned, _ = v_rand_info(np.where(thick > 0.5, target_to_instances(target), 0), target_to_instances(target))
    assert unthinned < 0.9
    thinned = thin_borders(np.where(thick > 0.5, target_to_instances(target), 0))
    assert (thinned == 0).sum() == 10 and (thinned[:, 10] == 0).all()  # one pixel wide, in the middle


def test_the_best_threshold_is_taken_and_unlabelled_pixels_do_not_count():
    target = two_cells()
    prob = np.where(target == NEURON, 0.8, 0.0).astype(np.float32)
    prob[:, 10] = 0.55  # a weak membrane: found from the threshold 0.6 on
    scores = isbi_scores(prob, target)
    assert scores["v_rand"] == pytest.approx(1.0) and scores["v_rand_threshold"] == pytest.approx(0.6)
    only_membrane = np.full(target.shape, MEMBRANE, np.uint8)
    assert np.isnan(isbi_scores(prob, only_membrane)["v_rand"])


def three_cells() -> np.ndarray:
    """10 × 32 pixels: three cells of 10 × 10 between one-pixel membranes at x = 10 and x = 21."""
    target = np.full((10, 32), NEURON, np.uint8)
    target[:, [10, 21]] = MEMBRANE
    return target


def test_a_neuron_the_mask_does_not_outline_whole_is_left_out_of_the_instance_scores():
    """An unlabelled band through a cell cut it into two "neurons": a perfect segmentation was charged with a
    merge. A cell that touches unlabelled pixels is left out now; the cells outlined whole still count."""
    target = three_cells()
    perfect = target_to_instances(target)
    banded = target.copy()
    banded[:, 26:28] = IGNORE  # a band through the right cell
    assert set(np.unique(scored_neurons(banded))) == {0, 1, 2}
    scores = evaluate_slice((target == NEURON).astype(np.float32), banded, seg=perfect)
    assert scores["rand_f"] == pytest.approx(1.0) and scores["vi"] == pytest.approx(0.0)
    assert scores["v_rand"] == pytest.approx(1.0) and scores["vi_merge"] == pytest.approx(0.0)
    # a segmentation that merges the two whole cells is still caught
    merged = evaluate_slice((target != IGNORE).astype(np.float32), banded, seg=np.ones_like(perfect))
    assert merged["rand_f"] < 0.8 and merged["vi_merge"] == pytest.approx(1.0)
    assert segmentation_errors(perfect, scored_neurons(banded)) == []
    # an unlabelled spot inside a cell (an eraser's stroke) is a hole in it: the cell is still whole; a spot at
    # the image's edge or on a membrane opens the cells it touches
    spots = target.copy()
    spots[4:6, 3:5] = IGNORE
    assert set(np.unique(scored_neurons(spots))) == {0, 1, 2, 3}
    spots[0:2, 14:16] = IGNORE  # the edge: the middle cell's extent beyond it is unknown
    spots[4:6, 20:22] = IGNORE  # a membrane: the middle and right cells
    assert set(np.unique(scored_neurons(spots))) == {0, 1}


def test_a_slice_with_fewer_than_two_whole_neurons_has_pixel_scores_only():
    """One labelled cell: a prediction of no neuron at all scored Rand-F 1 and VI 0 (nothing can be merged
    with one neuron); now only its pixel error says anything, and that says it is wrong."""
    target = np.full((64, 64), IGNORE, np.uint8)
    target[20:24, 10:40] = NEURON
    target[[19, 24], 10:40] = MEMBRANE
    target[20:24, [9, 40]] = MEMBRANE
    scores = evaluate_slice(np.zeros(target.shape, np.float32), target)
    assert scores.keys() == {"pixel_error", "dice", "iou"} and scores["pixel_error"] > 0.5
    assert mean_metrics([scores]).keys() == {"pixel_error", "dice", "iou"}


def test_over_slices_the_isbi_scores_take_one_threshold_for_all_of_them():
    """The challenge takes the best threshold of the slices' mean, not each slice's best: a map right only at
    0.6-0.7 and another right only at 0.0 have no threshold where both are right."""
    target = three_cells()
    cells = target == NEURON
    high = np.where(cells, 0.75, 0.65).astype(np.float32)  # membrane found above 0.65 only
    low = np.where(cells, 0.05, 0.0).astype(np.float32)  # neurons found at 0.0 only
    a, b = evaluate_slice(high, target), evaluate_slice(low, target)
    assert a["v_rand"] == pytest.approx(1.0) and b["v_rand"] == pytest.approx(1.0)  # each at its own best
    mean = mean_metrics([a, b])
    assert mean["v_rand"] < 0.9 and mean["pixel_error"] == pytest.approx((a["pixel_error"] + b["pixel_error"]) / 2)
    assert mean_metrics([a, a])["v_rand"] == pytest.approx(1.0)
    # an instance segmentation's scores have no curve: their mean is the plain one
    plain = [isbi_scores_of(target_to_instances(target), target), {"v_rand": 0.5, "v_info": 0.5}]
    assert mean_metrics(plain)["v_rand"] == pytest.approx(0.75)


def test_labels_of_any_size_or_sign_are_scored_without_a_table_the_size_of_the_largest():
    gt = np.array([[1, 1, 2, 2]] * 4)
    for seg in (np.array([[2**31, 2**31, 7, 7]] * 4, np.int64), np.array([[2**63, 2**63, 5, 5]] * 4, np.uint64),
                np.array([[-3, -3, 4, 4]] * 4), np.array([[True, True, False, False]] * 4)):
        assert rand_f(seg, gt) == pytest.approx(1.0) and vi(seg, gt) == pytest.approx(0.0)
        assert cremi_scores(seg, gt)["are"] == pytest.approx(0.0)


def test_a_tiled_slice_scores_each_metric_over_the_tiles_that_have_it():
    """A tile whose labels hold too few whole neurons has no Rand-F: a NaN of one made the whole slice's NaN."""
    target = three_cells()
    prob = (target == NEURON).astype(np.float32)
    good = evaluate_slice(prob, target)
    membrane_only = evaluate_slice(prob[:, 8:11], target[:, 8:11])  # one neuron and the membrane
    assert "rand_f" not in membrane_only
    combined = tile_scores([{"scores": good, "labelled": 320}, {"scores": membrane_only, "labelled": 30}])
    assert combined["rand_f"] == pytest.approx(1.0) and combined["v_rand"] == pytest.approx(1.0)
    assert combined["isbi_curve"]["v_rand"] == pytest.approx(good["isbi_curve"]["v_rand"])
    assert combined["pixel_error"] == pytest.approx((320 * good["pixel_error"] + 30 * membrane_only["pixel_error"])
                                                    / 350)


def test_a_slice_is_scored_with_every_metric_and_the_field_ones_can_be_left_out():
    target = two_cells()
    prob = (target == NEURON).astype(np.float32)
    full = evaluate_slice(prob, target)
    assert {"pixel_error", "rand_f", "vi", "v_rand", "v_info", "vi_split", "vi_merge", "are"} <= full.keys()
    assert full["v_rand"] == pytest.approx(1.0) and full["vi_split"] == pytest.approx(0.0)
    assert "v_rand" not in evaluate_slice(prob, target, field=False)


def test_the_largest_merges_and_splits_are_listed_with_where_they_are():
    truth = np.zeros((30, 60), np.int32)
    truth[:, :20], truth[:, 21:40], truth[:, 41:] = 1, 2, 3  # three neurons side by side
    seg = np.ones_like(truth)
    seg[:, 30:] = 2  # neurons 1 and 2 (left part) merged; neuron 2 split at x = 30; 3 is right
    seg[:, 41:] = 3
    errors = segmentation_errors(seg, truth, min_pixels=5)
    kinds = [(e["kind"], e["parts"]) for e in errors]
    assert ("merge", 2) in kinds and ("split", 2) in kinds and len(errors) == 2
    merge = next(e for e in errors if e["kind"] == "merge")
    assert merge["pixels"] == 30 * 9 and merge["box"] == [0, 0, 30, 30]  # neuron 2's part, inside instance 1
    split = next(e for e in errors if e["kind"] == "split")
    assert split["pixels"] == 30 * 9 and split["box"] == [0, 21, 30, 40]
    assert segmentation_errors(truth, truth) == []


def test_an_error_opens_zoomed_on_its_place():
    from ui.prediction import focus

    assert focus([0, 0, 256, 256], (256, 256)) == (1, 50, 50)  # the whole slice: no zoom
    assert focus([100, 200, 120, 230], (512, 512)) == (8, 21, 42)  # small: zoomed in, centred on it
    assert focus([0, 0, 100, 100], (512, 512)) == (2, 10, 10)


def test_the_label_offset_bench_finds_labels_moved_against_their_image():
    """bench.offset registers a stack's membrane labels to its image: labels moved one pixel down and two
    left read as an offset of (+1, −2) against the same labels where they were drawn."""
    from unet.training.labels import labels_to_target
    from unet.training.labels import slice_label_offset as slice_offset
    from unet.training.synthetic import make_synthetic_em

    volume, labels = make_synthetic_em((1, 128, 128), np.random.default_rng(3))
    target = labels_to_target(labels)[0]
    dy0, dx0 = slice_offset(volume[0], target)
    dy, dx = slice_offset(volume[0], np.roll(target, (1, -2), axis=(0, 1)))
    assert dy - dy0 == pytest.approx(1.0, abs=0.2) and dx - dx0 == pytest.approx(-2.0, abs=0.2)
    assert abs(dy0) < 0.5 and abs(dx0) < 0.5  # the synthetic labels are drawn where the membranes are
