"""`filter`: downloaded images -> ImageRecords (validated, hashed, embedded, scored) with Beam.

download keeps each distinct image once (downloads/) and says which image every link resolved to
(its occurrences/). Steps:
1. per image: decode once, hash (pHash), check size, aspect and the flat-image signal, preprocess
   -> embed and score with RunInference (skipped with encoder "none"; images that only boilerplate
   evidence links point to are hashed, never embedded), the nsfw score from LAION's head on the
   embedding (core/safety.py; on a second encoder's embedding with --safety-encoder) -> optional
   maximum nsfw score, minimum CLIP score;
2. per link: the image's verdict joined to each of its links (CoGroupByKey on image_id), plus the
   link's own checks (declared size, URL words) -> occurrences/ (every link, before any threshold
   could drop a copy: pair's boilerplate evidence and the table pair joins images to pages with)
   and rejected/ (per link, so that input == kept + rejected counts links);
3. write images/ (one row per kept image), occurrences/, rejected/, stats.json.
"""

from __future__ import annotations

import logging
from typing import Optional

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from core.config import FilterConfig
from core.encoders import Encoder, EncoderUnavailable, load_encoder, preprocess
from core.safety import SAFETY_ENCODER, SafetyUnavailable, head_for, head_url
from core.records import DOWNLOAD_OCCURRENCE_SCHEMA, DOWNLOAD_SCHEMA, IMAGE_SCHEMA, OCCURRENCE_SCHEMA, SITE_SCHEMA, Rejected
from core.stageio import StageError, StageOutput, WriteStageOutputs, check_columns, stage_pipeline, stage_files
from core.perceptual import MAX_SIDE as PDQ_SIDE, pdq_hex
from filter import faces
from filter.embed import EncoderModelHandler, Safety
from filter.hashing import phash_hex, sha256_hex
from filter.signals import DECLARED_TOO_SMALL, FLAT_IMAGE, FLAT_THUMB, URL_WORD, declared_too_small, top_colour_share, url_words
from filter.validate import Invalid, check_shape, configure_pillow, decode, decode_side

STAGE = "filter"
REJECTED = "rejected"
OCCURRENCES = "occurrences"  # every downloaded link, as boilerplate evidence for `pair`
VERDICTS = "verdicts"
IMAGE_REJECTS = "image_rejects"  # (image_id, (reason, detail)) of the thresholds on scores
LINKS = "links"
LINK_FIELDS = tuple(DOWNLOAD_OCCURRENCE_SCHEMA.names)
# what crosses the join (CoGroupByKey, held whole by the in-process runner) is tuples of these, not
# dicts that encode every field's name again: a link's 258 encoded bytes become 138 (issue 34)
LINK_VALUES = tuple(f for f in LINK_FIELDS if f != "image_id")  # the image_id is the join's key
VERDICT_FIELDS = ("sha256", "phash", "width", "height", "reason", "detail")
URL_WORD_MATCHES = "url_word_matches"
LOW_CLIP_SCORE = "low_clip_score"
NSFW = "nsfw"
NO_ENCODER = "none"

log = logging.getLogger(__name__)


