"""Pose guider: a small per-frame conv stack that maps a pose image to the UNet's first feature level.

Every conv is 2-D and applied to each frame on its own (the official `InflatedConv3d`); three stride-2
convs take 512x512 frames to 64x64 maps of 320 channels, added to the UNet's conv_in output.
State-dict keys match the official `pose_guider.pth` (16 keys).

The official preprocessing always feeds an all-black pose video, so in practice the output is one
fixed (320, H/8, W/8) map for every frame of every video: `constant_features` computes it so the
runtime can fold the network away.
"""
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PoseGuiderConfig:
    conditioning_embedding_channels: int = 320
    conditioning_channels: int = 3
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)

    @classmethod
    def tiny(cls) -> "PoseGuiderConfig":
        # 32 output channels: the tiny UNet's first level (GroupNorm(32) needs at least 32)
        return cls(conditioning_embedding_channels=32, block_out_channels=(4, 4, 8, 8))


class PoseGuider(nn.Module):
    def __init__(self, config: PoseGuiderConfig = PoseGuiderConfig()):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        self.conv_in = nn.Conv2d(config.conditioning_channels, channels[0], 3, padding=1)
        # per level: a 3x3 conv at the same width, then a stride-2 3x3 conv to the next width
        self.blocks = nn.ModuleList()
        for c_in, c_out in pairwise(channels):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], config.conditioning_embedding_channels, 3, padding=1)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (N, C, H, W) -> (N, embedding_channels, H/8, W/8), each frame independently."""
        x = F.silu(self.conv_in(frames))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, C, F, H, W) -> (B, embedding_channels, F, H/8, W/8), as the official PoseGuider."""
        b, c, f, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * f, c, h, w)
        features = self.encode_frames(frames)
        return features.reshape(b, f, *features.shape[1:]).transpose(1, 2)

    @torch.no_grad()
    def constant_features(self, height: int, width: int) -> torch.Tensor:
        """The output for one all-black frame of height x width: (embedding_channels, height/8, width/8).

        It is the output for every frame of the all-zero pose video the official pipeline produces.
        """
        param = self.conv_in.weight
        zeros = torch.zeros(1, self.config.conditioning_channels, height, width, dtype=param.dtype,
                            device=param.device)
        return self.encode_frames(zeros)[0]


class PoseFrameEncoder(nn.Module):
    def __init__(self, pose_guider: PoseGuider):
        super().__init__()
        self.pose_guider = pose_guider

    def forward(self, pose_images: torch.Tensor) -> torch.Tensor:
        return self.pose_guider.encode_frames(pose_images)
