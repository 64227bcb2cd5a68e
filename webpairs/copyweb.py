"""A loopback web where sites republish the same photos in their own dresses, with ground truth.

Sites of a few pages each show real photos of one topic (the ImageNet sample's dog breeds: related,
distinct pictures). Some photos are published by 3-4 sites: one site has the original, the others
a dress each (webpairs/dresses.py: crop 75-90 %, mirror, colour grade + quality 45, watermark +
frame, 16:9 letterbox, 16:9 cut, resize), every kind on several photos. Burst-like crops of one
scene (different parts of it) are distinct photos on different sites. A photo also recurs with the
same bytes on two pages of one site (a gallery and its article: content, not a copy).

The ground truth says, for every image URL, which photo it shows and in which dress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
from typing import Iterator

from PIL import Image

from webpairs.dresses import DRESSES, burst, dress
from webpairs.testweb import Route, _jpeg, serve_routes, write_warc


@dataclasses.dataclass
class CopyWeb:
    """A running copy web and its ground truth."""

    base_url: str
    warc_path: str
    pages: dict[str, str]  # page_url -> site host
    photo: dict[str, str]  # image_url -> the photo it shows
    dress: dict[str, str]  # image_url -> orig | a dress kind | burst | recurring
    occurrences: list[tuple[str, str]]  # (page_url, image_url)

    def copied_photos(self) -> dict[str, list[str]]:
        """{photo: its image URLs} for photos published in more than one dress."""
        urls: dict[str, list[str]] = {}
        for url, ph in self.photo.items():
            urls.setdefault(ph, []).append(url)
        return {ph: sorted(u) for ph, u in urls.items() if len(u) > 1}


def _build(photos_dir: str, n_sites: int, n_copied: int, n_distinct: int, n_bursts: int, seed: int):
    rng = random.Random(seed)
    names = sorted(n for n in os.listdir(photos_dir) if n.lower().endswith((".jpg", ".jpeg", ".png")))
    dogs = names[151:269]
    rng.shuffle(dogs)
    copied, distinct = dogs[:n_copied], dogs[n_copied : n_copied + n_distinct]
    scenes = names[7:25][:n_bursts]  # birds: each cut into two burst crops
    routes: dict[str, Route] = {}
    photo: dict[str, str] = {}
    kind: dict[str, str] = {}
    items: dict[int, list[str]] = {s: [] for s in range(n_sites)}  # site -> image paths to place

    def load(name):
        return Image.open(os.path.join(photos_dir, name)).convert("RGB")

    dress_cycle = 0
    for c, name in enumerate(copied):
        img = load(name)
        sites = rng.sample(range(n_sites), 3 + c % 2)
        for k, site in enumerate(sites):
            if k == 0:
                d, body = "orig", _jpeg(img, quality=92)
            else:
                d = DRESSES[dress_cycle % len(DRESSES)]
                dress_cycle += 1
                out, q = dress(img, d, rng)
                body = _jpeg(out, quality=q)
            path = f"/s{site:02d}/media/{c:02d}-{d}-{rng.randrange(10**6):06d}.jpg"
            routes[path], photo[path], kind[path] = Route(body=body), name, d
            items[site].append(path)
    for i, name in enumerate(distinct):
        site = i % n_sites
        path = f"/s{site:02d}/photos/{i:03d}.jpg"
        routes[path], photo[path], kind[path] = Route(body=_jpeg(load(name), quality=90)), name, "orig"
        items[site].append(path)
    for b, name in enumerate(scenes):
        img = load(name)
        for part in range(2):
            site = (b * 3 + part * 5) % n_sites
            path = f"/s{site:02d}/burst/{b:02d}_{part}.jpg"
            routes[path], photo[path], kind[path] = Route(body=_jpeg(burst(img, part), quality=90)), f"{name}#part{part}", "burst"
            items[site].append(path)
    pages: dict[str, tuple[str, list[str]]] = {}
    for site, paths in items.items():
        rng.shuffle(paths)
        host = f"www.news{site:02d}.example"
        n_pages = max(1, len(paths) // 4)
        for p in range(n_pages):
            pages[f"http://{host}/story/{p}.html"] = (host, paths[p::n_pages])
        if n_pages >= 2:  # one photo on two pages of its site, same bytes: a recurring photo
            first, second = list(pages)[-n_pages], list(pages)[-1]
            shared = pages[first][1][0]
            if shared not in pages[second][1]:
                pages[second][1].append(shared)
                kind.setdefault(shared, kind[shared])
    return routes, pages, photo, kind


@contextlib.contextmanager
def serve_copy_web(out_dir: str, photos_dir: str, n_sites: int = 12, n_copied: int = 14, n_distinct: int = 60, n_bursts: int = 6, seed: int = 0, port: int = 0) -> Iterator[CopyWeb]:
    """Start the copy web, write its WARC, yield the ground truth, stop the server on exit."""
    routes, pages, photo, kind = _build(photos_dir, n_sites, n_copied, n_distinct, n_bursts, seed)
    with serve_routes(routes, port) as base:
        html = {url: "<!DOCTYPE html><html><body>" + "".join(f'<img src="{base}{p}" alt="photo {i}">' for i, p in enumerate(paths)) + "</body></html>" for url, (_, paths) in pages.items()}
        warc_path = os.path.join(out_dir, "warc", "copyweb.warc.gz")
        write_warc(warc_path, html)
        yield CopyWeb(
            base_url=base,
            warc_path=warc_path,
            pages={url: host for url, (host, _) in pages.items()},
            photo={base + p: ph for p, ph in photo.items()},
            dress={base + p: d for p, d in kind.items()},
            occurrences=[(url, base + p) for url, (_, paths) in pages.items() for p in paths],
        )


def score_copies(web: CopyWeb, dirs: dict) -> dict:
    """Copy recall and precision over the web's image URLs, and the dresses of each photo in pairs,
    from the outputs of a run (dirs: filter, pair). A dress is removed when its links are rejected by
    the copy step (copy_duplicate, or a near_duplicate that names another dress)."""
    import pyarrow.parquet as pq

    from core.stageio import stage_files

    def table(stage, name, columns=None):
        files = stage_files(dirs[stage], name)
        return [r for f in files for r in pq.read_table(f, columns=columns).to_pylist()]

    rejected = table("pair", "rejected", ["record_id", "reason", "detail", "url"])
    removed = {r["url"] for r in rejected if r["reason"] == "copy_duplicate" or (r["reason"] == "near_duplicate" and "copy" in (r["detail"] or ""))}
    copied = web.copied_photos()
    redundant = sum(len(urls) - 1 for urls in copied.values())
    true_removed = [u for u in removed if web.photo.get(u) in copied]
    # a copied photo keeps at least one dress: more removed than redundant is a false removal
    over = sum(max(0, sum(u in removed for u in urls) - (len(urls) - 1)) for urls in copied.values())
    correct = len(true_removed) - over
    pairs = table("pair", "pairs", ["cond_url", "target_url"])
    in_pairs: dict[str, set] = {}
    for p in pairs:
        for u in (p["cond_url"], p["target_url"]):
            in_pairs.setdefault(web.photo[u], set()).add(u)
    return {
        "copied_photos": len(copied),
        "redundant": redundant,
        "removed": len(removed),
        "recall": correct / redundant if redundant else 1.0,
        "precision": correct / len(removed) if removed else 1.0,
        "distinct_removed": sorted(u for u in removed if web.photo.get(u) not in copied),
        "dresses_in_pairs": {ph: sorted(in_pairs.get(ph, ())) for ph in copied},
        "photos_in_pairs": {ph: len(u) for ph, u in in_pairs.items()},
        "pairs": len(pairs),
    }
