"""crawl extract: pure URL/HTML functions, then the Beam stage on the real shared WARCs and the test web."""

import glob
import os
from html.parser import HTMLParser

import pytest

from core.config import CrawlConfig
from core.records import stable_id
from core.stageio import read_stats, read_table
from crawl.html import extract_image_links, largest_candidate, parse_srcset
from crawl.urls import AllowList, normalize_url, policy_reason


@pytest.mark.parametrize(
    "raw,base,expected",
    [
        ("../img/a.jpg", "http://Ex.COM:80/p/q.html", "http://ex.com/img/a.jpg"),
        ("//cdn.ex.com/x.png#frag", "https://ex.com/", "https://cdn.ex.com/x.png"),
        ("b c.jpg", "https://ex.com:443/dir/", "https://ex.com/dir/b%20c.jpg"),
        ("/x.jpg?a=1&b=%20", "http://ex.com:8080/", "http://ex.com:8080/x.jpg?a=1&b=%20"),
        ("http://ex.com", "http://ex.com/", "http://ex.com/"),
    ],
)
def test_normalize_url(raw, base, expected):
    assert normalize_url(raw, base) == (expected, None)


@pytest.mark.parametrize(
    "raw,reason",
    [("data:image/png;base64,AAA", "data_uri"), ("ftp://a/b.jpg", "bad_scheme"), ("javascript:void(0)", "bad_scheme"), ("http://u:p@ex.com/a.jpg", "userinfo"), ("http://[::1", "bad_url")],
)
def test_normalize_url_rejects(raw, reason):
    assert normalize_url(raw, "http://ex.com/") == (None, reason)


def test_fast_url_path_agrees_with_urllib(warc_dir):
    """normalize_url's regex fast path must give exactly what the general urllib path gives: on
    every link of the shared WARCs and on generated links made of the pieces that trip URL code."""
    import random

    from crawl.html import decode_html
    from crawl.urls import _normalize_general
    from crawl.warc import Page, iter_file

    cases = []
    for path in sorted(glob.glob(os.path.join(warc_dir, "*.warc*"))):
        if not path.endswith(".wat"):
            for doc in iter_file(path):
                if isinstance(doc, Page):
                    cases += [(link.url, doc.url) for link in extract_image_links(decode_html(doc.body, doc.charset))[0]]
    assert len(cases) > 1000
    pieces = ["a", "B", "/", "//", ".", "..", "./", "../", "?", "#", "%2F", "%zz", " ", "\t", "\n", "\x00", ":", "@", ";", "~", "é", "\u017f", "\u212a", "١",
              "http:", "HTTPS://", "//h.Com", "x.jpg", "=", "&", "127.0.0.1", ":80", ":080", ":99999", "[::1]", "\\", "data:", "javascript:", "0x7f.1", "Ex.Com."]
    bases = ["http://ex.com/a/b.html", "https://Ex.COM:443/a//b/", "http://h", "http://h?x/y", "http://h/d;x/p", "HTTP://h.com:8080/a/./b", "http://u:p@h/x", "http://h./x", "http://127.0.0.1:8000/p/q"]
    rng = random.Random(0)
    cases += [("".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))), rng.choice(bases)) for _ in range(30000)]
    for allow in (None, AllowList(), AllowList(["127.0.0.1"])):
        for raw, base in cases:
            assert normalize_url(raw, base, allow) == _normalize_general(raw, base, allow), (raw, base)
    from urllib.parse import quote

    from crawl.urls import _PATH_SAFE, _QUERY_SAFE, _resolve_plain, quote_unsafe

    for part in ["/a b/c d.jpg", "/plain/x.jpg", "/é ü", "/%41 %zz", "/a\x00b", "q=1&b=a b", "/[x] y"]:  # both paths quote with it
        for safe in (_PATH_SAFE, _QUERY_SAFE):
            assert quote_unsafe(part, safe) == quote(part, safe=safe), part

    fast_taken = sum(_resolve_plain(raw.strip(), base) is not None for raw, base in cases[:1000])
    assert fast_taken > 900  # the real links do take the fast path


