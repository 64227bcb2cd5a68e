"""`pair`: ImageRecords -> same-page (condition, target) PairRecords with Beam.

Steps: from a light read of (image id, pHash, page, URL), flag boilerplate (content on more than K
pages, found by pHash with LSH banding so only band-mates are compared, and image URLs on more than
K pages) and the images seen on several pages -> read the records and drop the boilerplate (the
flags are side inputs) -> GroupByKey(page_url) -> collapse near-duplicates, cap images per page,
pick in-band pairs (pairing/select.py) -> pairs of two shared images go through a GroupByKey on
their contents so each (condition, target) content pair is kept once across pages; the rest are
final -> write pairs/ (each row carries what `shards` needs of its two images), images/, rejected/,
stats.json. Records cross the shuffles packed (one bytes object each).
"""

from __future__ import annotations

import pickle

import apache_beam as beam

from core.config import PairConfig, to_dict
from core.records import IMAGE_SCHEMA, PAIR_SCHEMA, Rejected, stable_id
from core.stageio import ROW_GROUP_BYTES, ReadParquetWithPointers, StageOutput, WriteStageOutputs, check_columns, pipeline_options, stage_files
from pairing.select import band_keys, boilerplate_phashes, page_outcome

STAGE = "pair"
REJECTED = "rejected"
BOILERPLATE = "boilerplate"
SHARED_PAIRS = "shared_pairs"


def record_id(r: dict) -> str:
    """Id of one input ImageRecord: an image id is shared by every page that shows the image."""
    return f"{r['image_id']}@{stable_id(r['page_url'], str(r['position']), length=10)}"


class CappedSet(beam.CombineFn):
    """Distinct values, keeping at most `cap` (enough to tell 'more than K' apart, bounded memory)."""

    def __init__(self, cap: int):
        self.cap = cap

    def create_accumulator(self):
        return set()

    def add_input(self, acc, value):
        if len(acc) < self.cap:
            acc.add(value)
        return acc

    def merge_accumulators(self, accs):
        out = set()
        for a in accs:
            for v in a:
                if len(out) >= self.cap:
                    return out
                out.add(v)
        return out

    def extract_output(self, acc):
        return acc


class MarkBoilerplate(beam.DoFn):
    """Reject records whose pHash or image URL was flagged as boilerplate (side inputs: the flagged
    keys only, a small fraction of all keys); pass the others through."""

    def __init__(self, k: int):
        self.k = k

    def process(self, r, bad_phash, bad_url):
        if r["phash"] in bad_phash:
            yield beam.pvalue.TaggedOutput(REJECTED, Rejected(record_id(r), STAGE, BOILERPLATE, f"content on more than {self.k} pages", r["image_url"]).to_row())
        elif r["image_url"] in bad_url:
            yield beam.pvalue.TaggedOutput(REJECTED, Rejected(record_id(r), STAGE, BOILERPLATE, f"URL on more than {self.k} pages", r["image_url"]).to_row())
        else:
            yield r


def pack(row: dict, names: tuple) -> bytes:
    """A record as one bytes object (its values in `names` order) for a shuffle: the local runner
    holds shuffled values as Python objects, and a dict with its own key strings costs several
    times its packed size."""
    return pickle.dumps(tuple(row[n] for n in names), protocol=pickle.HIGHEST_PROTOCOL)


def unpack(data: bytes, names: tuple) -> dict:
    return dict(zip(names, pickle.loads(data)))


def _bands(phash_pages: tuple, max_distance: int):
    """(band key, packed (pHash, its pages)) for each LSH band of the pHash."""
    packed = pickle.dumps(phash_pages, protocol=pickle.HIGHEST_PROTOCOL)
    return [(b, packed) for b in band_keys(phash_pages[0], max_distance)]


