"""Segmentation metrics as plain functions of arrays.

Pixel metrics compare neuron masks; pixels whose target is IGNORE are skipped. Instance metrics are
scikit-image's: Rand-F = 1 − ``adapted_rand_error`` and VI = the sum of the two conditional entropies of
``variation_of_information`` (in bits); ground-truth label 0 (membrane) is ignored, as in the ISBI 2012
challenge.

**Which neurons the instance metrics count** (:func:`scored_neurons`): the 4-connected components of the
target's neuron pixels that the mask outlines whole. A component that touches an unlabelled pixel is left
out (its extent is unknown: an unlabelled band would cut one neuron in two, and two strokes in one cell would
be two neurons), and so is a slice with fewer than two whole neurons (:data:`MIN_NEURONS`): with one, a
prediction of no neuron at all would score perfectly. Such a slice has pixel scores only.

The field's own scores, beside them:

- **ISBI 2012** (Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142; the challenge's Fiji evaluation,
  ``trainableSegmentation.metrics.RandError.getMaximalVRandAfterThinning`` and its ``VariationOfInformation``
  twin): the foreground-restricted Rand score V_rand and information theoretic score V_info after thinning,
  at the thresholds 0.0, 0.1, … 0.9 of the neuron probability (:func:`isbi_scores`). The ground truth's
  objects are the 4-connected components of its neuron pixels, as they are; the proposal's are those of its
  pixels above the threshold, its borders thinned to one pixel (:func:`thin_borders`); only pixels inside a
  ground-truth object count, and a proposal's border pixel among them is an object of its own. A slice's
  own score is its best threshold's; over several slices (:func:`mean_metrics`) the score is the challenge's:
  the best threshold of the slices' mean (one threshold for the stack, from each slice's ``isbi_curve``).
  Written here from the paper's and the script's definitions: no maintained Python package implements them.
- **CREMI**: the split and merge variation of information (H(seg | gt), H(gt | seg), in bits) and the
  adapted Rand error of an instance segmentation, ground-truth label 0 ignored (:func:`cremi_scores`,
  scikit-image's ``variation_of_information`` and ``adapted_rand_error``).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.metrics import adapted_rand_error, variation_of_information
from skimage.segmentation import watershed

from unet.prediction.postprocess import DEFAULT_METHOD, segment, to_mask
from unet.training.labels import IGNORE, MEMBRANE, NEURON, target_to_instances


def _masks(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    valid = target != IGNORE
    return (pred.astype(bool))[valid], (target == NEURON)[valid]


def pixel_error(pred: np.ndarray, target: np.ndarray) -> float:
    """Fraction of labelled pixels whose class is wrong (``pred`` is a 0/1 neuron mask)."""
    p, t = _masks(pred, target)
    return float(np.mean(p != t)) if p.size else float("nan")


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of the neuron class: 2|P∩T| / (|P| + |T|); 1.0 when both are empty."""
    p, t = _masks(pred, target)
    denom = p.sum() + t.sum()
    return float(2 * np.logical_and(p, t).sum() / denom) if denom else 1.0


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of the neuron class; 1.0 when both are empty."""
    p, t = _masks(pred, target)
    union = np.logical_or(p, t).sum()
    return float(np.logical_and(p, t).sum() / union) if union else 1.0


def _compact(labels: np.ndarray) -> np.ndarray:
    """``labels`` as small non-negative integers, 0 kept as 0 (the label ignored) and every other label its own
    number, where scikit-image's tables would otherwise be sized by the largest label (2³¹ allocated 32 GiB) or
    refuse the dtype (negative, boolean or uint64 labels)."""
    labels = np.asarray(labels)
    if (labels.dtype.kind == "i" or (labels.dtype.kind == "u" and labels.dtype.itemsize < 8)) and (
            not labels.size or (labels.min() >= 0 and labels.max() <= 2 * labels.size)):
        return labels
    found, inverse = np.unique(labels, return_inverse=True)
    numbers = np.arange(1, len(found) + 1, dtype=np.int64)
    numbers[found == 0] = 0
    return numbers[inverse.reshape(labels.shape)]


def rand_f(seg: np.ndarray, gt_instances: np.ndarray) -> float:
    """1 − adapted Rand error of a segmentation against ground-truth instances (0 ignored)."""
    error, _, _ = adapted_rand_error(_compact(gt_instances), _compact(seg), ignore_labels=(0,))
    return float(1.0 - error)


def vi(seg: np.ndarray, gt_instances: np.ndarray) -> float:
    """Variation of information (split + merge, in bits); lower is better."""
    split, merge = variation_of_information(_compact(gt_instances), _compact(seg), ignore_labels=(0,))
    return float(split + merge)


def pixel_metrics(pred_mask: np.ndarray, target: np.ndarray) -> dict[str, float]:
    return {"pixel_error": pixel_error(pred_mask, target), "dice": dice(pred_mask, target),
            "iou": iou(pred_mask, target)}


#: Thresholds of the neuron probability the ISBI scores are taken over (a pixel is neuron above one). The
#: challenge's script also tries 1.0 (in floating point, a hair under it), where a map has next to no neuron
#: pixel left: every pixel is an object of its own there, which gives a poor map a V_info it did not earn.
THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(10))

#: The version of these definitions, kept with stored scores: 2 since the neurons counted are those a mask outlines
#: whole and the ISBI scores are the challenge's (a stored score of another version is not compared with these).
SCORING = 2

#: Whole ground-truth neurons a slice needs for its instance scores (with one, any prediction that does not cut
#: it, no neuron at all included, would score perfectly).
MIN_NEURONS = 2


def thin_borders(labels: np.ndarray) -> np.ndarray:
    """``labels`` with its objects (> 0) grown over the border pixels (0) until every border between two
    objects is one pixel wide: a watershed of the distance to the objects, seeded by them, that keeps
    its watershed lines. Borders that touch one object only are absorbed by it."""
    border = labels == 0
    if not border.any() or border.all():
        return labels
    distance = ndi.distance_transform_edt(border)
    return watershed(distance, markers=labels, watershed_line=True)


def contingency(a: np.ndarray, b: np.ndarray):
    """The overlap of two labellings of the same pixels (flat or not): the labels of each (``ua``, ``ub``),
    their pixels (``area_a``, ``area_b``), and every pair that meets, as indices into ``ua`` and ``ub``
    with its pixels (``pa``, ``pb``, ``count``)."""
    ua, ia = np.unique(np.ravel(a), return_inverse=True)
    ub, ib = np.unique(np.ravel(b), return_inverse=True)
    pairs, count = np.unique(ia.astype(np.int64) * len(ub) + ib, return_counts=True)
    area_a, area_b = np.bincount(ia, minlength=len(ua)), np.bincount(ib, minlength=len(ub))
    return ua, area_a, ub, area_b, pairs // len(ub), pairs % len(ub), count


def _foreground_table(seg: np.ndarray, gt: np.ndarray):
    """Over the pixels of ground-truth objects (gt > 0): the number n of them, the pixels of each gt
    object, of each proposal object and of each (gt, proposal) pair, and how many are proposal border (0)."""
    inside = gt > 0
    g, s = gt[inside], seg[inside]
    n = g.size
    border = s == 0
    _, per_gt = np.unique(g, return_counts=True)
    _, _, _, per_seg, _, _, per_pair = contingency(g[~border], s[~border])
    return n, per_gt, per_seg, per_pair, int(border.sum())


def v_rand_info(seg: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(V_rand, V_info) of a proposal ``seg`` against ground-truth objects ``gt`` (both label images, 0 a
    border), foreground-restricted: only pixels of gt objects count, and each of them on a proposal border
    is an object of its own. V_rand = 2·Σp²ᵢⱼ / (Σa²ᵢ + Σb²ⱼ), V_info = 2·I(S;T) / (H(S) + H(T)); 1 is
    perfect. NaN when gt has no object."""
    n, per_gt, per_seg, per_pair, singles = _foreground_table(seg, gt)
    if n == 0:
        return float("nan"), float("nan")
    a, b, p = per_gt / n, per_seg / n, per_pair / n
    single = singles / n / n  # each single pixel: (1/n)² to the sums of squares
    sum_a, sum_b, sum_ab = float(np.sum(a * a)), float(np.sum(b * b)) + single, float(np.sum(p * p)) + single
    v_rand = 2 * sum_ab / (sum_a + sum_b)
    log_n = np.log(n) * singles / n  # each single pixel: −(1/n)·log(1/n) to the entropies
    h_t = float(-np.sum(a * np.log(a)))
    h_s = float(-np.sum(b * np.log(b))) + log_n
    h_st = float(-np.sum(p * np.log(p))) + log_n
    mutual = h_s + h_t - h_st
    v_info = 2 * mutual / (h_s + h_t) if h_t > 1e-12 else float("nan")  # (one gt object: no information to find)
    return float(v_rand), float(v_info)


