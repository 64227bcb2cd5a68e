"""Noise schedule and training objective (diffusers schedulers, cosine schedule, v- or eps-prediction)."""

from __future__ import annotations

import copy
from typing import Optional

import torch

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
