"""Per-page pure functions: near-duplicate collapse and (condition, target) pair selection.

These run on one page's images after GroupByKey(page_url); their work is bounded by the per-page
image cap, so the stage never does quadratic work beyond it.
"""

from __future__ import annotations

import random
from typing import Iterable

import numpy as np

from core.config import PairConfig
from core.records import PairRecord, stable_id

NEAR_DUPLICATE = "near_duplicate"
OVER_PAGE_CAP = "over_page_cap"
PAGE_TOO_SMALL = "page_too_small"
NO_PAIR_IN_BAND = "no_pair_in_band"


def collapse_near_duplicates(images: list[dict], max_distance: int) -> tuple[list[dict], list[tuple[dict, str]]]:
    """Keep the largest image of each group of pHash-close images (and exact copies) on a page.

    Returns (kept, [(dropped, id of the image it duplicates)]). Deterministic: ties broken by
    position then image_id.
    """
    order = sorted(images, key=lambda r: (-(r["width"] * r["height"]), r["position"], r["image_id"]))
    kept: list[tuple[int, dict]] = []  # (place in `order`, image)
    bits: dict[int, int] = {}  # pHashes as ints, each parsed once, when first compared (phash_distance's bits)

    def value(k: int, r: dict) -> int:
        if k not in bits:
            bits[k] = int(r["phash"], 16)
        return bits[k]

    dropped: list[tuple[dict, str]] = []
    for n, img in enumerate(order):
        twin = None
        for m, k in kept:
            if k["image_id"] == img["image_id"] or (value(m, k) ^ value(n, img)).bit_count() <= max_distance:
                twin = k
                break
        if twin is None:
            kept.append((n, img))
        else:
            dropped.append((img, twin["image_id"]))
    return [k for _, k in kept], dropped


def cosine_matrix(images: list[dict]) -> np.ndarray:
    """Cosine similarities of the stored (unit-length, float16) embeddings."""
    emb = np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in images])  # lists or float16 arrays
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12
    return emb @ emb.T


def select_pairs(page_url: str, images: list[dict], cfg: PairConfig) -> tuple[list[PairRecord], set[str]]:
    """Ordered pairs of distinct images whose similarity lies in [sim_low, sim_high], at most
    `max_pairs_per_page`, sampled with a seed derived from cfg.seed and the page URL.

    Returns (pairs, image_ids used by at least one in-band pair).
    """
    if len(images) < 2:
        return [], set()
    sims = cosine_matrix(images)
    band = (sims >= cfg.sim_low) & (sims <= cfg.sim_high)  # the same float32 comparisons, row-major like a double loop
    np.fill_diagonal(band, False)
    candidates = list(zip(*(a.tolist() for a in np.nonzero(band))))
    used = {images[i]["image_id"] for i, j in candidates} | {images[j]["image_id"] for i, j in candidates}
    rng = random.Random(stable_id(str(cfg.seed), page_url))
    if len(candidates) > cfg.max_pairs_per_page:
        candidates = sorted(rng.sample(candidates, cfg.max_pairs_per_page))
    pairs = [PairRecord(page_url, images[i]["image_id"], images[j]["image_id"], float(sims[i, j])) for i, j in candidates]
    return pairs, used


def cap_page(images: list[dict], cap: int) -> tuple[list[dict], list[dict]]:
    """The first `cap` images in page order (position, then id) and the rest."""
    order = sorted(images, key=lambda r: (r["position"], r["image_id"]))
    return order[:cap], order[cap:]


def page_outcome(page_url: str, images: Iterable[dict], cfg: PairConfig) -> tuple[list[PairRecord], list[dict], list[tuple[dict, str, str]]]:
    """Everything that happens to one page: (pairs, kept images, [(image, reason, detail)])."""
    images = list(images)
    rejected: list[tuple[dict, str, str]] = []
    unique, dups = collapse_near_duplicates(images, cfg.near_duplicate_distance)
    rejected += [(img, NEAR_DUPLICATE, f"near-duplicate of {twin}") for img, twin in dups]
    capped, over = cap_page(unique, cfg.max_images_per_page)
    rejected += [(img, OVER_PAGE_CAP, f"page has more than {cfg.max_images_per_page} images") for img in over]
    if len(capped) < 2:
        rejected += [(img, PAGE_TOO_SMALL, f"{len(capped)} distinct image(s) on the page") for img in capped]
        return [], [], rejected
    pairs, used = select_pairs(page_url, capped, cfg)
    kept = [img for img in capped if img["image_id"] in used]
    rejected += [(img, NO_PAIR_IN_BAND, f"no partner with similarity in [{cfg.sim_low}, {cfg.sim_high}]") for img in capped if img["image_id"] not in used]
    return pairs, kept, rejected


def band_keys(phash: str, max_distance: int) -> list[str]:
    """LSH keys: split the hash into max_distance+1 bands; hashes within max_distance bits share
    at least one band exactly (pigeonhole), so only band-mates need comparing."""
    bits = bin(int(phash, 16))[2:].zfill(len(phash) * 4)
    n = max_distance + 1
    size = -(-len(bits) // n)
    return [f"{b}:{bits[b * size:(b + 1) * size]}" for b in range(n) if bits[b * size:(b + 1) * size]]
