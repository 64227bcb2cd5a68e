"""`filter`: downloaded images -> ImageRecords (validated, hashed, embedded, scored) with Beam.

Steps: read downloads parquet -> decode, hash (sha256, pHash) and record the occurrence of every
fetched link (occurrences/: the boilerplate evidence of `pair`, written before any threshold can
drop a copy) -> size, aspect and the boilerplate signals (declared size, flat image, URL words) ->
preprocess (one decode per image) -> embed and score with RunInference (skipped with encoder
"none") -> optional minimum CLIP score -> write images/, occurrences/, rejected/, stats.json.
"""

from __future__ import annotations

from typing import Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from core.config import FilterConfig
from core.encoders import EncoderUnavailable, load_encoder, preprocess
from core.records import DOWNLOAD_SCHEMA, IMAGE_SCHEMA, OCCURRENCE_SCHEMA, Rejected
from core.sites import site_of
from core.stageio import StageError, StageOutput, WriteStageOutputs, check_columns, stage_pipeline, stage_files
from filter.embed import EncoderModelHandler
from filter.hashing import image_id, phash_hex, sha256_hex
from filter.signals import DECLARED_TOO_SMALL, FLAT_IMAGE, URL_WORD, declared_too_small, top_colour_share, url_words
from filter.validate import Invalid, check_shape, configure_pillow, decode

STAGE = "filter"
REJECTED = "rejected"
OCCURRENCES = "occurrences"  # every input row that has bytes, as boilerplate evidence for `pair`
URL_WORD_MATCHES = "url_word_matches"
LOW_CLIP_SCORE = "low_clip_score"
NO_ENCODER = "none"


class ValidateAndHash(beam.DoFn):
    """Decode once: hash, record the occurrence (tagged `occurrences`, whatever the checks decide),
    check size, aspect and the boilerplate signals, and preprocess for the encoder; bad images leave
    tagged `rejected`."""

    def __init__(self, cfg: FilterConfig, image_size: int = 0, mean=(0.5,) * 3, std=(0.5,) * 3):
        self.cfg, self.image_size, self.mean, self.std = cfg, image_size, mean, std
        self.kept = Metrics.counter(STAGE, "valid")

    def setup(self):
        configure_pillow(self.cfg)

    def process(self, row: dict):
        data = row.get("image_bytes")
        occurrence = {
            "link_id": row["link_id"], "page_url": row["page_url"], "site": site_of(row["page_url"]), "image_url": row["image_url"],
            "sha256": sha256_hex(data) if data else None, "phash": None, "width": None, "height": None, "filter_reason": None,
        }
        decoded = decode(data, self.cfg)
        problem = decoded if isinstance(decoded, Invalid) else None
        if problem is None:
            occurrence.update(phash=phash_hex(decoded.image, self.cfg.phash_size), width=decoded.width, height=decoded.height)
            problem = check_shape(decoded, self.cfg) or self._signals(row, decoded)
        occurrence["filter_reason"] = problem.reason if problem else None
        yield beam.pvalue.TaggedOutput(OCCURRENCES, occurrence)
        if problem is not None:
            yield beam.pvalue.TaggedOutput(REJECTED, Rejected(row["link_id"], STAGE, problem.reason, problem.detail, row["image_url"]).to_row())
            return
        words = url_words(row["image_url"], self.cfg.url_words)
        if words:  # counted whether or not the rule is on: what it catches (or would)
            yield beam.pvalue.TaggedOutput(URL_WORD_MATCHES, row["link_id"])
            if self.cfg.reject_url_words:
                yield beam.pvalue.TaggedOutput(REJECTED, Rejected(row["link_id"], STAGE, URL_WORD, f"URL path names {', '.join(words)}", row["image_url"]).to_row())
                return
        digest = occurrence["sha256"]
        record = {
            "image_id": image_id(digest),
            "page_url": row["page_url"],
            "image_url": row["image_url"],
            "alt": row.get("alt") or "",
            "position": row.get("position") or 0,
            "width": decoded.width,
            "height": decoded.height,
            "format": decoded.format,
            "sha256": digest,
            "phash": occurrence["phash"],
            "embedding": None,
            "encoder": None,
            "clip_score": None,
            "image_bytes": data,
            "_link_id": row["link_id"],
        }
        self.kept.inc()
        if self.image_size:
            yield record, (preprocess(decoded.image, self.image_size, self.mean, self.std), record["alt"])
        else:
            yield record, None

    def _signals(self, row: dict, decoded) -> Optional[Invalid]:
        """The image-level boilerplate signals (filter/signals.py) that are on."""
        cfg = self.cfg
        if cfg.check_declared_size:
            detail = declared_too_small(row.get("declared_width"), row.get("declared_height"), cfg.min_side)
            if detail:
                return Invalid(DECLARED_TOO_SMALL, detail)
        if cfg.flat_colours:
            share = top_colour_share(decoded.image, cfg.flat_colours)
            if share >= cfg.flat_share:
                return Invalid(FLAT_IMAGE, f"{cfg.flat_colours} colours cover {share:.0%} of the pixels (>= {cfg.flat_share:.0%})")
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
        yield beam.pvalue.TaggedOutput(REJECTED, Rejected(record["_link_id"], STAGE, LOW_CLIP_SCORE, f"{record['clip_score']:.3f} < {min_score}", record["image_url"]).to_row())
        return
    record = dict(record)
    record.pop("_link_id")
    yield record


class FilterImages(beam.PTransform):
    """Download rows -> {"input", "kept", "rejected"} PCollections of the filter stage."""

    def __init__(self, cfg: FilterConfig, encoder_info: tuple = ()):
        super().__init__()
        self.cfg = cfg
        self.encoder_info = encoder_info  # (image_size, mean, std) of the encoder, () when disabled

    def expand(self, rows):
        size, mean, std = self.encoder_info or (0, (0.5,) * 3, (0.5,) * 3)
        checked = rows | "ValidateAndHash" >> beam.ParDo(ValidateAndHash(self.cfg, size, mean, std)).with_outputs(REJECTED, OCCURRENCES, URL_WORD_MATCHES, main="valid")
        if size:
            handler = KeyedModelHandler(EncoderModelHandler(self.cfg.encoder, self.cfg.encoder_weights, self.cfg.batch_size, self.cfg.fixed_batch))
            embedded = (
                checked.valid
                | "Embed" >> RunInference(handler)
                | "Attach" >> beam.Map(_attach, encoder_name=self.cfg.encoder)
            )
        else:
            embedded = checked.valid | "NoEmbedding" >> beam.Map(lambda item: item[0])
        scored = embedded | "MinClipScore" >> beam.FlatMap(_check_clip_score, self.cfg.min_clip_score).with_outputs(REJECTED, main="kept")
        rejected = (checked[REJECTED], scored[REJECTED]) | "AllRejected" >> beam.Flatten()
        return {"input": rows, "kept": scored.kept, "rejected": rejected, OCCURRENCES: checked[OCCURRENCES], URL_WORD_MATCHES: checked[URL_WORD_MATCHES]}


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
    info = encoder_info(cfg)
    with StageOutput(out_dir, STAGE) as out:
        with stage_pipeline(beam_args) as p:
            rows = p | "Files" >> beam.Create(files) | "Read" >> beam.io.ReadAllFromParquet()
            outputs = rows | "Filter" >> FilterImages(cfg, info)
            _ = outputs | "Write" >> WriteStageOutputs(out.path, STAGE, "images", IMAGE_SCHEMA, extra={"encoder": cfg.encoder}, more={OCCURRENCES: OCCURRENCE_SCHEMA})
        return out.commit()
