"""`shards`: PairRecords -> webdataset pair shards, a parquet index, manifest.json.

No join on the pairs: each pair row already carries what its sample needs of both images (URLs,
alt texts, pointers to the image bytes; see PAIR_SCHEMA). The pair files are dealt to writers,
whole and in order, at least PAIRS_PER_WRITER pairs each (`writer_groups`). The image bytes are
fetched first: each writer writes which image ids its pair files need of each filter row group
(`WriteWants`); each of those row groups is then read once, however many writers point into it
(only the image id, bytes, pointer and embedding columns, only the wanted rows kept), with the
download row groups its rows point to for their bytes (filter stores pointers, not bytes; each
download row group is pointed to from one filter row group, so it too is read once), its wanted images
converted to JPEG with their .npy embedding once, and each writer gets a file of the images it
needs from it (`FetchRowGroup`; both under `_fetched/`, removed when the stage ends). Then each
writer copies its fetched images into a local spill (`_ImageStore`), streams its pair files' rows
in record batches, builds the samples (layout in core/sample_layout.py) and writes them into a tar
under a temporary name, renamed into place when the shard is full (count or bytes) -> index/
parquet with byte offsets, manifest.json and stats. Memory holds one filter row group and the
wanted images of its download row groups (fetching) or one record batch and one shard's index rows
(writing), whatever the input size.

The bytes read grew with shards x row groups while they were read for each shard (time ~
size^1.24), and with pair files x row groups while they were read for each pair file (on Dask,
where pair writes a file per bucket: ~ size^1.56; issue 34); now they grow with the row groups
alone. What still grows as writers x row groups is a small file of wanted ids and one of fetched
images for each such pair that has any (~1 ms each). The pair count comes from the parquet
footers, so the counts reconcile against the input.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
import uuid

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from core import sample_layout as layout
from core.config import ShardConfig, to_dict
from core.memory import system_arrow_pool
from core.records import Rejected
from core.stageio import MADE_FROM, POINTER, StageError, check_made_from, read_stats, StageOutput, WriteStageOutputs, fill_bytes, frozen_gc, remove_folder, stage_pipeline, stage_files

STAGE = "shards"
REJECTED = "rejected"
MISSING_IMAGE = "missing_image"
BAD_IMAGE = "unreadable_image"
TOO_LARGE = "sample_over_max_shard_bytes"  # one sample is larger than a whole shard may be

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # the pair_id, the webdataset __key__
        ("shard", pa.string()),  # tar file name, relative to the shards directory
        ("offset", pa.int64()),  # byte offset of the sample's first tar header
        ("size", pa.int64()),  # bytes of the sample's members: headers and data with its 512-byte padding
        ("page_url", pa.string()),
        ("cond_image_id", pa.string()),
        ("target_image_id", pa.string()),
        ("similarity", pa.float32()),
        ("cond_nsfw", pa.float32()),  # the two images' nsfw scores (filter's, core/safety.py), null without a head
        ("target_nsfw", pa.float32()),
    ]
)


# What a sample needs of a pair row (the pair stage carries both images' info, see PAIR_SCHEMA).
PAIR_COLUMNS = [
    "pair_id", "page_url", "cond_image_id", "target_image_id", "similarity", "cond_url", "target_url", "cond_alt", "target_alt", "encoder",
    "cond_bytes_file", "cond_bytes_row_group", "target_bytes_file", "target_bytes_row_group", "cond_nsfw", "target_nsfw",
]


def build_stub(pair: dict) -> dict:
    """A sample without its image bytes: metadata and where each image lives (file, row group,
    image id). The writer finds the bytes (and the condition embedding) of every stub of its pair
    file in what `FetchRowGroup` fetched for it (`_ImageStore`)."""
    meta = {k: pair[k] for k in layout.META_FIELDS}
    sources = {side: (pair[f"{side}_bytes_file"], pair[f"{side}_bytes_row_group"], pair[f"{side}_image_id"]) for side in ("cond", "target")}
    return {"key": pair["pair_id"], "meta": meta, "sources": sources}


POINTER_COLUMNS = [f"{side}_{c}" for side in ("cond", "target") for c in ("bytes_file", "bytes_row_group", "image_id")]


def _npy_column(column) -> list[bytes]:
    """The .npy bytes of each embedding of a list<float16> column (b"" for a null), as
    `layout.npy_bytes` writes them, without a Python float per value: the values as one NumPy
    array, each row's slice after the header of its length (made once per length)."""
    import numpy as np

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(column) == 0:
        return []
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype("<f2", copy=False)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    headers: dict = {}
    out = []
    for k in range(len(column)):
        if not valid[k]:
            out.append(b"")
            continue
        lo, hi = int(offsets[k]), int(offsets[k + 1])
        header = headers.get(hi - lo)
        if header is None:
            full = layout.npy_bytes(values[lo:hi])
            header = headers[hi - lo] = full[: len(full) - 2 * (hi - lo)]
        out.append(header + values[lo:hi].tobytes())
    return out


