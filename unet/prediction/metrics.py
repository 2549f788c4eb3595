"""Segmentation metrics as plain functions of arrays.

Pixel metrics compare neuron masks; pixels whose target is IGNORE are skipped. Instance metrics are
scikit-image's: Rand-F = 1 − ``adapted_rand_error`` and VI = the sum of the two conditional entropies of
``variation_of_information``; ground-truth label 0 (membrane) is ignored, as in the ISBI 2012 challenge.

The field's own scores, beside them:

- **ISBI 2012** (Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142; the challenge's Fiji evaluation,
  ``trainableSegmentation.metrics``): the foreground-restricted Rand score V_rand and information
  theoretic score V_info after border thinning, the best over the thresholds 0.0, 0.1, … 0.9 of the
  neuron probability (:func:`isbi_scores`). Objects are the 4-connected components of each side's
  neuron pixels; both sides' borders are thinned to one pixel (:func:`thin_borders`); only pixels inside
  a ground-truth object count, and a proposal's border pixel among them is an object of its own. Written
  here from the paper's and the script's definitions: no maintained Python package implements them.
- **CREMI**: the split and merge variation of information (H(seg | gt), H(gt | seg), in bits) and the
  adapted Rand error of an instance segmentation, ground-truth label 0 ignored (:func:`cremi_scores`,
  scikit-image's ``variation_of_information`` and ``adapted_rand_error``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.metrics import adapted_rand_error, variation_of_information
from skimage.segmentation import watershed

from unet.prediction.postprocess import DEFAULT_METHOD, segment, to_mask
from unet.training.labels import IGNORE, NEURON, target_to_instances


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


def rand_f(seg: np.ndarray, gt_instances: np.ndarray) -> float:
    """1 − adapted Rand error of a segmentation against ground-truth instances (0 ignored)."""
    error, _, _ = adapted_rand_error(gt_instances, seg, ignore_labels=(0,))
    return float(1.0 - error)


def vi(seg: np.ndarray, gt_instances: np.ndarray) -> float:
    """Variation of information (split + merge, in nats); lower is better."""
    split, merge = variation_of_information(gt_instances, seg, ignore_labels=(0,))
    return float(split + merge)


def pixel_metrics(pred_mask: np.ndarray, target: np.ndarray) -> dict[str, float]:
    return {"pixel_error": pixel_error(pred_mask, target), "dice": dice(pred_mask, target),
            "iou": iou(pred_mask, target)}


#: Thresholds of the neuron probability the ISBI scores are taken over (a pixel is neuron above one).
THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(10))


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
    v_info = 2 * mutual / (h_s + h_t) if h_s + h_t > 1e-12 else 1.0
    return float(v_rand), float(v_info)


def _gt_objects(target: np.ndarray) -> np.ndarray:
    """The ground truth as the ISBI scores see it: neuron components, borders thinned to one pixel,
    unlabelled (IGNORE) pixels left out."""
    gt = thin_borders(target_to_instances(target))
    gt[target == IGNORE] = 0
    return gt


def isbi_scores(prob: np.ndarray, target: np.ndarray, thresholds=THRESHOLDS) -> dict[str, float]:
    """The ISBI 2012 challenge's scores of a neuron probability map: the best V_rand and the best V_info
    (thinned, foreground-restricted) over ``thresholds``, and the thresholds that gave them."""
    gt = _gt_objects(target)
    best = {"v_rand": -1.0, "v_info": -1.0, "v_rand_threshold": float("nan"), "v_info_threshold": float("nan")}
    if not gt.any():
        return {k: float("nan") for k in best}
    for t in thresholds:
        proposal, _ = ndi.label(prob > t)
        scores = dict(zip(("v_rand", "v_info"), v_rand_info(thin_borders(proposal), gt), strict=True))
        for key, value in scores.items():
            if value > best[key]:
                best[key], best[f"{key}_threshold"] = value, float(t)
    return best


def isbi_scores_of(seg: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """V_rand and V_info of an instance segmentation (label 0, where there is any, is border; borders
    thinned) against a target, for post-processings that give instances rather than a map."""
    v_rand, v_info = v_rand_info(thin_borders(seg), _gt_objects(target))
    return {"v_rand": v_rand, "v_info": v_info}


def cremi_scores(seg: np.ndarray, gt_instances: np.ndarray) -> dict[str, float]:
    """CREMI's scores of an instance segmentation: ``vi_split`` = H(seg | gt) (the proposal cuts a
    neuron), ``vi_merge`` = H(gt | seg) (it joins neurons), in bits, and ``are``, the adapted Rand error;
    lower is better, ground-truth label 0 is ignored."""
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
                   method: str = DEFAULT_METHOD) -> dict[str, float]:
    """All metrics of one slice from a neuron probability map and its target: pixel scores, Rand-F and
    VI of its instances (``seg``, or made by ``method``) and, with ``field``, the ISBI 2012 scores of the
    map (V_rand, V_info) and CREMI's of the instances (VI split and merge, adapted Rand error)."""
    result = pixel_metrics(to_mask(prob), target)
    if np.any(target != IGNORE):
        seg = segment(prob, method) if seg is None else seg
        gt = target_to_instances(target)
        result["rand_f"] = rand_f(seg, gt)
        result["vi"] = vi(seg, gt)
        if field and gt.any():
            result.update(cremi_scores(seg, gt))
            scores = isbi_scores(prob, target)
            result["v_rand"], result["v_info"] = scores["v_rand"], scores["v_info"]
    return result


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: float(np.nanmean([r[k] for r in rows if k in r])) for k in keys}
