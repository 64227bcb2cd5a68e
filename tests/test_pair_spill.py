"""pair's joins through hash-bucket spill files (pairing/spill.py, issue 34): every key's rows meet in
one bucket whatever the bucket count, the boilerplate flags equal a brute-force count over every
occurrence, pair's outputs do not depend on the bucket count, and no spill file is left."""

from __future__ import annotations

import math
import os
import random

import apache_beam as beam
import duckdb
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from core.config import PairConfig
from core.records import phash_distance
from core.sites import site_of
from pairing.boilerplate import FlagBoilerplate, page_key
from pairing.spill import SpillByKey, bucket_count, bucket_of, in_order, read_groups


def _each_key(item):
    for key, values in read_groups(path for _, path in item[1]).items():
        yield key, sorted(values)


def test_spilled_rows_meet_their_key_in_one_bucket(tmp_path):
    """5,000 rows of 700 keys into 7 buckets, written in several bundles: each key comes out once,
    with every one of its values (read back with pyarrow through read_groups)."""
    rng = random.Random(0)
    rows = [(f"k{rng.randrange(700)}", bytes([i % 251]) * rng.randrange(1, 50)) for i in range(5000)]
    expected: dict = {}
    for k, v in rows:
        expected.setdefault(k, []).append(v)
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        out = (
            p | beam.Create(rows) | beam.Reshuffle() | beam.ParDo(SpillByKey(str(tmp_path), "x", 7))
            | beam.GroupByKey() | beam.FlatMap(_each_key)
        )
        assert_that(out, equal_to([(k, sorted(v)) for k, v in expected.items()]))
    assert {bucket_of(k, 7) for k in expected} == set(range(7))
    assert all(name.endswith(".arrow") for name in os.listdir(tmp_path / "x"))
    assert bucket_count(0) == 1 and bucket_count(10**9) == 1024 and bucket_count(8193, 4096) == 3


def _expected_flags(occ: list[dict], cfg: PairConfig, site_pages: dict) -> list[dict]:
    """The boilerplate rules counted by brute force: every pair of pHashes compared, exact page sets."""
    k, d = cfg.boilerplate_pages, cfg.boilerplate_phash_distance
    rows = []
    for scope in sorted({o["site"] for o in occ}) + ["*"]:
        mine = [o for o in occ if scope == "*" or o["site"] == scope]
        by_url: dict = {}
        by_hash: dict = {}
        for o in mine:
            by_url.setdefault(o["image_url"], set()).add(page_key(o["page_url"]))
            if o["phash"] is not None:
                by_hash.setdefault(o["phash"], set()).add(page_key(o["page_url"]))
        near = {h: set().union(*(p for g, p in by_hash.items() if phash_distance(h, g) <= d)) for h in by_hash}
        for kind, found in (("content", near), ("url", by_url)):
            for key, pages in found.items():
                if scope == "*":
                    if len(pages) > k:
                        rows.append({"scope": "*", "kind": kind, "key": key, "pages": k + 1, "site_pages": 0})
                elif scope in site_pages:
                    n = site_pages[scope]
                    if len(pages) >= max(cfg.site_min_pages, math.ceil(cfg.site_share * n - 1e-9)):
                        rows.append({"scope": scope, "kind": kind, "key": key, "pages": len(pages), "site_pages": n})
    return rows


def _occurrences(seed: int) -> list[dict]:
    """30 sites of 2-14 pages; a logo of each site and shared logos in several near pHashes (1-7 bits apart, across LSH bands),
    ads across sites, photos, undecoded links (no pHash)."""
    rng = random.Random(seed)
    logos = [rng.getrandbits(64) for _ in range(12)]
    occ = []
    for s in range(30):
        site = f"site{s}.org"
        own_logo = rng.getrandbits(64)  # the site's logo: on most of its pages, in near versions
        for p in range(rng.randrange(2, 15)):
            page = f"http://www.{site}/p{p}"
            picks = []
            if rng.random() < 0.7:
                flipped = own_logo
                for bit in rng.sample(range(64), rng.choice([0, 1, 3, 6])):
                    flipped ^= 1 << bit
                picks.append((f"http://{site}/logo{rng.randrange(2)}.png", f"{flipped:016x}"))
            for logo in rng.sample(logos, 3):
                flipped = logo
                for bit in rng.sample(range(64), rng.choice([0, 0, 1, 2, 3, 4, 5, 7])):
                    flipped ^= 1 << bit
                picks.append((f"http://cdn.example.net/logo{logo % 1000}-{rng.randrange(3)}.png", f"{flipped:016x}"))
            picks += [(f"http://{site}/img/{p}-{i}.jpg", f"{rng.getrandbits(64):016x}") for i in range(rng.randrange(0, 4))]
            picks.append((f"http://{site}/broken{p % 3}.gif", None))
            occ += [{"page_url": page, "site": site_of(page), "image_url": u, "phash": h} for u, h in picks]
    return occ


