"""Stage configuration: one frozen dataclass per stage, loadable from YAML and overridable.

A YAML file may hold one stage's keys at the top level, or sections named after stages
(`crawl:`, `download:`, `filter:`, `pair:`, `shards:`) so one file configures a whole run.
Unknown keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, Optional, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override that cannot be applied."""


@dataclasses.dataclass(frozen=True)
class CrawlConfig:
    """`crawl extract`: which links to take from pages and which URLs may be fetched."""

    allow_hosts: tuple[str, ...] = ()  # hosts/IPs/CIDRs exempt from the private-address rule
    include_srcset: bool = True  # take the largest srcset candidate of <img> and <picture><source>
    include_og_image: bool = True  # <meta property="og:image">
    max_links_per_page: int = 1000  # cap against pathological pages; extra links rejected


@dataclasses.dataclass(frozen=True)
class DownloadConfig:
    """`crawl download`: img2dataset settings."""

    allow_hosts: tuple[str, ...] = ()  # same URL policy as extract, also applied to redirects
    resize_mode: str = "no"  # img2dataset resize mode; "no" keeps the original bytes for filter
    image_size: int = 512  # target side when resize_mode is not "no"
    processes: int = 2  # img2dataset processes_count
    threads: int = 16  # img2dataset thread_count per process
    retries: int = 0  # extra attempts per URL
    timeout: float = 10.0  # seconds per request
    samples_per_shard: int = 1000  # images per output shard (the unit of resume)
    distributor: str = "multiprocessing"  # or "ray" / "pyspark" on a cluster
    user_agent_token: str = "webpairs"  # identifies the crawler; opt-out headers are honoured


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """`filter`: validation thresholds, hashing and the encoder."""

    min_side: int = 64  # pixels; smaller images are rejected as too_small
    max_aspect: float = 3.0  # long side / short side; larger is rejected as bad_aspect
    max_pixels: int = 40_000_000  # decompression-bomb limit given to Pillow explicitly
    animated: str = "first_frame"  # "first_frame" keeps frame 0 of GIF/WEBP/APNG; "reject" drops them
    phash_size: int = 8  # imagehash hash_size: 8 gives 64-bit pHash
    encoder: str = "open_clip:ViT-B-32"  # name in core.encoders; see `webpairs encoders`
    encoder_weights: str = ""  # local weights file; empty means the encoder's default offline source
    batch_size: int = 32  # RunInference batch size cap (BatchElements adapts below it) ...
    fixed_batch: bool = False  # ... or exactly this size per batch (the last one may be smaller)
    min_clip_score: Optional[float] = None  # off by default; LAION used 0.28 for ViT-B/32


@dataclasses.dataclass(frozen=True)
class PairConfig:
    """`pair`: boilerplate, near-duplicates and the similarity band."""

    boilerplate_pages: int = 10  # content seen on more than this many pages is boilerplate
    boilerplate_phash_distance: int = 4  # pHash bits within which two images count as the same content
    near_duplicate_distance: int = 10  # pHash bits: same-page images closer than this collapse
    sim_low: float = 0.2  # cosine below this: unrelated images
    sim_high: float = 0.95  # cosine above this: the same picture
    max_images_per_page: int = 32  # cap on per-page work (pairs are quadratic in it)
    max_pairs_per_page: int = 16  # sampled deterministically with the seed
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ShardConfig:
    """`shards`: webdataset pair shard sizes."""

    samples_per_shard: int = 1000  # a shard closes at this many samples ...
    max_shard_bytes: int = 256 * 1024 * 1024  # ... or at this many bytes, whichever first
    store_embedding: bool = True  # write {key}.cond.npy with the condition embedding


# sections of a run's YAML file (train: train/train.py TrainConfig, sample: train/generate.py SampleConfig)
SECTIONS = ("crawl", "download", "filter", "pair", "shards", "train", "sample")


def _coerce(value: Any, annotation: Any) -> Any:
    """Turn a YAML/CLI value into the field's type (tuples from lists or comma strings)."""
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing))  # noqa: S307
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(value)
    if origin is typing.Union:  # Optional[X]
        if value is None or value == "":
            return None
        hint = [a for a in typing.get_args(hint) if a is not type(None)][0]
    if hint is bool and isinstance(value, str):
        return value.lower() in ("1", "true", "yes", "on")
    if hint in (int, float, str) and value is not None:
        return hint(value)
    return value


def build(cls: type[T], values: Mapping[str, Any]) -> T:
    """Create `cls` from a mapping, rejecting unknown keys with a clear message."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}; known: {', '.join(fields)}")
    return cls(**{k: _coerce(v, fields[k].type) for k, v in values.items()})


def load(cls: type[T], path: Optional[str] = None, section: Optional[str] = None, defaults: Optional[dict[str, Any]] = None, **overrides: Any) -> T:
    """Load `cls` from `defaults`, then an optional YAML file (its `section`, or flat keys), then overrides."""
    values: dict[str, Any] = dict(defaults or {})
    if path:
        try:
            with open(path) as fh:
                doc = yaml.safe_load(fh) or {}
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(doc, dict):
            raise ConfigError(f"config file {path} must hold a mapping, got {type(doc).__name__}")
        if section and section in doc:
            values.update(doc[section] or {})
        elif not (set(doc) & set(SECTIONS)):
            values.update(doc)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return build(cls, values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config (for manifests and stats)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
