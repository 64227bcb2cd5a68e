"""The main job: crawl extract -> download -> filter -> pair -> shards -> stats -> train -> sample.

Each stage writes its own directory; a stage whose directory carries `_SUCCESS` is skipped, so a
rerun after a kill continues where it stopped (an interrupted training resumes from its last
checkpoint). `demo` runs the same job on the loopback test web.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Callable, Optional

from tqdm import tqdm

from core import config
from core.stageio import StageError, is_complete, read_stats

if TYPE_CHECKING:
    from train.generate import SampleConfig
    from train.train import TrainConfig

log = logging.getLogger(__name__)

STAGES = ["extract", "download", "filter", "pair", "shards"]  # Beam/img2dataset stages with stats.json
DIRS = {"extract": "links", "download": "download", "filter": "filter", "pair": "pair", "shards": "shards", "train": "train", "sample": "samples"}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """All stage configs of one run (YAML sections: crawl, download, filter, pair, shards)."""

    crawl: config.CrawlConfig
    download: config.DownloadConfig
    filter: config.FilterConfig
    pair: config.PairConfig
    shards: config.ShardConfig
    train: "TrainConfig"
    sample: "SampleConfig"

    @classmethod
    def load(cls, path: Optional[str] = None, allow_hosts: Optional[str] = None, train_defaults: Optional[dict] = None, **filter_overrides) -> "RunConfig":
        from train.generate import SampleConfig
        from train.train import TrainConfig

        return cls(
            crawl=config.load(config.CrawlConfig, path, section="crawl", allow_hosts=allow_hosts),
            download=config.load(config.DownloadConfig, path, section="download", allow_hosts=allow_hosts),
            filter=config.load(config.FilterConfig, path, section="filter", **filter_overrides),
            pair=config.load(config.PairConfig, path, section="pair"),
            shards=config.load(config.ShardConfig, path, section="shards"),
            train=config.load(TrainConfig, path, section="train", defaults=train_defaults),
            sample=config.load(SampleConfig, path, section="sample"),
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


def run_pipeline(warcs: str, out: str, cfg: RunConfig, beam_args=None, html: bool = True, model: bool = True, ray_address: Optional[str] = None) -> dict:
    """Run every stage not yet complete; returns {stage: stats (data stages) or result (train, sample)}
    and writes out/report.html after the shards. `model=False` stops after the report."""
    os.makedirs(out, exist_ok=True)
    calls = _stage_calls(warcs, out, cfg, beam_args)
    done: dict[str, dict] = {}
    bar = tqdm(STAGES, desc="webpairs run", unit="stage")
    upstream_ran = False  # once a stage runs, the stages after it are stale: run them again
    for stage in bar:
        stage_dir = os.path.join(out, DIRS[stage])
        bar.set_postfix_str(stage)
        if is_complete(stage_dir) and not upstream_ran:
            done[stage] = read_stats(stage_dir)
            tqdm.write(f"{stage:9s} already complete, skipped ({done[stage]['kept']} kept)")
            continue
        if os.path.isdir(stage_dir) and (upstream_ran or stage != "download"):
            shutil.rmtree(stage_dir)  # partial or stale output (a partial download resumes instead)
        start = time.time()
        try:
            done[stage] = calls[stage]()
        except Exception as err:
            so_far = "; ".join(f"{s}: input={v['input']} kept={v['kept']}" for s, v in done.items()) or "none"
            raise StageError(f"stage '{stage}' failed: {err}\n  stages completed so far: {so_far}\n  rerun the same command to continue from '{stage}'") from err
        upstream_ran = True
        s = done[stage]
        tqdm.write(f"{stage:9s} input={s['input']} kept={s['kept']} rejected={sum(s['rejected'].values())} ({time.time() - start:.1f}s)")
    if html:
        from shards.report import write_report

        write_report(out, os.path.join(out, "report.html"))
    if model:
        done.update(_model_stages(out, cfg, done, ray_address, upstream_ran))
    return done


def _model_stages(out: str, cfg: RunConfig, done: dict, ray_address: Optional[str] = None, upstream_ran: bool = False) -> dict:
    """train (Ray Train on the shards) and sample (grids from its checkpoint), each skipped when complete
    and nothing before it ran. Training again in the same directory resumes from its last checkpoint
    (up to `steps`); delete OUT/train to train from scratch."""
    from train.generate import run_samples
    from train.train import run_training

    results = {}
    shards, train_dir, sample_dir = (os.path.join(out, DIRS[s]) for s in ("shards", "train", "sample"))
    so_far = "; ".join(f"{s}: kept={v['kept']}" for s, v in done.items())
    for stage, call, target in (
        ("train", lambda: run_training(shards, train_dir, cfg.train, ray_address), train_dir),
        ("sample", lambda: run_samples(train_dir, shards, sample_dir, cfg.sample), sample_dir),
    ):
        if is_complete(target) and not upstream_ran:
            tqdm.write(f"{stage:9s} already complete, skipped")
            results[stage] = json.load(open(os.path.join(target, "result.json")))
            continue
        start = time.time()
        tqdm.write(f"{stage:9s} running ({'Ray Train, ' + str(cfg.train.workers) + ' workers, ' + str(cfg.train.steps) + ' steps' if stage == 'train' else 'variations, an edit, an interpolation'})")
        try:
            results[stage] = call()
        except Exception as err:
            raise StageError(f"stage '{stage}' failed: {err}\n  stages completed so far: {so_far}\n  rerun the same command to continue from '{stage}'") from err
        with open(os.path.join(target, "result.json"), "w") as fh:
            json.dump(results[stage], fh, indent=2)
        open(os.path.join(target, "_SUCCESS"), "w").close()
        tqdm.write(f"{stage:9s} done ({time.time() - start:.1f}s)")
        upstream_ran = True
        so_far += f"; {stage}: done"
    return results


# the demo trains the tiny preset for a few minutes on CPU (a YAML `train` section overrides these)
DEMO_TRAIN = {"preset": "tiny", "steps": 300, "lr": 1e-3, "sample_every": 100, "checkpoint_every": 100}


def demo(out: str, photos: Optional[str] = None, beam_args=None, config_path: Optional[str] = None, pages: int = 12, topics: int = 6, model: bool = True, train_overrides: Optional[dict] = None) -> dict:
    """The main job on the loopback test web (127.0.0.1), with an encoder that works offline."""
    from webpairs.testweb import serve_test_web

    state_file = os.path.join(out, "testweb.json")
    port = 0
    if os.path.exists(state_file):  # a rerun serves the same URLs, so finished stages stay valid
        with open(state_file) as fh:
            port = json.load(fh)["port"]
    os.makedirs(out, exist_ok=True)
    cfg = RunConfig.load(config_path, allow_hosts="127.0.0.1", encoder="efficientnet-lite0", train_defaults=DEMO_TRAIN)
    cfg = dataclasses.replace(cfg, download=dataclasses.replace(cfg.download, timeout=3.0), train=dataclasses.replace(cfg.train, **(train_overrides or {})))
    with serve_test_web(os.path.join(out, "testweb"), photos_dir=photos, port=port, n_pages=pages, n_topics=topics) as web:
        with open(state_file, "w") as fh:
            json.dump({"port": int(web.base_url.rsplit(":", 1)[1]), "photos": photos}, fh)
        tqdm.write(f"loopback test web on {web.base_url}: {len(web.pages)} pages, WARC {web.warc_path}")
        return run_pipeline(web.warc_path, out, cfg, beam_args, model=model)

