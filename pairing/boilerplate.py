"""Boilerplate flags of `pair`: content and image URLs that repeat across the pages of a site or of
the whole crawl (logos, icons, social buttons, ads).

The evidence is filter's `occurrences/`: every fetched link with its pHash, taken before any size
or aspect threshold, so a logo counts on every page it is on in every size it comes in (a 150x60
copy that filter drops as too small still counts for the 375x150 one it resembles).

Rules (PairConfig):
- boilerplate_site: a content (a pHash and the pHashes within `boilerplate_phash_distance` bits of
  it: sizes and recompressions of one picture) or an image URL on at least `site_share` of the
  pages of its site (the page's registered domain; its pages in the crawl, from download's sites/,
  or, without that table, the pages with at least one downloaded image) and on
  at least `site_min_pages` of them.
- boilerplate_global: a content or an image URL on more than `boilerplate_pages` pages anywhere.

Close pHashes are found with LSH banding (pairing/select.py `band_keys`): only hashes that share a
band are compared, and the pigeonhole principle makes every close pair share one. A content's page
count is the union of the pages of its close neighbourhood; pages travel as 63-bit ints.

Each count is made where its key's rows meet, in hash-bucket spill files read one bucket at a time
(pairing/spill.py), not in the runner's combines and shuffles, so memory does not grow with the
crawl (issue 34).
"""

from __future__ import annotations

import hashlib
import pickle
from typing import Optional

import apache_beam as beam

from core.config import PairConfig
from core.records import phash_distance, stable_id
from pairing.select import band_keys
from pairing.spill import SpillByKey, in_order, read_groups

GLOBAL = "*"  # the scope of the crawl-wide rule
CONTENT, URL = "content", "url"
BOILERPLATE_SITE = "boilerplate_site"
BOILERPLATE_GLOBAL = "boilerplate_global"


def page_key(page_url: str) -> int:
    """A page as a 63-bit int (sets of pages per content stay small; Beam's int coder is signed 64-bit)."""
    return int(stable_id(page_url), 16) >> 1


def close_neighbours(members: list[tuple[str, set]], max_distance: int):
    """For each pHash of one LSH bucket, the page sets of the other members within `max_distance`
    bits: (pHash, pages of one neighbour)."""
    for i, (h, _) in enumerate(members):
        for j, (other, pages) in enumerate(members):
            if i != j and phash_distance(h, other) <= max_distance:
                yield h, pages


def site_threshold(site_pages: int, cfg: PairConfig) -> int:
    """Pages a content or URL must be on to be boilerplate of a site with `site_pages` pages."""
    import math

    return max(cfg.site_min_pages, math.ceil(cfg.site_share * site_pages - 1e-9))


def _capped(pages: set, cap: int) -> set:
    """At most `cap` of the pages (0: all), the smallest: the same on every run. A union of capped
    sets capped again has min(true size, cap) pages, all the rules need to tell 'more than K'."""
    return pages if not cap or len(pages) <= cap else set(sorted(pages)[:cap])


def neighbourhoods(own: dict, max_distance: int, cap: int = 0) -> dict:
    """{pHash: pages} of one scope -> {pHash: pages of its close neighbourhood} (itself and every
    pHash within `max_distance` bits), capped at `cap` (0: no cap). Close pHashes are found in LSH
    bands (`band_keys`): only band-mates are compared."""
    bands: dict = {}
    for h in own:
        for b in band_keys(h, max_distance):
            bands.setdefault(b, []).append(h)
    out = {h: set(pages) for h, pages in own.items()}
    for members in bands.values():
        if len(members) > 1:
            for h, pages in close_neighbours([(m, own[m]) for m in members], max_distance):
                out[h] |= pages
    return {h: _capped(pages, cap) for h, pages in out.items()}


def _named_groups(item) -> dict:
    """(bucket, [(name, spill file)]) -> {name: {key: [values]}} (pairing/spill.py)."""
    paths: dict = {}
    for name, path in item[1]:
        paths.setdefault(name, []).append(path)
    return {name: read_groups(found) for name, found in paths.items()}


