"""Neurons rather than pixels: 2D instances linked into 3D neurons across slices, and the post-processings
that make instances from a probability map recover known cells."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from unet.prediction.link import link_stack, link_volume
from unet.prediction.metrics import cremi_scores
from unet.prediction.postprocess import METHODS, segment
from unet.training.labels import MEMBRANE, NEURON, target_to_instances
from unet.training.synthetic import make_synthetic_em


def tubes(z=24, size=96, count=6, seed=0):
    """Discs drifting slowly through the slices (tubes), numbered in a different order on every slice,
    and which tube each pixel belongs to."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    centres = rng.uniform(18, size - 18, (count, 2))
    drift = rng.uniform(-0.5, 0.5, (count, 2))
    instances = np.zeros((z, size, size), np.int32)
    truth = np.zeros_like(instances)
    for k in range(z):
        for label, tube in enumerate(rng.permutation(count), start=1):
            cy, cx = centres[tube] + drift[tube] * k
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 7**2
            instances[k][disc & (instances[k] == 0)] = label
            truth[k][disc & (truth[k] == 0)] = tube + 1
    return instances, truth


def test_linking_recovers_each_tube_as_one_neuron():
    instances, truth = tubes()
    neurons = link_volume(instances)
    assert len(np.unique(neurons)) - 1 == len(np.unique(truth)) - 1 == 6
    scores = cremi_scores(neurons.ravel(), truth.ravel())
    assert scores["vi_split"] == pytest.approx(0.0, abs=1e-9) and scores["vi_merge"] == pytest.approx(0.0, abs=1e-9)


def test_a_skipped_slice_breaks_the_chain_and_a_branch_merges_nothing():
    instances, _ = tubes(z=4)
    tables = link_stack(lambda i, r0, r1: instances[i, r0:r1], 4, 96, neighbours=[True, False, True], band=40)
    neurons = np.stack([t[instances[i]] for i, t in enumerate(tables)])
    assert len(np.unique(neurons[:2])) - 1 == 6 and len(np.unique(neurons[2:])) - 1 == 6
    assert not set(np.unique(neurons[:2])[1:]) & set(np.unique(neurons[2:])[1:])  # new neurons after the gap
    # one cell in slice 0 that splits into two in slice 1: it continues in the larger, the smaller is new
    branch = np.zeros((2, 20, 40), np.int32)
    branch[0, :, :30] = 1
    branch[1, :, :18] = 1
    branch[1, :, 20:30] = 2
    linked = link_volume(branch)
    assert linked[1][branch[1] == 1].max() == linked[0].max() == 1 and linked[1][branch[1] == 2].min() == 2


@pytest.mark.parametrize("method", METHODS)
def test_each_post_processing_recovers_known_cells_from_a_clean_map(method):
    _, labels = make_synthetic_em((1, 160, 160), np.random.default_rng(3), cell_size=28)
    target = np.where(labels[0] > 0, NEURON, MEMBRANE).astype(np.uint8)
    prob = ndi.gaussian_filter((target == NEURON).astype(np.float32), 1.0)
    truth = target_to_instances(target)
    scores = cremi_scores(segment(prob, method), truth)
    assert scores["vi_split"] + scores["vi_merge"] < 0.1, scores


def test_thin_cells_without_a_deep_maximum_still_get_instances():
    """Cells narrower than twice the watershed's h have no seed of their own: each connected cell is one
    (the watershed once gave every pixel 0 here)."""
    prob = np.zeros((40, 40), np.float32)
    prob[5:35, 5:9] = 1  # two thin cells, 4 px wide
    prob[5:35, 20:24] = 1
    labels = segment(prob, "watershed", h=4.0, smooth=0.0)
    assert labels.min() >= 1 and len(np.unique(labels)) == 2
