"""The main job: crawl extract -> download -> filter -> pair -> shards -> stats, one directory per stage.

A stage whose directory carries `_SUCCESS` is skipped, so a rerun after a kill continues where it
stopped. `demo` runs the same job on the loopback test web.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable, Optional

from tqdm import tqdm

from core import config
from core.stageio import StageError, is_complete, read_stats

log = logging.getLogger(__name__)

STAGES = ["extract", "download", "filter", "pair", "shards"]
DIRS = {"extract": "links", "download": "download", "filter": "filter", "pair": "pair", "shards": "shards"}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """All stage configs of one run (YAML sections: crawl, download, filter, pair, shards)."""

    crawl: config.CrawlConfig
    download: config.DownloadConfig
    filter: config.FilterConfig
    pair: config.PairConfig
    shards: config.ShardConfig

    @classmethod
    def load(cls, path: Optional[str] = None, allow_hosts: Optional[str] = None, **filter_overrides) -> "RunConfig":
        return cls(
            crawl=config.load(config.CrawlConfig, path, section="crawl", allow_hosts=allow_hosts),
            download=config.load(config.DownloadConfig, path, section="download", allow_hosts=allow_hosts),
            filter=config.load(config.FilterConfig, path, section="filter", **filter_overrides),
            pair=config.load(config.PairConfig, path, section="pair"),
            shards=config.load(config.ShardConfig, path, section="shards"),
        )


def _stage_calls(warcs: str, out: str, cfg: RunConfig, beam_args) -> dict[str, Callable[[], dict]]:
    from crawl.download import run_download
    from crawl.extract import run_extract
    from filter.pipeline import run_filter
    from pairing.pipeline import run_pair
    from shards.writer import run_shards

    d = {s: os.path.join(out, DIRS[s]) for s in STAGES}
    return {
        "extract": lambda: run_extract(warcs, d["extract"], cfg.crawl, beam_args),
        "download": lambda: run_download(d["extract"], d["download"], cfg.download),
        "filter": lambda: run_filter(d["download"], d["filter"], cfg.filter, beam_args),
        "pair": lambda: run_pair(d["filter"], d["pair"], cfg.pair, beam_args),
        "shards": lambda: run_shards(d["pair"], d["shards"], cfg.shards, beam_args),
    }


def run_pipeline(warcs: str, out: str, cfg: RunConfig, beam_args=None, html: bool = True) -> dict:
    """Run every stage not yet complete; returns {stage: stats} and writes out/report.html."""
    os.makedirs(out, exist_ok=True)
    calls = _stage_calls(warcs, out, cfg, beam_args)
    done: dict[str, dict] = {}
    bar = tqdm(STAGES, desc="webpairs run", unit="stage")
    for stage in bar:
        stage_dir = os.path.join(out, DIRS[stage])
        bar.set_postfix_str(stage)
        if is_complete(stage_dir):
            done[stage] = read_stats(stage_dir)
            tqdm.write(f"{stage:9s} already complete, skipped ({done[stage]['kept']} kept)")
            continue
        start = time.time()
        try:
            done[stage] = calls[stage]()
        except Exception as err:
            so_far = "; ".join(f"{s}: input={v['input']} kept={v['kept']}" for s, v in done.items()) or "none"
            raise StageError(f"stage '{stage}' failed: {err}\n  stages completed so far: {so_far}\n  rerun the same command to continue from '{stage}'") from err
        s = done[stage]
        tqdm.write(f"{stage:9s} input={s['input']} kept={s['kept']} rejected={sum(s['rejected'].values())} ({time.time() - start:.1f}s)")
    if html:
        from shards.report import write_report

        write_report(out, os.path.join(out, "report.html"))
    return done


def demo(out: str, photos: Optional[str] = None, beam_args=None, config_path: Optional[str] = None) -> dict:
    """The main job on the loopback test web (127.0.0.1), with an encoder that works offline."""
    from webpairs.testweb import serve_test_web

    state_file = os.path.join(out, "testweb.json")
    port = 0
    if os.path.exists(state_file):  # a rerun serves the same URLs, so finished stages stay valid
        with open(state_file) as fh:
            port = json.load(fh)["port"]
    os.makedirs(out, exist_ok=True)
    cfg = RunConfig.load(config_path, allow_hosts="127.0.0.1", encoder="efficientnet-lite0")
    cfg = dataclasses.replace(cfg, download=dataclasses.replace(cfg.download, timeout=3.0))
    with serve_test_web(os.path.join(out, "testweb"), photos_dir=photos, port=port) as web:
        with open(state_file, "w") as fh:
            json.dump({"port": int(web.base_url.rsplit(":", 1)[1]), "photos": photos}, fh)
        tqdm.write(f"loopback test web on {web.base_url}: {len(web.pages)} pages, WARC {web.warc_path}")
        return run_pipeline(web.warc_path, out, cfg, beam_args)
