"""Site-aware boilerplate: one test per rule, the held-out 12-page case and the multi-site web."""

from __future__ import annotations

import dataclasses
import io
import os

from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageDraw

from core.config import CrawlConfig, DownloadConfig, FilterConfig, PairConfig
from core.sites import site_of
from filter.signals import declared_too_small, top_colour_share, url_words
from pairing.boilerplate import BOILERPLATE_GLOBAL, BOILERPLATE_SITE, FlagBoilerplate, boilerplate_reason, flag_entry, flag_key, site_threshold


def test_site_is_the_registered_domain():
    assert site_of("http://www.example.co.uk/a") == site_of("https://shop.example.co.uk/b") == "example.co.uk"
    assert site_of("http://alice.github.io/x") == "alice.github.io" != site_of("http://bob.github.io/x")  # private suffixes
    assert site_of("http://127.0.0.1:8080/page") == "127.0.0.1" and site_of("http://LocalHost/") == "localhost"
    assert site_of("not a url") == "" and site_of("http://[bad/") == ""


def test_declared_size_rule():
    assert declared_too_small(32, 32, 64) == "declared width 32, height 32 < 64"
    assert declared_too_small(None, 40, 64) == "declared height 40 < 64"
    assert declared_too_small(None, None, 64) is None and declared_too_small(640, 480, 64) is None
    assert declared_too_small(0, 0, 64) is None  # width="0" is a tracking pixel's markup, not a size to trust


def test_flat_image_rule_separates_logos_from_real_photos(photos_dir):
    logo = Image.new("RGB", (300, 120), (20, 60, 160))
    ImageDraw.Draw(logo).ellipse((20, 10, 120, 110), fill=(250, 200, 0))
    ImageDraw.Draw(logo).text((140, 50), "EXAMPLE", fill=(255, 255, 255))
    assert top_colour_share(logo, 8) > 0.95
    assert top_colour_share(logo.resize((150, 60), Image.LANCZOS), 8) >= 0.8  # resampled edges add colours
    worst = max(top_colour_share(Image.open(os.path.join(photos_dir, n)), 8) for n in sorted(os.listdir(photos_dir)))
    assert worst < FilterConfig().flat_share  # no real photo of the 300 would be rejected


def test_url_word_rule():
    words = FilterConfig().url_words
    assert url_words("http://x.org/img/siteLogo.png", words) == ["logo"]
    assert url_words("http://x.org/static/icons/rss.gif", words) == ["icon"]
    assert url_words("http://x.org/favicon.ico", words) == ["favicon"]
    assert url_words("http://logo.example/lexicon/photo.jpg", words) == []  # the host and longer words do not count


def _occ(site_pages: dict[str, list[tuple[str, str, str]]]) -> list[dict]:
    """Occurrence rows from {page_url: [(image_url, phash), ...]}."""
    return [{"page_url": page, "site": site_of(page), "image_url": url, "phash": phash} for page, imgs in site_pages.items() for url, phash in imgs]


