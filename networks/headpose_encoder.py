"""Head-pose encoder: a ResNet-18 with GroupNorm(32, C) in place of every BatchNorm.

Maps each driving frame to a head rotation in degrees, (-180, 180), and a translation in (-2, 2).
State-dict keys match the official `headpose.pth` (`head_pose_net.*`, 62 keys).

Input convention (kept from the official pipeline, and left to the caller): the network is fed
`frames * 2 + 1`, where `frames` is the 512 driving crop resized to 256x256, RGB in [0, 1]; the
values it sees therefore lie in [1, 3]. The weights were trained that way, so the caller must not
"fix" it to [-1, 1].
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HeadPoseEncoderConfig:
    stage_blocks: tuple[int, ...] = (2, 2, 2, 2)
    stem_channels: int = 64  # stage i has stem_channels * 2**i channels
    norm_groups: int = 32

    @classmethod
    def tiny(cls) -> "HeadPoseEncoderConfig":
        return cls(stage_blocks=(1, 2, 1, 1), stem_channels=8, norm_groups=4)


class HeadPoseEstimate(NamedTuple):
    rotation: torch.Tensor  # (n, 3) degrees
    translation: torch.Tensor  # (n, 3)


class BasicBlock(nn.Module):
    """Two 3x3 convs (the first carries the stride), plus a projected shortcut when shapes change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm_groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.GroupNorm(norm_groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.GroupNorm(norm_groups, out_channels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.GroupNorm(norm_groups, out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + shortcut)


class ResNet18GN(nn.Module):
    def __init__(self, config: HeadPoseEncoderConfig, num_outputs: int):
        super().__init__()
        stem = config.stem_channels
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.GroupNorm(config.norm_groups, stem)
        in_channels = stem
        for i, num_blocks in enumerate(config.stage_blocks):
            out_channels = stem * 2**i
            blocks = []
            for j in range(num_blocks):
                # the first stage keeps the resolution (the stem max-pool already halved it)
                stride = 2 if (j == 0 and i > 0) else 1
                blocks.append(BasicBlock(in_channels, out_channels, stride, config.norm_groups))
                in_channels = out_channels
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(config.stage_blocks)
        self.fc = nn.Linear(in_channels, num_outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(images)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(x.mean(dim=(2, 3)))


class HeadPoseEncoder(nn.Module):
    def __init__(self, config: HeadPoseEncoderConfig = HeadPoseEncoderConfig()):
        super().__init__()
        self.config = config
        self.head_pose_net = ResNet18GN(config, num_outputs=6)

    def forward(self, frames_2x_plus_1: torch.Tensor) -> HeadPoseEstimate:
        """frames_2x_plus_1: (n, 3, 256, 256) = frames * 2 + 1 (see the module docstring).

        Returns rotation (n, 3) in degrees and translation (n, 3); the pipeline zeroes the translation.
        """
        raw = self.head_pose_net(frames_2x_plus_1)
        # outputs 0..2 are rotation, 3..5 translation, each squashed into its official range
        rotation = torch.sigmoid(raw[:, :3]) * 360.0 - 180.0
        translation = torch.sigmoid(raw[:, 3:]) * 4.0 - 2.0
        return HeadPoseEstimate(rotation, translation)