def plain_rgb_jpeg(data: bytes) -> bool:
    """True when `layout.as_jpeg` would return `data` unchanged (Pillow opens it as a JPEG, mode
    RGB, with no EXIF orientation), decided from the markers alone: Pillow's JPEG header parsing
    in Python (~25 us an image) was a fifth of what shards does per image. Conservative: only a
    plain layout is accepted (SOI; APP0, APP3-APP12, APP14, APP15, DQT, DHT, DRI, COM segments
    with the lengths Pillow's handlers need; one or more 8-bit 3-component baseline, extended or
    progressive SOF; then SOS), checked as Pillow 12's JpegImagePlugin reads them; anything else
    (APP1: EXIF or XMP, which may carry an orientation; APP2: ICC, MPO; APP13; fill bytes; other
    frame types; truncation; a size over Pillow's pixel limit) answers False and goes through
    `as_jpeg`, which decides. tests/test_pair_shards.py checks the two agree."""
    from PIL import Image

    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return False
    i, frame = 2, None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        length = (data[i + 2] << 8) | data[i + 3]
        end = i + 2 + length
        if length < 2 or end > n:
            return False
        s = data[i + 4 : end]
        if marker == 0xDA:  # start of scan: Pillow stops reading the header here
            if frame is None:
                return False
            w, h = frame
            limit = Image.MAX_IMAGE_PIXELS
            return w > 0 and h > 0 and (limit is None or w * h <= limit)
        if marker in (0xC0, 0xC1, 0xC2):
            if len(s) < 6 or (len(s) - 6) % 3 or s[0] != 8 or s[5] != 3:  # Pillow reads 3-byte component records
                return False
            frame = ((s[3] << 8) | s[4], (s[1] << 8) | s[2])
        elif marker == 0xDB:
            while s:
                need = 1 + (64 if s[0] // 16 == 0 else 128)
                if len(s) < need:
                    return False
                s = s[need:]
        elif marker == 0xE0:
            if s.startswith(b"JFIF") and len(s) < 7:
                return False
        elif marker == 0xEE:
            if s.startswith(b"Adobe") and len(s) < 7:
                return False
        elif not (marker in (0xC4, 0xDD, 0xFE, 0xEF) or 0xE3 <= marker <= 0xEC):
            return False
        i = end
    return False


_JSON = json.JSONEncoder(sort_keys=True)  # json.dumps(..., sort_keys=True) without a new encoder per call


FETCHED = "_fetched"  # what the writers need of filter's row groups (WANTS, IMAGES); removed when the stage ends
WANTS, IMAGES = "wants", "images"
WANT_SCHEMA = pa.schema([("image_id", pa.string())])
FETCH_SCHEMA = pa.schema([("image_id", pa.string()), ("jpg", pa.binary()), ("npy", pa.binary()), ("error", pa.string())])


def _row_group_name(f: str, rg: int) -> str:
    """A file-name-safe name of filter file `f`'s row group `rg`."""
    return f"{hashlib.sha1(f.encode()).hexdigest()[:16]}-{rg:06d}"


def _wanted(path: str) -> dict:
    """{(filter file, row group): {image ids}} that a pair file's pairs point to (its pointer columns only)."""
    wanted: dict = {}
    with FileSystems.open(path) as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=4096, columns=POINTER_COLUMNS):
            cols = {name: batch.column(name).to_pylist() for name in POINTER_COLUMNS}
            for side in ("cond", "target"):
                for f, rg, image_id in zip(cols[f"{side}_bytes_file"], cols[f"{side}_bytes_row_group"], cols[f"{side}_image_id"]):
                    if f is not None:
                        wanted.setdefault((f, rg), set()).add(image_id)
    return wanted


