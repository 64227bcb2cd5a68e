"""Record contracts between stages: one pyarrow schema and one light dataclass per record.

Every stage writes parquet with these schemas (so DuckDB/pandas can read any intermediate output)
and a `rejected/` parquet with `REJECTED_SCHEMA`. Dataclasses are for code; `to_row()` gives the
plain dict that Beam passes around and parquet stores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from collections.abc import Mapping
from typing import Any, Optional

import pyarrow as pa

# Embeddings are stored as float16 lists: half the bytes of float32, ample for cosine similarity.
EMBEDDING_TYPE = pa.list_(pa.float16())


def bucket_of(key: Optional[str], buckets: int) -> int:
    """The hash bucket of a key, the same in every process (CRC-32, not Python's salted hash): how
    filter's link join and pair's spills split rows by key. A null key (a link without an image id,
    an occurrence without a site) is a key like any other, in bucket 0."""
    if buckets <= 1 or key is None:
        return 0
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % buckets


def stable_id(*parts: str, length: int = 16) -> str:
    """Deterministic short hex id of the given strings (same input, same id on every worker)."""
    h = hashlib.sha1("\x1f".join(parts).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:length]


LINK_SCHEMA = pa.schema(
    [
        ("link_id", pa.string()),  # stable_id(page_url, image_url)
        ("page_url", pa.string()),
        ("image_url", pa.string()),  # absolute, normalised
        ("alt", pa.string()),
        ("position", pa.int32()),  # order of the image on its page, 0-based
        ("kind", pa.string()),  # img | srcset | picture | og:image | wat
        ("width", pa.int32()),  # declared in the HTML, if any
        ("height", pa.int32()),
        ("source_file", pa.string()),  # WARC/WAT file
        ("source_offset", pa.int64()),  # byte offset of the WARC record in that file
    ]
)

# `crawl download` fetches each distinct image URL once, and keeps identical bytes once:
# downloads/ has one row per distinct image, occurrences/ one row per link that resolved to one.
DOWNLOAD_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),  # first 16 hex digits of the sha256 of image_bytes
        ("image_url", pa.string()),  # the first URL (in sort order) that served these bytes ...
        ("page_url", pa.string()),  # ... and its first link's page, alt text and position
        ("alt", pa.string()),  # (the text filter scores the image against)
        ("position", pa.int32()),
        ("image_bytes", pa.binary()),  # bytes as served (or re-encoded when download resizes)
        ("sha256", pa.string()),
        ("links", pa.int64()),  # kept links that resolved to it (0: fetched only as boilerplate evidence)
    ]
)

# How downloads/ files are written (issue 34, eighteenth sitting):
# - the image bytes (all but a few kilobytes of a file) neither compressed (JPEG, PNG and WebP
#   bytes do not shrink: snappy cost CPU in download and again in filter) nor dictionary-encoded
#   (every value is distinct);
# - Arrow checks its 1 MiB page size only between batches of values (1,024 by default), so a page
#   held ~75 MB of photos; in batches of DOWNLOAD_PAGE_VALUES a page holds at most 16 photos past
#   1 MiB (16 of 64 KiB or more; more of smaller ones);
# - row groups of about DOWNLOAD_ROW_GROUP_BYTES: one row group was a whole img2dataset shard, and
#   Arrow's reader reserved a buffer for a row group's bytes at once (247 MB for 2,400 photos),
#   mapped and faulted in afresh for every row group filter read (26 page faults an image, ~0.1 of
#   filter's ~3.5 CPU ms). A row group is also filter's unit of work (core/stageio.row_groups).
DOWNLOAD_PAGE_VALUES = 16
DOWNLOAD_ROW_GROUP_BYTES = 16 << 20


def write_downloads(table: pa.Table, path: str) -> None:
    """A downloads/ parquet file of `table` (DOWNLOAD_SCHEMA's columns), as `crawl download` writes it."""
    import pyarrow.parquet as pq

    table = table.cast(DOWNLOAD_SCHEMA)
    per_row = table.nbytes / max(table.num_rows, 1)
    rows = int(min(max(DOWNLOAD_ROW_GROUP_BYTES // max(per_row, 1), 1), 1 << 20))  # large images: a row group of one
    pq.write_table(table, path, row_group_size=rows, **download_parquet_options(table.column_names))


def download_parquet_options(columns) -> dict:
    """The writer's settings of a downloads/ file (above): bytes plain in small pages, the rest
    snappy with dictionaries (`webpairs scrub` rewrites the files with them too)."""
    return {"compression": {n: ("none" if n == "image_bytes" else "snappy") for n in columns},
            "use_dictionary": [n for n in columns if n != "image_bytes"], "write_batch_size": DOWNLOAD_PAGE_VALUES}


# One row per link whose image was downloaded: which image (image_id) the link resolved to. Links
# rejected as URL boilerplate are here too, with their reason, when their URL was fetched once as
# evidence for pair's content rule (the same logo at another URL, in another size).
DOWNLOAD_OCCURRENCE_SCHEMA = pa.schema(
    [
        ("link_id", pa.string()),
        ("page_url", pa.string()),
        ("site", pa.string()),  # the page's registered domain (core/sites.py)
        ("image_url", pa.string()),
        ("alt", pa.string()),
        ("position", pa.int32()),
        ("declared_width", pa.int32()),  # the link's width/height attributes (rendered size), if any
        ("declared_height", pa.int32()),
        ("image_id", pa.string()),  # the downloads/ row holding its bytes
        ("reason", pa.string()),  # null: a kept link; else the reason it was rejected (evidence only)
    ]
)

# Every downloaded link as filter saw it, before any threshold could drop it: the boilerplate
# evidence of `pair` (a logo counts on every page it is on, in every size, kept or not), and the
# table through which `pair` joins the images (one row each) back to their pages.
OCCURRENCE_SCHEMA = pa.schema(
    [
        ("link_id", pa.string()),
        ("page_url", pa.string()),
        ("site", pa.string()),
        ("image_url", pa.string()),
        ("alt", pa.string()),
        ("position", pa.int32()),
        ("image_id", pa.string()),
        ("sha256", pa.string()),
        ("phash", pa.string()),  # null when the bytes do not decode
        ("width", pa.int32()),  # decoded size, null when the bytes do not decode
        ("height", pa.int32()),
        ("filter_reason", pa.string()),  # why filter rejected this link; null when it passed the checks
    ]
)

# filter's images/: one row per distinct image (page_url, image_url, alt, position are those of its
# first link; its links are in occurrences/); pair's images/: one row per kept link.
# Pages per site in the crawl (every page with a link, whatever became of its links): the
# denominator of the site rules at download and in pair. download writes it, filter passes it on.
SITE_SCHEMA = pa.schema([("site", pa.string()), ("pages", pa.int64())])

IMAGE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),  # content hash: first 16 hex digits of sha256
        ("page_url", pa.string()),
        ("image_url", pa.string()),
        ("alt", pa.string()),
        ("position", pa.int32()),
        ("width", pa.int32()),  # decoded pixel size (after EXIF orientation)
        ("height", pa.int32()),
        ("format", pa.string()),  # Pillow format name: JPEG, PNG, GIF, WEBP, ...
        ("sha256", pa.string()),
        ("phash", pa.string()),  # imagehash pHash as hex
        ("embedding", EMBEDDING_TYPE),  # L2-normalised encoder embedding
        ("encoder", pa.string()),
        ("clip_score", pa.float32()),  # image-alt cosine when the encoder has a text tower
        ("image_bytes", pa.binary()),  # the bytes, when not pointed to (filter: only --faces blur's blurred JPEG)
        ("bytes_file", pa.string()),  # pointer to the bytes: a parquet file (filter: download's downloads/; pair: filter's images/) ...
        ("bytes_row_group", pa.int32()),  # ... and the row group in it that holds this image (core/stageio.fetch_rows follows it)
        ("pdq", pa.string()),  # PDQ perceptual hash (core/perceptual.py) as 64 hex: `webpairs scrub --blocklist` matches it
        ("faces", pa.int32()),  # faces found (filter/faces.py; null with --faces off)
        ("face_boxes", pa.list_(pa.int32())),  # their boxes, flat: x, y, w, h per face, in the image's pixels
        ("nsfw", pa.float32()),  # LAION's NSFW head on the embedding (core/safety.py), 1 = NSFW; null without a head
    ]
)

PAIR_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),  # stable_id(cond image_id, target image_id)
        ("page_url", pa.string()),
        ("cond_image_id", pa.string()),
        ("target_image_id", pa.string()),
        ("similarity", pa.float32()),  # encoder cosine similarity of the two images
        # what a shard writer needs of the two images, carried so that `shards` needs no join (the
        # condition embedding is fetched with the bytes: it would make every pair row ~1-3 KB)
        ("cond_url", pa.string()),
        ("target_url", pa.string()),
        ("cond_alt", pa.string()),
        ("target_alt", pa.string()),
        ("encoder", pa.string()),
        ("cond_bytes_file", pa.string()),  # pointers to each image's bytes (a filter output file ...
        ("cond_bytes_row_group", pa.int32()),  # ... and its row group), as in IMAGE_SCHEMA
        ("target_bytes_file", pa.string()),
        ("target_bytes_row_group", pa.int32()),
        ("cond_nsfw", pa.float32()),  # the two images' nsfw scores (IMAGE_SCHEMA), null without a head
        ("target_nsfw", pa.float32()),
    ]
)

