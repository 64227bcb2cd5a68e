"""`filter`: downloaded images -> ImageRecords (validated, hashed, embedded, scored) with Beam.

download keeps each distinct image once (downloads/) and says which image every link resolved to
(its occurrences/). Steps:
1. per image: decode once, hash (pHash), check size, aspect and the flat-image signal, preprocess
   -> embed and score with RunInference (skipped with encoder "none"; images that only boilerplate
   evidence links point to are hashed, never embedded) -> optional minimum CLIP score;
2. per link: the image's verdict joined to each of its links (CoGroupByKey on image_id), plus the
   link's own checks (declared size, URL words) -> occurrences/ (every link, before any threshold
   could drop a copy: pair's boilerplate evidence and the table pair joins images to pages with)
   and rejected/ (per link, so that input == kept + rejected counts links);
3. write images/ (one row per kept image), occurrences/, rejected/, stats.json.
"""

from __future__ import annotations

from typing import Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from core.config import FilterConfig
from core.encoders import EncoderUnavailable, load_encoder, preprocess
from core.records import DOWNLOAD_OCCURRENCE_SCHEMA, DOWNLOAD_SCHEMA, IMAGE_SCHEMA, OCCURRENCE_SCHEMA, SITE_SCHEMA, Rejected
from core.stageio import StageError, StageOutput, WriteStageOutputs, check_columns, stage_pipeline, stage_files
from core.perceptual import MAX_SIDE as PDQ_SIDE, pdq_hex
from filter import faces
from filter.embed import EncoderModelHandler
from filter.hashing import phash_hex, sha256_hex
from filter.signals import DECLARED_TOO_SMALL, FLAT_IMAGE, FLAT_THUMB, URL_WORD, declared_too_small, top_colour_share, url_words
from filter.validate import Invalid, check_shape, configure_pillow, decode, decode_side

STAGE = "filter"
REJECTED = "rejected"
OCCURRENCES = "occurrences"  # every downloaded link, as boilerplate evidence for `pair`
VERDICTS = "verdicts"
LOW_CLIP = "low_clip"
LINKS = "links"
LINK_FIELDS = tuple(DOWNLOAD_OCCURRENCE_SCHEMA.names)
URL_WORD_MATCHES = "url_word_matches"
LOW_CLIP_SCORE = "low_clip_score"
NO_ENCODER = "none"


class ValidateAndHash(beam.DoFn):
    """One distinct image: decode once (a JPEG at the smallest DCT scale that pHash, the flat-image
    thumbnail, the encoder and PDQ need; sizes from the header), hash, check size, aspect and the
    flat-image signal, and preprocess for the encoder. Every image leaves its verdict (tagged `verdicts`: image_id ->
    pHash, size, reason); images that pass and that a kept link points to go on to the encoder."""

    def __init__(self, cfg: FilterConfig, image_size: int = 0, mean=(0.5,) * 3, std=(0.5,) * 3):
        self.cfg, self.image_size, self.mean, self.std = cfg, image_size, mean, std
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
        yield beam.pvalue.TaggedOutput(VERDICTS, (row["image_id"], verdict))
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
        if self.image_size:
            yield record, (preprocess(image, self.image_size, self.mean, self.std), record["alt"])
        else:
            yield record, None

    def _flat(self, decoded) -> Optional[Invalid]:
        cfg = self.cfg
        if cfg.flat_colours:
            share = top_colour_share(decoded.image, cfg.flat_colours)
            if share >= cfg.flat_share:
                return Invalid(FLAT_IMAGE, f"{cfg.flat_colours} colours cover {share:.0%} of the pixels (>= {cfg.flat_share:.0%})")
        return None


