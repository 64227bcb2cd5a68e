"""`crawl download`: link parquet -> downloaded image bytes with img2dataset.

1. The URL policy is applied to every link first (rejected with its reason, never fetched).
2. img2dataset downloads the rest (retries, timeout, X-Robots-Tag opt-out, incremental resume:
   a shard counts as done once img2dataset wrote its `*_stats.json`, so a rerun after a kill
   redoes only unfinished shards). Its workers enforce the same policy on redirect targets.
3. Its parquet shards are converted to `downloads/` (successes, DOWNLOAD_SCHEMA) and `rejected/`
   (failures, with a reason mapped from img2dataset's error message); stats.json reconciles.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import logging
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq

from core.config import DownloadConfig
from core.records import DOWNLOAD_SCHEMA, LINK_SCHEMA, REJECTED_SCHEMA, Rejected
from core.stageio import STATS_FILE, StageError, StageOutput, check_columns, read_success, read_table, stage_files
from crawl.urls import AllowList, policy_reason

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before img2dataset imports albumentations
os.environ.setdefault("WANDB_MODE", "disabled")

from img2dataset.downloader import Downloader, is_disallowed  # noqa: E402

from crawl.fetch import FetchError, fetch, parse_pins  # noqa: E402

log = logging.getLogger(__name__)
STAGE = "download"
RAW_DIR = "img2dataset"  # img2dataset's own output (kept for incremental resume)
# carried through img2dataset to downloads/ (declared sizes renamed: img2dataset writes its own width/height)
ADDITIONAL_COLUMNS = ["link_id", "page_url", "position", "declared_width", "declared_height"]


def reason_for(error_message: str) -> str:
    """Map an img2dataset error message to this stage's closed set of reasons."""
    msg = (error_message or "").lower()
    m = re.match(r"webpairs:([a-z0-9_]+):", msg)  # crawl/fetch.py says the reason itself
    if m:
        return m.group(1)
    m = re.search(r"http error (\d{3})", msg)
    if m:
        return f"http_{m.group(1)}"
    if "url policy:" in msg:
        return "redirect_refused"
    if "timed out" in msg or "timeout" in msg:
        return "timeout"
    if "x-robots-tag" in msg:
        return "opt_out"
    if "too small" in msg:
        return "too_small"
    if "decode" in msg or "cannot identify" in msg or "image" in msg and "error" in msg:
        return "decode_error"
    return "download_error"


