"""`filter`: downloaded images -> ImageRecords (validated, hashed, embedded, scored) with Beam.

download keeps each distinct image once (downloads/) and says which image every link resolved to
(its occurrences/). Steps:
1. per image: decode once, hash (pHash), check size, aspect and the flat-image signal, preprocess
   -> embed and score with RunInference (skipped with encoder "none"; images that only boilerplate
   evidence links point to are hashed, never embedded), the nsfw score from LAION's head on the
   embedding (core/safety.py; on a second encoder's embedding with --safety-encoder) -> optional
   maximum nsfw score, minimum CLIP score;
2. per link: the image's verdict joined to each of its links, plus the link's own checks (declared
   size, URL words) -> occurrences/ (every link, before any threshold could drop a copy: pair's
   boilerplate evidence and the table pair joins images to pages with) and rejected/ (per link, so
   that input == kept + rejected counts links). The join crosses no shuffle (issue 34: the
   in-process runner held every link and verdict of a CoGroupByKey in memory): verdicts and score
   rejects are spilled as they come, into one Arrow IPC file per join bucket (a hash of the image
   id) under the output's `.spill/`, the links too when there are several buckets, and each
   bucket is joined on its own, holding only that bucket's verdicts (JOIN_LINKS links a bucket);
3. write images/ (one row per kept image: its hashes, checks, scores and a pointer to its bytes in
   download's downloads/, not a copy of them; a row group per download row group it points into;
   `core/stageio.fetch_rows` and `fill_bytes` follow the pointer), occurrences/, rejected/,
   stats.json.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from core.config import FilterConfig
from core.encoders import Encoder, EncoderUnavailable, load_encoder, preprocess
from core.safety import SAFETY_ENCODER, SafetyUnavailable, head_for, head_url
from core.records import DOWNLOAD_OCCURRENCE_SCHEMA, DOWNLOAD_SCHEMA, IMAGE_SCHEMA, OCCURRENCE_SCHEMA, SITE_SCHEMA, Rejected, bucket_of
from core.stageio import MADE_FROM, POINTER, ReadRowGroups, StageError, made_from, StageOutput, WriteStageOutputs, parquet_batches, check_columns, parquet_rows, row_groups, stage_pipeline, stage_files
from core.memory import one_blas_thread, release_blas_thread, tune_allocators
from core.perceptual import MAX_SIDE as PDQ_SIDE, pdq_hex
from filter import faces
from filter.embed import EncoderModelHandler, Safety
from filter.hashing import phash_hex, sha256_hex
from filter.signals import DECLARED_TOO_SMALL, FLAT_IMAGE, FLAT_THUMB, URL_WORD, declared_too_small, flat_share, url_words
from filter.validate import Invalid, check_shape, configure_pillow, decode, decode_side

STAGE = "filter"
REJECTED = "rejected"
OCCURRENCES = "occurrences"  # every downloaded link, as boilerplate evidence for `pair`
VERDICTS = "verdicts"
IMAGE_REJECTS = "image_rejects"  # (image_id, (reason, detail)) of the thresholds on scores
LINKS = "links"
LINK_FIELDS = tuple(DOWNLOAD_OCCURRENCE_SCHEMA.names)
VERDICT_FIELDS = ("sha256", "phash", "width", "height", "reason", "detail")
# the link join (issue 34): no shuffle; spilled rows keyed by image id, one Arrow IPC file per
# bucket, and each bucket joined on its own
SPILL = ".spill"  # in the stage's output folder, removed before _SUCCESS
JOIN_LINKS = 100_000  # links per join bucket: a bucket's verdicts (<= its links) are what the join holds
SPILL_ROWS = 16_384  # rows per spilled record batch
JOIN_BATCH = 8_192  # links read at a time by the join
VERDICT_SCHEMA = pa.schema([("image_id", pa.string()), ("sha256", pa.string()), ("phash", pa.string()), ("width", pa.int64()), ("height", pa.int64()), ("reason", pa.string()), ("detail", pa.string())])
IMAGE_REJECT_SCHEMA = pa.schema([("image_id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
URL_WORD_MATCHES = "url_word_matches"
LOW_CLIP_SCORE = "low_clip_score"
NSFW = "nsfw"
NO_ENCODER = "none"
# images/ rows converted to Arrow at a time. When the rows held the bytes (before the pointers;
# still with --faces blur, which stores the blurred JPEG), a row group (~110 KB a web photo: ~28 MB)
# so stayed under glibc's 32 MB mmap ceiling: Beam's 1,000 (~110 MB) were mapped afresh and faulted
# in for every row group (~120 page faults an image, ~0.35 CPU ms of filter's ~4; issue 34)
IMAGE_BATCH_ROWS = 250

log = logging.getLogger(__name__)


class ValidateAndHash(beam.DoFn):
    """One distinct image: decode once (a JPEG at the smallest DCT scale that pHash, the flat-image
    thumbnail, the encoder and PDQ need; sizes from the header; a YCbCr or greyscale JPEG as its
    luma plane, which pHash and PDQ hash and the flat check screens, decoded again in RGB only when
    the screen cannot clear it, for face detection and for the encoder), hash, check size, aspect
    and the flat-image signal, and preprocess for the encoder. Every image leaves its verdict (tagged `verdicts`: image_id ->
    pHash, size, reason); images that pass and that a kept link points to go on to the encoder."""

    def __init__(self, cfg: FilterConfig, image_size: int = 0, mean=(0.5,) * 3, std=(0.5,) * 3, second: tuple = ()):
        self.cfg, self.image_size, self.mean, self.std = cfg, image_size, mean, std
        self.second = second  # (size, mean, std) of a second encoder (the nsfw score's), or ()
        # PDQ (stored for every kept image) sees the image fitted to PDQ_SIDE (512) px, as Meta's
        # reference does, so a JPEG is scaled only when both its sides are >= 2 x PDQ_SIDE; pHash,
        # the flat thumbnail and the encoder alone would take 1/2-1/8 scale of most photos, but PDQ
        # below 512 px drifts by ~17 bits (benchmarks/filter.py prints both baselines)
        self.side = decode_side(cfg, image_size, FLAT_THUMB, PDQ_SIDE) if cfg.scaled_decode else 0
        self.kept = Metrics.counter(STAGE, "valid")

    def setup(self):
        configure_pillow(self.cfg)
        tune_allocators()  # a Dask worker's too: Arrow's system pool, glibc's thresholds (core/memory.py)
        one_blas_thread()  # the hashes' small matrix products on one thread (core/memory.py)
        self._blas = True

    def teardown(self):
        if getattr(self, "_blas", False):
            release_blas_thread()
            self._blas = False

    def process(self, row: dict):
        data = row.get("image_bytes")
        digest = sha256_hex(data) if data is not None else None
        verdict = {"sha256": digest, "phash": None, "width": None, "height": None, "reason": None, "detail": None}
        decoded = decode(data, self.cfg, self.side, luma=True)  # a YCbCr JPEG: its luma plane
        problem = decoded if isinstance(decoded, Invalid) else None
        if problem is None:
            rgb = _RGB(data, self.cfg, self.side, decoded.image)
            verdict.update(phash=phash_hex(decoded.image, self.cfg.phash_size), width=decoded.width, height=decoded.height)
            problem = check_shape(decoded, self.cfg) or self._flat(decoded, rgb)
        if problem is not None:
            verdict.update(reason=problem.reason, detail=problem.detail)
        yield beam.pvalue.TaggedOutput(VERDICTS, (row["image_id"], tuple(verdict[f] for f in VERDICT_FIELDS)))
        if problem is not None or not row.get("links", 1):  # rejected, or only boilerplate evidence
            return
        record = {
            "image_id": row["image_id"],
            "page_url": row["page_url"],
            "image_url": row["image_url"],
            "alt": row.get("alt") or "",
            "position": row.get("position") or 0,
            "width": decoded.width,
            "height": decoded.height,
            "format": decoded.format,
            "sha256": digest,
            "phash": verdict["phash"],
            "embedding": None,
            "encoder": None,
            "clip_score": None,
            # a pointer to the bytes in download's row (a second copy cost ~0.3-1 CPU ms an image of
            # page-cache writes, a third of filter's time, and the disk twice; issue 34)
            "image_bytes": None if row.get(POINTER[0]) is not None else data,
            **{c: row.get(c) for c in POINTER},
            "pdq": pdq_hex(decoded.image),  # what `webpairs scrub --blocklist` matches later
            "faces": None, "face_boxes": None,
        }
        blurred = None
        if self.cfg.faces != "off":  # the cascade sees the RGB decode's grey levels, as ever
            blurred = faces.apply(record, rgb(), self.cfg.faces, (decoded.width, decoded.height), lambda side: decode(data, self.cfg, side).image)  # with --faces blur
            if blurred is not None:  # the blurred JPEG is stored, not pointed to
                record.update(dict.fromkeys(POINTER))
        self.kept.inc()
        if self.image_size:
            image = blurred or rgb()
            if self.second:
                yield record, (preprocess(image, self.image_size, self.mean, self.std), record["alt"], preprocess(image, *self.second))
            else:
                yield record, (preprocess(image, self.image_size, self.mean, self.std), record["alt"])
        else:  # no encoder: the record is kept as it is (no score to threshold)
            yield record

    def _flat(self, decoded, rgb) -> Optional[Invalid]:
        cfg = self.cfg
        if cfg.flat_colours:
            share = flat_share(decoded.image, cfg.flat_colours, cfg.flat_share, rgb)
            if share is not None:
                return Invalid(FLAT_IMAGE, f"{cfg.flat_colours} colours cover {share:.0%} of the pixels (>= {cfg.flat_share:.0%})")
        return None


class _RGB:
    """The RGB decode of an image that `decode(..., luma=True)` gave as a luma plane: decoded at the
    same DCT scale on first call (the flat check of a plane it cannot clear, face detection, the
    encoder's input), then kept; an RGB image as it is."""

    def __init__(self, data: bytes, cfg: FilterConfig, side: int, image):
        self.data, self.cfg, self.side, self.plane = data, cfg, side, image
        self.image = image if image.mode == "RGB" else None

    def __call__(self):
        if self.image is None:
            again = decode(self.data, self.cfg, self.side)
            if isinstance(again, Invalid):  # decoded as a plane already, so not expected: its grey levels
                log.warning("filter: an image decoded as its luma plane failed in RGB (%s %s): its grey levels stand in", again.reason, again.detail)
                again = None
            self.image = again.image if again is not None else self.plane.convert("RGB")
        return self.image


def join_buckets(links: int) -> int:
    """How many buckets the link join of `links` links is split into (JOIN_LINKS links each)."""
    return max(1, -(-links // JOIN_LINKS))


class _SpillFiles:
    """Rows or record batches of one schema, into one Arrow IPC file per join bucket under
    `spill_dir` (IPC: written and read back as they are in memory; the spill lives only until the
    stage ends). Each file is written under a temporary name and renamed when whole, so a retried
    task never mixes two attempts; `close` gives [(bucket, path)] of the files it wrote."""

    def __init__(self, spill_dir: str, prefix: str, schema: pa.Schema):
        self.spill_dir, self.prefix, self.schema = spill_dir, prefix, schema
        self.rows: dict[int, list] = {}
        self.files: dict[int, tuple] = {}  # bucket -> (path, tmp, file, writer)

    def add(self, bucket: int, row: tuple) -> None:
        rows = self.rows.setdefault(bucket, [])
        rows.append(row)
        if len(rows) >= SPILL_ROWS:
            self._flush(bucket)

    def add_batch(self, bucket: int, batch: pa.RecordBatch) -> None:
        if batch.schema != self.schema:  # e.g. an older occurrences file's int64 position: the spill's types
            batch = batch.cast(self.schema)
        self._writer(bucket).write_batch(batch)

    def _flush(self, bucket: int) -> None:
        rows = self.rows.pop(bucket, None)
        if rows:
            columns = zip(*rows)
            self._writer(bucket).write_table(pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, self.schema)], schema=self.schema))

    def _writer(self, bucket: int):
        if bucket not in self.files:
            path = os.path.join(self.spill_dir, f"{self.prefix}-{bucket}-{uuid.uuid4().hex}.arrow")
            tmp = f"{path}.tmp"
            fh = FileSystems.create(tmp)
            self.files[bucket] = (path, tmp, fh, pa.ipc.new_file(fh, self.schema))
        return self.files[bucket][3]

    def close(self) -> list[tuple[int, str]]:
        for bucket in list(self.rows):
            self._flush(bucket)
        done = []
        for bucket, (path, tmp, fh, writer) in sorted(self.files.items()):
            writer.close()
            fh.close()
            FileSystems.rename([tmp], [path])
            done.append((bucket, path))
        self.files = {}
        return done


