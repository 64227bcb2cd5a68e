"""`crawl extract`: WARC/WAT files -> LinkRecord parquet (Apache Beam).

Steps: list files -> read each file as a stream and extract image links per page (a file is the
unit of parallelism) -> reject refused URLs with a reason -> collapse exact duplicate
(page_url, image_url) links -> write links/, rejected/, stats.json.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from core.config import CrawlConfig
from core.records import LINK_SCHEMA, Rejected, stable_id
from core.stageio import WriteStageOutputs
from crawl.html import RawLink, decode_html, extract_image_links
from crawl.urls import AllowList, normalize_url

STAGE = "extract"
REJECTED = "rejected"
# Closed set of reasons: urls.py's plus these two.
REASON_DUPLICATE = "duplicate_link"
REASON_TOO_MANY = "too_many_links"
KIND_RANK = {"img": 0, "picture": 1, "wat": 2, "og:image": 3}  # which duplicate survives


def page_links(page_url: str, raw_links: Iterable[RawLink], base_href, source_file: str, offset: int, cfg: CrawlConfig, allow: AllowList) -> Iterator[tuple[str, dict]]:
    """Resolve and check the links of one page: yields ("link", row) or ("rejected", row)."""
    base, _ = normalize_url(base_href, page_url) if base_href else (None, None)
    base = base or page_url
    for n, raw in enumerate(raw_links):
        url, reason = normalize_url(raw.url, base, allow)  # resolution, normalisation and URL policy
        if reason is None and n >= cfg.max_links_per_page:
            reason = REASON_TOO_MANY
        if reason is not None:
            yield REJECTED, Rejected(stable_id(page_url, raw.url), STAGE, reason, raw.url[:200], url or raw.url[:2048]).to_row()
            continue
        yield "link", {  # a LinkRecord row, built directly (dataclasses.asdict is slow per link)
            "link_id": stable_id(page_url, url),
            "page_url": page_url,
            "image_url": url,
            "alt": raw.alt,
            "position": raw.position,
            "kind": raw.kind,
            "width": raw.width,
            "height": raw.height,
            "source_file": source_file,
            "source_offset": offset,
        }


class ExtractFileLinks(beam.DoFn):
    """Read one WARC/WAT file as a stream; emit (page_url, link rows) per page and rejected rows."""

    def __init__(self, cfg: CrawlConfig):
        self.cfg = cfg
        self.pages = Metrics.counter(STAGE, "html_pages")
        self.wat_pages = Metrics.counter(STAGE, "wat_pages")
        self.broken = Metrics.counter(STAGE, "truncated_files")

    def setup(self):
        self.allow = AllowList(self.cfg.allow_hosts)

    def process(self, path: str):
        from crawl.warc import Page, iter_file

        counters: dict = {}
        for doc in iter_file(path, counters):
            page_url, _ = normalize_url(doc.url, doc.url)
            if page_url is None:
                continue
            if isinstance(doc, Page):
                raw, base = extract_image_links(decode_html(doc.body, doc.charset), self.cfg.include_srcset, self.cfg.include_og_image)
            else:  # WAT: the crawler already parsed the HTML
                raw = [RawLink(link["url"], " ".join(link["alt"].split()), "wat", i, None, None) for i, link in enumerate(doc.links) if link["url"].strip()]
                base = doc.base
            rows = []
            for tag, row in page_links(page_url, raw, base, path, doc.offset, self.cfg, self.allow):
                if tag == "link":
                    rows.append(row)
                else:
                    yield beam.pvalue.TaggedOutput(REJECTED, row)
            if rows:  # one element per page: the shuffle below moves pages, not single links
                yield page_url, rows
        self.pages.inc(counters.get("html_pages", 0))
        self.wat_pages.inc(counters.get("wat_pages", 0))
        self.broken.inc(counters.get("truncated_files", 0))


def _collapse_duplicates(item):
    """All link rows of one page (from every capture of it) -> one link per image URL, the best
    one kept (img before picture before WAT before og:image, then page order), the rest rejected."""
    _, captures = item
    by_url: dict[str, list] = {}
    for rows in captures:
        for r in rows:
            by_url.setdefault(r["image_url"], []).append(r)
    for rows in by_url.values():
        if len(rows) > 1:
            rows.sort(key=lambda r: (KIND_RANK.get(r["kind"], 9), r["position"], r["source_file"], r["source_offset"]))
        best = rows[0]
        if not best["alt"]:  # an og:image or <source> duplicate may carry no alt: take one that has it
            best = dict(best, alt=next((r["alt"] for r in rows if r["alt"]), ""))
        yield best
        for r in rows[1:]:
            yield beam.pvalue.TaggedOutput(REJECTED, Rejected(r["link_id"] + f":{r['kind']}:{r['position']}", STAGE, REASON_DUPLICATE, r["kind"], r["image_url"]).to_row())


class ExtractLinks(beam.PTransform):
    """Files (a PCollection of paths) -> {"input", "kept", "rejected"} link PCollections."""

    def __init__(self, cfg: CrawlConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, files):
        found = files | "Spread" >> beam.Reshuffle() | "ReadAndExtract" >> beam.ParDo(ExtractFileLinks(self.cfg)).with_outputs(REJECTED, main="links")
        deduped = (
            found.links
            | "GroupPages" >> beam.GroupByKey()
            | "Collapse" >> beam.FlatMap(_collapse_duplicates).with_outputs(REJECTED, main="kept")
        )
        rejected = (found[REJECTED], deduped[REJECTED]) | "AllRejected" >> beam.Flatten()
        # inputs = every candidate link: accepted ones (counted per page) and refused ones
        inputs = (found.links | "LinksOfPage" >> beam.FlatMap(lambda kv: kv[1]), found[REJECTED]) | "AllCandidates" >> beam.Flatten()
        return {"input": inputs, "kept": deduped.kept, "rejected": rejected}


def run_extract(input_pattern: str, out_dir: str, cfg: CrawlConfig, beam_args=None) -> dict:
    """Run the extract pipeline and return its reconciled stats."""
    from core.stageio import StageError, finish_stage, pipeline_options
    from crawl.warc import expand_inputs

    files = expand_inputs(input_pattern)
    if not files:
        raise StageError(f"extract: no WARC/WAT files match {input_pattern}")
    with beam.Pipeline(options=pipeline_options(beam_args)) as p:
        outputs = p | "Files" >> beam.Create(files) | "Extract" >> ExtractLinks(cfg)
        _ = outputs | "Write" >> WriteStageOutputs(out_dir, STAGE, "links", LINK_SCHEMA, extra={"files": len(files)})
    return finish_stage(out_dir)
