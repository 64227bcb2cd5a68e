"""`pair`: ImageRecords -> same-page (condition, target) PairRecords with Beam.

Steps: from filter's occurrences (every fetched link, kept or not), flag boilerplate of each site
and of the crawl (pairing/boilerplate.py) -> join each image (one record) to its kept links (the
image on each of its pages; an image is `shared` when they name several pages) and drop the
boilerplate (the flags are a side input) -> per page: collapse near-duplicates, cap images per
page, pick in-band pairs (pairing/select.py) -> pairs of two shared images meet by their contents
so each (condition, target) content pair is kept once across pages; the rest are final -> write
pairs/ (each row carries what `shards` needs of its two images), images/, boilerplate/ (the flags),
rejected/, stats.json.

The three meetings (image with links, page with images, pairs by contents) are not shuffles held
by the runner: the records, packed (one bytes object each), are spilled into hash-bucket files
under the output's `.spill/` and read back one bucket at a time (pairing/spill.py), so pair's
memory does not grow with its input (issue 34).
"""

from __future__ import annotations

import collections
import os
import pickle
from typing import Optional

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from core.config import PairConfig, to_dict
from core.memory import no_side_input_cache, release_free_memory, system_arrow_pool
from core.records import BOILERPLATE_SCHEMA, COPY_CHECK_SCHEMA, COPY_SCHEMA, IMAGE_SCHEMA, OCCURRENCE_SCHEMA, PAIR_SCHEMA, REJECTED_SCHEMA, Rejected, rows_to_table
from core.sites import site_of
from core.stageio import MADE_FROM, StageError, StageOutput, WriteStageOutputs, _reason_counts, check_columns, check_made_from, frozen_gc, made_from, parquet_rows, remove_folder, row_groups, stage_pipeline, stage_files
from pairing.boilerplate import FlagBoilerplate, boilerplate_reason, flag_entry
from pairing.copies import COPY_OF_COUNT, COPY_OF_FILE, STAND_INS, COPIES, FindCopies, on_pages_with_copies, read_copy_of, records_on_several_pages
from pairing.select import page_outcome
from pairing.spill import BucketWriter, SpillByKey, bucket_count, in_order, read_groups

STAGE = "pair"
REJECTED = "rejected"
SHARED_PAIRS = "shared_pairs"
PAGES = "pages"  # the pages with a record, one count a page bucket (summed into stats.json)
SPILL = ".spill"  # the joins' spill files, in the stage's temporary output; removed when the pipeline ends


def record_id(r: dict) -> str:
    """Id of one input record: the link (an image id is shared by every page that shows the image)."""
    return r["link_id"]


def _mark(r: dict, shared: bool, flags: dict, cfg: PairConfig):
    """A record on its page: rejected if its content or image URL was flagged as boilerplate of its
    site or of the crawl (`flags`: a side input of the flags only, a small fraction of all keys),
    else (page_url, packed record with its `shared` flag) on its way to the page buckets."""
    found = boilerplate_reason(site_of(r["page_url"]), r["phash"], r["image_url"], flags, cfg)
    if found:
        return None, Rejected(record_id(r), STAGE, found[0], found[1], r["image_url"]).to_row()
    r["_shared"] = shared
    return (r["page_url"], pack(r, PAGE_SPILL_FIELDS)), None


