"""The main job: `webpairs demo` end to end on generated images, resume after a lost stage, clear errors."""

import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "webpairs.cli", *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def test_demo_runs_and_a_rerun_continues_where_it_stopped(tmp_path):
    from PIL import Image

    from core.stageio import read_stats

    out = str(tmp_path / "demo")
    cfg = tmp_path / "short.yaml"  # the demo's job, trained and sampled briefly
    cfg.write_text("train:\n  steps: 20\n  sample_every: 10\n  checkpoint_every: 10\nsample:\n  steps: 10\n  n: 3\n  frames: 5\n  candidates: 2\n")
    first = _cli("demo", "--out", out, "--config", str(cfg))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "HTML report:" in first.stdout and os.path.exists(os.path.join(out, "report.html"))
    assert "(step 20)" in first.stdout  # the checkpoint line
    for kind, count in (("variations", 3), ("edit", 4), ("interpolate", 5)):
        assert f"{kind}:" in first.stdout
        pngs = [n for n in os.listdir(os.path.join(out, "samples", kind)) if n != "sheet.png" and n.endswith(".png")]
        assert len(pngs) == count and Image.open(os.path.join(out, "samples", kind, pngs[0])).size == (32, 32)
    assert sorted(os.listdir(os.path.join(out, "train", "samples"))) == ["step_0000010.png", "step_0000020.png"]
    # a quiet console: img2dataset's banner, Ray's warnings and its workers' logs are in the run's log
    # file, not on the console, which holds our progress lines and results
    log = open(os.path.join(out, "webpairs.log")).read()
    for noise in ("bwm-ng", "RayTrainWorker", "Token authentication"):
        assert noise in log and noise not in first.stderr + first.stdout, noise
    assert "(step=0000020)" in log and "train: 100%" in first.stderr and "library output and logs:" in first.stderr
    # one screen: a progress bar redraws its own line on a terminal (here, captured, every redraw
    # and every message printed above it shows up), so each bar counts once
    final = [line.split("\r")[-1] for line in (first.stderr + first.stdout).split("\n") if line.split("\r")[-1].strip()]
    bars = {line.split(":")[0] for line in final if re.match(r"^(webpairs run|train|sample):\s+\d+%", line)}
    messages = [line for line in final if not re.match(r"^(webpairs run|train|sample):\s+\d+%", line)]
    assert len(bars) == 3 and len(messages) + len(bars) <= 25, messages
    stats = {s: read_stats(os.path.join(out, d)) for s, d in [("extract", "links"), ("download", "download"), ("filter", "filter"), ("pair", "pair"), ("shards", "shards")]}
    assert stats["extract"]["kept"] == stats["download"]["input"]
    assert stats["download"]["kept"] == stats["filter"]["input"]
    assert stats["filter"]["kept"] == stats["pair"]["input"]
    assert stats["pair"]["pairs"] == stats["shards"]["input"] == stats["shards"]["kept"] > 0
    # simulate a run killed during `pair`: what a kill leaves is pair's partial folder (the old
    # output is swapped out only at the end) and nothing after it
    os.rename(os.path.join(out, "pair"), os.path.join(out, ".pair.partial"))
    os.remove(os.path.join(out, ".pair.partial", "_SUCCESS"))
    shutil.rmtree(os.path.join(out, "shards"))
    second = _cli("demo", "--out", out, "--config", str(cfg))
    assert second.returncode == 0, second.stderr[-3000:]
    text = second.stdout + second.stderr
    for stage in ("extract", "download", "filter"):
        assert f"{stage:9s} already complete, skipped" in text
    assert "pair      input=" in text and "shards    input=" in text
    assert "train     done" in text and "sample    running" in text  # stale after the shards were rebuilt
    third = _cli("demo", "--out", out, "--config", str(cfg))
    assert third.returncode == 0 and "train     already complete, skipped" in third.stdout + third.stderr
    assert read_stats(os.path.join(out, "shards"))["kept"] == stats["shards"]["kept"]
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no partial folder or lock left


def test_run_errors_are_one_clear_line(tmp_path):
    missing = _cli("run", str(tmp_path / "nope.warc.gz"), "--out", str(tmp_path / "r"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "stage 'extract' failed" in missing.stderr and "no WARC/WAT files" in missing.stderr
    bad_photos = _cli("demo", "--out", str(tmp_path / "d"), "--photos", str(tmp_path / "none"))
    assert bad_photos.returncode == 2 and "is not a folder" in bad_photos.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("filter:\n  min_sidee: 3\n")
    typo = _cli("run", str(tmp_path), "--out", str(tmp_path / "r2"), "--config", str(cfg))
    assert typo.returncode == 2 and "min_sidee" in typo.stderr and "Traceback" not in typo.stderr
