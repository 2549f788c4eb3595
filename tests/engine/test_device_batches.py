"""Training batches made with torch ops where the network runs (issue 30), against the NumPy reference
(:class:`unet.training.data.PatchSampler`): flips exactly, the deformation and the colours statistically; and a
training step that does not read its loss back to the host."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import ClassVar

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from unet.network.config import AugmentConfig, preset
from unet.training.augment import dihedral, elastic_fields
from unet.training.data import PatchSampler, TrainData
from unet.training.device_batches import DeviceSampler, make_sampler
from unet.training.labels import IGNORE
from unet.training.train import LOSS_EVERY, Trainer

FLIPS_ONLY = AugmentConfig(flips=True, elastic_p=0.0, intensity_p=0.0, noise_p=0.0, keep_label_offset=False)


def _slice(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, n)).astype(np.float32) + np.arange(n * n, dtype=np.float32).reshape(n, n) / n
    target = rng.integers(0, 3, size=(n, n)).astype(np.uint8)
    return image, target


def _variants(window_image, window_target):
    """The eight dihedral variants of a window, as the reference makes them."""
    return [(k, f, *dihedral([window_image, window_target], k, f)) for k in range(4) for f in (False, True)]


def test_flips_are_the_references_exactly():
    n = 48
    image, target = _slice(n)
    sampler = DeviceSampler([image], [target], n, n, FLIPS_ONLY, seed=3)
    x, y, w = sampler.sample(64)
    assert x.shape == (64, 1, n, n) and x.dtype == torch.float32 and y.dtype == torch.uint8 and w is None
    variants = _variants(image, target)  # (a slice as large as the patch: the window is the whole slice)
    seen = set()
    for b in range(64):
        matches = [(k, f) for k, f, im, t in variants
                   if np.array_equal(y[b, 0].numpy(), t) and np.array_equal(x[b, 0].numpy(), im)]
        assert matches, f"patch {b} is none of the eight flips of its window"
        seen.add(matches[0])
    assert len(seen) == 8, f"all eight flips are drawn, got {sorted(seen)}"


def test_the_label_offset_stays_where_the_labels_are_drawn():
    """With an offset, each turned patch's image is moved back by the turned offset's difference, as the
    reference does (an integer offset: the reference's cubic shift and our bilinear read agree exactly)."""
    n = 40
    image, target = _slice(n, 1)
    offset = (1.0, 0.0)
    sampler = DeviceSampler([image], [target], n, n, FLIPS_ONLY, seed=5, label_offset=offset)
    x, y, _ = sampler.sample(32)
    from unet.training.augment import dihedral_vector  # (only this test needs it)

    for b in range(32):
        (k, f, turned, _), = [v for v in _variants(image, target) if np.array_equal(y[b, 0].numpy(), v[3])]
        moved = dihedral_vector(offset, k, f)
        move = (moved[0] - offset[0], moved[1] - offset[1])
        want = ndi.shift(turned, move, order=3, mode="reflect") if move != (0.0, 0.0) else turned
        inner = (slice(3, -3), slice(3, -3))  # (the reference reflects the window's edge; we read the slice)
        np.testing.assert_allclose(x[b, 0].numpy()[inner], want[inner], atol=1e-4)


def test_the_deformation_matches_the_reference_statistically():
    """The elastic fields: mean 0, the same spread and the same smoothness (the correlation of two points a
    quarter of the patch apart) as :func:`unet.training.augment.elastic_fields`, over many draws."""
    n, sigma, grid, draws = 96, 10.0, 3, 400
    augment = AugmentConfig(flips=False, elastic_p=1.0, elastic_sigma=sigma, elastic_grid=grid, intensity_p=0,
                            noise_p=0)
    image, target = _slice(n)
    sampler = DeviceSampler([image], [target], n, n, augment, seed=7)
    ours = sampler.displacement(draws).numpy()[:, 0]
    rng = np.random.default_rng(7)
    ref = np.stack([elastic_fields((n, n), rng, sigma, grid)[0] for _ in range(draws)])
    for field in (ours, ref):
        assert abs(field.mean()) < 0.1 * sigma
    assert ours.std() == pytest.approx(ref.std(), rel=0.15)
    a, b = (n // 2, n // 4), (n // 2, n // 2)
    corr = [np.corrcoef(f[:, a[0], a[1]], f[:, b[0], b[1]])[0, 1] for f in (ours, ref)]
    assert corr[0] == pytest.approx(corr[1], abs=0.15)
    # and a deformed batch still holds only labels, and moves the image with its target
    x, y, _ = sampler.sample(16)
    assert set(np.unique(y.numpy())) <= {0, 1, 2}
    assert not torch.equal(x[0, 0], torch.from_numpy(image))


def test_colours_and_noise_match_the_reference_statistically():
    n = 64
    image, target = _slice(n, 2)
    image = (image - image.mean()) / image.std()
    augment = AugmentConfig(flips=False, elastic_p=0.0, intensity_p=0.8, noise_p=0.3, noise_std=0.08)
    ours = DeviceSampler([image], [target], n, n, augment, seed=11).sample(256)[0].numpy()
    ref = PatchSampler([image], [target], n, n, augment, np.random.default_rng(11)).sample(256)[0]
    for stat in (lambda a: a.mean(axis=(1, 2, 3)), lambda a: a.std(axis=(1, 2, 3))):  # per patch
        o, r = stat(ours).astype(float), stat(ref).astype(float)
        assert o.mean() == pytest.approx(r.mean(), abs=0.05 + 0.1 * abs(r.mean()))  # over the patches
        assert o.std() == pytest.approx(r.std(), rel=0.25)


def test_windows_go_where_labels_are_and_slices_by_their_chance():
    n = 64
    image, _ = _slice(n)
    sparse = np.full((n, n), IGNORE, np.uint8)
    sparse[40:44, 10:14] = 1  # four by four labelled pixels in a large slice
    dense = np.zeros((32, 32), np.uint8)
    sampler = DeviceSampler([image, image[:32, :32]], [sparse, dense], 16, 16, FLIPS_ONLY, seed=2)
    assert sampler.p == pytest.approx([16 / (16 + 32 * 32), 32 * 32 / (16 + 32 * 32)])
    sampler.p = [1.0, 0.0]
    _, y, _ = sampler.sample(32)
    assert all((y[b] != IGNORE).any() for b in range(32)), "every window holds a labelled pixel"
    sampler.p = [0.0, 1.0]
    _, y, _ = sampler.sample(8)
    assert (y == 0).all()
    for bad in ([0.0, 0.0], [float("nan"), 1.0], [1.0, float("inf")], [-1.0, 2.0]):
        with pytest.raises(ValueError, match="chance"):
            sampler.p = bad
    unlabelled = DeviceSampler([image, image], [sparse, np.full((n, n), IGNORE, np.uint8)], 16, 16, FLIPS_ONLY)
    assert unlabelled.p == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError, match="no pixel"):
        unlabelled.p = [0.5, 0.5]  # (a slice with nowhere to place a window)
    with pytest.raises(ValueError, match="no labelled pixels"):
        DeviceSampler([image], [np.full((n, n), IGNORE, np.uint8)], 16, 16, FLIPS_ONLY)


def test_new_targets_replace_a_slices_own():
    """A teacher's new answer replaces a slice's targets in place, on the device as on the host."""
    image, target = _slice(40)
    for sampler in (DeviceSampler([image], [target], 40, 40, FLIPS_ONLY, seed=1),
                    PatchSampler([image], [target], 40, 40, FLIPS_ONLY, np.random.default_rng(1))):
        np.testing.assert_array_equal(sampler.target(0), target)
        new = ((target + 1) % 3).astype(np.uint8)
        sampler.set_target(0, new)
        np.testing.assert_array_equal(sampler.target(0), new)
        variants = [dihedral([new], k, f)[0] for k in range(4) for f in (False, True)]
        y = np.asarray(sampler.sample(16)[1])  # (the window is the whole slice: each patch is a flip of it)
        assert all(any(np.array_equal(y[b, 0], v) for v in variants) for b in range(16))
        with pytest.raises(ValueError, match="new targets"):
            sampler.set_target(0, target[:20])


def test_weights_travel_with_their_pixels():
    n = 32
    image, target = _slice(n)
    weights = np.arange(n * n, dtype=np.float32).reshape(n, n)
    _, y, w = DeviceSampler([image], [target], n, n, FLIPS_ONLY, weights=[weights], seed=1).sample(16)
    for b in range(16):
        (k, f, _, _), = [v for v in _variants(image, target) if np.array_equal(y[b, 0].numpy(), v[3])]
        np.testing.assert_array_equal(w[b, 0].numpy(), dihedral([weights], k, f)[0])


class _Watched(torch.Tensor):
    """A loss that notes every read of its value back to the host."""

    reads: ClassVar[list[str]] = []

    def item(self):
        _Watched.reads.append("item")
        return super().item()

    def tolist(self):
        _Watched.reads.append("tolist")
        return super().tolist()

    def __float__(self):
        _Watched.reads.append("float")
        return super().__float__()

    def __bool__(self):
        _Watched.reads.append("bool")
        return super().__bool__()

    def cpu(self, *args, **kwargs):
        _Watched.reads.append("cpu")
        return super().cpu(*args, **kwargs)


def test_a_training_step_does_not_read_the_loss_back(tmp_path, monkeypatch):
    """A step leaves its loss on the device; the losses come back in one read every LOSS_EVERY steps."""
    import unet.training.train as train_module  # (its loss function is watched)

    real = train_module.segmentation_loss
    monkeypatch.setattr(train_module, "segmentation_loss", lambda *a, **k: real(*a, **k).as_subclass(_Watched))
    _Watched.reads = []
    rng = np.random.default_rng(0)
    image = rng.normal(size=(64, 64)).astype(np.float32)
    target = (image > 0).astype(np.uint8)
    config = dataclasses.replace(preset("tiny"), pipeline="device", steps=3 * LOSS_EVERY)
    trainer = Trainer(config, TrainData([image], [target]), None, tmp_path)
    trainer.restore()
    for i in range(LOSS_EVERY - 1):
        loss = trainer.step()
        assert isinstance(loss, torch.Tensor) and not trainer.history, f"step {i + 1} recorded a loss"
    assert _Watched.reads == [], f"a step read its loss back: {_Watched.reads}"
    trainer.step()
    assert _Watched.reads, "the losses are read back every LOSS_EVERY steps"
    assert [h["step"] for h in trainer.history] == list(range(1, LOSS_EVERY + 1))
    assert all(np.isfinite(h["loss"]) for h in trainer.history)


def test_a_loss_that_is_not_finite_still_stops_training(tmp_path):
    image = np.zeros((64, 64), np.float32)
    target = np.ones((64, 64), np.uint8)
    trainer = Trainer(dataclasses.replace(preset("tiny"), pipeline="device"), TrainData([image], [target]), None,
                      tmp_path)
    trainer.restore()
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss became nan"):
        for _ in range(LOSS_EVERY):
            trainer.step()


def test_the_pipeline_is_chosen_by_the_config_and_the_device():
    image, target = _slice(32)
    rng = np.random.default_rng(0)
    cpu = torch.device("cpu")
    for pipeline, kind in (("auto", PatchSampler), ("host", PatchSampler), ("device", DeviceSampler)):
        config = dataclasses.replace(preset("tiny"), pipeline=pipeline)
        assert isinstance(make_sampler(config, cpu, rng, [image], [target], 64), kind)
    with pytest.raises(ValueError, match="pipeline"):
        dataclasses.replace(preset("tiny"), pipeline="gpu")


def test_cpu_threads_are_chosen_by_measurement_and_kept(tmp_path, monkeypatch):
    """The thread count is measured once (the fewest threads within 5% of the fastest), kept per machine and
    network, and $NEUROSEG_TRAIN_THREADS overrides it."""
    from unet.network import threads  # (only these tests use it)

    monkeypatch.delenv("NEUROSEG_TRAIN_THREADS", raising=False)
    config = preset("tiny")
    cache = tmp_path / "threads.json"
    assert threads.candidates(6) == [1, 2, 4, 6] and threads.candidates(1) == [1]
    chosen = threads.choose_threads(config, cores=2, cache=cache, seconds=0.05)
    kept = json.loads(cache.read_text())
    (entry,) = kept.values()
    assert chosen in (1, 2) and entry["threads"] == chosen and set(entry["steps_per_s"]) == {"1", "2"}
    rates = entry["steps_per_s"]
    assert rates[str(chosen)] >= 0.95 * max(rates.values())

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(threads, "steps_per_second", no_measuring)
    assert threads.choose_threads(config, cores=2, cache=cache) == chosen
    with pytest.raises(AssertionError, match="measured again"):  # another network is measured for itself
        threads.choose_threads(preset("tiny", batch_size=3), cores=2, cache=cache)
    monkeypatch.setattr(threads, "steps_per_second", lambda config, n, seconds=0.5: {1: 10.0, 2: 10.2, 4: 4.0}[n])
    assert threads.choose_threads(preset("tiny", batch_size=5), cores=4, cache=cache) == 1  # 2 is within 5%
    cache.write_text("not json")
    assert threads.choose_threads(preset("tiny", batch_size=5), cores=4, cache=cache) == 1  # measured again
    cache.write_text(json.dumps({threads._key(preset("tiny", batch_size=5), 4): {"threads": None}}))
    assert threads.choose_threads(preset("tiny", batch_size=5), cores=4, cache=cache) == 1  # a bad entry: again
    monkeypatch.setenv("NEUROSEG_TRAIN_THREADS", "3")
    assert threads.choose_threads(config, cores=4, cache=cache) == 3
    assert threads.choose_threads(config, cores=2, cache=cache) == 2  # (never more than the cores)
    monkeypatch.setenv("NEUROSEG_TRAIN_THREADS", "lots")
    assert threads.choose_threads(preset("tiny", batch_size=5), cores=4, cache=cache) == 1  # measured instead


def test_slices_predicted_together_get_the_answer_each_gets_alone():
    """Tiles of several slices share batches (prediction that fills a device): each slice's map is the one it
    gets alone, whatever the sizes, and a stack predicted ``together`` is the stack predicted slice by slice."""
    from unet.network.model import UNet  # (only this test builds a bare network)
    from unet.prediction.infer import iter_predict_stack, predict_slice, predict_slices

    torch.manual_seed(0)
    model = UNet(preset("tiny").model)
    rng = np.random.default_rng(4)
    images = [rng.normal(size=shape).astype(np.float32) for shape in ((70, 90), (64, 64), (150, 40), (70, 90))]
    together = predict_slices(model, images, tile=64, batch_size=3)
    for image, prob in zip(images, together, strict=True):
        assert prob.shape == image.shape
        np.testing.assert_allclose(prob, predict_slice(model, image, tile=64, batch_size=3), atol=1e-5)
    volume = rng.integers(0, 255, (5, 48, 48)).astype(np.uint8)
    one = dict(iter_predict_stack(model, volume, [4, 0, 2]))
    grouped = list(iter_predict_stack(model, volume, [4, 0, 2], together=2))
    assert [z for z, _ in grouped] == [4, 0, 2]
    for z, prob in grouped:
        np.testing.assert_allclose(prob, one[z], atol=1e-5)


def test_a_containers_cpu_quota_narrows_the_usable_cores(tmp_path):
    """``docker run --cpus 2`` on a 16-core host leaves the affinity at 16: torch would take 16 threads on 2
    CPUs' time. The quota is read from the cgroup files (v2: the process's group and those above it; v1)."""
    from unet.network.threads import quota_cpus, usable_cores

    own = tmp_path / "self-cgroup"
    root = tmp_path / "cgroup"
    (root / "lab.slice" / "neuroseg").mkdir(parents=True)
    own.write_text("0::/lab.slice/neuroseg\n")
    assert quota_cpus(root, own) is None  # no files: no quota
    (root / "lab.slice" / "neuroseg" / "cpu.max").write_text("max 100000\n")
    assert quota_cpus(root, own) is None
    (root / "lab.slice" / "cpu.max").write_text("250000 100000\n")  # a parent's limit: 2.5 CPUs
    assert quota_cpus(root, own) == 3
    (root / "lab.slice" / "neuroseg" / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one thread
    assert quota_cpus(root, own) == 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert quota_cpus(v1, tmp_path / "absent") is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    assert quota_cpus(v1, tmp_path / "absent") == 2
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
