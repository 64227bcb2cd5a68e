"""The download plan (crawl/plan.py): which links are fetched, each rule its own reason, each
distinct URL once, img2dataset's input in shards (no server needed: the plan runs before a fetch)."""

import dataclasses
import glob
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import ConfigError, DownloadConfig, load
from core.records import LinkRecord
from crawl import plan
from crawl.urls import AllowList

CDN = "http://127.0.0.1:9/"


def _links(tmp_path, rows: list[LinkRecord]) -> list[str]:
    os.makedirs(tmp_path, exist_ok=True)
    path = tmp_path / "links.parquet"
    from core.records import LINK_SCHEMA, rows_to_table

    pq.write_table(rows_to_table([r.to_row() for r in rows], LINK_SCHEMA), path)
    return [str(path)]


def _plan(tmp_path, rows, **cfg):
    cfg = DownloadConfig(allow_hosts=("127.0.0.1",), **cfg)
    files = _links(tmp_path, rows)
    out = tmp_path / "plan"
    n = plan.check_links(files, str(out / "links"), AllowList(cfg.allow_hosts), cfg)
    con = plan.connect(str(out / "spill"), cfg.plan_memory)
    counts = plan.make_plan(con, str(out / "links"), str(out), cfg)
    con.close()
    table = pq.read_table(out / "plan.parquet").to_pandas()
    urls = [u for f in sorted(glob.glob(str(out / "urls" / "*.parquet"))) for u in pq.read_table(f).column(0).to_pylist()]
    assert n == len(rows) == len(table) == counts["links"]
    return {(r.page_url, r.image_url): r.reason for r in table.itertuples()}, urls, counts, out


def _web() -> list[LinkRecord]:
    rows = []
    # site a.com: 4 pages; its logo on all 4 (site rule), a photo shared by 2 pages (content)
    for p in range(4):
        page = f"http://www.a.com/{p}"
        rows += [
            LinkRecord(page, CDN + "a/logo.png", position=0),
            LinkRecord(page, CDN + f"a/photo{p}.jpg", position=1, width=400, height=300),
            LinkRecord(page, CDN + f"a/more{p}.jpg", position=2),
            LinkRecord(page, CDN + "a/icon.svg", position=3),  # non-raster
            LinkRecord(page, CDN + f"a/thumb{p}.jpg", position=4, width=40, height=40),  # declared small
        ]
    rows.append(LinkRecord("http://www.a.com/0", CDN + "a/shared.jpg", position=5))
    rows.append(LinkRecord("http://www.a.com/1", CDN + "a/shared.jpg", position=5))
    # an ad on 11 pages of 11 one-page sites: the global rule (more than 10 pages)
    for s in range(11):
        page = f"http://site{s}.org/index.html"
        rows += [LinkRecord(page, CDN + "ads/ad.jpg", position=0), LinkRecord(page, CDN + f"s{s}/a.jpg", position=1), LinkRecord(page, CDN + f"s{s}/b.jpg", position=2)]
    # a page with one photo left once its tiny icon is dropped: cannot make a pair
    rows += [LinkRecord("http://lonely.net/", CDN + "lonely/photo.jpg", position=0), LinkRecord("http://lonely.net/", CDN + "lonely/dot.gif", position=1, width=1, height=1)]
    # a page with 6 photos (the cap in the test is 4: positions 0-3 are kept)
    rows += [LinkRecord("http://big.net/", CDN + f"big/{k}.jpg", position=k) for k in (5, 3, 1, 0, 2, 4)]
    rows.append(LinkRecord("http://www.a.com/3", "http://169.254.169.254/latest/x.jpg", position=9))  # URL policy
    return rows


def test_each_rule_is_its_own_reason_and_each_url_is_fetched_once(tmp_path):
    reasons, urls, counts, _ = _plan(tmp_path, _web(), max_links_per_page=4)
    got = lambda page, url: reasons[(page, url)]  # noqa: E731
    assert {got(f"http://www.a.com/{p}", CDN + "a/logo.png") for p in range(4)} == {"boilerplate_url_site"}
    assert {got(f"http://www.a.com/{p}", CDN + "a/icon.svg") for p in range(4)} == {"not_raster"}
    assert {got(f"http://www.a.com/{p}", CDN + f"a/thumb{p}.jpg") for p in range(4)} == {"declared_too_small"}
    assert {got(f"http://www.a.com/{p}", CDN + f"a/photo{p}.jpg") for p in range(4)} == {None}
    assert got("http://www.a.com/0", CDN + "a/shared.jpg") is None  # 2 of 4 pages: under site_min_pages
    assert {got(f"http://site{s}.org/index.html", CDN + "ads/ad.jpg") for s in range(11)} == {"boilerplate_url_global"}
    assert got("http://lonely.net/", CDN + "lonely/photo.jpg") == "page_too_few_links"
    assert got("http://lonely.net/", CDN + "lonely/dot.gif") == "declared_too_small"
    assert [got("http://big.net/", CDN + f"big/{k}.jpg") for k in range(6)] == [None] * 4 + ["page_cap"] * 2  # by position
    assert got("http://www.a.com/3", "http://169.254.169.254/latest/x.jpg") == "private_address"
    # img2dataset gets each selected URL once, sorted; flagged URLs once each as evidence
    selected = sorted({url for (_, url), r in reasons.items() if r is None})
    assert urls == sorted(selected + [CDN + "a/logo.png", CDN + "ads/ad.jpg"]) and len(urls) == len(set(urls))
    assert counts["urls_selected"] == len(selected) and counts["urls_evidence"] == 2
    assert sum(counts["plan_reasons"].values()) + counts["links_selected"] == counts["links"]


