"""Appearance extractor: DINOv2 ViT-L/14 with 4 registers, ArcFace ID adapters, and the 261 -> 64 token projector.

`DinoV2WithIDAdapters.forward` computes what HunyuanPortrait's pipeline calls (`encode_image_with_id_features`),
not DINOv2's own `forward`: the output is the final LayerNorm of all 261 tokens (cls, 4 registers, 16x16 patches).
State-dict keys (module names such as `D_fc1`, `cross_attn.multihead_attn`) are those of `hyportrait/dino.pth`
and `hyportrait/image_proj.pth`, so both checkpoints load with strict=True.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AppearanceConfig:
    dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    patch_size: int = 14
    num_registers: int = 4
    # the position table was trained for 526 px (37x37 patches) and is resampled to the input grid every call
    img_size: int = 526
    interpolate_offset: float = 0.1
    layer_scale_init: float = 1.0
    adapter_layers: tuple[int, ...] = (3, 7, 11, 15, 19, 23)
    adapter_dim: int = 384
    adapter_attn_dim: int = 256
    adapter_attn_heads: int = 8
    adapter_scale: float = 0.2
    id_dim: int = 512
    input_size: int = 224
    num_queries: int = 64

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens the extractor returns for `input_size` images: cls + registers + patches (261)."""
        return 1 + self.num_registers + self.grid_size**2

    @classmethod
    def tiny(cls) -> "AppearanceConfig":
        # The official token shape (224 px input, 64 queries of width 1024: the UNet's cross-attention width)
        # with few, narrow-MLP layers; the table is trained for 266 px (19x19 patches) so resampling still runs.
        return cls(depth=3, mlp_dim=256, img_size=266, adapter_layers=(0, 2), adapter_dim=32,
                   adapter_attn_dim=32, adapter_attn_heads=4)


