"""`crawl extract`: WARC/WAT files -> LinkRecord parquet (Apache Beam).

Steps: list files -> read each file as a stream and extract image links per page (a file is the
unit of parallelism), rejecting refused URLs with a reason, into a spill file per input file ->
collapse exact duplicate (page_url, image_url) links: pages with one capture from their spill file,
a record batch at a time, as whole columns; the few pages with several captures (found from every
file's page hashes) meet in a shuffle -> write links/ and rejected/ (pyarrow tables), stats.json.
"""

from __future__ import annotations

import binascii
import hashlib
import os
import pickle
from typing import Iterable, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from core.config import CrawlConfig
from core.memory import system_arrow_pool
from core.records import LINK_SCHEMA, REJECTED_SCHEMA, Rejected, rows_to_table, stable_id
from core.stageio import WriteStageOutputs, frozen_gc, of_tables
from crawl.consent import PAGE_OPT_OUT, page_opt_out
from crawl.html import RawLink, decode_html, extract_page
from crawl.urls import AllowList, normal_url, normalize_link_columns, normalize_url

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
    raw_links = list(raw_links)
    return _accept(page_url, raw_links, *_resolve(page_url, raw_links, base_href, allow), cfg.max_links_per_page)


def _resolve(page_url: str, raw_links: list, base_href, allow: AllowList, stripped: bool = False) -> tuple[list, Optional[list]]:
    """([url or None], [reason or None] or None when all are accepted) of a page's links:
    resolution against its base, normalisation, URL policy (the page's plain references together).
    `stripped`: the links' URLs have no surrounding whitespace (extract_page strips them)."""
    base = normal_url(base_href, page_url) if base_href else None
    return normalize_link_columns([r.url for r in raw_links], base or page_url, allow, stripped)


def _accept(page_url: str, raw_links: list, urls: list, reasons: Optional[list], limit: int) -> tuple[list[tuple], list[dict]]:
    """page_links' answer from the resolved links."""
    links, rejected = [], []
    for n, (raw, url, reason) in enumerate(zip(raw_links, urls, reasons or [None] * len(urls))):
        if reason is None and n >= limit:
            reason = REASON_TOO_MANY
        if reason is None:
            links.append((url, raw.alt, raw.position, raw.kind, raw.width, raw.height))
        else:
            rejected.append(Rejected(stable_id(page_url, raw.url), STAGE, reason, raw.url[:200], url or raw.url[:2048]).to_row())
    return links, rejected


