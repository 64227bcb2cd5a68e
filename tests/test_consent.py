"""Consent and politeness (issue 31) on loopback virtual hosts: one server, told apart by the Host
header, every name pinned with a repeated --resolve. The server records every request, the body
bytes it managed to send, and the connections open at once per host."""

import collections
import email.utils
import glob
import http.server
import io
import json
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

from core.config import CrawlConfig
from core.records import LINK_SCHEMA, stable_id
from core.stageio import finish_stage, read_stats, read_table

FIVE_MB = 5 * 1024 * 1024


def _jpeg(seed: int, size: int = 96) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


ROBOTS = {
    "ua.test": "User-agent: *\nDisallow: /\n\nUser-agent: webpairs\nDisallow: /private/\n",  # our group wins over *
    "star.test": "User-agent: otherbot\nDisallow: /\n\nUser-agent: *\nDisallow: /private/\n",
    "delay.test": "User-agent: *\nCrawl-delay: 1\n",
    "hop.test": "User-agent: *\nDisallow: /private/\n",  # only reached by a redirect: not in the plan
}
TDMREP = {"tdm.test": [{"location": "/reserved/*", "tdm-reservation": 1, "tdm-policy": "https://tdm.test/policy.json"}, {"location": "/", "tdm-reservation": 0}]}


class VirtualHosts(http.server.ThreadingHTTPServer):
    """The loopback web: state shared by the handler threads."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests = []  # (host, path, monotonic time)
        self.sent = collections.Counter()  # (host, path) -> body bytes written
        self.open = collections.Counter()  # host -> connections open now
        self.max_open = collections.Counter()  # host -> most connections open at once
        self.answers = collections.Counter()  # (host, path) -> times answered (for 429-then-200)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # bytes sent means bytes the client let in
        self.vhost = None

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/jpeg", headers=(), pace: bool = False):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        if not body:
            self._closing()
        self.end_headers()
        self.wfile.flush()
        for i in range(0, len(body), 65536):
            if i + 65536 >= len(body):
                self._closing()
            try:
                self.wfile.write(body[i : i + 65536])
                self.wfile.flush()
            except OSError:
                return
            with self.server.lock:
                self.server.sent[(self.vhost, self.path)] += len(body[i : i + 65536])
            if pace:
                time.sleep(0.002)

    def do_GET(self):  # noqa: N802
        # a request is open from its arrival until the last bytes of its answer start to go out:
        # the client cannot have read the answer, released its slot and opened the next connection
        # before that. (Counting until the handler thread's finish() saw 5 open at load 13, and
        # counting until the last write had returned saw 5 at load 4: the client's next connection
        # arrived before the server thread of its last one ran again.)
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        with self.server.lock:
            self.server.open[host] += 1
            self.server.max_open[host] = max(self.server.max_open[host], self.server.open[host])
        self._open_host = host
        try:
            self._get(host)
        finally:
            self._closing()

    def _closing(self):
        """The answer's last bytes go out next: this request no longer counts as open (once)."""
        host, self._open_host = getattr(self, "_open_host", None), None
        if host is not None:
            with self.server.lock:
                self.server.open[host] -= 1

    def _get(self, host: str):
        srv = self.server
        path = self.path
        with srv.lock:
            if self.vhost is None:
                self.vhost = host
            srv.requests.append((host, path, time.monotonic(), self.headers.get("User-Agent", "")))
            srv.answers[(host, path)] += 1
            n = srv.answers[(host, path)]
        if path == "/robots.txt":
            if host == "fivexx.test":
                return self._send(503, b"busy", "text/plain")
            if host in ROBOTS:
                return self._send(200, ROBOTS[host].encode(), "text/plain")
            return self._send(404, b"", "text/plain")
        if path == "/.well-known/tdmrep.json":
            if host in TDMREP:
                return self._send(200, json.dumps(TDMREP[host]).encode(), "application/json")
            return self._send(404, b"", "text/plain")
        seed = abs(hash((host, path))) % 10_000
        if host == "optout.test":  # a real JPEG start, padded to 5 MB: the opt-out is in the headers
            body = (_jpeg(seed) + b"\0" * FIVE_MB)[:FIVE_MB]
            headers = {"/xrobots.jpg": [("X-Robots-Tag", "noai")], "/tdm.jpg": [("tdm-reservation", "1")], "/mine.jpg": [("X-Robots-Tag", "webpairs: noimageai")], "/other.jpg": [("X-Robots-Tag", "otherbot: noai")]}.get(path, [])
            return self._send(200, body, headers=headers, pace=True)
        if host == "busy.test" or host == "cdn.test":
            time.sleep(0.3)
        if host.startswith("front") and path.startswith("/to-cdn/"):  # every front site serves its images from one CDN
            self.send_response(302)
            self.send_header("Location", f"http://cdn.test:{self.server.server_address[1]}/{host}{path}")
            self.send_header("Content-Length", "0")
            self._closing()
            self.end_headers()
            return
        if host == "ratelimit.test" and n == 1:
            if path == "/seconds.jpg":
                return self._send(429, b"slow down", "text/plain", [("Retry-After", "2")])
            if path == "/date.jpg":
                return self._send(503, b"later", "text/plain", [("Retry-After", email.utils.formatdate(time.time() + 2, usegmt=True))])
        if host == "ua.test" and path.startswith("/public/to-"):  # a redirect to another site's disallowed path
            target = {"/public/to-star.jpg": "star.test", "/public/to-hop.jpg": "hop.test"}[path]
            self.send_response(302)
            self.send_header("Location", f"http://{target}:{self.server.server_address[1]}/private/x.jpg")
            self.send_header("Content-Length", "0")
            self._closing()
            self.end_headers()
            return
        if host == "flaky.test" and path == "/x.jpg" and n == 1:
            return self._send(500, b"oops", "text/plain")
        if host == "flaky.test" and path == "/gone.jpg":
            return self._send(404, b"", "text/plain")
        if host == "ratelimit.test" and path == "/toolong.jpg":
            return self._send(429, b"come back tomorrow", "text/plain", [("Retry-After", "3600")])
        return self._send(200, _jpeg(seed))