def _site_rows(item, cfg: PairConfig, given: bool):
    """One bucket of sites: each site's occurrences (image URL, pHash, page), and with `given` its
    page count in the crawl -> its BOILERPLATE_SCHEMA rows: a content (its close neighbourhood) or
    an image URL on at least site_threshold of the site's pages."""
    groups = _named_groups(item)
    occurrences, counts = groups.get("site_occ", {}), groups.get("site_pages", {})
    d = cfg.boilerplate_phash_distance
    for site in in_order(occurrences):
        occ = [pickle.loads(v) for v in occurrences.pop(site)]
        if given:
            found = counts.get(site)
            if not found:
                continue
            n = pickle.loads(found[0])
        else:
            n = len({o[2] for o in occ})
        need = max(cfg.site_min_pages, site_threshold(n, cfg))
        by_url: dict = {}
        by_hash: dict = {}
        for url, h, page in occ:
            by_url.setdefault(url, set()).add(page)
            if h is not None:
                by_hash.setdefault(h, set()).add(page)
        for kind, found in ((CONTENT, neighbourhoods(by_hash, d)), (URL, by_url)):
            for key, pages in found.items():
                if len(pages) >= need:
                    yield {"scope": site, "kind": kind, "key": key, "pages": len(pages), "site_pages": n}


def _global_url_rows(item, more_than: int):
    """One bucket of image URLs (pages of each) -> a row for each on more than `more_than` pages."""
    urls = _named_groups(item).get("url", {})
    for url in in_order(urls):
        pages = urls[url]
        n = len({pickle.loads(v) for v in pages})
        if n > more_than:
            yield {"scope": GLOBAL, "kind": URL, "key": url, "pages": min(n, more_than + 1), "site_pages": 0}


def _own_pages(item, cap: int):
    """One bucket of pHashes (pages of each) -> (pHash, its pages capped at `cap`), as the next
    two spills take them: own (keyed by pHash) and one per LSH band (keyed by the band)."""
    for h, pages in sorted(_named_groups(item).get("hash", {}).items()):
        yield h, _capped({pickle.loads(v) for v in pages}, cap)


def _band_neighbours(item, max_distance: int):
    """One bucket of LSH bands (the pHashes in each, with their pages) -> (pHash, pickled pages of
    a close neighbour) for every close pair of band-mates."""
    for _, members in sorted(_named_groups(item).get("band", {}).items()):
        if len(members) > 1:
            for h, pages in close_neighbours([pickle.loads(v) for v in members], max_distance):
                yield h, pickle.dumps(pages, protocol=pickle.HIGHEST_PROTOCOL)


def _global_content_rows(item, more_than: int):
    """One bucket of pHashes (own pages and close neighbours' pages) -> a row for each whose
    neighbourhood is on more than `more_than` pages."""
    for h, found in sorted(_named_groups(item).get("near", {}).items()):
        pages: set = set()
        for v in found:
            pages |= pickle.loads(v)
        if len(pages) > more_than:
            yield {"scope": GLOBAL, "kind": CONTENT, "key": h, "pages": more_than + 1, "site_pages": 0}


def _dumps(value) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _occurrence(r: dict) -> tuple:
    """An occurrence row -> (site, image URL, pHash, page key): what the flags' spills key and keep."""
    return r["site"], r["image_url"], r["phash"], page_key(r["page_url"])


