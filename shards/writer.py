"""`shards`: PairRecords + their images -> webdataset pair shards, a parquet index, manifest.json.

Steps: join each pair with its condition and target image info (CoGroupByKey on image_id; only
the columns a sample needs are read, the embedding travels as .npy bytes) -> a sample stub holding
pointers to the image bytes -> assign it to a shard by hashing its key (the shard count follows
from the pair count in the parquet footers) -> per shard, fetch the bytes one parquet row group at a
time, build the samples (layout in core/sample_layout.py) and write the tar atomically (temp name,
then rename), recording byte offsets -> write index/ parquet, manifest.json and stats.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import tarfile
import time
import uuid

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from core import sample_layout as layout
from core.config import ShardConfig, to_dict
from core.records import Rejected
from core.stageio import StageError, WriteStageOutputs, finish_stage, pipeline_options, stage_files

STAGE = "shards"
REJECTED = "rejected"
MISSING_IMAGE = "missing_image"
BAD_IMAGE = "unreadable_image"

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # the pair_id, the webdataset __key__
        ("shard", pa.string()),  # tar file name, relative to the shards directory
        ("offset", pa.int64()),  # byte offset of the sample's first tar header
        ("size", pa.int64()),  # bytes from that header to the end of the sample's last member
        ("page_url", pa.string()),
        ("cond_image_id", pa.string()),
        ("target_image_id", pa.string()),
        ("similarity", pa.float32()),
    ]
)


# What the shard writer needs of an image; the rest of the pair stage's image record stays behind.
IMAGE_COLUMNS = ["image_id", "page_url", "image_url", "alt", "encoder", "image_bytes", "bytes_file", "bytes_row_group"]
PAIR_COLUMNS = ["pair_id", "page_url", "cond_image_id", "target_image_id", "similarity"]


def image_info(row: dict, with_embedding: bool) -> tuple[str, dict]:
    """(image_id, compact info): url, alt, encoder, where the bytes are and, when asked, the
    embedding as .npy bytes. This is what crosses the joins, once per pair side."""
    info = {
        "page_url": row["page_url"],
        "url": row["image_url"],
        "alt": row["alt"],
        "encoder": row.get("encoder"),
        # inline bytes when the images table has them, else the pointer to the filter output
        "source": row["image_bytes"] if row.get("image_bytes") is not None else (row["bytes_file"], row["bytes_row_group"], row["image_id"]),
        "npy": layout.npy_bytes(row["embedding"]) if with_embedding and row.get("embedding") is not None else None,
    }
    return row["image_id"], info


def _join(item, side: str):
    """(image_id, {"pairs": [...], "image": [...]}) -> pairs with that side's image info attached."""
    image_id, groups = item
    images = sorted(groups["image"], key=lambda r: r["page_url"])
    for pair in groups["pairs"]:
        if not images:
            yield beam.pvalue.TaggedOutput(REJECTED, Rejected(pair["pair_id"], STAGE, MISSING_IMAGE, f"{side} image {image_id} not in the images table", pair["page_url"]).to_row())
            continue
        yield {**pair, side: images[0]}


def build_stub(pair: dict, store_embedding: bool) -> dict:
    """A sample without its image bytes: metadata, embedding and where each image's bytes live.

    The bytes are fetched by the shard writer, one row group at a time, so the shuffle moves ids
    and metadata, never images.
    """
    cond, target = pair["cond"], pair["target"]
    meta = {
        "pair_id": pair["pair_id"],
        "page_url": pair["page_url"],
        "cond_url": cond["url"],
        "target_url": target["url"],
        "cond_alt": cond["alt"],
        "target_alt": target["alt"],
        "cond_image_id": pair["cond_image_id"],
        "target_image_id": pair["target_image_id"],
        "similarity": pair["similarity"],
        "encoder": cond.get("encoder"),
    }
    npy = cond["npy"] if store_embedding else None
    return {"key": pair["pair_id"], "meta": meta, "npy": npy, "sources": {"cond": cond["source"], "target": target["source"]}}