class JudgeLinks(beam.DoFn):
    """(image_id, {"verdict": [...], "low_clip": [...], "links": [...]}) -> for each link of the
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
        low_clip = list(grouped["low_clip"])
        reason, detail = verdict["reason"], verdict["detail"]
        if reason is None and low_clip:
            reason, detail = LOW_CLIP_SCORE, low_clip[0]
        for link in grouped["links"]:
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
    record, (embedding, score) = item
    record = dict(record)
    record["embedding"] = np.asarray(embedding, dtype=np.float16).tolist()
    record["encoder"] = encoder_name
    record["clip_score"] = score
    return record


def _check_clip_score(record: dict, min_score):
    if min_score is not None and record["clip_score"] is not None and record["clip_score"] < min_score:
        yield beam.pvalue.TaggedOutput(LOW_CLIP, (record["image_id"], f"{record['clip_score']:.3f} < {min_score}"))
        return
    yield record


class FilterImages(beam.PTransform):
    """{"images": download rows (one per distinct image), "links": download occurrences} ->
    {"input_count", "kept" images, "kept_count" (links), "rejected" (links), "occurrences", ...}."""

    def __init__(self, cfg: FilterConfig, encoder_info: tuple = ()):
        super().__init__()
        self.cfg = cfg
        self.encoder_info = encoder_info  # (image_size, mean, std) of the encoder, () when disabled

    def expand(self, pcolls):
        images, links = pcolls["images"], pcolls["links"]
        size, mean, std = self.encoder_info or (0, (0.5,) * 3, (0.5,) * 3)
        checked = images | "ValidateAndHash" >> beam.ParDo(ValidateAndHash(self.cfg, size, mean, std)).with_outputs(VERDICTS, main="valid")
        if size:
            handler = KeyedModelHandler(EncoderModelHandler(self.cfg.encoder, self.cfg.encoder_weights, self.cfg.batch_size, self.cfg.fixed_batch))
            embedded = (
                checked.valid
                | "Embed" >> RunInference(handler)
                | "Attach" >> beam.Map(_attach, encoder_name=self.cfg.encoder)
            )
        else:
            embedded = checked.valid | "NoEmbedding" >> beam.Map(lambda item: item[0])
        scored = embedded | "MinClipScore" >> beam.FlatMap(_check_clip_score, self.cfg.min_clip_score).with_outputs(LOW_CLIP, main="kept")
        keyed_links = links | "KeyLinks" >> beam.Map(lambda r: (r["image_id"], r))  # read with LINK_FIELDS only
        judged = (
            {"verdict": checked[VERDICTS], "low_clip": scored[LOW_CLIP], "links": keyed_links}
            | "JoinLinks" >> beam.CoGroupByKey()
            | "JudgeLinks" >> beam.ParDo(JudgeLinks(self.cfg)).with_outputs(REJECTED, OCCURRENCES, URL_WORD_MATCHES, LINKS, main="kept_links")
        )
        return {
            "input_count": judged[LINKS], "kept": scored.kept, "kept_count": judged.kept_links, "rejected": judged[REJECTED],
            OCCURRENCES: judged[OCCURRENCES], URL_WORD_MATCHES: judged[URL_WORD_MATCHES], "images": images, "images_kept": scored.kept,
        }


def encoder_info(cfg: FilterConfig) -> tuple:
    """Load the encoder once in the driver so a missing model fails at start, not per record."""
    if cfg.encoder == NO_ENCODER:
        return ()
    try:
        enc = load_encoder(cfg.encoder, cfg.encoder_weights)
    except EncoderUnavailable as err:
        raise StageError(f"filter: {err}") from err
    return (enc.image_size, enc.mean, enc.std)


def run_filter(input_path: str, out_dir: str, cfg: FilterConfig, beam_args=None) -> dict:
    """Run the filter pipeline on a download stage directory; returns reconciled stats."""
    files = stage_files(input_path, "downloads", expected="download")
    check_columns(files, DOWNLOAD_SCHEMA, input_path, "download")
    link_files = stage_files(input_path, "occurrences", expected="download")
    if not link_files:
        raise StageError(f"{input_path} has no occurrences/ (written by an older `webpairs crawl download`): run `webpairs crawl download` into it again")
    check_columns(link_files, DOWNLOAD_OCCURRENCE_SCHEMA, input_path, "download")
    info = encoder_info(cfg)
    with StageOutput(out_dir, STAGE) as out:
        with stage_pipeline(beam_args) as p:
            images = p | "Files" >> beam.Create(files) | "Read" >> beam.io.ReadAllFromParquet()
            links = p | "LinkFiles" >> beam.Create(link_files) | "ReadLinks" >> beam.io.ReadAllFromParquet(columns=list(LINK_FIELDS))
            outputs = {"images": images, "links": links} | "Filter" >> FilterImages(cfg, info)
            more = {OCCURRENCES: OCCURRENCE_SCHEMA}
            site_files = stage_files(input_path, "sites", expected="download")
            if site_files:  # pages per site in the crawl, passed on to pair
                outputs["sites"] = p | "SiteFiles" >> beam.Create(site_files) | "ReadSites" >> beam.io.ReadAllFromParquet()
                more["sites"] = SITE_SCHEMA
            _ = outputs | "Write" >> WriteStageOutputs(out.path, STAGE, "images", IMAGE_SCHEMA, extra={"encoder": cfg.encoder}, more=more)
        return out.commit()