def test_site_and_global_rules_in_a_pipeline(tmp_path):
    """Site a.com (6 pages): a logo in two sizes (pHashes 2 bits apart) on 3 + 2 pages -> the
    content is on 5 of 6 pages; a photo on 2 pages stays content. Site b.com (2 pages): an image on
    both pages is under site_min_pages. A banner on 11 pages of 11 sites is global boilerplate."""
    logo, logo_small, photo = "f0f0f0f0f0f0f0f0", "f0f0f0f0f0f0f0f3", "0123456789abcdef"
    from core.records import stable_id

    pages = {f"http://www.a.com/{i}": [(f"http://cdn/p{i}.jpg", stable_id(f"photo {i}"))] for i in range(6)}  # far-apart pHashes
    for i in range(3):
        pages[f"http://www.a.com/{i}"].append(("http://cdn/a-logo.png", logo))
    for i in (3, 4):
        pages[f"http://www.a.com/{i}"].append(("http://cdn/a-logo-small.png", logo_small))
    for i in (0, 5):
        pages[f"http://www.a.com/{i}"].append(("http://cdn/a-feature.jpg", photo))
    for i in range(2):
        pages[f"http://b.com/{i}"] = [("http://cdn/b-shared.jpg", "aaaa5555aaaa5555")]
    for i in range(11):
        pages.setdefault(f"http://s{i}.org/", []).append(("http://ads/banner.jpg", "3c3c3c3c3c3c3c3c"))
    import apache_beam as beam

    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:  # (imported by module: pytest would collect the class)
        flags = p | beam.Create(_occ(pages)) | FlagBoilerplate(PairConfig(), spill_dir=str(tmp_path))
        assert_that(flags, equal_to([
            {"scope": "a.com", "kind": "content", "key": logo, "pages": 5, "site_pages": 6},
            {"scope": "a.com", "kind": "content", "key": logo_small, "pages": 5, "site_pages": 6},
            {"scope": "a.com", "kind": "url", "key": "http://cdn/a-logo.png", "pages": 3, "site_pages": 6},
            {"scope": "*", "kind": "content", "key": "3c3c3c3c3c3c3c3c", "pages": 11, "site_pages": 0},
            {"scope": "*", "kind": "url", "key": "http://ads/banner.jpg", "pages": 11, "site_pages": 0},
        ]))


def test_flags_equal_their_definition_on_close_hashes_across_sites(tmp_path):
    """The flags of FlagBoilerplate (one LSH banding for both scopes) are exactly the rules'
    definition computed by brute force over every pair of occurrences: 600 occurrences on 5
    sites, pHashes in clusters of variants 0-6 bits from a few bases (so close pairs span sites,
    sit within a site, and chain), repeated URLs, unhashed links; the crawl-wide counts capped at
    K + 1 as the stage reports them."""
    import random

    from core.records import phash_distance

    rng = random.Random(7)
    cfg = dataclasses.replace(PairConfig(), boilerplate_pages=6, site_share=0.2, site_min_pages=2)
    d, k = cfg.boilerplate_phash_distance, cfg.boilerplate_pages
    bases = [rng.getrandbits(64) for _ in range(6)]
    rows = []
    for n in range(600):
        site = f"s{rng.randrange(5)}.org"
        page = f"http://www.{site}/{rng.randrange(12)}"
        h = rng.choice(bases)
        for bit in rng.sample(range(64), rng.choice([0, 0, 1, 2, 3, 4, 5, 6])):
            h ^= 1 << bit
        phash = None if n % 37 == 0 else (f"{h:016x}" if rng.random() < 0.7 else f"{rng.getrandbits(64):016x}")
        rows.append({"page_url": page, "site": site_of(page), "image_url": f"http://cdn/{rng.randrange(40)}.jpg", "phash": phash})
    expected = []
    sites = sorted({r["site"] for r in rows})
    site_pages = {s: len({r["page_url"] for r in rows if r["site"] == s}) for s in sites}
    for kind, field, close in (("content", "phash", lambda a, b: phash_distance(a, b) <= d), ("url", "image_url", lambda a, b: a == b)):
        keyed = [r for r in rows if r[field] is not None]
        for key in sorted({r[field] for r in keyed}):
            pages = {r["page_url"] for r in keyed if close(key, r[field])}
            if len(pages) > k:
                expected.append({"scope": "*", "kind": kind, "key": key, "pages": min(len(pages), k + 1), "site_pages": 0})
            for s in sites:
                if not any(r["site"] == s and r[field] == key for r in keyed):
                    continue
                pages = {r["page_url"] for r in keyed if r["site"] == s and close(key, r[field])}
                if len(pages) >= cfg.site_min_pages and len(pages) >= site_threshold(site_pages[s], cfg):
                    expected.append({"scope": s, "kind": kind, "key": key, "pages": len(pages), "site_pages": site_pages[s]})
    assert sum(e["kind"] == "content" and e["scope"] == "*" for e in expected) > 5 and sum(e["kind"] == "content" and e["scope"] != "*" for e in expected) > 5
    import apache_beam as beam

    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        flags = p | beam.Create(rows) | FlagBoilerplate(cfg, spill_dir=str(tmp_path))
        assert_that(flags, equal_to(expected))


