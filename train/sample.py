"""Sampling with classifier-free guidance (diffusers DDIM or DPM-Solver++) and image grids."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image

from core.torchvision_compat import ensure_torchvision_importable


def make_sampler(kind: str = "ddim", prediction: str = "v_prediction", train_steps: int = 1000):
    """A diffusers sampling scheduler on the training schedule (cosine)."""
    ensure_torchvision_importable()
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=train_steps, beta_schedule="squaredcos_cap_v2", prediction_type=prediction)
    if kind == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    if kind == "dpm":
        return DPMSolverMultistepScheduler(**common)
    raise ValueError(f"sampler must be ddim or dpm, got {kind!r}")


@torch.no_grad()
def sample(model, cond: torch.Tensor, steps: int = 50, guidance: float = 3.0, sampler: str = "ddim", prediction: str = "v_prediction", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Images (B,3,S,S) in [-1,1] for condition embeddings (B,D); guidance 0 = unconditional."""
    sch = make_sampler(sampler, prediction)
    sch.set_timesteps(steps)
    size = model.preset.image_size
    x = torch.randn((cond.shape[0], 3, size, size), generator=generator, device=cond.device) * sch.init_noise_sigma
    for t in sch.timesteps:
        tt = t.expand(cond.shape[0]).to(cond.device)
        out = model.forward_with_cfg(sch.scale_model_input(x, t), tt, cond, guidance)
        x = sch.step(out, t, x).prev_sample
    return x.clamp(-1, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B,3,S,S) in [-1,1] -> PIL images."""
    arr = ((images.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def grid(images: list[Image.Image], cols: int) -> Image.Image:
    """A contact sheet of equally sized images."""
    w, h = images[0].size
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, img in enumerate(images):
        sheet.paste(img, ((i % cols) * w, (i // cols) * h))
    return sheet


def as_uint8(image: Image.Image) -> np.ndarray:
    """HWC uint8 array (TensorBoard's add_image with dataformats='HWC')."""
    return np.asarray(image.convert("RGB"))