class JoinBucket(beam.DoFn):
    """(bucket, [(name, spill file)]) of the images and kept links spilled by image id (or, with
    the copy step, by the kept dress's id) -> each image on each of its pages (its page, URL, alt
    and position are the link's), boilerplate rejected, the rest spilled by page for the page
    buckets (the main output: the files). Each record carries whether its image is `shared`: seen
    on several pages (its kept links name more than one page) or a kept dress of the copy step (a
    dress that stands in for others); only pairs of two shared images can recur on another page.
    With `copies`, pairing/copies.py `on_pages_with_copies` makes the records (and the rejected
    links of the other dresses, their `copies` rows, and the pages a kept dress stands in on).

    Nothing a bucket makes is held or emitted row by row. One bucket's images and links are in
    memory at a time, packed, and each thing made is written as it is made:
    * each record, spilled by its page (pairing/spill.py BucketWriter under `spill_dir`/pages/);
      the main output is only the (bucket, ("pages", path)) of each file, when the bundle ends;
    * the rejected rows and the copies rows, into the stage's own output files (core/stageio.py
      `TableFile`: `out_dir`/rejected/join-*, `out_dir`/copies/part-*), REJECTED_TABLE_ROWS rows a
      row group; tag WRITTEN hands on each (sink path, file) when the bundle ends, and the stage's
      stats step names them. They are counted here: tag REJECTED_COUNTS ({reason: rows}) and
      COPIES (rows), one element a bundle; STAND_INS, one count a bucket.
    A key's records are never held together (a photo copied on 19,306 pages was one key at 16x).
    On Dask a step's outputs are one list in its worker until the bundle ends and every consumer
    ran: before the join spilled its records and wrote its rows itself, the records (~20,000 for
    the hub's bucket), then its rejected and copies rows as tables (11.6 MB for the hub's bucket at
    16x, 17.8 MB with the second bucket of its bundle) waited there, on top of the bucket being
    joined (issue 34)."""

    def __init__(self, cfg: PairConfig, copies: bool, spill_dir: str, buckets: int, out_dir: str):
        self.cfg, self.copies = cfg, copies
        self.spill_dir, self.buckets = spill_dir, buckets
        self.out_dir = out_dir

    def start_bundle(self):
        from core.stageio import TableFile

        release_free_memory()  # what the steps before left freed (the copy step's), once a bundle
        self.pages = BucketWriter(self.spill_dir, "pages", self.buckets, JOIN_BUFFER_BYTES)
        self.rejected = _RowFile(TableFile(join_rejected_sink(self.out_dir), REJECTED_SCHEMA))
        self.copy_rows = _RowFile(TableFile(copies_sink(self.out_dir), COPY_SCHEMA))

    def finish_bundle(self):
        for ref in self.pages.close():
            yield GlobalWindows.windowed_value(ref)
        for file in (self.rejected, self.copy_rows):
            written = file.close()  # the rows it still held written first, then counted
            if written is not None:
                yield beam.pvalue.TaggedOutput(WRITTEN, GlobalWindows.windowed_value(written))
        reasons, copy_rows = self.rejected.reasons, self.copy_rows.rows
        if reasons:
            yield beam.pvalue.TaggedOutput(REJECTED_COUNTS, GlobalWindows.windowed_value(dict(reasons)))
        if copy_rows:
            yield beam.pvalue.TaggedOutput(COPIES, GlobalWindows.windowed_value(copy_rows))

    def process(self, item, flags):
        _, listed = item
        paths: dict = {"image": [], "links": []}
        for name, path in listed:
            paths[name].append(path)
        images, links = read_groups(paths["image"]), read_groups(paths["links"])
        cfg = self.cfg
        stand_ins = 0  # the pages a kept dress stands in on, leaving as one count a bucket
        for key in in_order(images.keys() | links.keys()):
            packed, group_links = images.pop(key, []), links.pop(key, [])
            if not self.copies and not packed:
                if group_links:
                    raise StageError(f"pair: image {key} of the filter occurrences is missing from its images/")
                continue
            # whether the key's records are `shared` is known before any is made (a kept dress of
            # several, copy_of's values, is shared; else when its records stand on several pages),
            # so each record is marked and leaves as it comes: nothing is held for a key but its
            # packed links, however many pages an image (or a photo's copies) is on (issue 34)
            grouped = {"image": packed if self.copies else packed[:1], "links": group_links}
            fields = COPY_JOIN_FIELDS if self.copies else IMAGE_JOIN_FIELDS
            shared = len(set(packed)) > 1 if self.copies else False
            shared = shared or records_on_several_pages(grouped, fields, LINK_FIELDS)
            made = on_pages_with_copies((key, grouped), fields, LINK_FIELDS, STAGE) if self.copies else _on_pages(packed[0], group_links)
            for out in made:
                if not isinstance(out, beam.pvalue.TaggedOutput):
                    on_page, row = _mark(out, shared, flags, cfg)
                    if on_page is not None:
                        self.pages.add(*on_page)
                    else:
                        self.rejected.add(row)
                elif out.tag == REJECTED:
                    self.rejected.add(out.value)
                elif out.tag == COPIES:
                    self.copy_rows.add(out.value)
                elif out.tag == STAND_INS:
                    stand_ins += 1
                else:
                    raise ValueError(f"pair: unexpected output {out.tag!r} of the copy join")
            del grouped, packed, group_links
        if stand_ins:
            yield beam.pvalue.TaggedOutput(STAND_INS, stand_ins)