def test_normalize_links_agrees_with_normalize_url(warc_dir):
    """normalize_links (a page's links against its base, plain references by concatenation: issue
    34) and normalize_link_columns (a page's references recognised by one findall) give exactly
    normalize_url's answer for each: every link of the shared WARCs against its
    page's base, and generated references (relative, "./", root-relative, protocol-relative,
    absolute, with spaces, dots, ports, private hosts) against plain and odd bases, with and
    without an allow list. Most real links take the concatenation."""
    import random

    from crawl.html import decode_html, extract_page
    from crawl.urls import _NORMAL_ABSOLUTE, _PLAIN_RELATIVE, normal_url, normalize_link_columns, normalize_links
    from crawl.warc import Page, iter_file

    by_base: dict = {}
    for path in sorted(glob.glob(os.path.join(warc_dir, "*.warc*"))):
        if not path.endswith(".wat"):
            for doc in iter_file(path):
                if isinstance(doc, Page):
                    raw, base_href, _ = extract_page(decode_html(doc.body, doc.charset))
                    page = normalize_url(doc.url, doc.url)[0]
                    base = (normalize_url(base_href, page)[0] if base_href else None) or page
                    by_base.setdefault(base, []).extend(link.url for link in raw)
    real = sum(len(v) for v in by_base.values())
    assert real > 1000
    fast = sum(bool(_PLAIN_RELATIVE.match(r.strip()) or _NORMAL_ABSOLUTE.match(r.strip()) or r.startswith("//")) for v in by_base.values() for r in v)
    assert fast > 0.8 * real, (fast, real)
    pieces = ["a", "B", "/", "//", ".", "..", "./", "../", "?", "#", "%2F", "%zz", " ", "\t", "\x00", ":", "@", ";", "~", "é", "\u212a", "\u00a0",
              "http:", "HTTPS://", "http://", "https://", "//h.Com", "ex.com", "cdn.ex.com/", "x.jpg", "=", "&", "127.0.0.1", "localhost", ":80", ":99999", "[::1]", "\\", "data:", "0x7f.1", "Ex.Com.", "-", "_", "'", "+", "$"]
    bases = ["http://ex.com/a/b.html", "https://Ex.COM:443/a//b/", "http://h", "http://h?x/y", "http://h/d;x/p", "HTTP://h.com:8080/a/./b", "http://h./x", "http://127.0.0.1:8000/p/q",
             "http://ex.com/d%20x/é/p.html", "http://ex.com/a b/", "https://ex.com:8443/x/y?z", "http://10.0.0.1/a/", "http://localhost/x/", "https://ex.com/"]
    rng = random.Random(0)
    for _ in range(20000):
        by_base.setdefault(rng.choice(bases), []).append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 7))))
    hosts = ["ex.com", "Ex.com", "127.0.0.1", "localhost", "10.1.2.3", "a-b_c.d", "0x7f.1", "h", "169.254.169.254", "x.localhost", "2130706433"]
    paths = ["/", "/a.jpg", "/a b.jpg", "/a?b=c", "/a?", "/a#f", "/%41", "/é", "/a//b", "/./a", "", "/[x]", "/a b?c d", "/a%2 b", "/ x/y z/", "/a b#c d", "/a b|c"]
    absolute = [f"{s}{h}{p}" for s in ("http://", "https://", "HTTP://", "//") for h in hosts for p in paths]  # normal ones, refused hosts
    for base in bases:
        by_base[base] += absolute + [rng.choice(pieces) + "\n" + rng.choice(pieces) for _ in range(20)]  # a newline inside a reference
    for allow in (None, AllowList(), AllowList(["127.0.0.1", "localhost"])):
        for base, raws in by_base.items():
            expected = [normalize_url(raw, base, allow) for raw in raws]
            if allow is None:  # extract's page URLs and <base href>: normal ones as they are
                assert [normal_url(raw, base) for raw in raws] == [url for url, _ in expected], base
            for raw, got, want in zip(raws, normalize_links(raws, base, allow), expected):
                assert got == want, (raw, base)
            # normalize_link_columns resolves a page's references together: pages of 0 to 40 of them
            start = 0
            while start < len(raws):
                size = rng.randint(0, 40)
                page = raws[start : start + size]
                urls, reasons = normalize_link_columns(page, base, allow)
                assert list(zip(urls, reasons or [None] * len(page))) == expected[start : start + size], (page, base)
                assert (reasons is None) == all(r is None for _, r in expected[start : start + size])
                assert normalize_link_columns([r.strip() for r in page], base, allow, stripped=True) == (urls, reasons)  # extract_page's, stripped already
                start += size


def test_url_policy_blocks_internal_addresses_unless_allowed():
    deny = AllowList()
    for url in ["http://127.0.0.1/a", "http://localhost:8000/a", "http://169.254.169.254/latest", "http://10.1.2.3/x", "http://192.168.0.1/", "http://[::1]/a", "http://0.0.0.0/", "http://2130706433/", "http://[::ffff:127.0.0.1]/"]:
        assert policy_reason(url, deny) == "private_address", url
    assert policy_reason("https://example.org/a.jpg", deny) is None
    allow = AllowList(["127.0.0.1", "10.0.0.0/8", "intranet.local"])
    assert policy_reason("http://127.0.0.1:8000/a", allow) is None
    assert policy_reason("http://10.9.9.9/a", allow) is None
    assert policy_reason("http://intranet.local/a", allow) is None
    assert policy_reason("http://169.254.169.254/", allow) == "private_address"


def test_srcset_parsing_takes_largest():
    assert parse_srcset("a.jpg 1x, b.jpg 2x") == [("a.jpg", 1.0, "x"), ("b.jpg", 2.0, "x")]
    assert largest_candidate("s.jpg 320w,m.jpg 640w, l.jpg 1280w") == "l.jpg"
    assert largest_candidate("a,b.jpg 2x") is not None
    assert largest_candidate("") is None


def test_html_extraction_base_picture_og_and_broken_markup():
    html = """<html><head><base href="https://cdn.ex.com/assets/"><meta property="og:image" content="og.jpg">
    </head><body><img src="a.jpg" alt=" A  cat " width="300px" height=200><img alt="no src">
    <picture><source srcset="p1.webp 1x, p2.webp 2x"><img src="p.jpg"></picture>
    <img srcset="s1.jpg 100w, s2.jpg 900w" src="s0.jpg"><div><img src="broken.jpg" <p>unclosed"""
    links, base = extract_image_links(html)
    assert base == "https://cdn.ex.com/assets/"
    assert [(l.kind, l.url) for l in links] == [("og:image", "og.jpg"), ("img", "a.jpg"), ("picture", "p2.webp"), ("img", "p.jpg"), ("img", "s2.jpg"), ("img", "broken.jpg")]
    assert (links[1].alt, links[1].width, links[1].height) == ("A cat", 300, 200)
    assert [l.position for l in links] == list(range(6))


