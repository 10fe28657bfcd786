"""The DCGAN generator and discriminator, following the paper's architecture guidelines.

- strided (transposed) convolutions instead of pooling; no hidden fully connected layers;
- z is projected and reshaped to a 4x4 map (a transposed convolution from 1x1 does both);
- batchnorm everywhere except the generator output and the discriminator input;
- ReLU + Tanh in G, LeakyReLU(0.2) in D; D returns logits (paired with BCEWithLogits, the
  numerically safe form of the paper's sigmoid + log loss);
- weights drawn from N(0, 0.02), batchnorm scales from N(1, 0.02).

One block per doubling of resolution, so 32, 64 and 128 px share one definition. With
`fast_layers`, the strided layers of G and D are `dcgan.layers`' forms of the same layers
(same parameters and state dict), which run faster on the CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dcgan.layers import (
    ImageConv2d,
    ImageTranspose2d,
    LogitConv2d,
    ProjectTranspose2d,
    WideConv2d,
    WideTranspose2d,
)
from dcgan.settings import RESOLUTIONS


def _depth(resolution: int) -> int:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution}")
    return int(math.log2(resolution)) - 2  # number of stride-2 stages between 4x4 and the image


class Generator(nn.Module):
    def __init__(
        self, resolution: int = 64, nz: int = 100, ngf: int = 64, nc: int = 3, fast_layers: bool = False
    ) -> None:
        super().__init__()
        n = _depth(resolution)
        width = ngf * 2 ** (n - 1)
        plain = nn.ConvTranspose2d
        first, inner, last = (ProjectTranspose2d, WideTranspose2d, ImageTranspose2d) if fast_layers else (plain,) * 3
        layers: list[nn.Module] = [
            first(nz, width, 4, 1, 0, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(True),
        ]
        for _ in range(n - 1):
            layers += [
                inner(width, width // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width // 2),
                nn.ReLU(True),
            ]
            width //= 2
        layers += [last(width, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.nz = nz
        self.resolution = resolution

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.view(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    def __init__(self, resolution: int = 64, ndf: int = 64, nc: int = 3, fast_layers: bool = False) -> None:
        super().__init__()
        n = _depth(resolution)
        first, inner, last = (ImageConv2d, WideConv2d, LogitConv2d) if fast_layers else (nn.Conv2d,) * 3
        layers: list[nn.Module] = [first(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        width = ndf
        for _ in range(n - 1):
            layers += [
                inner(width, width * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width * 2),
                nn.LeakyReLU(0.2, True),
            ]
            width *= 2
        layers.append(last(width, 1, 4, 1, 0, bias=False))
        self.main = nn.Sequential(*layers)
        self.resolution = resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).flatten()


class ImageNetDiscriminator32(nn.Module):
    """The paper's 32 px ImageNet-1k discriminator for the CIFAR-10 experiment (section 5.1).

    Six 3x3 convolutions of widths 128, 128, 256, 256, 512, 512 (every second one strided),
    batchnorm after all but the first, LeakyReLU 0.2, and a real/fake logit on top.
    """

    WIDTHS = (128, 128, 256, 256, 512, 512)

    def __init__(self, fast_layers: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, width in enumerate(self.WIDTHS):
            layers.append(nn.Conv2d(c_in, width, 3, 2 if i % 2 == 1 else 1, 1, bias=False))
            if i > 0:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.LeakyReLU(0.2, True))
            c_in = width
        layers.append((LogitConv2d if fast_layers else nn.Conv2d)(c_in, 1, 4, 1, 0, bias=False))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).flatten()


DISCRIMINATORS = ("dcgan", "imagenet32")


def build_discriminator(kind: str, resolution: int, ndf: int = 64, fast_layers: bool = False) -> nn.Module:
    """`dcgan`: the guideline D for 32/64/128 px; `imagenet32`: the paper's CIFAR-10 feature D."""
    if kind == "dcgan":
        return Discriminator(resolution, ndf, fast_layers=fast_layers)
    if kind == "imagenet32":
        if resolution != 32:
            raise ValueError(f"the imagenet32 discriminator works at 32 px, not {resolution}")
        return ImageNetDiscriminator32(fast_layers)
    raise ValueError(f"discriminator must be one of {DISCRIMINATORS}, got {kind!r}")


def init_weights(module: nn.Module) -> None:
    """The paper's initialisation: conv weights ~ N(0, 0.02); BN scale ~ N(1, 0.02), shift 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