def materialise(stubs: list[dict]):
    """Fetch the image bytes of a shard's stubs and build full samples; yields samples or
    ("rejected", row) for a pair whose image cannot be read."""
    from core.stageio import fetch_column

    refs = [src for s in stubs for src in s["sources"].values() if isinstance(src, tuple)]
    blobs = fetch_column({(f, rg) for f, rg, _ in refs}, "image_id", "image_bytes", wanted={i for _, _, i in refs}) if refs else {}
    for s in stubs:
        try:
            jpgs = {}
            for side, src in s["sources"].items():
                data = src if isinstance(src, bytes) else blobs.get(src[2])
                if data is None:
                    raise KeyError(f"{side} bytes of {src[2]} not found in {src[0]}")
                jpgs[side] = layout.as_jpeg(data)
        except Exception as err:  # noqa: BLE001 - reject the pair, never crash the shard
            reason = MISSING_IMAGE if isinstance(err, KeyError) else BAD_IMAGE
            yield REJECTED, Rejected(s["key"], STAGE, reason, str(err)[:200], s["meta"]["page_url"]).to_row()
            continue
        files = {layout.COND_JPG: jpgs["cond"], layout.TARGET_JPG: jpgs["target"], layout.META_JSON: json.dumps(s["meta"], sort_keys=True).encode()}
        if s["npy"] is not None:
            files[layout.COND_NPY] = s["npy"]
        yield "sample", {"key": s["key"], "files": files, "meta": s["meta"]}


def shard_count(n_samples: int, cfg: ShardConfig) -> int:
    """Shards needed so that, on average, none exceeds the sample target (the byte limit is kept by
    the writer, which starts a new part file whenever a shard reaches it)."""
    return max(1, math.ceil(n_samples / cfg.samples_per_shard))


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


