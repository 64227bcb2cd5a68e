"""A multi-site loopback web with ground truth for boilerplate: many sites of a few pages each.

Each site (a registered domain; some pages on other subdomains of it) has 2-15 pages. Every page
carries the site's logo in one of its 2-3 sizes (drawn flat, PNG on most sites, JPEG on some, file
names that do not always say "logo"), the site's icons (share and feed buttons), 2-4 photos of its
own, and on some sites one photo that recurs legitimately on two pages (a gallery and an article:
content, not boilerplate). A third-party ad (a photo-like JPEG) recurs on pages of many sites.

The pages live in a WARC under their real-looking URLs (http://www.site07.com/...); the images are
served from 127.0.0.1, as from a CDN, so nothing but loopback is ever fetched. The ground truth
says what each image URL is: logo, icon, ad (boilerplate) or photo, recurring (content).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
from typing import Iterator, Optional

from PIL import Image, ImageDraw, ImageOps

from webpairs.testweb import Route, _jpeg, _png, generated_photo, serve_routes, write_warc

BOILERPLATE_KINDS = ("logo", "icon", "ad")
CONTENT_KINDS = ("photo", "recurring")
_DOMAINS = ("www.site{n:02d}.com", "news.site{n:02d}.co.uk", "site{n:02d}.org", "blog{n:02d}.github.io")
_LOGO_NAMES = ("logo{w}.png", "img/brand-{w}.png", "assets/header_{w}.png")
_LOGO_SIZES = ((300, 120), (200, 80), (150, 60))


@dataclasses.dataclass
class MultiSiteWeb:
    """A running multi-site web and its ground truth."""

    base_url: str
    warc_path: str
    pages: dict[str, str]  # page_url -> site (registered domain)
    kinds: dict[str, str]  # image_url -> logo | icon | ad | photo | recurring
    occurrences: list[tuple[str, str]]  # (page_url, image_url) for every <img> on every page

    def is_boilerplate(self, image_url: str) -> bool:
        return self.kinds[image_url] in BOILERPLATE_KINDS


def _logo(site: int, rng: random.Random) -> Image.Image:
    """A flat logo: a background colour, a few shapes and the site's name (exact colours)."""
    w, h = _LOGO_SIZES[0]
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(2 + rng.randrange(3)):
        x, y, r = rng.randrange(w), rng.randrange(h), rng.randrange(15, 45)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    draw.text((12, h // 2 - 6), f"SITE {site:02d}", fill=(255, 255, 255))
    return img


def _icon(site: int, kind: int, side: int) -> Image.Image:
    img = Image.new("RGB", (side, side), ((site * 37) % 256, (kind * 90) % 256, 200))
    ImageDraw.Draw(img).rectangle((side // 4, side // 4, side * 3 // 4, side * 3 // 4), fill=(255, 255, 255))
    return img


_CROPS = (None, (0.125, 0.125, 0.875, 0.875), (0.0, 0.0, 0.8, 0.8), (0.2, 0.2, 1.0, 1.0))


def _photos(photos_dir: Optional[str]) -> Iterator[bytes]:
    """Distinct photo JPEGs: the real photos, then mirrored and cropped variants of them (each
    a different picture to pHash), or procedural ones without a folder."""
    if not photos_dir:
        i = 0
        while True:
            yield _jpeg(generated_photo(i % 50, i // 50))
            i += 1
    names = sorted(f for f in os.listdir(photos_dir) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    for crop in _CROPS:
        for mirror in (False, True):
            for name in names:
                img = Image.open(os.path.join(photos_dir, name)).convert("RGB")
                if min(img.size) < 128:
                    continue
                if mirror:
                    img = ImageOps.mirror(img)
                if crop:
                    w, h = img.size
                    img = img.crop((int(crop[0] * w), int(crop[1] * h), int(crop[2] * w), int(crop[3] * h)))
                yield _jpeg(img)
    raise ValueError(f"{photos_dir} has too few photos for this many pages")


def _build(n_sites: int, seed: int, photos_dir: Optional[str]):
    """Routes (path -> Route), pages (page_url -> (site host, [(src path, alt, attrs)])), kinds."""
    rng = random.Random(seed)
    plan = [(s, rng.randint(2, 15)) for s in range(n_sites)]
    photos = _photos(photos_dir)
    routes: dict[str, Route] = {}
    kinds: dict[str, str] = {}
    pages: dict[str, list] = {}
    ad = Image.open(io.BytesIO(next(photos))).convert("RGB").resize((300, 250))
    ImageDraw.Draw(ad).rectangle((0, 210, 300, 250), fill=(240, 40, 40))
    routes["/ads/banner-300x250.jpg"] = Route(body=_jpeg(ad))
    kinds["/ads/banner-300x250.jpg"] = "ad"
    for site, n_pages in plan:
        host = _DOMAINS[site % len(_DOMAINS)].format(n=site)
        domain = host.split(".", 1)[1] if host.startswith(("www.", "news.")) else host
        logo = _logo(site, rng)
        jpeg_logo = site % 5 == 4
        sizes = _LOGO_SIZES[: 2 + site % 2]
        logo_paths = []
        for w, h in sizes:
            path = f"/s{site:02d}/" + _LOGO_NAMES[site % len(_LOGO_NAMES)].format(w=w)
            scaled = logo.resize((w, h), Image.LANCZOS) if (w, h) != _LOGO_SIZES[0] else logo
            if jpeg_logo:
                path = path.rsplit(".", 1)[0] + ".jpg"
            routes[path] = Route(body=_jpeg(scaled, quality=85) if jpeg_logo else _png(scaled), content_type="image/jpeg" if jpeg_logo else "image/png")
            kinds[path] = "logo"
            logo_paths.append(path)
        icon_paths = []
        for k, (name, side) in enumerate((("share", 24), ("feed", 32))):
            path = f"/s{site:02d}/ui/{name}.png"
            routes[path] = Route(body=_png(_icon(site, k, side)), content_type="image/png")
            kinds[path] = "icon"
            icon_paths.append((path, side))
        recurring = None
        if n_pages >= 2 and site % 3 != 2:
            recurring = f"/s{site:02d}/gallery/feature.jpg"
            routes[recurring] = Route(body=next(photos))
            kinds[recurring] = "recurring"
        for p in range(n_pages):
            page_host = f"shop.{domain}" if p == 1 and n_pages > 3 else host  # another subdomain, same site
            page_url = f"http://{page_host}/article/{p}.html"
            imgs = [(logo_paths[p % len(logo_paths)], f"site {site} home", {})]
            for k in range(2 + (site + p) % 3):
                path = f"/s{site:02d}/photos/p{p}_{k}.jpg"
                routes[path] = Route(body=next(photos))
                kinds[path] = "photo"
                imgs.append((path, f"photo {k} of article {p}", {}))
            if recurring and p in (0, n_pages - 1):  # the gallery and the article that shows it
                imgs.append((recurring, "featured photo", {}))
            for path, side in icon_paths:
                imgs.append((path, "", {"width": side, "height": side} if site % 2 else {}))
            if (site + p) % 4 == 0:
                imgs.append(("/ads/banner-300x250.jpg", "advertisement", {}))
            pages[page_url] = imgs
    return routes, pages, kinds


def _html(page_url: str, base: str, imgs: list) -> str:
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>", f"<title>{page_url}</title></head><body>"]
    for path, alt, attrs in imgs:
        extra = "".join(f' {k}="{v}"' for k, v in attrs.items())
        parts.append(f'<img src="{base}{path}" alt="{alt}"{extra}>')
    parts.append("</body></html>")
    return "\n".join(parts)


@contextlib.contextmanager
def serve_multisite_web(out_dir: str, photos_dir: Optional[str] = None, n_sites: int = 40, seed: int = 0, port: int = 0) -> Iterator[MultiSiteWeb]:
    """Start the multi-site web, write its WARC, yield the ground truth, stop the server on exit."""
    from core.sites import site_of

    routes, pages, kinds = _build(n_sites, seed, photos_dir)
    with serve_routes(routes, port) as base:
        warc_path = os.path.join(out_dir, "warc", "multisite.warc.gz")
        write_warc(warc_path, {url: _html(url, base, imgs) for url, imgs in pages.items()})
        yield MultiSiteWeb(
            base_url=base,
            warc_path=warc_path,
            pages={url: site_of(url) for url in pages},
            kinds={base + path: kind for path, kind in kinds.items()},
            occurrences=[(url, base + path) for url, imgs in pages.items() for path, _, _ in imgs],
        )


# Reasons that say "this is boilerplate" (an image-level signal or a repetition rule).
BOILERPLATE_REASONS = ("too_small", "declared_too_small", "bad_aspect", "flat_image", "url_word", "not_raster", "boilerplate_url_site", "boilerplate_url_global", "boilerplate_site", "boilerplate_global")


def score_boilerplate(web: MultiSiteWeb, dirs: dict) -> dict:
    """Boilerplate recall and precision over every (page, image) occurrence of the web, and the
    pairs that hold boilerplate, from the outputs of a run (dirs: links, download, filter, pair)."""
    from core.stageio import read_table

    verdict: dict[tuple[str, str], str] = {}  # (page, image url) -> the reason it was removed for
    links = read_table(dirs["links"], "links", ["link_id", "page_url", "image_url"]).to_pylist()
    by_link = {r["link_id"]: (r["page_url"], r["image_url"]) for r in links}
    for stage in ("download", "filter", "pair"):  # every stage rejects links (record_id: link_id)
        for r in read_table(dirs[stage], "rejected", ["record_id", "reason"]).to_pylist():
            verdict[by_link[r["record_id"]]] = r["reason"]
    truth = [(page, url, web.is_boilerplate(url)) for page, url in web.occurrences]
    removed = [(page, url, bp) for page, url, bp in truth if verdict.get((page, url)) in BOILERPLATE_REASONS]
    n_boilerplate = sum(bp for _, _, bp in truth)
    caught = sum(bp for _, _, bp in removed)
    pairs = read_table(dirs["pair"], "pairs", ["cond_url", "target_url"]).to_pylist()
    bad_pairs = sum(web.is_boilerplate(p["cond_url"]) or web.is_boilerplate(p["target_url"]) for p in pairs)
    reasons: dict[str, int] = {}
    for page, url, bp in removed:
        key = f"{verdict[(page, url)]} ({'boilerplate' if bp else 'CONTENT'})"
        reasons[key] = reasons.get(key, 0) + 1
    return {
        "occurrences": len(truth),
        "boilerplate_occurrences": n_boilerplate,
        "recall": caught / n_boilerplate if n_boilerplate else 1.0,
        "precision": caught / len(removed) if removed else 1.0,
        "pairs": len(pairs),
        "pairs_with_boilerplate": bad_pairs,
        "removed_by_reason": dict(sorted(reasons.items())),
        "missed": sorted({url for page, url, bp in truth if bp and verdict.get((page, url)) not in BOILERPLATE_REASONS}),
        "content_removed": sorted({url for page, url, bp in removed if not bp}),
    }
