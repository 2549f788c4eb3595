"""Checkpoints, training (resume, fine-tune, stop), tiled inference, post-processing and metrics."""

import json
import pickle

import numpy as np
import pytest
import torch

from unet.exchange.checkpoint import load_checkpoint, save_checkpoint
from unet.network.config import AugmentConfig, ModelConfig, preset
from unet.network.model import UNet
from unet.prediction.infer import predict_slice, predict_stack
from unet.prediction.metrics import dice, iou, pixel_error, rand_f, vi
from unet.prediction.postprocess import instances, to_mask
from unet.training.data import TrainData
from unet.training.labels import IGNORE, NEURON, labels_to_target
from unet.training.reporting import ListReporter
from unet.training.train import lr_at, train


def _data(synthetic):
    volume, labels = synthetic
    return TrainData.from_stack(volume, labels, [0, 1, 2, 3], [4, 5])


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = UNet(ModelConfig(depth=2, initial_features=4, padding="same", batch_norm=True)).eval()
    x = torch.randn(1, 1, 32, 32)
    path = save_checkpoint(tmp_path / "m.pt", model, meta={"step": 3})
    loaded = load_checkpoint(path)
    assert loaded.meta["step"] == 3 and loaded.model_config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded.build_model()(x), model(x), rtol=0, atol=0)
    assert json.loads((tmp_path / "m.json").read_text())["model_config"]["initial_features"] == 4


class _Evil:
    def __reduce__(self):
        return (exec, ("import os; os.environ['NEUROSEG_PWNED'] = '1'",))


def test_checkpoint_loading_never_runs_pickled_code(tmp_path):
    model = UNet(ModelConfig(depth=1, initial_features=2))
    path = save_checkpoint(tmp_path / "m.pt", model)
    torch.save({"model": model.state_dict(), "payload": _Evil()}, path)
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(path)
    import os

    assert "NEUROSEG_PWNED" not in os.environ
    (tmp_path / "x.pt").write_bytes(pickle.dumps({"model": {}}))
    with pytest.raises(ValueError, match="no config file"):
        load_checkpoint(tmp_path / "x.pt")


def test_lr_schedule_warms_up_then_anneals_by_steps_or_time():
    config = preset("tiny", steps=100, warmup_steps=10, lr=1e-2)
    assert lr_at(config, 0, 0) == pytest.approx(1e-3)
    assert lr_at(config, 10, 0) == pytest.approx(1e-2, rel=0.05)
    assert lr_at(config, 99, 0) < 1e-3
    budget = config.replace(max_seconds=60.0)
    assert lr_at(budget, 20, 59.0) < lr_at(budget, 20, 1.0)  # time is further along than steps


def test_train_resume_continues_the_step_count(tmp_path, synthetic, device):
    data = _data(synthetic)
    config = preset("tiny", steps=24, val_every=8, checkpoint_every=8, device=device)
    first = ListReporter(stop_at=8)  # (losses are read at each validation, and every LOSS_EVERY steps)
    result = train(config, data, first, out_dir=tmp_path)
    assert result.reason == "stopped" and result.steps_done == 8
    assert load_checkpoint(tmp_path / "latest.pt").meta["step"] == 8

    second = ListReporter()
    resumed = train(config, data, second, out_dir=tmp_path, resume=True)
    assert resumed.reason == "finished" and resumed.steps_done == 24
    assert second.steps[0][0] == 9  # carries on where it stopped
    assert [h["step"] for h in resumed.history] == list(range(1, 25))
    assert load_checkpoint(tmp_path / "latest.pt").meta["step"] == 24
    assert (tmp_path / "best.pt").exists()


def test_fine_tune_needs_the_same_architecture(tmp_path, synthetic):
    data = _data(synthetic)
    train(preset("tiny", steps=4), data, out_dir=tmp_path / "a")
    result = train(preset("tiny", steps=4), data, out_dir=tmp_path / "b", init_from=tmp_path / "a" / "latest.pt")
    assert result.steps_done == 4
    wider = preset("tiny", steps=4, model={"initial_features": 8})
    with pytest.raises(ValueError, match="cannot fine-tune"):
        train(wider, data, out_dir=tmp_path / "c", init_from=tmp_path / "a" / "latest.pt")


def test_same_seed_same_losses(tmp_path, synthetic, device):
    data = _data(synthetic)
    a = train(preset("tiny", steps=5, device=device), data, out_dir=tmp_path / "a")
    b = train(preset("tiny", steps=5, device=device), data, out_dir=tmp_path / "b")
    # cuDNN's convolution backward is not bitwise deterministic: allow float noise there
    rtol = 1e-5 if device == "cpu" else 1e-2
    np.testing.assert_allclose([h["loss"] for h in a.history], [h["loss"] for h in b.history], rtol=rtol)