class PatchEmbedding(nn.Module):
    def __init__(self, config: AppearanceConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.dim, config.patch_size, stride=config.patch_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.proj(image).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, config: AppearanceConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, config: AppearanceConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.dim, config.mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.mlp_dim, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ConvBNReLU(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class IdentityCrossAttention(nn.Module):
    """Patch features (queries) attend to the single ArcFace token (key and value)."""

    def __init__(self, config: AppearanceConfig):
        super().__init__()
        e = config.adapter_attn_dim
        self.multihead_attn = nn.MultiheadAttention(e, config.adapter_attn_heads, batch_first=True)
        self.image_proj = nn.Linear(config.adapter_dim, e)
        self.id_proj = nn.Linear(config.id_dim, e)
        self.back_proj = nn.Linear(e, config.adapter_dim)

    def forward(self, patch_features: torch.Tensor, id_embedding: torch.Tensor) -> torch.Tensor:
        query = self.image_proj(patch_features)
        id_token = self.id_proj(id_embedding[:, None])
        attended, _ = self.multihead_attn(query, id_token, id_token, need_weights=False)
        return self.back_proj(attended)

    def identity_context(self, id_embedding: torch.Tensor) -> torch.Tensor:
        """The output for every query, (B, 1, adapter_dim): softmax over one key is exactly 1, so attention
        returns out_proj(value) whatever the query is."""
        e = self.id_proj.out_features
        attn = self.multihead_attn
        value = F.linear(self.id_proj(id_embedding[:, None]), attn.in_proj_weight[2 * e:], attn.in_proj_bias[2 * e:])
        return self.back_proj(attn.out_proj(value))


class IDAdapter(nn.Module):
    """IMAdapter: a 1024 -> 384 -> 1024 bottleneck whose patch tokens are replaced by an inception-style conv
    stack followed by cross-attention to the ArcFace embedding; cls and register tokens bypass both."""

    def __init__(self, config: AppearanceConfig):
        super().__init__()
        d = config.adapter_dim
        self.num_prefix_tokens = 1 + config.num_registers
        self.branch1 = ConvBNReLU(d, d // 2, 1)
        self.branch2 = nn.Sequential(ConvBNReLU(d, d // 16, 1), ConvBNReLU(d // 16, d // 4, 3))
        self.branch3 = nn.Sequential(ConvBNReLU(d, d // 16, 1), ConvBNReLU(d // 16, d // 4, 5))
        self.D_fc1 = nn.Linear(config.dim, d)
        self.D_fc2 = nn.Linear(d, config.dim)
        self.cross_attn = IdentityCrossAttention(config)

    def forward(self, tokens: torch.Tensor, id_embedding: torch.Tensor, grid: tuple[int, int],
                prune_dead_branches: bool = False) -> torch.Tensor:
        x0 = F.relu(self.D_fc1(tokens))
        prefix, patches = x0[:, :self.num_prefix_tokens], x0[:, self.num_prefix_tokens:]
        if prune_dead_branches:
            patches = self.cross_attn.identity_context(id_embedding).expand_as(patches)
        else:
            feature_map = patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid)
            feature_map = torch.cat([self.branch1(feature_map), self.branch2(feature_map),
                                     self.branch3(feature_map)], dim=1)
            patches = self.cross_attn(feature_map.flatten(2).transpose(1, 2), id_embedding)
        # as in the official code the skip adds x0 to every token, so cls/register tokens carry 2 * x0
        return self.D_fc2(torch.cat([prefix, patches], dim=1) + x0)


class Block(nn.Module):
    def __init__(self, config: AppearanceConfig, with_adapter: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=1e-6)
        self.attn = SelfAttention(config)
        self.ls1 = LayerScale(config.dim, config.layer_scale_init)
        self.norm2 = nn.LayerNorm(config.dim, eps=1e-6)
        self.mlp = Mlp(config)
        self.ls2 = LayerScale(config.dim, config.layer_scale_init)
        self.adapter_scale = config.adapter_scale
        self.adapter = IDAdapter(config) if with_adapter else None

    def forward(self, x: torch.Tensor, id_embedding: torch.Tensor, grid: tuple[int, int],
                prune_dead_branches: bool = False) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        h = self.norm2(x)
        ffn = self.mlp(h)
        if self.adapter is not None:
            ffn = ffn + self.adapter_scale * self.adapter(h, id_embedding, grid, prune_dead_branches)
        return x + self.ls2(ffn)


class DinoV2WithIDAdapters(nn.Module):
    def __init__(self, config: AppearanceConfig):
        super().__init__()
        self.config = config
        table_side = config.img_size // config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + table_side**2, config.dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_registers, config.dim))
        # unused here (DINOv2 masked-image training) but part of the checkpoint
        self.mask_token = nn.Parameter(torch.zeros(1, config.dim))
        self.patch_embed = PatchEmbedding(config)
        self.blocks = nn.ModuleList(Block(config, i in config.adapter_layers) for i in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, eps=1e-6)

    def position_embedding(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> torch.Tensor:
        """(1, 1 + grid_h * grid_w, dim) table for cls + patches, resampled from the trained square grid."""
        table = self.pos_embed
        side = math.isqrt(table.shape[1] - 1)
        if grid_h == grid_w == side:
            return table
        table = table.float()
        patch_table = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # DINOv2 passes (grid + offset) / side as scale factors; bicubic weights depend on them, not only on
        # the output size, so they are reproduced exactly
        off = self.config.interpolate_offset
        patch_table = F.interpolate(patch_table, scale_factor=((grid_h + off) / side, (grid_w + off) / side),
                                    mode="bicubic", antialias=False)
        patch_table = patch_table.flatten(2).transpose(1, 2)
        return torch.cat([table[:, :1], patch_table], dim=1).to(dtype)

    def forward(self, image: torch.Tensor, id_embedding: torch.Tensor,
                prune_dead_branches: bool = False) -> torch.Tensor:
        """image (B, 3, H, W) ImageNet-normalised, id_embedding (B, id_dim) -> (B, num_tokens, dim).

        prune_dead_branches skips the adapters' conv branches and attention queries, which cannot change the
        output (the cross-attention has a single key); same result up to rounding, less compute.
        """
        grid = self.patch_grid(image)
        return self.encode(image, id_embedding, self.position_embedding(*grid, image.dtype), prune_dead_branches)

    def patch_grid(self, image: torch.Tensor) -> tuple[int, int]:
        p = self.config.patch_size
        h, w = image.shape[-2:]
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        return h // p, w // p

    def encode(self, image: torch.Tensor, id_embedding: torch.Tensor, position_table: torch.Tensor,
               prune_dead_branches: bool = False) -> torch.Tensor:
        """`forward` with the (1, 1 + grid_h * grid_w, dim) position table given: a caller with a fixed input
        size computes it once (`position_embedding`) and keeps the resampling out of every call."""
        b = image.shape[0]
        grid = self.patch_grid(image)
        if position_table.shape[1] != 1 + grid[0] * grid[1]:
            raise ValueError(f"position table of {position_table.shape[1]} positions does not fit a "
                             f"{grid[0]}x{grid[1]} patch grid (+1 cls)")
        id_embedding = id_embedding.to(image.dtype)  # the pipeline casts the ArcFace vector to the image dtype
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(image)], dim=1)
        tokens = tokens + position_table.to(tokens.dtype)
        tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(b, -1, -1), tokens[:, 1:]], dim=1)
        for block in self.blocks:
            tokens = block(tokens, id_embedding, grid, prune_dead_branches)
        return self.norm(tokens)


class ImageProjector(nn.Linear):
    """Linear map along the token axis: (B, num_tokens, dim) -> (B, num_queries, dim).

    A bare nn.Linear so that its state dict is exactly `weight`, `bias`, as in `hyportrait/image_proj.pth`.
    """

    def __init__(self, config: AppearanceConfig):
        super().__init__(config.num_tokens, config.num_queries)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens.transpose(1, 2)).transpose(1, 2)


class AppearanceEncoder(nn.Module):
    """image (B, 3, 224, 224) ImageNet-normalised + id_embedding (B, 512) -> (B, 64, 1024) appearance tokens.

    Shares the parameters of the modules it wraps; the position table is a snapshot of `dino.pos_embed`
    taken at construction (build it after loading weights).
    """

    def __init__(self, dino: DinoV2WithIDAdapters, image_proj: ImageProjector):
        super().__init__()
        self.dino = dino
        self.image_proj = image_proj
        self.input_size = dino.config.input_size
        grid = dino.config.grid_size
        with torch.no_grad():
            table = dino.position_embedding(grid, grid, torch.float32).detach().clone()
        # not in the state dict: it is derived from dino.pos_embed, which stays the checkpoint's source
        self.register_buffer("position_table", table, persistent=False)

    def forward(self, image: torch.Tensor, id_embedding: torch.Tensor) -> torch.Tensor:
        tokens = self.dino.encode(image, id_embedding, self.position_table, prune_dead_branches=True)
        return self.image_proj(tokens)
