"""The image-conditioned diffusion models (Semantica recipe), two backbones, and their size presets.

Both denoise the target (RGB pixels, or a VAE latent: core/latents.py) given the frozen embedding of
the condition image, projected to a few tokens the network attends to (cross-attention):

* `unet`: a diffusers `UNet2DConditionModel` (PRESETS);
* `dit`: a diffusers `PixArtTransformer2DModel` (PixArt-alpha's DiT: patch-2 tokens, adaLN-single on
  the timestep, cross-attention on the condition tokens) at the DiT-S/B/L/XL sizes (DIT_PRESETS).

A learned null embedding replaces the condition with probability `p_uncond` during training, which
makes classifier-free guidance possible at sampling time. Attention runs through diffusers'
`AttnProcessor2_0`, i.e. `torch.nn.functional.scaled_dot_product_attention` (flash/memory-efficient
kernels on a GPU).
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
    # GPU models in a VAE latent space (f=8: 32 and 64 latent px), the SD VAE by default
    "base256": Preset(256, (128, 256, 384, 512), 2, 512, 64, 8, 32),
    "large512": Preset(512, (128, 256, 512, 512, 768), 2, 768, 64, 8, 32),
}


@dataclasses.dataclass(frozen=True)
class DiTPreset:
    """Transformer size (DiT, Peebles & Xie 2023) and resolution (pixels); patch 2 on the model's input."""

    image_size: int
    depth: int
    hidden: int
    heads: int
    patch: int = 2
    cond_tokens: int = 8


DIT_PRESETS: dict[str, DiTPreset] = {
    "tiny": DiTPreset(32, 2, 64, 2, cond_tokens=4),  # CPU tests
    "S": DiTPreset(256, 12, 384, 6),
    "B": DiTPreset(256, 12, 768, 12),
    "L": DiTPreset(256, 24, 1024, 16),
    "XL": DiTPreset(256, 28, 1152, 16),
}
BACKBONES = ("unet", "dit")
LATENT_MIN_SIZE = 256  # presets at this resolution and above train in the SD VAE's latent space by default


def preset_of(backbone: str, preset: str):
    """The preset object of a backbone (ValueError naming the known ones)."""
    table = {"unet": PRESETS, "dit": DIT_PRESETS}.get(backbone)
    if table is None:
        raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
    if preset not in table:
        raise ValueError(f"backbone {backbone} has no preset {preset!r}; known: {', '.join(table)}")
    return table[preset]