@pytest.fixture(scope="module")
def web():
    server = VirtualHosts()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


FRONTS = [f"front{i}.test" for i in range(4)]
HOSTS = ["ua.test", "star.test", "fivexx.test", "missing.test", "tdm.test", "optout.test", "busy.test", "delay.test", "ratelimit.test", "flaky.test", *FRONTS]
PATHS = {
    "ua.test": ["/public/1.jpg", "/private/2.jpg", "/public/to-star.jpg", "/public/to-hop.jpg"],
    "star.test": ["/public/1.jpg", "/private/2.jpg"],
    "fivexx.test": ["/1.jpg", "/2.jpg"],
    "missing.test": ["/1.jpg", "/private/2.jpg"],
    "tdm.test": ["/open/1.jpg", "/reserved/2.jpg"],
    "optout.test": ["/xrobots.jpg", "/tdm.jpg", "/mine.jpg", "/other.jpg"],
    "busy.test": [f"/{i}.jpg" for i in range(24)],
    "delay.test": [f"/{i}.jpg" for i in range(3)],
    "ratelimit.test": ["/seconds.jpg", "/date.jpg", "/toolong.jpg"],
    "flaky.test": ["/x.jpg", "/gone.jpg", "/fine.jpg"],
    **{h: [f"/to-cdn/{i}.jpg" for i in range(6)] for h in FRONTS},
}
EXPECTED = {  # (host, path) -> the reason, None: kept
    ("ua.test", "/public/1.jpg"): None, ("ua.test", "/private/2.jpg"): "robots_disallowed",
    ("ua.test", "/public/to-star.jpg"): "robots_disallowed", ("ua.test", "/public/to-hop.jpg"): "robots_disallowed",  # judged at the redirect
    ("star.test", "/public/1.jpg"): None, ("star.test", "/private/2.jpg"): "robots_disallowed",
    ("fivexx.test", "/1.jpg"): "robots_disallowed", ("fivexx.test", "/2.jpg"): "robots_disallowed",
    ("missing.test", "/1.jpg"): None, ("missing.test", "/private/2.jpg"): None,
    ("tdm.test", "/open/1.jpg"): None, ("tdm.test", "/reserved/2.jpg"): "tdm_reserved",
    ("optout.test", "/xrobots.jpg"): "opt_out", ("optout.test", "/tdm.jpg"): "tdm_reserved", ("optout.test", "/mine.jpg"): "opt_out", ("optout.test", "/other.jpg"): None,
    **{("busy.test", p): None for p in PATHS["busy.test"]},
    **{("delay.test", p): None for p in PATHS["delay.test"]},
    ("ratelimit.test", "/seconds.jpg"): None, ("ratelimit.test", "/date.jpg"): None, ("ratelimit.test", "/toolong.jpg"): "http_429",
    ("flaky.test", "/x.jpg"): "http_500", ("flaky.test", "/gone.jpg"): "http_404", ("flaky.test", "/fine.jpg"): None,
    **{(h, p): None for h in FRONTS for p in PATHS[h]},
}