def _page(item, cfg: PairConfig, shared: dict):
    """One page's outcome. A pair can recur on another page only when both its images are `shared`
    (seen on several pages): those go to the cross-page dedup, keyed by contents; the rest are
    final here, so the dedup shuffle carries only the few pairs that may be duplicates."""
    page_url, packed = item
    pairs, kept, rejected = page_outcome(page_url, [unpack(b, IMAGE_FIELDS) for b in packed], cfg)
    by_id = {r["image_id"]: r for r in kept}
    for p in pairs:
        # the row carries both images' info for `shards`
        row = p.to_row(by_id[p.cond_image_id], by_id[p.target_image_id])
        if p.cond_image_id in shared and p.target_image_id in shared:
            yield beam.pvalue.TaggedOutput(SHARED_PAIRS, ((p.cond_image_id, p.target_image_id), pack(row, PAIR_FIELDS)))
        else:
            yield beam.pvalue.TaggedOutput("pairs", row)
    for r in kept:
        yield r
    for r, reason, detail in rejected:
        yield beam.pvalue.TaggedOutput(REJECTED, Rejected(record_id(r), STAGE, reason, detail, r["image_url"]).to_row())


def _first_page_wins(item):
    _, packed = item
    pairs = sorted((unpack(b, PAIR_FIELDS) for b in packed), key=lambda p: p["page_url"])
    yield pairs[0]
    for p in pairs[1:]:
        yield beam.pvalue.TaggedOutput("duplicate_pairs", p["pair_id"])


class _OnMorePages(beam.PTransform):
    """Key records -> (value, True) for each value of `field` seen on more than `more_than` distinct
    pages (a capped set of pages per value: bounded memory however common the value)."""

    def __init__(self, field: str, more_than: int):
        super().__init__()
        self.field, self.more_than = field, more_than

    def expand(self, keys):
        field, more_than = self.field, self.more_than
        return (
            keys
            | "ValuePage" >> beam.Map(lambda r: (r[field], r["page_url"]))
            | "PagesPerValue" >> beam.CombinePerKey(CappedSet(more_than + 1))
            | "OnMorePages" >> beam.Filter(lambda kv: len(kv[1]) > more_than)
            | "Flag" >> beam.Map(lambda kv: (kv[0], True))
        )


class PairImages(beam.PTransform):
    """{"keys": (image_id, phash, page_url, image_url) records, "images": ImageRecords} ->
    {"input", "kept" images, "rejected", "pairs", "deduped_pairs", "duplicate_pairs", "pages"}.

    `keys` is a light second read of the same input: the boilerplate counts come from it, so the
    full records are shuffled once (by page), not once per boilerplate check."""

    def __init__(self, cfg: PairConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, pcolls):
        keys, images = pcolls["keys"], pcolls["images"]
        cfg, k = self.cfg, self.cfg.boilerplate_pages
        # 1. boilerplate by content: pages per pHash (capped), then pHash-close neighbours via LSH bands
        phash_pages = keys | "PhashPage" >> beam.Map(lambda r: (r["phash"], r["page_url"])) | "PagesPerPhash" >> beam.CombinePerKey(CappedSet(k + 1))
        bad_phash = (
            phash_pages
            | "Bands" >> beam.FlatMap(_bands, cfg.boilerplate_phash_distance)
            | "GroupBands" >> beam.GroupByKey()
            | "Neighbourhoods" >> beam.FlatMap(lambda kv: boilerplate_phashes([pickle.loads(b) for b in kv[1]], cfg.boilerplate_phash_distance, k))
            | "DistinctPhash" >> beam.Distinct()
            | "FlagPhash" >> beam.Map(lambda h: (h, True))
        )
        # 2. boilerplate by URL: the same image URL on more than K pages
        bad_url = keys | "UrlsOnManyPages" >> _OnMorePages("image_url", k)
        marked = images | "MarkBoilerplate" >> beam.ParDo(MarkBoilerplate(k), beam.pvalue.AsDict(bad_phash), beam.pvalue.AsDict(bad_url)).with_outputs(REJECTED, main="ok")
        # 3. images seen on several pages (only pairs of two such images can recur on another page)
        shared = keys | "SharedImages" >> _OnMorePages("image_id", 1)
        # 4. per page: near-duplicates, cap, in-band pairs
        pages = marked.ok | "KeyPage" >> beam.Map(lambda r: (r["page_url"], pack(r, IMAGE_FIELDS))) | "GroupPages" >> beam.GroupByKey()
        per_page = pages | "PerPage" >> beam.FlatMap(_page, cfg, beam.pvalue.AsDict(shared)).with_outputs(REJECTED, "pairs", SHARED_PAIRS, main="kept")
        # 5. the same (condition, target) contents from several pages: keep one
        deduped = (
            per_page[SHARED_PAIRS]
            | "GroupContents" >> beam.GroupByKey()
            | "FirstPage" >> beam.FlatMap(_first_page_wins).with_outputs("duplicate_pairs", main="unique")
        )
        rejected = (marked[REJECTED], per_page[REJECTED]) | "AllRejected" >> beam.Flatten()
        return {
            "input": images,
            "kept": per_page.kept,
            "rejected": rejected,
            "pairs": per_page.pairs,  # final where they are made (not flattened with the next:
            "deduped_pairs": deduped.unique,  # a flatten across stages would hold every pair)
            "duplicate_pairs": deduped.duplicate_pairs,
            "pages": pages,
        }


