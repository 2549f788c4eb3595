import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from unet.network.config import AugmentConfig
from unet.network.losses import masked_bce, masked_dice, segmentation_loss
from unet.training.augment import augment_patch, dihedral, dihedral_vector
from unet.training.data import PatchSampler, TrainData, normalize_image
from unet.training.labels import (
    IGNORE,
    MEMBRANE,
    NEURON,
    border_weights,
    instances_to_target,
    label_offset,
    labels_to_target,
    slice_label_offset,
    target_to_instances,
)
from unet.training.synthetic import make_synthetic_em


@pytest.mark.parametrize("labels", [
    np.array([[0, 255], [255, 0]], np.uint8),
    np.array([[0, 1], [1, 0]], np.uint8),
    np.array([[False, True], [True, False]]),
])
def test_binary_labels_become_targets(labels):
    np.testing.assert_array_equal(labels_to_target(labels), [[MEMBRANE, NEURON], [NEURON, MEMBRANE]])


def test_instance_labels_get_membranes_between_touching_cells():
    inst = np.zeros((10, 12), np.uint16)
    inst[:, :6] = 7
    inst[:, 6:] = 9
    inst[:, 0] = 0  # background on the left
    target = labels_to_target(inst)
    assert set(np.unique(target).tolist()) == {MEMBRANE, NEURON}
    assert (target[:, 5] == MEMBRANE).all() and (target[:, 6] == MEMBRANE).all()  # the shared border
    assert (target[:, 2] == NEURON).all() and (target[:, 9] == NEURON).all()
    assert (target[:, 0] == MEMBRANE).all() and (target[:, 1] == NEURON).all()  # outline not eroded
    assert target_to_instances(target).max() == 2  # the two cells are separate again


def test_class_labels_are_read_as_named_and_detect_asks_rather_than_guess():
    """ilastik saves its classes 1 and 2 with 0 where nothing is labelled: read as neuron ids, its membrane
    class became neurons and every unlabelled pixel membrane. Detect now refuses such a file and names it."""
    classes = np.array([[0, 1, 1], [2, 2, 0]], np.uint8)
    np.testing.assert_array_equal(labels_to_target(classes, "classes-neuron-first"),
                                  [[IGNORE, NEURON, NEURON], [MEMBRANE, MEMBRANE, IGNORE]])
    np.testing.assert_array_equal(labels_to_target(classes, "classes-membrane-first"),
                                  [[IGNORE, MEMBRANE, MEMBRANE], [NEURON, NEURON, IGNORE]])
    for odd in (classes, np.array([[0, 7], [128, 255]], np.uint8)):
        with pytest.raises(ValueError, match="say which under 'Labels are'"):
            labels_to_target(odd, ask=True)
        with pytest.raises(ValueError, match="say which"):
            labels_to_target(odd[None], ask=True)  # (a stack too)
        np.testing.assert_array_equal(labels_to_target(odd), labels_to_target(odd, "instances"))  # (unasked:
    # the command line and training files read them as neuron ids, as before)
    crop = np.zeros((3, 6, 6), np.uint16)  # a relabelled crop: a few neurons a slice, ids from 1
    crop[0, :, :3], crop[0, :, 3:], crop[1, 1:4, 1:4], crop[2, :2] = 1, 2, 3, 17
    np.testing.assert_array_equal(labels_to_target(crop), np.stack([instances_to_target(s) for s in crop]))
    assert set(np.unique(labels_to_target(classes, "instances")).tolist()) == {MEMBRANE, NEURON}  # (as asked)
    with pytest.raises(ValueError, match=r"class labels are 0 .* but these hold 3"):
        labels_to_target(classes + 1, "classes-neuron-first")
    many = np.arange(1, 21, dtype=np.uint16).repeat(4).reshape(8, 10)  # twenty neurons: ids, no question
    assert labels_to_target(many).shape == many.shape


def test_float_labels_are_refused():
    with pytest.raises(ValueError, match="not floating point"):
        labels_to_target(np.zeros((4, 4), np.float32))


