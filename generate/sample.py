"""SDEdit edits and interpolations: partial denoising from a noised image (Meng et al. 2021; Wang &
Golland 2023). The sampler, the guided loop and the image grids live beside the noise schedule in
`train/diffusion.py` (the trainer draws its sample grids with them); they are re-exported here."""

from __future__ import annotations

from typing import Optional

import torch

from train.diffusion import _loop, as_uint8, grid, make_sampler, make_scheduler, sample, to_pil  # noqa: F401 - re-exported

# ---- partial denoising: SDEdit edits and interpolations start from a noised image ----------------


def _start(sch, strength: float) -> torch.Tensor:
    """The sampler timesteps left after noising to `strength` of the schedule (diffusers' img2img rule)."""
    n = len(sch.timesteps)
    skip = n - min(n, int(round(n * strength)))
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(skip)
    return sch.timesteps[skip:]


@torch.no_grad()
def denoise_from(model, x0: torch.Tensor, cond: torch.Tensor, strength: float, noise: torch.Tensor, steps: int = 50, guidance: float = 3.0, sampler: str = "ddim", prediction: str = "v_prediction", mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """SDEdit (Meng et al. 2021): noise x0 (B,3,S,S in [-1,1]) with `noise` to `strength` (0..1 of the
    schedule) and denoise it back conditioned on `cond`. Strength 0 returns x0 unchanged.

    mask (B,1,S,S) in [0,1]: 1 = may change. Outside it the image is re-noised from x0 to the current
    level after every step (fresh noise), so it ends as x0 up to the last step's tiny noise.
    """
    sch = make_sampler(sampler, prediction)
    sch.set_timesteps(steps)
    timesteps = _start(sch, strength)
    if len(timesteps) == 0:
        return x0.clone()
    x = sch.add_noise(x0, noise, timesteps[:1].repeat(len(x0)))
    return _loop(model, sch, timesteps, x, cond, guidance, x0, mask, generator)


def slerp(a: torch.Tensor, b: torch.Tensor, u: float) -> torch.Tensor:
    """Spherical interpolation of two tensors of the same shape (by their flattened direction);
    falls back to linear interpolation when they are (anti)parallel."""
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = torch.dot(fa, fb) / (fa.norm() * fb.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    if omega.abs() < 1e-4 or (torch.pi - omega).abs() < 1e-4:
        return (1 - u) * a + u * b
    s = torch.sin(omega)
    return ((torch.sin((1 - u) * omega) / s) * a.double() + (torch.sin(u * omega) / s) * b.double()).to(a.dtype)


def noise_levels(low: float, high: float, k: int) -> list[float]:
    """The noise level of each of k interpolation candidates: spread over [low, high]."""
    if k == 1:
        return [(low + high) / 2]
    return [low + (high - low) * i / (k - 1) for i in range(k)]


@torch.no_grad()
def interpolate(model, xa: torch.Tensor, xb: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor, frames: int = 9, noise: tuple[float, float] = (0.30, 0.55), candidates: int = 4, seed: int = 0, steps: int = 50, guidance: float = 3.0, sampler: str = "ddim", prediction: str = "v_prediction") -> tuple[list[torch.Tensor], torch.Tensor]:
    """Wang & Golland (2023): noise A and B (3,S,S) with *shared* noise, slerp the noisy images and
    the condition embeddings (D,), denoise. Candidate k uses noise seed `seed + k` and noise level
    `noise_levels(*noise, candidates)[k]`. Returns, per candidate, the frames (F,3,S,S) and the
    interpolated conditions (F,D)."""
    us = [i / (frames - 1) for i in range(frames)] if frames > 1 else [0.0]
    conds = torch.stack([slerp(ca, cb, u) for u in us])
    out = []
    for k, level in enumerate(noise_levels(*noise, candidates)):
        eps = torch.randn((1, *xa.shape), generator=torch.Generator().manual_seed(seed + k)).to(xa.device)
        sch = make_sampler(sampler, prediction)
        sch.set_timesteps(steps)
        timesteps = _start(sch, level)
        if len(timesteps) == 0:  # level 0: nothing to denoise, the frames are pixel slerps
            out.append(torch.stack([slerp(xa, xb, u) for u in us]))
            continue
        na, nb = sch.add_noise(xa[None], eps, timesteps[:1]), sch.add_noise(xb[None], eps, timesteps[:1])
        noisy = torch.cat([slerp(na, nb, u) for u in us])
        out.append(_loop(model, sch, timesteps, noisy, conds, guidance))
    return out, conds


def inversion_loss(model, x0: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction: str = "v_prediction") -> torch.Tensor:
    """The training objective of one image x0 (C,S,S) under condition cond (D,), for the given noises
    (K,C,S,S) and timesteps (K,): how well the model reconstructs x0 from that condition."""
    sch = make_scheduler(prediction)
    x = x0[None].expand(len(t), *x0.shape)
    xt = sch.add_noise(x, noise, t)
    target = sch.get_velocity(x, noise, t) if prediction == "v_prediction" else noise
    return torch.nn.functional.mse_loss(model(xt, t, cond[None].expand(len(t), -1)).float(), target.float())


def invert_condition(model, x0: torch.Tensor, cond: torch.Tensor, steps: int = 50, lr: float = 0.02, batch: int = 8, prediction: str = "v_prediction", seed: int = 0) -> torch.Tensor:
    """Condition inversion (textual inversion moved into the condition space, as Wang & Golland do
    with text): starting from the encoder's embedding `cond` (D,), optimise it with Adam for `steps`
    steps so that the frozen model reconstructs x0 (C,S,S, the model's space): each step draws
    `batch` timesteps and noises and lowers the training objective. Returns the new embedding."""
    gen = torch.Generator().manual_seed(seed)
    c = cond.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([c], lr=lr)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                noise = torch.randn((batch, *x0.shape), generator=gen).to(x0.device)
                t = torch.randint(0, 1000, (batch,), generator=gen).to(x0.device)
                loss = inversion_loss(model, x0, c, noise, t, prediction)
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        for p in params:
            p.requires_grad_(True)
    return c.detach().to(cond.dtype)