def test_time_budget_stops_training(tmp_path, synthetic):
    result = train(preset("tiny", steps=10**6, max_seconds=1.0), _data(synthetic), out_dir=tmp_path)
    assert result.reason == "time_limit" and 0 < result.steps_done < 10**6


def test_early_stopping_when_validation_stops_improving(tmp_path, synthetic):
    # no batch norm and a vanishing learning rate: the validation loss cannot improve after the first
    config = preset("tiny", steps=40, val_every=2, lr=1e-12, warmup_steps=0, early_stop_patience=2,
                    model={"batch_norm": False})
    reporter = ListReporter()
    result = train(config, _data(synthetic), reporter, out_dir=tmp_path)
    assert result.reason == "early_stop"
    assert result.steps_done == 6  # validated at 2 (best), 4 and 6 (no better twice)
    assert [v[0] for v in reporter.validations] == [2, 4, 6]


def test_missing_gpu_is_a_clear_error(tmp_path, synthetic):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="no CUDA GPU is available"):
        train(preset("tiny", device="cuda"), _data(synthetic), out_dir=tmp_path)


@pytest.mark.slow
def test_tiny_net_learns_synthetic_em(tmp_path, synthetic, device):
    data = _data(synthetic)
    result = train(preset("tiny", steps=150, val_every=50, device=device), data, out_dir=tmp_path)
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:10])
    assert result.validations[-1]["val_pixel_error"] < 0.15


def _valid_model():
    torch.manual_seed(3)
    return UNet(ModelConfig(depth=3, initial_features=4, padding="valid")).eval()


def test_tiled_prediction_equals_untiled_valid_padding(device):
    image = np.random.default_rng(0).integers(0, 255, (700, 900)).astype(np.uint8)
    model = _valid_model().to(device)
    whole = predict_slice(model, image, tile=1100)  # one tile covers everything
    tiled = predict_slice(model, image, tile=188, batch_size=3)
    assert tiled.shape == (700, 900) and tiled.dtype == np.float32
    # every output pixel sees its full context in both: equal up to float error and the bilinear
    # upsampling's edge handling at tile borders
    diff = np.abs(tiled - whole)
    assert diff.max() < 1e-3 and np.mean(diff < 1e-4) > 0.95


def test_tiled_prediction_same_padding_agrees_away_from_seams():
    image = np.random.default_rng(1).integers(0, 255, (700, 900)).astype(np.uint8)
    torch.manual_seed(4)
    model = UNet(ModelConfig(depth=3, initial_features=4, padding="same")).eval()
    whole = predict_slice(model, image, tile=912)
    tiled = predict_slice(model, image, tile=256, overlap=64)
    assert tiled.shape == whole.shape == (700, 900)
    close = np.abs(tiled - whole) < 1e-3
    assert close.mean() > 0.85  # zero padding at tile borders only touches pixels near seams
    assert np.abs(tiled - whole).max() < 0.2


def test_predict_stack_small_images_tta_and_progress():
    model = _valid_model()
    volume = np.random.default_rng(2).random((3, 37, 50)).astype(np.float32)
    seen = []
    probs = predict_stack(model, volume, slices=[0, 2], tta=True, progress=lambda i, n: seen.append((i, n)))
    assert probs.shape == (2, 37, 50) and seen == [(1, 2), (2, 2)]
    assert ((probs >= 0) & (probs <= 1)).all()


def test_metrics_on_hand_made_arrays():
    target = np.array([[1, 1, 0, 0], [1, 1, 0, IGNORE]], np.uint8)
    pred = np.array([[1, 0, 0, 0], [1, 1, 1, 1]], np.uint8)
    assert pixel_error(pred, target) == pytest.approx(2 / 7)
    assert dice(pred, target) == pytest.approx(2 * 3 / (4 + 4))
    assert iou(pred, target) == pytest.approx(3 / 5)
    assert dice(np.zeros((2, 2)), np.zeros((2, 2), np.uint8)) == 1.0
    gt = np.array([[1, 1, 0, 2, 2]] * 3)
    assert rand_f(gt, gt) == pytest.approx(1.0) and vi(gt, gt) == pytest.approx(0.0, abs=1e-9)
    merged = np.ones_like(gt)
    assert rand_f(merged, gt) < 0.8 and vi(merged, gt) > 0.5


def test_watershed_separates_cells_joined_by_a_gap():
    prob = np.zeros((60, 100), np.float32)
    prob[10:50, 10:48] = 1
    prob[10:50, 52:90] = 1
    prob[28:32, 48:52] = 1  # a gap in the membrane joins the two cells
    seg = instances(prob)
    assert seg[30, 25] != seg[30, 75]
    assert seg.min() >= 1  # every pixel belongs to some instance
    assert to_mask(prob).sum() == int((prob > 0.5).sum())


