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
import time
from typing import TYPE_CHECKING, Callable, Optional

from tqdm import tqdm

from core import config
from core.console import LOG_FILE, console, quiet
from core.stageio import StageError, StageLock, is_complete, read_stats, stale_input

if TYPE_CHECKING:
    from generate.images import SampleConfig
    from train.train import TrainConfig

log = logging.getLogger(__name__)

STAGES = ["extract", "download", "filter", "pair", "shards"]  # Beam/img2dataset stages with stats.json
DIRS = {"extract": "links", "download": "download", "filter": "filter", "pair": "pair", "shards": "shards", "train": "train", "sample": "samples"}
RUN_MARKER = "webpairs-run.json"  # marks a folder as a run directory of this project
OWN_FILES = {RUN_MARKER, "report.html", "testweb", "testweb.json", LOG_FILE}  # what `run`/`demo` write besides DIRS


def _foreign_entries(out: str) -> list[str]:
    """Entries of `out` that are not this project's own run output (recognised by its markers)."""
    from train.train import TRAIN_MARKER

    entries = [e for e in sorted(os.listdir(out)) if not (e.startswith(".") and e.endswith((".lock", ".partial", ".old")))]
    if entries and RUN_MARKER not in entries:
        return entries
    foreign = []
    for e in entries:
        path = os.path.join(out, e)
        if e in (DIRS[s] for s in STAGES):
            ours = is_complete(path)  # stage outputs appear only complete (swapped in)
        elif e == DIRS["train"]:
            ours = os.path.exists(os.path.join(path, TRAIN_MARKER)) or is_complete(path)
        else:
            ours = e in OWN_FILES or e == DIRS["sample"]
        if not ours:
            foreign.append(e)
    return foreign