def _links_stage(folder, port: int) -> str:
    """A `crawl extract` output: one page per host holding its image links."""
    rows = []
    for host in HOSTS:
        page = f"http://{host}:{port}/index.html"
        for i, path in enumerate(PATHS[host]):
            url = f"http://{host}:{port}{path}"
            rows.append({"link_id": stable_id(page, url), "page_url": page, "image_url": url, "alt": "", "position": i, "kind": "img", "width": None, "height": None, "source_file": "x.warc", "source_offset": 0})
    os.makedirs(folder / "links")
    pq.write_table(pa.Table.from_pylist(rows, schema=LINK_SCHEMA), folder / "links" / "part-0.parquet")
    (folder / "stats.json").write_text(json.dumps({"stage": "extract", "input": len(rows), "kept": len(rows), "rejected": {}}))
    finish_stage(str(folder), "extract")
    return str(folder)


def _cli_download(links: str, out: str, *extra: str) -> int:
    from webpairs.cli import main

    resolve = [a for h in HOSTS + ["hop.test", "cdn.test"] for a in ("--resolve", f"{h}:127.0.0.1")]  # repeated, as curl users do
    return main(["crawl", "download", links, "--out", out, "--allow-hosts", "127.0.0.1", "--allow-hosts", "::1", *resolve,
                 "--processes", "2", "--threads", "16", "--timeout", "5",
                 "--min-links-per-page", "0", "--no-url-boilerplate", "--max-retry-after", "10", "--samples-per-shard", "8", *extra])


