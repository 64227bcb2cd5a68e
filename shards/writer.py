"""`shards`: PairRecords -> webdataset pair shards, a parquet index, manifest.json.

No shuffle and no join: each pair row already carries what its sample needs of both images (URLs,
alt texts, pointers to the image bytes; see PAIR_SCHEMA). One writer per
pair parquet file reads it one row group at a time, fetches the image bytes of a shard's worth of
pairs with the condition embeddings (one filter row group at a time, only the wanted images), builds the samples (layout in
core/sample_layout.py) and streams them into a tar under a temporary name, renamed into place when
the shard is full (count or bytes) -> index/ parquet with byte offsets, manifest.json and stats.
The pair count comes from the parquet footers, so the counts reconcile against the input.
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
from core.records import Rejected
from core.stageio import StageError, StageOutput, WriteStageOutputs, stage_pipeline, stage_files

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
    image id). The writer fetches the bytes (and the condition embedding) of a whole batch of
    stubs at once, one row group at a time."""
    meta = {k: pair[k] for k in layout.META_FIELDS}
    sources = {side: (pair[f"{side}_bytes_file"], pair[f"{side}_bytes_row_group"], pair[f"{side}_image_id"]) for side in ("cond", "target")}
    return {"key": pair["pair_id"], "meta": meta, "sources": sources}


def materialise(stubs: list[dict], store_embedding: bool):
    """Fetch the image bytes (and condition embeddings) of a batch of stubs and build full samples;
    yields samples or ("rejected", row) for a pair whose image cannot be read."""
    from core.stageio import fetch_rows

    refs = [src for s in stubs for src in s["sources"].values() if src[0] is not None]
    columns = ["image_bytes"] + (["embedding"] if store_embedding else [])
    rows = fetch_rows({(f, rg) for f, rg, _ in refs}, "image_id", columns, wanted={i for _, _, i in refs}) if refs else {}
    for s in stubs:
        try:
            jpgs = {}
            for side, (f, _, image_id) in s["sources"].items():
                data = rows.get(image_id, {}).get("image_bytes")
                if data is None:
                    raise KeyError(f"{side} bytes of {image_id} not found in {f}")
                jpgs[side] = layout.as_jpeg(data)
        except Exception as err:  # noqa: BLE001 - reject the pair, never crash the shard
            reason = MISSING_IMAGE if isinstance(err, KeyError) else BAD_IMAGE
            yield REJECTED, Rejected(s["key"], STAGE, reason, str(err)[:200], s["meta"]["page_url"]).to_row()
            continue
        files = {layout.COND_JPG: jpgs["cond"], layout.TARGET_JPG: jpgs["target"], layout.META_JSON: json.dumps(s["meta"], sort_keys=True).encode()}
        embedding = rows[s["sources"]["cond"][2]].get("embedding") if store_embedding else None
        if embedding is not None:
            files[layout.COND_NPY] = layout.npy_bytes(embedding)
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


