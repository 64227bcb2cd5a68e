"""A generated crawl with web-like repetition, for the fetch-plan benchmark (benchmarks/fetch_plan.py).

Sites have a heavy-tailed number of pages (most a few, some hundreds). Every page carries:
- the site's logo (one URL on every page; declared size on most links),
- two of the site's three icons (declared 24x24 on most links: share and feed buttons),
- one ad from a global pool, picked by Zipf popularity (the same few ads on pages of many sites),
- 2-8 content photos, one in ten the page's own and the rest from the site's pool by Zipf popularity
  (a site's popular photos recur on several of its pages: galleries, "related" boxes), declared
  400x300 on most links,
- a related-article thumbnail of a popular page of the site (declared 120x90 on most links).

About 4-5 links per distinct URL overall, near what cc2dataset measured on Common Crawl (40 billion image
links, 8 billion distinct). Every URL is a different picture: a crop of one of the 300 photos at
a position and scale from the URL's hash, from the site's topic (a window of 30 classes).

Declared sizes are honest: the server answers each image URL with an image of the size it declares
(the size is in the URL), so the pre-download rules change what is fetched, not what is kept.
`links_table` makes the links (LINK_SCHEMA) vectorised, so 10^6 of them take seconds; `serve`
answers the image URLs from 127.0.0.1, making each image on first request.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
from typing import Iterator

import numpy as np
import pyarrow as pa

from core.records import LINK_SCHEMA

DECLARED_SHARE = 0.8  # links that declare their rendered size
OWN_PHOTOS = 0.1  # content photos that are the page's own (the others recur on the site's pages)
BASE = "http://127.0.0.1:{port}"


def _zipf_choice(rng: np.random.Generator, n_items: np.ndarray, size: int, a: float = 1.3) -> np.ndarray:
    """Per row, an index in [0, n_items[row]) with Zipf popularity (0 most popular)."""
    ranks = rng.zipf(a, size) - 1
    return np.minimum(ranks, n_items - 1)


def links_table(n_links: int, port: int, seed: int = 0) -> pa.Table:
    """About `n_links` links of a generated crawl (LINK_SCHEMA), image URLs on 127.0.0.1:`port`."""
    rng = np.random.default_rng(seed)
    per_page = 9.0  # logo + 2 icons + ad + ~4.5 photos + thumbnail, on average
    n_pages = max(4, int(n_links / per_page))
    # pages per site: heavy-tailed (Pareto), at least 2
    sizes = []
    while sum(sizes) < n_pages:
        sizes.append(int(min(2 + rng.pareto(1.2) * 3, 2000)))
    sizes[-1] -= sum(sizes) - n_pages
    if sizes[-1] < 2:
        sizes.pop()
    site_of_page = np.repeat(np.arange(len(sizes)), sizes)
    page_in_site = np.concatenate([np.arange(s) for s in sizes])
    n_pages = len(site_of_page)
    site_pages = np.asarray(sizes)[site_of_page]
    base = BASE.format(port=port)
    page_urls = np.char.add(np.char.add(np.char.add("http://www.gsite", site_of_page.astype(str)), ".com/p"), np.char.add(page_in_site.astype(str), ".html"))

    cols: dict[str, list] = {k: [] for k in ("page", "url", "width", "height", "kind")}

    def add(pages: np.ndarray, urls: np.ndarray, w: int, h: int, kind: str) -> None:
        declared = rng.random(len(pages)) < DECLARED_SHARE
        cols["page"].append(pages)
        cols["url"].append(urls)
        cols["width"].append(np.where(declared, w, -1))
        cols["height"].append(np.where(declared, h, -1))
        cols["kind"].append(np.full(len(pages), kind))

    pages = np.arange(n_pages)
    site = site_of_page.astype(str)
    add(pages, np.char.add(np.char.add(base + "/s", site), "/logo_200x60.png"), 200, 60, "logo")
    for k in range(2):
        icon = (page_in_site + k) % 3
        add(pages, np.char.add(np.char.add(np.char.add(base + "/s", site), "/icon"), np.char.add(icon.astype(str), "_24x24.png")), 24, 24, "icon")
    ads = _zipf_choice(rng, np.full(n_pages, 200), n_pages, 1.5)
    add(pages, np.char.add(np.char.add(base + "/ads/ad", ads.astype(str)), "_300x250.jpg"), 300, 250, "ad")
    n_photos = rng.integers(2, 9, n_pages)
    photo_pages = np.repeat(pages, n_photos)
    # most photos are a page's own; a quarter come from the site's pool by Zipf popularity
    pool = site_pages[photo_pages] * 2  # a site's photo pool grows with its pages
    own = 10**6 + np.arange(len(photo_pages))
    photo = np.where(rng.random(len(photo_pages)) < OWN_PHOTOS, own, _zipf_choice(rng, pool, len(photo_pages), 1.6))
    add(photo_pages, np.char.add(np.char.add(np.char.add(base + "/s", site[photo_pages]), "/photo"), np.char.add(photo.astype(str), "_400x300.jpg")), 400, 300, "photo")
    other = _zipf_choice(rng, site_pages, n_pages, 1.4)  # the site's popular articles
    add(pages, np.char.add(np.char.add(np.char.add(base + "/s", site), "/thumb"), np.char.add(other.astype(str), "_120x90.jpg")), 120, 90, "thumb")

    page = np.concatenate(cols["page"])
    url = np.concatenate(cols["url"])
    order = np.lexsort((np.arange(len(page)), page))
    page, url = page[order], url[order]
    width, height = np.concatenate(cols["width"])[order], np.concatenate(cols["height"])[order]
    # the same URL twice on one page is one link (extract keeps the first)
    key = np.char.add(np.char.add(page.astype(str), " "), url)
    _, first = np.unique(key, return_index=True)
    first.sort()
    page, url, width, height = page[first], url[first], width[first], height[first]
    position = np.concatenate([np.arange(c) for c in np.bincount(page, minlength=n_pages) if c])
    page_url = page_urls[page]
    link_id = [hashlib.sha1(f"{p}\x1f{u}".encode()).hexdigest()[:16] for p, u in zip(page_url.tolist(), url.tolist())]
    return pa.table(
        {
            "link_id": link_id, "page_url": page_url.tolist(), "image_url": url.tolist(), "alt": pa.nulls(len(page), pa.string()).fill_null(""),
            "position": pa.array(position, pa.int32()), "kind": pa.array(["img"] * len(page)),
            "width": pa.array(np.where(width < 0, None, width).tolist(), pa.int32()), "height": pa.array(np.where(height < 0, None, height).tolist(), pa.int32()),
            "source_file": pa.array(["generated"] * len(page)), "source_offset": pa.array(np.zeros(len(page), dtype=np.int64)),
        },
        schema=LINK_SCHEMA,
    )


def write_links(out_dir: str, n_links: int, port: int, seed: int = 0, files: int = 4) -> int:
    """A complete `crawl extract` output of the generated crawl; returns the number of links."""
    import json

    import pyarrow.parquet as pq

    from core.stageio import finish_stage

    table = links_table(n_links, port, seed)
    os.makedirs(os.path.join(out_dir, "links"), exist_ok=True)
    per = -(-table.num_rows // files)
    for i in range(files):
        pq.write_table(table.slice(i * per, per), os.path.join(out_dir, "links", f"part-{i:05d}.parquet"))
    with open(os.path.join(out_dir, "stats.json"), "w") as fh:
        json.dump({"stage": "extract", "input": table.num_rows, "kept": table.num_rows, "rejected": {}}, fh)
    finish_stage(out_dir, "extract")
    return table.num_rows


class _Images:
    """Route lookup for the server: each image URL made on first request (its size is in its name)."""

    def __init__(self, photos: list[str]):
        self.photos = photos

    def get(self, path: str):
        from webpairs.testweb import Route

        try:
            return Route(body=_image(path, tuple(self.photos)), content_type="image/png" if path.endswith(".png") else "image/jpeg")
        except (ValueError, IndexError):
            return None


@functools.lru_cache(maxsize=4096)
def _image(path: str, photos: tuple) -> bytes:
    from PIL import Image, ImageDraw

    name = path.rsplit("/", 1)[-1]
    w, h = (int(v) for v in name.rsplit("_", 1)[1].split(".")[0].split("x"))
    buf = io.BytesIO()
    if name.endswith((".svg", ".svgz")):
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}"><circle cx="{w // 2}" cy="{h // 2}" r="{min(w, h) // 3}"/></svg>'.encode()
    if name.endswith(".gif"):
        img = Image.new("P", (w, h))
        img.save(buf, "GIF")
        return buf.getvalue()
    digest = int(hashlib.sha1(path.encode()).hexdigest(), 16)
    if name.startswith(("logo", "icon")):  # flat: a background, a disc, exact colours
        img = Image.new("RGB", (w, h), ((digest >> 8) % 256, (digest >> 16) % 256, (digest >> 24) % 256))
        ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(255, 255, 255))
        img.save(buf, "PNG")
        return buf.getvalue()
    site = int(path.split("/")[1][1:]) if path.startswith("/s") else 0
    # a site's photos come from its own topic (a window of 30 neighbouring ImageNet classes); each
    # URL is its own crop (55-90 % of the side, anywhere), flipped or not: a different picture
    index = (site * 30 + digest % 30) % len(photos) if name.startswith(("photo", "thumb")) else digest % len(photos)
    img = Image.open(photos[index]).convert("RGB")
    side = 0.55 + (digest >> 60) % 36 / 100
    cw, ch = int(img.width * side), int(img.height * side)
    x, y = (digest >> 64) % (img.width - cw + 1), (digest >> 80) % (img.height - ch + 1)
    img = img.crop((x, y, x + cw, y + ch))
    if (digest >> 96) % 2:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = img.resize((w, h))
    img.putpixel((0, 0), ((digest >> 32) % 256, (digest >> 40) % 256, (digest >> 48) % 256))  # bytes unique per URL
    img.save(buf, "JPEG", quality=88)
    return buf.getvalue()


@contextlib.contextmanager
def serve(photos_dir: str, port: int = 0) -> Iterator[str]:
    """Serve the generated crawl's image URLs on 127.0.0.1; yields the base URL."""
    from webpairs.testweb import serve_routes

    photos = sorted(os.path.join(photos_dir, n) for n in os.listdir(photos_dir) if n.lower().endswith((".jpeg", ".jpg")))
    with serve_routes(_Images(photos), port) as base:  # type: ignore[arg-type]
        yield base


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

