"""The image-conditioned pixel-space diffusion model (Semantica recipe) and its size presets.

A diffusers `UNet2DConditionModel` denoises the target image; the frozen embedding of the
condition image is projected to a few tokens that the U-Net attends to (cross-attention). A
learned null embedding replaces the condition with probability `p_uncond` during training, which
makes classifier-free guidance possible at sampling time.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from core.torchvision_compat import ensure_torchvision_importable


@dataclasses.dataclass(frozen=True)
class Preset:
    """U-Net size and resolution."""

    image_size: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    cross_attention_dim: int
    attention_head_dim: int
    cond_tokens: int  # how many tokens the condition embedding is projected to
    norm_num_groups: int = 8
    attention_blocks: int = 0  # how many of the deepest resolutions carry cross-attention (0: all but the first)


PRESETS: dict[str, Preset] = {
    # CPU tests: ~1 M parameters, a step in well under a second at batch 8.
    "tiny": Preset(32, (32, 64), 1, 64, 8, 4),
    # CPU experiments of minutes: ~6 M parameters. Cross-attention at 8 px only: at 16 px it cost
    # 20 % of a CPU step (benchmarks/train.py) for 256 tokens of a 32 px image.
    "small": Preset(32, (64, 128, 128), 1, 128, 16, 4, 16, attention_blocks=1),
    # a GPU model at 64 px.
    "base": Preset(64, (128, 256, 384, 512), 2, 512, 64, 8, 32),
    # a GPU model at 128 px.
    "large": Preset(128, (128, 256, 512, 512, 768), 2, 768, 64, 8, 32),
}


class SemanticaUNet(nn.Module):
    """Denoiser of target images conditioned on a frozen image embedding."""

    def __init__(self, preset: Preset, cond_dim: int):
        super().__init__()
        ensure_torchvision_importable()  # diffusers imports torchvision
        from diffusers import UNet2DConditionModel

        n = len(preset.block_out_channels)
        attn = preset.attention_blocks or n - 1
        if not 1 <= attn < n:
            raise ValueError(f"attention_blocks must be 1..{n - 1} for {n} resolutions, got {preset.attention_blocks}")
        self.preset, self.cond_dim = preset, cond_dim
        self.unet = UNet2DConditionModel(
            sample_size=preset.image_size,
            in_channels=3,
            out_channels=3,
            layers_per_block=preset.layers_per_block,
            block_out_channels=preset.block_out_channels,
            down_block_types=("DownBlock2D",) * (n - attn) + ("CrossAttnDownBlock2D",) * attn,
            up_block_types=("CrossAttnUpBlock2D",) * attn + ("UpBlock2D",) * (n - attn),
            cross_attention_dim=preset.cross_attention_dim,
            attention_head_dim=preset.attention_head_dim,
            norm_num_groups=preset.norm_num_groups,
        )
        self.cond_proj = nn.Sequential(
            nn.LayerNorm(cond_dim),
            nn.Linear(cond_dim, preset.cond_tokens * preset.cross_attention_dim),
        )
        self.null_embedding = nn.Parameter(torch.zeros(cond_dim))  # the "no condition" input

    def condition_tokens(self, cond: torch.Tensor, drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, D) embeddings -> (B, T, C) tokens; rows where `drop` is True use the null embedding."""
        if drop is not None:
            cond = torch.where(drop[:, None], self.null_embedding.to(cond.dtype).expand_as(cond), cond)
        tokens = self.cond_proj(cond)
        return tokens.view(cond.shape[0], self.preset.cond_tokens, self.preset.cross_attention_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B,3,S,S) noisy images in [-1,1]; t: (B,) timesteps; cond: (B,D) -> (B,3,S,S) prediction."""
        return self.unet(x, t, encoder_hidden_states=self.condition_tokens(cond, drop)).sample

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance: uncond + scale * (cond - uncond); scale 0 is unconditional."""
        drop = torch.cat([torch.zeros(len(x), dtype=torch.bool), torch.ones(len(x), dtype=torch.bool)]).to(x.device)
        both = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond]), drop)
        c, u = both.chunk(2)
        return u + scale * (c - u)


def build_model(preset: str, cond_dim: int) -> SemanticaUNet:
    """A model from the preset registry."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return SemanticaUNet(PRESETS[preset], cond_dim)
