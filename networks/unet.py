"""The HunyuanPortrait denoising UNet: SVD-xt's spatio-temporal UNet with IP-adapter cross-attention.

Built from diffusers' own `UNetSpatioTemporalConditionModel`, so its parameter names are the checkpoint's
(`hyportrait/unet.pth`, 1,492 keys, loads strictly). Three things differ from stock SVD:
- every cross-attention (`attn2`, spatial and temporal) gets diffusers' `IPAdapterAttnProcessor2_0`: it
  attends to the appearance tokens through `to_k`/`to_v` and to the motion tokens through
  `processor.to_k_ip.0`/`to_v_ip.0`, and sums both before `to_out`;
- the pose-guider features are added to the output of `conv_in`;
- the temporal cross-attention context is the mean over the window's frames of each token set, given to
  every pixel (stock SVD gives frame 0's tokens).

`set_engine_rewrites()` switches to a computation that is the same up to float rounding and cheaper to run
and export: cross-attention K/V are projected once per shared context (the temporal context is one frame
mean per batch item, not one copy per pixel: 18 of the 114 TFLOP of a guidance batch of 3 at 64x64), and
attention is written out as the MatMul-Softmax-MatMul chain TensorRT fuses when exported to ONNX.
"""
from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.transformers.transformer_temporal import (
    TransformerSpatioTemporalModel,
    TransformerTemporalModelOutput,
)
from torch import nn

from hyportrait.errors import WeightsError


