"""`webpairs browse`: the DuckDB queries, the image routes, refusal of anything outside the run, and
the app itself in headless Chromium (Playwright driving the system Chromium, no download)."""

import http.client
import io
import json
import os
import shutil
import tarfile

import pytest
from PIL import Image

from browse.data import RunData
from browse.server import BrowseServer
from webpairs.synthetic import SHARD, make_run


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("browse") / "run")
    make_run(out, pairs=300, sites=3, pages_per_site=10, distinct_samples=8, rejects=30)
    return out


def _get(url: str, path: str) -> tuple[int, bytes]:
    """GET a raw path (sent as given: no client-side normalisation of `..`)."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    con = http.client.HTTPConnection(host, int(port), timeout=30)
    con.putrequest("GET", path, skip_host=False)
    con.endheaders()
    r = con.getresponse()
    return r.status, r.read()


def test_queries_pages_filters_and_images(synthetic_run):
    data = RunData(synthetic_run)
    try:
        assert data.summary()["pairs"] == 300 and data.summary()["sites"] == 3
        sites = data.sites()["rows"]
        assert sorted(s["site"] for s in sites) == ["site00000.com", "site00001.com", "site00002.com"]
        assert sum(s["pairs"] for s in sites) == 300
        for s in sites:  # the site filter counts what the site table says
            assert data.pairs(site=s["site"])["total"] == s["pairs"]
            assert {r["site"] for r in data.pairs(site=s["site"], limit=200)["rows"]} == {s["site"]}
        # the random order is one shuffle: pages never overlap and together hold every pair once
        keys = [r["key"] for off in range(0, 300, 24) for r in data.pairs(offset=off)["rows"]]
        assert len(keys) == 300 and len(set(keys)) == 300 and keys != sorted(keys)
        band = data.pairs(smin=0.4, smax=0.5, order="-similarity", limit=200)
        sims = [r["similarity"] for r in band["rows"]]
        assert band["total"] == len(sims) > 0 and all(0.4 <= v <= 0.5 for v in sims) and sims == sorted(sims, reverse=True)
        page = band["rows"][0]["page_url"]
        assert {r["page_url"] for r in data.pairs(page=page, limit=200)["rows"]} == {page}
        assert band["rows"][0]["cond_alt"].startswith("photo ")  # alt texts come from pair's rows
        # an image is the tar member of that sample, read by the index's byte range
        key = keys[0]
        members = {}
        with tarfile.open(os.path.join(synthetic_run, "shards", SHARD)) as tar:
            for m in tar:
                members[m.name] = tar.extractfile(m).read()
        body = data.pair_image(key, "target")
        assert body.startswith(b"\xff\xd8") and Image.open(io.BytesIO(body)).size == (64, 64)
        for k in keys:  # every pair's own members: index row i points at sample i % 8 of the tar
            for side in ("cond", "target"):
                assert data.pair_image(k, side) == members[f"sample{int(k, 16) % 8:06d}.{side}.jpg"], (k, side)
        assert data.pair_image("no-such-key", "cond") is None and data.pair_image(key, "json") is None
        assert [(r["stage"], r["reason"], r["n"]) for r in data.reasons()] == [("pair", "boilerplate_site", 10), ("pair", "near_duplicate", 10), ("pair", "no_pair_in_band", 10)]
        assert data.rejects("pair", "near_duplicate")["total"] == 10
    finally:
        data.close()


def test_pairs_filter_by_nsfw_score(synthetic_run):
    """The nsfw filter (issue 32): a pair's score is the higher of its two images' (the index's
    cond_nsfw, target_nsfw, read back here with pyarrow); nmin/nmax select exactly those pairs."""
    import pyarrow.parquet as pq

    index = pq.read_table(os.path.join(synthetic_run, "shards", "index")).to_pylist()
    score = {r["key"]: max(r["cond_nsfw"], r["target_nsfw"]) for r in index}
    data = RunData(synthetic_run)
    try:
        for nmin, nmax in ((0.9, None), (None, 0.5), (0.3, 0.6)):
            want = {k for k, v in score.items() if (nmin is None or v >= nmin) and (nmax is None or v <= nmax)}
            got = data.pairs(nmin=nmin, nmax=nmax, limit=200, order="-nsfw")
            rows = got["rows"] + [r for off in range(200, got["total"], 200) for r in data.pairs(nmin=nmin, nmax=nmax, limit=200, offset=off, order="-nsfw")["rows"]]
            assert 0 < got["total"] == len(want) < len(score) and {r["key"] for r in rows} == want, (nmin, nmax)
            assert all(r["nsfw"] == pytest.approx(score[r["key"]]) for r in rows)
            assert [r["nsfw"] for r in rows] == sorted((r["nsfw"] for r in rows), reverse=True)
    finally:
        data.close()
    with BrowseServer(synthetic_run, port=0) as server:  # the app's query string
        status, body = _get(server.url, "/api/pairs?nmin=0.9&limit=200")
        assert status == 200 and json.loads(body)["total"] == sum(v >= 0.9 for v in score.values())
        status, body = _get(server.url, "/api/pairs?nmax=abc")
        assert status == 400


def test_server_serves_nothing_outside_the_run(synthetic_run):
    with BrowseServer(synthetic_run, port=0) as server:
        status, body = _get(server.url, "/api/pairs?limit=2")
        assert status == 200 and json.loads(body)["total"] == 300
        key = json.loads(body)["rows"][0]["key"]
        status, body = _get(server.url, f"/image/pair/{key}/cond")
        assert status == 200 and body.startswith(b"\xff\xd8")
        secret = open(os.path.join(synthetic_run, "shards", "manifest.json"), "rb").read()
        for path in ("/../../../../etc/passwd", "/..%2f..%2f..%2fetc%2fpasswd", "/image/pair/..%2F..%2Fshards%2Fmanifest.json/cond", "/image/pair/../../shards/manifest.json", f"/image/pair/{key}/..%2F..%2Fmanifest.json", "/image/reject/../../../etc/passwd", "/api/..%2F..%2Fmanifest.json", "/shards/manifest.json", "/app.html", "/browse/server.py", f"/{SHARD}"):
            status, body = _get(server.url, path)
            assert status == 404, path
            assert b"root:" not in body and secret not in body and b"<html" not in body.lower()
        status, body = _get(server.url, "/api/pairs?smin=abc")
        assert status == 400 and json.loads(body)["error"] == "not a number: 'abc'"
        status, body = _get(server.url, "/api/pairs?order=evil;drop")
        assert status == 400 and "order must be one of" in json.loads(body)["error"]


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (.ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    return chromium, sync_api


def _wait_render(page, before: int) -> None:
    page.wait_for_function(f"+document.body.dataset.renders > {before}", timeout=30_000)


def test_browse_in_chromium(synthetic_run, pipeline_dirs):
    chromium, sync_api = _browser()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            with BrowseServer(synthetic_run, port=0) as server:
                page.goto(server.url)
                _wait_render(page, 0)
                assert page.inner_text("#summary").startswith("300 pairs on 30 pages of 3 sites")
                assert page.locator(".pair").count() == 24 and page.inner_text("#pager") == "1-24 of 300"
                first = page.locator(".pair").evaluate_all("els => els.map(e => e.dataset.key)")
                page.wait_for_function("[...document.querySelectorAll('.pair img')].every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
                # next page: other pairs
                n = int(page.evaluate("document.body.dataset.renders"))
                page.click("#next")
                _wait_render(page, n)
                assert page.inner_text("#pager") == "25-48 of 300"
                second = page.locator(".pair").evaluate_all("els => els.map(e => e.dataset.key)")
                assert len(second) == 24 and not set(first) & set(second)
                # filter by a site: only that site's pairs, as many as the site table says
                n = int(page.evaluate("document.body.dataset.renders"))
                page.select_option("#site", "site00001.com")
                _wait_render(page, n)
                data = RunData(synthetic_run)
                expected = next(s["pairs"] for s in data.sites()["rows"] if s["site"] == "site00001.com")
                data.close()
                assert page.inner_text("#pager") == f"1-24 of {expected}"
                assert set(page.locator(".pair").evaluate_all("els => els.map(e => e.dataset.site)")) == {"site00001.com"}
                # the per-site table
                n = int(page.evaluate("document.body.dataset.renders"))
                page.click("button[data-tab=sites]")
                _wait_render(page, n)
                assert page.locator("#sites tr").count() == 4
            # the rejects of the test web's pipeline: the logo the URL rule removed, shown as its image
            with BrowseServer(os.path.dirname(pipeline_dirs["shards"]), port=0) as server:
                page.goto(server.url)
                _wait_render(page, 0)
                n = int(page.evaluate("document.body.dataset.renders"))
                page.click("button[data-tab=rejects]")
                _wait_render(page, n)
                n = int(page.evaluate("document.body.dataset.renders"))
                page.click("button.reason[data-stage=download][data-reason=boilerplate_url_global]")
                _wait_render(page, n)
                assert "/static/logo.png" in page.inner_text("#rejects")
                assert page.inner_text("#rpager").endswith("of 12")
                page.wait_for_function("[...document.querySelectorAll('#rejects img')].length > 0 && [...document.querySelectorAll('#rejects img')].every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
            assert not errors and not page.inner_text("#message")
        finally:
            browser.close()