def _members(sample: dict) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The tar members of a sample, with fixed metadata (reproducible bytes)."""
    members = []
    for ext, data in sample["files"].items():
        info = tarfile.TarInfo(f"{sample['key']}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        members.append((info, data))
    return members


def _member_bytes(info: tarfile.TarInfo) -> int:
    """Bytes a member takes in the archive: its header block(s) and its data padded to 512."""
    header = len(info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape"))
    return header + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def tar_file_size(content_bytes: int) -> int:
    """The size of a tar file whose members take `content_bytes`: tarfile's close() adds two zero
    blocks (end of archive) and pads the file to a whole record (RECORDSIZE, 10 KiB)."""
    end = content_bytes + 2 * tarfile.BLOCKSIZE
    return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class _ShardFile:
    """One tar being written under a temporary name; `close()` renames it into place, so a killed
    run never leaves a complete-looking shard."""

    def __init__(self, out_dir: str, name: str):
        self.name, self.final = name, os.path.join(out_dir, name)
        self.tmp = os.path.join(out_dir, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        self.raw = FileSystems.create(self.tmp)
        self.stream = _HashingWriter(self.raw)
        self.tar = tarfile.open(fileobj=self.stream, mode="w|", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def size_with(self, members: list) -> int:
        """The size the closed tar file would have with these members added (exact, not a guess)."""
        return tar_file_size(self.tar.offset + sum(_member_bytes(info) for info, _ in members))

    def add(self, sample: dict, members: list | None = None) -> dict:
        # `tar.offset` is the archive position of the next header; tarfile keeps offsets on its
        # own copies of the TarInfo, never on ours, so the sample's range is measured here
        members = _members(sample) if members is None else members
        start = self.tar.offset
        for info, data in members:
            self.tar.addfile(info, io.BytesIO(data))
        m = sample["meta"]
        self.samples += 1
        return {"key": sample["key"], "shard": self.name, "offset": start, "size": self.tar.offset - start, "page_url": m["page_url"], "cond_image_id": m["cond_image_id"], "target_image_id": m["target_image_id"], "similarity": m["similarity"],
                "cond_nsfw": m.get("cond_nsfw"), "target_nsfw": m.get("target_nsfw")}

    def close(self) -> dict:
        self.tar.close()
        self.raw.close()
        FileSystems.rename([self.tmp], [self.final])
        return {"shard": self.name, "samples": self.samples, "bytes": self.stream.n, "sha256": self.stream.sha.hexdigest()}


class WriteShards(beam.DoFn):
    """(file number, pair parquet file) -> tar shards, streaming: pair rows are read in record
    batches, their image bytes fetched a shard's worth at a time, and a shard closes at
    `samples_per_shard` samples or `max_shard_bytes`, whichever comes first. No shuffle: memory
    holds one shard's samples, whatever the input size. Shards are named by file number and
    sequence (`layout.SHARD_PATTERN`), so a rerun on the same pair files writes the same shards."""

    def __init__(self, out_dir: str, cfg: ShardConfig):
        self.out_dir, self.cfg = out_dir, cfg

    def _stubs(self, path: str):
        with FileSystems.open(path) as fh:
            # record batches, not row groups: a row group can hold a whole file's pairs
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=1024, columns=PAIR_COLUMNS):
                for row in batch.to_pylist():
                    yield build_stub(row)

    def process(self, item):
        number, path = item
        shard, seq = None, 0
        for batch in _batches(self._stubs(path), self.cfg.samples_per_shard):
            for tag, value in materialise(batch, self.cfg.store_embedding):
                if tag == REJECTED:
                    yield beam.pvalue.TaggedOutput(REJECTED, value)
                    continue
                members = _members(value)
                alone = tar_file_size(sum(_member_bytes(info) for info, _ in members))
                if alone > self.cfg.max_shard_bytes:  # no shard could hold it within the limit
                    yield beam.pvalue.TaggedOutput(REJECTED, Rejected(value["key"], STAGE, TOO_LARGE, f"sample of {alone} bytes as a tar > max_shard_bytes {self.cfg.max_shard_bytes}", value["meta"]["page_url"]).to_row())
                    continue
                if shard is not None and (shard.samples >= self.cfg.samples_per_shard or shard.size_with(members) > self.cfg.max_shard_bytes):
                    yield beam.pvalue.TaggedOutput("summary", shard.close())
                    shard = None
                if shard is None:
                    shard, seq = _ShardFile(self.out_dir, layout.SHARD_PATTERN.format(file=number, seq=seq)), seq + 1
                yield shard.add(value, members)
        if shard is not None:
            yield beam.pvalue.TaggedOutput("summary", shard.close())


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


def _pair_files_info(pair_files: list[str]) -> tuple[int, object]:
    """(pair count from the parquet footers, encoder name of the first pair); a clear error for pair
    files from before the pair rows carried their images' info."""
    n_pairs, encoder = 0, None
    for f in pair_files:
        with FileSystems.open(f) as fh:
            pf = pq.ParquetFile(fh)
            missing = [c for c in PAIR_COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise StageError(f"shards: {f} lacks pair columns {missing}; rerun `webpairs pair` with this version")
            n_pairs += pf.metadata.num_rows
            if encoder is None and pf.metadata.num_rows:
                encoder = next(pf.iter_batches(batch_size=1, columns=["encoder"])).column(0)[0].as_py()
    return n_pairs, encoder


def run_shards(input_path: str, out_dir: str, cfg: ShardConfig, beam_args=None) -> dict:
    """Write pair shards from a pair stage directory; returns reconciled stats."""
    pair_files = stage_files(input_path, "pairs", expected="pair")
    n_pairs, encoder = _pair_files_info(pair_files)  # footers only, no data pass
    with StageOutput(out_dir, STAGE) as out:
        with stage_pipeline(beam_args) as p:
            written = (
                p
                | "PairFiles" >> beam.Create(list(enumerate(pair_files)))
                | "Spread" >> beam.Reshuffle()  # one writer per pair file, on any worker
                | "WriteShards" >> beam.ParDo(WriteShards(out.path, cfg)).with_outputs("summary", REJECTED, main="index")
            )
            counts = {"input_count": p | "PairCount" >> beam.Create([n_pairs]), "kept": written.index, "rejected": written[REJECTED]}
            _ = counts | "Write" >> WriteStageOutputs(out.path, STAGE, "index", INDEX_SCHEMA)
            _ = (
                p
                | "ManifestSeed" >> beam.Create([None])
                | "Manifest"
                >> beam.Map(_write_manifest, out_dir=out.path, summaries=beam.pvalue.AsList(written.summary), cfg=to_dict(cfg), n_pairs=n_pairs, encoder=encoder, version=code_version())
            )
        return out.commit()