def test_border_weights_are_highest_between_close_cells():
    target = np.full((40, 60), MEMBRANE, np.uint8)
    target[5:35, 5:28] = NEURON
    target[5:35, 30:55] = NEURON  # 2-pixel membrane at x = 28, 29
    target[0, 0] = IGNORE
    w = border_weights(target, w0=10, sigma=5)
    assert w[20, 28] > 8  # thin membrane between the two cells
    assert w[20, 28] > w[20, 58] + 5  # outer membrane, far from a second cell
    assert w[20, 15] == 1 and w[0, 0] == 0


def _aligned_pair(rng):
    target = (rng.random((64, 64)) > 0.5).astype(np.uint8)
    target = np.kron(target[:16, :16], np.ones((4, 4), np.uint8))  # 4×4 blocks: survives interpolation
    image = target.astype(np.float32) * 10.0 + 5.0
    return image, target


def test_dihedral_moves_image_and_target_together():
    rng = np.random.default_rng(0)
    image, target = _aligned_pair(rng)
    for k in range(4):
        for flip in (False, True):
            im, t = dihedral([image, target], k, flip)
            np.testing.assert_array_equal(im > 10, t == 1)


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_dihedral_vector_is_where_dihedral_moves_a_pixel(k, flip):
    a = np.zeros((9, 9))
    a[4 + 1, 4 + 3] = 1  # one pixel at (1, 3) from the centre
    y, x = np.argwhere(dihedral([a], k, flip)[0] == 1)[0]
    assert (y - 4, x - 4) == dihedral_vector((1, 3), k, flip)


def _drawn_off(offset, shape=(3, 160, 160)):
    """A synthetic stack whose labels sit ``offset`` px from its membranes (the image moved by −offset)."""
    volume, labels = make_synthetic_em(shape, np.random.default_rng(3), noise=4.0)
    images = [normalize_image(ndi.shift(v.astype(np.float32), (-offset[0], -offset[1]), order=3, mode="reflect"))
              for v in volume]
    return images, [labels_to_target(t) for t in labels]


def test_label_offset_measures_the_drawing_convention():
    images, targets = _drawn_off((0.0, 0.0))
    assert label_offset(images, targets) == (0.0, 0.0)  # labels drawn on the membranes
    images, targets = _drawn_off((-0.6, 0.3))
    dy, dx = label_offset(images, targets)
    assert abs(dy + 0.6) < 0.1 and abs(dx - 0.3) < 0.1
    sparse = [np.full_like(t, IGNORE) for t in targets]
    for s, t in zip(sparse, targets, strict=True):
        s[40:60] = t[40:60]  # a band of strokes: says nothing about the convention
    assert label_offset(images, sparse) is None
    disagree = [images[0], ndi.shift(images[1], (-1.5, 0), order=3, mode="reflect"), images[2]]
    assert label_offset(disagree, targets) is None  # one slice drawn another way: no one convention


def test_flips_keep_the_labels_drawing_convention():
    """Every flipped or turned patch shows the labels where the stack's annotators draw them; without
    the correction a turned patch shows them elsewhere."""
    offset = (-0.6, 0.3)
    images, targets = _drawn_off(offset)
    config = AugmentConfig(flips=True, elastic_p=0.0, intensity_p=0.0, noise_p=0.0)
    kept, turned = [], []
    for seed in range(12):
        image, target, _ = augment_patch(images[0], targets[0], None, config, np.random.default_rng(seed), offset)
        kept.append(slice_label_offset(image, target))
        image, target, _ = augment_patch(images[0], targets[0], None, config, np.random.default_rng(seed))
        turned.append(slice_label_offset(image, target))
    assert np.abs(np.array(kept) - offset).max() < 0.15
    assert np.abs(np.array(turned) - offset).max() > 0.5


