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


def test_paired_median_judges_the_rounds_not_the_fastest_of_each():
    """The goals of filter.py and crawl_extract.py are the median of the rounds' own ratios (each a
    baseline and the stage timed back to back), listed round by round. The fastest of each pairs
    round 2's loop with round 3's stage, minutes apart: 0.8 / 1.0 = 0.80 here, which no round
    measured."""
    sys.path.insert(0, BENCH_DIR)
    try:
        from _common import paired_median
    finally:
        sys.path.remove(BENCH_DIR)
    loop = [1.0, 0.8, 1.1, 0.9]  # CPU seconds of each round's baseline
    stage = [1.2, 1.1, 1.0, 1.2]  # and of its stage, timed right after it
    ratios = [b / s for b, s in zip(loop, stage)]  # the stage's speed over the loop's: 0.83, 0.73, 1.10, 0.75
    median, line = paired_median(ratios)
    assert median == pytest.approx((0.75 + 1 / 1.2) / 2)  # 0.79: not the mean (0.85), min, max, median_low or _high
    assert line == "each round: 0.83, 0.73, 1.10, 0.75 (median 0.79)"


# Smoke runs by cost, the dearest first, so that the two lanes finish together (a benchmark not named
# here runs last); each one is a process of its own and starts Beam, Ray, Dask or img2dataset.
ORDER = ["fetch_plan", "train", "boilerplate", "dask_scaling", "inversion", "filter", "scale", "crawl_download", "copies", "gpu", "pairing", "crawl_extract", "browse", "blocklist"]
LANES = 2  # the project machine's cores
TIMEOUT = 600  # seconds a smoke run may take on a loaded machine before it counts as hung


def _smoke(name: str) -> tuple[str, str, int, str, str]:
    """Run benchmarks/NAME.py --smoke in its own process: (name, problem or "", exit status, stdout, stderr)."""
    import shutil
    import tempfile

    # a short TMPDIR: Ray puts its AF_UNIX sockets under it, whose paths may not exceed 107 bytes
    tmp = tempfile.mkdtemp(prefix="wpb-", dir="/tmp")
    env = dict(os.environ, PYTHONPATH=ROOT, TMPDIR=tmp)
    try:
        proc = subprocess.run([sys.executable, f"{name}.py", "--smoke"], cwd=BENCH_DIR, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        return name, f"benchmarks/{name}.py --smoke ran past {TIMEOUT} s", -1, str(err.stdout or ""), str(err.stderr or "")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode != 0:
        return name, f"benchmarks/{name}.py --smoke exited {proc.returncode}", proc.returncode, proc.stdout, proc.stderr
    reports = parse_reports(proc.stdout)
    if not reports:
        return name, f"benchmarks/{name}.py --smoke printed no report block", 0, proc.stdout, proc.stderr
    for title, figures, ratio in reports:
        if not figures:
            return name, f"{name}: report {title!r} has no figures", 0, proc.stdout, proc.stderr
        if math.isnan(ratio):
            return name, f"{name}: report {title!r} has no ratio", 0, proc.stdout, proc.stderr
    return name, "", 0, proc.stdout, proc.stderr


def test_every_benchmark_runs_at_its_smallest_size(photos_dir):
    """Every benchmark, `--smoke`, two at a time (one per core): each exits 0 and prints report
    blocks with figures and a ratio. Default suite: a stage change that breaks a benchmark fails
    here. No timing is looked at."""
    from concurrent.futures import ThreadPoolExecutor

    names = sorted(BENCHMARKS, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    with ThreadPoolExecutor(LANES) as pool:
        results = list(pool.map(_smoke, names))
    failed = [(name, problem, out, err) for name, problem, _, out, err in results if problem]
    assert not failed, "\n\n".join(f"{problem}\n--- stdout ---\n{out[-2000:]}\n--- stderr ---\n{err[-2000:]}" for _, problem, out, err in failed)


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_smoke(name, photos_dir):
    """One benchmark's smoke run alone (`pytest -m slow -k NAME`), to look into a failure."""
    _, problem, _, out, err = _smoke(name)
    assert not problem, f"{problem}\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}"