def test_rules_can_be_turned_off_one_by_one(tmp_path):
    off = dict(min_side=0, skip_extensions=(), url_boilerplate=False, max_links_per_page=0, min_links_per_page=0, allow_hosts=("127.0.0.1",))
    reasons, urls, counts, _ = _plan(tmp_path / "off", _web(), **{k: v for k, v in off.items() if k != "allow_hosts"})
    assert set(reasons.values()) == {None, "private_address"}  # only the URL policy is left
    assert counts["urls_evidence"] == 0
    reasons, urls, _, _ = _plan(tmp_path / "noev", _web(), boilerplate_evidence=False)
    assert CDN + "a/logo.png" not in urls and CDN + "ads/ad.jpg" not in urls  # never fetched at all


def test_plan_is_deterministic_and_shards_follow_samples_per_shard(tmp_path):
    first = _plan(tmp_path / "1", _web(), samples_per_shard=7)
    rows = _web()
    second = _plan(tmp_path / "2", rows[::-1], samples_per_shard=7)  # input order does not matter
    assert first[0] == second[0] and first[1] == second[1]
    sizes = [pq.read_metadata(f).num_rows for f in sorted(glob.glob(str(first[3] / "urls" / "*.parquet")))]
    assert len(sizes) > 1 and all(s == 7 for s in sizes[:-1]) and 0 < sizes[-1] <= 7


def test_write_query_streams_into_files_of_n_rows(tmp_path):
    con = plan.connect(str(tmp_path / "spill"), "64MB")
    schema = pa.schema([("x", pa.int32())])
    n = plan.write_query(con, "SELECT range::INTEGER AS x FROM range(250000)", str(tmp_path / "part"), schema, rows_per_file=100_000)
    files = sorted(glob.glob(str(tmp_path / "part-*.parquet")))
    assert n == 250_000 and [pq.read_metadata(f).num_rows for f in files] == [100_000, 100_000, 50_000]
    assert pq.read_schema(files[0]).field("x").type == pa.int32()
    empty = plan.write_query(con, "SELECT 1::INTEGER AS x WHERE false", str(tmp_path / "empty.parquet"), schema)
    assert empty == 0 and pq.read_metadata(tmp_path / "empty.parquet").num_rows == 0


def test_plan_settings_are_checked(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("site_share: 1.5\n")
    with pytest.raises(ConfigError, match="site_share"):
        load(DownloadConfig, str(bad))
    assert dataclasses.replace(DownloadConfig(), min_side=0).min_side == 0


def test_page_rule_reasons_and_details_on_every_row(tmp_path):
    """The page rule (cap, too few) recomputed in Python for every row of the plan: a page's
    candidates are the links the rule saw (selected, capped or too few), ranked by position then
    link id; its reason and detail follow from their number and rank (issue 34 computes the rule
    only for the links it rejects, with the window only over pages past the cap)."""
    for cap, least in ((4, 2), (2, 3), (0, 2)):
        _, _, _, out = _plan(tmp_path / f"{cap}-{least}", _web(), max_links_per_page=cap, min_links_per_page=least)
        rows = pq.read_table(out / "plan.parquet").to_pylist()
        pages: dict = {}
        for r in rows:
            if r["reason"] in (None, plan.PAGE_CAP, plan.PAGE_TOO_FEW_LINKS):
                pages.setdefault(r["page_url"], []).append(r)
        limit = cap or 2**31 - 1
        checked = 0
        for links in pages.values():
            n = len(links)
            for rank, r in enumerate(sorted(links, key=lambda r: (r["position"], r["link_id"])), 1):
                if min(n, limit) < least:
                    want = (plan.PAGE_TOO_FEW_LINKS, f"{n} candidate link(s) left on the page (< {least})")
                elif rank > limit:
                    want = (plan.PAGE_CAP, f"link {rank} of {n} on the page (cap {limit})")
                else:
                    want = (None, None)
                assert (r["reason"], r["detail"]) == want, (cap, least, r)
                checked += 1
        assert checked and (cap != 4 or any(r["reason"] == plan.PAGE_CAP for r in rows))


def test_plan_threads_follow_its_memory_limit(tmp_path):
    """DuckDB gets one thread per 64 MB of plan_memory (at least one, at most one per core)."""
    assert plan.memory_bytes("64MB") == 64 * 10**6 and plan.memory_bytes("1.5 GiB") == 3 * 2**29
    with pytest.raises(ValueError):
        plan.memory_bytes("lots")
    for memory, want in (("16MB", 1), ("64MB", 1), ("128MB", 2), ("1GB", 15)):
        con = plan.connect(str(tmp_path / memory), memory)
        assert con.execute("SELECT current_setting('threads')").fetchone()[0] == min(want, len(os.sched_getaffinity(0))), memory
        con.close()
    assert DownloadConfig().plan_memory == "64MB"


def test_plan_threads_count_the_cores_this_process_may_use(tmp_path):
    """Pinned to one core (taskset, a container's cpuset), 1GB of plan_memory runs one DuckDB
    thread, not one per core of the machine."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        con = plan.connect(str(tmp_path / "pinned"), "1GB")
        assert con.execute("SELECT current_setting('threads')").fetchone()[0] == 1
        con.close()
    finally:
        os.sched_setaffinity(0, before)
