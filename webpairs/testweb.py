"""A loopback test web: WARC pages whose images are served from 127.0.0.1, with known ground truth.

`serve_test_web(out_dir, photos_dir=None)` starts an HTTP server on 127.0.0.1 (a free port unless
one is given), writes `out_dir/warc/testweb.warc.gz` with one HTML response per page, and yields a
`TestWeb` with the ground truth: which page has which topic, which image URLs are planted bad cases
and the reason each stage must give, the near-duplicate groups and the boilerplate URLs.

Photos come from `photos_dir` (sorted file names, consecutive files form a topic: ImageNet classes
in order make natural topics) or, with no folder, are generated procedurally per topic so that any
fresh clone can run it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import os
import random
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, Optional

from PIL import Image, ImageDraw

# Reasons (and the stage that gives them) that the pipeline must produce for planted cases.
EXPECT_DOWNLOAD = "download"
EXPECT_FILTER = "filter"
EXPECT_PAIR = "pair"
EXPECT_EXTRACT = "extract"


@dataclasses.dataclass
class Route:
    """What the server answers for one path."""

    status: int = 200
    body: bytes = b""
    content_type: str = "image/jpeg"
    headers: dict = dataclasses.field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (the slow case)


@dataclasses.dataclass
class TestWeb:
    """A running loopback web and its ground truth."""

    base_url: str
    warc_path: str
    pages: dict[str, int]  # page_url -> topic
    good: dict[str, int]  # image_url -> topic, photos that must survive filter
    bad: dict[str, tuple[str, str]]  # url -> (stage, reason) for planted bad cases
    near_duplicate_groups: list[list[str]]  # same-page URLs of one picture (first = original)
    boilerplate: list[str]  # URLs of content on every page (logo)
    routes: dict[str, Route]
    slow_delay: float
    hits: Optional[collections.Counter] = None  # GET requests per path, since the server started

    def url(self, path: str) -> str:
        return self.base_url + path

    def requests(self) -> dict[str, int]:
        """A snapshot of the requests per path so far (subtract two to count one run's)."""
        return dict(self.hits or {})


def _jpeg(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _hsv(hue: float, sat: int, val: int) -> tuple[int, int, int]:
    return Image.new("HSV", (1, 1), (int((hue % 360) / 360 * 255), sat, val)).convert("RGB").getpixel((0, 0))


def generated_photo(topic: int, index: int, size=(320, 240)) -> Image.Image:
    """A procedural 'photo' of a topic: the topic fixes palette and motif (large discs, horizontal
    bands, slanted bars or triangles, in light shades on a dark ground or the reverse); the index
    varies the number, size, position and shade of the shapes, so two photos of a topic share their
    kind of structure but not their layout. The shapes are large on purpose: at the 32 px the demo
    trains on they stay shapes, where small ones blur into a texture."""
    rng = random.Random(topic * 1000 + index)
    width, height = size
    hue = (topic * 47) % 360
    ground, shape = (70, 235) if (topic // 4) % 2 == 0 else (225, 60)
    base = Image.new("RGB", size, _hsv(hue, 110, ground))
    draw = ImageDraw.Draw(base)

    def shade():
        return _hsv(hue + rng.randrange(-25, 25), rng.randrange(150, 230), shape + rng.randrange(-20, 20))

    k = min(width, height) / 240  # sizes below are for 320x240 and scale with the image

    def n(a: float, b: float) -> int:
        return max(1, round(a * k)) + rng.randrange(max(1, round((b - a) * k)))

    motif = topic % 4
    if motif == 0:  # one to three large discs
        for _ in range(1 + rng.randrange(3)):
            r = n(35, 80)
            x, y = r + rng.randrange(max(1, width - 2 * r)), r + rng.randrange(max(1, height - 2 * r))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=shade())
    elif motif == 1:  # two to four horizontal bands
        y = n(0, 30) - 1
        for _ in range(2 + rng.randrange(3)):
            t = n(18, 40)
            draw.rectangle((0, y, width, y + t), fill=shade())
            y += t + n(20, 60)
    elif motif == 2:  # two to four slanted vertical bars
        x = n(0, 40) - 1
        for _ in range(2 + rng.randrange(3)):
            t, slant = n(18, 40), n(0, 80) - round(40 * k)
            draw.polygon([(x, 0), (x + t, 0), (x + t + slant, height), (x + slant, height)], fill=shade())
            x += t + n(30, 80)
    else:  # one to three large triangles
        for _ in range(1 + rng.randrange(3)):
            r = n(40, 100)
            x, y = r // 2 + rng.randrange(max(1, width - r)), r // 2 + rng.randrange(max(1, height - r))
            draw.polygon([(x, y - r), (x - r, y + r * 2 // 3), (x + r, y + r * 2 // 3)], fill=shade())
    # sensor-like noise: a photo has no large areas of one exact colour (a drawing or a logo does)
    import numpy as np

    # and light falls across it from one side (a ramp of +-30 levels at a random angle)
    angle = rng.random() * 2 * np.pi
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = (np.cos(angle) * (xs / width - 0.5) + np.sin(angle) * (ys / height - 0.5)) * 60
    noise = np.random.default_rng(topic * 1000 + index).normal(0, 4, (height, width, 3))
    pixels = np.asarray(base, dtype=np.int16) + (noise + ramp[..., None]).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def decompression_bomb_png(side: int = 30000) -> bytes:
    """A tiny PNG whose header claims side×side pixels (Pillow must refuse it, not allocate it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


def _usable(path: str) -> bool:
    w, h = Image.open(path).size  # header only
    return min(w, h) >= 128 and max(w, h) / min(w, h) <= 2.5


def _load_photos(photos_dir: Optional[str], n_topics: int, per_topic: int) -> list[list[bytes]]:
    """Topics of JPEG bytes: consecutive sorted files of photos_dir, or generated images."""
    if photos_dir:
        names = sorted(n for n in os.listdir(photos_dir) if n.lower().endswith((".jpg", ".jpeg", ".png")))
        # good photos must pass the filter's default thresholds (min side 64, aspect <= 3)
        names = [n for n in names if _usable(os.path.join(photos_dir, n))]
        stride = max(per_topic, len(names) // n_topics)  # spread topics over the class range
        topics = []
        for t in range(n_topics):
            chunk = names[t * stride : t * stride + per_topic]
            if len(chunk) < per_topic:
                raise ValueError(f"{photos_dir} has too few photos for {n_topics} topics of {per_topic}")
            topics.append([_jpeg(Image.open(os.path.join(photos_dir, n))) for n in chunk])
        return topics
    return [[_jpeg(generated_photo(t, i)) for i in range(per_topic)] for t in range(n_topics)]


def _build_routes(photos: list[list[bytes]], n_pages: int, images_per_page: int, slow_delay: float):
    """All server routes, the page layouts and the ground truth (URLs are paths here)."""
    routes: dict[str, Route] = {}
    pages: dict[str, dict] = {}
    good: dict[str, int] = {}
    bad: dict[str, tuple[str, str]] = {}
    near_groups: list[list[str]] = []
    rng = random.Random(0)

    logo = Image.new("RGB", (160, 160), (20, 60, 160))
    ImageDraw.Draw(logo).ellipse((20, 20, 140, 140), fill=(250, 200, 0))
    routes["/static/logo.png"] = Route(body=_png(logo), content_type="image/png")
    # on every page: URL boilerplate, never fetched (download's plan counts pages per image URL)
    bad["/static/logo.png"] = (EXPECT_DOWNLOAD, "boilerplate_url_global" if n_pages > 10 else "boilerplate_url_site")
    spacer = io.BytesIO()
    Image.new("P", (1, 1)).save(spacer, "GIF")
    routes["/static/spacer.gif"] = Route(body=spacer.getvalue(), content_type="image/gif")
    bad["/static/spacer.gif"] = (EXPECT_DOWNLOAD, "declared_too_small")  # declared 1x1: never fetched

    n_topics = len(photos)
    for p in range(n_pages):
        topic = p % n_topics
        imgs: list[dict] = []
        # photos of the page's topic: a page gets a rotating window of its topic's photos
        for k in range(images_per_page):
            idx = (p // n_topics * images_per_page + k) % len(photos[topic])
            path = f"/img/t{topic}/p{p}_{k}.jpg"
            routes[path] = Route(body=photos[topic][idx])
            good[path] = topic
            imgs.append({"src": path})
        imgs += [{"src": "/static/logo.png", "alt": "site logo"}, {"src": "/static/spacer.gif", "alt": "", "width": 1, "height": 1}]
        pages[f"/page/{p}.html"] = {"topic": topic, "imgs": imgs}

    def add(page: int, path: str, route: Route, stage: Optional[str], reason: Optional[str], **attrs):
        routes[path] = route
        pages[f"/page/{page}.html"]["imgs"].append({"src": path, **attrs})
        if reason:
            bad[path] = (stage, reason)

    original = Image.open(io.BytesIO(photos[0][0]))
    w, h = original.size
    group = ["/img/t0/p0_0.jpg"]
    for name, img_bytes in (
        ("resized", _jpeg(original.resize((int(w * 0.75), int(h * 0.75))))),
        ("recompressed", _jpeg(original, quality=35)),
        ("cropped", _jpeg(original.crop((w // 40, h // 40, w - w // 40, h - h // 40)))),
        ("exact", photos[0][0]),
    ):
        path = f"/img/dup/{name}.jpg"
        add(0, path, Route(body=img_bytes), None, None)
        group.append(path)
    near_groups.append(group)

    jpeg = photos[1][0]
    add(1, "/bad/corrupt.jpg", Route(body=b"\xff\xd8\xff\xe0" + bytes(rng.randrange(256) for _ in range(3000))), EXPECT_FILTER, "decode_error")
    add(1, "/bad/truncated.jpg", Route(body=jpeg[: len(jpeg) * 2 // 5]), EXPECT_FILTER, "truncated")
    add(1, "/bad/empty.jpg", Route(body=b""), EXPECT_FILTER, "empty")
    add(2, "/bad/bomb.png", Route(body=decompression_bomb_png(), content_type="image/png"), EXPECT_FILTER, "decompression_bomb")
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="200" height="200"><circle cx="100" cy="100" r="80"/></svg>'
    add(2, "/bad/vector.svg", Route(body=svg, content_type="image/svg+xml"), EXPECT_DOWNLOAD, "not_raster")  # by its extension: never fetched
    add(2, "/bad/tiny.jpg", Route(body=_jpeg(original.resize((24, 18)))), EXPECT_DOWNLOAD, "declared_too_small", width=24, height=18)
    add(2, "/bad/undeclared_tiny.jpg", Route(body=_jpeg(original.resize((24, 18)))), EXPECT_FILTER, "too_small")  # no size in the HTML: fetched
    add(3, "/bad/banner.jpg", Route(body=_jpeg(original.resize((900, 90)))), EXPECT_FILTER, "bad_aspect")
    add(3, "/bad/missing.jpg", Route(status=404, body=b"not found", content_type="text/plain"), EXPECT_DOWNLOAD, "http_404")
    add(3, "/bad/error.jpg", Route(status=500, body=b"boom", content_type="text/plain"), EXPECT_DOWNLOAD, "http_500")
    add(4, "/bad/slow.jpg", Route(body=jpeg, delay=slow_delay), EXPECT_DOWNLOAD, "timeout")
    add(4, "/bad/noai.jpg", Route(body=jpeg, headers={"X-Robots-Tag": "noai"}), EXPECT_DOWNLOAD, "opt_out")
    # a redirect to a good photo must be followed and kept
    routes["/img/t1/target.jpg"] = Route(body=photos[1][-1])
    add(1, "/go/redirect.jpg", Route(status=302, headers={"Location": "/img/t1/target.jpg"}, content_type="text/plain"), None, None)
    good["/go/redirect.jpg"] = 1
    # a redirect to the cloud metadata address must be refused by the download's URL policy
    add(2, "/go/internal.jpg", Route(status=302, headers={"Location": "http://169.254.169.254/latest/meta-data/x.jpg"}, content_type="text/plain"), EXPECT_DOWNLOAD, "redirect_refused")
    # links the crawler itself must refuse (never fetched)
    pages["/page/4.html"]["imgs"] += [
        {"src": "data:image/gif;base64,R0lGODlhAQABAAAAACw=", "reason": "data_uri"},
        {"src": "http://169.254.169.254/latest/meta-data/x.jpg", "reason": "private_address"},
        {"src": "http://10.0.0.7/internal.jpg", "reason": "private_address"},
        {"src": "ftp://example.org/x.jpg", "reason": "bad_scheme"},
    ]
    return routes, pages, good, bad, near_groups


def _page_html(page_path: str, layout: dict) -> str:
    """HTML with the kinds of markup a crawler meets: relative and absolute srcs, srcset, picture."""
    first = next(img["src"] for img in layout["imgs"] if img["src"].startswith("/img/"))
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{page_path}</title>",
        f'<meta property="og:image" content="{first}">',  # repeats an <img>: collapses at extract
        "</head><body>",
    ]
    for i, img in enumerate(layout["imgs"]):
        src, alt = img["src"], img.get("alt", f"photo {i} of topic {layout['topic']}")
        mode = i % 4 if src.startswith("/img/") else 0
        if mode == 1:  # relative to the page: /page/ -> ../img/...
            parts.append(f'<p><img src="..{src}" alt="{alt}" width="320" height="240"></p>')
        elif mode == 2:  # srcset: the largest candidate is the real one, the thumb is never fetched
            parts.append(f'<img src="/thumbs{src}" srcset="/thumbs{src} 160w, {src} 640w" alt="{alt}">')
        elif mode == 3:  # <picture>: the <source> and its <img> name the same URL
            parts.append(f'<picture><source srcset="{src}"><img src="{src}" alt="{alt}"></picture>')
        else:
            size = "".join(f' {k}="{img[k]}"' for k in ("width", "height") if k in img)  # honest rendered sizes
            parts.append(f'<img src="{src}" alt="{alt}"{size}>')
    parts.append("</body></html>")
    return "\n".join(parts)


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, Route] = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        with self.lock:
            self.hits[self.path.split("?")[0]] += 1
        route = self.routes.get(self.path.split("?")[0])
        if route is None:
            route = Route(status=404, body=b"not found", content_type="text/plain")
        if route.delay:
            time.sleep(route.delay)
        try:
            self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", str(len(route.body)))
            for k, v in route.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(route.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the slow case): nothing to do

    def log_message(self, *args):  # keep test output quiet
        pass


def write_warc(path: str, pages: dict[str, str]) -> None:
    """Write one WARC response record per page (url -> html) with warcio."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=path.endswith(".gz"))
        for url, html in pages.items():
            body = html.encode("utf-8")
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http))


@contextlib.contextmanager
def serve_test_web(
    out_dir: str,
    photos_dir: Optional[str] = None,
    n_pages: int = 12,
    n_topics: int = 6,
    images_per_page: int = 4,
    slow_delay: float = 4.0,
    port: int = 0,
) -> Iterator[TestWeb]:
    """Start the loopback web, write its WARC, yield the ground truth, stop the server on exit."""
    photos = _load_photos(photos_dir, n_topics, images_per_page * max(1, n_pages // n_topics))
    routes, layouts, good, bad, near_groups = _build_routes(photos, n_pages, images_per_page, slow_delay)
    with serve_routes(routes, port) as base:
        hits = serve_routes.last_handler.hits
        html = {base + path: _page_html(path, layout) for path, layout in layouts.items()}
        warc_path = os.path.join(out_dir, "warc", "testweb.warc.gz")
        write_warc(warc_path, html)
        for path, layout in layouts.items():  # links refused at extract, keyed by their URL
            for img in layout["imgs"]:
                if "reason" in img:
                    bad[img["src"]] = (EXPECT_EXTRACT, img["reason"])
        yield TestWeb(
            base_url=base,
            warc_path=warc_path,
            pages={base + p: lay["topic"] for p, lay in layouts.items()},
            good={base + u: t for u, t in good.items()},
            bad={(u if "://" in u or u.startswith("data:") else base + u): r for u, r in bad.items()},
            near_duplicate_groups=[[base + u for u in g] for g in near_groups],
            boilerplate=[base + "/static/logo.png"],
            routes=routes,
            slow_delay=slow_delay,
            hits=hits,
        )


@contextlib.contextmanager
def serve_routes(routes: dict[str, Route], port: int = 0) -> Iterator[str]:
    """Serve `routes` (path -> Route) on 127.0.0.1 until the block ends; yields the base URL."""
    handler = type("Handler", (_Handler,), {"routes": routes, "hits": collections.Counter(), "lock": threading.Lock()})
    serve_routes.last_handler = handler  # its request counts, for the caller that wants them
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="testweb", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