def test_thresholds_and_reason_precedence():
    cfg = PairConfig()
    assert [site_threshold(n, cfg) for n in (2, 3, 6, 7, 100)] == [3, 3, 3, 4, 50]
    flags = dict(flag_entry({"scope": s, "kind": k, "key": key, "pages": n}) for (s, k, key), n in {("a.com", "content", "ff"): 5, ("*", "content", "ff"): 11, ("*", "url", "http://u"): 11}.items())
    assert boilerplate_reason("a.com", "ff", "http://v", flags, cfg)[0] == BOILERPLATE_SITE  # the site rule names it first
    assert boilerplate_reason("b.com", "ff", "http://v", flags, cfg)[0] == BOILERPLATE_GLOBAL
    assert boilerplate_reason("b.com", "00", "http://u", flags, cfg)[0] == BOILERPLATE_GLOBAL
    assert boilerplate_reason("b.com", "00", "http://v", flags, cfg) is None


def _photo_logo(photos_dir: str, size) -> bytes:
    """A logo that is not flat (a photo with a band of text): only repetition can tell it."""
    img = Image.open(os.path.join(photos_dir, sorted(os.listdir(photos_dir))[299])).convert("RGB").resize((375, 150))
    ImageDraw.Draw(img).rectangle((0, 110, 375, 150), fill=(10, 10, 10))
    ImageDraw.Draw(img).text((10, 120), "EXAMPLE NEWS", fill=(255, 255, 255))
    buf = io.BytesIO()
    img.resize(size, Image.LANCZOS).save(buf, "PNG")
    return buf.getvalue()


def test_logo_in_two_sizes_on_twelve_pages_is_in_no_pair(tmp_path, photos_dir):
    """The held-out case: one site, 12 pages, its logo (drawn on a photo: not flat) as logo.png on 8
    pages and as logo_mid.png (250x100, large enough for filter) on the other 4. Download's URL
    rule catches logo.png (8 of 12 pages) before any fetch of its links; logo_mid.png's URL is on
    only 4, so only pair's content rule can see it, counting both sizes on all 12 pages: it needs
    logo.png fetched once as evidence (`boilerplate_evidence`, on by default)."""
    from crawl.download import run_download
    from crawl.extract import run_extract
    from filter.pipeline import run_filter
    from pairing.pipeline import run_pair
    from core.stageio import read_table
    from webpairs.testweb import Route, _jpeg, serve_routes, write_warc

    names = sorted(os.listdir(photos_dir))
    routes = {"/logo.png": Route(body=_photo_logo(photos_dir, (375, 150)), content_type="image/png"), "/logo_mid.png": Route(body=_photo_logo(photos_dir, (250, 100)), content_type="image/png")}
    layout = {}
    for p in range(12):
        imgs = ["/logo.png" if p < 8 else "/logo_mid.png"]
        for k in range(3):  # three dog photos per page (classes 151-268: related, not the same)
            path = f"/photos/{p}_{k}.jpg"
            routes[path] = Route(body=_jpeg(Image.open(os.path.join(photos_dir, names[151 + p * 3 + k]))))
            imgs.append(path)
        layout[f"http://www.example-news.com/story/{p}.html"] = imgs
    with serve_routes(routes) as base:
        html = {url: "<html><body>" + "".join(f'<img src="{base}{src}" alt="x">' for src in imgs) + "</body></html>" for url, imgs in layout.items()}
        write_warc(str(tmp_path / "web.warc.gz"), html)
        run_extract(str(tmp_path / "web.warc.gz"), str(tmp_path / "links"), CrawlConfig(allow_hosts=("127.0.0.1",)))

        def run(name: str, download: DownloadConfig, pair: PairConfig):
            d = {k: str(tmp_path / name / k) for k in ("download", "filter", "pair")}
            run_download(str(tmp_path / "links"), d["download"], download)
            run_filter(d["download"], d["filter"], FilterConfig(encoder="efficientnet-lite0"))
            run_pair(d["filter"], d["pair"], pair)
            pairs = read_table(d["pair"], "pairs").to_pandas()
            with_logo = int((pairs.cond_url.isin(logo_urls) | pairs.target_url.isin(logo_urls)).sum())
            rejected = {stage: read_table(d[stage], "rejected").to_pandas() for stage in d}
            return with_logo, len(pairs), rejected

        logo_urls = {base + "/logo.png", base + "/logo_mid.png"}
        dl = DownloadConfig(allow_hosts=("127.0.0.1",), processes=1)
        # with no repetition rule at either stage the logo is paired: the checks below are not vacuous
        with_logo, total, _ = run("no_rules", dataclasses.replace(dl, url_boilerplate=False), PairConfig(site_min_pages=13, boilerplate_pages=100))
        assert with_logo > 0 and total > with_logo
        # defaults: logo.png's 8 links never fetched for pairing; logo_mid.png caught by content
        with_logo, total, rejected = run("defaults", dl, PairConfig())
        assert with_logo == 0 and total > 0
        at_download = rejected["download"][rejected["download"].url.isin(logo_urls)]
        assert len(at_download) == 8 and set(at_download.reason) == {"boilerplate_url_site"} and set(at_download.url) == {base + "/logo.png"}
        assert "image URL on 8 of the 12 pages of example-news.com" in at_download.detail.iloc[0]
        at_pair = rejected["pair"][rejected["pair"].url.isin(logo_urls)]
        assert len(at_pair) == 4 and set(at_pair.reason) == {"boilerplate_site"}
        assert "on 12 of the pages of example-news.com" in at_pair.detail.iloc[0]
        # without the evidence fetch the content rule sees logo_mid.png on only 4 pages: it is paired
        with_logo, _, _ = run("no_evidence", dataclasses.replace(dl, boilerplate_evidence=False), PairConfig())
        assert with_logo > 0


