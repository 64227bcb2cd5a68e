"""Hostile pages and servers (issue 14, part 3): each case the issue reproduced, through the real
stage, with the job going on and `input == kept + sum(rejected)` still true (finish_stage checks
it on every run below)."""

import gzip
import http.server
import io
import os
import socket
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from core.config import CrawlConfig, DownloadConfig
from core.records import LINK_SCHEMA, stable_id
from core.stageio import finish_stage, read_stats, read_table
from crawl.extract import run_extract


def _warc(path, pages, gz=True):
    """pages: [(url, body bytes, [(header, value), ...])] as HTML responses."""
    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=gz)
        for url, body, headers in pages:
            h = StatusAndHeaders("200 OK", headers or [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=h))
    return str(path)


def _page(i: int, alt: str = "a photo") -> bytes:
    return f'<html><body><img src="/img/{i}-a.jpg" alt="{alt}"><img src="/img/{i}-b.jpg"></body></html>'.encode()


def _links(out: str):
    return read_table(out, "links").to_pandas()


# ---- pages -------------------------------------------------------------------------------------


def test_junk_charsets_fall_back_instead_of_crashing(tmp_path):
    text = "Café «crème» – 東京の写真"
    body = f'<html><head><meta charset="undefined"></head><body><img src="/a.jpg" alt="{text}"></body></html>'.encode()
    warc = _warc(tmp_path / "charset.warc.gz", [
        ("http://a.test/1", body, [("Content-Type", "text/html; charset=undefined")]),
        ("http://a.test/2", body, [("Content-Type", "text/html; charset=punycode")]),
        ("http://a.test/3", body, [("Content-Type", "text/html")]),  # only the junk <meta charset>
        ("http://a.test/4", text.encode("cp1252", "replace") + b'<img src="/b.jpg" alt="caf\xe9">', [("Content-Type", "text/html; charset=rot13")]),
    ])
    stats = run_extract(warc, str(tmp_path / "out"), CrawlConfig())
    links = _links(str(tmp_path / "out"))
    assert stats["kept"] == 4 and set(links.page_url) == {f"http://a.test/{i}" for i in range(1, 5)}
    assert (links[links.page_url != "http://a.test/4"].alt == text).all()  # UTF-8 bytes decoded as UTF-8


def test_a_deeply_nested_page_is_rejected_and_the_job_goes_on(tmp_path):
    deep = b"<html><body>" + b"<div>" * 100_000 + b'<img src="/deep.jpg">' + b"</div>" * 100_000 + b"</body></html>"
    # stray end tags of another name do not close anything: still 20,000 deep
    nested = b"<html><body>" + b"<span></b>" * 20_000 + b'<img src="/nested.jpg">' + b"</body></html>"
    warc = _warc(tmp_path / "deep.warc.gz", [("http://a.test/deep", deep, None), ("http://a.test/nested", nested, None), ("http://a.test/ok", _page(1), None)])
    start = time.monotonic()
    stats = run_extract(warc, str(tmp_path / "out"), CrawlConfig())
    assert time.monotonic() - start < 60  # 20 s for the deep page alone before (125 s at 200,000)
    assert stats["rejected"]["page_too_complex"] == 2 and stats["kept"] == 2
    rejected = read_table(str(tmp_path / "out"), "rejected").to_pandas()
    assert set(rejected[rejected.reason == "page_too_complex"].url) == {"http://a.test/deep", "http://a.test/nested"}
    assert set(_links(str(tmp_path / "out")).page_url) == {"http://a.test/ok"}


def test_a_gzip_bomb_payload_is_capped(tmp_path):
    bomb = gzip.compress(b"<html><body>" + b" " * (512 * 1024 * 1024), compresslevel=6)  # 512 MB of HTML in ~0.5 MB
    warc = _warc(tmp_path / "bomb.warc", [
        ("http://a.test/bomb", bomb, [("Content-Type", "text/html"), ("Content-Encoding", "gzip")]),
        ("http://a.test/ok", gzip.compress(_page(2)), [("Content-Type", "text/html"), ("Content-Encoding", "gzip")]),
    ], gz=False)
    stats = run_extract(warc, str(tmp_path / "out"), CrawlConfig())
    assert stats["rejected"]["page_too_large"] == 1 and stats["kept"] == 2
    assert set(_links(str(tmp_path / "out")).page_url) == {"http://a.test/ok"}


def test_page_complexity_rules():
    from crawl.html import page_complexity

    def nested(n, tag=b"div"):
        return b"<html><body>" + (b"<" + tag + b">") * n + b'<img src="x.jpg">' + (b"</" + tag + b">") * n + b"</body></html>"

    assert page_complexity(nested(4000)) is None  # at most the limit: parsed as it is
    assert page_complexity(nested(5000)) == "nesting depth over 4096"
    assert page_complexity(nested(5000), max_depth=8000) is None
    assert page_complexity(nested(100_000)).endswith("tags > 200000")
    flat = b"<html><body>" + b"<p>x<br><img src=x><b>y</b><li>z" * 3000 + b"<script>if (a<b && c<d) {}</script></body></html>"
    assert page_complexity(flat) is None  # 15,000 tags, none of them nested deeply