def test_boilerplate_flags_equal_a_brute_force_count_with_any_bucket_count(tmp_path):
    """The flags of the spilled counts (5 and 1 buckets, with and without download's sites table)
    are those of every pair of pHashes compared and every page counted: neighbours in other
    buckets, caps at K+1, the site threshold. Fails if a bucket missed a key's rows."""
    cfg = PairConfig()
    occ = _occurrences(1)
    counted = {}
    for o in occ:
        counted.setdefault(o["site"], set()).add(o["page_url"])
    own_pages = {s: len(p) for s, p in counted.items()}
    given = {s: n + 3 for s, n in list(own_pages.items())[::2]}  # the crawl's pages: more than those with an image; some sites absent
    expected_own, expected_given = _expected_flags(occ, cfg, own_pages), _expected_flags(occ, cfg, given)
    assert {r["scope"] for r in expected_own} > {"*"} and {r["kind"] for r in expected_own if r["scope"] == "*"} == {"content", "url"}
    assert expected_own != expected_given
    for buckets in (5, 1):
        with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
            rows = p | f"Occ{buckets}" >> beam.Create(occ)
            sites = p | f"Sites{buckets}" >> beam.Create([{"site": s, "pages": n} for s, n in given.items()])
            own = rows | f"Own{buckets}" >> FlagBoilerplate(cfg, None, spill_dir=str(tmp_path / f"own{buckets}"), buckets=buckets)
            with_sites = rows | f"Given{buckets}" >> FlagBoilerplate(cfg, sites, spill_dir=str(tmp_path / f"given{buckets}"), buckets=buckets)
            assert_that(own, equal_to(expected_own), label=f"CheckOwn{buckets}")
            assert_that(with_sites, equal_to(expected_given), label=f"CheckGiven{buckets}")


def _table(folder: str, name: str) -> list:
    con = duckdb.connect()
    return sorted(con.sql(f"select * from read_parquet('{folder}/{name}/*.parquet')").fetchall(), key=repr)


def test_pair_is_the_same_with_many_buckets_and_leaves_no_spill(tmp_path, pipeline_dirs, monkeypatch):
    """pair on the test web with a bucket every 7 occurrences (dozens of buckets, every join crossing
    them) writes every table and stats.json as the session's run (one bucket); nothing of its
    spill is left beside or in the output."""
    import json

    import pairing.spill
    from pairing.pipeline import run_pair

    monkeypatch.setattr(pairing.spill, "ROWS_PER_BUCKET", 7)
    out = str(tmp_path / "pair")
    stats = run_pair(pipeline_dirs["filter"], out, PairConfig())
    ref = pipeline_dirs["pair"]
    with open(os.path.join(ref, "stats.json")) as fh:
        assert stats == json.load(fh)
    assert stats["pairs"] > 0 and sum(stats["rejected"].values()) > 0
    for name in ("pairs", "images", "rejected", "boilerplate"):
        assert _table(out, name) == _table(ref, name), name
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_null_sites_and_image_urls_are_keys_like_any_other(tmp_path):
    """An occurrence without a site or an image URL (a damaged or hand-made filter output) is
    counted as the shuffles counted it before the spill (a null key is a key): with 3 buckets and
    with 1, the flags are exactly those of main's code before issue 34's third sitting (a50dab4),
    null scope and null URL key included; the spill raised TypeError on the null key."""
    occ = [{"page_url": f"http://a.org/p{i}", "site": "a.org" if i % 2 else None, "image_url": None if i % 3 else "http://a.org/l.png", "phash": "0123456789abcdef"} for i in range(30)]
    h = "0123456789abcdef"
    expected = [
        {"scope": "*", "kind": "content", "key": h, "pages": 11, "site_pages": 0},
        {"scope": "*", "kind": "url", "key": None, "pages": 11, "site_pages": 0},
        {"scope": "a.org", "kind": "content", "key": h, "pages": 15, "site_pages": 15},
        {"scope": "a.org", "kind": "url", "key": None, "pages": 10, "site_pages": 15},
        {"scope": None, "kind": "content", "key": h, "pages": 15, "site_pages": 15},
        {"scope": None, "kind": "url", "key": None, "pages": 10, "site_pages": 15},
    ]
    for buckets in (3, 1):
        with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
            flags = p | beam.Create(occ) | FlagBoilerplate(PairConfig(), None, spill_dir=str(tmp_path / f"b{buckets}"), buckets=buckets)
            assert_that(flags, equal_to(expected))
    assert bucket_of(None, 7) == 0 and in_order(["b", None, "a"]) == [None, "a", "b"]
