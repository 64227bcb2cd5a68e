"""`crawl download`: links -> each image worth a fetch, fetched once, with img2dataset.

1. The plan (crawl/plan.py): every link checked (URL policy, declared size, non-raster source),
   URL-level boilerplate, per-page cap, pages that cannot make a pair; the selected links' distinct
   URLs become img2dataset's input shards. Every other link is rejected with its reason.
2. img2dataset fetches each distinct URL once (retries, timeout, X-Robots-Tag opt-out, incremental
   resume: a shard counts as done once img2dataset wrote its `*_stats.json`, so a rerun after a kill
   redoes only unfinished shards). Its workers enforce the URL policy on redirect targets too.
3. Each URL's result goes back to its links: downloads/ (one row per distinct image, DOWNLOAD_SCHEMA),
   occurrences/ (each link and the image it resolved to) and rejected/ (a URL's failure rejects
   all its links, with a reason mapped from img2dataset's error message); stats.json reconciles
   per link and gives the funnel (links, distinct URLs, selected, downloaded, images).
"""

from __future__ import annotations

import functools
import glob
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

from core.config import DownloadConfig
from core.records import LINK_SCHEMA
from core.stageio import STATS_FILE, StageError, StageOutput, check_columns, read_success, stage_files
from crawl import blocklist, plan
from crawl.urls import AllowList

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before img2dataset imports albumentations
os.environ.setdefault("WANDB_MODE", "disabled")

from img2dataset.downloader import Downloader  # noqa: E402


def _drop_wandb_temp_folders() -> None:
    """img2dataset imports wandb, which makes two empty temporary folders when it is imported
    (`tmp*wandb-media`, `tmp*wandb-artifacts`) and removes them only at a normal interpreter exit.
    img2dataset's spawned workers are terminated, not exited, so each one left two behind: 2,341
    in /tmp after a day of this project's tests. wandb is disabled here (`enable_wandb=False`,
    WANDB_MODE) and never writes into them, so they are removed as soon as it is imported."""
    if os.environ.get("WANDB_MODE") != "disabled":
        return
    media = getattr(sys.modules.get("wandb.sdk.data_types._private"), "MEDIA_TMP", None)
    artifact = getattr(sys.modules.get("wandb.sdk.artifacts.artifact"), "Artifact", None)
    for folder in (media, getattr(artifact, "_TMP_DIR", None)):
        if isinstance(folder, tempfile.TemporaryDirectory):
            folder.cleanup()


_drop_wandb_temp_folders()

from crawl import consent  # noqa: E402
from crawl.fetch import FetchError, fetch, parse_pins  # noqa: E402
from crawl.judge import HeaderOptOut, ResponseJudge  # noqa: E402