def _read_spill(path: str):
    """The record batches of a spill file."""
    with FileSystems.open(path) as fh:
        spill = pa.ipc.open_file(fh)
        for i in range(spill.num_record_batches):
            yield spill.get_batch(i)


def _columns(batch) -> list[list]:
    return [batch.column(i).to_pylist() for i in range(batch.num_columns)]


class SpillByImage(beam.DoFn):
    """(image_id, values tuple) -> the rows, spilled into their join bucket's file (one per bucket
    and bundle); outputs (bucket, path) of each file at the end of the bundle."""

    def __init__(self, spill_dir: str, prefix: str, schema: pa.Schema, buckets: int):
        self.spill_dir, self.prefix, self.schema, self.buckets = spill_dir, prefix, schema, buckets

    def start_bundle(self):
        self.files = _SpillFiles(self.spill_dir, self.prefix, self.schema)

    def process(self, item):
        image_id, values = item
        self.files.add(bucket_of(image_id, self.buckets), (image_id, *values))

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.timestamp import MIN_TIMESTAMP
        from apache_beam.utils.windowed_value import WindowedValue

        for found in self.files.close():
            yield WindowedValue(found, MIN_TIMESTAMP, [GlobalWindow()])


class SpillLinks(beam.DoFn):
    """(occurrences file, row group) -> its links (LINK_FIELDS), split into their join buckets'
    files (one per bucket and row group): outputs (bucket, (file, row group), path) of each."""

    def __init__(self, spill_dir: str, buckets: int):
        self.spill_dir, self.buckets = spill_dir, buckets

    def process(self, item: tuple[str, int]):
        import numpy as np

        files = _SpillFiles(self.spill_dir, "links", pa.schema([DOWNLOAD_OCCURRENCE_SCHEMA.field(f) for f in LINK_FIELDS]))
        for batch in parquet_batches(item, list(LINK_FIELDS), JOIN_BATCH):
            ids = batch.column(LINK_FIELDS.index("image_id")).to_pylist()
            buckets = np.fromiter((bucket_of(i, self.buckets) for i in ids), dtype=np.int64, count=len(ids))
            for b in np.unique(buckets).tolist():
                files.add_batch(b, batch.filter(pa.array(buckets == b)))
        for bucket, path in files.close():
            yield bucket, tuple(item), path


