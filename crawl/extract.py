"""`crawl extract`: WARC/WAT files -> LinkRecord parquet (Apache Beam).

Steps: list files -> read each file as a stream and extract image links per page (a file is the
unit of parallelism) -> reject refused URLs with a reason -> group by page and collapse exact
duplicate (page_url, image_url) links -> write links/ (pyarrow tables, batched), rejected/,
stats.json.
"""

from __future__ import annotations

import pickle
from typing import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from core.config import CrawlConfig
from core.records import LINK_SCHEMA, Rejected, stable_id
from core.stageio import WriteStageOutputs
from crawl.consent import PAGE_OPT_OUT, page_opt_out
from crawl.html import RawLink, decode_html, extract_page
from crawl.urls import AllowList, normalize_links, normalize_url

STAGE = "extract"
REJECTED = "rejected"
# Closed set of reasons: urls.py's, these two, the file and record problems of crawl/warc.py
# (failed_file, not_a_warc, truncated_file, bad_record, page_too_large), page_too_complex and
# page_opt_out (the page's X-Robots-Tag or <meta name="robots"> says noai/noimageai: crawl/consent.py).
REASON_DUPLICATE = "duplicate_link"
REASON_TOO_MANY = "too_many_links"
REASON_COMPLEX = "page_too_complex"
FILE_STATS = {"failed_file": "failed_files", "not_a_warc": "not_warc_files", "truncated_file": "truncated_files", "bad_record": "bad_records"}
CANDIDATES = "candidates"  # per-file count of candidate links
KIND_RANK = {"img": 0, "picture": 1, "wat": 2, "og:image": 3}  # which duplicate survives


def page_links(page_url: str, raw_links: Iterable[RawLink], base_href, cfg: CrawlConfig, allow: AllowList) -> tuple[list[tuple], list[dict]]:
    """Resolve and check the links of one page.

    Returns (accepted links as (image_url, alt, position, kind, width, height), Rejected rows of
    the refused ones). Link rows are tuples, not dicts: a page's links cross a shuffle, and tuples
    encode several times faster. Two lists rather than a generator of tagged rows: this runs once
    per link of the crawl (issue 34's profile)."""
    base, _ = normalize_url(base_href, page_url) if base_href else (None, None)
    base = base or page_url
    links, rejected = [], []
    limit = cfg.max_links_per_page
    raw_links = list(raw_links)
    for n, (raw, (url, reason)) in enumerate(zip(raw_links, normalize_links([r.url for r in raw_links], base, allow))):  # resolution, normalisation, URL policy
        if reason is None and n >= limit:
            reason = REASON_TOO_MANY
        if reason is None:
            links.append((url, raw.alt, raw.position, raw.kind, raw.width, raw.height))
        else:
            rejected.append(Rejected(stable_id(page_url, raw.url), STAGE, reason, raw.url[:200], url or raw.url[:2048]).to_row())
    return links, rejected