def test_decode_body_never_produces_more_than_the_limit():
    from crawl.warc import decode_body

    headers = {"Content-Encoding": "gzip"}
    assert decode_body(gzip.compress(b"x" * 5000), headers, limit=4096) is None
    assert decode_body(gzip.compress(b"x" * 4000), headers, limit=4096) == b"x" * 4000
    import brotli

    assert decode_body(brotli.compress(b"y" * 100_000), {"Content-Encoding": "br"}, limit=4096) is None


# ---- files -------------------------------------------------------------------------------------


def test_cut_and_bad_records_are_counted_and_the_rest_kept(tmp_path):
    def pages(host):
        return [(f"http://{host}/p{i}", _page(i), None) for i in range(6)]

    whole = _warc(tmp_path / "whole.warc.gz", pages("cut.test"))
    data = open(whole, "rb").read()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.warc.gz").write_bytes(data[: int(len(data) * 0.6)])  # cut inside a gzip member
    for name, gz in (("longuri.warc.gz", True), ("longuri.warc", False)):
        long_uri = [(u + ("x" * 100_000 if i == 2 else ""), b, h) for i, (u, b, h) in enumerate(pages(name.replace(".", "-") + ".test"))]
        _warc(tmp_path / "in" / name, long_uri, gz=gz)
    stats = run_extract(str(tmp_path / "in"), str(tmp_path / "out"), CrawlConfig())
    assert stats["truncated_files"] == 1 and stats["bad_records"] == 2
    links = _links(str(tmp_path / "out"))
    by_file = links.groupby(links.source_file.map(os.path.basename)).page_url.apply(lambda u: sorted({x.rsplit("/", 1)[1] for x in u})).to_dict()
    assert by_file["longuri.warc.gz"] == by_file["longuri.warc"] == ["p0", "p1", "p3", "p4", "p5"]  # before and after the bad one
    assert {"p0", "p1", "p2"} <= set(by_file["cut.warc.gz"]) and "p5" not in by_file["cut.warc.gz"]
    rejected = read_table(str(tmp_path / "out"), "rejected").to_pandas()
    cut = rejected[rejected.reason == "truncated_file"]
    assert cut.url.map(os.path.basename).tolist() == ["cut.warc.gz"] and "cut short" in cut.detail.iloc[0]