REJECTED_TABLE_ROWS = 1024  # rejected (and copies) rows the join holds before it writes them as a row group
JOIN_BUFFER_BYTES = 1 << 20  # the records the join holds before it spills them by page: its bucket's peak (the spills
# before it, with no bucket in memory, hold BUFFER_BYTES). At 4 MB the hub's bucket at scale.py's 16x (a photo on
# ~20,000 pages, a page bucket each ~120 records) rose 5 MB more in resident memory (30 vs 25 MB, replayed; issue 34)
WRITTEN = "written"  # the join's tag of the (sink path, file) of each file it wrote (core/stageio.py TableFile)
REJECTED_COUNTS = "rejected_counts"  # ... and of its rejected rows' {reason: rows}, one a bundle


def join_rejected_sink(out_dir: str) -> str:
    """Where the join writes its rejected rows: rejected/join-*.parquet beside the page step's
    rejected/part-*.parquet (each sink names its own files)."""
    return os.path.join(out_dir, REJECTED, "join")


def copies_sink(out_dir: str) -> str:
    return os.path.join(out_dir, COPIES, "part")


class _RowFile:
    """Rows (dicts of its file's schema) written to a `TableFile` REJECTED_TABLE_ROWS at a time;
    counts them (`rows`) and, for rejected rows, their reasons (`reasons`)."""

    def __init__(self, file):
        self.file, self.pending = file, []
        self.rows, self.reasons = 0, collections.Counter()

    def add(self, row: dict) -> None:
        self.pending.append(row)
        if len(self.pending) >= REJECTED_TABLE_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            table = rows_to_table(self.pending, self.file.schema)
            if "reason" in table.schema.names:  # counted as the stage's sinks count rejected tables
                self.reasons.update(_reason_counts(table))
            self.rows += table.num_rows
            self.file.write(table)
            self.pending = []

    def close(self):
        self._flush()
        return self.file.close()


def _on_pages(packed_image: bytes, group_links: list):
    """One image (packed) on the page of each of its links (packed), made one at a time: its page,
    URL, alt and position are the link's."""
    base = unpack(packed_image, IMAGE_JOIN_FIELDS)
    for b in group_links:
        link = unpack(b, LINK_FIELDS)
        r = dict(base)
        r.update(link_id=link["link_id"], page_url=link["page_url"], image_url=link["image_url"], alt=link["alt"] or "", position=link["position"] or 0)
        yield r


def pack(row: dict, names: tuple) -> bytes:
    """A record as one bytes object (its values in `names` order) for a shuffle: the local runner
    holds shuffled values as Python objects, and a dict with its own key strings costs several
    times its packed size."""
    return pickle.dumps(tuple(row[n] for n in names), protocol=pickle.HIGHEST_PROTOCOL)


def unpack(data: bytes, names: tuple) -> dict:
    return dict(zip(names, pickle.loads(data)))


def _page(page_url: str, records: list, cfg: PairConfig, shared: set, out: dict, contents: BucketWriter) -> None:
    """One page's outcome. A pair can recur on another page only when both its images are `shared`
    (seen on several pages): those go to the cross-page dedup, spilled by their contents to
    `contents`; the rest are final here (out["pairs"]), so the dedup carries only the few pairs
    that may be duplicates. Kept images go to out["kept"] (as written), rejected rows to
    out["rejected"]."""
    pairs, kept, dropped = page_outcome(page_url, records, cfg)
    by_id = {r["image_id"]: r for r in kept}
    for p in pairs:
        # the row carries both images' info for `shards`
        row = p.to_row(by_id[p.cond_image_id], by_id[p.target_image_id])
        if p.cond_image_id in shared and p.target_image_id in shared:
            contents.add(f"{p.cond_image_id}\x1f{p.target_image_id}", pack(row, PAIR_FIELDS))
        else:
            out["pairs"].append(row)
    out["kept"] += (_for_parquet(r) for r in kept)
    for r, reason, detail in dropped:
        out["rejected"].append(Rejected(record_id(r), STAGE, reason, detail, r["image_url"]).to_row())