def _wanted_by(files: list) -> dict:
    """`_wanted` of a writer's pair files ([(pair file number, pair file)]), merged."""
    wanted: dict = {}
    for _, path in files:
        for key, ids in _wanted(path).items():
            wanted.setdefault(key, set()).update(ids)
    return wanted


def _write_table(path: str, table: pa.Table) -> None:
    """One parquet file at `path`, local or on any filesystem Beam knows, never seen half-written
    by a reader when a task runs again (a lost Dask worker's): a local file is written under a
    temporary name and renamed into place; an object store's upload appears whole when it closes."""
    if "://" in path:
        with FileSystems.create(path) as fh:
            pq.write_table(table, fh, compression="none")
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        pq.write_table(table, tmp, compression="none")
        os.replace(tmp, path)


class WriteWants(beam.DoFn):
    """(writer number, its pair files) -> ((filter file, row group), writer number) for each row
    group their pairs point into, after writing the image ids they need of it into
    `fetch_dir`/wants/ROW GROUP/WRITER.parquet (which `FetchRowGroup` reads: the ids cross no
    shuffle)."""

    def __init__(self, fetch_dir: str):
        self.fetch_dir = fetch_dir.rstrip("/")

    def process(self, item):
        number, files = item
        for (f, rg), ids in sorted(_wanted_by(files).items()):
            _write_table(f"{self.fetch_dir}/{WANTS}/{_row_group_name(f, rg)}/{number:06d}.parquet", pa.table({"image_id": sorted(ids)}, schema=WANT_SCHEMA))
            yield (f, rg), number


class FetchRowGroup(beam.DoFn):
    """((filter file, row group), [writer numbers]) -> (writer number, (filter file, row group,
    fetched file)) for each of those writers that wants an image the row group has, after writing
    that FETCH_SCHEMA file `fetch_dir`/images/WRITER/ROW GROUP.parquet of its images (the ids
    `WriteWants` wrote; exact paths, no listing or glob). A writer gets no file of a row group that
    has none of its images (or is past its file): those images are missing.

    The row group is read once, however many pair files point into it (only the image id, bytes,
    pointer and embedding columns, only the wanted rows kept), and the download row groups its
    wanted rows point to for their bytes (`fill_bytes`; a download row group is pointed to from one
    filter row group, so each is read once too); each wanted image's bytes are converted to
    JPEG (`layout.as_jpeg`; the error text when they are not an image) and its embedding to .npy
    once. Reading each row group once per pair file instead made the cost grow as pair files x row
    groups, both proportional to the input: on Dask, where pair writes a file per bucket, shards
    took 3.9 -> 98 CPU s from 1x to 16x, time ~ size^1.56 (issue 34). Memory: one row group and its
    wanted images."""

    def __init__(self, fetch_dir: str, store_embedding: bool):
        self.fetch_dir, self.store_embedding = fetch_dir.rstrip("/"), store_embedding

    def process(self, item):
        import pyarrow.compute as pc

        (f, rg), numbers = item
        name = _row_group_name(f, rg)
        wants = {}  # writer number -> the image ids it needs of this row group
        for number in sorted(numbers):
            with FileSystems.open(f"{self.fetch_dir}/{WANTS}/{name}/{number:06d}.parquet") as fh:
                wants[number] = pq.read_table(fh).column("image_id").to_pylist()
        union = sorted(set().union(*wants.values()))
        with FileSystems.open(f) as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            columns = ["image_id", "image_bytes"] + [c for c in POINTER if c in names] + (["embedding"] if self.store_embedding else [])
            # a pointer past the file: its images are missing (no row, so no fetched file)
            t = pf.read_row_group(rg, columns=columns) if 0 <= rg < pf.num_row_groups else pf.schema_arrow.empty_table().select(columns)
        t = t.filter(pc.is_in(t.column("image_id"), value_set=pa.array(union, type=t.schema.field("image_id").type)))
        embeddings = _npy_column(t.column("embedding")) if self.store_embedding else [b""] * t.num_rows
        images = t.select([c for c in columns if c != "embedding"]).to_pylist()
        del t
        fill_bytes(images)  # filter's rows point to their bytes in download's row groups (whole ones, as filter writes them)
        converted: dict = {}  # image id -> (JPEG, .npy) or the error converting its bytes
        for image, npy in zip(images, embeddings):
            image_id, data = image["image_id"], image["image_bytes"]
            if data is None or image_id in converted:
                continue
            try:
                converted[image_id] = (data if plain_rgb_jpeg(data) else layout.as_jpeg(data), npy)
            except Exception as err:  # noqa: BLE001 - the pairs that need it are rejected
                converted[image_id] = str(err)
        del images
        for number, ids in sorted(wants.items()):
            rows = [(i, converted[i]) for i in ids if i in converted]
            if not rows:
                continue  # none of its images is here: missing
            ok = [not isinstance(v, str) for _, v in rows]
            table = pa.table({"image_id": [i for i, _ in rows], "jpg": [v[0] if good else None for (_, v), good in zip(rows, ok)],
                              "npy": [v[1] if good else None for (_, v), good in zip(rows, ok)], "error": [None if good else v for (_, v), good in zip(rows, ok)]}, schema=FETCH_SCHEMA)
            path = f"{self.fetch_dir}/{IMAGES}/{number:06d}/{name}.parquet"
            _write_table(path, table)
            yield number, (f, rg, path)