def test_files_that_are_not_warcs_are_rejected_per_file(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.warc").write_bytes(b"")
    (tmp_path / "in" / "random.warc.gz").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "in" / "text.warc").write_bytes(b"this is not a web archive\n" * 50)
    _warc(tmp_path / "in" / "good.warc.gz", [("http://a.test/p", _page(0), None)])
    stats = run_extract(str(tmp_path / "in"), str(tmp_path / "out"), CrawlConfig())
    assert stats["not_warc_files"] == 3 and stats["kept"] == 2 and stats["files"] == 4
    os.remove(tmp_path / "in" / "good.warc.gz")
    from webpairs.cli import main

    assert main(["crawl", "extract", str(tmp_path / "in"), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of the 3 input files could be read" in err[0]
    assert read_stats(str(tmp_path / "out2"))["rejected"] == {"not_a_warc": 3}  # the output says why


# ---- servers -----------------------------------------------------------------------------------


def _jpeg(size=512, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


class _Hostile(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    routes: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/drip.jpg":  # one byte every 2 s, forever
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            for b in _jpeg(64)[:60]:
                time.sleep(2)
                try:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                except OSError:
                    return
            return
        if path == "/endless.jpg":  # a body that never ends, no length
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            chunk = b"\xff" * 65536
            try:
                self.wfile.write(_jpeg(64))
                for _ in range(2000):  # bounded: 128 MB at most
                    self.wfile.write(chunk)
            except OSError:
                pass
            return
        if path.startswith("/to-"):  # /to-NAME/... redirects to that host on this port
            name, rest = path[4:].split("/", 1)
            self.send_response(302)
            self.send_header("Location", f"http://{name}:{self.server.server_address[1]}/{rest}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.routes.get(path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def hostile_server():
    jpeg = _jpeg()
    _Hostile.routes = {"/ok.jpg": jpeg, "/trail.jpg": jpeg + os.urandom(2 * 1024 * 1024), "/junk.jpg": jpeg + b"\0" * (25 * 1024 * 1024)}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], jpeg
    server.shutdown()


def _links_stage(folder, urls):
    """A `crawl extract` output holding one page with these image links."""
    rows = [{"link_id": stable_id("http://a.test/", u), "page_url": "http://a.test/", "image_url": u, "alt": "", "position": i, "kind": "img", "width": None, "height": None, "source_file": "x.warc", "source_offset": 0} for i, u in enumerate(urls)]
    os.makedirs(folder / "links")
    pq.write_table(pa.Table.from_pylist(rows, schema=LINK_SCHEMA), folder / "links" / "part-0.parquet")
    (folder / "stats.json").write_text(f'{{"stage": "extract", "input": {len(rows)}, "kept": {len(rows)}, "rejected": {{}}}}')
    finish_stage(str(folder), "extract")
    return str(folder)


def _download(links, out, **cfg):
    from crawl.download import run_download

    return run_download(links, out, DownloadConfig(processes=1, threads=8, **cfg))


def test_slow_endless_and_padded_images(hostile_server, tmp_path):
    port, jpeg = hostile_server
    base = f"http://127.0.0.1:{port}"
    urls = [f"{base}/{n}.jpg" for n in ("ok", "drip", "endless", "junk", "trail")]
    links = _links_stage(tmp_path / "links", urls)
    start = time.monotonic()
    stats = _download(links, str(tmp_path / "dl"), allow_hosts=("127.0.0.1",), timeout=3.0, deadline=5.0, max_image_bytes=20 * 1024 * 1024)
    assert time.monotonic() - start < 90  # the drip alone would take 120 s, the endless body forever
    assert stats["kept"] == 2 and stats["rejected"] == {"timeout": 1, "too_large": 2}
    images = read_table(str(tmp_path / "dl"), "downloads").to_pandas().set_index("image_id")
    image_of = read_table(str(tmp_path / "dl"), "occurrences").to_pandas().set_index("image_url").image_id
    # 2 MB of junk cut off: the trimmed bytes are the photo's, so both links resolve to one image
    assert image_of[f"{base}/trail.jpg"] == image_of[f"{base}/ok.jpg"] and len(images) == 1
    assert images.loc[image_of[f"{base}/ok.jpg"], "image_bytes"] == jpeg
    rejected = read_table(str(tmp_path / "dl"), "rejected").to_pandas().set_index("url")
    assert rejected.loc[f"{base}/drip.jpg", "reason"] == "timeout"
    assert rejected.loc[f"{base}/endless.jpg", "reason"] == rejected.loc[f"{base}/junk.jpg", "reason"] == "too_large"


def _loopback_name():
    """A host name other than localhost that this machine's resolver maps to 127.0.0.1, if any."""
    for name in ("vm", socket.gethostname(), "runsc"):
        try:
            if {i[4][0] for i in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)} == {"127.0.0.1"} and name != "localhost":
                return name
        except OSError:
            continue
    return None


def test_names_that_resolve_to_internal_addresses_are_refused(hostile_server, tmp_path):
    port, _ = hostile_server
    real = _loopback_name()
    urls = [f"http://pinned-vm:{port}/ok.jpg", f"http://127.0.0.1:{port}/to-pinned-vm/ok.jpg"]
    if real:
        urls += [f"http://{real}:{port}/ok.jpg"]
    links = _links_stage(tmp_path / "links", urls)
    # no --allow-hosts: a name that resolves to 127.0.0.1 is refused like the literal, redirects too
    stats = _download(links, str(tmp_path / "dl"), resolve=("pinned-vm:127.0.0.1",), timeout=3.0)
    rejected = read_table(str(tmp_path / "dl"), "rejected").to_pandas().set_index("url")
    assert stats["kept"] == 0
    assert rejected.loc[f"http://pinned-vm:{port}/ok.jpg", "reason"] == "private_address"
    assert rejected.loc[f"http://127.0.0.1:{port}/to-pinned-vm/ok.jpg", "reason"] == "private_address"  # the literal itself
    if real:
        assert rejected.loc[f"http://{real}:{port}/ok.jpg", "reason"] == "private_address"
    # allowed by address: the pinned name connects to exactly that address; a redirect hop is checked
    links2 = _links_stage(tmp_path / "links2", [f"http://pinned-vm:{port}/ok.jpg", f"http://127.0.0.1:{port}/to-other-vm/ok.jpg"])
    stats = _download(links2, str(tmp_path / "dl2"), allow_hosts=("127.0.0.1",), resolve=("pinned-vm:127.0.0.1", "other-vm:10.9.8.7"), timeout=3.0)
    rejected = read_table(str(tmp_path / "dl2"), "rejected").to_pandas().set_index("url")
    assert stats["kept"] == 1 and rejected.loc[f"http://127.0.0.1:{port}/to-other-vm/ok.jpg", "reason"] == "redirect_refused"


def test_trim_trailing_keeps_real_photos_whole(photos_dir):
    from crawl.imagebytes import trim_trailing

    names = sorted(os.listdir(photos_dir))[:60]
    for name in names:
        data = open(os.path.join(photos_dir, name), "rb").read()
        assert trim_trailing(data) == data and trim_trailing(data + b"\0junk" * 1000) == data
    for fmt in ("PNG", "GIF", "WEBP"):
        buf = io.BytesIO()
        Image.open(os.path.join(photos_dir, names[0])).convert("RGB").resize((64, 48)).save(buf, fmt)
        assert trim_trailing(buf.getvalue() + b"junk" * 100) == buf.getvalue()
