"""Noise schedule, training objective and the sampling loop (diffusers schedulers, cosine schedule,
v- or eps-prediction, classifier-free guidance), as DiT keeps its sampling loop in diffusion.py: the
trainer draws its sample grids with it, and generate/ builds edits and interpolations on it."""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch
from PIL import Image

from core.torchvision_compat import ensure_torchvision_importable


def make_scheduler(prediction: str = "v_prediction", steps: int = 1000):
    """The training noise scheduler: DDPM with the cosine ('squaredcos_cap_v2') schedule."""
    ensure_torchvision_importable()
    from diffusers import DDPMScheduler

    if prediction not in ("v_prediction", "epsilon"):
        raise ValueError(f"prediction must be v_prediction or epsilon, got {prediction!r}")
    return DDPMScheduler(num_train_timesteps=steps, beta_schedule="squaredcos_cap_v2", prediction_type=prediction, clip_sample=False)


def diffusion_loss(model, scheduler, x0: torch.Tensor, cond: torch.Tensor, p_uncond: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """MSE between the model's prediction and the scheduler's target at a random timestep.

    x0: (B,3,S,S) target images in [-1,1]; cond: (B,D) condition embeddings. With probability
    `p_uncond` a row's condition is replaced by the model's null embedding (CFG dropout).
    """
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=x0.device)
    drop = torch.rand(b, generator=generator, device=x0.device) < p_uncond
    xt = scheduler.add_noise(x0, noise, t)
    target = scheduler.get_velocity(x0, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
    pred = model(xt, t, cond, drop)
    return torch.nn.functional.mse_loss(pred.float(), target.float())


class EMA:
    """Exponential moving average of a model's weights (the weights used for sampling)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        """Move towards `model`; the decay warms up as min(decay, (1+n)/(10+n)) so that early
        EMA weights are not stuck at the random initialisation."""
        n = self.updates if step is None else step
        decay = min(self.decay, (1 + n) / (10 + n))
        self.updates += 1
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


# ---- sampling (classifier-free guidance) and image grids ----------------------------------------


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
    """Samples (B,C,S,S) for condition embeddings (B,D): images in [-1,1] for a pixel model, latents
    for a latent model (decode them with its latent space); guidance 0 = unconditional."""
    sch = make_sampler(sampler, prediction)
    sch.set_timesteps(steps)
    x = torch.randn((cond.shape[0], *model.sample_shape), generator=generator, device=cond.device) * sch.init_noise_sigma
    return _loop(model, sch, sch.timesteps, x, cond, guidance)


def _loop(model, sch, timesteps, x: torch.Tensor, cond: torch.Tensor, guidance: float, x0: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The sampler loop over `timesteps` from x (at the level of timesteps[0]) with CFG; with a mask,
    the region where mask is 0 is replaced by x0 noised to the next level after every step. Pixels
    end clamped to [-1, 1]; latents are left as they are."""
    for i, t in enumerate(timesteps):
        out = model.forward_with_cfg(sch.scale_model_input(x, t), t.expand(len(x)).to(x.device), cond, guidance)
        x = sch.step(out, t, x).prev_sample
        if mask is not None:
            if i + 1 < len(timesteps):
                fresh = torch.randn(x0.shape, generator=generator, device=x0.device)
                known = sch.add_noise(x0, fresh, timesteps[i + 1 : i + 2].repeat(len(x0)))
            else:
                known = x0
            x = mask * x + (1 - mask) * known
    return x.clamp(-1, 1) if getattr(model, "in_pixels", True) else x


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
