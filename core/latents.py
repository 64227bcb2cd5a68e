"""The space a diffusion model denoises in: RGB pixels, or the latent space of a VAE.

Names:
    pixel (or "", "none")     RGB in [-1, 1] at the model's resolution (the 32-128 px presets)
    vae:<hub id or folder>    a diffusers `AutoencoderKL`, e.g. vae:stabilityai/sd-vae-ft-mse
                              (Stable Diffusion's f=8, 4-channel autoencoder, the default of the
                              256 and 512 px presets), or a folder written by `save_pretrained`.

A hub id downloads once into the Hugging Face cache and is read from the cache only with
`webpairs --offline` (HF_HUB_OFFLINE=1), like the encoders (core/encoders.py). Latents are the
posterior mean (deterministic), multiplied by the VAE's `scaling_factor` for the diffusion model
and divided by it again before decoding.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np
import torch
from PIL import Image

from core.torchvision_compat import ensure_torchvision_importable

DEFAULT_VAE = "vae:stabilityai/sd-vae-ft-mse"
PIXEL = "pixel"


def center(img: Image.Image, size: int) -> np.ndarray:
    """Centre square crop, resize -> (3,S,S) float32 in [-1,1]: what sampling, evaluation and the
    stored latents see of an image."""
    w, h = img.size
    side = min(w, h)
    img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)).resize((size, size), Image.BICUBIC)
    return np.ascontiguousarray((np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1))


class LatentUnavailable(RuntimeError):
    """The VAE cannot be loaded (bad name, missing weights offline, no network); one sentence."""


def normalise(spec: Optional[str]) -> str:
    """"", "none", "pixel" -> "pixel"; "vae:<id>" stays; anything else is a ValueError."""
    spec = (spec or "").strip()
    if spec.lower() in ("", "none", PIXEL):
        return PIXEL
    if not spec.startswith("vae:") or not spec[4:].strip():
        raise ValueError(f"--latent must be vae:<hub id or folder> (e.g. {DEFAULT_VAE}) or none, got {spec!r}")
    return spec


class PixelSpace:
    """Identity: the model denoises RGB in [-1, 1]."""

    name = PIXEL
    channels, factor, scale_factor = 3, 1, 1.0

    def to(self, device) -> "PixelSpace":
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.clamp(-1, 1)

    def describe(self) -> Optional[dict]:
        return None


class VaeSpace:
    """A frozen `AutoencoderKL`: encode (B,3,H,W) in [-1,1] -> scaled latents (B,C,H/f,W/f), decode back."""

    def __init__(self, name: str, vae):
        self.name, self.vae = name, vae.eval().requires_grad_(False)
        cfg = vae.config
        self.channels = int(cfg.latent_channels)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.scale_factor = float(getattr(cfg, "scaling_factor", 0.18215) or 0.18215)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)

    def to(self, device) -> "VaeSpace":
        self.vae.to(device)
        return self

    @torch.no_grad()
    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean (unscaled): what `webpairs latents` stores."""
        p = next(self.vae.parameters())
        return self.vae.encode(x.to(p.device, p.dtype)).latent_dist.mode().float()

    def scale(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.shift_factor) * self.scale_factor

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.raw(x))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        x = self.vae.decode((z / self.scale_factor + self.shift_factor).to(p.device, p.dtype)).sample
        return x.float().clamp(-1, 1)

    def describe(self) -> dict:
        """What a checkpoint and a shards manifest record of the space."""
        return {"vae": self.name, "channels": self.channels, "factor": self.factor, "scale_factor": self.scale_factor, "shift_factor": self.shift_factor}


def load_space(spec: Optional[str], device="cpu"):
    """PixelSpace for "pixel", else the VAE (downloading on first use unless offline)."""
    spec = normalise(spec)
    if spec == PIXEL:
        return PixelSpace()
    ensure_torchvision_importable()
    from diffusers import AutoencoderKL

    from core.encoders import _hub_mode, hub_offline

    target = spec[4:]
    local = os.path.isdir(os.path.expanduser(target))
    try:
        with _hub_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # diffusers passes huggingface_hub a deprecated argument
            vae = AutoencoderKL.from_pretrained(os.path.expanduser(target) if local else target, low_cpu_mem_usage=False)
    except Exception as err:  # noqa: BLE001 - every failure here means "no VAE"
        why = " ".join(str(err).split())[:200]
        if local:
            raise LatentUnavailable(f"cannot load the VAE folder {target} ({why}); it must be an AutoencoderKL save_pretrained folder") from err
        if hub_offline():
            raise LatentUnavailable(f"cannot load {spec} ({why}): offline mode is on (--offline / HF_HUB_OFFLINE), so it cannot be downloaded; run once online to fill the cache, or pass a local folder: --latent vae:PATH") from err
        raise LatentUnavailable(f"cannot load {spec} ({why}): check the network (and HF_ENDPOINT / HF_TOKEN) or the hub id, or pass a local folder: --latent vae:PATH") from err
    return VaeSpace(spec, vae).to(device)