class JoinLinks(beam.DoFn):
    """(join bucket, occurrences row group) -> for each link of that row group in that bucket: its
    occurrence row (tagged `occurrences`), and its outcome: the image's verdict (or score reject),
    then the link's own checks (declared size, URL words); kept links are counted in the main
    output, the others give a rejected row; the links counted (tag `links`) per batch. Links that
    download rejected as URL boilerplate (fetched as evidence) only leave occurrences. Side inputs:
    [(bucket, path)] of the verdict and score-reject spills, and with several buckets the links'
    [(bucket, row group, path)] spills (with one bucket the row group is read in place).

    One element is one row group's share of a bucket, not the whole bucket: a runner that keeps a
    bundle's outputs until it ends (Dask: one element is one partition, core/dask_runner) holds
    that share's rows, not the bucket's (issue 34: a worker's peak grew with the links a bucket
    had). The bucket's verdicts are read once per worker and bucket while its row groups come
    (`_held`), so a worker holds one bucket's verdicts at a time."""

    def __init__(self, cfg: FilterConfig, spilled: bool = False):
        self.cfg, self.spilled = cfg, spilled
        self._held = None

    def setup(self):
        self._held = None  # (the bucket and the spill files it was read from, verdicts, image rejects)

    def teardown(self):
        self._held = None

    def _bucket(self, bucket: int, verdict_spills, reject_spills) -> tuple[dict, dict]:
        """The verdicts and score rejects of one bucket's images, read from its spill files (kept
        for the next element of the same bucket: the key names the files, which are the run's own)."""
        key = (bucket, tuple(sorted(p for b, p in verdict_spills if b == bucket)), tuple(sorted(p for b, p in reject_spills if b == bucket)))
        if self._held is not None and self._held[0] == key:
            return self._held[1], self._held[2]
        self._held = None  # the previous bucket's go before this one's are read
        verdicts: dict = {}
        for path in key[1]:
            for batch in _read_spill(path):
                for image_id, *values in zip(*_columns(batch)):
                    verdicts.setdefault(image_id, values)
        image_rejects: dict = {}
        for path in key[2]:
            for batch in _read_spill(path):
                for image_id, reason, detail in zip(*_columns(batch)):
                    image_rejects.setdefault(image_id, (reason, detail))
        self._held = (key, verdicts, image_rejects)
        return verdicts, image_rejects

    def process(self, element: tuple, verdict_spills, reject_spills, link_spills):
        bucket, item = element
        verdicts, image_rejects = self._bucket(bucket, verdict_spills, reject_spills)
        if not self.spilled:  # one bucket: the occurrences row group, read in place
            sources = [parquet_batches(item, list(LINK_FIELDS), JOIN_BATCH)]
        else:
            item = tuple(item)
            sources = [_read_spill(path) for b, source, path in link_spills if b == bucket and tuple(source) == item]
        for batches in sources:
            for batch in batches:
                yield from self._judge(_columns(batch), verdicts, image_rejects)

    def _judge(self, columns: list, verdicts: dict, image_rejects: dict):
        cfg = self.cfg
        counted = kept = 0
        for link_id, page_url, site, image_url, alt, position, declared_width, declared_height, image, link_reason in zip(*columns):
            verdict = verdicts.get(image)
            if verdict is None:  # a link whose image is not in downloads/: the download output is damaged
                raise StageError(f"filter: image {image} of the download occurrences is missing from its downloads/")
            sha, phash, width, height, reason, detail = verdict
            if reason is None and image in image_rejects:
                reason, detail = image_rejects[image]
            own, own_detail = reason, detail
            if link_reason:  # evidence only: rejected by download already
                own = link_reason
            elif own is None:
                if cfg.check_declared_size:
                    found = declared_too_small(declared_width, declared_height, cfg.min_side)
                    if found:
                        own, own_detail = DECLARED_TOO_SMALL, found
                words = url_words(image_url, cfg.url_words)
                if words:  # counted whether or not the rule is on: what it catches (or would)
                    yield beam.pvalue.TaggedOutput(URL_WORD_MATCHES, link_id)
                    if own is None and cfg.reject_url_words:
                        own, own_detail = URL_WORD, f"URL path names {', '.join(words)}"
            yield beam.pvalue.TaggedOutput(OCCURRENCES, {
                "link_id": link_id, "page_url": page_url, "site": site, "image_url": image_url, "alt": alt or "", "position": position or 0,
                "image_id": image, "sha256": sha, "phash": phash, "width": width, "height": height, "filter_reason": own,
            })
            if link_reason:
                continue
            counted += 1
            if own is None:
                kept += 1
            else:
                yield beam.pvalue.TaggedOutput(REJECTED, Rejected(link_id, STAGE, own, own_detail or "", image_url).to_row())
        if counted:
            yield beam.pvalue.TaggedOutput(LINKS, counted)
        if kept:
            yield kept