class _ImageStore:
    """The images of one pair file's samples, from the files `FetchRowGroup` wrote for it (one a
    filter row group, taken in (file, row group) order): each image appended once to an anonymous
    temporary file, already as JPEG with its .npy embedding; `get` reads an image back with one
    `pread`. The spill is the page cache's, not the process's memory, and vanishes with the
    process; a fetched file is read a record batch at a time."""

    def __init__(self, fetched: list):
        import tempfile

        self.where: dict = {}  # image id -> (offset, JPEG length, .npy length) or the error converting its bytes
        self.fh = tempfile.TemporaryFile()
        self.recent: dict = {}  # the last images read back (at most _RECENT)
        self._fill(fetched)

    def _fill(self, fetched: list) -> None:
        """`fetched`: the fetched files, in (filter file, row group) order."""
        offset = 0
        for path in fetched:
            with FileSystems.open(path) as src:
                for batch in pq.ParquetFile(src).iter_batches(batch_size=256):
                    for image_id, jpg, npy, error in zip(*(batch.column(c).to_pylist() for c in FETCH_SCHEMA.names)):
                        if image_id in self.where:
                            continue
                        if error is not None:
                            self.where[image_id] = error
                            continue
                        self.fh.write(jpg + npy)
                        self.where[image_id] = (offset, len(jpg), len(npy))
                        offset += len(jpg) + len(npy)
        self.fh.flush()

    _RECENT = 64  # images kept after a read: a page's pairs are neighbours in the pair file and share images

    def get(self, image_id: str):
        """(JPEG bytes, .npy bytes or None), None when the image was not found, or the error text
        of bytes that are not an image."""
        recent = self.recent.get(image_id)
        if recent is not None:
            return recent
        found = self.where.get(image_id)
        if found is None or isinstance(found, str):
            return found
        offset, n_jpg, n_npy = found
        data = os.pread(self.fh.fileno(), n_jpg + n_npy, offset)
        out = data[:n_jpg], (data[n_jpg:] if n_npy else None)
        if len(self.recent) >= self._RECENT:
            del self.recent[next(iter(self.recent))]  # the oldest
        self.recent[image_id] = out
        return out

    def close(self) -> None:
        self.fh.close()


