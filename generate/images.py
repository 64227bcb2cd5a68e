"""`webpairs sample ...`: image variations, SDEdit edits and interpolations from a trained checkpoint.

Each operation loads the EMA weights of a checkpoint (a RUN_DIR of `webpairs train` or one
checkpoint folder) with the backbone and latent space it records, embeds its input images with the
encoder the model was trained on (recorded in the checkpoint; another one is refused), works in the
model's space (a latent model: guides and interpolation ends are encoded by its VAE, every result
decoded), runs the samplers of `train/diffusion.py` and `generate/sample.py` on one device in batches, and writes PNGs at
the model's resolution plus a contact sheet (`sheet.png`) and `meta.json` (arguments, seeds, scores).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import ClassVar, Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from core.console import console
from generate import sample as S
from train.train import CheckpointError, checkpoint_folders, read_checkpoint  # one checkpoint format, read in one place

SHEET_CELL = 128  # contact sheets show each image at least this large (nearest-neighbour upscaling)


@dataclasses.dataclass
class Loaded:
    """A model ready for sampling and what it was trained with."""

    model: torch.nn.Module
    step: int
    preset: str
    prediction: str
    encoder_name: str
    path: str
    space: object = None  # core/latents.py PixelSpace or VaeSpace
    backbone: str = "unet"

    @property
    def size(self) -> int:
        """Pixels of the images the model makes (its latents are smaller by the VAE's factor)."""
        return self.model.image_size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) pixels in [-1,1] -> what the model denoises."""
        return self.space.encode(x) if self.space is not None else x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """What the model denoises -> (B,3,S,S) pixels in [-1,1]."""
        return self.space.decode(z) if self.space is not None else z


def find_checkpoint(path: str) -> str:
    """The checkpoint folder for a checkpoint folder or a RUN_DIR (its latest checkpoint by step)."""
    if os.path.exists(os.path.join(path, "state.json")):
        return path
    found = checkpoint_folders(path)
    if not found:
        raise CheckpointError(f"{path} holds no checkpoint (expected a `webpairs train` run directory or a checkpoint folder with state.json)")
    return found[0]


def load_model(path: str, device: str = "cpu", ema: bool = True, encoder: str = "", backbone: str = "", latent: str = "") -> Loaded:
    """EMA (or raw) weights of the checkpoint at `path` on `device`, rebuilt with the backbone and
    latent space it records. `encoder`, `backbone` and `latent`, when given, must match what the
    checkpoint records (CheckpointError in one sentence otherwise); `encoder` names the encoder of
    checkpoints too old to record one."""
    from core.latents import LatentUnavailable, load_space, normalise
    from train.models import build_model

    folder = find_checkpoint(path)
    part = "ema" if ema else "model"
    ckpt = read_checkpoint(folder, (part,))
    state, weights = ckpt["state"], ckpt[part]
    cfg = state.get("config", {})
    recorded = {"backbone": state.get("backbone") or cfg.get("backbone") or "unet", "latent": (state.get("latent") or {}).get("vae", "pixel"), "encoder": state.get("encoder") or cfg.get("encoder") or ""}
    try:
        asked = {"backbone": backbone, "latent": normalise(latent) if latent else "", "encoder": encoder}
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    differ = [f"--{k} {asked[k]} (it records {recorded[k]})" for k in asked if asked[k] and recorded[k] and asked[k] != recorded[k]]
    if differ:
        raise CheckpointError(f"checkpoint {folder} was trained with backbone {recorded['backbone']}, latent space {recorded['latent']}, condition encoder {recorded['encoder'] or '?'}: " + ", ".join(differ) + " does not match")
    try:
        space = load_space(recorded["latent"], device)
    except LatentUnavailable as err:
        raise CheckpointError(f"checkpoint {folder} needs its VAE: {err}") from None
    try:
        cond_dim = int(state.get("cond_dim") or weights["null_embedding"].shape[0])
        image_size = int(state.get("image_size") or cfg.get("image_size") or 0)
        sample_size = int(state.get("sample_size") or 0) or None
        model = build_model(cfg.get("preset", "tiny"), cond_dim, recorded["backbone"], channels=space.channels, sample_size=sample_size, image_size=image_size)
        model.load_state_dict(weights)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {folder} does not fit its recorded model ({' '.join(str(err).split())[:200]})") from None
    name = recorded["encoder"] or encoder
    if not name:
        raise CheckpointError(f"checkpoint {folder} does not name its encoder; pass --encoder NAME (the encoder of the shards it was trained on)")
    return Loaded(model.to(device).eval(), int(state["step"]), cfg.get("preset", "tiny"), cfg.get("prediction", "v_prediction"), name, folder, space, recorded["backbone"])


def read_image(path: str) -> Image.Image:
    """An RGB image from a file, with a clear error for anything Pillow cannot read."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def to_model(images: list[Image.Image], size: int, device) -> torch.Tensor:
    """Centre crops at the model resolution, (B,3,S,S) in [-1,1]."""
    from train.data import center

    return torch.from_numpy(np.stack([center(im, size) for im in images])).to(device)


