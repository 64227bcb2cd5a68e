"""Stream pair shards (webdataset, local or fsspec URLs) into training batches.

Every (rank, loader worker) reads a disjoint part of the data: whole shards when there are at
least as many shards as readers, otherwise every N-th sample of every shard (so a small dataset
still feeds every rank). A shuffle buffer mixes samples; the target is augmented (random crop and
horizontal flip). The condition is the stored embedding (`{key}.cond.npy`) when the shard's
encoder matches, else it is computed on the loader worker by the frozen encoder of the registry;
with `pairing="self"` the condition is the target image's own embedding (the reconstruction
baseline of the Semantica paper).

Latent models (`latent` = vae:<id>): when the shards carry that VAE's latents at this resolution
(`webpairs latents`), the loader yields the stored latents, scaled, and the VAE's encoder never
runs (no crop or flip augmentation: a latent is of the centre crop); otherwise it yields pixel
crops and the trainer encodes them on its device (`stored_latents` tells which).
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image

from core import sample_layout as layout
from core.latents import center  # noqa: F401 - the centre crop of sampling and stored latents


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the loader reads and how."""

    shards: str  # a shards directory, a glob, or a brace pattern / list of URLs
    image_size: int = 32
    batch_size: int = 8
    pairing: str = "same-page"  # or "self"
    encoder: str = ""  # encoder for computed conditions; "" = the shards' encoder (stored embeddings)
    encoder_weights: str = ""
    shuffle_buffer: int = 256
    num_workers: int = 1  # DataLoader worker processes per rank
    seed: int = 0
    latent: str = "pixel"  # the model's space (core/latents.py); stored latents are used when they match
    prefetch: int = 4  # batches each loader worker prepares ahead
    pin_memory: bool = False  # page-locked batches for fast, asynchronous host-to-GPU copies


def _fsspec_open(url: str, mode: str = "rb", bufsize: int = 8192, **_):
    import fsspec

    return fsspec.open(url, mode).open()


def register_fsspec_schemes() -> None:
    """Let webdataset open every fsspec URL (s3://, gs://, az://, memory://, ...) it has no opener for.

    webdataset's own openers shell out to curl/gsutil; fsspec reads through Python clients instead.
    """
    import sys

    import fsspec
    import webdataset  # noqa: F401 - loads webdataset.gopen

    schemes = sys.modules["webdataset.gopen"].gopen_schemes
    for protocol in fsspec.available_protocols():
        if protocol not in schemes and protocol not in ("file", "local"):
            schemes[protocol] = _fsspec_open
    schemes["gs"] = schemes["gcs"] = _fsspec_open  # instead of a gsutil subprocess


def shard_urls(spec: str) -> list[str]:
    """The tar files of a shards output (local or any fsspec URL): the shards its manifest.json
    lists, once its `_SUCCESS` marker says it is complete; never a glob of the folder, which could
    hold stale shards. An explicit glob of tar files is taken as given."""
    import fsspec

    if any(ch in spec for ch in "*?["):
        if "://" in spec and not spec.startswith("file://"):
            fs, _, paths = fsspec.get_fs_token_paths(spec)
            protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            return sorted(p if "://" in p else f"{protocol}://{p.lstrip('/')}" if protocol != "memory" else f"memory://{p}" for p in paths)
        return sorted(glob.glob(spec[7:] if spec.startswith("file://") else spec))
    root = spec.rstrip("/")
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{spec} is not a shards folder (expected a `webpairs shards` output)")
    if not fs.exists(f"{path}/_SUCCESS"):
        raise FileNotFoundError(f"{spec} is not a complete shards output (no _SUCCESS: `webpairs shards` was interrupted or never ran); run `webpairs shards` into it first")
    try:
        with fs.open(f"{path}/{layout.MANIFEST}") as fh:
            shards = [s["shard"] for s in json.load(fh)["shards"]]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        raise FileNotFoundError(f"{spec} has no readable {layout.MANIFEST}; run `webpairs shards` into it again") from None
    return [f"{root}/{name}" for name in shards]


def shards_manifest(spec: str) -> dict:
    """The shards' manifest.json (local or fsspec folder); {} for a glob or when there is none."""
    import fsspec

    if any(ch in spec for ch in "*?{"):
        return {}
    try:
        with fsspec.open(spec.rstrip("/") + "/" + layout.MANIFEST) as fh:
            doc = json.load(fh)
            return doc if isinstance(doc, dict) else {}
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError):
        return {}


def shards_encoder(spec: str) -> Optional[str]:
    """The encoder named in the shards' manifest.json (local or fsspec folder), if there is one."""
    return shards_manifest(spec).get("encoder")


def stored_latents(spec: str, latent: str, image_size: int) -> bool:
    """True when the shards carry latents of VAE `latent` at `image_size` (`webpairs latents`)."""
    info = shards_manifest(spec).get("latent") or {}
    return latent not in ("", "pixel") and info.get("vae") == latent and int(info.get("image_size") or 0) == image_size