class _ImgCounter(HTMLParser):
    """Independent count: stdlib parser, <img> with a non-empty src or srcset."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and ((a.get("src") or "").strip() or (a.get("srcset") or "").strip()):
            self.n += 1


def _independent_img_counts(path):
    """Count <img> per file with warcio (another WARC reader) and html.parser (another HTML parser)."""
    from warcio.archiveiterator import ArchiveIterator

    total = 0
    with open(path, "rb") as fh:
        for rec in ArchiveIterator(fh):
            if rec.rec_type != "response" or rec.http_headers is None:
                continue
            if not (rec.http_headers.get_header("Content-Type") or "").lower().startswith("text/html"):
                continue
            body = rec.content_stream().read()
            if not body.strip():
                continue
            counter = _ImgCounter()
            counter.feed(body.decode("utf-8", errors="replace"))
            total += counter.n
    return total


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, warc_dir):
    from crawl.extract import run_extract

    out = str(tmp_path_factory.mktemp("extract"))
    stats = run_extract(warc_dir, out, CrawlConfig())
    return out, stats


def test_link_counts_match_an_independent_count(extracted, warc_dir):
    out, stats = extracted
    links = read_table(out, "links").to_pandas()
    rejected = read_table(out, "rejected").to_pandas()
    assert stats["input"] == stats["kept"] + sum(stats["rejected"].values()) == len(links) + len(rejected)
    for path in sorted(glob.glob(os.path.join(warc_dir, "*.warc*"))):
        if path.endswith(".wat"):
            continue
        expected = _independent_img_counts(path)
        from crawl.html import decode_html, extract_image_links as ex
        from crawl.warc import iter_file

        ours = sum(sum(1 for l in ex(decode_html(p.body, p.charset))[0] if l.kind == "img") for p in iter_file(path))
        assert ours == expected, os.path.basename(path)
    # the README's numbers for the shared files
    assert _independent_img_counts(os.path.join(warc_dir, "books.toscrape.warc")) == 20
    assert (links.source_file.str.endswith("books.toscrape.warc")).sum() == 20


def test_relative_urls_resolve_and_wat_links_match(extracted, warc_dir):
    out, _ = extracted
    links = read_table(out, "links").to_pandas()
    books = links[links.page_url == "http://books.toscrape.com/"]
    assert books.image_url.str.startswith("http://books.toscrape.com/media/cache/").all()
    gallery = links[links.page_url == "http://0pointer.de/photos/?gallery=Australia&photo=496"]
    assert "http://0pointer.de/photos/galleries/Australia/lq/img-496.jpg" in set(gallery.image_url)
    # every WAT IMG link equals a link found in the matching WARC's HTML (so it collapses as a duplicate)
    from crawl.urls import normalize_url as norm
    from crawl.warc import WatLinks, iter_file

    wat = [d for d in iter_file(os.path.join(warc_dir, "cc-2014-35.warc.wat")) if isinstance(d, WatLinks)]
    wat_links = {(d.url, norm(l["url"], d.url)[0]) for d in wat for l in d.links}
    assert len(wat_links) >= 4
    assert wat_links <= set(zip(links.page_url, links.image_url))


def test_extract_on_test_web_rejects_refused_links(tmp_path, test_web):
    from crawl.extract import run_extract

    stats = run_extract(test_web.warc_path, str(tmp_path / "deny"), CrawlConfig())
    rej = read_table(str(tmp_path / "deny"), "rejected").to_pandas()
    by_url = dict(zip(rej.url, rej.reason))
    for url, (stage, reason) in test_web.bad.items():
        if stage == "extract":
            assert any(reason == r and (u == url or url.startswith(u[:30])) for u, r in by_url.items()), url
    # without the allow list the loopback web itself is private: nothing survives
    assert stats["kept"] == 0 and stats["rejected"]["private_address"] > 0
    stats = run_extract(test_web.warc_path, str(tmp_path / "allow"), CrawlConfig(allow_hosts=("127.0.0.1",)))
    links = read_table(str(tmp_path / "allow"), "links").to_pandas()
    expected = set(test_web.good) | set(test_web.boilerplate) | {u for u, (s, _) in test_web.bad.items() if s != "extract"}
    expected |= {u for g in test_web.near_duplicate_groups for u in g}
    assert set(links.image_url) == expected
    assert not links.image_url.str.contains("/thumbs/").any()  # srcset: the largest candidate only
    assert links.groupby(["page_url", "image_url"]).size().max() == 1
    assert stats["rejected"]["duplicate_link"] >= 12  # og:image and <picture> repeats
    assert read_stats(str(tmp_path / "allow"))["input"] == stats["input"]


def test_truncated_and_non_html_records_survive(tmp_path, warc_dir):
    """A WARC cut in the middle keeps the pages before the cut; non-HTML responses are skipped."""
    from crawl.extract import run_extract
    from crawl.warc import iter_file

    src = os.path.join(warc_dir, "books.toscrape.warc")  # 1 HTML page + its JPEG, CSS and JS responses
    counters = {}
    pages = list(iter_file(src, counters))
    assert len(pages) == 1 and counters["skipped_non_html"] >= 20  # the 20 JPEGs (and CSS/JS)
    data = open(src, "rb").read()
    cut = tmp_path / "cut.warc"
    cut.write_bytes(data[: len(data) // 3])
    stats = run_extract(str(cut), str(tmp_path / "out"), CrawlConfig())
    assert stats["kept"] == 20 and stats["truncated_files"] == 1  # the page came before the cut, which is counted
    (tmp_path / "empty.warc").write_bytes(b"")
    from core.stageio import StageError

    with pytest.raises(StageError, match="none of the 1 input files"):  # an empty "WARC" is not one
        run_extract(str(tmp_path / "empty.warc"), str(tmp_path / "out2"), CrawlConfig())
    assert read_stats(str(tmp_path / "out2"))["rejected"] == {"not_a_warc": 1}


def test_collapse_page_keeps_one_link_per_image_url():
    from crawl.extract import collapse_page

    page = "http://a.test/p"
    img = ("http://a.test/1.jpg", "one", 0, "img", 10, 20)
    og = ("http://a.test/1.jpg", "", 2, "og:image", None, None)
    other = ("http://a.test/2.jpg", "", 1, "img", None, None)
    # one capture, distinct URLs: every link kept, in page order, nothing rejected
    kept, rejected = collapse_page(page, [("f.warc", 7, [img, other])])
    assert rejected == [] and [k[2:8] for k in kept] == [img, other]
    assert kept[0][:2] == (stable_id(page, img[0]), page) and kept[0][8:] == ("f.warc", 7)
    # the og:image repeat and a second capture of the page collapse onto the <img>
    kept, rejected = collapse_page(page, [("f.warc", 7, [og, img, other]), ("g.warc", 3, [img])])
    assert [k[2:8] for k in kept] == [img, other] and kept[0][8:] == ("f.warc", 7)
    assert sorted(r["detail"] for r in rejected) == ["img", "og:image"] and {r["reason"] for r in rejected} == {"duplicate_link"}


def test_declared_size_fast_path_reads_what_the_regex_reads():
    """crawl/html._int skips the regex for plain ASCII digits (issue 34's profile: two calls per
    <img>); every other spelling still goes through it, with the same answers."""
    import re

    from crawl.html import _int

    def by_regex(value):
        m = re.match(r"\s*(\d+)", value or "")
        return int(m.group(1)) if m and int(m.group(1)) < 2**31 else None

    values = [None, "", "300", "0", "007", " 300", "300px", "12.5", "2147483647", "2147483648", "99999999999999", "\u00b2", "\u0661\u0662", "x1", "-5", "1e3"]
    assert [_int(v) for v in values] == [by_regex(v) for v in values]
    assert _int("300") == 300 and _int("2147483648") is None and _int("\u00b2") is None


def test_page_complexity_shortcuts_give_the_same_verdicts(warc_dir):
    """page_complexity counts '<' with NumPy, skips the depth estimate when the '<' not followed by
    '/' are at most the limit, and stops the estimate once the start tags that nest are (issue 34):
    the verdicts are those of body.count and the full estimate, on the shared pages and on nested,
    flat, mixed and end-tag-heavy markup, at several limits."""
    from crawl.html import _depth_estimate, page_complexity
    from crawl.warc import Page, iter_file

    bodies = [d.body for p in sorted(glob.glob(os.path.join(warc_dir, "*.warc*"))) if not p.endswith(".wat") for d in iter_file(p) if isinstance(d, Page)]
    bodies += [b"<div>" * n + b"<img src=x>" + b"</div>" * n for n in (50, 4000, 5000)]
    bodies += [b"<p>x<br><img src=x><b>y</b><li>z" * 3000, b"<span>" * 300 + b"<div></div>" * 3000, b"", b"<" * 5000, b"<a>" * 10]
    bodies += [b"<div>" * 5000 + b"</div>" * 5000, b"<a></a>" * 3000, b"<b>" * 4000 + b"</" * 3000, b"<\x0f>" * 5000 + b"<i>", b"x</" * 5000 + b"<"]
    for body in bodies:
        estimate = _depth_estimate(body)
        # the bound page_complexity checks first: start tags the estimate counts <= '<' not followed by '/'
        assert _depth_estimate(body, 10**9) <= body.count(b"<") - body.count(b"</")
        for limit in (10, 100, 1000, 4096):
            assert (_depth_estimate(body, limit) <= limit) == (estimate <= limit)
            tags = body.count(b"<")
            want = None if tags <= limit else (f"{tags} tags > 200000" if tags > 200000 else (None if _depth_estimate(body) <= limit else "deep"))
            got = page_complexity(body, limit)
            assert got == want or (want == "deep" and got == f"nesting depth over {limit}") or (want == "deep" and got is None), (limit, got, want)


def test_depth_estimate_orders_tags_as_lexsort():
    """The depth estimate groups tags by name with two radix sorts (issue 34): the order is
    np.lexsort's by (code, position) for every array: random 24-bit codes, few names, one name,
    the extremes, empty."""
    import numpy as np

    from crawl.html import _by_name

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 1 << 24, n) for n in (0, 1, 2, 7, 100, 7542, 20000)]
    arrays += [rng.choice(np.array([0x646976, 0x737061, 0x610000, 0x756C00, 0xFFFFFF, 0], dtype=np.int64), n) for n in (5, 5000)]
    arrays += [np.full(300, 0x646976, dtype=np.int64), np.array([0xFFFFFF, 0, 0xFFFF, 0x10000, 0xFF00FF, 0x00FFFF], dtype=np.int64)]
    for code in arrays:
        code = code.astype(np.int64)
        assert np.array_equal(_by_name(code), np.lexsort((np.arange(code.size), code))), code.size


def test_pages_with_several_captures_collapse_across_files(tmp_path):
    """Issue 34's extract reads each file into a spill file and collapses the pages with one
    capture there; pages captured more than once (in two files, or twice in one file) meet in the
    shuffle. Every kept and rejected row is the one collapse_page gives on all captures of the
    page; the spill folder is gone from the output."""
    import pyarrow.parquet as pq

    from core.stageio import read_success
    from crawl.extract import collapse_page, page_links, run_extract
    from crawl.html import extract_page
    from crawl.urls import AllowList
    from crawl.warc import Page, iter_file
    from webpairs.testweb import write_warc

    def html(*imgs):
        return "<html><body>" + "".join(imgs) + "</body></html>"

    a = {
        "http://a.test/twice": html('<meta property="og:image" content="/1.jpg">', '<img src="2.jpg" alt="two">', '<img src="/1.jpg">', '<img src="3.jpg" alt="three">'),
        "http://a.test/once": html('<img src="x.jpg" alt="x">', '<img src="x.jpg" alt="">', '<img src="y.jpg">', '<img src="data:image/png;base64,AA">'),
        "http://a.test/inone": html('<img src="p.jpg">'),
    }
    b = {
        "http://a.test/twice": html('<img src="/1.jpg" alt="one">', '<img src="4.jpg">', '<img src="2.jpg">'),
        "http://b.test/other": html('<img src="q.jpg" alt="q">', '<img src="q.jpg" alt="q2">'),
    }
    c = {"http://a.test/inone": html('<img src="p.jpg" alt="again">', '<img src="r.jpg">')}
    for name, pages in (("a", a), ("b", b)):
        write_warc(str(tmp_path / "in" / f"{name}.warc.gz"), pages)
    write_warc(str(tmp_path / "in" / "c.warc.gz"), c)
    stats = run_extract(str(tmp_path / "in"), str(tmp_path / "out"), CrawlConfig())

    captures: dict = {}  # the reference: collapse_page over every capture of each page
    cfg = CrawlConfig()
    for path in sorted(glob.glob(str(tmp_path / "in" / "*.warc.gz"))):
        for doc in iter_file(path):
            if isinstance(doc, Page):
                raw, base, _ = extract_page(doc.body.decode())
                links, _ = page_links(doc.url, raw, base, cfg, AllowList())
                captures.setdefault(doc.url, []).append((path, doc.offset, links))
    want_kept, want_rejected = [], []
    for page, caps in captures.items():
        kept, rejected = collapse_page(page, caps)
        want_kept += kept
        want_rejected += [r for r in rejected]
    got = pq.read_table(glob.glob(str(tmp_path / "out" / "links" / "*.parquet"))).to_pylist()
    assert sorted(tuple(r.values()) for r in got) == sorted(want_kept)
    rejected = pq.read_table(glob.glob(str(tmp_path / "out" / "rejected" / "*.parquet"))).to_pylist()
    dups = sorted((r["record_id"], r["detail"], r["url"]) for r in rejected if r["reason"] == "duplicate_link")
    assert dups == sorted((r["record_id"], r["detail"], r["url"]) for r in want_rejected)
    assert stats["rejected"] == {"duplicate_link": len(want_rejected), "data_uri": 1}
    assert stats["input"] == stats["kept"] + sum(stats["rejected"].values()) == 16
    by_url = {(r["page_url"], r["image_url"]): r for r in got}
    assert by_url[("http://a.test/twice", "http://a.test/1.jpg")]["kind"] == "img"  # the <img> beats the og:image of the other file
    assert by_url[("http://a.test/twice", "http://a.test/1.jpg")]["alt"] == "one"  # its alt from the other capture
    assert by_url[("http://a.test/inone", "http://a.test/p.jpg")]["alt"] == "again"
    assert by_url[("http://a.test/once", "http://a.test/x.jpg")]["alt"] == "x"
    assert len(got) == 9
    assert not os.path.exists(tmp_path / "out" / ".spill")
    assert not any(".spill" in f for f in read_success(str(tmp_path / "out"))["files"])


# Pages for the single-capture collapse in _Spill.add (crawl/extract.py): each repeats image URLs
# within one capture, so the kept link and its alt are chosen before any shuffle.
def _page(*tags):
    return "<html><head></head><body>" + "".join(tags) + "</body></html>"


CAT_PAGE = "http://a.test/cat"
ONE_CAPTURE_PAGES = {
    # og:image first, then an <img> with an empty alt, then one with an alt: the first <img> is kept
    # (kind before position) and borrows "cat" from the later duplicate
    CAT_PAGE: _page('<meta property="og:image" content="/u.jpg">', '<img src="/u.jpg" alt="">', '<img src="/u.jpg" alt="cat">', '<img src="/v.jpg" alt="v">'),
    # no duplicate has an alt: the kept <img> stays without one; the og:image loses to a later <img>
    "http://a.test/noalt": _page('<meta property="og:image" content="/w.jpg">', '<img src="/n.jpg">', '<img src="/n.jpg">', '<img src="/w.jpg" alt="w">'),
    # two <img> with alts: the first is kept with its own alt
    "http://a.test/twoalts": _page('<img src="/t.jpg" alt="first">', '<img src="/t.jpg" alt="second">', '<img src="/s.jpg">'),
    # every URL once: the common path
    "http://a.test/plain": _page('<img src="/p1.jpg" alt="p1">', '<img src="/p2.jpg">'),
}
TWICE_PAGE = "http://b.test/twice"


def _write_two_captures(path):
    """A WARC with TWICE_PAGE captured twice (two response records in this one file) and a page
    captured once, written with warcio itself (webpairs.testweb.write_warc takes a dict: one
    record per URL)."""
    import io

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    records = [
        (TWICE_PAGE, _page('<meta property="og:image" content="/k.jpg">', '<img src="/m.jpg">', '<img src="/m.jpg" alt="">')),
        ("http://b.test/single", _page('<meta property="og:image" content="/z.jpg">', '<img src="/z.jpg" alt="">', '<img src="/z.jpg" alt="zed">')),
        (TWICE_PAGE, _page('<img src="/k.jpg" alt="kay">', '<img src="/m.jpg" alt="em">', '<img src="/o.jpg">')),
    ]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=path.endswith(".gz"))
        for url, html in records:
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(html.encode()), http_headers=http))


def _extract_matches_collapse_page(tmp_path):
    """Run extract on tmp_path/in; every kept link row and every duplicate_link row must be the
    one collapse_page gives on the raw links of all captures of the page (read by crawl.warc,
    parsed by crawl.html, outputs read back with pyarrow). Returns the kept rows and the
    duplicate rows."""
    import pyarrow.parquet as pq

    from crawl.extract import collapse_page, page_links, run_extract
    from crawl.html import extract_page
    from crawl.warc import Page, iter_file

    stats = run_extract(str(tmp_path / "in"), str(tmp_path / "out"), CrawlConfig())
    captures: dict = {}
    for path in sorted(glob.glob(str(tmp_path / "in" / "*.warc*"))):
        for doc in iter_file(path):
            if isinstance(doc, Page):
                raw, base, _ = extract_page(doc.body.decode())
                links, refused = page_links(doc.url, raw, base, CrawlConfig(), AllowList())
                assert refused == []
                captures.setdefault(doc.url, []).append((path, doc.offset, links))
    want_kept, want_dups = [], []
    for page, caps in captures.items():
        kept, rejected = collapse_page(page, caps)
        want_kept += kept
        want_dups += [(r["record_id"], r["detail"], r["url"]) for r in rejected]
    got = pq.read_table(glob.glob(str(tmp_path / "out" / "links" / "*.parquet"))).to_pylist()
    assert sorted(tuple(r.values()) for r in got) == sorted(want_kept)
    rejected = pq.read_table(glob.glob(str(tmp_path / "out" / "rejected" / "*.parquet"))).to_pylist()
    assert {r["reason"] for r in rejected} <= {"duplicate_link"}
    dups = sorted((r["record_id"], r["detail"], r["url"]) for r in rejected)
    assert dups == sorted(want_dups)
    assert stats["input"] == stats["kept"] + sum(stats["rejected"].values()) == len(got) + len(dups)
    return {(r["page_url"], r["image_url"]): r for r in got}, dups


def _check_cat_page(by_url, dups):
    """The hand-written answer for CAT_PAGE (not collapse_page's): kind img at position 1, alt
    "cat" borrowed from position 2; the og:image (position 0) and the second <img> rejected."""
    u = "http://a.test/u.jpg"
    row = by_url[(CAT_PAGE, u)]
    assert (row["kind"], row["alt"], row["position"]) == ("img", "cat", 1)
    sid = stable_id(CAT_PAGE, u)
    assert sorted(d for d in dups if d[2] == u) == sorted([(f"{sid}:og:image:0", "og:image", u), (f"{sid}:img:2", "img", u)])
    assert by_url[("http://a.test/noalt", "http://a.test/w.jpg")]["kind"] == "img"
    assert by_url[("http://a.test/noalt", "http://a.test/n.jpg")]["alt"] == ""
    assert by_url[("http://a.test/twoalts", "http://a.test/t.jpg")]["alt"] == "first"


def test_single_capture_collapse_keeps_best_kind_and_borrows_alt(tmp_path):
    """Pages captured once are collapsed in the spill file (_Spill.add), never by collapse_page:
    the kept duplicate is the best kind first, then the earliest, and it takes an alt from a
    duplicate when it has none. Every row of the file equals collapse_page on the page's links."""
    from webpairs.testweb import write_warc

    write_warc(str(tmp_path / "in" / "one.warc.gz"), ONE_CAPTURE_PAGES)
    by_url, dups = _extract_matches_collapse_page(tmp_path)
    _check_cat_page(by_url, dups)
    assert len(by_url) == 8 and len(dups) == 5


def test_page_captured_twice_in_one_file(tmp_path):
    """Two captures of a page in ONE file meet in the shuffle and collapse as one page (the <img>
    of the second capture beats the og:image of the first; alts come from either capture); the
    file's page captured once is collapsed in the spill, with the same rule."""
    _write_two_captures(str(tmp_path / "in" / "two.warc.gz"))
    by_url, dups = _extract_matches_collapse_page(tmp_path)
    k, m = by_url[(TWICE_PAGE, "http://b.test/k.jpg")], by_url[(TWICE_PAGE, "http://b.test/m.jpg")]
    assert (k["kind"], k["alt"], m["kind"], m["alt"], m["position"]) == ("img", "kay", "img", "em", 1)
    assert k["source_offset"] != m["source_offset"]  # each from its own capture
    z = by_url[("http://b.test/single", "http://b.test/z.jpg")]
    assert (z["kind"], z["alt"], z["position"]) == ("img", "zed", 1)
    assert len(by_url) == 4 and len(dups) == 5


@pytest.mark.parametrize("patch", ["every_page_hash_collides", "spill_batches_of_3"])
def test_collapse_is_the_same_on_the_shuffle_path_and_in_small_spill_batches(tmp_path, monkeypatch, patch):
    """The same pages with every page hash equal (every page then looks captured several times
    and takes the shuffle, keyed by its URL: a collision changes no output) and with spill record
    batches of 3 links (a batch ends with a page, so most batches hold one page)."""
    import crawl.extract
    from webpairs.testweb import write_warc

    if patch == "every_page_hash_collides":
        monkeypatch.setattr(crawl.extract, "page_hash", lambda page_url: 7)
    else:
        monkeypatch.setattr(crawl.extract, "SPILL_ROWS", 3)
    write_warc(str(tmp_path / "in" / "one.warc.gz"), ONE_CAPTURE_PAGES)
    _write_two_captures(str(tmp_path / "in" / "two.warc.gz"))
    by_url, dups = _extract_matches_collapse_page(tmp_path)
    _check_cat_page(by_url, dups)
    assert len(by_url) == 12 and len(dups) == 10


def test_a_lone_surrogate_in_a_wat_link_is_a_replacement_character_not_a_failed_stage(tmp_path, warc_dir):
    # WAT is JSON: a link URL or alt may escape a lone surrogate ("\ud800"), which no UTF-8 writer
    # takes; the stage failed with UnicodeEncodeError (issue 34's review). It becomes U+FFFD, as the
    # HTML parser makes of &#xD800;, and the page's other links are extracted as before.
    import io
    import json

    from warcio.archiveiterator import ArchiveIterator
    from warcio.warcwriter import WARCWriter

    from crawl.extract import run_extract

    src, folder = os.path.join(warc_dir, "cc-2014-35.warc.wat"), tmp_path / "wat"
    folder.mkdir()
    page = None
    with open(src, "rb") as fh, open(folder / "x.warc.wat", "wb") as out:
        writer = WARCWriter(out, gzip=False)
        for rec in ArchiveIterator(fh):
            if rec.rec_type != "metadata":
                continue
            try:
                doc = json.loads(rec.content_stream().read())
            except ValueError:
                continue
            env = doc.get("Envelope", {})
            html = env.get("Payload-Metadata", {}).get("HTTP-Response-Metadata", {}).get("HTML-Metadata", {})
            if env.get("WARC-Header-Metadata", {}).get("WARC-Type") != "response" or not html:
                continue
            html.setdefault("Links", []).append({"path": "IMG@/src", "url": "/img/\ud800.jpg", "alt": "a \udfff b"})
            body = json.dumps(doc).encode()  # ensure_ascii: the escapes \ud800 and \udfff
            assert b"\\ud800" in body and b"\\udfff" in body
            page = rec.rec_headers.get_header("WARC-Target-URI")
            writer.write_record(writer.create_warc_record(page, "metadata", payload=io.BytesIO(body), warc_headers_dict={"Content-Type": "application/json"}))
            break
    assert page is not None
    stats = run_extract(str(folder), str(tmp_path / "out"), CrawlConfig())
    assert stats["input"] == stats["kept"] + sum(stats["rejected"].values())
    links = read_table(str(tmp_path / "out"), "links").to_pandas()
    mine = links[links.image_url.str.endswith("/img/%EF%BF%BD.jpg")]
    assert len(mine) == 1 and mine.alt.tolist() == ["a \ufffd b"]


def test_arrow_table_coder_round_trips_and_measures_without_encoding():
    """core/stageio.ArrowTableCoder (issue 34): a table comes back equal (nulls, dictionary and
    several chunks, empty), and Beam's size estimate is the table's nbytes, not an encoding."""
    import apache_beam as beam
    import pyarrow as pa

    from core.stageio import ArrowTableCoder

    page = pa.DictionaryArray.from_arrays(pa.array([0, 1, 1, None], pa.int32()), pa.array(["a", "b"]))
    t = pa.table({"s": ["x", None, "é", ""], "i": pa.array([1, None, 3, 4], pa.int32()), "d": page})
    tables = [t, pa.concat_tables([t, t.slice(1, 2)]), t.slice(0, 0)]
    coder = beam.coders.registry.get_coder(pa.Table)
    assert isinstance(coder, ArrowTableCoder)
    impl = coder.get_impl()
    for table in tables:
        back = coder.decode(coder.encode(table))
        assert back.schema == table.schema and back.to_pylist() == table.to_pylist()
        assert impl.estimate_size(table) == table.nbytes


def test_extract_pickles_no_table(tmp_path, monkeypatch):
    """The tables extract's steps give (kept links, rejected rows) are encoded by ArrowTableCoder:
    with the default coder Beam pickled each one to measure its size (the first ten an output makes
    are always measured: ~115 MB pickled a Common Crawl file, issue 34). A pickled pa.Table fails
    the run here; the outputs are the stage's as before (read back with pyarrow)."""
    import copyreg

    import pyarrow as pa
    import pyarrow.parquet as pq

    from crawl.extract import run_extract
    from webpairs.testweb import write_warc

    pages = {f"http://a.test/p{i}": "".join(f'<img src="/i{j}.jpg" alt="{j}">' for j in range(i % 5 + 1)) + '<img src="data:x">' for i in range(40)}
    for f in range(2):
        write_warc(str(tmp_path / "in" / f"{f}.warc.gz"), {f"{u}?f={f}": h for u, h in pages.items()})
    pickled = []

    def refuse(table):
        pickled.append(table.num_rows)
        raise AssertionError("a pyarrow table was pickled")

    monkeypatch.setitem(copyreg.dispatch_table, pa.Table, refuse)
    stats = run_extract(str(tmp_path / "in"), str(tmp_path / "out"), CrawlConfig())
    assert pickled == []
    links = pq.read_table(glob.glob(str(tmp_path / "out" / "links" / "*.parquet")))
    assert links.num_rows == stats["kept"] == 2 * sum(i % 5 + 1 for i in range(40))
    assert sorted(links.column("image_url").to_pylist()) == sorted(f"http://a.test/i{j}.jpg" for f in range(2) for i in range(40) for j in range(i % 5 + 1))
    assert stats["rejected"] == {"data_uri": 80}


def test_spill_batches_collapse_as_collapse_page_does(tmp_path, monkeypatch):
    """The spill collapses a batch of pages with one capture at once (`one_capture`: NumPy and
    Arrow over the batch, issue 34) where it sorted each repeated URL's rows in Python before:
    on 3,000 random pages (image URLs repeated within a page, every kind and an unknown one,
    positions with gaps as a WAT record's, empty and non-empty alts), spilled in batches of about
    100 rows, every kept row with its alt and every duplicate row is the one collapse_page gives."""
    import random

    import pyarrow as pa

    import crawl.extract as ex

    monkeypatch.setattr(ex, "SPILL_ROWS", 100)
    rng = random.Random(3)
    spill = ex._Spill(str(tmp_path / "s.arrow"))
    want_kept, want_dropped = set(), set()
    for p in range(3000):
        page = f"http://p{p % 700}.test/x?{p}"
        n = rng.randint(1, 12)
        positions = sorted(rng.sample(range(40), n)) if rng.random() < 0.3 else list(range(n))
        links = [(f"http://i.test/{rng.randint(0, 4)}.jpg", rng.choice(["", "", "a", "b c"]), pos, rng.choice(["img", "img", "picture", "wat", "og:image", "other"]), rng.choice([None, 5]), None) for pos in positions]
        spill.add(page, p, links)
        kept, rejected = ex.collapse_page(page, [("f", p, links)])
        want_kept |= {(page, r[2], r[3], r[4], r[5]) for r in kept}
        want_dropped |= {(page, r["url"], r["detail"], r["record_id"].rsplit(":", 1)[1]) for r in rejected}
    assert spill.close()
    table = pa.ipc.open_stream(pa.memory_map(str(tmp_path / "s.arrow"))).read_all().to_pylist()
    got_kept = {(r["page_url"], r["image_url"], r["kept_alt"] if r["kept_alt"] is not None else r["alt"], r["position"], r["kind"]) for r in table if r["kept"]}
    got_dropped = {(r["page_url"], r["image_url"], r["kind"], str(r["position"])) for r in table if not r["kept"]}
    assert got_kept == want_kept and got_dropped == want_dropped
    assert len(table) == len(want_kept) + len(want_dropped) and len(want_dropped) > 1000
    assert sum(r["kept_alt"] is not None for r in table) > 100  # borrowed alts were made


def test_base_prefixes_of_normal_bases_are_the_general_ones():
    """base_prefixes takes a normal base (the page's URL, most often) as it is (issue 34): the
    same prefixes, or None, as the general path (_PLAIN_ABSOLUTE, then _assemble) gives, with
    and without an allow list."""
    import crawl.urls as urls

    hosts = ["ex.com", "a-b_c.d", "127.0.0.1", "localhost", "10.1.2.3", "x.localhost", "h"]
    paths = ["/", "/a", "/a/", "/a/b.html", "/a//b/", "/a/./b", "/a/../b/", "/.", "/..", "/a/..", "/%41/b", "/a:b/c", "/~x/", "/a.b/c.d"]
    queries = ["", "?x=1", "?a/b/c", "?..", "?//"]
    for allow in (None, AllowList(), AllowList(["127.0.0.1", "localhost"])):
        for scheme in ("http", "https"):
            for host in hosts:
                for path in paths:
                    for query in queries:
                        base = f"{scheme}://{host}{path}{query}"
                        assert urls._NORMAL_ABSOLUTE.match(base), base
                        fast = urls.base_prefixes(base, allow)
                        m = urls._PLAIN_ABSOLUTE.match(base)
                        general = None
                        if not ("//" in m["path"] or ";" in m["path"] or urls._DOT_SEGMENT.search(m["path"])):
                            url, reason = urls._assemble(scheme, host, None, m["path"][: m["path"].rfind("/") + 1] + "a", "", allow)
                            general = None if reason else (url[:-1], url[: url.index("/", url.index("//") + 2)])
                        assert fast == general, (base, allow)
