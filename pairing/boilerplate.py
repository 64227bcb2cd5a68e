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
"""

from __future__ import annotations

import pickle

import apache_beam as beam

from core.config import PairConfig
from core.records import phash_distance, stable_id
from pairing.select import band_keys

GLOBAL = "*"  # the scope of the crawl-wide rule
CONTENT, URL = "content", "url"
BOILERPLATE_SITE = "boilerplate_site"
BOILERPLATE_GLOBAL = "boilerplate_global"


def page_key(page_url: str) -> int:
    """A page as a 63-bit int (sets of pages per content stay small; Beam's int coder is signed 64-bit)."""
    return int(stable_id(page_url), 16) >> 1


class PageSet(beam.CombineFn):
    """Union of page sets (or single pages), keeping at most `cap` pages when a cap is given: enough
    to tell 'more than K' apart with bounded memory."""

    def __init__(self, cap: int = 0):
        self.cap = cap

    def create_accumulator(self):
        return set()

    def add_input(self, acc, value):
        if self.cap and len(acc) >= self.cap:
            return acc
        if isinstance(value, (set, frozenset)):
            acc |= value
        else:
            acc.add(value)
        if self.cap and len(acc) > self.cap:
            return set(list(acc)[: self.cap])
        return acc

    def merge_accumulators(self, accs):
        out = set()
        for acc in accs:
            out = self.add_input(out, acc)
        return out

    def extract_output(self, acc):
        return acc


def site_threshold(site_pages: int, cfg: PairConfig) -> int:
    """Pages a content or URL must be on to be boilerplate of a site with `site_pages` pages."""
    import math

    return max(cfg.site_min_pages, math.ceil(cfg.site_share * site_pages - 1e-9))


def close_pairs_by_scope(members: list[tuple], max_distance: int):
    """For one LSH bucket of (site, pHash, pages of that content on that site) members: each
    pHash's neighbours within `max_distance` bits, in both scopes at once: ((GLOBAL, pHash),
    pages of one neighbour on any site) and ((site, pHash), pages of one neighbour on that site).
    Distances are computed once per pair of distinct pHashes, however many sites show them."""
    by_hash: dict = {}
    for site, h, pages in members:
        by_hash.setdefault(h, {})[site] = pages
    hashes = list(by_hash)
    for i, h in enumerate(hashes):
        for other in hashes[i + 1 :]:
            if phash_distance(h, other) > max_distance:
                continue
            for a, b in ((h, other), (other, h)):
                sites_a, sites_b = by_hash[a], by_hash[b]
                yield (GLOBAL, a), set().union(*sites_b.values())
                for site in sites_a.keys() & sites_b.keys():
                    yield (site, a), sites_b[site]


class _ContentPages(beam.PTransform):
    """((site, pHash), page) -> {"site": ((site, pHash), pages of its close neighbourhood on the
    site), "global": ((GLOBAL, pHash), pages of its close neighbourhood anywhere, at most `cap`)}.

    One LSH banding serves both scopes: each (site, pHash) goes to its bands once with its pages
    on the site, and a bucket pairs close pHashes across sites for the crawl-wide rule and within a
    site for the site rule (two bandings, one per scope, moved every content through the band
    shuffle twice). A content's crawl-wide pages are the union of its sites' (capped at `cap`:
    only "more than K" matters)."""

    def __init__(self, max_distance: int, cap: int):
        super().__init__()
        self.max_distance, self.cap = max_distance, cap

    def expand(self, keyed):
        d, cap = self.max_distance, self.cap
        own = keyed | "PagesPerHash" >> beam.CombinePerKey(PageSet())
        own_global = own | "GlobalKey" >> beam.Map(lambda kv: ((GLOBAL, kv[0][1]), kv[1])) | "GlobalPagesPerHash" >> beam.CombinePerKey(PageSet(cap))
        neighbours = (
            own
            | "Bands" >> beam.FlatMap(lambda kv: [(b, pickle.dumps((kv[0][0], kv[0][1], kv[1]), protocol=pickle.HIGHEST_PROTOCOL)) for b in band_keys(kv[0][1], d)])
            | "GroupBands" >> beam.GroupByKey()
            | "Neighbours" >> beam.FlatMap(lambda kv: close_pairs_by_scope([pickle.loads(b) for b in kv[1]], d))
            | "ByScope" >> beam.Partition(lambda kv, _: int(kv[0][0] == GLOBAL), 2)
        )
        return {
            "site": (own, neighbours[0]) | "SiteOwnAndNeighbours" >> beam.Flatten() | "SiteNeighbourhood" >> beam.CombinePerKey(PageSet()),
            "global": (own_global, neighbours[1]) | "GlobalOwnAndNeighbours" >> beam.Flatten() | "GlobalNeighbourhood" >> beam.CombinePerKey(PageSet(cap)),
        }


def _global_rows(kv, kind: str, more_than: int):
    (_, key), pages = kv
    if len(pages) > more_than:
        yield {"scope": GLOBAL, "kind": kind, "key": key, "pages": len(pages), "site_pages": 0}


def _site_rows(item, cfg: PairConfig):
    site, grouped = item
    n = list(grouped["site_pages"])
    if not n:
        return
    need = site_threshold(n[0], cfg)
    for kind, key, pages in grouped["candidates"]:
        if pages >= need:
            yield {"scope": site, "kind": kind, "key": key, "pages": pages, "site_pages": n[0]}


class FlagBoilerplate(beam.PTransform):
    """Occurrences {page_url, site, image_url, phash} -> BOILERPLATE_SCHEMA rows (site and global).

    `sites`, when given, is a PCollection of {site, pages}: each site's pages in the crawl (download's
    sites/); without it a site's pages are those with at least one occurrence."""

    def __init__(self, cfg: PairConfig, sites=None):
        super().__init__()
        self.cfg = cfg
        self.sites = sites

    def expand(self, occ):
        cfg, k = self.cfg, self.cfg.boilerplate_pages
        occ = occ | "Pages" >> beam.Map(lambda r: (r["site"], r["image_url"], r["phash"], page_key(r["page_url"])))
        hashed = occ | "Decoded" >> beam.Filter(lambda o: o[2] is not None)
        # crawl-wide: pages capped at K+1 (enough to say "more than K")
        content = hashed | "SiteHash" >> beam.Map(lambda o: ((o[0], o[2]), o[3])) | "Content" >> _ContentPages(cfg.boilerplate_phash_distance, k + 1)
        g_content, s_content = content["global"], content["site"]
        g_url = occ | "GlobalUrl" >> beam.Map(lambda o: ((GLOBAL, o[1]), o[3])) | "GlobalUrlPages" >> beam.CombinePerKey(PageSet(k + 1))
        flags = [
            g_content | "GlobalContentRows" >> beam.FlatMap(_global_rows, CONTENT, k),
            g_url | "GlobalUrlRows" >> beam.FlatMap(_global_rows, URL, k),
        ]
        # per site: counted against the site's page count (a CoGroupByKey on the site)
        s_url = occ | "SiteUrl" >> beam.Map(lambda o: ((o[0], o[1]), o[3])) | "SiteUrlPages" >> beam.CombinePerKey(PageSet())
        min_pages = cfg.site_min_pages
        candidates = [
            pc | f"{kind}Candidates" >> beam.FlatMap(lambda kv, kind=kind: [(kv[0][0], (kind, kv[0][1], len(kv[1])))] if len(kv[1]) >= min_pages else [])
            for kind, pc in ((CONTENT, s_content), (URL, s_url))
        ]
        if self.sites is not None:
            site_pages = self.sites | "SitePagesGiven" >> beam.Map(lambda r: (r["site"], r["pages"]))
        else:
            site_pages = (
                occ
                | "SitePage" >> beam.Map(lambda o: (o[0], o[3]))
                | "DistinctSitePages" >> beam.Distinct()
                | "PagesPerSite" >> beam.combiners.Count.PerKey()
            )
        site_flags = (
            {"site_pages": site_pages, "candidates": candidates | "AllCandidates" >> beam.Flatten()}
            | "JoinSite" >> beam.CoGroupByKey()
            | "SiteRows" >> beam.FlatMap(_site_rows, cfg)
        )
        return (*flags, site_flags) | "AllFlags" >> beam.Flatten()


def boilerplate_reason(site: str, phash: str, image_url: str, flags: dict, cfg: PairConfig):
    """(reason, detail) for a record whose content or URL is flagged, or None."""
    for scope, reason in ((site, BOILERPLATE_SITE), (GLOBAL, BOILERPLATE_GLOBAL)):
        for kind, key in ((CONTENT, phash), (URL, image_url)):
            pages = flags.get((scope, kind, key))
            if pages is not None:
                where = f"of the pages of {site}" if scope != GLOBAL else f"pages (more than {cfg.boilerplate_pages})"
                return reason, f"{'content' if kind == CONTENT else 'URL'} on {pages} {where}"
    return None