def test_multisite_web_ground_truth(tmp_path):
    """The multi-site web (8 sites, procedural photos) at default settings: every icon and ad and
    every logo that a rule can see is removed, no photo is, and the only misses are JPEG logos on
    sites with fewer pages than site_min_pages (indistinguishable from a photo shown twice)."""
    from crawl.download import run_download
    from crawl.extract import run_extract
    from filter.pipeline import run_filter
    from pairing.pipeline import run_pair
    from core.stageio import read_stats, read_table
    from webpairs.multisite import score_boilerplate, serve_multisite_web

    with serve_multisite_web(str(tmp_path), n_sites=8, seed=0) as web:
        d = {k: str(tmp_path / k) for k in ("links", "download", "filter", "pair")}
        run_extract(web.warc_path, d["links"], CrawlConfig(allow_hosts=("127.0.0.1",)))
        run_download(d["links"], d["download"], DownloadConfig(allow_hosts=("127.0.0.1",), processes=1))
    run_filter(d["download"], d["filter"], FilterConfig(encoder="tiny-clip"))
    run_pair(d["filter"], d["pair"], PairConfig())
    score = score_boilerplate(web, d)
    assert score["content_removed"] == [] and score["precision"] == 1.0
    pages_of_site = {}
    for page, site in web.pages.items():
        pages_of_site[site] = pages_of_site.get(site, 0) + 1
    site_of_url = {url: web.pages[page] for page, url in web.occurrences}
    for url in score["missed"]:
        assert web.kinds[url] == "logo" and url.endswith(".jpg") and pages_of_site[site_of_url[url]] < PairConfig().site_min_pages, url
    assert score["boilerplate_occurrences"] > 100 and score["pairs"] > 0
    kinds_in_pairs = {web.kinds[u] for u in score["missed"]}
    assert kinds_in_pairs <= {"logo"}
    # its photos are all distinct pictures (procedural, same-topic ones alike): the copy step finds
    # none, and the pairs are those of a run without it
    stats = read_stats(d["pair"])
    assert stats["copy_images_removed"] == 0 and stats["copy_candidates"] > 0 and stats["copy_stand_ins"] == 0
    run_pair(d["filter"], str(tmp_path / "pair_no_copies"), PairConfig(copies=False))

    def pair_rows(path: str) -> list:
        return sorted((r["page_url"], r["cond_image_id"], r["target_image_id"]) for r in read_table(path, "pairs", ["page_url", "cond_image_id", "target_image_id"]).to_pylist())

    assert pair_rows(d["pair"]) == pair_rows(str(tmp_path / "pair_no_copies"))