def claim_run_dir(out: str, overwrite: bool = False) -> None:
    """Refuse an --out that holds anything this project did not write (unless `overwrite`), then
    mark it as a run directory."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise StageError(f"--out {out} is a file, not a folder")
    if os.path.isdir(out) and not overwrite:
        foreign = _foreign_entries(out)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise StageError(f"--out {out} holds files that are not webpairs run output ({shown}); choose an empty or new folder, or pass --overwrite to write into it anyway")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, RUN_MARKER), "w") as fh:
        json.dump({"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, fh)


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
    def load(cls, path: Optional[str] = None, allow_hosts=None, train_defaults: Optional[dict] = None, crawl_overrides: Optional[dict] = None, download_overrides: Optional[dict] = None, **filter_overrides) -> "RunConfig":
        from generate.images import SampleConfig
        from train.train import TrainConfig

        filter_cfg = config.load(config.FilterConfig, path, section="filter", **filter_overrides)
        download = config.load(config.DownloadConfig, path, section="download", allow_hosts=allow_hosts, **(download_overrides or {}))
        if download.min_side > filter_cfg.min_side:  # the plan must never be stricter than filter
            raise config.ConfigError(f"download.min_side {download.min_side} is above filter.min_side {filter_cfg.min_side}: the plan would drop links filter keeps; lower it")
        return cls(
            crawl=config.load(config.CrawlConfig, path, section="crawl", allow_hosts=allow_hosts, **(crawl_overrides or {})),
            download=download,
            filter=filter_cfg,
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


def run_pipeline(warcs: str, out: str, cfg: RunConfig, beam_args=None, html: bool = True, model: bool = True, ray_address: Optional[str] = None, overwrite: bool = False) -> dict:
    """Run every stage not yet complete; returns {stage: stats (data stages) or result (train, sample)}
    and writes out/report.html after the shards. `model=False` stops after the report. The run
    directory is locked while it runs; an --out with foreign files is refused unless `overwrite`."""
    with StageLock(out, "webpairs run"):
        claim_run_dir(out, overwrite)
        with quiet(out) as log_path:
            _say_log(log_path)
            return _run_stages(warcs, out, cfg, beam_args, html, model, ray_address)


def _say_log(log_path: Optional[str]) -> None:
    if log_path:
        tqdm.write(f"library output and logs: {log_path} (-v shows them here)", file=console())


def _run_stages(warcs: str, out: str, cfg: RunConfig, beam_args, html: bool, model: bool, ray_address: Optional[str]) -> dict:
    calls = _stage_calls(warcs, out, cfg, beam_args)
    done: dict[str, dict] = {}
    bar = tqdm(STAGES, desc="webpairs run", unit="stage", file=console())
    upstream_ran = False  # once a stage runs, the stages after it are stale: run them again
    for stage in bar:
        stage_dir = os.path.join(out, DIRS[stage])
        bar.set_postfix_str(stage)
        # complete, and not made from an input made again since (filter's pointers into download,
        # pair's into filter: a run killed after download was remade but before filter was)
        if is_complete(stage_dir) and not upstream_ran and not stale_input(stage_dir):
            done[stage] = read_stats(stage_dir)
            tqdm.write(f"{stage:9s} already complete, skipped ({done[stage]['kept']} kept)", file=console())
            continue
        start = time.time()
        try:
            done[stage] = calls[stage]()
        except Exception as err:
            so_far = "; ".join(f"{s}: input={v['input']} kept={v['kept']}" for s, v in done.items()) or "none"
            raise StageError(f"stage '{stage}' failed: {_one_line(err)} (completed so far: {so_far}; rerun the same command to continue from '{stage}')") from err
        upstream_ran = True
        s = done[stage]
        tqdm.write(f"{stage:9s} input={s['input']} kept={s['kept']} rejected={sum(s['rejected'].values())} ({time.time() - start:.1f}s)", file=console())
    if html:
        from browse.report import write_report

        write_report(out, os.path.join(out, "report.html"))
    if model:
        done.update(_model_stages(out, cfg, done, ray_address, upstream_ran))
    return done


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split("\n")[0].split()) or type(err).__name__


def _model_stages(out: str, cfg: RunConfig, done: dict, ray_address: Optional[str] = None, upstream_ran: bool = False) -> dict:
    """train (Ray Train on the shards) and sample (grids from its checkpoint), each skipped when complete
    and nothing before it ran. Training again in the same directory resumes from its last checkpoint
    (up to `steps`); delete OUT/train to train from scratch."""
    from generate.images import run_samples
    from train.train import run_training

    results = {}
    shards, train_dir, sample_dir = (os.path.join(out, DIRS[s]) for s in ("shards", "train", "sample"))
    so_far = "; ".join(f"{s}: kept={v['kept']}" for s, v in done.items())
    for stage, call, target in (
        ("train", lambda: run_training(shards, train_dir, cfg.train, ray_address), train_dir),
        ("sample", lambda: run_samples(train_dir, shards, sample_dir, cfg.sample), sample_dir),
    ):
        if is_complete(target) and not upstream_ran:
            tqdm.write(f"{stage:9s} already complete, skipped", file=console())
            results[stage] = json.load(open(os.path.join(target, "result.json")))
            continue
        start = time.time()
        if stage == "sample":
            tqdm.write(f"{stage:9s} running (variations, an edit, an interpolation)", file=console())
        try:
            results[stage] = call()
        except Exception as err:
            raise StageError(f"stage '{stage}' failed: {_one_line(err)} (completed so far: {so_far}; rerun the same command to continue from '{stage}')") from err
        with open(os.path.join(target, "result.json"), "w") as fh:
            json.dump(results[stage], fh, indent=2)
        open(os.path.join(target, "_SUCCESS"), "w").close()
        tqdm.write(f"{stage:9s} done ({time.time() - start:.1f}s)", file=console())
        upstream_ran = True
        so_far += f"; {stage}: done"
    return results


# the demo trains the tiny preset for a few minutes on CPU (a YAML `train` section overrides these)
DEMO_TRAIN = {"preset": "tiny", "steps": 300, "lr": 1e-3, "sample_every": 100, "checkpoint_every": 100}


def demo(out: str, photos: Optional[str] = None, beam_args=None, config_path: Optional[str] = None, pages: int = 12, topics: int = 6, model: bool = True, train_overrides: Optional[dict] = None, overwrite: bool = False) -> dict:
    """The main job on the loopback test web (127.0.0.1), with an encoder that works offline."""
    with StageLock(out, "webpairs demo"):
        claim_run_dir(out, overwrite)
        with quiet(out) as log_path:
            _say_log(log_path)
            return _demo(out, photos, beam_args, config_path, pages, topics, model, train_overrides)


def _demo(out: str, photos: Optional[str], beam_args, config_path: Optional[str], pages: int, topics: int, model: bool, train_overrides: Optional[dict]) -> dict:
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
        tqdm.write(f"loopback test web on {web.base_url}: {len(web.pages)} pages, WARC {web.warc_path}", file=console())
        return _run_stages(web.warc_path, out, cfg, beam_args, True, model, None)