def _attach(item, encoder_name: str):
    record, (embedding, score, nsfw) = item
    record = dict(record)
    record["embedding"] = np.asarray(embedding, dtype=np.float16).tolist()
    record["encoder"] = encoder_name
    record["clip_score"] = score
    record["nsfw"] = nsfw
    return record


def _check_scores(record: dict, min_score, max_nsfw):
    """The thresholds on an image's scores: nsfw first (a safety rule), then the CLIP score."""
    nsfw = record.get("nsfw")
    if max_nsfw is not None and nsfw is not None and nsfw > max_nsfw:
        yield beam.pvalue.TaggedOutput(IMAGE_REJECTS, (record["image_id"], (NSFW, f"nsfw score {nsfw:.4f} > {max_nsfw}")))
        return
    if min_score is not None and record["clip_score"] is not None and record["clip_score"] < min_score:
        yield beam.pvalue.TaggedOutput(IMAGE_REJECTS, (record["image_id"], (LOW_CLIP_SCORE, f"{record['clip_score']:.3f} < {min_score}")))
        return
    yield record


class FilterImages(beam.PTransform):
    """{"images": download rows (one per distinct image)} -> {"input_count", "kept" images,
    "kept_count" (links), "rejected" (links), "occurrences", ...}. `link_groups`: the (file, row
    group) of every row group of download's occurrences (`row_groups`); spill files (the join's) go
    under `spill_dir`; `buckets`: join_buckets(links of the input)."""

    def __init__(self, cfg: FilterConfig, spill_dir: str, link_groups: list, buckets: int = 1, encoder_info: tuple = (), safety: Optional[Safety] = None):
        super().__init__()
        self.cfg = cfg
        self.spill_dir, self.link_groups, self.buckets = spill_dir, list(link_groups), buckets
        self.encoder_info = encoder_info  # (image_size, mean, std) of the encoder, () when disabled
        self.safety = safety  # the nsfw head (and a second encoder), None: no score

    def expand(self, pcolls):
        images, link_groups = pcolls["images"], self.link_groups
        size, mean, std = self.encoder_info or (0, (0.5,) * 3, (0.5,) * 3)
        safety = self.safety if size else None
        second = (safety.image_size, safety.mean, safety.std) if safety and safety.encoder else ()
        checked = images | "ValidateAndHash" >> beam.ParDo(ValidateAndHash(self.cfg, size, mean, std, second)).with_outputs(VERDICTS, main="valid")
        spills = {"verdicts": checked[VERDICTS] | "SpillVerdicts" >> beam.ParDo(SpillByImage(self.spill_dir, "verdicts", VERDICT_SCHEMA, self.buckets))}
        if size:
            handler = KeyedModelHandler(EncoderModelHandler(self.cfg.encoder, self.cfg.encoder_weights, self.cfg.batch_size, self.cfg.fixed_batch, safety))
            embedded = (
                checked.valid
                | "Embed" >> RunInference(handler)
                | "Attach" >> beam.Map(_attach, encoder_name=self.cfg.encoder)
            )
            scored = embedded | "ScoreThresholds" >> beam.FlatMap(_check_scores, self.cfg.min_clip_score, self.cfg.max_nsfw).with_outputs(IMAGE_REJECTS, main="kept")
            kept = scored.kept
            spills["rejects"] = scored[IMAGE_REJECTS] | "SpillImageRejects" >> beam.ParDo(SpillByImage(self.spill_dir, "rejects", IMAGE_REJECT_SCHEMA, self.buckets))
        else:  # ValidateAndHash yields the records themselves: no score, so no threshold to apply
            kept = checked.valid
            spills["rejects"] = images.pipeline | "NoImageRejects" >> beam.Create([])
        spilled = self.buckets > 1  # the links too, split by bucket; with one bucket the join reads them in place
        if spilled:
            link_spills = images.pipeline | "LinkRowGroups" >> beam.Create(link_groups) | "SpillLinks" >> beam.ParDo(SpillLinks(self.spill_dir, self.buckets))
        else:
            link_spills = images.pipeline | "NoLinkSpills" >> beam.Create([])
        judged = (
            images.pipeline
            # one element per bucket and occurrences row group, spread by Create's own reshuffle
            | "Buckets" >> beam.Create([(bucket, item) for bucket in range(self.buckets) for item in link_groups])
            | "JoinLinks" >> beam.ParDo(JoinLinks(self.cfg, spilled), beam.pvalue.AsList(spills["verdicts"]), beam.pvalue.AsList(spills["rejects"]), beam.pvalue.AsList(link_spills))
            .with_outputs(REJECTED, OCCURRENCES, URL_WORD_MATCHES, LINKS, main="kept_links")
        )
        return {
            "input_count": judged[LINKS], "kept": kept, "kept_count": judged.kept_links, "rejected": judged[REJECTED],
            OCCURRENCES: judged[OCCURRENCES], URL_WORD_MATCHES: judged[URL_WORD_MATCHES], "images": images, "images_kept": kept,
        }