def test_the_join_finds_every_flag_by_its_digest_in_half_the_memory():
    """The join's side input is (flag_key digest, pages) a flag (`flag_entry`), not ((scope, kind,
    key), pages): boilerplate_reason finds every one of 6,000 flags (sites, the crawl-wide scope,
    pHashes and URLs, non-ASCII and lone surrogates) with its page count, and none of their near
    misses (another site, kind or key; a key that is another's scope and key run together). As the
    worker holds it (a list unpickled from the runner), it takes less than 0.6 of the tuples (at one
    Common Crawl file 39,475 flags: ~8.5 MB a worker through the join phase; issue 34)."""
    import pickle
    import random
    import tracemalloc

    cfg = PairConfig()
    rng = random.Random(5)
    sites = [f"site{i:04d}.example.org" for i in range(300)] + ["bücher.de", "x\udcff.com"]
    rows = []
    for i in range(6000):
        scope, kind = rng.choice(sites + ["*"] * 20), rng.choice(["content", "url"])
        key = f"{rng.getrandbits(64):016x}" if kind == "content" else f"http://127.0.0.1:8000/{scope}/img/{i}_é_400x300.jpg"
        rows.append({"scope": scope, "kind": kind, "key": key, "pages": rng.randint(3, 300)})
    rows = list({(r["scope"], r["kind"], r["key"]): r for r in rows}.values())
    flags = dict(flag_entry(r) for r in rows)
    assert len(flags) == len(rows)
    for r in rows:
        phash, url = (r["key"], "http://other/") if r["kind"] == "content" else ("0" * 16, r["key"])
        site = r["scope"] if r["scope"] != "*" else "elsewhere.com"
        reason = boilerplate_reason(site, phash, url, flags, cfg)
        assert reason is not None and f" on {r['pages']} " in reason[1], (r, reason)
        assert reason[0] == (BOILERPLATE_GLOBAL if r["scope"] == "*" else BOILERPLATE_SITE)
        if r["scope"] != "*" and ("*", r["kind"], r["key"]) not in {(x["scope"], x["kind"], x["key"]) for x in rows if x["scope"] == "*"}:
            assert boilerplate_reason("another.net", phash, url, flags, cfg) is None  # another site
        assert flags.get(flag_key(r["scope"], "url" if r["kind"] == "content" else "content", r["key"])) is None  # another kind
        assert flags.get(flag_key(r["scope"] + r["kind"][:1], r["kind"][1:], r["key"])) is None  # the parts run together
    sizes = {}
    for name, listed in (("digests", [flag_entry(r) for r in rows]), ("tuples", [((r["scope"], r["kind"], r["key"]), r["pages"]) for r in rows])):
        data = pickle.dumps(listed, protocol=pickle.HIGHEST_PROTOCOL)
        tracemalloc.start()
        try:
            held = pickle.loads(data)
            sizes[name] = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        del held
    assert sizes["digests"] < 0.6 * sizes["tuples"], sizes


def test_a_flag_with_no_key_is_found_as_before():
    """A flag whose key or scope is None (an image URL the schema allows to be null) is looked up
    as the tuple-keyed dict found it, and is not another flag's: None has its own encoding in
    flag_key (found in review: it raised AttributeError)."""
    cfg = PairConfig()
    flags = dict(flag_entry(r) for r in ({"scope": "a.com", "kind": "url", "key": None, "pages": 4}, {"scope": "*", "kind": "url", "key": "", "pages": 12}))
    assert boilerplate_reason("a.com", "00", None, flags, cfg)[0] == BOILERPLATE_SITE
    assert boilerplate_reason("b.com", "00", None, flags, cfg) is None
    assert boilerplate_reason("b.com", "00", "", flags, cfg)[0] == BOILERPLATE_GLOBAL
    assert len({flag_key(None, "url", "x"), flag_key("", "url", "x"), flag_key("a.com", "url", None), flag_key("a.com", "url", "")}) == 4
