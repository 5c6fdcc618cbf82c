"""Motion expression encoder: a ResNet-50 with GroupNorm(1, C) in place of every BatchNorm.

Maps each driving-video face crop (n, 3, 256, 256), RGB in [0, 1], to one expression feature (n, 512)
that the motion refiner turns into 64 tokens. State-dict keys match the official `expression.pth`
(`resnet50.*`, 161 keys).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ExpressionEncoderConfig:
    stage_blocks: tuple[int, ...] = (3, 4, 6, 3)
    stem_channels: int = 64  # stage i has stem_channels * 2**i bottleneck width
    bottleneck_expansion: int = 4
    out_dim: int = 512

    @classmethod
    def tiny(cls) -> "ExpressionEncoderConfig":
        return cls(stage_blocks=(1, 2, 1, 1), stem_channels=8, out_dim=16)


def _group_norm(channels: int) -> nn.GroupNorm:
    # one group: the official model normalises each sample over all channels and pixels
    return nn.GroupNorm(1, channels)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand, plus a projected shortcut when shapes change."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.gn1 = _group_norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.gn2 = _group_norm(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.gn3 = _group_norm(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                _group_norm(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.gn1(self.conv1(x)))
        out = F.relu(self.gn2(self.conv2(out)))
        out = self.gn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet50GN(nn.Module):
    def __init__(self, config: ExpressionEncoderConfig):
        super().__init__()
        stem = config.stem_channels
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.gn1 = _group_norm(stem)
        in_channels = stem
        for i, num_blocks in enumerate(config.stage_blocks):
            width = stem * 2**i
            out_channels = width * config.bottleneck_expansion
            blocks = []
            for j in range(num_blocks):
                # the first stage keeps the resolution (the stem max-pool already halved it)
                stride = 2 if (j == 0 and i > 0) else 1
                blocks.append(Bottleneck(in_channels, width, out_channels, stride))
                in_channels = out_channels
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(config.stage_blocks)
        self.fc = nn.Linear(in_channels, config.out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn1(self.conv1(images)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(x.mean(dim=(2, 3)))


class ExpressionEncoder(nn.Module):
    def __init__(self, config: ExpressionEncoderConfig = ExpressionEncoderConfig()):
        super().__init__()
        self.config = config
        self.resnet50 = ResNet50GN(config)

    def forward(self, face_crops: torch.Tensor) -> torch.Tensor:
        """face_crops: (n, 3, 256, 256) RGB in [0, 1] -> (n, out_dim) expression features."""
        return self.resnet50(face_crops)
