import dataclasses

import pytest
import torch

from unet.network.config import ModelConfig, TrainConfig, preset
from unet.network.model import UNet
from unet.network.sizes import check_input_size, output_size, valid_input_sizes

SHAPES = [
    # (config, input (B, C, H, W), output (B, C, H', W'))
    (ModelConfig(), (1, 1, 512, 512), (1, 1, 373, 373)),  # the brief/paper: 512 → 373
    (ModelConfig(), (2, 1, 572, 572), (2, 1, 437, 437)),
    (ModelConfig(padding="same"), (1, 1, 512, 512), (1, 1, 512, 512)),
    (ModelConfig(padding="same", depth=2, initial_features=8), (3, 1, 64, 96), (3, 1, 64, 96)),
    (ModelConfig(in_channels=2, out_channels=3, depth=3, initial_features=8), (1, 2, 188, 188), (1, 3, 125, 125)),
    (ModelConfig(depth=1, initial_features=4, batch_norm=True), (1, 1, 40, 40), (1, 1, 31, 31)),
]


@pytest.mark.parametrize(("config", "shape_in", "shape_out"), SHAPES)
def test_output_shapes(config, shape_in, shape_out):
    # meta tensors give shapes without the arithmetic, so the full-width 512² network is instant
    model = UNet(config).to("meta")
    out = model(torch.empty(shape_in, device="meta"))
    assert tuple(out.shape) == shape_out
    assert output_size(config, shape_in[-1]) == shape_out[-1]


def test_small_network_runs_for_real():
    model = UNet(ModelConfig(depth=2, initial_features=4, padding="valid", batch_norm=True))
    out = model(torch.randn(2, 1, 76, 76))
    assert out.shape == (2, 1, output_size(model.config, 76), output_size(model.config, 76))
    assert torch.isfinite(out).all()


def test_checkpoint_keys_are_named():
    keys = set(UNet(ModelConfig(depth=2, initial_features=4)).state_dict())
    assert "contracting.0.conv1.conv.weight" in keys
    assert "expanding.1.up_conv.conv.weight" in keys
    assert "out_features.conv.weight" in keys


def test_channels_double_and_halve():
    model = UNet(ModelConfig(depth=3, initial_features=8))
    assert [b.conv1.conv.out_channels for b in model.contracting] == [16, 32, 64]
    assert [b.conv2.conv.out_channels for b in model.expanding] == [32, 16, 8]


def test_forward_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"expects \(B, 1, H, W\)"):
        UNet(ModelConfig(depth=1, initial_features=2))(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize(("changes", "message"), [
    ({"depth": 0}, "depth must be a positive integer"),
    ({"initial_features": -4}, "initial_features must be a positive integer"),
    ({"padding": "full"}, "padding must be 'valid' or 'same'"),
    ({"depth": 9}, "at most 6"),
])
def test_model_config_rules(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes)


def test_input_size_checks():
    assert check_input_size(ModelConfig(), 512) == 373
    with pytest.raises(ValueError, match="divisible by 2\\*\\*depth = 16"):
        check_input_size(ModelConfig(padding="same"), 100)
    with pytest.raises(ValueError, match="shrink"):
        check_input_size(ModelConfig(), 60)
    sizes = valid_input_sizes(ModelConfig(), 500, 600)
    assert 508 in sizes and 572 in sizes and 512 not in sizes  # 512 pools an odd size on the way down


def test_configs_round_trip_through_json_dicts():
    config = preset("cpu-quick", steps=7, model={"initial_features": 8})
    again = TrainConfig.from_dict(config.to_dict())
    assert again == config and again.model.initial_features == 8
    assert ModelConfig.from_dict(dataclasses.asdict(config.model)) == config.model


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ValueError, match="unknown key"):
        ModelConfig.from_dict({"depth": 3, "widht": 8})
    data = preset("tiny").to_dict()
    data["learning_rate"] = 1
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict(data)


def test_train_config_rejects_a_patch_the_network_cannot_take():
    with pytest.raises(ValueError, match="divisible by 2\\*\\*depth = 16, got 100"):
        preset("cpu-quick", patch_size=100)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("fast")
