"""Every Beam stage on Beam's portable runner (local job service on 127.0.0.1, LOOPBACK workers)
gives the same output as the default in-process run of tests/conftest.py."""

import os
import socket
import subprocess
import sys
import tarfile
import time

import pytest

from core.config import CrawlConfig, FilterConfig, PairConfig, ShardConfig
from core.stageio import read_stats, read_table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job_endpoint():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the local Beam job service did not start")
            time.sleep(0.5)
    yield f"localhost:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def _rows(stage_dir: str, name: str, key: str, drop=()) -> list[dict]:
    rows = read_table(stage_dir, name).to_pylist()
    return sorted(({k: v for k, v in r.items() if k not in drop} for r in rows), key=lambda r: str(r[key]))


def _same_stats(a: str, b: str) -> None:
    sa, sb = read_stats(a), read_stats(b)
    assert (sa["input"], sa["kept"], sa["rejected"]) == (sb["input"], sb["kept"], sb["rejected"])


def _samples(shards_dir: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(shards_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(shards_dir, name)) as tar:
                out.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return out


def test_every_beam_stage_on_the_portable_runner_matches_the_local_run(tmp_path, pipeline_dirs, test_web, job_endpoint):
    from crawl.extract import run_extract
    from filter.pipeline import run_filter
    from pairing.pipeline import run_pair
    from shards.writer import run_shards

    beam = ["--runner", "PortableRunner", "--job_endpoint", job_endpoint, "--environment_type", "LOOPBACK"]
    local = pipeline_dirs
    d = {k: str(tmp_path / k) for k in ("links", "filter", "pair", "shards")}
    # each stage reads the local run's previous stage, so any difference is this stage's
    run_extract(test_web.warc_path, d["links"], CrawlConfig(allow_hosts=("127.0.0.1",)), beam)
    run_filter(local["download"], d["filter"], FilterConfig(encoder="efficientnet-lite0"), beam)
    run_pair(local["filter"], d["pair"], PairConfig(), beam)
    run_shards(local["pair"], d["shards"], ShardConfig(samples_per_shard=25), beam)

    for stage in d:
        _same_stats(d[stage], local[stage])
    assert _rows(d["links"], "links", "link_id") == _rows(local["links"], "links", "link_id")
    assert _rows(d["links"], "rejected", "record_id") == _rows(local["links"], "rejected", "record_id")
    # both read the local download: the same pointers to its rows (filter stores no bytes, issue 34)
    ours, theirs = _rows(d["filter"], "images", "image_id"), _rows(local["filter"], "images", "image_id")
    assert [r["image_id"] for r in ours] == [r["image_id"] for r in theirs] and len(ours) > 0
    assert all(r["image_bytes"] is None and r["bytes_file"].startswith(os.path.join(local["download"], "downloads", "")) for r in ours)
    for a, b in zip(ours, theirs):  # same records; embeddings equal up to float noise of batching
        emb_a, emb_b = a.pop("embedding"), b.pop("embedding")
        assert a == b
        assert max(abs(x - y) for x, y in zip(emb_a, emb_b)) < 1e-4
    assert _rows(d["pair"], "pairs", "pair_id") == _rows(local["pair"], "pairs", "pair_id")
    assert _rows(d["pair"], "rejected", "record_id") == _rows(local["pair"], "rejected", "record_id")
    assert _samples(d["shards"]) == _samples(local["shards"])  # byte-identical samples