def materialise(stubs: list[dict], store: _ImageStore, store_embedding: bool):
    """Build the full samples of a batch of stubs from the fetched images; yields samples or
    ("rejected", row) for a pair whose image cannot be found or read."""
    for s in stubs:
        jpgs, npy = {}, None
        try:
            for side, (f, _, image_id) in s["sources"].items():
                found = store.get(image_id) if f is not None else None
                if found is None:
                    raise KeyError(f"{side} bytes of {image_id} not found in {f}")
                if isinstance(found, str):
                    raise ValueError(found)
                jpgs[side] = found[0]
                if side == "cond":
                    npy = found[1]
        except Exception as err:  # noqa: BLE001 - reject the pair, never crash the shard
            reason = MISSING_IMAGE if isinstance(err, KeyError) else BAD_IMAGE
            yield REJECTED, Rejected(s["key"], STAGE, reason, str(err)[:200], s["meta"]["page_url"]).to_row()
            continue
        files = {layout.COND_JPG: jpgs["cond"], layout.TARGET_JPG: jpgs["target"], layout.META_JSON: _JSON.encode(s["meta"]).encode()}
        if store_embedding and npy is not None:
            files[layout.COND_NPY] = npy
        yield "sample", {"key": s["key"], "files": files, "meta": s["meta"]}


class _HashingWriter(io.RawIOBase):
    """A write-only stream that forwards to `fh` and keeps a sha256 and a byte count."""

    def __init__(self, fh):
        self.fh, self.sha, self.n = fh, hashlib.sha256(), 0

    def writable(self):
        return True

    def write(self, data):
        self.fh.write(data)
        self.sha.update(data)
        self.n += len(data)
        return len(data)


