"""Every benchmark still runs: each `benchmarks/*.py` at its smallest size (`--smoke`) prints its
figures. A benchmark broken by a stage's change fails here instead of going unnoticed until the
next timing session. Nothing here looks at a timing: the figures of a smoke run mean nothing.

The convention (benchmarks/README.md): every `benchmarks/*.py` not starting with `_` (and not
`run_all.py`) is a benchmark; it accepts `--smoke`, runs as a script from `benchmarks/`, exits 0
and prints at least one `_common.report` block (`== name ==`, then its figures and a `ratio` line).
"""

from __future__ import annotations

import glob
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BENCH_DIR = os.path.join(ROOT, "benchmarks")
BENCHMARKS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(BENCH_DIR, "*.py")) if not os.path.basename(p).startswith("_") and os.path.basename(p) != "run_all.py")
FIGURE = re.compile(r"^  \S.*\s(-?\d[\d.,]*|nan|inf)\s*\S*", re.M)


def parse_reports(stdout: str) -> list[tuple[str, list[str], float]]:
    """(title, figure lines, ratio) of each `_common.report` block in a benchmark's output."""
    blocks = []
    for m in re.finditer(r"^== (.+) ==\n((?:  .*\n?)*)", stdout, re.M):
        lines = m.group(2).splitlines()
        ratio = [float(r.group(1)) for r in (re.match(r"^  ratio\s+(\S+)\s+\(goal", line) for line in lines) if r]
        if ratio:
            blocks.append((m.group(1), [line for line in lines if FIGURE.match(line) and not line.startswith("  ratio")], ratio[0]))
    return blocks


def test_benchmarks_are_found():
    # the stage benchmarks this suite guards; new ones join by the file name convention alone
    assert {"crawl_extract", "crawl_download", "fetch_plan", "filter", "pairing", "boilerplate", "dask_scaling", "train", "browse", "scale"} <= set(BENCHMARKS)


def test_parse_reports_reads_a_report():
    out = "noise\n\n== filter ==\n  images                      300.0 images\n  bare                        12.5 images/s\n  ratio                        0.54   (goal >= 0.5: meets)\nmore noise\n"
    assert parse_reports(out) == [("filter", ["  images                      300.0 images", "  bare                        12.5 images/s"], 0.54)]
    assert parse_reports("== broken ==\n  nothing measured\n") == []


# Each smoke run starts Beam, Ray, Dask or img2dataset: 16 of them take ~12 minutes on 2 cores, which
# the default suite (~15 minutes in all) cannot hold; `pytest -m slow` runs them.
@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_smoke(name, tmp_path, photos_dir):
    import shutil
    import tempfile

    # a short TMPDIR: Ray puts its AF_UNIX sockets under it, whose paths may not exceed 107 bytes
    tmp = tempfile.mkdtemp(prefix="wpb-", dir="/tmp")
    env = dict(os.environ, PYTHONPATH=ROOT, TMPDIR=tmp)
    try:
        proc = subprocess.run([sys.executable, f"{name}.py", "--smoke"], cwd=BENCH_DIR, env=env, capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tail = f"\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"benchmarks/{name}.py --smoke exited {proc.returncode}{tail}"
    reports = parse_reports(proc.stdout)
    assert reports, f"benchmarks/{name}.py --smoke printed no report block{tail}"
    for title, figures, ratio in reports:
        assert figures, f"{name}: report {title!r} has no figures{tail}"
        assert not math.isnan(ratio), f"{name}: report {title!r} has no ratio{tail}"