# Pairing never needs the image bytes: records travel without them (a pointer stays), and the
# embedding travels as a compact float16 array instead of a Python list.
META_COLUMNS = [f.name for f in IMAGE_SCHEMA if f.name not in ("image_bytes", "bytes_file", "bytes_row_group")]
KEY_COLUMNS = ["image_id", "phash", "page_url", "image_url"]  # what the boilerplate and sharing counts read
IMAGE_FIELDS = tuple(META_COLUMNS) + ("bytes_file", "bytes_row_group")  # a record as it travels
PAIR_FIELDS = tuple(PAIR_SCHEMA.names)


def _compact(row: dict) -> dict:
    import numpy as np

    row["embedding"] = np.asarray(row["embedding"], dtype=np.float16) if row["embedding"] is not None else None
    return row


def _for_parquet(row: dict) -> dict:
    row = dict(row)
    if row.get("embedding") is not None:
        row["embedding"] = row["embedding"].tolist()
    row["image_bytes"] = None
    return row


def run_pair(input_path: str, out_dir: str, cfg: PairConfig, beam_args=None) -> dict:
    """Run the pairing pipeline on a filter stage directory; returns reconciled stats."""
    files = stage_files(input_path, "images", expected="filter")
    check_columns(files, IMAGE_SCHEMA, input_path, "filter")
    with StageOutput(out_dir, STAGE) as stage_out:
        _pair_pipeline(files, stage_out.path, cfg, beam_args)
        return stage_out.commit()


def _pair_pipeline(files: list[str], out_dir: str, cfg: PairConfig, beam_args) -> None:
    import os

    with beam.Pipeline(options=pipeline_options(beam_args)) as p:
        keys = p | "KeyFiles" >> beam.Create(files) | "ReadKeys" >> beam.io.ReadAllFromParquet(columns=KEY_COLUMNS)
        # a second Create keeps the full read in the stage that waits for the boilerplate flags, so
        # the records stream into the page shuffle instead of being held for that stage
        images = p | "Files" >> beam.Create(files) | "Read" >> beam.ParDo(ReadParquetWithPointers(META_COLUMNS)) | "Compact" >> beam.Map(_compact)
        out = {"keys": keys, "images": images} | "Pair" >> PairImages(cfg)
        out["kept"] = out["kept"] | "ForParquet" >> beam.Map(_for_parquet)
        ones = []
        for name, prefix in (("pairs", "part"), ("deduped_pairs", "deduped")):  # both into pairs/
            pairs = out.pop(name)
            _ = pairs | f"Write_{name}" >> beam.io.WriteToParquet(os.path.join(out_dir, "pairs", prefix), PAIR_SCHEMA, file_name_suffix=".parquet", row_group_buffer_size=ROW_GROUP_BYTES)
            ones.append(pairs | f"One_{name}" >> beam.Map(lambda _: 1))
        out["pairs"] = ones | "AllPairs" >> beam.Flatten()  # counted once, as ones
        _ = out | "Write" >> WriteStageOutputs(out_dir, STAGE, "images", IMAGE_SCHEMA, extra={"config": to_dict(cfg)})