def _template() -> tuple[bytes, int]:
    """tarfile's ustar header of a member with an empty name and size 0 (mode 0644, mtime 0, as
    `_members` writes them), its checksum field as spaces, and the byte sum of the rest."""
    info = tarfile.TarInfo("")
    info.size, info.mtime, info.mode = 0, 0, 0o644
    h = bytearray(info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape"))
    h[148:156] = b" " * 8
    return bytes(h), sum(h) - sum(h[124:136])


_USTAR, _USTAR_SUM = _template()


def _header(name: str, size: int) -> bytes:
    """The ustar header tarfile writes for a regular file `name` of `size` bytes with `_members`'
    fixed metadata (same bytes as `TarInfo.tobuf`; tests/test_pair_shards.py compares them), made
    from a template: only the name, the size and the checksum change. Names over 100 bytes (ustar
    splits them) and sizes of 8 GiB and more go through tarfile itself."""
    raw = name.encode(tarfile.ENCODING, "surrogateescape")
    if len(raw) > 100 or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    size_field = b"%011o\0" % size
    h = bytearray(_USTAR)
    h[: len(raw)] = raw
    h[124:136] = size_field
    h[148:156] = b"%06o\0 " % (_USTAR_SUM + sum(raw) + sum(size_field))
    return bytes(h)


def _members(sample: dict) -> list[tuple[bytes, bytes]]:
    """The tar members of a sample as (header, data), with fixed metadata (reproducible bytes):
    tarfile's ustar header (the bytes `_header` makes: the template with the name, the size and
    the checksum filled in, the key's share of the checksum summed once a sample)."""
    key = sample["key"].encode(tarfile.ENCODING, "surrogateescape")
    key_sum = _USTAR_SUM + sum(key) + ord(".")  # the checksum's share of the template, the key and the dot, once a sample
    out = []
    for ext, data in sample["files"].items():
        ext_raw = ext.encode(tarfile.ENCODING, "surrogateescape")
        raw = key + b"." + ext_raw
        size = len(data)
        if len(raw) > 100 or size >= 8**11:
            out.append((_header(f"{sample['key']}.{ext}", size), data))
            continue
        size_field = b"%011o\0" % size
        h = bytearray(_USTAR)
        h[: len(raw)] = raw
        h[124:136] = size_field
        h[148:156] = b"%06o\0 " % (key_sum + sum(ext_raw) + sum(size_field))
        out.append((bytes(h), data))
    return out


def _member_bytes(member: tuple[bytes, bytes]) -> int:
    """Bytes a member takes in the archive: its header block(s) and its data padded to 512."""
    header, data = member
    return len(header) + -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def tar_file_size(content_bytes: int) -> int:
    """The size of a tar file whose members take `content_bytes`: tarfile's close() adds two zero
    blocks (end of archive) and pads the file to a whole record (RECORDSIZE, 10 KiB)."""
    end = content_bytes + 2 * tarfile.BLOCKSIZE
    return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


_ZEROS = bytes(tarfile.BLOCKSIZE)


class _ShardFile:
    """One tar being written under a temporary name; `close()` renames it into place, so a killed
    run never leaves a complete-looking shard. The archive is written as tarfile writes it (each
    member: its ustar header, its data, zeros to a 512-byte block; at the end two zero blocks and
    zeros to a 10 KiB record: the same bytes as `tarfile.open(mode="w|")`, checked by
    tests/test_pair_shards.py), without tarfile's per-member copies and header rebuilds."""

    def __init__(self, out_dir: str, name: str):
        self.name, self.final = name, os.path.join(out_dir, name)
        self.tmp = os.path.join(out_dir, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        self.raw = FileSystems.create(self.tmp)
        self.stream = _HashingWriter(self.raw)
        self.offset = 0  # archive position of the next header
        self.samples = 0

    def size_with(self, members: list) -> int:
        """The size the closed tar file would have with these members added (exact, not a guess)."""
        return tar_file_size(self.offset + sum(_member_bytes(m) for m in members))

    def add(self, sample: dict, members: list | None = None) -> dict:
        members = _members(sample) if members is None else members
        start = self.offset
        parts = []
        for header, data in members:  # the sample's members in one write
            parts += (header, data, _ZEROS[: -len(data) % tarfile.BLOCKSIZE])
        chunk = b"".join(parts)
        self.stream.write(chunk)
        self.offset += len(chunk)
        m = sample["meta"]
        self.samples += 1
        return {"key": sample["key"], "shard": self.name, "offset": start, "size": self.offset - start, "page_url": m["page_url"], "cond_image_id": m["cond_image_id"], "target_image_id": m["target_image_id"], "similarity": m["similarity"],
                "cond_nsfw": m.get("cond_nsfw"), "target_nsfw": m.get("target_nsfw")}

    def close(self) -> dict:
        self.stream.write(bytes(tar_file_size(self.offset) - self.offset))  # end of archive, record padding
        self.raw.close()
        FileSystems.rename([self.tmp], [self.final])
        return {"shard": self.name, "samples": self.samples, "bytes": self.stream.n, "sha256": self.stream.sha.hexdigest()}


class WriteShards(beam.DoFn):
    """(writer number, [(pair file number, pair file)...]) -> tar shards, streaming, once fetching
    is done (the side input: each writer's fetched files, `FetchRowGroup`'s outputs): the writer's
    images come from its fetched files, in (filter file, row group) order (`_ImageStore`), then each pair file's rows are read in record batches and written sample by
    sample, and a shard closes at `samples_per_shard` samples or `max_shard_bytes`, whichever comes
    first. Memory holds a record batch of stubs, one shard's index rows and the store's offsets
    (~`PAIRS_PER_WRITER` pairs' images), whatever the input size. Shards are named by pair file
    number and sequence (`layout.SHARD_PATTERN`), so a rerun on the same pair files writes the same
    shards."""

    def __init__(self, out_dir: str, cfg: ShardConfig):
        self.out_dir, self.cfg = out_dir, cfg

    def _stubs(self, path: str):
        with FileSystems.open(path) as fh:
            # record batches, not row groups: a row group can hold a whole file's pairs
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=1024, columns=PAIR_COLUMNS):
                # column by column (build_stub's values, without a dict of every column per row)
                cols = {name: batch.column(name).to_pylist() for name in PAIR_COLUMNS}
                sources = [zip(*(cols[f"{side}_{c}"] for c in ("bytes_file", "bytes_row_group", "image_id"))) for side in ("cond", "target")]
                for key, values, cond, target in zip(cols["pair_id"], zip(*(cols[k] for k in layout.META_FIELDS)), *sources):
                    yield {"key": key, "meta": dict(zip(layout.META_FIELDS, values)), "sources": {"cond": cond, "target": target}}

    def process(self, item, fetched: dict):
        number, files = item
        store = _ImageStore([path for _, _, path in sorted(fetched[number])])  # [] for a writer with no files
        try:
            for file_number, path in files:
                yield from self._write(file_number, path, store)
        finally:
            store.close()

    def _write(self, number: int, path: str, store: _ImageStore):
        """The shards of pair file `number`, its images from `store`."""
        shard, seq, index = None, 0, []
        for batch in _batches(self._stubs(path), self.cfg.samples_per_shard):
            for tag, value in materialise(batch, store, self.cfg.store_embedding):
                if tag == REJECTED:
                    yield beam.pvalue.TaggedOutput(REJECTED, value)
                    continue
                members = _members(value)
                alone = tar_file_size(sum(_member_bytes(m) for m in members))
                if alone > self.cfg.max_shard_bytes:  # no shard could hold it within the limit
                    yield beam.pvalue.TaggedOutput(REJECTED, Rejected(value["key"], STAGE, TOO_LARGE, f"sample of {alone} bytes as a tar > max_shard_bytes {self.cfg.max_shard_bytes}", value["meta"]["page_url"]).to_row())
                    continue
                if shard is not None and (shard.samples >= self.cfg.samples_per_shard or shard.size_with(members) > self.cfg.max_shard_bytes):
                    yield beam.pvalue.TaggedOutput("summary", shard.close())
                    yield pa.Table.from_pylist(index, schema=INDEX_SCHEMA)
                    shard, index = None, []
                if shard is None:
                    shard, seq, index = _ShardFile(self.out_dir, layout.SHARD_PATTERN.format(file=number, seq=seq)), seq + 1, []
                index.append(shard.add(value, members))
        if shard is not None:
            yield beam.pvalue.TaggedOutput("summary", shard.close())
            yield pa.Table.from_pylist(index, schema=INDEX_SCHEMA)


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_manifest(_, out_dir: str, summaries: list, cfg: dict, n_pairs: int, encoder, version: str):
    summaries = sorted(summaries, key=lambda s: s["shard"])
    manifest = {
        "stage": STAGE,
        "samples": sum(s["samples"] for s in summaries),
        "pairs_in": n_pairs,
        "shards": summaries,
        "config": cfg,
        "encoder": encoder,
        "code_version": version,
        "layout": {"cond": layout.COND_JPG, "target": layout.TARGET_JPG, "embedding": layout.COND_NPY, "meta": layout.META_JSON},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with FileSystems.create(os.path.join(out_dir, layout.MANIFEST)) as fh:
        fh.write(json.dumps(manifest, indent=2).encode())
    write_wids(out_dir, summaries)


def write_wids(out_dir: str, summaries: list) -> None:
    """The descriptor webdataset's indexed reader opens (wids.ShardListDataset(".../wids.json")):
    shard URLs relative to this file, so the folder can move or be copied to a bucket as a whole;
    samples are numbered in this order (shards by name, samples by offset)."""
    wids = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "webpairs-pairs",
            "shardlist": [{"url": s["shard"], "nsamples": s["samples"], "filesize": s["bytes"]} for s in sorted(summaries, key=lambda s: s["shard"])]}
    with FileSystems.create(os.path.join(out_dir, layout.WIDS)) as fh:
        fh.write(json.dumps(wids, indent=2).encode())


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("webpairs")
    except PackageNotFoundError:
        v = "0+unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+g{sha}" if sha else v


def _pair_files_info(pair_files: list[str]) -> tuple[list[int], object]:
    """(each file's pair count from the parquet footers, encoder name of the first pair); a clear
    error for pair files from before the pair rows carried their images' info."""
    rows, encoder = [], None
    for f in pair_files:
        with FileSystems.open(f) as fh:
            pf = pq.ParquetFile(fh)
            missing = [c for c in PAIR_COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise StageError(f"shards: {f} lacks pair columns {missing}; rerun `webpairs pair` with this version")
            rows.append(pf.metadata.num_rows)
            if encoder is None and pf.metadata.num_rows:
                encoder = next(pf.iter_batches(batch_size=1, columns=["encoder"])).column(0)[0].as_py()
    return rows, encoder


PAIRS_PER_WRITER = 8192  # a writer takes whole pair files until it has at least this many pairs ...
MIN_WRITERS = 16  # ... or fewer, so that a small input still has this many writers (pair files allowing)


def writer_groups(pair_files: list[str], rows: list[int], per_writer: int = PAIRS_PER_WRITER, min_writers: int = MIN_WRITERS) -> list[tuple[int, list]]:
    """[(writer number, [(pair file number, pair file)...])]: consecutive pair files, at least
    min(`per_writer`, all pairs / `min_writers`) pairs a writer (the last one may have fewer). What
    is fetched goes per (writer, filter row group), so fewer, larger writers make fewer of those (on
    Dask pair writes a file per bucket, ~1,000 pairs each at one Common Crawl file); `min_writers`
    keeps a small input's work spread over up to that many writers, as its files' sizes allow (on
    Dask the fetch is spread over as many partitions as there are writers). Shards stay named by
    pair file."""
    per_writer = max(1, min(per_writer, -(-sum(rows) // max(1, min_writers))))
    groups, current, n = [], [], 0
    for number, (path, count) in enumerate(zip(pair_files, rows)):
        current.append((number, path))
        n += count
        if n >= per_writer:
            groups.append(current)
            current, n = [], 0
    if current:
        groups.append(current)
    return list(enumerate(groups))


def run_shards(input_path: str, out_dir: str, cfg: ShardConfig, beam_args=None) -> dict:
    """Write pair shards from a pair stage directory; returns reconciled stats."""
    pair_files = stage_files(input_path, "pairs", expected="pair")
    check_made_from(input_path, "webpairs pair")  # pair's pointers into filter, and filter's into download, still hold
    upstream = (read_stats(input_path) or {}).get(MADE_FROM) or {}
    if upstream.get("path"):
        check_made_from(upstream["path"], "webpairs filter")
    rows, encoder = _pair_files_info(pair_files)  # footers only, no data pass
    system_arrow_pool()  # core/memory.py: less memory held at the peak than mimalloc
    with frozen_gc(), StageOutput(out_dir, STAGE) as out:
        fetch_dir = out.path.rstrip("/") + "/" + FETCHED
        try:
            _shard_pipeline(writer_groups(pair_files, rows, PAIRS_PER_WRITER, MIN_WRITERS), out.path, fetch_dir, cfg, sum(rows), encoder, beam_args)
        finally:
            remove_folder(fetch_dir)
        return out.commit()


def _shard_pipeline(groups: list, out_path: str, fetch_dir: str, cfg: ShardConfig, n_pairs: int, encoder, beam_args) -> None:
    """The stage's Beam pipeline: each writer's pair files (`writer_groups`) -> the images they
    need, each filter row group read once -> shards, the index, the manifest and the counts, written
    under `out_path`."""
    with stage_pipeline(beam_args) as p:
        numbered = p | "PairFiles" >> beam.Create(groups) | "Spread" >> beam.Reshuffle()  # on any worker
        # each filter row group the pairs point into is read once, by one worker, for every writer
        # that needs its images (FetchRowGroup). Who needs what goes through files, not a
        # shuffle: on Dask, two shuffles of the pair files' partitions made the graph 6.6x larger
        # (10,533 tasks at one Common Crawl file) and the driver +120 MB building it (issue 34)
        fetched = (
            numbered
            | "Wants" >> beam.ParDo(WriteWants(fetch_dir))
            # one reduction to one element of (row group, writer) keys, ~writers x row groups: 832
            # at most at one Common Crawl file; a snapshot in one run would need a real shuffle here
            | "RowGroups" >> beam.combiners.ToSet()
            | "EachRowGroup" >> beam.FlatMap(sorted)
            | "SpreadRowGroups" >> beam.GroupByKey()  # one partition in, spread over the workers
            | "Fetch" >> beam.ParDo(FetchRowGroup(fetch_dir, cfg.store_embedding))
        )
        written = numbered | "WriteShards" >> beam.ParDo(WriteShards(out_path, cfg), beam.pvalue.AsMultiMap(fetched)).with_outputs("summary", REJECTED, main="index")
        counts = {"input_count": p | "PairCount" >> beam.Create([n_pairs]), "kept": written.index, "rejected": written[REJECTED]}
        # index rows leave each writer as one table per shard (Beam's cost is per element)
        _ = counts | "Write" >> WriteStageOutputs(out_path, STAGE, "index", INDEX_SCHEMA, kept_tables=True)
        _ = (
            p
            | "ManifestSeed" >> beam.Create([None])
            | "Manifest"
            >> beam.Map(_write_manifest, out_dir=out_path, summaries=beam.pvalue.AsList(written.summary), cfg=to_dict(cfg), n_pairs=n_pairs, encoder=encoder, version=code_version())
        )