def shards_store_embedding(spec: str) -> bool:
    """Whether the shards hold `{key}.cond.npy` (False for `webpairs shards --no-embedding`)."""
    config = shards_manifest(spec).get("config")
    return not isinstance(config, dict) or config.get("store_embedding", True) is not False


def assign(urls: list[str], rank: int, world: int, worker: int, workers: int):
    """(shards this reader opens, (modulus, remainder) of sample indices it keeps within them)."""
    readers, me = world * workers, rank * workers + worker
    if len(urls) >= readers:
        return urls[me::readers], (1, 0)
    return urls, (readers, me)


def augment(img: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random square crop (at least 80 % of the short side), resize, random flip -> (3,S,S) in [-1,1]."""
    w, h = img.size
    side = int(min(w, h) * rng.uniform(0.8, 1.0))
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class PairStream(torch.utils.data.IterableDataset):
    """Yields (target (3,S,S), condition embedding (D,), key) for one rank, endlessly (epochs)."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world: int = 1, epochs: Optional[int] = None):
        super().__init__()
        self.cfg, self.rank, self.world, self.epochs = cfg, rank, world, epochs
        self.urls = shard_urls(cfg.shards)
        if not self.urls:
            raise FileNotFoundError(f"no pair shards (*.tar) found at {cfg.shards}")
        stored = shards_encoder(cfg.shards)
        # shards written with --no-embedding: the condition is computed with the manifest's encoder
        self.use_stored = cfg.pairing == "same-page" and (not cfg.encoder or cfg.encoder == stored) and shards_store_embedding(cfg.shards)
        self.encoder_name = cfg.encoder or stored or ""
        if not self.use_stored and not self.encoder_name:
            raise ValueError(f"{cfg.shards} stores no condition embeddings and names no encoder: pass an encoder to compute them")
        self.latents = stored_latents(cfg.shards, cfg.latent, cfg.image_size)

    def _samples(self, urls: list[str]) -> Iterator[dict]:
        import webdataset as wds

        register_fsspec_schemes()
        for sample in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False):
            yield sample

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        urls, (mod, rem) = assign(self.urls, self.rank, self.world, worker, workers)
        rng = np.random.default_rng([self.cfg.seed, self.rank, worker])
        encoder = None
        if not self.use_stored:
            from core.encoders import load_encoder

            encoder = load_encoder(self.encoder_name, self.cfg.encoder_weights)
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            order = list(urls)
            rng.shuffle(order)
            buffer: list = []
            for i, s in enumerate(self._samples(order if mod == 1 else urls)):
                if mod > 1 and (i % mod) != rem:
                    continue
                buffer.append(s)
                if len(buffer) >= self.cfg.shuffle_buffer:
                    yield self._decode(buffer.pop(int(rng.integers(len(buffer)))), rng, encoder)
            rng.shuffle(buffer)
            for s in buffer:
                yield self._decode(s, rng, encoder)
            epoch += 1

    def _decode(self, s: dict, rng, encoder):
        target = None
        if self.latents:
            info = json.loads(s[layout.LATENT_JSON])
            raw = np.load(io.BytesIO(s[layout.LATENT_NPY])).astype(np.float32)
            x = (raw - float(info.get("shift_factor") or 0.0)) * float(info["scale_factor"])
        else:
            target = Image.open(io.BytesIO(s[layout.TARGET_JPG])).convert("RGB")
            x = augment(target, self.cfg.image_size, rng)
        if encoder is None:
            cond = np.load(io.BytesIO(s[layout.COND_NPY])).astype(np.float32)
        else:
            if self.cfg.pairing == "self" and target is None:
                target = Image.open(io.BytesIO(s[layout.TARGET_JPG])).convert("RGB")
            source = target if self.cfg.pairing == "self" else Image.open(io.BytesIO(s[layout.COND_JPG])).convert("RGB")
            cond = encoder.embed_images(encoder.preprocess(source)[None])[0]
        return torch.from_numpy(x), torch.from_numpy(cond), s["__key__"]


def make_loader(cfg: DataConfig, rank: int = 0, world: int = 1, epochs: Optional[int] = None) -> torch.utils.data.DataLoader:
    """A DataLoader over this rank's part of the shards (decoding in `num_workers` processes)."""
    ds = PairStream(cfg, rank, world, epochs)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0 and epochs is None, prefetch_factor=cfg.prefetch if cfg.num_workers > 0 else None, pin_memory=cfg.pin_memory)


def condition_dim(cfg: DataConfig) -> int:
    """Dimension of the condition embeddings this config produces."""
    ds = PairStream(cfg)
    if ds.use_stored:
        import webdataset as wds

        register_fsspec_schemes()
        for s in wds.WebDataset(ds.urls[:1], shardshuffle=False, empty_check=False):
            return int(np.load(io.BytesIO(s[layout.COND_NPY])).shape[0])
    from core.encoders import load_encoder

    return load_encoder(ds.encoder_name, cfg.encoder_weights).dim