TABLE_ROWS = 512  # rows of one output table (one row group): what a bucket step holds of its outputs
OUTPUT_SCHEMAS = {"kept": IMAGE_SCHEMA, "pairs": PAIR_SCHEMA, REJECTED: REJECTED_SCHEMA}


def _tables(out: dict, at_least: int):
    """The rows collected in `out` ({tag: rows}) as pyarrow tables, for each tag holding at least
    `at_least` rows (the main output is "kept"); each producer's tables are written as they come by
    its own sink, so nothing is held between steps."""
    for tag, rows in out.items():
        if rows and len(rows) >= at_least:
            table = rows_to_table(rows, OUTPUT_SCHEMAS[tag])
            rows.clear()
            yield table if tag == "kept" else beam.pvalue.TaggedOutput(tag, table)


class PagesOfBucket(beam.DoFn):
    """(bucket, [(name, spill file)]) of the records spilled by page -> each page's outcome
    (`_page`), pages in URL order; kept images, final pairs and rejected rows as tables of up to
    TABLE_ROWS rows, and the bucket's count of pages (tag PAGES). One bucket in memory at a time.
    The pairs of two shared images are spilled by their contents under `spill_dir`/contents/ as
    they are made, and the files leave (tag SHARED_PAIRS: (bucket, ("contents", path))) when the
    bundle ends: on Dask a step's outputs are one list in its worker until every consumer ran,
    and a bundle's ~6,000 pairs and a count element per page waited there (issue 34)."""

    def __init__(self, cfg: PairConfig, spill_dir: str, buckets: int):
        self.cfg, self.spill_dir, self.buckets = cfg, spill_dir, buckets

    def start_bundle(self):
        self.contents = BucketWriter(self.spill_dir, "contents", self.buckets)

    def process(self, item):
        _, listed = item
        groups = read_groups(path for _, path in listed)
        out: dict = {"kept": [], "pairs": [], REJECTED: []}
        pages = 0
        for page_url in in_order(groups):
            records = sorted((unpack(b, PAGE_SPILL_FIELDS) for b in groups.pop(page_url)), key=lambda r: r["link_id"])
            shared = {r["image_id"] for r in records if r.pop("_shared")}
            pages += 1
            _page(page_url, records, self.cfg, shared, out, self.contents)
            yield from _tables(out, TABLE_ROWS)
        yield from _tables(out, 1)
        if pages:
            yield beam.pvalue.TaggedOutput(PAGES, pages)

    def finish_bundle(self):
        for ref in self.contents.close():
            yield beam.pvalue.TaggedOutput(SHARED_PAIRS, GlobalWindows.windowed_value(ref))


def _first_page_wins(item):
    """(bucket, [(name, spill file)]) of the pairs of two shared images, spilled by their contents
    -> per (condition, target) contents the pair of the first page (by URL), as tables of up to
    TABLE_ROWS rows; the others' ids as duplicates."""
    _, listed = item
    groups = read_groups(path for _, path in listed)
    unique: list = []
    for key in in_order(groups):
        pairs = sorted((unpack(b, PAIR_FIELDS) for b in groups.pop(key)), key=lambda p: p["page_url"])
        unique.append(pairs[0])
        for p in pairs[1:]:
            yield beam.pvalue.TaggedOutput("duplicate_pairs", p["pair_id"])
        if len(unique) >= TABLE_ROWS:
            yield rows_to_table(unique, PAIR_SCHEMA)
            unique = []
    if unique:
        yield rows_to_table(unique, PAIR_SCHEMA)


