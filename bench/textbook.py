"""A U-Net written the textbook way (as in most tutorials and milesial/Pytorch-UNet): double 3×3 conv
+ BN + ReLU blocks, max-pool down, transposed convolution up, skips from before each pool. Same depth and
width as ours; used by bench/speed.py only, as the yardstick for our implementation choices."""

from __future__ import annotations

import torch
from torch import nn


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TextbookUNet(nn.Module):
    def __init__(self, width: int = 64, depth: int = 4):
        super().__init__()
        chans = [width * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(1, chans[0])
        self.down = nn.ModuleList(DoubleConv(chans[i], chans[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth)))
        self.dec = nn.ModuleList(DoubleConv(chans[i] * 2, chans[i]) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for block in self.down:
            skips.append(block(nn.functional.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for up, dec in zip(self.up, self.dec, strict=True):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.outc(x)
