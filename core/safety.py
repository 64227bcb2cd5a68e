"""The NSFW safety score: LAION's CLIP-based NSFW detector heads on an image embedding (issue 32).

LAION-AI/CLIP-based-NSFW-Detector (MIT, Christoph Schuhmann 2022) trained small MLPs (AutoKeras)
on L2-normalised OpenAI CLIP image embeddings, one for ViT-L/14 (768-d) and one for ViT-B/32
(512-d); the output is in [0, 1], 1 = NSFW. clip-retrieval's `load_safety_model` downloads the
Keras SavedModel zips of that repository and runs them with TensorFlow. The same repository holds
both heads as PyTorch state dicts, `models/clip_ViT-B-32_openai_binary_nsfw_head.pth` and
`models/clip_ViT-L-14_openai_binary_nsfw_head.pth`, which its `convert_heads_to_pytorch.py` made
from the Keras models (layer by layer, printing the difference of the two models' outputs); its
`src/models.py` defines them. That file format is what this module reads:

    norm.mean, norm.variance       Keras' Normalization layer: (x - mean) / (sqrt(variance) + 1e-10)
    linear_1.weight, .bias ...     Dense layers in torch's (out, in) layout, ReLU after each one
    linear_N.weight, .bias         but the last, which has one output and a sigmoid

(ViT-B/32: 512 -> 32 -> 32 -> 1, with a Dropout before the last layer that inference skips;
ViT-L/14: 768 -> 64 -> 512 -> 256 -> 1). No TensorFlow: the file is read with
`torch.load(weights_only=True)` (tensors only, never code) and the MLP runs in NumPy.

The head's input is the embedding filter stores (L2-normalised, float16), so every score can be
recomputed from filter's `images/`. A head downloads on first use into torch's hub cache
(`$TORCH_HOME/hub/checkpoints/nsfw-heads/`), like encoder weights into their caches, and is read
from the cache only in offline mode (`webpairs --offline`, HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Optional
from urllib.parse import urlparse

import numpy as np

from core.encoders import hub_offline

HEADS_URL = "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/models/"
# (open_clip architecture, pretrained tag) -> LAION's head for its embeddings
HEAD_FILES = {
    ("ViT-B-32", "openai"): "clip_ViT-B-32_openai_binary_nsfw_head.pth",
    ("ViT-L-14", "openai"): "clip_ViT-L-14_openai_binary_nsfw_head.pth",
}
SAFETY_ENCODER = "open_clip:ViT-B-32"  # the encoder to name when the chosen one has no head
NORM_EPS = 1e-10  # LAION's port: (x - mean) / (sqrt(variance) + 1e-10)


class SafetyUnavailable(RuntimeError):
    """The safety head cannot be had here (not cached offline, download failed, not a head file)."""


def head_url(encoder: str) -> Optional[str]:
    """The URL of LAION's head for `encoder`'s embeddings, or None when it has none: the heads fit
    open_clip ViT-B-32 and ViT-L-14 with OpenAI's weights (the default tag), nothing else."""
    if not encoder.startswith("open_clip:"):
        return None
    spec = encoder.split(":", 1)[1]
    if spec.startswith("hf-hub:"):
        return None
    arch, _, tag = spec.partition(":")
    if arch.endswith("-quickgelu"):  # OpenAI's weights are QuickGELU models under either name
        arch = arch[: -len("-quickgelu")]
    name = HEAD_FILES.get((arch, tag or "openai"))
    return HEADS_URL + name if name else None


def cache_dir() -> str:
    """Where downloaded heads live: torch's hub cache ($TORCH_HOME/hub/checkpoints/nsfw-heads)."""
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints", "nsfw-heads")


def cached_path(url: str) -> str:
    """The cache file of a head URL: a folder per URL (two sources of one file name never meet)."""
    name = os.path.basename(urlparse(url).path) or "head.pth"
    return os.path.join(cache_dir(), hashlib.sha256(url.encode()).hexdigest()[:16], name)