class PairImages(beam.PTransform):
    """{"images": (file, row group) items of filter's images files (`read_images`: one record per
    distinct image), "links": the same of filter's occurrences files (`read_kept_links`: the kept
    links' link_id, image_id, page_url, image_url, alt, position), each read in the step that
    spills it, "kept_counts": how many links filter kept, one count a row group of its occurrences
    (`kept_link_count`), "occurrences": the (file, row group) items of filter's occurrences again,
    each read by the boilerplate flags' spills (`read_occurrences`: page_url, site, image_url,
    phash of every downloaded link)} -> {"input_count": the kept links (and with the copy step the
    pages a kept dress stands in on, one count a bucket), "kept" image-on-page records,
    "rejected" (the page step's tables), "pairs", "deduped_pairs", "duplicate_pairs", "pages",
    "boilerplate" flags, and the join's "written" files (its rejected rows, and with the copy step
    its copies rows, written under `out_dir` as it makes them: `JoinBucket`) with their counts,
    "rejected_counts" and "copies"}.

    The records meet their keys' other records in spill files under `spill_dir` (pairing/spill.py:
    `buckets` hash buckets, one bucket in memory at a time) instead of in the runner's shuffles:
    images with their links by image id, then image-on-page records by page, then the pairs of
    two shared images by their contents."""

    def __init__(self, cfg: PairConfig, feature_dir: str = "", spill_dir: str = "", buckets: int = 1, out_dir: str = ""):  # feature_dir: needed with cfg.copies
        super().__init__()
        if not spill_dir or not out_dir:
            raise ValueError("PairImages needs a folder for its spill files (spill_dir) and the stage's output folder (out_dir)")
        self.out_dir = out_dir
        self.cfg = cfg
        self.feature_dir = feature_dir  # the copy step's features (pairing/copies.py FindCopies)
        self.spill_dir, self.buckets = spill_dir, buckets

    def expand(self, pcolls):
        images, occurrences, links, kept_counts = pcolls["images"], pcolls["occurrences"], pcolls["links"], pcolls["kept_counts"]
        cfg, spill_dir, buckets = self.cfg, self.spill_dir, self.buckets
        out: dict = {}
        copies = "copy_light" in pcolls
        # 0. each image (one row) back on its pages, through the kept links of filter's occurrences;
        #    with the copy step (pairing/copies.py), every dress of a photo joins on the group's kept
        #    dress: the others' links are rejected and the kept dress stands in on their pages
        #    (each record keyed and packed in its spill's step: `keyed`)
        if copies:
            found = {"light": pcolls["copy_light"]} | "FindCopies" >> FindCopies(cfg, self.feature_dir)
            # the keyed steps read copy_of from its file (once a bundle; pairing/copies.py
            # read_copy_of), not as a dict side input that the runner keeps held after each step
            side, load = (beam.pvalue.AsList(found[COPY_OF_FILE]),), read_copy_of
            key_image = lambda r, c: (c.get(r["image_id"], r["image_id"]), pack(r, COPY_JOIN_FIELDS))  # noqa: E731
            key_link = lambda r, c: (c.get(r["image_id"], r["image_id"]), pack(r, LINK_FIELDS))  # noqa: E731
        else:
            side, load = (), None
            key_image = lambda r: (r["image_id"], pack(r, IMAGE_JOIN_FIELDS))  # noqa: E731
            key_link = lambda r: (r["image_id"], pack(r, LINK_FIELDS))  # noqa: E731
        # 1. boilerplate of a site or of the crawl, by content (pHash neighbourhood) and by URL,
        #    counted on every fetched link (filter's occurrences), before any threshold dropped a copy
        flags = occurrences | "FlagBoilerplate" >> FlagBoilerplate(cfg, pcolls.get("sites"), spill_dir=spill_dir, buckets=buckets, read=read_occurrences)
        flag_dict = flags | "FlagKeys" >> beam.Map(flag_entry)  # (16-byte digest, pages): half the memory of the (scope, kind, key) tuples
        # 2. the join, one image bucket at a time; the flagged records are rejected there
        spilled = (
            images | "SpillImages" >> beam.ParDo(SpillByKey(spill_dir, "image", buckets, key_image, load, read=read_images), *side),
            links | "SpillLinks" >> beam.ParDo(SpillByKey(spill_dir, "links", buckets, key_link, load, read=read_kept_links), *side),
        )
        joined = (
            spilled | "ImageBuckets" >> beam.Flatten() | "GroupImageBuckets" >> beam.GroupByKey()
            | "JoinPages" >> beam.ParDo(JoinBucket(cfg, copies, spill_dir, buckets, self.out_dir), beam.pvalue.AsDict(flag_dict)).with_outputs(WRITTEN, REJECTED_COUNTS, COPIES, STAND_INS, main="page_files")
        )
        if copies:
            out.update(copies=joined[COPIES], copy_checks=found["checks"], copy_candidates=found["candidate_count"], copy_stand_ins=joined[STAND_INS], copy_images_read=found["images_read"],
                       copy_images_removed=found[COPY_OF_COUNT], copy_pairs_verified=found["checks"] | "Verified" >> beam.Filter(lambda r: r["copy"]))
        # 3. per page, one page bucket at a time (the join spilled them): near-duplicates, cap, in-band pairs
        per_page = (
            joined.page_files | "GroupPageBuckets" >> beam.GroupByKey()
            | "PerPage" >> beam.ParDo(PagesOfBucket(cfg, spill_dir, buckets)).with_outputs(REJECTED, "pairs", SHARED_PAIRS, PAGES, main="kept")
        )
        # 4. the same (condition, target) contents from several pages: keep one
        deduped = (
            per_page[SHARED_PAIRS] | "GroupContentBuckets" >> beam.GroupByKey()
            | "FirstPage" >> beam.FlatMap(_first_page_wins).with_outputs("duplicate_pairs", main="unique")
        )
        # the page step's rejected rows leave as tables for the stage's sink; the join writes its own
        # (with its copies rows), and hands on the files and their counts
        rejected = (per_page[REJECTED],)
        out.update(written=joined[WRITTEN], rejected_counts=joined[REJECTED_COUNTS])
        if copies:  # the input: every kept link, and every page a kept dress stands in on (counted per bucket)
            out.update(input_count=(kept_counts, out["copy_stand_ins"]), links=kept_counts)
        else:
            out["input_count"] = kept_counts
        return {
            **out,
            "kept": per_page.kept,
            "rejected": rejected,
            "pairs": per_page.pairs,  # final where they are made (not flattened with the next:
            "deduped_pairs": deduped.unique,  # a flatten across stages would hold every pair)
            "duplicate_pairs": deduped.duplicate_pairs,
            "pages": per_page[PAGES],
            "boilerplate": flags,
        }


