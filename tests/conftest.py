"""Shared fixtures: paths to ../shared/data (read in place, skipped when absent) and the test web."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# tests never download model weights: hub clients read their cache only (tests of the online path
# point a subprocess at a loopback hub and clear these there)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
PHOTOS = os.path.join(SHARED_DATA, "photos-imagenet-sample")
WARCS = os.path.join(SHARED_DATA, "warc")


def _need(path: str) -> str:
    if not os.path.isdir(path):
        pytest.skip(f"shared test data not found at {path} (clone ../shared beside the project)")
    return path


@pytest.fixture(scope="session")
def photos_dir() -> str:
    return _need(PHOTOS)


@pytest.fixture(scope="session")
def warc_dir() -> str:
    return _need(WARCS)


@pytest.fixture(scope="session")
def test_web(tmp_path_factory, photos_dir):
    """The loopback web built from the real photos, alive for the whole test session."""
    from webpairs.testweb import serve_test_web

    with serve_test_web(str(tmp_path_factory.mktemp("testweb")), photos_dir=photos_dir, slow_delay=3.0) as web:
        yield web


@pytest.fixture(scope="session")
def pipeline_dirs(tmp_path_factory, test_web):
    """The test web through extract -> download -> filter (tiny-clip) -> pair -> shards, once per session."""
    from core.config import CrawlConfig, DownloadConfig, FilterConfig, PairConfig, ShardConfig
    from crawl.download import run_download
    from crawl.extract import run_extract
    from filter.pipeline import run_filter
    from pairing.pipeline import run_pair
    from shards.writer import run_shards

    d = tmp_path_factory.mktemp("pipeline")
    dirs = {name: str(d / name) for name in ("links", "download", "filter", "pair", "shards")}
    run_extract(test_web.warc_path, dirs["links"], CrawlConfig(allow_hosts=("127.0.0.1",)))
    run_download(dirs["links"], dirs["download"], DownloadConfig(allow_hosts=("127.0.0.1",), timeout=2.5, processes=1))  # the slow route waits 3 s
    run_filter(dirs["download"], dirs["filter"], FilterConfig(encoder="efficientnet-lite0"))
    run_pair(dirs["filter"], dirs["pair"], PairConfig())
    run_shards(dirs["pair"], dirs["shards"], ShardConfig(samples_per_shard=25))
    return dirs


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, pipeline_dirs):
    """The tiny preset trained 40 steps with Ray Train (2 CPU workers) on the pipeline's shards."""
    import ray

    from train.train import TrainConfig, ray_runtime_env, run_training

    run = str(tmp_path_factory.mktemp("tiny") / "run")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, runtime_env=ray_runtime_env())
    try:
        result = run_training(pipeline_dirs["shards"], run, TrainConfig(steps=40, checkpoint_every=20, log_every=10, seed=0, sample_every=20, sample_steps=5))
    finally:
        if started:
            ray.shutdown()
    return {"run": run, "result": result}