class FlagBoilerplate(beam.PTransform):
    """Occurrences {page_url, site, image_url, phash} -> BOILERPLATE_SCHEMA rows (site and global).

    `sites`, when given, is a PCollection of {site, pages}: each site's pages in the crawl (download's
    sites/); without it a site's pages are those with at least one occurrence.

    Each count meets its key's occurrences in hash-bucket spill files under `spill_dir`
    (pairing/spill.py, `buckets` buckets; a temporary folder if none is given), one bucket in memory
    at a time: a site's occurrences (its URL and content rules, its page count), an image URL's
    pages, a pHash's pages, then an LSH band's pHashes (their close neighbours), then a pHash's
    own and neighbours' pages (the crawl-wide content rule).

    With `read`, the input's elements are units of input (a (file, row group) of filter's
    occurrences) and `read(unit)` yields their occurrences: each spill reads them itself, so no
    step's output holds a unit's occurrences (on Dask a step's outputs are one list in its worker
    until every consumer ran: a row group of 34,000 occurrences as dicts, then as tuples for the
    three spills, ~30 MB at one Common Crawl file, where 1x's row groups hold 3,400; issue 34)."""

    def __init__(self, cfg: PairConfig, sites=None, *, spill_dir: str, buckets: int = 1, read=None):
        super().__init__()
        self.cfg = cfg
        self.sites = sites
        self.spill_dir, self.buckets = spill_dir, buckets
        self.read = read

    def expand(self, occ):
        cfg, k, d = self.cfg, self.cfg.boilerplate_pages, self.cfg.boilerplate_phash_distance
        spill_dir, buckets = self.spill_dir, self.buckets  # the caller's folder: it removes it

        def spill(pcoll, label: str, name: str, keyed=None, read=None):  # keyed: the (key, value) of an element, in the spill's step
            return pcoll | f"Spill{label}" >> beam.ParDo(SpillByKey(f"{spill_dir}/boilerplate", name, buckets, keyed, read=read))

        read_occ = None
        if self.read is None:
            occ = occ | "Pages" >> beam.Map(_occurrence)
        else:  # each of the three spills of the occurrences reads its units itself
            read = self.read
            read_occ = lambda unit: map(_occurrence, read(unit))  # noqa: E731
        # crawl-wide URLs: pages capped at K+1 (enough to say "more than K")
        g_url = (
            spill(occ, "Urls", "url", lambda o: (o[1], _dumps(o[3])), read_occ)
            | "GroupUrlBuckets" >> beam.GroupByKey() | "GlobalUrlRows" >> beam.FlatMap(_global_url_rows, k)
        )
        # crawl-wide contents: each pHash's pages (an occurrence without one is not spilled), then
        # its close neighbours' (through LSH bands)
        own = (
            spill(occ, "Hashes", "hash", lambda o: (o[2], _dumps(o[3])) if o[2] is not None else None, read_occ)
            | "GroupHashBuckets" >> beam.GroupByKey() | "OwnPages" >> beam.FlatMap(_own_pages, k + 1)
        )
        bands = own | "Bands" >> beam.FlatMap(lambda kv: [(b, _dumps(kv)) for b in band_keys(kv[0], d)])
        near = (
            spill(bands, "Bands", "band") | "GroupBandBuckets" >> beam.GroupByKey()
            | "Neighbours" >> beam.FlatMap(_band_neighbours, d)
        )
        own_near = (
            spill(own, "Own", "near", lambda kv: (kv[0], _dumps(kv[1]))),
            spill(near, "Near", "near"),
        )
        g_content = own_near | "NearFiles" >> beam.Flatten() | "GroupNearBuckets" >> beam.GroupByKey() | "GlobalContentRows" >> beam.FlatMap(_global_content_rows, k)
        # per site: counted against the site's page count
        site_files = [spill(occ, "Sites", "site_occ", lambda o: (o[0], _dumps((o[1], o[2], o[3]))), read_occ)]
        if self.sites is not None:
            site_files.append(spill(self.sites, "SitePages", "site_pages", lambda r: (r["site"], _dumps(r["pages"]))))
        site_flags = (
            site_files | "SiteFiles" >> beam.Flatten() | "GroupSiteBuckets" >> beam.GroupByKey()
            | "SiteRows" >> beam.FlatMap(_site_rows, cfg, self.sites is not None)
        )
        return (g_content, g_url, site_flags) | "AllFlags" >> beam.Flatten()


def flag_key(scope: Optional[str], kind: str, key: Optional[str]) -> bytes:
    """A flag's (scope, kind, key) as the 16-byte digest (blake2b-128 of the three, each
    length-prefixed) that the join's flags are keyed by. At one Common Crawl file the join's side
    input holds 39,475 flags in each worker: as ((site, kind, URL or pHash), pages) tuples ~8.5 MB,
    as (digest, pages) ~4.3 MB (issue 34). Two different flags share a digest with odds of about
    n^2 / 2^129 (~10^-30 at 10^5 flags)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (scope, kind, key):
        if part is None:  # its own length, which no string has
            h.update(b"\xff\xff\xff\xff")
            continue
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
    return h.digest()


def flag_entry(row: dict) -> tuple[bytes, int]:
    """A flag row of FlagBoilerplate -> (flag_key, pages): what the join looks records up in."""
    return flag_key(row["scope"], row["kind"], row["key"]), row["pages"]


def boilerplate_reason(site: str, phash: str, image_url: str, flags: dict, cfg: PairConfig):
    """(reason, detail) for a record whose content or URL is flagged, or None. `flags`: flag_key ->
    pages (`flag_entry` of each flag)."""
    for scope, reason in ((site, BOILERPLATE_SITE), (GLOBAL, BOILERPLATE_GLOBAL)):
        for kind, key in ((CONTENT, phash), (URL, image_url)):
            pages = flags.get(flag_key(scope, kind, key))
            if pages is not None:
                where = f"of the pages of {site}" if scope != GLOBAL else f"pages (more than {cfg.boilerplate_pages})"
                return reason, f"{'content' if kind == CONTENT else 'URL'} on {pages} {where}"
    return None