# What `pair` flagged as boilerplate: one row per flagged content (a pHash and its close
# neighbours) or image URL, per site or across the crawl ("*").
BOILERPLATE_SCHEMA = pa.schema(
    [
        ("scope", pa.string()),  # a site (boilerplate_site) or "*" (boilerplate_global)
        ("kind", pa.string()),  # "content" (pHash neighbourhood) or "url"
        ("key", pa.string()),  # the pHash or the image URL
        ("pages", pa.int64()),  # pages it is on (for "*": counted up to the threshold + 1)
        ("site_pages", pa.int64()),  # pages of the site with a fetched image (for "*": 0)
    ]
)

# What `pair` found as copies across pages and sites (pairing/copies.py): one row per link whose
# image is another dress of a photo kept elsewhere (reason copy_duplicate, or near_duplicate when
# the kept dress is on the same page), naming the kept image; the report's copy gallery reads it.
COPY_SCHEMA = pa.schema(
    [
        ("link_id", pa.string()),  # the removed link (its rejected/ row has the same record_id)
        ("page_url", pa.string()),
        ("site", pa.string()),  # the page's registered domain
        ("image_id", pa.string()),  # the removed dress ...
        ("image_url", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bytes_file", pa.string()),
        ("bytes_row_group", pa.int32()),
        ("kept_image_id", pa.string()),  # ... and the group's kept dress
        ("kept_image_url", pa.string()),
        ("kept_width", pa.int32()),
        ("kept_height", pa.int32()),
        ("kept_bytes_file", pa.string()),
        ("kept_bytes_row_group", pa.int32()),
        ("stand_in", pa.bool_()),  # the kept dress stands in for it on this page
    ]
)

# Every candidate pair the copy step verified, with the geometric check's measurements.
COPY_CHECK_SCHEMA = pa.schema(
    [
        ("image_a", pa.string()),
        ("image_b", pa.string()),
        ("cosine", pa.float32()),  # embedding cosine (null: a pHash-only candidate)
        ("phash_distance", pa.int32()),  # mirror-aware pHash bits (null: an embedding-only candidate)
        ("copy", pa.bool_()),  # the verdict
        ("matches", pa.int32()),  # descriptor matches after the ratio test
        ("inliers", pa.int32()),  # matches that agree on the RANSAC similarity transform
        ("mirrored", pa.bool_()),
        ("scale", pa.float32()),
        ("rotation", pa.float32()),  # degrees
        ("overlap_small", pa.float32()),  # shared region / the larger picture
        ("overlap_large", pa.float32()),  # shared region / the smaller picture
        ("spread", pa.float32()),  # the inliers' hull / the shared region
    ]
)

REJECTED_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),  # id of the input record (link_id, image key, image_id, ...)
        ("stage", pa.string()),
        ("reason", pa.string()),  # one of the stage's closed set of reasons
        ("detail", pa.string()),  # free text: the error message, the measured value, ...
        ("url", pa.string()),  # the image or page URL when there is one, for inspection
    ]
)


