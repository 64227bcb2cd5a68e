"""Fault injection (issue 15): each of extract, download, filter, pair, shards and train is killed (SIGKILL to
its whole process group) at a random point, run again, and compared with the uninterrupted run of
the session (tests/conftest.py `pipeline_dirs`): same stats, same record/pair/sample ids, no
duplicate sample, nothing left over.

The random points come from WEBPAIRS_FAULT_SEED (default: the clock); a failure prints the seed,
so `WEBPAIRS_FAULT_SEED=... pytest tests/test_fault_injection.py` replays it.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from core.stageio import read_stats, read_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
SEED = int(os.environ.get("WEBPAIRS_FAULT_SEED", time.time_ns() % 100_000))
RNG = random.Random(SEED)

# stage -> (command line after `webpairs`, upstream key in pipeline_dirs, the in-process rerun);
# flags and configs are the ones conftest's uninterrupted run used
STAGES = {
    "extract": (["crawl", "extract", "{up}", "--allow-hosts", "127.0.0.1"], "warc"),
    "download": (["crawl", "download", "{up}", "--allow-hosts", "127.0.0.1", "--timeout", "2.5", "--processes", "1"], "links"),
    "filter": (["filter", "{up}", "--encoder", "efficientnet-lite0"], "download"),
    "pair": (["pair", "{up}"], "filter"),
    "shards": (["shards", "{up}", "--samples-per-shard", "25"], "pair"),
}


def _rerun(stage: str, up: str, out: str) -> dict:
    from core.config import CrawlConfig, DownloadConfig, FilterConfig, PairConfig, ShardConfig

    if stage == "extract":
        from crawl.extract import run_extract

        return run_extract(up, out, CrawlConfig(allow_hosts=("127.0.0.1",)))
    if stage == "download":
        from crawl.download import run_download

        return run_download(up, out, DownloadConfig(allow_hosts=("127.0.0.1",), timeout=2.5, processes=1))
    if stage == "filter":
        from filter.pipeline import run_filter

        return run_filter(up, out, FilterConfig(encoder="efficientnet-lite0"))
    if stage == "pair":
        from pairing.pipeline import run_pair

        return run_pair(up, out, PairConfig())
    from shards.writer import run_shards

    return run_shards(up, out, ShardConfig(samples_per_shard=25))


def _ids(stage: str, folder: str) -> dict:
    """The record ids a stage output holds, per part, sorted (with repeats, so duplicates show)."""
    rejected = sorted(read_table(folder, "rejected", ["record_id"]).column(0).to_pylist())
    if stage == "extract":  # every link row whole, once (a rerun that wrote a part twice shows here)
        kept = sorted(tuple(sorted(r.items(), key=lambda kv: kv[0])) for r in read_table(folder, "links").to_pylist())
        return {"kept": kept, "rejected": rejected}
    if stage == "download":  # links (with the image each resolved to) and the images, once each
        t = read_table(folder, "occurrences", ["link_id", "image_id"])
        kept = sorted(zip(t.column(0).to_pylist(), t.column(1).to_pylist())) + sorted(read_table(folder, "downloads", ["image_id"]).column(0).to_pylist())
    elif stage == "filter":
        t = read_table(folder, "occurrences", ["link_id", "filter_reason"])
        kept = sorted(zip(t.column(0).to_pylist(), t.column(1).to_pylist())) + sorted(read_table(folder, "images", ["image_id"]).column(0).to_pylist())
    elif stage == "pair":
        kept = sorted(read_table(folder, "pairs", ["pair_id"]).column(0).to_pylist())
    else:
        import webdataset as wds

        from train.data import shard_urls

        kept = sorted(s["__key__"] for s in wds.WebDataset(shard_urls(folder), shardshuffle=False))
        assert kept == sorted(read_table(folder, "index", ["key"]).column(0).to_pylist())
    return {"kept": kept, "rejected": rejected}


def _holds_lock(lock) -> callable:
    """A predicate: the stage process `pid` holds the lock file (it has started on its output)."""

    def held(pid: int) -> bool:
        try:
            return json.loads(lock.read_text())["pid"] == pid
        except (OSError, ValueError, KeyError):
            return False

    return held


def _kill_at_random_point(cmd: list[str], started, max_delay: float) -> tuple[float, bool]:
    """Start `webpairs ...` in its own process group, wait until `started(pid)` holds, sleep a random
    part of `max_delay`, SIGKILL the group; returns (delay, whether it was still running then)."""
    proc = subprocess.Popen([sys.executable, "-m", "webpairs.cli", *cmd], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not started(proc.pid) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    delay = RNG.uniform(0.0, max_delay)
    time.sleep(delay)
    running = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return round(delay, 2), running


# max delay after the stage starts writing: about its run time on this 2-core machine
@pytest.mark.parametrize("stage,max_delay", [("extract", 3.0), ("download", 6.0), ("filter", 6.0), ("pair", 5.0), ("shards", 3.0)])
def test_killed_stage_reruns_to_the_same_output(stage, max_delay, pipeline_dirs, test_web, tmp_path):
    args, up_key = STAGES[stage]
    up = test_web.warc_path if up_key == "warc" else pipeline_dirs[up_key]
    ref = pipeline_dirs["links" if stage == "extract" else stage]
    out = str(tmp_path / stage)
    cmd = [a.replace("{up}", up) for a in args] + ["--out", out]
    kills = []
    while sum(running for _, running in kills) < 2 and len(kills) < 6:  # two kills mid-run
        kills.append(_kill_at_random_point(cmd, _holds_lock(tmp_path / f".{stage}.lock"), max_delay))
        if not kills[-1][1]:
            max_delay /= 2  # it had finished: aim earlier (its output stays, a valid case too)
    context = f"seed {SEED}, kills (seconds after start, still running) {kills}"
    assert sum(running for _, running in kills) == 2, f"not killed mid-run twice: {context}"
    stats = _rerun(stage, up, out)
    expected = read_stats(ref)
    assert stats == expected, context
    assert _ids(stage, out) == _ids(stage, ref), context
    assert sorted(os.listdir(tmp_path)) == [stage], f"left over: {os.listdir(tmp_path)}; {context}"
    assert not [n for n in os.listdir(out) if n.startswith((".", "beam-temp"))], context


def test_killed_training_resumes_to_the_same_steps(pipeline_dirs, tmp_path):
    from train.train import TrainConfig, checkpoint_folders, ray_runtime_env, read_checkpoint, read_losses, run_training

    run = str(tmp_path / "run")
    cfg_file = tmp_path / "t.yaml"
    cfg_file.write_text("steps: 30\ncheckpoint_every: 5\nlog_every: 10\nsample_every: 0\n")
    ckpt_dir = os.path.join(run, "train")
    has_checkpoint = lambda _pid: os.path.isdir(ckpt_dir) and any(n.startswith("checkpoint_") for n in os.listdir(ckpt_dir))  # noqa: E731
    delay, running = _kill_at_random_point(["train", pipeline_dirs["shards"], "--out", run, "--config", str(cfg_file)], has_checkpoint, 4.0)
    context = f"seed {SEED}, killed {delay} s after the first checkpoint"
    assert running, context
    assert os.path.exists(os.path.join(tmp_path, ".run.lock")), context  # the dead run's lock ...
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, runtime_env=ray_runtime_env())
    try:
        out = run_training(pipeline_dirs["shards"], run, TrainConfig(steps=30, checkpoint_every=5, log_every=10, sample_every=0))
    finally:
        if started:
            ray.shutdown()
    assert out["step"] == 30, context
    assert [s for s, _ in read_losses(run)] == list(range(1, 31)), context  # each step logged once
    assert read_checkpoint(checkpoint_folders(run)[0])["step"] == 30
    assert sorted(os.listdir(tmp_path)) == ["run", "t.yaml"], context  # ... was taken over and released
    assert json.load(open(os.path.join(run, "latest.json")))["step"] == 30