def _driver_encoder(name: str, weights: str) -> Encoder:
    try:
        return load_encoder(name, weights)
    except EncoderUnavailable as err:
        raise StageError(f"filter: {err}") from err


def encoder_info(cfg: FilterConfig) -> tuple:
    """Load the encoder once in the driver so a missing model fails at start, not per record."""
    if cfg.encoder == NO_ENCODER:
        return ()
    enc = _driver_encoder(cfg.encoder, cfg.encoder_weights)
    return (enc.image_size, enc.mean, enc.std)


def safety_plan(cfg: FilterConfig, encoder: Optional[Encoder]) -> tuple[Optional[Safety], str]:
    """The nsfw scoring of this run, fetched in the driver (a missing head fails at start, in one
    sentence): (the head of the safety encoder (the main one unless --safety-encoder names another),
    ""), or (None, the one line to log) when there is no head to apply. --max-nsfw without a score
    is an error: a safety threshold must never be skipped in silence."""
    name = cfg.safety_encoder or cfg.encoder
    if cfg.safety_encoder and cfg.safety_encoder != NO_ENCODER and encoder is None:
        raise StageError(f"filter: --safety-encoder {cfg.safety_encoder} scores the images filter embeds, and --encoder none embeds none: choose an encoder")
    source = cfg.safety_head or (head_url(name) if name != NO_ENCODER else None)
    if name == NO_ENCODER or source is None:
        why = ("the safety encoder is none" if cfg.safety_encoder == NO_ENCODER else "encoder none embeds nothing" if name == NO_ENCODER
               else f"encoder {name} has no NSFW safety head (LAION's heads fit open_clip:ViT-B-32 and open_clip:ViT-L-14 with OpenAI's weights)")
        if cfg.max_nsfw is not None:
            fix = "choose an encoder" if cfg.encoder == NO_ENCODER else f"add --safety-encoder {SAFETY_ENCODER} (a second embedding for the score) or --safety-head FILE"
            raise StageError(f"filter: --max-nsfw {cfg.max_nsfw} needs an nsfw score, but {why}: {fix}")
        return None, f"filter: no nsfw score: {why}; the nsfw columns stay empty (--safety-encoder {SAFETY_ENCODER} computes a second embedding for the score)"
    second = encoder if name == cfg.encoder else _driver_encoder(name, cfg.safety_encoder_weights)
    try:
        head = head_for(source)
    except SafetyUnavailable as err:
        raise StageError(f"filter: {err}") from err
    if head.dim != second.dim:
        raise StageError(f"filter: the NSFW head {source} reads {head.dim}-d embeddings and {name} makes {second.dim}-d ones: give the head of that encoder with --safety-head, or --safety-encoder {SAFETY_ENCODER}")
    log.info("filter: nsfw score from %s on the %s embedding", source, name)
    if name == cfg.encoder:
        return Safety(head), ""
    return Safety(head, name, cfg.safety_encoder_weights, second.image_size, tuple(second.mean), tuple(second.std)), ""