def test_engine_learns_synthetic_stack_end_to_end(tmp_path, synthetic, device):
    """Train briefly, predict a slice, and get more right than a constant guess."""
    volume, labels = synthetic
    result = train(preset("tiny", steps=40, device=device), _data(synthetic), out_dir=tmp_path)
    model = load_checkpoint(tmp_path / "best.pt").build_model(device)
    prob = predict_slice(model, volume[5])
    target = labels_to_target(labels[5])
    baseline = min(np.mean(target == NEURON), np.mean(target != NEURON))
    assert pixel_error(to_mask(prob), target) < baseline
    assert result.best is not None


def test_training_with_the_papers_border_weights(tmp_path, synthetic):
    result = train(preset("tiny", steps=6, border_weight=10.0), _data(synthetic), out_dir=tmp_path)
    assert result.steps_done == 6 and all(np.isfinite(h["loss"]) for h in result.history)


def test_test_time_augmentation_is_invariant_to_the_square_symmetries():
    torch.manual_seed(5)
    model = UNet(ModelConfig(depth=2, initial_features=4, padding="same")).eval()
    image = np.random.default_rng(3).random((64, 64)).astype(np.float32)
    base = predict_slice(model, image, tta=True)
    rotated = predict_slice(model, np.rot90(image).copy(), tta=True)
    np.testing.assert_allclose(np.rot90(base), rotated, atol=1e-5)
    plain = predict_slice(model, np.rot90(image).copy(), tta=False)
    assert np.abs(np.rot90(base) - plain).max() > 1e-4  # without TTA an untrained net is not invariant


class _DrawsOffset(UNet):
    """A stand-in for a network that learned a drawing convention: its "membranes" are its input moved
    by ``drawn`` px, in whatever frame it is shown."""

    def __init__(self, drawn):
        super().__init__(ModelConfig(depth=2, initial_features=4, padding="same"))
        self.drawn = drawn

    def forward(self, x):
        from unet.prediction.infer import _shift

        return 2 * _shift(x, *self.drawn)


def test_test_time_flips_keep_a_learned_drawing_convention():
    from scipy import ndimage as ndi

    image = ndi.gaussian_filter(np.random.default_rng(4).normal(size=(96, 96)), 3).astype(np.float32)
    model = _DrawsOffset((-0.6, 0.3)).eval()
    plain = predict_slice(model, image)
    inner = (slice(8, -8), slice(8, -8))
    blurred = np.abs(predict_slice(model, image, tta=True) - plain)[inner].max()
    model.label_offset = (-0.6, 0.3)
    kept = np.abs(predict_slice(model, image, tta=True) - plain)[inner].max()
    assert kept < 0.04 and blurred > 0.15  # flipped back, every flip draws the borders where the plain pass does


def test_a_checkpoint_keeps_the_labels_convention_and_a_fine_tune_inherits_it(tmp_path):
    from scipy import ndimage as ndi

    from unet.training.synthetic import make_synthetic_em

    volume, labels = make_synthetic_em((2, 128, 128), np.random.default_rng(3), noise=4.0)
    moved = np.stack([np.clip(ndi.shift(v.astype(np.float32), (0.6, -0.3), order=3, mode="reflect"), 0, 255)
                      for v in volume]).astype(np.uint8)  # the labels sit (-0.6, +0.3) from the membranes
    train(preset("tiny", steps=2), TrainData.from_stack(moved, labels, [0, 1], []), out_dir=tmp_path / "full")
    ckpt = load_checkpoint(tmp_path / "full" / "latest.pt")
    dy, dx = ckpt.meta["label_offset"]
    assert abs(dy + 0.6) < 0.1 and abs(dx - 0.3) < 0.1
    assert ckpt.build_model().label_offset == (dy, dx)
    strokes = labels_to_target(labels)
    strokes[:, 20:] = IGNORE  # scribbles: nothing to measure, so the starting weights' convention is kept
    train(preset("tiny", steps=2), TrainData.from_stack(moved, strokes, [0, 1], [], encoded=True),
          out_dir=tmp_path / "tuned", init_from=tmp_path / "full" / "latest.pt")
    assert load_checkpoint(tmp_path / "tuned" / "latest.pt").meta["label_offset"] == [dy, dx]
    train(preset("tiny", steps=2, augment=AugmentConfig(keep_label_offset=False)),
          TrainData.from_stack(moved, labels, [0, 1], []), out_dir=tmp_path / "off")
    assert load_checkpoint(tmp_path / "off" / "latest.pt").meta["label_offset"] == [0.0, 0.0]