# Pages whose links are resolved and spilled together, after they are parsed: parsing a page
# (lexbor) evicts from the CPU's caches what resolution uses (the regex engine, the interpreter's
# paths), which cost ~24 us a page when each page's links were resolved right after it (issue 34:
# resolution took 1.53 CPU s at 35,000 pages, 0.88 s when run again at once on the same links).
PAGES_AT_ONCE = 32
SPILL = ".spill"  # in the stage's output folder; finish_stage removes dot folders before _SUCCESS
PAGES = "pages"  # per file, the page hashes of its captures (pages with accepted links)
REPEATED = "repeated"  # links of pages with several captures, on their way to the shuffle
SPILL_ROWS = 20_000  # links per spill record batch (a batch ends with a page)
SPILL_SCHEMA = pa.schema(
    [
        ("link_id", pa.string()),
        ("page_url", pa.dictionary(pa.int32(), pa.string())),  # one value a page, not a link
        ("image_url", pa.string()),
        ("alt", pa.string()),  # as written on the page
        ("kept_alt", pa.string()),  # null, or the alt the kept link borrows if the page has no other capture
        ("position", pa.int32()),
        ("kind", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source_offset", pa.int64()),
        ("kept", pa.bool_()),  # kept if the page has no other capture (else collapse_page decides)
        ("page_hash", pa.uint64()),
    ]
)


def page_hash(page_url: str) -> int:
    """64-bit hash of a page URL, the same on every worker. Two pages that share one only take
    the slow path (the shuffle, keyed by the URL itself), so a collision changes no output."""
    return int.from_bytes(hashlib.blake2b(page_url.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


_KIND_ORDER = pa.array(sorted(KIND_RANK, key=KIND_RANK.get), pa.string())  # KIND_RANK's ranks are its indices


def one_capture(page_of_row: np.ndarray, image_url: pa.Array, alt: pa.Array, kind: pa.Array, position: pa.Array) -> tuple[np.ndarray, list]:
    """collapse_page's rule on pages with one capture, for a batch of whole pages at once (issue
    34: a Python sort a repeated URL of a page cost ~0.3 CPU s a Common Crawl file): the rows of
    one image URL on one page are ordered by KIND_RANK (9 for another kind), then position; the
    first is kept, the others are not; when the kept one has no alt it takes the first non-empty
    alt in that order. Returns (kept: a bool a row, [(kept row, row whose alt it takes), ...])."""
    import pyarrow.compute as pc

    n = len(image_url)
    key = (page_of_row.astype(np.int64) << 32) | pc.dictionary_encode(image_url).indices.to_numpy().astype(np.int64)
    rank = pc.fill_null(pc.index_in(kind, value_set=_KIND_ORDER), 9).to_numpy()
    order = np.lexsort((position.to_numpy(zero_copy_only=False), rank, key))
    ordered = key[order]
    first = np.ones(n, dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    kept = np.empty(n, dtype=bool)
    kept[order] = first
    if first.all():
        return kept, []
    starts = np.flatnonzero(first)
    size = np.diff(np.append(starts, n))
    has_alt = (pc.binary_length(alt).to_numpy(zero_copy_only=False) > 0)[order]
    first_alt = np.minimum.reduceat(np.where(has_alt, np.arange(n), n), starts)  # in each group, in order
    borrow = (size > 1) & ~has_alt[starts] & (first_alt < n)
    return kept, list(zip(order[starts[borrow]].tolist(), order[first_alt[borrow]].tolist()))


def link_ids(digests: list) -> pa.Array:
    """stable_id(page_url, image_url) of each link from its SHA-1 digest (`_Spill._add`): the first 8
    bytes in hex, written for the whole batch at once rather than a hexdigest and a slice a link."""
    n = len(digests)
    first = np.frombuffer(b"".join(digests), np.uint8).reshape(n, 20)[:, :8]
    return pa.StringArray.from_buffers(n, pa.py_buffer(np.arange(0, 16 * n + 1, 16, dtype=np.int32)), pa.py_buffer(binascii.hexlify(first.tobytes())))


class _Spill:
    """The accepted links of one input file, in SPILL_SCHEMA columns, written as Arrow IPC record
    batches of about SPILL_ROWS links (whole pages) to `path` (IPC, not parquet: written and read
    back as it is in memory, no encoding; the spill lives only until the stage ends). Each page is
    collapsed as if it had one capture (`kept`, `kept_alt`: `one_capture`, a batch at a time when
    it is written); the pages that turn out to have more are collapsed again. A batch is held as
    Python lists a link (what the page gave) and a page (URL, offset, hash, how many links: spread
    over the page's links by NumPy when written)."""

    def __init__(self, path: str):
        self.path = path
        self.hashes: list[int] = []  # every page's, for the PAGES output
        self.writer = self.fh = None
        self._new_batch()

    def _new_batch(self) -> None:
        self.digests: list[bytes] = []
        self.urls: list[str] = []
        self.alts: list[str] = []
        self.positions: list[int] = []
        self.kinds: list[str] = []
        self.widths: list = []
        self.heights: list = []
        self.page_urls: list[str] = []
        self.page_offsets: list[int] = []
        self.page_hashes: list[int] = []
        self.page_sizes: list[int] = []
        self.rows = 0

    def add_page(self, page_url: str, offset: int, raw: list, base_href, cfg: CrawlConfig, allow: AllowList, stripped: bool = False) -> list[dict]:
        """page_links + add for one page's extracted links; returns the Rejected rows of the refused
        ones. The common page (every link accepted, none over the cap) goes into the columns
        straight from its RawLinks, without a tuple per link made and taken apart again.
        `stripped`: as for _resolve."""
        urls, reasons = _resolve(page_url, raw, base_href, allow, stripped)
        if len(raw) > cfg.max_links_per_page or reasons is not None:
            links, refused = _accept(page_url, raw, urls, reasons, cfg.max_links_per_page)
            if links:
                self.add(page_url, offset, links)
            return refused
        n = len(raw)
        # extract_page numbers a page's links 0..n-1 (a WAT record's may skip): then no list a link
        positions = range(n) if raw[-1].position == n - 1 and raw[0].position == 0 else [r.position for r in raw]
        self._add(page_url, offset, urls, [r.alt for r in raw], positions, [r.kind for r in raw], [r.width for r in raw], [r.height for r in raw])
        return []

    def add(self, page_url: str, offset: int, links: list[tuple]) -> None:
        """One page's accepted links, page_links' tuples."""
        self._add(page_url, offset, *zip(*links))  # columns of the page's links

    def _add(self, page_url: str, offset: int, urls, alts, positions, kinds, widths, heights) -> None:
        h = page_hash(page_url)
        self.hashes.append(h)
        n = len(urls)
        # stable_id(page_url, url) a link: SHA-1 of the page URL and the separator once, copied
        # and finished with each URL (UTF-8 encodes piece by piece: the same digest); hex at flush
        copy = hashlib.sha1((page_url + "\x1f").encode("utf-8", "surrogatepass")).copy
        digests = self.digests
        for url in urls:
            sha = copy()
            sha.update(url.encode("utf-8", "surrogatepass"))
            digests.append(sha.digest())
        self.urls += urls
        self.alts += alts
        self.positions += positions
        self.kinds += kinds
        self.widths += widths
        self.heights += heights
        self.page_urls.append(page_url)
        self.page_offsets.append(offset)
        self.page_hashes.append(h)
        self.page_sizes.append(n)
        self.rows += n
        if self.rows >= SPILL_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        n, sizes = self.rows, self.page_sizes
        page_of_row = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        image_url, alt, kind, position = pa.array(self.urls, pa.string()), pa.array(self.alts, pa.string()), pa.array(self.kinds, pa.string()), pa.array(self.positions, pa.int32())
        kept, borrowed = one_capture(page_of_row, image_url, alt, kind, position)
        kept_alt = [None] * n
        for row, source in borrowed:
            kept_alt[row] = self.alts[source]
        columns = {
            "link_id": link_ids(self.digests),
            "page_url": pa.DictionaryArray.from_arrays(pa.array(page_of_row), pa.array(self.page_urls, pa.string())),
            "image_url": image_url,
            "alt": alt,
            "kept_alt": pa.array(kept_alt, pa.string()),
            "position": position,
            "kind": kind,
            "width": pa.array(self.widths, pa.int32()),
            "height": pa.array(self.heights, pa.int32()),
            "source_offset": pa.array(np.repeat(np.array(self.page_offsets, dtype=np.int64), sizes)),
            "kept": pa.array(kept),
            "page_hash": pa.array(np.repeat(np.array(self.page_hashes, dtype=np.uint64), sizes)),
        }
        batch = pa.RecordBatch.from_arrays([columns[f.name] for f in SPILL_SCHEMA], schema=SPILL_SCHEMA)
        if self.writer is None:  # written under a name of its own, renamed when whole: a retried file never mixes two attempts
            self.tmp = f"{self.path}.{os.getpid()}-{id(self):x}.tmp"
            self.fh = _create(self.tmp)
            self.writer = pa.ipc.new_stream(self.fh, SPILL_SCHEMA)  # a stream: each batch has its own page dictionary
        self.writer.write_batch(batch)  # one record batch per flush: whole pages
        self._new_batch()

    def close(self) -> bool:
        """Write what is left; True when the file holds any link."""
        self.flush()
        if self.writer is None:
            return False
        self.writer.close()
        self.fh.close()
        FileSystems.rename([self.tmp], [self.path])
        return True


def _create(path: str):
    """A file to write: Arrow's own for a local path (its writes stay in C; through a Python file
    object each buffer of a batch was a Python call), else Beam's filesystem's."""
    if "://" in path:
        return FileSystems.create(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return pa.OSFile(path, "wb")


def _open(path: str):
    """A file to read: memory-mapped when local (record batches read without a copy), else Beam's
    filesystem's."""
    return FileSystems.open(path) if "://" in path else pa.memory_map(path)


def _startup_heap_frozen():
    """While a file is read, Python's cyclic garbage collector leaves alone the objects that existed
    before (`gc.freeze`: the worker's modules, Beam's pipeline and runner, ~150,000 objects). A
    file's pages allocate many short-lived containers, so the collector's full passes come every
    few thousand pages, and each walked that whole heap (~0.1 CPU s: issue 34's profile, ~8 % of
    the stage). Only the collector's scheduling changes: objects are freed by reference counting
    as before, and cycles made while frozen are still collected; at the end the heap is unfrozen by
    the outermost of these blocks (run_extract's in process: the pipeline built since it froze is
    frozen too when a file starts)."""
    return frozen_gc(collect=False)  # core/stageio: only the outermost block unfreezes


class ExtractFileLinks(beam.DoFn):
    """Read one WARC/WAT file as a stream. The accepted links of its pages go to a spill file
    (`_Spill`, under `spill_dir`); outputs: (file, spill path) once the file is read; rejected
    rows as pyarrow tables (tag REJECTED); the page hashes of its captures (tag PAGES, a NumPy
    array); the number of candidate links it held (tag CANDIDATES, what stats.json calls `input`).
    A file is read and written once per element: no link crosses a shuffle (issue 34: the
    in-process runner held every link of the input in memory there)."""

    def __init__(self, cfg: CrawlConfig, spill_dir: str):
        self.cfg = cfg
        self.spill_dir = spill_dir
        self.pages = Metrics.counter(STAGE, "html_pages")
        self.wat_pages = Metrics.counter(STAGE, "wat_pages")
        self.broken = Metrics.counter(STAGE, "truncated_files")

    def setup(self):
        self.allow = AllowList(self.cfg.allow_hosts)
        system_arrow_pool()  # a Dask worker's too (core/memory.py)

    def process(self, path: str):
        with _startup_heap_frozen():
            yield from self._process(path)

    def _process(self, path: str):
        from crawl.html import page_complexity
        from crawl.warc import Page, Problem, iter_file

        counters: dict = {}
        candidates = 0
        spill = _Spill(os.path.join(self.spill_dir, f"{stable_id(path, length=32)}.arrow"))
        rejected: list[dict] = []
        pending: list = []
        cfg = self.cfg
        max_depth, max_elements, include_srcset, include_og_image, consent = cfg.max_page_depth, cfg.max_page_elements, cfg.include_srcset, cfg.include_og_image, cfg.consent == "on"
        for doc in iter_file(path, counters, cfg.retries):
            if len(rejected) >= 10_000:
                yield beam.pvalue.TaggedOutput(REJECTED, rows_to_table(rejected, REJECTED_SCHEMA))
                rejected = []
            if isinstance(doc, Page):
                too_complex = page_complexity(doc.body, max_depth, max_elements)
                if too_complex:
                    doc = Problem(REASON_COMPLEX, path, doc.offset, too_complex, doc.url)
            if isinstance(doc, Problem):  # one record in, one rejected row out: the counts still reconcile
                candidates += 1
                detail = f"{doc.file} @ {doc.offset}: {doc.detail}"
                rejected.append(Rejected(stable_id(doc.file, str(doc.offset), doc.reason), STAGE, doc.reason, detail[:1000], doc.url or doc.file).to_row())
                continue
            page_url = normal_url(doc.url, doc.url)
            if page_url is None:
                continue
            is_page = isinstance(doc, Page)
            if is_page:  # (extract_page strips the links' URLs)
                raw, base, metas = extract_page(decode_html(doc.body, doc.charset), include_srcset, include_og_image)
            else:  # WAT: the crawler already parsed the HTML
                raw = [RawLink(link["url"], " ".join(link["alt"].split()), "wat", i, None, None) for i, link in enumerate(doc.links) if link["url"].strip()]
                base, metas = doc.base, doc.metas
            candidates += len(raw)
            opted_out = page_opt_out(doc.headers, metas) if consent and raw else None
            if opted_out:  # the page gives no image to fetch: each of its links is rejected, with why
                page_base = (normalize_url(base, page_url)[0] if base else None) or page_url
                for link in raw:
                    url = normalize_url(link.url, page_base)[0] or link.url
                    rejected.append(Rejected(stable_id(page_url, link.url), STAGE, PAGE_OPT_OUT, f"{page_url[:300]}: {opted_out}", url[:2048]).to_row())
                continue
            if raw:
                pending.append((page_url, doc.offset, raw, base, is_page))
                if len(pending) >= PAGES_AT_ONCE:
                    rejected += self._resolve_pages(pending, spill)
                    pending = []
        rejected += self._resolve_pages(pending, spill)
        if rejected:
            yield beam.pvalue.TaggedOutput(REJECTED, rows_to_table(rejected, REJECTED_SCHEMA))
        if spill.close():
            yield path, spill.path
            yield beam.pvalue.TaggedOutput(PAGES, np.array(spill.hashes, dtype=np.uint64))
        yield beam.pvalue.TaggedOutput(CANDIDATES, candidates)
        self.pages.inc(counters.get("html_pages", 0))
        self.wat_pages.inc(counters.get("wat_pages", 0))
        self.broken.inc(counters.get("truncated_files", 0))

    def _resolve_pages(self, pending: list, spill: _Spill) -> list[dict]:
        """Resolve and spill the links of a few pages parsed one after the other; the Rejected rows
        of the refused ones."""
        rejected: list[dict] = []
        for page_url, offset, raw, base, stripped in pending:
            rejected += spill.add_page(page_url, offset, raw, base, self.cfg, self.allow, stripped)
        return rejected


class _RepeatedPages(beam.CombineFn):
    """NumPy arrays of page hashes (one per capture) -> the set of hashes seen more than once:
    the pages with several captures, whose links must meet in one place to be collapsed."""

    def create_accumulator(self):
        return []

    def add_input(self, acc, hashes):
        acc.append(hashes)
        return acc

    def merge_accumulators(self, accs):
        return [self._reduce([a for acc in accs for a in acc])]

    def extract_output(self, acc):
        both = self._reduce(acc)
        values, counts = np.unique(both, return_counts=True)
        return set(values[counts > 1].tolist())

    @staticmethod
    def _reduce(arrays):
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint64)


class SplitSpill(beam.DoFn):
    """(file, spill path) -> the spill's links, a record batch at a time: the links of pages with one
    capture as LINK_SCHEMA tables (the kept ones) and rejected tables (their duplicates), whole
    columns at once; the links of pages with several captures (`repeated`, a side input) as
    (page_url, pickled [(file, offset, [link tuple, ...]), ...]) for the shuffle to collapse."""

    def process(self, item, repeated):
        import pyarrow.compute as pc

        source_file, spill_path = item
        repeated = pa.array(sorted(repeated), pa.uint64()) if repeated else None
        with _open(spill_path) as fh:
            for batch in pa.ipc.open_stream(fh):
                table = pa.Table.from_batches([batch])
                many = pc.is_in(table["page_hash"], value_set=repeated) if repeated is not None else None
                if many is not None and pc.any(many).as_py():
                    yield from self._repeated(table.filter(many), source_file)
                    table = table.filter(pc.invert(many))
                kept = table.filter(table["kept"])
                if kept.num_rows:
                    n = kept.num_rows
                    yield pa.Table.from_arrays(
                        [kept["link_id"], kept["page_url"].cast(pa.string()), kept["image_url"], pc.coalesce(kept["kept_alt"], kept["alt"]), kept["position"], kept["kind"], kept["width"], kept["height"],
                         pa.repeat(pa.scalar(source_file, pa.string()), n), kept["source_offset"]],
                        schema=LINK_SCHEMA,
                    )
                dropped = table.filter(pc.invert(table["kept"]))
                if dropped.num_rows:
                    n = dropped.num_rows
                    record_id = pc.binary_join_element_wise(dropped["link_id"], dropped["kind"], pc.cast(dropped["position"], pa.string()), ":")
                    yield beam.pvalue.TaggedOutput(
                        REJECTED,
                        pa.Table.from_arrays([record_id, pa.array([STAGE] * n, pa.string()), pa.array([REASON_DUPLICATE] * n, pa.string()), dropped["kind"], dropped["image_url"]], schema=REJECTED_SCHEMA),
                    )

    @staticmethod
    def _repeated(table, source_file):
        captures: dict = {}
        for page_url, offset, url, alt, position, kind, width, height in zip(*(table[c].to_pylist() for c in ("page_url", "source_offset", "image_url", "alt", "position", "kind", "width", "height"))):
            captures.setdefault(page_url, {}).setdefault(offset, []).append((url, alt, position, kind, width, height))
        for page_url, by_offset in captures.items():
            yield beam.pvalue.TaggedOutput(REPEATED, (page_url, pickle.dumps([(source_file, offset, links) for offset, links in by_offset.items()], protocol=pickle.HIGHEST_PROTOCOL)))


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
    """(page_url, [pickled captures, ...]) groups of the pages with several captures -> pyarrow
    tables of kept links (LINK_SCHEMA, about `batch_rows` rows each, the rest at the end of the
    bundle) and tables of rejected duplicates."""

    def __init__(self, batch_rows: int = 20000):
        self.batch_rows = batch_rows

    def start_bundle(self):
        self.rows: list[tuple] = []
        self.rejected: list[dict] = []

    def process(self, item):
        page_url, packed = item
        kept, rejected = collapse_page(page_url, [c for b in packed for c in pickle.loads(b)])
        self.rows += kept
        self.rejected += rejected
        if len(self.rows) + len(self.rejected) >= self.batch_rows:
            yield from self._tables(lambda x: x)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.timestamp import MIN_TIMESTAMP
        from apache_beam.utils.windowed_value import WindowedValue

        yield from self._tables(lambda x: WindowedValue(x, MIN_TIMESTAMP, [GlobalWindow()]))

    def _tables(self, wrap):
        if self.rows:
            columns = list(zip(*self.rows))
            self.rows = []
            yield wrap(pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, LINK_SCHEMA)], schema=LINK_SCHEMA))
        if self.rejected:
            table, self.rejected = rows_to_table(self.rejected, REJECTED_SCHEMA), []
            yield beam.pvalue.TaggedOutput(REJECTED, wrap(table))


class ExtractLinks(beam.PTransform):
    """Files (a PCollection of paths) -> {"input_count", "kept" (two PCollections of pyarrow
    tables: pages with one capture, pages with several), "rejected" (three PCollections of pyarrow
    tables: read and URL problems, duplicates of both)}. Spill files go under `spill_dir`."""

    def __init__(self, cfg: CrawlConfig, spill_dir: str):
        super().__init__()
        self.cfg = cfg
        self.spill_dir = spill_dir

    def expand(self, files):
        found = files | "Spread" >> beam.Reshuffle() | "ReadAndExtract" >> beam.ParDo(ExtractFileLinks(self.cfg, self.spill_dir)).with_outputs(REJECTED, CANDIDATES, PAGES, main="spills")
        repeated = beam.pvalue.AsSingleton(found[PAGES] | "RepeatedPages" >> beam.CombineGlobally(_RepeatedPages()))
        split = found.spills | "SplitSpills" >> beam.ParDo(SplitSpill(), repeated).with_outputs(REJECTED, REPEATED, main="kept")
        deduped = (
            split[REPEATED]
            | "GroupPages" >> beam.GroupByKey()
            | "Collapse" >> beam.ParDo(CollapseDuplicates()).with_outputs(REJECTED, main="kept")
        )
        of_tables(found[REJECTED], split.kept, split[REJECTED], deduped.kept, deduped[REJECTED])
        # not flattened: each is written by its own sink (the local runner would hold a Flatten
        # of outputs of different stages whole in memory)
        return {"input_count": found[CANDIDATES], "kept": (split.kept, deduped.kept), "rejected": (found[REJECTED], split[REJECTED], deduped[REJECTED])}


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
    # Arrow's buffers from glibc malloc rather than mimalloc, whose freed spans are purged and
    # faulted in again as freshly zeroed huge pages: ~0.3 CPU s at 35,000 pages (the spill batches,
    # their read-back, the parquet writes), and ~15 MB less at the peak (core/memory.py)
    system_arrow_pool()
    with StageOutput(out_dir, STAGE) as out:
        with _startup_heap_frozen(), stage_pipeline(beam_args) as p:  # (in process: the whole run, reading the spills back too)
            outputs = p | "Files" >> beam.Create(files) | "Extract" >> ExtractLinks(cfg, os.path.join(out.path, SPILL))
            # every count is tallied where its elements are made and summed by one combine; the file
            # and record problems are counted apart in stats.json too, from the rejected rows' reasons
            _ = outputs | "Write" >> WriteStageOutputs(out.path, STAGE, "links", LINK_SCHEMA, extra={"files": len(files)}, kept_tables=True, rejected_tables=True,
                                                       reason_stats={key: reason for reason, key in FILE_STATS.items()}, table_sinks=True)
        spill_dir = os.path.join(out.path, SPILL)
        if FileSystems.exists(spill_dir):
            FileSystems.delete([spill_dir])
        stats = out.commit()
    unreadable = stats.get("failed_files", 0) + stats.get("not_warc_files", 0)
    if unreadable == len(files):
        raise StageError(f"extract: none of the {len(files)} input files could be read ({unreadable} failed or not WARC/WAT; reasons in {out_dir}/rejected)")
    return stats