@pytest.fixture(scope="module")
def downloaded(web, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("consent")
    port = web.server_address[1]
    links = _links_stage(tmp / "links", port)
    start = len(web.requests)
    assert _cli_download(links, str(tmp / "dl")) == 0
    return tmp, links, port, web.requests[start:]


def _results(out: str, port: int) -> dict:
    """(host, path) -> reason (None: kept) for every link of the output."""
    from urllib.parse import urlsplit

    got = {}
    for r in read_table(out, "occurrences").to_pylist():
        got[(urlsplit(r["image_url"]).hostname, urlsplit(r["image_url"]).path)] = r["reason"]
    for r in read_table(out, "rejected").to_pylist():
        got[(urlsplit(r["url"]).hostname, urlsplit(r["url"]).path)] = r["reason"]
    return got


def test_every_link_ends_with_what_its_site_said(downloaded):
    tmp, _, port, _ = downloaded
    out = str(tmp / "dl")
    got = _results(out, port)
    assert got == EXPECTED
    stats = read_stats(out)
    assert stats["input"] == len(EXPECTED) and stats["rejected"] == dict(collections.Counter(r for r in EXPECTED.values() if r))
    # hop.test and cdn.test, reached only by redirects, were asked by a worker and are kept in the run too
    assert stats["consent"]["sites"] == len(HOSTS) + 2 and stats["consent"]["robots"] == {"missing": 6 + len(FRONTS) + 1, "ok": 4, "unavailable": 1}
    hosts = pq.read_table(os.path.join(out, "consent", "hosts.parquet")).to_pandas().set_index("origin")
    assert hosts.loc[f"http://fivexx.test:{port}", "robots_http"] == 503 and hosts.loc[f"http://tdm.test:{port}", "tdmrep_status"] == "ok"
    assert hosts.loc[f"http://hop.test:{port}", "robots_status"] == "ok" and not glob.glob(os.path.join(out, "consent", "hop-*"))


def test_refused_urls_are_never_requested_and_site_files_come_first(downloaded):
    _, _, _, requests = downloaded
    asked = collections.Counter((h, p) for h, p, _, _ in requests)
    for (host, path), reason in EXPECTED.items():
        if reason in ("robots_disallowed", "tdm_reserved") and host != "optout.test" and "/to-" not in path:
            assert asked[(host, path)] == 0, (host, path)
    # a redirect's target is judged before it is asked: another planned site's robots.txt, or the
    # robots.txt of a site the plan never saw, asked by the worker first
    assert asked[("star.test", "/private/x.jpg")] == asked[("hop.test", "/private/x.jpg")] == 0
    t0 = min(t for _, _, t, _ in requests)
    timeline = [(h, p, round(t - t0, 3)) for h, p, t, _ in requests if h in ("hop.test", "cdn.test")][:40]
    assert asked[("hop.test", "/robots.txt")] == asked[("cdn.test", "/robots.txt")] == 1, timeline  # once, by whichever worker got there first
    for host in HOSTS:  # robots.txt and tdmrep.json once per host, before any image of it
        mine = [(p, t) for h, p, t, _ in requests if h == host]
        assert [p for p, _ in mine].count("/robots.txt") == 1, host
        first_image = min(t for p, t in mine if p.endswith(".jpg")) if any(p.endswith(".jpg") for p, _ in mine) else float("inf")
        assert max(t for p, t in mine if p == "/robots.txt") < first_image
        if host != "fivexx.test":
            assert [p for p, _ in mine].count("/.well-known/tdmrep.json") == 1, host


def test_user_agent_names_the_product_and_a_contact(downloaded):
    from crawl.consent import version

    _, _, _, requests = downloaded
    agents = {a for _, _, _, a in requests}
    assert agents == {f"webpairs/{version()} (+https://github.com/webpairs/webpairs)"}


def test_opt_out_headers_close_the_connection_without_the_body(downloaded, web):
    _, _, _, _ = downloaded
    for path in ("/xrobots.jpg", "/tdm.jpg", "/mine.jpg"):
        assert 0 < sum(n for (h, p), n in web.sent.items() if h == "optout.test" and p == path) < 1024 * 1024, path  # far below 5 MB
    assert sum(n for (h, p), n in web.sent.items() if h == "optout.test" and p == "/other.jpg") == FIVE_MB  # another crawler's directive: the whole body


# ---- politeness -------------------------------------------------------------------------------------


def test_at_most_four_connections_per_host_across_processes(downloaded, web):
    tmp, _, _, requests = downloaded
    assert sum(1 for h, p, _, _ in requests if h == "busy.test" and p.endswith(".jpg")) == 24
    assert web.max_open["busy.test"] == 4  # 2 processes x 16 threads, 24 slow images: the limit, reached
    assert all(n <= 4 for n in web.max_open.values())
    assert len(os.listdir(tmp / "dl" / "img2dataset")) > 2  # several shards, so both processes fetched
    # four sites redirect 24 images to one CDN: the CDN's own slots hold each request (the slot was the
    # planned URL's host, so the CDN had up to 16 connections open at once)
    assert sum(1 for h, p, _, _ in requests if h == "cdn.test" and p.endswith(".jpg")) == 24
    assert 2 <= web.max_open["cdn.test"] <= 4


def test_crawl_delay_spaces_the_requests(downloaded):
    _, _, _, requests = downloaded
    times = sorted(t for h, p, t, _ in requests if h == "delay.test" and p.endswith(".jpg"))
    assert len(times) == 3 and min(b - a for a, b in zip(times, times[1:])) >= 0.95  # Crawl-delay: 1 (0.00 s apart before)


def test_retry_after_is_waited_for_then_retried(downloaded):
    _, _, _, requests = downloaded
    for path, least in (("/seconds.jpg", 1.95), ("/date.jpg", 0.9)):  # "2", and an HTTP date 2 s ahead (1 s resolution)
        times = sorted(t for h, p, t, _ in requests if h == "ratelimit.test" and p == path)
        assert len(times) == 2 and times[1] - times[0] >= least, path
    # a Retry-After over --max-retry-after is not waited for: rejected at once, asked once
    assert sum(1 for h, p, _, _ in requests if h == "ratelimit.test" and p == "/toolong.jpg") == 1


def test_retry_after_values():
    from crawl.polite import retry_after_seconds

    now = 1_700_000_000.0
    assert retry_after_seconds("120") == 120.0 and retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0


# ---- reruns ------------------------------------------------------------------------------------------


def test_retry_failed_fetches_only_the_transient_failures_again(downloaded, web):
    tmp, links, port, _ = downloaded
    out = str(tmp / "dl")
    before_rows = {r["record_id"]: r for r in read_table(out, "rejected").to_pylist()}
    start = len(web.requests)
    assert _cli_download(links, out, "--retry-failed") == 0
    asked = sorted((h, p) for h, p, _, _ in web.requests[start:])
    # the 500 (now 200) and the 429 over the cap; the site whose robots.txt was unavailable is asked again
    assert asked == [("fivexx.test", "/.well-known/tdmrep.json"), ("fivexx.test", "/robots.txt"), ("flaky.test", "/x.jpg"), ("ratelimit.test", "/toolong.jpg")]
    want = {**EXPECTED, ("flaky.test", "/x.jpg"): None}
    assert _results(out, port) == want
    stats = read_stats(out)
    assert stats["retried"] == {"urls": 2, "recovered": 1} and stats["kept"] == sum(1 for r in want.values() if r is None)
    after_rows = {r["record_id"]: r for r in read_table(out, "rejected").to_pylist()}
    assert {k: v for k, v in before_rows.items() if "/x.jpg" not in v["url"]} == after_rows  # everything else kept as it was
    images = read_table(out, "downloads").to_pandas()
    assert len(images) == stats["images"] and images.image_bytes.map(len).gt(0).all()
    assert any(u.endswith("flaky.test:%d/x.jpg" % port) for u in images.image_url)


def test_retry_failed_needs_a_finished_download(tmp_path, capsys):
    from webpairs.cli import main

    assert main(["crawl", "download", str(tmp_path), "--out", str(tmp_path / "none"), "--retry-failed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("webpairs crawl download: error:")


def test_a_rerun_asks_no_site_again_and_consent_off_warns_once(web, tmp_path, caplog):
    import logging

    port = web.server_address[1]
    global HOSTS
    saved = HOSTS
    HOSTS = ["ua.test", "missing.test"]
    try:
        links = _links_stage(tmp_path / "links", port)
        runs = []
        for name, extra in (("dl", ()), ("dl", ()), ("off", ("--consent", "off"))):
            start = len(web.requests)
            with caplog.at_level(logging.WARNING):
                caplog.clear()
                assert _cli_download(links, str(tmp_path / name), *extra) == 0
                warnings = [r for r in caplog.records if "--consent off" in r.getMessage()]
            runs.append((collections.Counter((h, p) for h, p, _, _ in web.requests[start:]), _results(str(tmp_path / name), port), len(warnings)))
    finally:
        HOSTS = saved
    (first, first_res, w1), (second, second_res, w2), (off, off_res, w3) = runs
    assert first[("ua.test", "/robots.txt")] == first[("missing.test", "/robots.txt")] == 1 and first[("ua.test", "/private/2.jpg")] == 0
    assert not any(p in ("/robots.txt", "/.well-known/tdmrep.json") for _, p in second) and second_res == first_res  # kept in the run
    assert first_res[("ua.test", "/private/2.jpg")] == "robots_disallowed"
    # --consent off: nothing asked, the disallowed image fetched, one warning line
    assert not any(p in ("/robots.txt", "/.well-known/tdmrep.json") for _, p in off) and off[("ua.test", "/private/2.jpg")] == 1
    assert off_res[("ua.test", "/private/2.jpg")] is None and (w1, w2, w3) == (0, 0, 1)


def test_the_report_has_a_consent_section(downloaded, tmp_path):
    from browse.report import write_report

    tmp, _, port, _ = downloaded
    text = write_report(str(tmp), str(tmp_path / "report.html"))
    section = [" ".join(line.split()) for line in text.split("consent (download --consent on):", 1)[1].strip().splitlines()]
    assert section[:3] == ["robots_disallowed 6 links on 3 hosts (download)", "tdm_reserved 2 links on 2 hosts (download)", "opt_out 2 links on 1 hosts (download)"]
    assert section[3] == f"robots.txt of http://fivexx.test:{port} unavailable (HTTP 503): all of the site disallowed for this run"
    page = (tmp_path / "report.html").read_text()
    assert "<table id='consent'>" in page and "<table id='consent-failures'>" in page and f"http://fivexx.test:{port}" in page


# ---- page-level opt-outs at extract ---------------------------------------------------------------


def _warc(path, pages):
    """pages: [(url, body, extra HTTP headers)] as HTML responses."""
    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=True)
        for url, body, headers in pages:
            h = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8"), *headers], protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=h))
    return str(path)


def _html(meta: str = "") -> bytes:
    return f'<html><head>{meta}</head><body><img src="/a.jpg"><img src="/b.jpg"><img src="/c.jpg"></body></html>'.encode()


OPT_OUT_PAGES = [  # (url, body, headers, opted out?)
    ("http://a.test/header-noai", _html(), [("X-Robots-Tag", "noai")], True),
    ("http://a.test/header-noimageai-ours", _html(), [("X-Robots-Tag", "webpairs: noimageai")], True),
    ("http://a.test/header-two", _html(), [("X-Robots-Tag", "noarchive"), ("X-Robots-Tag", "noindex, noimageai")], True),
    ("http://a.test/header-other-bot", _html(), [("X-Robots-Tag", "otherbot: noai")], False),
    ("http://a.test/header-noindex", _html(), [("X-Robots-Tag", "noindex")], False),
    ("http://a.test/meta-noimageai", _html('<meta name="robots" content="noimageai">'), [], True),
    ("http://a.test/meta-noai-upper", _html('<META NAME="Robots" CONTENT="NoAI, nofollow">'), [], True),
    ("http://a.test/meta-ours", _html('<meta name="webpairs" content="noai">'), [], True),
    ("http://a.test/meta-other-bot", _html('<meta name="otherbot" content="noai">'), [], False),
    ("http://a.test/tdm-header", _html(), [("tdm-reservation", "1")], True),
    ("http://a.test/plain", _html('<meta name="robots" content="index, follow">'), [], False),
]


@pytest.mark.parametrize("mode", ["on", "off"])
def test_pages_that_opt_out_give_no_image(tmp_path, mode):
    from crawl.extract import run_extract

    warc = _warc(tmp_path / "pages.warc.gz", [(u, b, h) for u, b, h, _ in OPT_OUT_PAGES])
    stats = run_extract(warc, str(tmp_path / "out"), CrawlConfig(consent=mode))
    links = read_table(str(tmp_path / "out"), "links").to_pandas()
    rejected = read_table(str(tmp_path / "out"), "rejected").to_pandas()
    for url, _, _, opted_out in OPT_OUT_PAGES:
        kept = sorted(links[links.page_url == url].image_url)
        if opted_out and mode == "on":
            assert kept == [], url
            mine = rejected[rejected.detail.str.startswith(url + ":")]
            assert sorted(mine.url) == ["http://a.test/a.jpg", "http://a.test/b.jpg", "http://a.test/c.jpg"] and set(mine.reason) == {"page_opt_out"}, url
        else:
            assert kept == ["http://a.test/a.jpg", "http://a.test/b.jpg", "http://a.test/c.jpg"], url
    n_out = sum(1 for *_, o in OPT_OUT_PAGES if o) if mode == "on" else 0
    assert stats["input"] == 3 * len(OPT_OUT_PAGES) and stats["rejected"].get("page_opt_out", 0) == 3 * n_out and stats["kept"] == 3 * (len(OPT_OUT_PAGES) - n_out)
    if mode == "on":
        from browse.report import write_report

        assert f"page_opt_out {3 * n_out} links on {n_out} pages (extract)" in [" ".join(line.split()) for line in write_report(str(tmp_path / "out")).splitlines()]


# ---- flags and config -------------------------------------------------------------------------------


def test_repeated_resolve_and_allow_hosts_are_all_kept_and_run_takes_resolve(tmp_path):
    from webpairs.cli import build_parser
    from webpairs.run import RunConfig

    parser, _ = build_parser()
    args = parser.parse_args(["crawl", "download", "in", "--out", "o", "--resolve", "a.test:127.0.0.1", "--resolve", "b.test:127.0.0.2,c.test:::1", "--allow-hosts", "127.0.0.1", "--allow-hosts", "::1"])
    assert args.resolve == ["a.test:127.0.0.1", "b.test:127.0.0.2", "c.test:::1"] and args.allow_hosts == ["127.0.0.1", "::1"]
    args = parser.parse_args(["run", "in", "--out", "o", "--resolve", "a.test:127.0.0.1", "--resolve", "b.test:127.0.0.1", "--consent", "off"])
    cfg = RunConfig.load(None, allow_hosts=args.allow_hosts, crawl_overrides={"consent": args.consent}, download_overrides={"resolve": args.resolve, "consent": args.consent})
    assert cfg.download.resolve == ("a.test:127.0.0.1", "b.test:127.0.0.1") and cfg.download.consent == cfg.crawl.consent == "off"
    (tmp_path / "c.yaml").write_text("download:\n  consent: off\n  per_host_connections: 2\ncrawl:\n  consent: on\n")
    cfg = RunConfig.load(str(tmp_path / "c.yaml"))
    assert cfg.download.consent == "off" and cfg.crawl.consent == "on" and cfg.download.per_host_connections == 2


def test_a_workers_threads_all_see_every_planned_site(tmp_path, monkeypatch):
    """A worker reads the plan's answers on first use, and its other threads must never see a half-read
    table: one that saw the empty dict took a planned site for a new one and asked its robots.txt again
    (star.test's robots.txt was asked twice under load)."""
    import pickle

    from crawl import consent

    rules = consent.SiteRules(str(tmp_path / "consent"))
    for i in range(50):
        rules.rows[f"http://site{i}.test"] = {"origin": f"http://site{i}.test", "robots_status": "ok", "robots_http": 200, "robots_txt": "", "tdmrep_status": "missing", "tdmrep_http": 404, "tdmrep_json": "", "error": None, "fetched": ""}
    rules.save()
    worker = pickle.loads(pickle.dumps(rules))  # as img2dataset's worker gets it: without the rows
    assert worker._rows is None
    read = consent.pq.read_table

    def slow_read(*args, **kwargs):  # a loaded machine: the file takes a while to read
        time.sleep(0.3)
        return read(*args, **kwargs)

    monkeypatch.setattr(consent.pq, "read_table", slow_read)
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(len(worker.rows))) for _ in range(4)]
    for i, t in enumerate(threads):
        t.start()
        time.sleep(0.05 * (i > 0))
    for t in threads:
        t.join()
    assert seen == [50] * 4