@dataclass(frozen=True)
class UNetConfig:
    """SVD-xt's UNet config (weights folder `unet/config.json`) plus the IP-adapter settings."""

    in_channels: int = 8  # noisy latent (4) + conditioning image latent (4)
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "DownBlockSpatioTemporal",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 768  # 3 added time ids x addition_time_embed_dim
    layers_per_block: int | tuple[int, ...] = 2
    cross_attention_dim: int = 1024
    transformer_layers_per_block: int | tuple[int, ...] = 1
    num_attention_heads: tuple[int, ...] = (5, 10, 20, 20)
    num_frames: int = 25
    sample_size: int = 96  # diffusers' nominal latent size; the forward takes any multiple of 8
    ip_tokens: int = 32  # processor `num_tokens`; only used by diffusers' untupled input path
    ip_scale: float = 1.0

    @classmethod
    def tiny(cls) -> UNetConfig:
        """Same block structure at test size; token width stays 1024 so token shapes stay official."""
        return cls(
            block_out_channels=(32, 64, 64, 64),
            num_attention_heads=(2, 4, 4, 4),
            layers_per_block=1,
            addition_time_embed_dim=32,
            projection_class_embeddings_input_dim=96,
            num_frames=4,
            sample_size=8,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> UNetConfig:
        """Read a diffusers `config.json`; keys starting with `_` are diffusers metadata and are skipped."""
        raw = {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise WeightsError(f"{path}: UNet config has keys this UNet does not model: {', '.join(unknown)}")
        return replace(cls(), **{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def frame_mean(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B*F, N, D) per-frame tokens -> (B, N, D): each window's mean over its frames.

    (B, N, D) tokens shared by all frames pass through unchanged (the mean of one item).
    """
    return tokens.reshape(batch_size, -1, *tokens.shape[1:]).mean(dim=1)


def frame_mean_context(tokens: torch.Tensor, batch_size: int, num_pixels: int) -> torch.Tensor:
    """(B*F, N, D) per-frame tokens -> (B*num_pixels, N, D): each window's frame mean, once per pixel.

    The temporal attention runs over sequences of frames, one per pixel, so each pixel needs the context.
    The official code materialises it with `.repeat`; expanding gives the same values.
    """
    mean = frame_mean(tokens, batch_size)
    return mean[:, None].expand(-1, num_pixels, -1, -1).reshape(batch_size * num_pixels, *mean.shape[1:])


class OrtMultiHeadAttention(torch.autograd.Function):
    """softmax(Q·Kᵀ·scale)·V on (batch, tokens, heads*head_dim) tensors, exported as onnxruntime's fused
    `com.microsoft.MultiHeadAttention` (flash / memory-efficient kernels on CUDA). Only onnxruntime runs
    that op: TensorRT gets the plain chain of `dot_product_attention` instead."""

    @staticmethod
    def forward(ctx, query, key, value, num_heads: int, scale: float):
        def heads(t):
            return t.reshape(t.shape[0], t.shape[1], num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value), scale=scale)
        return out.transpose(1, 2).reshape(query.shape)

    @staticmethod
    def symbolic(g, query, key, value, num_heads: int, scale: float):
        out = g.op("com.microsoft::MultiHeadAttention", query, key, value, num_heads_i=num_heads, scale_f=scale)
        out.setType(query.type())
        return out


def dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale)·V on (batch, heads, tokens, head_dim) tensors.

    Eagerly this is SDPA (fused kernels). Under ONNX export it is written out as Q·scale -> MatMul(Kᵀ) ->
    Softmax -> MatMul, the chain TensorRT fuses into one attention kernel (it wants the scale applied to Q
    or K before the first matmul). torch's own SDPA export computes the scale from shapes at run time,
    multiplies both Q and Kᵀ by its square root, and (opset 18, torch.export) routes Kᵀ through a 3-D
    Reshape-Transpose-Reshape.
    """
    if torch.onnx.is_in_onnx_export():
        return ((query * scale) @ key.transpose(-1, -2)).softmax(dim=-1) @ value
    return F.scaled_dot_product_attention(query, key, value, scale=scale)


def shared_context_attention(attn: Attention, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor) -> torch.Tensor:
    """`attn`'s multi-head attention of (N, L, C) queries on (n, S, C) keys/values, n dividing N.

    With G = N/n, key/value item i serves query items i*G .. i*G+G-1, whose queries are attended as one
    sequence of G*L (each query row has its own softmax, so the grouping changes only the batching): a
    context shared by G query items is projected once, not G times.
    """
    batch, length, channels = query.shape
    kv_batch = key.shape[0]
    if torch.onnx.is_in_onnx_export() and getattr(attn, "onnxruntime_fused", False):
        out = OrtMultiHeadAttention.apply(query.reshape(kv_batch, -1, channels), key, value, attn.heads, attn.scale)
        return out.reshape(batch, length, channels)
    q, k, v = (t.reshape(kv_batch, -1, attn.heads, channels // attn.heads).transpose(1, 2)
               for t in (query, key, value))
    # attn.scale is a Python float (1/sqrt(head_dim)): a constant in the graph, not computed from shapes
    return dot_product_attention(q, k, v, attn.scale).transpose(1, 2).reshape(batch, length, channels)


class SelfAttnProcessor:
    """Self-attention (`attn1`) through `dot_product_attention`; the same math as diffusers' AttnProcessor2_0."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("SelfAttnProcessor computes unmasked self-attention only")
        out = shared_context_attention(
            attn, attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        )
        return attn.to_out[1](attn.to_out[0](out))


class SharedContextIPAttnProcessor(IPAdapterAttnProcessor2_0):
    """The IP-adapter cross-attention (diffusers' IPAdapterAttnProcessor2_0 math) on shared contexts.

    Each context, `(tokens, [ip_tokens])`, may have fewer items than the queries: item i then serves a group
    of consecutive query items (see `shared_context_attention`) and its K/V are projected once. Same
    parameters as the parent class, so instances are switched to it in place.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: tuple[torch.Tensor, list[torch.Tensor]], attention_mask=None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("SharedContextIPAttnProcessor takes no attention mask")
        tokens, ip_tokens = encoder_hidden_states
        query = attn.to_q(hidden_states)
        out = shared_context_attention(attn, query, attn.to_k(tokens), attn.to_v(tokens))
        for context, scale, to_k, to_v in zip(ip_tokens, self.scale, self.to_k_ip, self.to_v_ip):
            if scale != 0:  # as diffusers: a zero scale skips the branch
                out = out + scale * shared_context_attention(attn, query, to_k(context), to_v(context))
        return attn.to_out[1](attn.to_out[0](out))


class FrameMeanTransformerSpatioTemporal(TransformerSpatioTemporalModel):
    """diffusers' TransformerSpatioTemporalModel taking `(appearance, [motion])` per-frame token sets.

    Spatial cross-attention sees each frame's tokens; temporal cross-attention sees the window's frame mean
    of each set: copied to every pixel as the official code does, or, with `shared_temporal_context`, one
    mean per batch item for SharedContextIPAttnProcessor to broadcast. Holds no parameters of its own:
    instances built by diffusers' blocks are switched to this class.
    """

    shared_temporal_context = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: tuple[torch.Tensor, list[torch.Tensor]],
        image_only_indicator: torch.Tensor,
        return_dict: bool = True,
    ) -> TransformerTemporalModelOutput | tuple[torch.Tensor]:
        batch_frames, _, height, width = hidden_states.shape
        num_frames = image_only_indicator.shape[-1]
        batch_size = batch_frames // num_frames

        tokens, ip_tokens = encoder_hidden_states
        if self.shared_temporal_context:
            temporal_context = (frame_mean(tokens, batch_size), [frame_mean(t, batch_size) for t in ip_tokens])
        else:
            temporal_context = (
                frame_mean_context(tokens, batch_size, height * width),
                [frame_mean_context(t, batch_size, height * width) for t in ip_tokens],
            )

        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch_frames, height * width, -1)
        hidden_states = self.proj_in(hidden_states)

        frame_index = torch.arange(num_frames, device=hidden_states.device).repeat(batch_size)
        frame_emb = self.time_pos_embed(self.time_proj(frame_index).to(hidden_states.dtype))[:, None, :]

        for block, temporal_block in zip(self.transformer_blocks, self.temporal_transformer_blocks):
            hidden_states = block(hidden_states, encoder_hidden_states=encoder_hidden_states)
            hidden_states_mix = temporal_block(
                hidden_states + frame_emb, num_frames=num_frames, encoder_hidden_states=temporal_context
            )
            hidden_states = self.time_mixer(hidden_states, hidden_states_mix, image_only_indicator)

        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_frames, height, width, -1).permute(0, 3, 1, 2)
        output = hidden_states.contiguous() + residual
        return TransformerTemporalModelOutput(sample=output) if return_dict else (output,)


class UNetWithAdapters(UNetSpatioTemporalConditionModel):
    """HunyuanPortrait's UNet (UNet3DConditionSVDModel + init_ip_adapters) with flat tensor inputs."""

    def __init__(self, config: UNetConfig | None = None):
        config = config or UNetConfig()
        super().__init__(
            sample_size=config.sample_size,
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            down_block_types=config.down_block_types,
            up_block_types=config.up_block_types,
            block_out_channels=config.block_out_channels,
            addition_time_embed_dim=config.addition_time_embed_dim,
            projection_class_embeddings_input_dim=config.projection_class_embeddings_input_dim,
            layers_per_block=config.layers_per_block,
            cross_attention_dim=config.cross_attention_dim,
            transformer_layers_per_block=config.transformer_layers_per_block,
            num_attention_heads=config.num_attention_heads,
            num_frames=config.num_frames,
        )
        self.unet_config = config
        attentions = [(n, m) for n, m in self.named_modules() if isinstance(m, Attention)]
        for name, attn in attentions:
            if name.endswith("attn2"):
                # to_k_ip/to_v_ip take to_k's shape (the official init copies to_k/to_v into them)
                attn.set_processor(
                    IPAdapterAttnProcessor2_0(
                        hidden_size=attn.to_k.out_features,
                        cross_attention_dim=attn.to_k.in_features,
                        num_tokens=(config.ip_tokens,),
                        scale=config.ip_scale,
                    )
                )
            else:
                attn.set_processor(AttnProcessor2_0())
        for module in self.modules():
            if type(module) is TransformerSpatioTemporalModel:
                module.__class__ = FrameMeanTransformerSpatioTemporal
        self.engine_rewrites = False

    def set_engine_rewrites(self, enabled: bool = True, onnxruntime_attention: bool = False) -> UNetWithAdapters:
        """Switch (in place, both ways) between the official computation and the engine rewrites.

        The rewrites give the same result up to float rounding: temporal cross-attention K/V (main and IP)
        projected once per batch item from the frame-mean tokens and broadcast to all B*h*w pixel
        sequences instead of projected from B*h*w copies; appearance K/V projected once per batch item when
        `appearance_tokens` are given once for all frames; attention exported as the chain TensorRT fuses
        (`dot_product_attention`), or with `onnxruntime_attention` as onnxruntime's fused MultiHeadAttention
        op (an onnxruntime-only graph: the unfused chain needs 8.4 GB score tensors per batch item at 64x64).
        Parameters and state-dict keys do not change.
        """
        for name, module in self.named_modules():
            if isinstance(module, FrameMeanTransformerSpatioTemporal):
                module.shared_temporal_context = enabled
            elif isinstance(module, Attention):
                if name.endswith("attn2"):
                    module.processor.__class__ = SharedContextIPAttnProcessor if enabled else IPAdapterAttnProcessor2_0
                else:
                    module.set_processor(SelfAttnProcessor() if enabled else AttnProcessor2_0())
                module.onnxruntime_fused = enabled and onnxruntime_attention
        self.engine_rewrites = enabled
        return self

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        appearance_tokens: torch.Tensor,
        motion_tokens: torch.Tensor,
        pose_features: torch.Tensor,
        added_time_ids: torch.Tensor,
    ) -> torch.Tensor:
        """One denoising call on a window of F frames (classifier-free guidance branches are batch items).

        sample (B,F,8,h,w): scaled noisy latent ++ conditioning image latent; timestep: fp32, 0-dim, (1,) or
        (B,); appearance_tokens (B,F,64,1024), or (B,64,1024) for tokens shared by all frames (as the
        pipeline's are); motion_tokens (B,F,64,1024); pose_features (B,F,320,h,w), or one (320,h,w) map for
        every frame and batch item, added to conv_in's output; added_time_ids (B,3) = [fps, motion bucket,
        noise augmentation]. Returns (B,F,4,h,w).
        """
        batch_size, num_frames = sample.shape[:2]

        timesteps = timestep.reshape(-1).expand(batch_size)
        emb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))
        time_ids_emb = self.add_time_proj(added_time_ids.flatten()).reshape(batch_size, -1).to(emb.dtype)
        emb = emb + self.add_embedding(time_ids_emb)
        # = repeat_interleave(num_frames): a traced repeat_interleave indexes with a CPU tensor (GPU export fails)
        emb = emb[:, None].expand(-1, num_frames, -1).flatten(0, 1)

        if pose_features.dim() == 5:
            pose_features = pose_features.flatten(0, 1)
        sample = self.conv_in(sample.flatten(0, 1)) + pose_features
        if appearance_tokens.dim() == 3 and not self.engine_rewrites:  # the official path attends per frame
            appearance_tokens = appearance_tokens[:, None].expand(-1, num_frames, -1, -1)
        appearance = appearance_tokens.flatten(0, 1) if appearance_tokens.dim() == 4 else appearance_tokens
        tokens = (appearance, [motion_tokens.flatten(0, 1)])
        # all frames are video frames: the AlphaBlenders use their learned spatial/temporal mix
        image_only_indicator = torch.zeros(batch_size, num_frames, dtype=sample.dtype, device=sample.device)

        skips = (sample,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, block_skips = block(
                    sample, temb=emb, encoder_hidden_states=tokens, image_only_indicator=image_only_indicator
                )
            else:
                sample, block_skips = block(sample, temb=emb, image_only_indicator=image_only_indicator)
            skips += block_skips

        sample = self.mid_block(
            sample, temb=emb, encoder_hidden_states=tokens, image_only_indicator=image_only_indicator
        )

        for block in self.up_blocks:
            block_skips, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            if getattr(block, "has_cross_attention", False):
                sample = block(
                    sample,
                    res_hidden_states_tuple=block_skips,
                    temb=emb,
                    encoder_hidden_states=tokens,
                    image_only_indicator=image_only_indicator,
                )
            else:
                sample = block(sample, block_skips, temb=emb, image_only_indicator=image_only_indicator)

        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        return sample.reshape(batch_size, num_frames, *sample.shape[1:])


class UNetWithPoseMap(nn.Module):
    """UNetWithAdapters taking the pose guider's constant (C0, h, w) map, broadcast inside the graph."""

    def __init__(self, unet: UNetWithAdapters):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, appearance_tokens: torch.Tensor,
                motion_tokens: torch.Tensor, pose_map: torch.Tensor, added_time_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, appearance_tokens, motion_tokens, pose_map, added_time_ids)


def weight_sharing_copy(module: nn.Module) -> nn.Module:
    """A copy of the module objects that shares every parameter and buffer with the original."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)