# Pairing never needs the image bytes: records travel without them (a pointer stays), and the
# embedding travels as a compact float16 array instead of a Python list.
META_COLUMNS = [f.name for f in IMAGE_SCHEMA if f.name not in ("image_bytes", "bytes_file", "bytes_row_group")]
LINK_COLUMNS = ["link_id", "image_id", "page_url", "image_url", "alt", "position"]  # a kept link
LINK_FIELDS = ("link_id", "image_id", "page_url", "image_url", "alt", "position")  # ... as it crosses the join
OCCURRENCE_COLUMNS = ["page_url", "site", "image_url", "phash"]  # what the boilerplate flags read
IMAGE_FIELDS_IN = tuple(META_COLUMNS) + ("bytes_file", "bytes_row_group")  # an image as it is read
IMAGE_FIELDS = IMAGE_FIELDS_IN + ("link_id",)  # an image on a page, as it travels
PAGE_FIELDS = ("page_url", "image_url", "alt", "position")  # an image's, on a page: its link's
IMAGE_JOIN_FIELDS = tuple(f for f in IMAGE_FIELDS_IN if f not in PAGE_FIELDS)  # what the join carries
COPY_JOIN_FIELDS = IMAGE_JOIN_FIELDS + ("image_url",)  # ... with the copy step: a kept dress's URL too
PAIR_FIELDS = tuple(PAIR_SCHEMA.names)
PAGE_SPILL_FIELDS = IMAGE_FIELDS + ("_shared",)  # an image on a page in the page buckets


def _compact(row: dict) -> dict:
    import numpy as np

    row["embedding"] = np.asarray(row["embedding"], dtype=np.float16) if row["embedding"] is not None else None
    return row


def embedding_arrays(column) -> list:
    """A row group's embedding column (a pyarrow list array, or the null type) -> per row a float16
    NumPy array (None where null): what `_compact` makes of each row's Python list, without the
    list. Values are cast from the column's float type as NumPy casts the list's Python floats (those
    hold the stored values exactly), so the arrays are equal bit for bit."""
    import numpy as np
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_null(column.type):
        return [None] * len(column)
    offsets = column.offsets.to_numpy().tolist()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float16)
    valid = column.is_valid().to_numpy(zero_copy_only=False).tolist()
    return [values[offsets[i] : offsets[i + 1]].copy() if valid[i] else None for i in range(len(column))]