def _ask_in_a_worker(blob: bytes, url: str, go) -> None:
    import pickle

    from crawl.consent import SiteConsent

    go.wait(10)
    SiteConsent(pickle.loads(blob)).before_request(url, planned_origin="http://planned.test")


def test_two_worker_processes_ask_a_redirect_targets_site_once(tmp_path):
    """Two img2dataset worker processes redirected at the same moment to a site the plan never saw:
    one asks its robots.txt, the other waits for that answer (cdn.test's robots.txt was asked twice
    in a full-suite run: each process had only its own lock)."""
    import multiprocessing
    import pickle

    from crawl import consent

    asked = []

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            time.sleep(0.5 if self.path == "/robots.txt" else 0)  # a slow site: both workers get to it before its answer
            body = b"User-agent: *\nAllow: /\n" if self.path == "/robots.txt" else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rules = consent.SiteRules(str(tmp_path / "consent"), allow_hosts=("127.0.0.1",), timeout=5)
        rules.save()  # as the driver leaves it: the plan's (here no) answers in hosts.parquet
        blob = pickle.dumps(rules)
        url = f"http://127.0.0.1:{server.server_address[1]}/x.jpg"
        ctx = multiprocessing.get_context("fork")
        go = ctx.Event()
        workers = [ctx.Process(target=_ask_in_a_worker, args=(blob, url, go)) for _ in range(2)]
        for w in workers:
            w.start()
        go.set()
        for w in workers:
            w.join(30)
        assert [w.exitcode for w in workers] == [0, 0]
    finally:
        server.shutdown()
    assert asked.count("/robots.txt") == 1 and asked.count("/.well-known/tdmrep.json") == 1, asked
    assert rules.absorb_hops() == 1 and rules.rows[url.rsplit("/", 1)[0]]["robots_status"] == "ok"
    assert os.listdir(tmp_path / "consent") == ["hosts.parquet"]  # no hop file and no lock left