def test_elastic_and_intensity_keep_image_and_labels_aligned():
    rng = np.random.default_rng(1)
    image, target = _aligned_pair(rng)
    config = AugmentConfig(elastic_p=1.0, elastic_sigma=6.0, intensity_p=0.0, noise_p=0.0)
    moved = 0
    for _ in range(5):
        im, t, _ = augment_patch(image, target, None, config, rng)
        labelled = t != IGNORE
        agree = np.mean((im[labelled] > 10) == (t[labelled] == 1))
        assert agree > 0.93, agree  # only interpolated edge pixels may disagree
        moved += np.mean(t[labelled] != target[labelled])
    assert moved > 0.05  # it did deform


def test_augmentation_is_reproducible_from_the_generator():
    image, target = _aligned_pair(np.random.default_rng(2))
    a = augment_patch(image, target, None, AugmentConfig(), np.random.default_rng(7))
    b = augment_patch(image, target, None, AugmentConfig(), np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_normalize_image():
    out = normalize_image(np.array([[0, 100], [200, 300]], np.uint16))
    assert out.dtype == np.float32 and abs(out.mean()) < 1e-6 and abs(out.std() - 1) < 1e-5
    assert (normalize_image(np.full((4, 4), 7, np.uint8)) == 0).all()


def test_train_data_checks(synthetic):
    volume, labels = synthetic
    with pytest.raises(ValueError, match="both the training and the validation"):
        TrainData.from_stack(volume, labels, [0, 1], [1, 2])
    with pytest.raises(ValueError, match="no labelled pixels"):
        TrainData([volume[0]], [np.full(volume[0].shape, IGNORE, np.uint8)])
    with pytest.raises(ValueError, match="equal 2-D shapes"):
        TrainData([volume[0]], [labels_to_target(labels[0])[:10]])


def test_sampler_finds_sparse_scribbles(synthetic):
    volume, _ = synthetic
    target = np.full(volume[0].shape, IGNORE, np.uint8)
    target[40:44, 50:60] = NEURON  # one small scribble
    sampler = PatchSampler([normalize_image(volume[0])], [target], 32, 32, AugmentConfig.none(),
                           np.random.default_rng(0))
    _, ys, _ = sampler.sample(16)
    assert all((y != IGNORE).any() for y in ys)


def test_sampler_valid_padding_shapes(synthetic):
    volume, labels = synthetic
    sampler = PatchSampler([normalize_image(v) for v in volume], list(labels_to_target(labels)), 140, 5,
                           AugmentConfig(), np.random.default_rng(0))
    xs, ys, ws = sampler.sample(3)
    assert xs.shape == (3, 1, 140, 140) and ys.shape == (3, 1, 5, 5) and ws is None
    assert xs.dtype == np.float32 and np.isfinite(xs).all()


def test_losses_ignore_unlabelled_pixels():
    torch.manual_seed(0)
    target = torch.randint(0, 2, (2, 1, 16, 16), dtype=torch.uint8)
    target[:, :, :8] = IGNORE
    logits = torch.randn(2, 1, 16, 16, requires_grad=True)
    for fn in (masked_bce, masked_dice, lambda lg, t: segmentation_loss(lg, t, "bce+dice")):
        other = logits.detach().clone()
        other[:, :, :8] = torch.randn(2, 1, 8, 16) * 50  # change only ignored pixels
        assert torch.isclose(fn(logits, target), fn(other, target))
        logits.grad = None
        fn(logits, target).backward()
        assert logits.grad[:, :, :8].abs().max() == 0
        assert logits.grad[:, :, 8:].abs().max() > 0


def test_loss_prefers_the_right_answer():
    target = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    target[..., 4:] = 1
    right = (target.float() * 2 - 1) * 5
    assert segmentation_loss(right, target) < segmentation_loss(-right, target)
    half_wrong = right.clone()
    half_wrong[..., :4] *= -1  # wrong on the left half only
    w = torch.ones(1, 1, 8, 8)
    w[..., :4] = 10  # … which weighs more
    assert masked_bce(half_wrong, target, w) > masked_bce(half_wrong, target)