def embed(encoder, images: list[Image.Image], batch: int = 32) -> np.ndarray:
    """(N,D) unit embeddings of PIL images with a registry encoder."""
    out = [encoder.embed_images(np.stack([encoder.preprocess(im) for im in images[i : i + batch]])) for i in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros((0, encoder.dim), np.float32)


def _sheet(rows: list[list[Image.Image]], out: str) -> str:
    cols = max(len(r) for r in rows)
    cell = max(SHEET_CELL, rows[0][0].size[0])
    blank = Image.new("RGB", (cell, cell), (255, 255, 255))
    flat = [(r[i].resize((cell, cell), Image.NEAREST) if i < len(r) else blank) for r in rows for i in range(cols)]
    path = os.path.join(out, "sheet.png")
    S.grid(flat, cols).save(path)
    return path


def _write(out: str, name: str, images: list[Image.Image]) -> list[str]:
    os.makedirs(out, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(os.path.join(out, f"{name}_{i:03d}.png"))
        im.save(paths[-1])
    return paths


def _meta(out: str, loaded: Loaded, **kw) -> None:
    with open(os.path.join(out, "meta.json"), "w") as fh:
        json.dump({"checkpoint": loaded.path, "step": loaded.step, "encoder": loaded.encoder_name, **kw}, fh, indent=2)


def variations(loaded: Loaded, encoder, image: Image.Image, out: str, n: int = 8, guidance: float = 3.0, steps: int = 50, sampler: str = "ddim", seed: int = 0, batch: int = 16) -> list[str]:
    """n new images that keep the semantics of `image` (CFG on its embedding; guidance 0 = unconditional)."""
    device = next(loaded.model.parameters()).device
    cond = torch.from_numpy(embed(encoder, [image])).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    images = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        images += S.to_pil(loaded.decode(S.sample(loaded.model, cond.expand(b, -1), steps, guidance, sampler, loaded.prediction, gen)))
    paths = _write(out, "variation", images)
    _sheet([S.to_pil(to_model([image], loaded.size, "cpu")) + images], out)
    _meta(out, loaded, op="variations", n=n, guidance=guidance, steps=steps, sampler=sampler, seed=seed)
    return paths


def edit(loaded: Loaded, encoder, guide: Image.Image, out: str, strength: float = 0.5, mask: Optional[Image.Image] = None, cond_image: Optional[Image.Image] = None, n: int = 4, guidance: float = 3.0, steps: int = 50, sampler: str = "ddim", seed: int = 0) -> list[str]:
    """SDEdit: n edits of `guide` noised to `strength` and denoised, conditioned on `cond_image` (or the
    guide). With `mask` (white = may change), the rest stays as the guide."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"--strength must lie in [0, 1], got {strength}")
    device = next(loaded.model.parameters()).device
    pixels = to_model([guide], loaded.size, device)
    x0 = loaded.encode(pixels).expand(n, -1, -1, -1)  # a latent model edits the guide's latent
    cond = torch.from_numpy(embed(encoder, [cond_image or guide])).to(device).expand(n, -1)
    m = None
    if mask is not None:
        side = loaded.model.sample_size  # the mask at the resolution the model denoises
        m = torch.from_numpy(np.asarray(mask.convert("L").resize((side, side), Image.NEAREST), np.float32) / 255.0)
        m = (m > 0.5).float()[None, None].expand(n, 1, -1, -1).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen, device=device)
    x = S.denoise_from(loaded.model, x0, cond, strength, noise, steps, guidance, sampler, loaded.prediction, m, gen)
    if strength == 0:
        x = pixels.expand(n, -1, -1, -1)
    else:
        x = loaded.decode(x)
        if m is not None and not loaded.model.in_pixels:  # outside the mask: the guide's own pixels, not their VAE reconstruction
            mp = torch.nn.functional.interpolate(m, size=x.shape[-2:], mode="nearest")
            x = mp * x + (1 - mp) * pixels
    images = S.to_pil(x)
    paths = _write(out, "edit", images)
    first = S.to_pil(pixels) + ([cond_image.resize((loaded.size, loaded.size))] if cond_image else []) + ([mask.convert("RGB").resize((loaded.size, loaded.size))] if mask else [])
    _sheet([first, images], out)
    _meta(out, loaded, op="edit", n=n, strength=strength, masked=mask is not None, guidance=guidance, steps=steps, sampler=sampler, seed=seed)
    return paths


def interpolate(loaded: Loaded, encoder, a: Image.Image, b: Image.Image, out: str, frames: int = 9, noise: tuple[float, float] = (0.30, 0.55), candidates: int = 4, rank_prompt: str = "", negative_prompt: str = "", guidance: float = 3.0, steps: int = 50, sampler: str = "ddim", seed: int = 0, invert: int = 0, invert_lr: float = 0.02) -> list[str]:
    """Frames from A to B (Wang & Golland 2023), the best of `candidates` per frame: CLIP score
    prompt - negative when the encoder has a text tower and a prompt is given, else closeness to the
    interpolated condition embedding. With `invert` N, each end's embedding is first optimised for
    N steps so that the model reconstructs that end (`S.invert_condition`), and the frames
    interpolate between the inverted embeddings."""
    if invert < 0:
        raise ValueError(f"--invert must be 0 or more steps, got {invert}")
    lo, hi = noise
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"--noise must be LOW..HIGH with 0 <= LOW <= HIGH <= 1, got {lo}..{hi}")
    if rank_prompt and not encoder.has_text:
        raise ValueError(f"--rank-prompt needs an encoder with a text tower; {encoder.name} has none")
    device = next(loaded.model.parameters()).device
    xa, xb = to_model([a, b], loaded.size, device)
    ca, cb = torch.from_numpy(embed(encoder, [a, b])).to(device)
    za, zb = loaded.encode(torch.stack([xa, xb]))  # a latent model interpolates between the ends' latents
    moved = []
    if invert:
        inverted = [S.invert_condition(loaded.model, z, c, invert, invert_lr, prediction=loaded.prediction, seed=seed + i) for i, (z, c) in enumerate(((za, ca), (zb, cb)))]
        moved = [float(torch.nn.functional.cosine_similarity(n, c, dim=0)) for n, c in zip(inverted, (ca, cb))]
        ca, cb = inverted
    cands, conds = S.interpolate(loaded.model, za, zb, ca, cb, frames, noise, candidates, seed, steps, guidance, sampler, loaded.prediction)
    cands = [loaded.decode(c) for c in cands]
    scores = np.stack([frame_scores(encoder, S.to_pil(c), conds.cpu().numpy(), rank_prompt, negative_prompt) for c in cands])  # (K, F)
    best = scores.argmax(0)
    images = [S.to_pil(cands[k][i : i + 1])[0] for i, k in enumerate(best)]
    paths = _write(out, "frame", images)
    _sheet([S.to_pil(xa[None]) + images + S.to_pil(xb[None])], out)
    _meta(out, loaded, op="interpolate", frames=frames, noise=[lo, hi], candidates=candidates, levels=S.noise_levels(lo, hi, candidates), chosen=best.tolist(), scores=scores.tolist(), rank_prompt=rank_prompt, negative_prompt=negative_prompt, guidance=guidance, steps=steps, sampler=sampler, seed=seed, invert=invert, invert_lr=invert_lr, inverted_cosine_to_encoder=moved)
    return paths


def frame_scores(encoder, images: list[Image.Image], conds: np.ndarray, prompt: str = "", negative: str = "") -> np.ndarray:
    """Per image: CLIP(prompt) - CLIP(negative) with a prompt, else cosine to its own condition row."""
    e = embed(encoder, images)
    if prompt:
        texts = encoder.embed_texts([prompt] + ([negative] if negative else []))
        return e @ texts[0] - (e @ texts[1] if negative else 0.0)
    c = conds / np.linalg.norm(conds, axis=1, keepdims=True).clip(1e-12)
    return (e * c).sum(1)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The `sample` stage of `webpairs run` (YAML section `sample`): one grid of each kind."""

    n: int = 8  # variations
    steps: int = 50
    guidance: float = 3.0
    sampler: str = "ddim"
    strength: float = 0.5  # SDEdit
    frames: int = 9  # interpolation
    candidates: int = 4
    noise_low: float = 0.30
    noise_high: float = 0.55
    seed: int = 0

    RANGES: ClassVar[dict] = {"n": (1, 1024), "steps": (1, 1000), "guidance": (0.0, 100.0), "strength": (0.0, 1.0), "frames": (2, 1000), "candidates": (1, 256), "noise_low": (0.0, 1.0), "noise_high": (0.0, 1.0), "seed": (0, 2**32 - 1)}
    CHOICES: ClassVar[dict] = {"sampler": ("ddim", "dpm")}


def shard_examples(shards: str, n: int = 2) -> list[dict]:
    """The first pairs of n different pages in the shards: {"cond", "target" (PIL), "page_url"}."""
    import io

    import webdataset as wds

    from core import sample_layout as layout
    from train.data import register_fsspec_schemes, shard_urls

    register_fsspec_schemes()
    found: dict[str, dict] = {}
    for s in wds.WebDataset(shard_urls(shards), shardshuffle=False, empty_check=False):
        page = json.loads(s[layout.META_JSON]).get("page_url", "")
        if page not in found:
            found[page] = {"page_url": page, **{k: Image.open(io.BytesIO(s[f])).convert("RGB") for k, f in (("cond", layout.COND_JPG), ("target", layout.TARGET_JPG))}}
        if len(found) == n:
            break
    return list(found.values())


def _least_similar(encoder, a: dict, others: list[dict]) -> dict:
    """The example whose condition the encoder finds least like a's: edits and interpolations
    between two different subjects show more than between two of one."""
    emb = embed(encoder, [e["cond"] for e in [a, *others]])
    return others[int(np.argmin(emb[1:] @ emb[0]))]


def run_samples(run_dir: str, shards: str, out: str, cfg: SampleConfig, device: str = "cpu") -> dict:
    """Variations of a condition image of the shards, an SDEdit of its target guided by another
    page's condition (of the first 8 pages, the one least like it), and an interpolation between
    those two conditions; returns {kind: sheet path}."""
    from core.encoders import load_encoder

    loaded = load_model(run_dir, device)
    encoder = load_encoder(loaded.encoder_name)
    ex = shard_examples(shards, 8)
    if not ex:
        raise ValueError(f"no pairs in {shards} to sample from")
    a, b = ex[0], _least_similar(encoder, ex[0], ex[1:]) if len(ex) > 1 else ex[0]
    common = dict(guidance=cfg.guidance, steps=cfg.steps, sampler=cfg.sampler, seed=cfg.seed)
    jobs = {
        "variations": lambda: variations(loaded, encoder, a["cond"], os.path.join(out, "variations"), n=cfg.n, **common),
        "edit": lambda: edit(loaded, encoder, a["target"], os.path.join(out, "edit"), strength=cfg.strength, cond_image=b["cond"], **common),
        "interpolate": lambda: interpolate(loaded, encoder, a["cond"], b["cond"], os.path.join(out, "interpolate"), cfg.frames, (cfg.noise_low, cfg.noise_high), cfg.candidates, **common),
    }
    # images each kind denoises (its share of the time): one progress line for the whole stage
    cost = {"variations": cfg.n, "edit": max(1, round(4 * cfg.strength)), "interpolate": cfg.frames * cfg.candidates}
    with tqdm(total=sum(cost.values()), desc="sample", unit="image", file=console()) as bar:
        for kind, job in jobs.items():
            bar.set_postfix_str(kind)
            job()
            bar.update(cost[kind])
    return {k: os.path.join(out, k, "sheet.png") for k in jobs}