class PolicyDownloader(Downloader):
    """img2dataset's Downloader whose workers fetch with `crawl.fetch.fetch`: the URL policy on the
    resolved address of every hop, a total deadline, a byte cap, trailing bytes trimmed.

    img2dataset spawns its workers and pickles this object into them, so the class lives at module
    level and the settings travel as attributes; `__call__` installs the fetch in the worker.
    """

    def __init__(self, *args, allow_hosts=(), deadline=30.0, max_image_bytes=20 * 1024 * 1024, pins=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.allow_hosts, self.deadline, self.max_image_bytes, self.pins = tuple(allow_hosts), deadline, max_image_bytes, dict(pins or {})

    def __call__(self, row):
        import img2dataset.downloader as i2d_downloader

        i2d_downloader.download_image = functools.partial(_download_image, allow=AllowList(self.allow_hosts), deadline=self.deadline, max_bytes=self.max_image_bytes, pins=self.pins)
        return super().__call__(row)


def _download_image(row, timeout, user_agent_token, disallowed_header_directives, allow, deadline, max_bytes, pins):
    """img2dataset's `download_image` contract: (key, BytesIO or None, error message or None)."""
    key, url = row
    agent = "Mozilla/5.0 (compatible; " + (user_agent_token or "webpairs") + "; image-pair research crawler)"
    robots = (lambda headers: is_disallowed(headers, user_agent_token, disallowed_header_directives)) if disallowed_header_directives else None
    try:
        return key, io.BytesIO(fetch(url, allow, timeout, deadline, max_bytes, agent, pins, robots)), None
    except FetchError as err:
        return key, None, str(err)
    except Exception as err:  # noqa: BLE001 - a bad record never raises (img2dataset's rule)
        return key, None, f"webpairs:download_error: {type(err).__name__}: {err}"


def _prepare_links(links_path: str, out_dir: str, allow: AllowList):
    """Split links into allowed (written for img2dataset, sorted for stable shards) and refused."""
    table = read_table(links_path, "links")
    rows = sorted(table.to_pylist(), key=lambda r: r["link_id"])
    allowed, refused = [], []
    for r in rows:
        reason = policy_reason(r["image_url"], allow)
        if reason is None:
            allowed.append(r)
        else:
            refused.append(Rejected(r["link_id"], STAGE, reason, "refused by the URL policy", r["image_url"]).to_row())
    os.makedirs(os.path.join(out_dir, "_input"), exist_ok=True)
    input_file = os.path.join(out_dir, "_input", "links.parquet")
    for r in allowed:
        r["declared_width"], r["declared_height"] = r["width"], r["height"]
    cols = ["image_url", "alt"] + ADDITIONAL_COLUMNS
    schema = pa.schema([("image_url", pa.string()), ("alt", pa.string()), ("link_id", pa.string()), ("page_url", pa.string()), ("position", pa.int32()), ("declared_width", pa.int32()), ("declared_height", pa.int32())])
    pq.write_table(pa.Table.from_pylist([{c: r[c] for c in cols} for r in allowed], schema=schema), input_file)
    return input_file, len(rows), refused, len(allowed)


def _run_img2dataset(input_file: str, raw_dir: str, cfg: DownloadConfig) -> None:
    import sys

    import img2dataset  # noqa: F401 - its __init__ rebinds the name `main`, so take the module:

    i2d_main = sys.modules["img2dataset.main"]

    reencode = cfg.resize_mode != "no"
    original = i2d_main.Downloader
    # img2dataset builds its Downloader inside download(); swap in the policy-aware subclass.
    i2d_main.Downloader = functools.partial(PolicyDownloader, allow_hosts=cfg.allow_hosts, deadline=cfg.deadline, max_image_bytes=cfg.max_image_bytes, pins=parse_pins(cfg.resolve))
    try:
        i2d_main.download(
            url_list=input_file,
            input_format="parquet",
            url_col="image_url",
            caption_col="alt",
            save_additional_columns=ADDITIONAL_COLUMNS,
            output_format="parquet",
            output_folder=raw_dir,
            processes_count=cfg.processes,
            thread_count=cfg.threads,
            resize_mode=cfg.resize_mode if reencode else "no",
            image_size=cfg.image_size,
            resize_only_if_bigger=True,
            disable_all_reencoding=not reencode,  # raw bytes: filter validates them
            timeout=cfg.timeout,
            retries=cfg.retries,
            number_sample_per_shard=cfg.samples_per_shard,
            distributor=cfg.distributor,
            incremental_mode="incremental",
            user_agent_token=cfg.user_agent_token,
            enable_wandb=False,
            compute_hash="sha256",
        )
    finally:
        i2d_main.Downloader = original


def _size(value):
    """A declared size as img2dataset hands it back (pandas turns a nullable int into a float)."""
    return None if value is None or value != value else int(value)


def _convert(raw_dir: str, out_dir: str, refused: list[dict]) -> tuple[int, dict]:
    """img2dataset shards -> downloads/ and rejected/ parquet; returns (kept, reason counts)."""
    os.makedirs(os.path.join(out_dir, "downloads"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "rejected"), exist_ok=True)
    reasons: dict[str, int] = {}
    for r in refused:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    pq.write_table(pa.Table.from_pylist(refused, schema=REJECTED_SCHEMA), os.path.join(out_dir, "rejected", "policy.parquet"))
    kept = 0
    for stats_file in sorted(glob.glob(os.path.join(raw_dir, "*_stats.json"))):  # finished shards only
        shard = os.path.basename(stats_file).split("_")[0]
        table = pq.read_table(os.path.join(raw_dir, f"{shard}.parquet"))
        image_col = "jpg" if "jpg" in table.column_names else [c for c in table.column_names if c in ("png", "webp")][0]
        ok, bad = [], []
        for r in table.to_pylist():
            if r["status"] == "success" and r[image_col] is not None:
                ok.append({"link_id": r["link_id"], "page_url": r["page_url"], "image_url": r["url"], "alt": r.get("caption") or "", "position": r["position"], "image_bytes": r[image_col], "sha256": r.get("sha256"), "declared_width": _size(r.get("declared_width")), "declared_height": _size(r.get("declared_height"))})
            else:
                reason = reason_for(r["error_message"])
                reasons[reason] = reasons.get(reason, 0) + 1
                bad.append(Rejected(r["link_id"], STAGE, reason, (r["error_message"] or "")[:500], r["url"]).to_row())
        pq.write_table(pa.Table.from_pylist(ok, schema=DOWNLOAD_SCHEMA), os.path.join(out_dir, "downloads", f"part-{shard}.parquet"))
        pq.write_table(pa.Table.from_pylist(bad, schema=REJECTED_SCHEMA), os.path.join(out_dir, "rejected", f"part-{shard}.parquet"))
        kept += len(ok)
    if not glob.glob(os.path.join(out_dir, "downloads", "*.parquet")):  # no link at all: an empty, valid output
        pq.write_table(pa.Table.from_pylist([], schema=DOWNLOAD_SCHEMA), os.path.join(out_dir, "downloads", "part-empty.parquet"))
    return kept, reasons


def _input_fingerprint(links_path: str, cfg: DownloadConfig) -> str:
    """What a resumed download must share with the run it continues: the links output (its
    `_SUCCESS` marker names its files and finish time) and the settings that shape the shards."""
    import hashlib

    marker = read_success(links_path, "extract")
    keys = {k: getattr(cfg, k) for k in ("allow_hosts", "resize_mode", "image_size", "samples_per_shard")}
    return hashlib.sha256(json.dumps([marker, {k: list(v) if isinstance(v, tuple) else v for k, v in keys.items()}], sort_keys=True).encode()).hexdigest()[:16]


def _remove(path: str) -> None:
    import shutil

    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def _resume_or_reset(partial: str, fingerprint: str) -> None:
    """Keep the finished img2dataset shards of a killed run of the same input; drop anything else."""
    stamp = os.path.join(partial, "_input", "fingerprint")
    if os.path.exists(stamp) and open(stamp).read() == fingerprint:
        for name in ("downloads", "rejected", STATS_FILE):  # remade from img2dataset's shards
            _remove(os.path.join(partial, name))
        log.info("download: resuming the interrupted download in %s", partial)
        return
    for name in os.listdir(partial):
        _remove(os.path.join(partial, name))
    os.makedirs(os.path.dirname(stamp))
    with open(stamp, "w") as fh:
        fh.write(fingerprint)


def run_download(links_path: str, out_dir: str, cfg: DownloadConfig) -> dict:
    """Download every allowed link with img2dataset; returns reconciled stats. A killed run leaves
    `.NAME.partial/` behind, and the next run of the same input resumes from its finished shards."""
    files = stage_files(links_path, "links", expected="extract")
    check_columns(files, LINK_SCHEMA, links_path, "extract")
    if "://" in out_dir:
        raise StageError(f"download: --out must be a local or mounted folder (img2dataset resumes from it), not {out_dir}")
    with StageOutput(out_dir, STAGE, resumable=True) as out:
        _resume_or_reset(out.path, _input_fingerprint(links_path, cfg))
        allow = AllowList(cfg.allow_hosts)
        input_file, n_links, refused, n_allowed = _prepare_links(links_path, out.path, allow)
        raw_dir = os.path.join(out.path, RAW_DIR)
        if n_allowed:
            _run_img2dataset(input_file, raw_dir, cfg)
        kept, reasons = _convert(raw_dir, out.path, refused)
        done = kept + sum(reasons.values())
        if done != n_links:
            raise StageError(f"download: {n_links - done} of {n_links} links have no result (img2dataset shards failed?); rerun to retry them")
        stats = {"stage": STAGE, "input": n_links, "kept": kept, "rejected": dict(sorted(reasons.items()))}
        with open(os.path.join(out.path, STATS_FILE), "w") as fh:
            json.dump(stats, fh, indent=2, sort_keys=True)
        return out.commit()