log = logging.getLogger(__name__)
STAGE = "download"
RAW_DIR = "img2dataset"  # img2dataset's own output (kept for incremental resume)
PLAN_DIR = "_plan"  # checked links, the plan, img2dataset's input shards, each URL's result
# the settings that shape the plan (a resumed download must share them)
PLAN_KEYS = ("consent", "min_side", "skip_extensions", "url_boilerplate", "boilerplate_pages", "site_share", "site_min_pages", "boilerplate_evidence", "max_links_per_page", "min_links_per_page")


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

    def __init__(self, *args, allow_hosts=(), deadline=30.0, max_image_bytes=20 * 1024 * 1024, pins=None, agent="webpairs", sites=None, gate=None, max_retry_after=0.0, body_rules=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.allow_hosts, self.deadline, self.max_image_bytes, self.pins = tuple(allow_hosts), deadline, max_image_bytes, dict(pins or {})
        self.agent = agent
        self.sites = consent.SiteConsent(sites, gate) if sites is not None else None  # None: --consent off
        self.gate, self.max_retry_after = gate, max_retry_after  # crawl/polite.py (the same object: one pickle)
        self.body_rules = tuple(body_rules)  # judge rules on the bytes (the blocklist, crawl/blocklist.py)

    def __call__(self, row):
        import img2dataset.downloader as i2d_downloader

        i2d_downloader.download_image = functools.partial(
            _download_image, allow=AllowList(self.allow_hosts), deadline=self.deadline, max_bytes=self.max_image_bytes, pins=self.pins, agent=self.agent, sites=self.sites, gate=self.gate, max_retry_after=self.max_retry_after, body_rules=self.body_rules
        )
        return super().__call__(row)


def _judge(url: str, sites, user_agent_token, disallowed_header_directives, body_rules=()) -> ResponseJudge:
    """The rules one planned URL is fetched under (crawl/judge.py): the consent rules (none with
    --consent off), then the rules on the bytes (the blocklist), which --consent never turns off."""
    rules = [] if sites is None else [consent.PlannedOrigin(sites, url), consent.TdmHeader(), HeaderOptOut(user_agent_token, disallowed_header_directives)]
    return ResponseJudge([*rules, *body_rules])


def _polite_fetch(url: str, gate, max_retry_after: float, *args) -> bytes:
    """`fetch` with each request inside one of its host's connection slots (crawl/polite.py), the
    hosts of redirects included; a 429/503 with a Retry-After is waited for (that host's other
    requests wait too: `HostGate.connection` records the pause before it frees the slot) and asked
    again while the waits add up to at most `max_retry_after` seconds."""
    if gate is None:
        return fetch(url, *args)
    from crawl.polite import asked_pause

    waited = 0.0
    while True:
        try:
            return fetch(url, *args, slot=gate.connection)
        except FetchError as err:
            wait = asked_pause(err)
            if wait is None or waited + wait > max_retry_after:
                raise
            waited += wait


def _download_image(row, timeout, user_agent_token, disallowed_header_directives, allow, deadline, max_bytes, pins, agent="webpairs", sites=None, gate=None, max_retry_after=0.0, body_rules=()):
    """img2dataset's `download_image` contract: (key, BytesIO or None, error message or None)."""
    key, url = row
    judge = _judge(url, sites, user_agent_token, disallowed_header_directives, body_rules)
    try:
        return key, io.BytesIO(_polite_fetch(url, gate, max_retry_after, allow, timeout, deadline, max_bytes, agent, pins, judge)), None
    except FetchError as err:
        return key, None, str(err)
    except Exception as err:  # noqa: BLE001 - a bad record never raises (img2dataset's rule)
        return key, None, f"webpairs:download_error: {type(err).__name__}: {err}"


def _run_img2dataset(input_file: str, raw_dir: str, cfg: DownloadConfig, sites=None, gate_dir: str = "", body_rules=()) -> None:
    import sys

    import img2dataset  # noqa: F401 - its __init__ rebinds the name `main`, so take the module:

    i2d_main = sys.modules["img2dataset.main"]

    reencode = cfg.resize_mode != "no"
    original = i2d_main.Downloader
    # img2dataset builds its Downloader inside download(); swap in the policy-aware subclass.
    from crawl.polite import HostGate

    gate = HostGate(gate_dir, cfg.per_host_connections, sites.crawl_delays() if sites is not None else {}) if gate_dir else None
    i2d_main.Downloader = functools.partial(
        PolicyDownloader, allow_hosts=cfg.allow_hosts, deadline=cfg.deadline, max_image_bytes=cfg.max_image_bytes, pins=parse_pins(cfg.resolve), agent=consent.user_agent(cfg.contact), sites=sites, gate=gate, max_retry_after=cfg.max_retry_after, body_rules=body_rules
    )
    try:
        i2d_main.download(
            url_list=input_file,
            input_format="parquet",
            url_col="image_url",
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
            disallowed_header_directives=None if sites is not None else [],  # [] turns img2dataset's check off
            enable_wandb=False,
            compute_hash="sha256",
        )
    finally:
        i2d_main.Downloader = original


def _input_fingerprint(links_path: str, cfg: DownloadConfig) -> str:
    """What a resumed download must share with the run it continues: the links output (its
    `_SUCCESS` marker names its files and finish time) and the settings that shape the shards."""
    import hashlib

    marker = read_success(links_path, "extract")
    keys = {k: getattr(cfg, k) for k in ("allow_hosts", "resize_mode", "image_size", "samples_per_shard", "blocklist_pdq_distance", *PLAN_KEYS)}
    if cfg.blocklist:  # a new list refetches: finished shards may hold its images
        keys["blocklist"] = blocklist.fingerprint(cfg.blocklist)
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
        for name in ("downloads", "occurrences", "rejected", "sites", PLAN_DIR, STATS_FILE):  # remade (the plan is deterministic; consent/ is kept)
            _remove(os.path.join(partial, name))
        log.info("download: resuming the interrupted download in %s", partial)
        return
    for name in os.listdir(partial):
        if name != consent.CONSENT_DIR:  # what the sites answered does not depend on the input
            _remove(os.path.join(partial, name))
    os.makedirs(os.path.dirname(stamp))
    with open(stamp, "w") as fh:
        fh.write(fingerprint)


def _finished_shards(raw_dir: str) -> list[str]:
    """img2dataset's shards that are done (it writes `*_stats.json` last)."""
    return [os.path.join(raw_dir, os.path.basename(f).split("_")[0] + ".parquet") for f in sorted(glob.glob(os.path.join(raw_dir, "*_stats.json")))]


def run_download(links_path: str, out_dir: str, cfg: DownloadConfig, retry_failed: bool = False) -> dict:
    """Plan (crawl/plan.py), fetch each selected distinct URL once with img2dataset, resolve every
    link to its image; returns reconciled stats. A killed run leaves `.NAME.partial/` behind, and the
    next run of the same input resumes from its finished shards."""
    files = stage_files(links_path, "links", expected="extract")
    check_columns(files, LINK_SCHEMA, links_path, "extract")
    if "://" in out_dir:
        raise StageError(f"download: --out must be a local or mounted folder (img2dataset resumes from it), not {out_dir}")
    if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", cfg.plan_memory.strip()):
        raise StageError(f"download: plan_memory {cfg.plan_memory!r} is not a size such as 512MB or 4GB")
    fingerprint = _input_fingerprint(links_path, cfg)
    if retry_failed:
        _check_retry(out_dir, fingerprint)
    if cfg.consent == "off":
        log.warning("download: --consent off: robots.txt, TDMRep and opt-out headers are NOT honoured (only for sites you own)")
    with blocklist.compiled(cfg) as body_rules, StageOutput(out_dir, STAGE, resumable=True) as out:
        _resume_or_reset(out.path, fingerprint)
        if retry_failed:
            _seed_from(out_dir, out.path)
        sites = _site_rules(out_dir, out.path, cfg, retry_failed) if cfg.consent == "on" else None
        plan_dir = os.path.join(out.path, PLAN_DIR)
        con = plan.connect(os.path.join(plan_dir, "spill"), cfg.plan_memory)
        try:
            plan.check_links(files, os.path.join(plan_dir, "links"), AllowList(cfg.allow_hosts), cfg)
            asked_before = len(sites.rows) if sites is not None else 0
            planned = plan.make_plan(con, os.path.join(plan_dir, "links"), plan_dir, cfg, sites)
            log.info("download: %d links, %d distinct URLs; fetching %d URLs for %d links (+%d once as boilerplate evidence)", planned["links"], planned["urls"], planned["urls_selected"], planned["links_selected"], planned["urls_evidence"])
            gate_dir = os.path.join(plan_dir, "hosts")
            if planned["urls_fetched"] and not retry_failed:
                _run_img2dataset(os.path.join(plan_dir, "urls"), os.path.join(out.path, RAW_DIR), cfg, sites, gate_dir, body_rules)
            if sites is not None:
                sites.absorb_hops()  # the sites the workers asked at a redirect are kept in the run too
            shards = _collect_results(out.path, plan_dir)
            retried = None
            if retry_failed:  # one more round, over the URLs with no result or a transient failure
                todo = _retry_list(con, plan_dir, os.path.join(plan_dir, "retry"), cfg)
                log.info("download: --retry-failed: fetching %d URLs again", todo)
                if todo:
                    _run_img2dataset(os.path.join(plan_dir, "retry"), os.path.join(out.path, f"{RETRY_DIR}{len(_raw_dirs(out.path)):02d}"), cfg, sites, gate_dir, body_rules)
                    if sites is not None:
                        sites.absorb_hops()
                    shards = _collect_results(out.path, plan_dir)
                retried = {"urls": todo, "recovered": _recovered(con, plan_dir) if todo else 0}
            resolved = plan.resolve(con, plan_dir, shards, out.path)
        finally:
            con.close()
        shutil.rmtree(os.path.join(plan_dir, "spill"), ignore_errors=True)
        if resolved["missing"]:
            raise StageError(f"download: {resolved['missing']} of {planned['links']} links have no result (img2dataset shards failed?); rerun to retry them")
        stats = {
            "stage": STAGE, "input": planned["links"], "kept": resolved["kept"], "rejected": dict(sorted(resolved["reasons"].items())),
            # the funnel: distinct URLs -> selected for download -> downloaded -> distinct images
            "urls": planned["urls"], "urls_selected": planned["urls_selected"], "urls_evidence": planned["urls_evidence"], "urls_downloaded": resolved["urls_downloaded"], "images": resolved["images"],
            "consent": _consent_stats(sites, asked_before, cfg),
        }
        if retried is not None:
            stats["retried"] = retried
        with open(os.path.join(out.path, STATS_FILE), "w") as fh:
            json.dump(stats, fh, indent=2, sort_keys=True)
        return out.commit()


def _site_rules(out_dir: str, partial: str, cfg: DownloadConfig, retry_failed: bool = False) -> "consent.SiteRules":
    """The sites' answers of this run: those a killed run or the previous complete output already
    got are read back (a rerun asks no site again), the rest are asked by the plan. With
    `retry_failed`, a site whose robots.txt or tdmrep.json was unavailable is asked again."""
    folder = os.path.join(partial, consent.CONSENT_DIR)
    previous = os.path.join(out_dir, consent.CONSENT_DIR, consent.HOSTS_FILE)
    if not os.path.exists(os.path.join(folder, consent.HOSTS_FILE)) and os.path.exists(previous):
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(previous, os.path.join(folder, consent.HOSTS_FILE))
    rules = consent.SiteRules(folder, cfg.allow_hosts, parse_pins(cfg.resolve), consent.user_agent(cfg.contact), cfg.timeout)
    if retry_failed:
        rules.forget_unavailable()
    return rules


# ---- --retry-failed ---------------------------------------------------------------------------------

RETRY_DIR = "img2dataset-retry-"  # img2dataset's output of each --retry-failed round (01, 02, ...)
TRANSIENT = re.compile(r"timeout|http_5\d\d|http_429|download_error|dns_error")  # worth asking again later


def _check_retry(out_dir: str, fingerprint: str) -> None:
    from core.stageio import is_complete

    if not is_complete(out_dir):
        raise StageError(f"download: --retry-failed needs a finished download in {out_dir}; run without it first")
    stamp = os.path.join(out_dir, "_input", "fingerprint")
    if not os.path.exists(stamp) or open(stamp).read() != fingerprint:
        raise StageError(f"download: --retry-failed: the links or the settings differ from those of the download in {out_dir}; run without --retry-failed to download again")


def _seed_from(out_dir: str, partial: str) -> None:
    """A retry starts from the finished download: its img2dataset rounds (hard links, no copy) and
    its sites' answers; a partial folder left by a killed retry keeps what it has."""
    for name in os.listdir(out_dir):
        if (name == RAW_DIR or name.startswith(RETRY_DIR)) and not os.path.exists(os.path.join(partial, name)):
            shutil.copytree(os.path.join(out_dir, name), os.path.join(partial, name), copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _raw_dirs(partial: str) -> list[str]:
    """img2dataset's output folders of this download, in the order they were fetched."""
    return [os.path.join(partial, RAW_DIR)] + sorted(os.path.join(partial, n) for n in os.listdir(partial) if n.startswith(RETRY_DIR))


def _collect_results(partial: str, plan_dir: str) -> list[tuple[str, str]]:
    """Each URL's latest result over every round into `plan_dir`/results/; returns every finished
    shard with its image column (a URL's bytes are read from the round where it succeeded)."""
    results = os.path.join(plan_dir, "results")
    shutil.rmtree(results, ignore_errors=True)
    os.makedirs(results)
    later: set = set()
    shards = []
    rounds = _raw_dirs(partial)
    for n, raw in reversed(list(enumerate(rounds))):
        found = set()
        for shard_file in _finished_shards(raw):
            table, image_col = plan.shard_results(shard_file, reason_for)
            if later:
                table = table.filter(pa.array([u not in later for u in table.column("image_url").to_pylist()], pa.bool_()))
            if n:  # a later round's result replaces an earlier one's
                found.update(table.column("image_url").to_pylist())
            pq.write_table(table, os.path.join(results, f"{n:02d}-{os.path.basename(shard_file)}"))
            shards.append((shard_file, image_col))
        later |= found
    return shards


def _retry_list(con, plan_dir: str, out_dir: str, cfg: DownloadConfig) -> int:
    """The fetched URLs with no result or a transient failure, as img2dataset input shards."""
    urls = plan._sql_list(sorted(glob.glob(os.path.join(plan_dir, "urls", "*.parquet"))))
    results = plan._sql_list(sorted(glob.glob(os.path.join(plan_dir, "results", "*.parquet"))))
    have = f"SELECT image_url, reason FROM read_parquet({results})" if results != "[]" else "SELECT NULL::VARCHAR AS image_url, NULL::VARCHAR AS reason WHERE false"
    os.makedirs(out_dir, exist_ok=True)
    for f in glob.glob(os.path.join(out_dir, "*.parquet")):
        os.remove(f)
    if urls == "[]":
        return 0
    return plan.write_query(
        con,
        f"""SELECT u.image_url FROM read_parquet({urls}) u LEFT JOIN ({have}) r USING (image_url)
            WHERE r.image_url IS NULL OR regexp_matches(r.reason, '^({TRANSIENT.pattern})$')
            ORDER BY u.image_url""",
        os.path.join(out_dir, "part"), plan.URL_SCHEMA, rows_per_file=cfg.samples_per_shard,
    )


def _recovered(con, plan_dir: str) -> int:
    """URLs of the last retry round that now have an image."""
    retry = plan._sql_list(sorted(glob.glob(os.path.join(plan_dir, "retry", "*.parquet"))))
    results = plan._sql_list(sorted(glob.glob(os.path.join(plan_dir, "results", "*.parquet"))))
    if retry == "[]" or results == "[]":
        return 0
    return con.execute(f"SELECT count(*) FROM read_parquet({retry}) JOIN read_parquet({results}) USING (image_url) WHERE image_id IS NOT NULL").fetchone()[0]


def _consent_stats(sites, asked_before: int, cfg: DownloadConfig) -> dict:
    """stats.json's consent block: sites asked, and how their robots.txt and tdmrep.json answered.
    How many were asked in this process goes to the log only: a resumed or rerun download asks none
    again, and its stats.json must equal an uninterrupted run's."""
    if sites is None:
        return {"mode": "off"}
    rows = list(sites.rows.values())
    log.info("download: consent: %d sites, %d of them asked in this run (the rest read back from the run)", len(rows), max(0, len(rows) - asked_before))
    count = lambda key: {status: sum(1 for r in rows if r[key] == status) for status in sorted({r[key] for r in rows})}  # noqa: E731
    return {"mode": "on", "user_agent": consent.user_agent(cfg.contact), "sites": len(rows), "robots": count("robots_status"), "tdmrep": count("tdmrep_status")}