class ValidateAndHash(beam.DoFn):
    """One distinct image: decode once (a JPEG at the smallest DCT scale that pHash, the flat-image
    thumbnail, the encoder and PDQ need; sizes from the header), hash, check size, aspect and the
    flat-image signal, and preprocess for the encoder. Every image leaves its verdict (tagged `verdicts`: image_id ->
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

    def process(self, row: dict):
        data = row.get("image_bytes")
        digest = sha256_hex(data) if data is not None else None
        verdict = {"sha256": digest, "phash": None, "width": None, "height": None, "reason": None, "detail": None}
        decoded = decode(data, self.cfg, self.side)
        problem = decoded if isinstance(decoded, Invalid) else None
        if problem is None:
            verdict.update(phash=phash_hex(decoded.image, self.cfg.phash_size), width=decoded.width, height=decoded.height)
            problem = check_shape(decoded, self.cfg) or self._flat(decoded)
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
            "image_bytes": data,
            "pdq": pdq_hex(decoded.image),  # what `webpairs scrub --blocklist` matches later
            "faces": None, "face_boxes": None,
        }
        image = faces.apply(record, decoded.image, self.cfg.faces, (decoded.width, decoded.height), lambda side: decode(data, self.cfg, side).image) or decoded.image  # blurred with --faces blur
        self.kept.inc()
        if self.image_size and self.second:
            yield record, (preprocess(image, self.image_size, self.mean, self.std), record["alt"], preprocess(image, *self.second))
        elif self.image_size:
            yield record, (preprocess(image, self.image_size, self.mean, self.std), record["alt"])
        else:  # no encoder: the record is kept as it is (no score to threshold)
            yield record

    def _flat(self, decoded) -> Optional[Invalid]:
        cfg = self.cfg
        if cfg.flat_colours:
            share = top_colour_share(decoded.image, cfg.flat_colours)
            if share >= cfg.flat_share:
                return Invalid(FLAT_IMAGE, f"{cfg.flat_colours} colours cover {share:.0%} of the pixels (>= {cfg.flat_share:.0%})")
        return None


class JudgeLinks(beam.DoFn):
    """(image_id, {"verdict": [VERDICT_FIELDS tuple], "image_rejects": [...], "links": [LINK_VALUES tuples]}) -> for each link of the
    image: its occurrence row (tagged `occurrences`), and its outcome: the image's verdict, then the
    link's own checks (declared size, URL words); kept links yield 1, the others a rejected row.
    Links that download rejected as URL boilerplate (fetched as evidence) only leave occurrences."""

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg

    def process(self, item):
        image, grouped = item
        verdict = (list(grouped["verdict"]) or [None])[0]
        if verdict is None:  # a link whose image is not in downloads/: the download output is damaged
            raise StageError(f"filter: image {image} of the download occurrences is missing from its downloads/")
        verdict = dict(zip(VERDICT_FIELDS, verdict))
        image_rejects = list(grouped[IMAGE_REJECTS])
        reason, detail = verdict["reason"], verdict["detail"]
        if reason is None and image_rejects:
            reason, detail = image_rejects[0]
        for values in grouped["links"]:
            link = dict(zip(LINK_VALUES, values))
            own, own_detail, words = reason, detail, None
            if link.get("reason"):  # evidence only: rejected by download already
                own = link["reason"]
            elif own is None:
                found = self._link_checks(link)
                if found:
                    own, own_detail = found
                words = url_words(link["image_url"], self.cfg.url_words)
                if words:  # counted whether or not the rule is on: what it catches (or would)
                    yield beam.pvalue.TaggedOutput(URL_WORD_MATCHES, link["link_id"])
                    if own is None and self.cfg.reject_url_words:
                        own, own_detail = URL_WORD, f"URL path names {', '.join(words)}"
            yield beam.pvalue.TaggedOutput(OCCURRENCES, {
                "link_id": link["link_id"], "page_url": link["page_url"], "site": link["site"], "image_url": link["image_url"], "alt": link["alt"] or "", "position": link["position"] or 0,
                "image_id": image, "sha256": verdict["sha256"], "phash": verdict["phash"], "width": verdict["width"], "height": verdict["height"], "filter_reason": own,
            })
            if link.get("reason"):
                continue
            yield beam.pvalue.TaggedOutput(LINKS, 1)
            if own is None:
                yield 1
            else:
                yield beam.pvalue.TaggedOutput(REJECTED, Rejected(link["link_id"], STAGE, own, own_detail or "", link["image_url"]).to_row())

    def _link_checks(self, link: dict):
        if self.cfg.check_declared_size:
            detail = declared_too_small(link.get("declared_width"), link.get("declared_height"), self.cfg.min_side)
            if detail:
                return DECLARED_TOO_SMALL, detail
        return None


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
    """{"images": download rows (one per distinct image), "links": download occurrences} ->
    {"input_count", "kept" images, "kept_count" (links), "rejected" (links), "occurrences", ...}."""

    def __init__(self, cfg: FilterConfig, encoder_info: tuple = (), safety: Optional[Safety] = None):
        super().__init__()
        self.cfg = cfg
        self.encoder_info = encoder_info  # (image_size, mean, std) of the encoder, () when disabled
        self.safety = safety  # the nsfw head (and a second encoder), None: no score

    def expand(self, pcolls):
        images, links = pcolls["images"], pcolls["links"]
        size, mean, std = self.encoder_info or (0, (0.5,) * 3, (0.5,) * 3)
        safety = self.safety if size else None
        second = (safety.image_size, safety.mean, safety.std) if safety and safety.encoder else ()
        checked = images | "ValidateAndHash" >> beam.ParDo(ValidateAndHash(self.cfg, size, mean, std, second)).with_outputs(VERDICTS, main="valid")
        if size:
            handler = KeyedModelHandler(EncoderModelHandler(self.cfg.encoder, self.cfg.encoder_weights, self.cfg.batch_size, self.cfg.fixed_batch, safety))
            embedded = (
                checked.valid
                | "Embed" >> RunInference(handler)
                | "Attach" >> beam.Map(_attach, encoder_name=self.cfg.encoder)
            )
            scored = embedded | "ScoreThresholds" >> beam.FlatMap(_check_scores, self.cfg.min_clip_score, self.cfg.max_nsfw).with_outputs(IMAGE_REJECTS, main="kept")
            kept, image_rejects = scored.kept, scored[IMAGE_REJECTS]
        else:  # ValidateAndHash yields the records themselves: no score, so no threshold to apply
            kept, image_rejects = checked.valid, images.pipeline | "NoImageRejects" >> beam.Create([])
        keyed_links = links | "KeyLinks" >> beam.Map(lambda r: (r["image_id"], tuple(r[f] for f in LINK_VALUES)))  # read with LINK_FIELDS only
        judged = (
            {"verdict": checked[VERDICTS], IMAGE_REJECTS: image_rejects, "links": keyed_links}
            | "JoinLinks" >> beam.CoGroupByKey()
            | "JudgeLinks" >> beam.ParDo(JudgeLinks(self.cfg)).with_outputs(REJECTED, OCCURRENCES, URL_WORD_MATCHES, LINKS, main="kept_links")
        )
        return {
            "input_count": judged[LINKS], "kept": kept, "kept_count": judged.kept_links, "rejected": judged[REJECTED],
            OCCURRENCES: judged[OCCURRENCES], URL_WORD_MATCHES: judged[URL_WORD_MATCHES], "images": images, "images_kept": kept,
        }


READ_BATCH = 64  # rows converted to dicts at a time
READ_BUFFER = 1 << 20  # column chunks are read in pieces of this size, not whole


def _row_groups(path: str) -> list[tuple[str, int]]:
    with FileSystems.open(path) as fh:
        return [(path, i) for i in range(pq.ParquetFile(fh).num_row_groups)]


class _ReadRowGroup(beam.DoFn):
    def __init__(self, columns: Optional[list] = None):
        self.columns = columns

    def process(self, item: tuple[str, int]):
        path, group = item
        with FileSystems.open(path) as fh:
            batches = pq.ParquetFile(fh, buffer_size=READ_BUFFER).iter_batches(batch_size=READ_BATCH, row_groups=[group], columns=self.columns, use_threads=False)
            for batch in batches:
                yield from batch.to_pylist()


class ReadRows(beam.PTransform):
    """Parquet files -> their rows as dicts, each row group its own element after a reshuffle (as
    ReadAllFromParquet splits them), read READ_BATCH rows at a time on the calling thread.
    ReadAllFromParquet passed each row group on as one pyarrow table (decoded whole, then every row
    at once as Python objects, and pickled once more by Beam to estimate its size) with pyarrow's
    thread pool, which cost more CPU than it saved: 0.38 vs 0.15 CPU-s for 2,400 photos' bytes
    (issue 34; the image bytes dominate a downloads file)."""

    def __init__(self, columns: Optional[list] = None):
        super().__init__()
        self.columns = columns

    def expand(self, files):
        return files | "RowGroups" >> beam.FlatMap(_row_groups) | "Spread" >> beam.Reshuffle() | "ReadRowGroup" >> beam.ParDo(_ReadRowGroup(self.columns))


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
        with stage_pipeline(beam_args) as p:
            images = p | "Files" >> beam.Create(files) | "Read" >> ReadRows()
            links = p | "LinkFiles" >> beam.Create(link_files) | "ReadLinks" >> ReadRows(list(LINK_FIELDS))
            outputs = {"images": images, "links": links} | "Filter" >> FilterImages(cfg, info, safety)
            more = {OCCURRENCES: OCCURRENCE_SCHEMA}
            site_files = stage_files(input_path, "sites", expected="download")
            if site_files:  # pages per site in the crawl, passed on to pair
                outputs["sites"] = p | "SiteFiles" >> beam.Create(site_files) | "ReadSites" >> beam.io.ReadAllFromParquet()
                more["sites"] = SITE_SCHEMA
            _ = outputs | "Write" >> WriteStageOutputs(out.path, STAGE, "images", IMAGE_SCHEMA, extra={"encoder": cfg.encoder}, more=more)
        return out.commit()