class WriteShard(beam.DoFn):
    """Write the samples of one shard index as tar file(s): a new part starts at the byte limit."""

    def __init__(self, out_dir: str, cfg: ShardConfig):
        self.out_dir, self.cfg = out_dir, cfg

    def _write_part(self, name: str, samples: list[dict]):
        final = os.path.join(self.out_dir, name)
        tmp = os.path.join(self.out_dir, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        index = []
        with FileSystems.create(tmp) as raw:
            stream = _HashingWriter(raw)
            with tarfile.open(fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for s in samples:
                    start = None
                    for ext, data in s["files"].items():
                        info = tarfile.TarInfo(f"{s['key']}.{ext}")
                        info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed: reproducible bytes
                        tar.addfile(info, io.BytesIO(data))
                        start = info.offset if start is None else start
                    end = tar.offset
                    m = s["meta"]
                    index.append({"key": s["key"], "shard": name, "offset": start, "size": end - start, "page_url": m["page_url"], "cond_image_id": m["cond_image_id"], "target_image_id": m["target_image_id"], "similarity": m["similarity"]})
        FileSystems.rename([tmp], [final])  # a killed run never leaves a complete-looking shard
        return index, {"shard": name, "samples": len(samples), "bytes": stream.n, "sha256": stream.sha.hexdigest()}

    def process(self, item):
        shard_index, stubs = item
        samples = []
        for tag, value in materialise(sorted(stubs, key=lambda s: s["key"])):
            if tag == REJECTED:
                yield beam.pvalue.TaggedOutput(REJECTED, value)
            else:
                samples.append(value)
        part, batch, size = 0, [], 0
        for s in samples + [None]:
            n = sum(len(v) + 512 for v in s["files"].values()) if s else 0
            if s is None or (batch and (size + n > self.cfg.max_shard_bytes or len(batch) >= self.cfg.samples_per_shard)):
                if batch:
                    index, summary = self._write_part(layout.SHARD_PATTERN.format(index=shard_index, part=part), batch)
                    yield beam.pvalue.TaggedOutput("summary", summary)
                    yield from index
                part, batch, size = part + 1, [], 0
            if s is not None:
                batch.append(s)
                size += n


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


class WritePairShards(beam.PTransform):
    """{"pairs", "images"} PCollections -> shards on disk; returns the stage's stat PCollections."""

    def __init__(self, out_dir: str, cfg: ShardConfig, n_pairs: int):
        super().__init__()
        self.out_dir, self.cfg = out_dir, cfg
        self.shards = shard_count(n_pairs, cfg)  # planned from the pair count, known up front

    def expand(self, pcolls):
        pairs, images = pcolls["pairs"], pcolls["images"]
        keyed_images = images | "ImageInfo" >> beam.Map(image_info, self.cfg.store_embedding)
        with_cond = (
            {"pairs": pairs | "KeyCond" >> beam.Map(lambda p: (p["cond_image_id"], p)), "image": keyed_images}
            | "JoinCond" >> beam.CoGroupByKey()
            | "AttachCond" >> beam.FlatMap(_join, "cond").with_outputs(REJECTED, main="ok")
        )
        with_both = (
            {"pairs": with_cond.ok | "KeyTarget" >> beam.Map(lambda p: (p["target_image_id"], p)), "image": keyed_images}
            | "JoinTarget" >> beam.CoGroupByKey()
            | "AttachTarget" >> beam.FlatMap(_join, "target").with_outputs(REJECTED, main="ok")
        )
        shards = self.shards
        written = (
            with_both.ok
            | "BuildStub" >> beam.Map(build_stub, self.cfg.store_embedding)
            | "AssignShard" >> beam.Map(lambda s: (int(s["key"], 16) % shards, s))
            | "GroupShards" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(WriteShard(self.out_dir, self.cfg)).with_outputs("summary", REJECTED, main="index")
        )
        rejected = (with_cond[REJECTED], with_both[REJECTED], written[REJECTED]) | "AllRejected" >> beam.Flatten()
        return {"input": pairs, "kept": written.index, "rejected": rejected, "summaries": written.summary}


def run_shards(input_path: str, out_dir: str, cfg: ShardConfig, beam_args=None) -> dict:
    """Write pair shards from a pair stage directory; returns reconciled stats."""
    pair_files, image_files = stage_files(input_path, "pairs"), stage_files(input_path, "images")
    if not pair_files or not image_files:
        raise StageError(f"shards: need pairs/ and images/ parquet under {input_path} (expected a `pair` output)")
    encoder = None
    import pyarrow.parquet as pq

    for f in image_files:
        col = pq.read_table(f, columns=["encoder"]).column("encoder")
        if len(col):
            encoder = col[0].as_py()
            break
    if not FileSystems.exists(out_dir):
        FileSystems.mkdirs(out_dir)
    # the shard count follows from the pair count, read from the parquet footers (no data pass)
    n_pairs = sum(pq.ParquetFile(FileSystems.open(f)).metadata.num_rows for f in pair_files)
    image_columns = IMAGE_COLUMNS + (["embedding"] if cfg.store_embedding else [])
    with beam.Pipeline(options=pipeline_options(beam_args)) as p:
        pairs = p | "PairFiles" >> beam.Create(pair_files) | "ReadPairs" >> beam.io.ReadAllFromParquet(columns=PAIR_COLUMNS)
        images = p | "ImageFiles" >> beam.Create(image_files) | "ReadImages" >> beam.io.ReadAllFromParquet(columns=image_columns)
        out = {"pairs": pairs, "images": images} | "Shards" >> WritePairShards(out_dir, cfg, n_pairs)
        _ = {"input": out["input"], "kept": out["kept"], "rejected": out["rejected"]} | "Write" >> WriteStageOutputs(out_dir, STAGE, "index", INDEX_SCHEMA)
        _ = (
            p
            | "ManifestSeed" >> beam.Create([None])
            | "Manifest"
            >> beam.Map(
                _write_manifest,
                out_dir=out_dir,
                summaries=beam.pvalue.AsList(out["summaries"]),
                cfg=to_dict(cfg),
                n_pairs=beam.pvalue.AsSingleton(out["input"] | "CountPairs" >> beam.combiners.Count.Globally()),
                encoder=encoder,
                version=code_version(),
            )
        )
    return finish_stage(out_dir)