def read_images(item: tuple[str, int]):
    """(file, row group) of filter's images files (`core.stageio.row_groups`) -> one record per row
    (META_COLUMNS, no bytes) with its pointer (`bytes_file`, `bytes_row_group`) and its embedding as
    a float16 array, the embeddings taken from the column (a Python list of floats per row cost
    ~25 us). PairImages reads a row group in the step that spills its records (pairing/spill.py
    SpillByKey `read`): on Dask one partition each, so a worker holds one row group's records, not
    a file's, and only once the step's side inputs are ready (issue 34)."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    path, rg = item
    with FileSystems.open(path) as fh:
        table = pq.ParquetFile(fh).read_row_group(rg, columns=META_COLUMNS)
    embeddings = embedding_arrays(table.column("embedding"))
    for row, embedding in zip(table.drop_columns(["embedding"]).to_pylist(), embeddings):
        row["embedding"], row["bytes_file"], row["bytes_row_group"] = embedding, path, rg
        yield row


def read_occurrences(item: tuple[str, int]):
    """(file, row group) of filter's occurrences -> OCCURRENCE_COLUMNS of each row (every
    downloaded link), READ_BATCH rows at a time: what the boilerplate flags count."""
    from core.stageio import READ_BATCH, parquet_batches

    for batch in parquet_batches(item, OCCURRENCE_COLUMNS, READ_BATCH):
        yield from batch.to_pylist()


def kept_link_count(item: tuple[str, int]) -> int:
    """(file, row group) of filter's occurrences -> how many of its links filter kept (filter_reason
    null), from that column alone."""
    from core.stageio import READ_BATCH, parquet_batches

    return sum(batch.column(0).null_count for batch in parquet_batches(item, ["filter_reason"], READ_BATCH))


def read_kept_links(item: tuple[str, int]):
    """(file, row group) of filter's occurrences -> its kept links (LINK_COLUMNS; filter_reason
    null), READ_BATCH rows at a time (read where they are spilled, as `read_images`)."""
    import pyarrow.compute as pc

    from core.stageio import READ_BATCH, parquet_batches

    for batch in parquet_batches(item, LINK_COLUMNS + ["filter_reason"], READ_BATCH):
        yield from batch.filter(pc.is_null(batch.column("filter_reason"))).select(LINK_COLUMNS).to_pylist()


def _for_parquet(row: dict) -> dict:
    row = dict(row)
    if row.get("embedding") is not None:
        row["embedding"] = row["embedding"].tolist()
    row["image_bytes"] = None
    row.pop("link_id", None)
    return row


def run_pair(input_path: str, out_dir: str, cfg: PairConfig, beam_args=None) -> dict:
    """Run the pairing pipeline on a filter stage directory; returns reconciled stats."""
    files = stage_files(input_path, "images", expected="filter")
    check_columns(files, IMAGE_SCHEMA, input_path, "filter")
    occurrence_files = stage_files(input_path, "occurrences", expected="filter")
    if not occurrence_files:
        raise StageError(f"{input_path} has no occurrences/ (written by an older `webpairs filter`): run `webpairs filter` into it again")
    check_columns(occurrence_files, OCCURRENCE_SCHEMA, input_path, "filter")
    check_made_from(input_path, "webpairs filter")  # filter's pointers into download still hold
    system_arrow_pool()  # core/memory.py: less memory held at the peak than mimalloc
    with frozen_gc(), StageOutput(out_dir, STAGE) as stage_out:
        _pair_pipeline(files, occurrence_files, stage_out.path, cfg, beam_args, stage_files(input_path, "sites", expected="filter"), made_from(input_path))
        return stage_out.commit()


def copy_inputs(p, files: list[str], prefix: str = "Copy"):
    """What the copy step (pairing/copies.py FindCopies) takes of filter's images: the images files,
    of which its candidate search reads (image_id, float16 embedding, pHash, (file, row group))
    column by column on its one worker (`LightRows`; the row group is the pointer to the image's
    bytes). No bytes: FindCopies reads only the candidates' bytes, through these pointers. (It took
    one element per image before: 20,000 rows crossed the runner, pickled, to be collected in one
    list.)"""
    return p | f"{prefix}Files" >> beam.Create(sorted(files))


def _pair_pipeline(files: list[str], occurrence_files: list[str], out_dir: str, cfg: PairConfig, beam_args, site_files: tuple = (), made: Optional[dict] = None) -> None:
    feature_dir = out_dir.rstrip("/") + "/_copy_features"  # the copy step's features, removed when the pipeline is done
    spill_dir = out_dir.rstrip("/") + "/" + SPILL  # the joins' buckets, likewise
    try:
        _pair_steps(files, occurrence_files, out_dir, cfg, beam_args, site_files, feature_dir, spill_dir, made)
    finally:
        for folder in (feature_dir, spill_dir):
            remove_folder(folder)


def _pair_steps(files, occurrence_files, out_dir, cfg, beam_args, site_files, feature_dir, spill_dir, made: Optional[dict] = None) -> None:
    import os

    buckets = bucket_count(parquet_rows(occurrence_files))  # a few thousand links a bucket

    # no_side_input_cache: in process, each step's side inputs (copy_of, the flags...) are dropped
    # when its bundle ends instead of kept by the runner's worker to the end (core/memory.py)
    with no_side_input_cache(), stage_pipeline(beam_args) as p:
        # filter's occurrences, one element per row group, each read READ_BATCH rows at a time: on
        # Dask a row group is a partition (ReadAllFromParquet made every row of the input one
        # partition there, held as dicts: 2.5 GB a worker at one Common Crawl file, issue 34)
        # (the boilerplate flags' spills read them: no step's output holds a row group's rows)
        groups = row_groups(occurrence_files)
        occurrences = p | "OccurrenceGroups" >> beam.Create(groups)
        # the kept links, counted (one count a row group, from its filter_reason column) and read
        # whole for the join (a row group's 34,000 links as dicts were the counts' input: issue 34)
        kept_counts = p | "KeyGroups" >> beam.Create(groups) | "CountKept" >> beam.Map(kept_link_count)
        # the kept links and the images: (file, row group) items, each read in the step that spills
        # it (PairImages), which with the copy step waits for the copy map; a second Create keeps
        # the full read in the stage that waits for the boilerplate flags, so the records stream
        # into the page shuffle instead of being held for that stage
        links = p | "LinkGroups" >> beam.Create(groups)
        images = p | "ImageGroups" >> beam.Create(row_groups(files))
        inputs = {"images": images, "occurrences": occurrences, "links": links, "kept_counts": kept_counts}
        if cfg.copies:  # the copy step reads the embeddings, pHashes and pointers; later only the candidates' bytes
            inputs["copy_light"] = copy_inputs(p, files)
        if site_files:  # each site's pages in the crawl (download's, passed on by filter)
            inputs["sites"] = p | "SiteFiles" >> beam.Create(site_files) | "ReadSites" >> beam.io.ReadAllFromParquet()
        out = inputs | "Pair" >> PairImages(cfg, feature_dir, spill_dir, buckets, out_dir)
        tables = []
        for name, prefix in (("pairs", "part"), ("deduped_pairs", "deduped")):  # both into pairs/, tables as they come
            pairs = out.pop(name)
            _ = pairs | f"Write_{name}" >> beam.io.WriteToParquetBatched(os.path.join(out_dir, "pairs", prefix), PAIR_SCHEMA, file_name_suffix=".parquet")
            tables.append(pairs)
        out["pairs"] = tuple(tables)  # counted once, by their rows
        more = {"boilerplate": BOILERPLATE_SCHEMA}
        written = {join_rejected_sink(out_dir): REJECTED_SCHEMA}  # the files the join writes itself (JoinBucket)
        if cfg.copies:
            more.update(copy_checks=COPY_CHECK_SCHEMA)
            written[copies_sink(out_dir)] = COPY_SCHEMA
        _ = out | "Write" >> WriteStageOutputs(out_dir, STAGE, "images", IMAGE_SCHEMA, extra={"config": to_dict(cfg), **({MADE_FROM: made} if made else {})}, more=more, kept_tables=True, rejected_tables=True, written=written,
                                                 table_counts=("pairs",), given_counts=("copies", "links", "copy_candidates", "copy_images_removed", "copy_stand_ins", "pages"))