def _is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def fetch_head(source: str) -> str:
    """A local path of the head `source` (a file, or an http(s) URL downloaded once into the cache;
    cache only in offline mode). Raises SafetyUnavailable with what to do."""
    if not _is_url(source):
        if not os.path.isfile(source):
            raise SafetyUnavailable(f"safety head file {source} does not exist")
        return source
    path = cached_path(source)
    if os.path.isfile(path):
        return path
    fixes = "pass a local copy with --safety-head FILE, or turn the score off with --safety-encoder none"
    if hub_offline():
        raise SafetyUnavailable(f"the NSFW head {source} is not in the cache ({path}) and offline mode is on (--offline / HF_HUB_OFFLINE): run once online to fill the cache, {fixes}")
    import torch

    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:  # into a temporary file beside `path`, renamed when complete
        torch.hub.download_url_to_file(source, path, progress=False)
    except Exception as err:  # noqa: BLE001 - any failure means "no head"
        raise SafetyUnavailable(f"cannot download the NSFW head {source} ({' '.join(str(err).split())[:160]}): check the network, {fixes}") from err
    return path


@dataclasses.dataclass(frozen=True)
class NsfwHead:
    """LAION's NSFW head: normalisation, then Dense layers (ReLU between, sigmoid at the end)."""

    mean: np.ndarray  # (D,)
    variance: np.ndarray  # (D,)
    layers: tuple  # ((W (out, in), b (out,)), ...), the last with one output
    source: str = ""

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def __call__(self, embeddings) -> np.ndarray:
        """(B, D) embeddings -> (B,) float32 scores in [0, 1] (1 = NSFW)."""
        x = np.asarray(embeddings, dtype=np.float32).reshape(-1, self.dim)
        x = (x - self.mean) / (np.sqrt(self.variance) + np.float32(NORM_EPS))
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0)
        return np.exp(-np.logaddexp(0, -x[:, 0])).astype(np.float32)  # the sigmoid, without overflow


def load_head(path: str, source: str = "") -> NsfwHead:
    """Read a head file (LAION's PyTorch state dict) into NumPy arrays, checking its layout."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: never code
    except Exception as err:  # noqa: BLE001
        raise SafetyUnavailable(f"{source or path} is not a readable NSFW head file ({' '.join(str(err).split())[:160]})") from err
    if not isinstance(state, dict) or "norm.mean" not in state or "norm.variance" not in state or "linear_1.weight" not in state:
        keys = ", ".join(list(state)[:6]) if isinstance(state, dict) else type(state).__name__
        raise SafetyUnavailable(f"{source or path} is not a LAION NSFW head (a state dict of norm.mean, norm.variance, linear_1.weight, ...; found {keys})")
    arr = {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}
    layers, n = [], 1
    while f"linear_{n}.weight" in arr:
        layers.append((arr[f"linear_{n}.weight"], arr[f"linear_{n}.bias"]))
        n += 1
    mean, variance = arr["norm.mean"].reshape(-1), arr["norm.variance"].reshape(-1)
    width = mean.shape[0]
    for i, (w, b) in enumerate(layers):
        if w.ndim != 2 or w.shape[1] != width or b.shape != (w.shape[0],):
            raise SafetyUnavailable(f"{source or path}: layer linear_{i + 1} has shape {w.shape} after a {width}-wide input; not a LAION NSFW head")
        width = w.shape[0]
    if width != 1 or variance.shape != mean.shape:
        raise SafetyUnavailable(f"{source or path}: the head ends with {width} outputs (one expected); not a LAION NSFW head")
    return NsfwHead(mean=mean, variance=variance, layers=tuple(layers), source=source or path)


def head_for(source: str) -> NsfwHead:
    """Fetch (download once, or from the cache) and read the head `source`."""
    return load_head(fetch_head(source), source)
