"""The U-Net of the project's brief.

``FeatureMapBlock`` (1×1 conv) → ``depth`` × ``ContractingBlock`` (two 3×3 conv + ReLU, 2×2 max-pool,
channels double) → ``depth`` × ``ExpandingBlock`` (bilinear ×2 upsampling, 2×2 conv halving the channels,
centre-cropped skip connection, two 3×3 conv + ReLU) → ``FeatureMapBlock``.

As in the brief, the skip connections come from the output of each contracting block (after pooling)
and from the first feature map, and the deepest contracting block is the bottleneck. With
``padding="valid"`` no convolution pads (512² in → 373² out at depth 4, the paper's overlap-tile setting);
with ``padding="same"`` every convolution pads and the output has the input's size whenever that is
divisible by ``2**depth``.
"""

from __future__ import annotations

import torch  # noqa: F401 (the doctest's)

from unet.network.arch import (  # noqa: F401 (re-exported: the layers live in unet.network.arch, PyTorch only)
    ContractingBlock,
    ConvUnit,
    ExpandingBlock,
    FeatureMapBlock,
    NeurosegUNet,
    UpConv,
    center_crop,
)
from unet.network.config import ModelConfig
from unet.network.sizes import check_input_size, output_size, valid_input_sizes

__all__ = ["UNet", "center_crop", "check_input_size", "output_size", "valid_input_sizes"]


class UNet(NeurosegUNet):
    """The brief's U-Net. ``forward`` takes ``(B, in_channels, H, W)`` and returns **logits** of shape
    ``(B, out_channels, H', W')`` where ``H' = output_size(H)`` (smaller than ``H`` with valid padding).

    Checkpoint keys read ``contracting.0.conv1.conv.weight``.

    Args:
        config: the architecture (:class:`~unet.network.config.ModelConfig`; its defaults when None), kept as
            ``self.config`` so that a checkpoint's JSON config rebuilds the same network.

    Example:
        >>> net = UNet(ModelConfig(depth=2, initial_features=4, padding="same"))
        >>> net(torch.zeros(1, 1, 64, 64)).shape
        torch.Size([1, 1, 64, 64])
    """

    #: The labels' drawing convention the weights learned (``(dy, dx)`` px, :func:`unet.training.labels.label_offset`);
    #: test-time flips keep it (:func:`unet.prediction.infer.predict_slice`). Set from the checkpoint.
    label_offset = (0.0, 0.0)

    def __init__(self, config: ModelConfig | None = None):
        config = config or ModelConfig()
        super().__init__(**config.to_dict())
        self.config = config

    def output_size(self, size: int) -> int:
        return output_size(self.config, size)
