"""Stage configuration: one frozen dataclass per stage, loadable from YAML and overridable.

A YAML file may hold one stage's keys at the top level, or sections named after stages
(`crawl:`, `download:`, `filter:`, `pair:`, `shards:`) so one file configures a whole run.
Unknown keys are an error (a typo must not silently fall back to a default), and so is a value of
the wrong type or outside its range: every numeric key has a range in its class's `RANGES`, and
string keys with a closed set of values list it in `CHOICES`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar, Mapping, Optional, TypeVar

import yaml

T = TypeVar("T")
DEFAULT_CONTACT = "https://github.com/webpairs/webpairs"  # named in the User-Agent of `crawl download`


class ConfigError(ValueError):
    """A configuration file or override that cannot be applied."""


@dataclasses.dataclass(frozen=True)
class CrawlConfig:
    """`crawl extract`: which links to take from pages and which URLs may be fetched."""

    allow_hosts: tuple[str, ...] = ()  # hosts/IPs/CIDRs exempt from the private-address rule
    include_srcset: bool = True  # take the largest srcset candidate of <img> and <picture><source>
    include_og_image: bool = True  # <meta property="og:image">
    max_links_per_page: int = 1000  # cap against pathological pages; extra links rejected
    max_page_depth: int = 4096  # element nesting beyond this rejects the page (parse time grows with its square)
    max_page_elements: int = 200_000  # tags per page beyond this reject the page
    paths_prefix: str = ""  # root for the relative paths of a *.paths(.gz) manifest (default: its own URL's)
    max_files: int = 0  # read at most this many input files (0: all) ...
    files_from: int = 0  # ... starting at this index of the sorted list or manifest
    retries: int = 5  # attempts after a transient read error (reset, 5xx, S3 SlowDown), with backoff
    consent: str = "on"  # "off": keep the images of pages that opt out (X-Robots-Tag/meta noai, noimageai); only for sites you own

    CHOICES: ClassVar[dict] = {"consent": ("on", "off")}
    RANGES: ClassVar[dict] = {"max_links_per_page": (1, None), "max_page_depth": (16, 100_000), "max_page_elements": (100, 100_000_000), "max_files": (0, None), "files_from": (0, None), "retries": (0, 100)}


@dataclasses.dataclass(frozen=True)
class DownloadConfig:
    """`crawl download`: img2dataset settings."""

    allow_hosts: tuple[str, ...] = ()  # same URL policy as extract, also applied to redirects
    resize_mode: str = "no"  # img2dataset resize mode; "no" keeps the original bytes for filter
    image_size: int = 512  # target side when resize_mode is not "no"
    processes: int = 2  # img2dataset processes_count
    threads: int = 16  # img2dataset thread_count per process
    retries: int = 0  # extra attempts per URL
    timeout: float = 10.0  # seconds a connect or a read may wait
    deadline: float = 30.0  # seconds one image may take in all (redirects and a dripping body included)
    max_image_bytes: int = 20 * 1024 * 1024  # larger bodies are cut off and rejected as too_large
    resolve: tuple[str, ...] = ()  # HOST:ADDR pins (curl's --resolve); the URL policy still applies
    samples_per_shard: int = 1000  # images per output shard (the unit of resume)
    distributor: str = "multiprocessing"  # or "ray" / "pyspark" on a cluster
    user_agent_token: str = "webpairs"  # the token X-Robots-Tag directives are matched on
    # consent and politeness (crawl/consent.py, crawl/polite.py)
    consent: str = "on"  # robots.txt, TDMRep, opt-out headers; "off" only for sites you own (one warning per run)
    contact: str = DEFAULT_CONTACT  # User-Agent: webpairs/<version> (+contact), where a site owner learns about the crawl
    per_host_connections: int = 4  # connections open at once to one host, across all download processes
    max_retry_after: float = 60.0  # a 429/503 Retry-After up to this many seconds is waited for and retried (0: never)
    # which links are worth a fetch (crawl/plan.py); each rule is its own reason in rejected/
    min_side: int = 64  # a declared (rendered) side under this: declared_too_small (0: off; never above filter's min_side)
    skip_extensions: tuple[str, ...] = ("svg", "svgz", "ico")  # not raster images filter can use: not_raster
    url_boilerplate: bool = True  # an image URL on > boilerplate_pages pages, or on >= site_share of its site's pages
    boilerplate_pages: int = 10  # (the URL half of pair's boilerplate rules, same defaults)
    site_share: float = 0.5
    site_min_pages: int = 3
    boilerplate_evidence: bool = True  # fetch a flagged URL once (not once per page) so pair's content rule sees it
    max_links_per_page: int = 64  # the first N candidate links of a page by position: page_cap (0: no cap)
    min_links_per_page: int = 2  # pages left with fewer candidates cannot make a pair: page_too_few_links
    plan_memory: str = "64MB"  # DuckDB memory limit of the plan (it spills to disk beyond it; one thread per 64 MB of it: more on a big node)
    blocklist: tuple[str, ...] = ()  # hash list files (sha256:/md5:/pdq: lines): a match is rejected as blocklisted, never written
    blocklist_pdq_distance: int = 31  # a pdq: entry matches an image within this many bits (Meta's confident match)

    RANGES: ClassVar[dict] = {
        "image_size": (8, 16384), "processes": (1, 4096), "threads": (1, 4096), "retries": (0, 100), "timeout": (0.1, 3600), "deadline": (0.1, 86400), "max_image_bytes": (1024, 2**31), "samples_per_shard": (1, 10_000_000),
        "per_host_connections": (1, 1024), "max_retry_after": (0.0, 86400.0),
        "min_side": (0, 100_000), "boilerplate_pages": (1, None), "site_share": (0.0, 1.0), "site_min_pages": (2, None), "max_links_per_page": (0, None), "min_links_per_page": (0, None),
        "blocklist_pdq_distance": (0, 63),
    }
    CHOICES: ClassVar[dict] = {"consent": ("on", "off"), "distributor": ("multiprocessing", "ray", "pyspark"), "resize_mode": ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")}


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """`filter`: validation thresholds, hashing and the encoder."""

    min_side: int = 64  # pixels; smaller images are rejected as too_small
    max_aspect: float = 3.0  # long side / short side; larger is rejected as bad_aspect
    max_pixels: int = 40_000_000  # decompression-bomb limit given to Pillow explicitly
    animated: str = "first_frame"  # "first_frame" keeps frame 0 of GIF/WEBP/APNG; "reject" drops them
    phash_size: int = 8  # imagehash hash_size: 8 gives 64-bit pHash
    scaled_decode: bool = True  # JPEG decoded at the smallest DCT scale each use needs (false: every pixel)
    encoder: str = "open_clip:ViT-B-32"  # name in core.encoders; see `webpairs encoders`
    encoder_weights: str = ""  # local weights file; empty means the encoder's default offline source
    batch_size: int = 32  # RunInference batch size cap (BatchElements adapts below it) ...
    fixed_batch: bool = False  # ... or exactly this size per batch (the last one may be smaller)
    min_clip_score: Optional[float] = None  # off by default; LAION used 0.28 for ViT-B/32
    # image-level boilerplate signals (filter/signals.py), each its own reason
    check_declared_size: bool = True  # a declared (rendered) side under min_side -> declared_too_small
    flat_colours: int = 8  # the N most frequent exact colours ... (0: rule off)
    flat_share: float = 0.8  # ... covering this share of pixels -> flat_image (logos, icons)
    url_words: tuple[str, ...] = ("logo", "icon", "favicon", "sprite", "avatar", "badge", "button")  # path tokens ...
    reject_url_words: bool = False  # ... that reject as url_word when on; counted in stats either way
    faces: str = "detect"  # filter/faces.py: detect (count + boxes per kept image), blur (also blur them in the stored bytes), off
    # the nsfw score (core/safety.py): LAION's CLIP-based NSFW head on an image embedding
    safety_encoder: str = ""  # whose embedding the head reads: "" the main encoder's, another name embeds each image again, "none" no score
    safety_encoder_weights: str = ""  # local weights file for safety_encoder
    safety_head: str = ""  # head file or http(s) URL in LAION's format; "" = LAION's head for the safety encoder (downloaded on first use)
    max_nsfw: Optional[float] = None  # reject images scoring above this as nsfw (off by default; needs a head)

    RANGES: ClassVar[dict] = {"min_side": (1, 100_000), "max_aspect": (1.0, 10_000), "max_pixels": (1, 10**10), "phash_size": (2, 64), "batch_size": (1, 65536), "min_clip_score": (-1.0, 1.0), "flat_colours": (0, 4096), "flat_share": (0.0, 1.0), "max_nsfw": (0.0, 1.0)}
    CHOICES: ClassVar[dict] = {"animated": ("first_frame", "reject"), "faces": ("detect", "blur", "off")}


@dataclasses.dataclass(frozen=True)
class PairConfig:
    """`pair`: boilerplate, near-duplicates and the similarity band."""

    boilerplate_pages: int = 10  # content or an image URL on more than this many pages anywhere: boilerplate_global
    site_share: float = 0.5  # content or an image URL on at least this share of its site's pages ...
    site_min_pages: int = 3  # ... and on at least this many of them: boilerplate_site
    boilerplate_phash_distance: int = 4  # pHash bits within which two images count as the same content
    near_duplicate_distance: int = 10  # pHash bits: same-page images closer than this collapse
    sim_low: float = 0.2  # cosine below this: unrelated images
    sim_high: float = 0.95  # cosine above this: the same picture
    max_images_per_page: int = 32  # cap on per-page work (pairs are quadratic in it)
    max_pairs_per_page: int = 16  # sampled deterministically with the seed
    seed: int = 0
    # copies across pages and sites (pairing/copies.py): candidates, then a geometric check
    copies: bool = True  # find the same photo in other dresses across the crawl and keep it once
    copy_top_k: int = 10  # embedding neighbours per image (faiss) ...
    copy_min_cosine: float = 0.5  # ... with at least this cosine (loose: copies go as low as 0.7)
    copy_phash_distance: int = 10  # mirror-aware pHash neighbours within this many bits
    copy_max_candidates: int = 10  # partners each image proposes; at most twice this many checks per image (bounds the work)
    copy_max_side: int = 320  # verification works on the content downscaled to this side
    copy_max_keypoints: int = 300  # SIFT keypoints per image, at most
    copy_ratio: float = 0.8  # Lowe's ratio test of descriptor matches
    copy_ransac_px: float = 4.0  # RANSAC reprojection threshold, pixels at copy_max_side
    copy_min_inliers: int = 20  # matches that agree on one similarity transform
    copy_max_scale: float = 4.0  # the transform's scale within [1/x, x]
    copy_max_rotation: float = 10.0  # degrees: re-dressed copies are not rotated
    copy_min_containment: float = 0.8  # shared region / the smaller picture, at least
    copy_min_coverage: float = 0.35  # shared region / the larger picture, at least (a portrait photo cut to 16:9 keeps 37 %)
    copy_min_spread: float = 0.25  # the inliers' hull / the shared region, at least (not a watermark)

    RANGES: ClassVar[dict] = {
        "copy_top_k": (1, 1000), "copy_min_cosine": (-1.0, 1.0), "copy_phash_distance": (0, 64), "copy_max_candidates": (1, 1000), "copy_max_side": (64, 4096),
        "copy_max_keypoints": (16, 10_000), "copy_ratio": (0.1, 1.0), "copy_ransac_px": (0.5, 50.0), "copy_min_inliers": (4, 10_000), "copy_max_scale": (1.0, 100.0),
        "copy_max_rotation": (0.0, 180.0), "copy_min_containment": (0.0, 1.0), "copy_min_coverage": (0.0, 1.0), "copy_min_spread": (0.0, 1.0),
        "boilerplate_pages": (1, None), "site_share": (0.0, 1.0), "site_min_pages": (2, None), "boilerplate_phash_distance": (0, 64), "near_duplicate_distance": (0, 64), "sim_low": (-1.0, 1.0), "sim_high": (-1.0, 1.0),
        "max_images_per_page": (2, 100_000), "max_pairs_per_page": (1, 10_000_000), "seed": (0, 2**32 - 1),
    }


@dataclasses.dataclass(frozen=True)
class ShardConfig:
    """`shards`: webdataset pair shard sizes."""

    samples_per_shard: int = 1000  # a shard closes at this many samples ...
    max_shard_bytes: int = 256 * 1024 * 1024  # ... or at this many bytes, whichever first
    store_embedding: bool = True  # write {key}.cond.npy with the condition embedding

    RANGES: ClassVar[dict] = {"samples_per_shard": (1, 10_000_000), "max_shard_bytes": (1024 * 1024, None)}


# sections of a run's YAML file (train: train/train.py TrainConfig, sample: generate/images.py SampleConfig)
SECTIONS = ("crawl", "download", "filter", "pair", "shards", "train", "sample", "beam")


def beam_flags(path: Optional[str]) -> list[str]:
    """The `beam:` section of a YAML config as Beam flags (read by every Beam stage and by `run`):
    a mapping (`runner: dask`, `dask-workers: 2`, `dask_npartitions: 16`) or a list of flags.
    Flags given on the command line come after these, so they win."""
    if not path:
        return []
    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError):
        return []  # the stage's own config loading reports it in one line
    section = doc.get("beam") if isinstance(doc, dict) else None
    if section is None:
        return []
    if isinstance(section, list) and all(isinstance(v, str) for v in section):
        return list(section)
    if isinstance(section, dict):
        return [f"--{k}={v}" for k, v in section.items()]
    raise ConfigError(f"config file {path}: section 'beam' must hold a mapping of flags (runner: dask) or a list of them")


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce(value: Any, annotation: Any) -> Any:
    """Turn a YAML/CLI value into the field's type (tuples from lists or comma strings); raises
    TypeError/ValueError for a value that is not of that type (no silent truncation)."""
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing))  # noqa: S307
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError("a list")
        return tuple(str(v) for v in value)
    if origin is typing.Union:  # Optional[X]
        if value is None or value == "":
            return None
        hint = [a for a in typing.get_args(hint) if a is not type(None)][0]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise TypeError("true or false")
    if hint is int:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise TypeError("a whole number")
        if isinstance(value, (int, float)):
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                raise TypeError("a whole number") from None
        raise TypeError("a whole number")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError("a number")
        try:
            out = float(value)
        except ValueError:
            raise TypeError("a number") from None
        if out != out or out in (float("inf"), float("-inf")):
            raise TypeError("a finite number")
        return out
    if hint is str:
        if isinstance(value, (dict, list)):
            raise TypeError("a string")
        return str(value)
    return value


def _check(cls: type, key: str, value: Any) -> None:
    """Range and choice checks of one coerced value; ConfigError names key, value and what is allowed."""
    low, high = getattr(cls, "RANGES", {}).get(key, (None, None))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (low is not None and value < low) or (high is not None and value > high):
            allowed = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"{cls.__name__} key {key!r}: {value!r} is out of range (allowed: {allowed})")
    choices = getattr(cls, "CHOICES", {}).get(key)
    if choices and value not in choices:
        raise ConfigError(f"{cls.__name__} key {key!r}: {value!r} is not one of {', '.join(choices)}")


def numeric_fields(cls: type) -> list[str]:
    """Names of the int/float fields of a config class (each must have a range)."""
    out = []
    for f in dataclasses.fields(cls):
        text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if text in ("int", "float", "Optional[int]", "Optional[float]"):
            out.append(f.name)
    return out


def build(cls: type[T], values: Mapping[str, Any]) -> T:
    """Create `cls` from a mapping, rejecting unknown keys and bad values with a clear message."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}; known: {', '.join(fields)}")
    coerced = {}
    for key, value in values.items():
        if isinstance(value, bool) and getattr(cls, "CHOICES", {}).get(key) == ("on", "off"):
            value = "on" if value else "off"  # YAML reads a bare on/off as a boolean
        try:
            coerced[key] = _coerce(value, fields[key].type)
        except (TypeError, ValueError) as err:
            expected = str(err) if str(err).startswith(("a ", "an ", "true")) else fields[key].type
            raise ConfigError(f"{cls.__name__} key {key!r}: {value!r} is not {expected}") from None
        _check(cls, key, coerced[key])
    return cls(**coerced)


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
            if not isinstance(doc[section] or {}, dict):
                raise ConfigError(f"config file {path}: section {section!r} must hold a mapping")
            values.update(doc[section] or {})
        elif not (set(doc) & (set(SECTIONS) - {"beam"})):  # flat keys (beside an optional beam: section)
            values.update({k: v for k, v in doc.items() if k != "beam"})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return build(cls, values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config (for manifests and stats)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