class ExtractFileLinks(beam.DoFn):
    """Read one WARC/WAT file as a stream. Outputs: per page with accepted links,
    (page_url, (file, record offset, [link tuple, ...])); rejected rows (tag REJECTED); per file,
    the number of candidate links it held (tag CANDIDATES, what stats.json calls `input`)."""

    def __init__(self, cfg: CrawlConfig):
        self.cfg = cfg
        self.pages = Metrics.counter(STAGE, "html_pages")
        self.wat_pages = Metrics.counter(STAGE, "wat_pages")
        self.broken = Metrics.counter(STAGE, "truncated_files")

    def setup(self):
        self.allow = AllowList(self.cfg.allow_hosts)

    def process(self, path: str):
        from crawl.html import page_complexity
        from crawl.warc import Page, Problem, iter_file

        counters: dict = {}
        candidates = 0
        for doc in iter_file(path, counters, self.cfg.retries):
            if isinstance(doc, Page):
                too_complex = page_complexity(doc.body, self.cfg.max_page_depth, self.cfg.max_page_elements)
                if too_complex:
                    doc = Problem(REASON_COMPLEX, path, doc.offset, too_complex, doc.url)
            if isinstance(doc, Problem):  # one record in, one rejected row out: the counts still reconcile
                candidates += 1
                detail = f"{doc.file} @ {doc.offset}: {doc.detail}"
                yield beam.pvalue.TaggedOutput(REJECTED, Rejected(stable_id(doc.file, str(doc.offset), doc.reason), STAGE, doc.reason, detail[:1000], doc.url or doc.file).to_row())
                continue
            page_url, _ = normalize_url(doc.url, doc.url)
            if page_url is None:
                continue
            if isinstance(doc, Page):
                raw, base, metas = extract_page(decode_html(doc.body, doc.charset), self.cfg.include_srcset, self.cfg.include_og_image)
            else:  # WAT: the crawler already parsed the HTML
                raw = [RawLink(link["url"], " ".join(link["alt"].split()), "wat", i, None, None) for i, link in enumerate(doc.links) if link["url"].strip()]
                base, metas = doc.base, doc.metas
            candidates += len(raw)
            opted_out = page_opt_out(doc.headers, metas) if self.cfg.consent == "on" and raw else None
            if opted_out:  # the page gives no image to fetch: each of its links is rejected, with why
                page_base = (normalize_url(base, page_url)[0] if base else None) or page_url
                for link in raw:
                    url = normalize_url(link.url, page_base)[0] or link.url
                    yield beam.pvalue.TaggedOutput(REJECTED, Rejected(stable_id(page_url, link.url), STAGE, PAGE_OPT_OUT, f"{page_url[:300]}: {opted_out}", url[:2048]).to_row())
                continue
            links, rejected = page_links(page_url, raw, base, self.cfg, self.allow)
            for row in rejected:
                yield beam.pvalue.TaggedOutput(REJECTED, row)
            if links:  # one element per page, packed: the shuffle moves one bytes object per page
                yield page_url, pickle.dumps((path, doc.offset, links), protocol=pickle.HIGHEST_PROTOCOL)
        yield beam.pvalue.TaggedOutput(CANDIDATES, candidates)
        self.pages.inc(counters.get("html_pages", 0))
        self.wat_pages.inc(counters.get("wat_pages", 0))
        self.broken.inc(counters.get("truncated_files", 0))


def collapse_page(page_url: str, captures: list[tuple]) -> tuple[list[tuple], list[dict]]:
    """All links of one page (from every capture of it) -> one link per image URL, the best one
    kept (img before picture before WAT before og:image, then page order), the rest rejected.
    Returns (LinkRecord tuples in LINK_SCHEMA column order, Rejected rows)."""
    if len(captures) == 1:  # the common case: one capture whose image URLs are all distinct
        source_file, offset, links = captures[0]
        if len({link[0] for link in links}) == len(links):
            return [(stable_id(page_url, url), page_url, url, alt, position, kind, width, height, source_file, offset) for url, alt, position, kind, width, height in links], []
    by_url: dict[str, list] = {}
    for source_file, offset, links in captures:
        for url, alt, position, kind, width, height in links:
            by_url.setdefault(url, []).append((KIND_RANK.get(kind, 9), position, source_file, offset, alt, kind, width, height))
    kept, rejected = [], []
    for url, found in by_url.items():
        if len(found) > 1:
            found.sort(key=lambda f: f[:4])
        _, position, source_file, offset, alt, kind, width, height = found[0]
        if not alt:  # an og:image or <source> duplicate may carry no alt: take one that has it
            alt = next((f[4] for f in found if f[4]), "")
        link_id = stable_id(page_url, url)
        kept.append((link_id, page_url, url, alt, position, kind, width, height, source_file, offset))
        for f in found[1:]:
            rejected.append(Rejected(f"{link_id}:{f[5]}:{f[1]}", STAGE, REASON_DUPLICATE, f[5], url).to_row())
    return kept, rejected


