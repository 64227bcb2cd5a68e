"""`pair`: ImageRecords -> same-page (condition, target) PairRecords with Beam.

Steps: flag boilerplate from a light read of (pHash, page, URL) (content on more than K pages, found
by pHash with LSH banding so only band-mates are compared, and image URLs on more than K pages) ->
read the records and drop the flagged ones (the flags are side inputs) -> GroupByKey(page_url) -> collapse
near-duplicates, cap images per page, pick in-band pairs (pairing/select.py) -> keep each
(condition, target) content pair once across pages -> write pairs/, images/, rejected/, stats.json.
"""

from __future__ import annotations

import apache_beam as beam

from core.config import PairConfig, to_dict
from core.records import IMAGE_SCHEMA, PAIR_SCHEMA, Rejected, stable_id
from core.stageio import ReadParquetWithPointers, StageError, WriteStageOutputs, finish_stage, pipeline_options, stage_files
from pairing.select import band_keys, boilerplate_phashes, page_outcome

STAGE = "pair"
REJECTED = "rejected"
BOILERPLATE = "boilerplate"


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


def _page(item, cfg: PairConfig):
    page_url, images = item
    pairs, kept, rejected = page_outcome(page_url, images, cfg)
    for p in pairs:
        yield beam.pvalue.TaggedOutput("pairs", p.to_row())
    for r in kept:
        yield r
    for r, reason, detail in rejected:
        yield beam.pvalue.TaggedOutput(REJECTED, Rejected(record_id(r), STAGE, reason, detail, r["image_url"]).to_row())


def _first_page_wins(item):
    _, pairs = item
    pairs = sorted(pairs, key=lambda p: p["page_url"])
    yield pairs[0]
    for p in pairs[1:]:
        yield beam.pvalue.TaggedOutput("duplicate_pairs", p)


class PairImages(beam.PTransform):
    """{"keys": (phash, page_url, image_url) records, "images": ImageRecords} ->
    {"input", "kept" images, "rejected", "pairs", "duplicate_pairs", "pages"}.

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
            | "Bands" >> beam.FlatMap(lambda kv: [(b, (kv[0], kv[1])) for b in band_keys(kv[0], cfg.boilerplate_phash_distance)])
            | "GroupBands" >> beam.GroupByKey()
            | "Neighbourhoods" >> beam.FlatMap(lambda kv: boilerplate_phashes(list(kv[1]), cfg.boilerplate_phash_distance, k))
            | "DistinctPhash" >> beam.Distinct()
            | "FlagPhash" >> beam.Map(lambda h: (h, True))
        )
        # 2. boilerplate by URL: the same image URL on more than K pages
        bad_url = (
            keys
            | "UrlPage" >> beam.Map(lambda r: (r["image_url"], r["page_url"]))
            | "PagesPerUrl" >> beam.CombinePerKey(CappedSet(k + 1))
            | "ManyPages" >> beam.Filter(lambda kv: len(kv[1]) > k)
            | "FlagUrl" >> beam.Map(lambda kv: (kv[0], True))
        )
        marked = images | "MarkBoilerplate" >> beam.ParDo(MarkBoilerplate(k), beam.pvalue.AsDict(bad_phash), beam.pvalue.AsDict(bad_url)).with_outputs(REJECTED, main="ok")
        # 3. per page: near-duplicates, cap, in-band pairs
        pages = marked.ok | "KeyPage" >> beam.Map(lambda r: (r["page_url"], r)) | "GroupPages" >> beam.GroupByKey()
        per_page = pages | "PerPage" >> beam.FlatMap(_page, cfg).with_outputs(REJECTED, "pairs", main="kept")
        # 4. the same (condition, target) contents from several pages: keep one
        pairs = (
            per_page.pairs
            | "KeyContents" >> beam.Map(lambda p: ((p["cond_image_id"], p["target_image_id"]), p))
            | "GroupContents" >> beam.GroupByKey()
            | "FirstPage" >> beam.FlatMap(_first_page_wins).with_outputs("duplicate_pairs", main="unique")
        )
        rejected = (marked[REJECTED], per_page[REJECTED]) | "AllRejected" >> beam.Flatten()
        return {
            "input": images,
            "kept": per_page.kept,
            "rejected": rejected,
            "pairs": pairs.unique,
            "duplicate_pairs": pairs.duplicate_pairs,
            "pages": pages,
        }


# Pairing never needs the image bytes: records travel without them (a pointer stays), and the
# embedding travels as a compact float16 array instead of a Python list.
META_COLUMNS = [f.name for f in IMAGE_SCHEMA if f.name not in ("image_bytes", "bytes_file", "bytes_row_group")]
KEY_COLUMNS = ["phash", "page_url", "image_url"]  # what the boilerplate counts read


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
    import os

    files = stage_files(input_path, "images")
    if not files:
        raise StageError(f"pair: no images parquet under {input_path} (expected a `filter` output)")
    with beam.Pipeline(options=pipeline_options(beam_args)) as p:
        keys = p | "KeyFiles" >> beam.Create(files) | "ReadKeys" >> beam.io.ReadAllFromParquet(columns=KEY_COLUMNS)
        # a second Create keeps the full read in the stage that waits for the boilerplate flags, so
        # the records stream into the page shuffle instead of being held for that stage
        images = p | "Files" >> beam.Create(files) | "Read" >> beam.ParDo(ReadParquetWithPointers(META_COLUMNS)) | "Compact" >> beam.Map(_compact)
        out = {"keys": keys, "images": images} | "Pair" >> PairImages(cfg)
        out["kept"] = out["kept"] | "ForParquet" >> beam.Map(_for_parquet)
        _ = out["pairs"] | "WritePairs" >> beam.io.WriteToParquet(os.path.join(out_dir, "pairs", "part"), PAIR_SCHEMA, file_name_suffix=".parquet")
        _ = out | "Write" >> WriteStageOutputs(out_dir, STAGE, "images", IMAGE_SCHEMA, extra={"config": to_dict(cfg)})
    return finish_stage(out_dir)