def test_a_workers_threads_build_the_sites_answers_once(tmp_path, monkeypatch):
    """A worker's SiteRules reads hosts.parquet on first use. Two threads that both found it unread
    each read it and published their own dict: the later one replaced the dict the earlier one had
    already put a redirect target's answer into, so the worker asked that site's robots.txt again
    (cdn.test's robots.txt twice, and a fifth connection to it, 1 run in 14 at load 6)."""
    import pickle

    from crawl import consent

    rules = consent.SiteRules(str(tmp_path / "consent"), allow_hosts=("127.0.0.1",))
    rules.rows["http://planned.test"] = {"origin": "http://planned.test", "robots_status": "missing", "robots_http": 404, "robots_txt": "", "tdmrep_status": "missing", "tdmrep_http": 404, "tdmrep_json": "", "error": None, "fetched": "2026-12-05T00:00:00Z"}
    rules.save()
    worker = pickle.loads(pickle.dumps(rules))  # as img2dataset's workers get it: rows to be read back
    assert worker._rows is None
    read = consent.pq.read_table

    def slow_read(*args, **kwargs):  # a loaded machine: the file takes a while to come back
        time.sleep(0.2)
        return read(*args, **kwargs)

    monkeypatch.setattr(consent.pq, "read_table", slow_read)
    seen = []

    def use():
        rows = worker.rows
        rows.setdefault(f"http://{threading.get_ident()}.test", {})  # an answer a thread put in
        seen.append(rows)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(r) for r in seen}) == 1 and worker.rows is seen[0]  # one dict for every thread
    assert len(worker.rows) == 1 + 8  # the planned site's answer and every thread's