def scored_neurons(target: np.ndarray) -> np.ndarray:
    """The ground-truth neurons the instance scores count (int32, 0 elsewhere): the 4-connected components of
    ``target``'s neuron pixels that no unlabelled (IGNORE) area opens, 4-connected (see the module's text). An
    unlabelled area inside one neuron (an eraser's stroke: it touches that neuron only, not the membrane nor
    the image's edge) is a hole in it and leaves it whole. A fully labelled slice keeps every neuron."""
    gt = target_to_instances(target)
    unlabelled = target == IGNORE
    if not (unlabelled.any() and gt.any()):
        return gt
    rows, cols = np.flatnonzero(unlabelled.any(axis=1)), np.flatnonzero(unlabelled.any(axis=0))
    box = (slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2))  # (and a ring)
    areas, count = ndi.label(unlabelled[box])
    code = gt[box].copy()  # what each pixel is: a neuron's id, -1 membrane, 0 unlabelled
    code[target[box] == MEMBRANE] = -1
    span = int(gt.max()) + 2  # (a pair as one number: area · span + code + 1)
    pairs = []
    for a, b in (((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
                 ((slice(1, None), slice(None)), (slice(None, -1), slice(None)))):
        for here, there in ((a, b), (b, a)):
            area, next_to = areas[here], code[there]
            touching = (area > 0) & (next_to != 0)
            pairs.append(area[touching].astype(np.int64) * span + next_to[touching] + 1)
    pairs = np.unique(np.concatenate(pairs))  # (area, what it touches), once each
    pairs = np.stack([pairs // span, pairs % span - 1], axis=1)
    hole = np.zeros(count + 1, bool)  # an area touching exactly one neuron and nothing else, off the image's edge
    single = pairs[np.bincount(pairs[:, 0], minlength=count + 1)[pairs[:, 0]] == 1]
    hole[single[single[:, 1] > 0, 0]] = True
    h, w = target.shape
    for side, at_edge in ((areas[0], box[0].start == 0), (areas[-1], box[0].stop >= h),
                          (areas[:, 0], box[1].start == 0), (areas[:, -1], box[1].stop >= w)):
        if at_edge:
            hole[side] = False
    drop = np.zeros(int(gt.max()) + 1, bool)
    drop[pairs[(~hole[pairs[:, 0]]) & (pairs[:, 1] > 0), 1]] = True
    drop[0] = False
    if drop.any():
        gt[drop[gt]] = 0
    return gt


def _count(gt: np.ndarray) -> int:
    return len(np.unique(gt)) - (1 if (gt == 0).any() else 0)


def isbi_curve(prob: np.ndarray, gt: np.ndarray, thresholds=THRESHOLDS) -> dict[str, list[float]]:
    """V_rand and V_info of the map at every threshold against ground-truth objects ``gt``
    (:func:`scored_neurons`): the challenge's proposal, thresholded, its borders thinned."""
    curve: dict[str, list[float]] = {"v_rand": [], "v_info": []}
    for t in thresholds:
        proposal, _ = ndi.label(prob > t)
        v_rand, v_info = v_rand_info(thin_borders(proposal), gt)
        curve["v_rand"].append(v_rand)
        curve["v_info"].append(v_info)
    return curve


def _best(curve: dict[str, list[float]], thresholds=THRESHOLDS) -> dict[str, float]:
    best = {}
    for key, values in curve.items():
        values = np.asarray(values, np.float64)
        k = int(np.nanargmax(values)) if np.isfinite(values).any() else -1
        best[key] = float(values[k]) if k >= 0 else float("nan")
        best[f"{key}_threshold"] = float(thresholds[k]) if k >= 0 else float("nan")
    return best


def isbi_scores(prob: np.ndarray, target: np.ndarray, thresholds=THRESHOLDS) -> dict[str, float]:
    """The ISBI 2012 challenge's scores of one slice's neuron probability map: the best V_rand and the best
    V_info (thinned, foreground-restricted) over ``thresholds``, and the thresholds that gave them; NaN where
    the slice has fewer than :data:`MIN_NEURONS` whole neurons."""
    gt = scored_neurons(target)
    if _count(gt) < MIN_NEURONS:
        return {k: float("nan") for k in ("v_rand", "v_info", "v_rand_threshold", "v_info_threshold")}
    return _best(isbi_curve(prob, gt, thresholds), thresholds)


def isbi_scores_of(seg: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """V_rand and V_info of an instance segmentation (label 0, where there is any, is border; borders
    thinned) against a target, for post-processings that give instances rather than a map."""
    v_rand, v_info = v_rand_info(thin_borders(seg), scored_neurons(target))
    return {"v_rand": v_rand, "v_info": v_info}


def cremi_scores(seg: np.ndarray, gt_instances: np.ndarray) -> dict[str, float]:
    """CREMI's scores of an instance segmentation: ``vi_split`` = H(seg | gt) (the proposal cuts a
    neuron), ``vi_merge`` = H(gt | seg) (it joins neurons), in bits, and ``are``, the adapted Rand error;
    lower is better, ground-truth label 0 is ignored."""
    gt_instances, seg = _compact(gt_instances), _compact(seg)
    split, merge = variation_of_information(gt_instances, seg, ignore_labels=(0,))
    error, _, _ = adapted_rand_error(gt_instances, seg, ignore_labels=(0,))
    return {"vi_split": float(split), "vi_merge": float(merge), "are": float(error)}


def segmentation_errors(seg: np.ndarray, gt_instances: np.ndarray, *, min_pixels: int = 20,
                        limit: int = 10, offset: tuple[int, int] = (0, 0)) -> list[dict]:
    """The largest errors a person would fix, against ground-truth instances (label 0 is not counted):

    - a **merge**: one instance of ``seg`` covers at least ``min_pixels`` of each of several true neurons;
      its size is the pixels outside its largest true neuron;
    - a **split**: one true neuron is covered (``min_pixels`` or more each) by several instances; its size
      is the pixels outside its largest instance.

    Returns the ``limit`` largest as dicts: ``kind``, ``pixels``, ``parts`` (neurons or instances
    involved), ``label`` (the instance merged, or the true neuron split) and ``box`` (y0, x0, y1, x1 of the
    instance or the neuron, shifted by ``offset``)."""
    inside = gt_instances > 0
    if not inside.any():
        return []
    su, _, gu, _, ps, pg, count = contingency(seg[inside], gt_instances[inside])
    real = count >= min_pixels
    errors = []
    for kind, own, other, labels, image in (("merge", ps, pg, su, seg), ("split", pg, ps, gu, gt_instances)):
        own, other, sizes = own[real], other[real], count[real]
        parts = np.bincount(own, minlength=len(labels))
        total = np.bincount(own, weights=sizes, minlength=len(labels))
        largest = np.zeros(len(labels))
        np.maximum.at(largest, own, sizes)
        for index in np.flatnonzero(parts >= 2):
            errors.append({"kind": kind, "pixels": int(total[index] - largest[index]), "parts": int(parts[index]),
                           "label": int(labels[index]), "image": image})
    errors.sort(key=lambda e: -e["pixels"])
    kept = []
    for error in errors[:limit]:
        ys, xs = np.nonzero(error.pop("image") == error["label"])
        error["box"] = [int(ys.min()) + offset[0], int(xs.min()) + offset[1], int(ys.max()) + 1 + offset[0],
                        int(xs.max()) + 1 + offset[1]]
        kept.append(error)
    return kept


def evaluate_slice(prob: np.ndarray, target: np.ndarray, *, field: bool = True, seg: np.ndarray | None = None,
                   method: str = DEFAULT_METHOD) -> dict[str, Any]:
    """All metrics of one slice from a neuron probability map and its target: pixel scores and, where the mask
    outlines at least :data:`MIN_NEURONS` whole neurons (:func:`scored_neurons`; else they are left out), Rand-F
    and VI of its instances (``seg``, or made by ``method``) and, with ``field``, the ISBI 2012 scores of the
    map (V_rand, V_info at the slice's best threshold, and ``isbi_curve``: at every threshold, for the stack's
    score) and CREMI's of the instances (VI split and merge, adapted Rand error)."""
    result: dict[str, Any] = pixel_metrics(to_mask(prob), target)
    gt = scored_neurons(target)
    if _count(gt) >= MIN_NEURONS:
        seg = segment(prob, method) if seg is None else seg
        result["rand_f"] = rand_f(seg, gt)
        result["vi"] = vi(seg, gt)
        if field:
            result.update(cremi_scores(seg, gt))
            curve = isbi_curve(prob, gt)
            best = _best(curve)
            result["v_rand"], result["v_info"], result["isbi_curve"] = best["v_rand"], best["v_info"], curve
    return result


def mean_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The mean of each score over the slices that have it (NaN ones left out), and the ISBI 2012 scores as
    the challenge takes them over a stack: at the one threshold where the slices' mean is best (from their
    ``isbi_curve``, where every slice that has a V_rand has one)."""
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, int | float)})
    mean = {}
    for k in keys:
        values = np.array([r[k] for r in rows if isinstance(r.get(k), int | float)], np.float64)
        mean[k] = float(np.mean(values[np.isfinite(values)])) if np.isfinite(values).any() else float("nan")
    curves = [r.get("isbi_curve") for r in rows if "v_rand" in r]  # (an instance segmentation's scores: none)
    if curves and all(isinstance(c, dict) and len(c.get("v_rand", ())) == len(THRESHOLDS) for c in curves):
        for key in ("v_rand", "v_info"):
            table = np.array([c[key] for c in curves], np.float64)
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # (a threshold with no finite value)
                per_threshold = np.nanmean(table, axis=0)
            if np.isfinite(per_threshold).any():
                mean[key] = float(np.nanmax(per_threshold))
    return mean