class CollapseDuplicates(beam.DoFn):
    """(page_url, captures) groups -> pyarrow tables of kept links (LINK_SCHEMA, about
    `batch_rows` rows each, the rest at the end of the bundle) and rejected duplicate rows.
    Batching keeps Beam's per-element cost per table instead of per link."""

    def __init__(self, batch_rows: int = 20000):
        self.batch_rows = batch_rows

    def start_bundle(self):
        self.rows: list[tuple] = []

    def process(self, item):
        page_url, packed = item
        kept, rejected = collapse_page(page_url, [pickle.loads(b) for b in packed])
        self.rows += kept
        for row in rejected:
            yield beam.pvalue.TaggedOutput(REJECTED, row)
        if len(self.rows) >= self.batch_rows:
            yield self._table()

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.timestamp import MIN_TIMESTAMP
        from apache_beam.utils.windowed_value import WindowedValue

        if self.rows:
            yield WindowedValue(self._table(), MIN_TIMESTAMP, [GlobalWindow()])

    def _table(self):
        import pyarrow as pa

        columns = list(zip(*self.rows))
        self.rows = []
        return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, LINK_SCHEMA)], schema=LINK_SCHEMA)


class ExtractLinks(beam.PTransform):
    """Files (a PCollection of paths) -> {"input_count", "kept" (pyarrow tables), "rejected"}."""

    def __init__(self, cfg: CrawlConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, files):
        found = files | "Spread" >> beam.Reshuffle() | "ReadAndExtract" >> beam.ParDo(ExtractFileLinks(self.cfg)).with_outputs(REJECTED, CANDIDATES, main="links")
        deduped = (
            found.links
            | "GroupPages" >> beam.GroupByKey()
            | "Collapse" >> beam.ParDo(CollapseDuplicates()).with_outputs(REJECTED, main="kept")
        )
        rejected = (found[REJECTED], deduped[REJECTED]) | "AllRejected" >> beam.Flatten()
        return {"input_count": found[CANDIDATES], "kept": deduped.kept, "rejected": rejected}


def run_extract(input_pattern: str, out_dir: str, cfg: CrawlConfig, beam_args=None) -> dict:
    """Run the extract pipeline and return its reconciled stats. A file that cannot be read is a
    rejected row (and counted in stats), not the end of the job; only when no file could be read
    at all does this raise, after writing the output that says why."""
    from core.stageio import StageError, StageOutput, stage_pipeline
    from crawl.warc import expand_inputs

    try:
        files = expand_inputs(input_pattern, cfg.paths_prefix, cfg.max_files, cfg.files_from)
    except (OSError, ValueError) as err:
        raise StageError(f"extract: cannot list {input_pattern}: {' '.join(str(err).split())[:300]}") from None
    if not files:
        raise StageError(f"extract: no WARC/WAT files match {input_pattern}")
    with StageOutput(out_dir, STAGE) as out:
        with stage_pipeline(beam_args) as p:
            outputs = p | "Files" >> beam.Create(files) | "Extract" >> ExtractLinks(cfg)
            rejected = outputs["rejected"]
            for reason, key in FILE_STATS.items():  # counted apart in stats.json too
                outputs[key] = rejected | f"Only_{reason}" >> beam.Filter(lambda r, reason=reason: r["reason"] == reason)
            _ = outputs | "Write" >> WriteStageOutputs(out.path, STAGE, "links", LINK_SCHEMA, extra={"files": len(files)}, kept_tables=True)
        stats = out.commit()
    unreadable = stats.get("failed_files", 0) + stats.get("not_warc_files", 0)
    if unreadable == len(files):
        raise StageError(f"extract: none of the {len(files)} input files could be read ({unreadable} failed or not WARC/WAT; reasons in {out_dir}/rejected)")
    return stats
