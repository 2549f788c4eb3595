"""The network's layers and its ``nn.Module``, with nothing but PyTorch: the architecture file of an
exported BioImage.IO package (``unet.exchange.bioimageio``), which ilastik, deepImageJ's PyTorch engine or
``bioimageio.core`` load without Neuroseg. :class:`unet.network.model.UNet` is this module built from a
:class:`~unet.network.config.ModelConfig` (the same layers, the same state-dict keys).

``NeurosegUNet``: ``FeatureMapBlock`` (1×1 conv) → ``depth`` × ``ContractingBlock`` (two 3×3 conv + ReLU,
2×2 max-pool, channels double) → ``depth`` × ``ExpandingBlock`` (bilinear ×2 upsampling, 2×2 conv halving
the channels, centre-cropped skip connection, two 3×3 conv + ReLU) → ``FeatureMapBlock``; it returns
logits (the neuron probability is their sigmoid).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(in_ch: int, out_ch: int, kernel: int, same: bool) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=kernel, padding=kernel // 2 if same else 0)


class UpConv(nn.Module):
    """The 2×2 convolution after upsampling. Same padding pads one pixel at the bottom and right (as
    PyTorch's ``padding="same"`` would, without the extra copy it warns about)."""

    def __init__(self, in_ch: int, out_ch: int, same: bool):
        super().__init__()
        self.same = same
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = nn.functional.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class ConvUnit(nn.Sequential):
    """3×3 convolution, optional batch norm, ReLU; children named ``conv``, ``norm``, ``act``."""

    def __init__(self, in_ch: int, out_ch: int, same: bool, batch_norm: bool):
        super().__init__()
        self.conv = _conv(in_ch, out_ch, 3, same)
        if batch_norm:
            self.norm = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU(inplace=True)


class FeatureMapBlock(nn.Module):
    """A 1×1 convolution that maps ``in_ch`` channels to ``out_ch`` channels; the size is unchanged."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ContractingBlock(nn.Module):
    """Two 3×3 convolutions with ReLU that double the channels, then a 2×2 max-pool."""

    def __init__(self, in_ch: int, same: bool = False, batch_norm: bool = False):
        super().__init__()
        self.conv1 = ConvUnit(in_ch, in_ch * 2, same, batch_norm)
        self.conv2 = ConvUnit(in_ch * 2, in_ch * 2, same, batch_norm)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv2(self.conv1(x)))


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop the last two dimensions of ``x`` to ``height × width`` around the centre (floor offsets)."""
    h, w = x.shape[-2], x.shape[-1]  # (TorchScript: no unpacking of a shape)
    if height > h or width > w:
        raise ValueError(f"cannot crop {h}×{w} to the larger {height}×{width}")
    top, left = (h - height) // 2, (w - width) // 2
    return x[..., top : top + height, left : left + width]


class ExpandingBlock(nn.Module):
    """Bilinear ×2 upsampling, a 2×2 convolution halving the channels, concatenation with the
    centre-cropped skip connection, then two 3×3 convolutions with ReLU (``in_ch`` → ``in_ch // 2``)."""

    def __init__(self, in_ch: int, same: bool = False, batch_norm: bool = False):
        super().__init__()
        if in_ch % 2:
            raise ValueError(f"ExpandingBlock needs an even number of input channels, got {in_ch}")
        # align_corners=False scales by exactly 2, so the network is shift-equivariant and tiles agree
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.up_conv = UpConv(in_ch, in_ch // 2, same)
        self.conv1 = ConvUnit(in_ch, in_ch // 2, same, batch_norm)
        self.conv2 = ConvUnit(in_ch // 2, in_ch // 2, same, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up_conv(self.upsample(x))
        h, w = x.shape[-2], x.shape[-1]
        if skip.shape[-2] < h or skip.shape[-1] < w:
            x = center_crop(x, min(h, skip.shape[-2]), min(w, skip.shape[-1]))
            h, w = x.shape[-2], x.shape[-1]
        x = torch.cat([x, center_crop(skip, h, w)], dim=1)
        return self.conv2(self.conv1(x))


class NeurosegUNet(nn.Module):
    """The U-Net from plain arguments (those of :class:`unet.network.config.ModelConfig`): ``forward`` takes
    ``(B, in_channels, H, W)`` and returns logits ``(B, out_channels, H', W')``."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, depth: int = 4, initial_features: int = 64,
                 padding: str = "valid", batch_norm: bool = False):
        super().__init__()
        same, width = padding == "same", initial_features
        self.in_channels = in_channels
        self.in_features = FeatureMapBlock(in_channels, width)
        self.contracting = nn.ModuleList(ContractingBlock(width * 2**i, same, batch_norm) for i in range(depth))
        self.expanding = nn.ModuleList(
            ExpandingBlock(width * 2 ** (depth - i), same, batch_norm) for i in range(depth)
        )
        self.out_features = FeatureMapBlock(width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, out_channels, H', W')`` for images ``(B, in_channels, H, W)``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects (B, {self.in_channels}, H, W), got {list(x.shape)}")
        skips = [self.in_features(x)]
        for block in self.contracting:
            skips.append(block(skips[-1]))
        x = skips.pop()
        for block in self.expanding:
            x = block(x, skips.pop())
        return self.out_features(x)
