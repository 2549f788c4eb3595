"""The field's scores on cases small enough to compute by hand: the ISBI 2012 challenge's V_rand and
V_info (foreground-restricted, after border thinning, best over thresholds) and CREMI's split and merge
VI and adapted Rand error."""

import numpy as np
import pytest

from unet.prediction.metrics import (
    cremi_scores,
    evaluate_slice,
    isbi_scores,
    segmentation_errors,
    thin_borders,
    v_rand_info,
)
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
    partial = target.copy()
    partial[:, 15:] = IGNORE  # half of the right cell unlabelled: the rest still scores perfectly
    assert isbi_scores(prob, partial)["v_rand"] == pytest.approx(1.0)
    only_membrane = np.full(target.shape, MEMBRANE, np.uint8)
    assert np.isnan(isbi_scores(prob, only_membrane)["v_rand"])


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