def run_filter(input_path: str, out_dir: str, cfg: FilterConfig, beam_args=None) -> dict:
    """Run the filter pipeline on a download stage directory; returns reconciled stats."""
    files = stage_files(input_path, "downloads", expected="download")
    check_columns(files, DOWNLOAD_SCHEMA, input_path, "download")
    link_files = stage_files(input_path, "occurrences", expected="download")
    if not link_files:
        raise StageError(f"{input_path} has no occurrences/ (written by an older `webpairs crawl download`): run `webpairs crawl download` into it again")
    check_columns(link_files, DOWNLOAD_OCCURRENCE_SCHEMA, input_path, "download")
    encoder = None if cfg.encoder == NO_ENCODER else _driver_encoder(cfg.encoder, cfg.encoder_weights)
    info = (encoder.image_size, encoder.mean, encoder.std) if encoder is not None else ()
    safety, notice = safety_plan(cfg, encoder)
    del encoder  # the workers load their own
    with StageOutput(out_dir, STAGE) as out:
        if notice:  # said once the stage runs (an error before it stays the only line)
            (log.info if cfg.safety_encoder == NO_ENCODER else log.warning)(notice)  # asked for, or to be noticed
        spill_dir = os.path.join(out.path, SPILL)
        buckets = join_buckets(parquet_rows(link_files))
        tune_allocators()  # in process the pipeline runs here (core/memory.py)
        with stage_pipeline(beam_args) as p:
            # one element per row group (spread by Create's reshuffle; one Dask partition each)
            images = p | "RowGroups" >> beam.Create(row_groups(files)) | "Read" >> ReadRowGroups(pointers=True)
            outputs = {"images": images} | "Filter" >> FilterImages(cfg, spill_dir, row_groups(link_files), buckets, info, safety)
            more = {OCCURRENCES: OCCURRENCE_SCHEMA}
            site_files = stage_files(input_path, "sites", expected="download")
            if site_files:  # pages per site in the crawl, passed on to pair
                outputs["sites"] = p | "SiteFiles" >> beam.Create(site_files) | "ReadSites" >> beam.io.ReadAllFromParquet()
                more["sites"] = SITE_SCHEMA
            _ = outputs | "Write" >> WriteStageOutputs(out.path, STAGE, "images", IMAGE_SCHEMA, extra={"encoder": cfg.encoder, MADE_FROM: made_from(input_path)}, more=more, kept_batch_rows=IMAGE_BATCH_ROWS, table_sinks=True,
                                                 kept_group_key=POINTER)
        if FileSystems.exists(spill_dir):
            FileSystems.delete([spill_dir])
        return out.commit()