@dataclasses.dataclass(frozen=True)
class LinkRecord:
    """One `<img>` (or srcset/picture/og:image/WAT link) found on a crawled page."""

    page_url: str
    image_url: str
    alt: str = ""
    position: int = 0
    kind: str = "img"
    width: Optional[int] = None
    height: Optional[int] = None
    source_file: str = ""
    source_offset: int = 0

    @property
    def link_id(self) -> str:
        return stable_id(self.page_url, self.image_url)

    def to_row(self) -> dict[str, Any]:
        return {"link_id": self.link_id, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """A downloaded image that passed validation, with its hashes and embedding."""

    image_id: str
    page_url: str
    image_url: str
    alt: str
    position: int
    width: int
    height: int
    format: str
    sha256: str
    phash: str
    embedding: Optional[list[float]]
    encoder: str
    clip_score: Optional[float]
    image_bytes: Optional[bytes]
    bytes_file: Optional[str] = None
    bytes_row_group: Optional[int] = None
    pdq: Optional[str] = None
    faces: Optional[int] = None
    face_boxes: Optional[list[int]] = None
    nsfw: Optional[float] = None

    def to_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PairRecord:
    """An ordered (condition, target) pair of distinct images from one page."""

    page_url: str
    cond_image_id: str
    target_image_id: str
    similarity: float

    @property
    def pair_id(self) -> str:
        return stable_id(self.cond_image_id, self.target_image_id)

    def to_row(self, cond: Optional[dict] = None, target: Optional[dict] = None) -> dict[str, Any]:
        """The PAIR_SCHEMA row; `cond`/`target` are the two images' ImageRecord rows (the image
        columns stay empty without them)."""
        cond, target = cond or {}, target or {}
        return {
            "pair_id": self.pair_id,
            "page_url": self.page_url,
            "cond_image_id": self.cond_image_id,
            "target_image_id": self.target_image_id,
            "similarity": self.similarity,
            "cond_url": cond.get("image_url"),
            "target_url": target.get("image_url"),
            "cond_alt": cond.get("alt"),
            "target_alt": target.get("alt"),
            "encoder": cond.get("encoder"),
            "cond_bytes_file": cond.get("bytes_file"),
            "cond_bytes_row_group": cond.get("bytes_row_group"),
            "target_bytes_file": target.get("bytes_file"),
            "target_bytes_row_group": target.get("bytes_row_group"),
            "cond_nsfw": cond.get("nsfw"),
            "target_nsfw": target.get("nsfw"),
        }


@dataclasses.dataclass(frozen=True)
class Rejected:
    """An input record that a stage dropped, with a reason from the stage's closed set."""

    record_id: str
    stage: str
    reason: str
    detail: str = ""
    url: str = ""

    def to_row(self) -> dict[str, Any]:
        # built directly: dataclasses.asdict deep-copies and is slow on a per-record hot path
        return {"record_id": self.record_id, "stage": self.stage, "reason": self.reason, "detail": self.detail, "url": self.url}


def phash_distance(a: str, b: str) -> int:
    """Hamming distance in bits between two hex pHashes of an ImageRecord (same hash size)."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly `schema`'s columns from plain dict rows (a key a row lacks is
    null, keys outside the schema are ignored: pyarrow's `from_pylist` reads each of the schema's
    names from each row, column by column; a copy of every row restricted to the schema's fields,
    as before, cost a Field object per value)."""
    rows = rows if isinstance(rows, list) else list(rows)  # from_pylist walks the rows once per column
    if not all(isinstance(r, Mapping) for r in rows):  # a tuple row would read as all nulls (`name in row` looks at its values)
        bad = next(r for r in rows if not isinstance(r, Mapping))
        raise TypeError(f"rows_to_table: rows must be mappings (dicts), got {type(bad).__name__}")
    return pa.Table.from_pylist(rows, schema=schema)


def occurrence_of(image_row: dict[str, Any], link_id: str = "") -> dict[str, Any]:
    """The OCCURRENCE_SCHEMA row of a kept ImageRecord row (for filter outputs made without filter:
    tests and benchmarks)."""
    from core.sites import site_of

    return {
        "link_id": link_id or stable_id(image_row["page_url"], image_row["image_url"]), "page_url": image_row["page_url"], "site": site_of(image_row["page_url"]),
        "image_url": image_row["image_url"], "alt": image_row.get("alt") or "", "position": image_row.get("position") or 0, "image_id": image_row["image_id"],
        "sha256": image_row["sha256"], "phash": image_row["phash"], "width": image_row["width"], "height": image_row["height"], "filter_reason": None,
    }