class Conditioned(nn.Module):
    """What both backbones share: condition tokens, the null embedding, CFG, the sample shape.

    image_size: pixels of the images the model makes; sample_shape: (C, S, S) of what it denoises
    (pixels, or latents of image_size / factor)."""

    backbone = ""

    def _setup(self, preset, cond_dim: int, tokens: int, width: int, channels: int, sample_size: int, image_size: int) -> None:
        self.preset, self.cond_dim, self.tokens, self.width = preset, cond_dim, tokens, width
        self.channels, self.sample_size, self.image_size = channels, sample_size, image_size
        self.cond_proj = nn.Sequential(nn.LayerNorm(cond_dim), nn.Linear(cond_dim, tokens * width))
        self.null_embedding = nn.Parameter(torch.zeros(cond_dim))  # the "no condition" input

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.sample_size, self.sample_size)

    @property
    def in_pixels(self) -> bool:
        """True when the model denoises RGB pixels in [-1, 1] (not latents)."""
        return self.sample_size == self.image_size

    def condition_tokens(self, cond: torch.Tensor, drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, D) embeddings -> (B, T, C) tokens; rows where `drop` is True use the null embedding."""
        if drop is not None:
            cond = torch.where(drop[:, None], self.null_embedding.to(cond.dtype).expand_as(cond), cond)
        tokens = self.cond_proj(cond)
        return tokens.view(cond.shape[0], self.tokens, self.width)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B,C,S,S) noisy samples; t: (B,) timesteps; cond: (B,D) -> (B,C,S,S) prediction."""
        return self.denoise(x, t, self.condition_tokens(cond, drop))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance: uncond + scale * (cond - uncond); scale 0 is unconditional."""
        drop = torch.cat([torch.zeros(len(x), dtype=torch.bool), torch.ones(len(x), dtype=torch.bool)]).to(x.device)
        both = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond]), drop)
        c, u = both.chunk(2)
        return u + scale * (c - u)


class SemanticaUNet(Conditioned):
    """U-Net denoiser conditioned on a frozen image embedding."""

    backbone = "unet"

    def __init__(self, preset: Preset, cond_dim: int, channels: int = 3, sample_size: Optional[int] = None):
        super().__init__()
        ensure_torchvision_importable()  # diffusers imports torchvision
        from diffusers import UNet2DConditionModel

        n = len(preset.block_out_channels)
        attn = preset.attention_blocks or n - 1
        if not 1 <= attn < n:
            raise ValueError(f"attention_blocks must be 1..{n - 1} for {n} resolutions, got {preset.attention_blocks}")
        size = sample_size or preset.image_size
        self._setup(preset, cond_dim, preset.cond_tokens, preset.cross_attention_dim, channels, size, preset.image_size)
        self.unet = UNet2DConditionModel(
            sample_size=size,
            in_channels=channels,
            out_channels=channels,
            layers_per_block=preset.layers_per_block,
            block_out_channels=preset.block_out_channels,
            down_block_types=("DownBlock2D",) * (n - attn) + ("CrossAttnDownBlock2D",) * attn,
            up_block_types=("CrossAttnUpBlock2D",) * attn + ("UpBlock2D",) * (n - attn),
            cross_attention_dim=preset.cross_attention_dim,
            attention_head_dim=preset.attention_head_dim,
            norm_num_groups=preset.norm_num_groups,
        )

    def denoise(self, x, t, tokens):
        return self.unet(x, t, encoder_hidden_states=tokens).sample


class SemanticaDiT(Conditioned):
    """Transformer denoiser (PixArt-alpha's DiT from diffusers): patch-2 tokens of the sample,
    adaLN-single on the timestep, cross-attention on the condition tokens."""

    backbone = "dit"

    def __init__(self, preset: DiTPreset, cond_dim: int, channels: int = 3, sample_size: Optional[int] = None):
        super().__init__()
        ensure_torchvision_importable()
        from diffusers import PixArtTransformer2DModel

        size = sample_size or preset.image_size
        if size % preset.patch:
            raise ValueError(f"a {size} px sample does not split into {preset.patch} px patches")
        if preset.hidden % preset.heads:
            raise ValueError(f"hidden size {preset.hidden} is not a multiple of {preset.heads} heads")
        self._setup(preset, cond_dim, preset.cond_tokens, preset.hidden, channels, size, preset.image_size)
        self.dit = PixArtTransformer2DModel(
            num_attention_heads=preset.heads,
            attention_head_dim=preset.hidden // preset.heads,
            in_channels=channels,
            out_channels=channels,
            num_layers=preset.depth,
            cross_attention_dim=preset.hidden,
            sample_size=size,
            patch_size=preset.patch,
            use_additional_conditions=False,
            caption_channels=None,
        )

    def denoise(self, x, t, tokens):
        return self.dit(x, encoder_hidden_states=tokens, timestep=t).sample


def build_model(preset: str, cond_dim: int, backbone: str = "unet", channels: int = 3, sample_size: Optional[int] = None, image_size: int = 0) -> Conditioned:
    """A model from the preset registries: `channels` and `sample_size` of what it denoises (pixels:
    3 and the image size; latents: the VAE's channels and image size / factor); `image_size`
    overrides the preset's resolution (pixels)."""
    p = preset_of(backbone, preset)
    if image_size and image_size != p.image_size:
        p = dataclasses.replace(p, image_size=image_size)
    cls = SemanticaUNet if backbone == "unet" else SemanticaDiT
    return cls(p, cond_dim, channels, sample_size)
