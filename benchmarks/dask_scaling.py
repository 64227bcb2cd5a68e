"""`crawl extract` and `filter` (no encoder) on Dask with 1 and 2 worker processes, and in-process.

Extract reads the shared real pages copied into `--files` WARC files; filter reads the 300 shared
photos `--repeat` times in `--files` download files (each input file is one Dask partition). Each
Dask run submits to a LocalCluster started before the timer (its start-up is printed apart); each
configuration runs `--runs` times and keeps its best time (the first run on a fresh cluster pays the
workers' imports; runs of several processes on 2 cores vary by 20 % and more).
The default input (13,440 pages, 3,600 photos: 15-25 s a run on one core) keeps the stage's fixed
costs (building the pipeline on the driver: about 1 s) a small part of it, as on a cluster; at a
third of it (`--copies 80 --repeat 4`) those costs take the 2/1 speed-up down to about 1.4-1.5.
Reported: the 2-worker / 1-worker speed-up (goal >= 1.6 on this 2-core machine) and the 1-worker
Dask / in-process ratio (goal >= 0.7), for each stage.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from _common import photo_downloads, report, timed


def main() -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=240, help="copies of the shared real pages (56 pages each) for extract")
    ap.add_argument("--repeat", type=int, default=12, help="copies of the 300 shared photos for filter")
    ap.add_argument("--files", type=int, default=8, help="input files (= Dask partitions) per stage")
    ap.add_argument("--runs", type=int, default=3, help="runs of each configuration (the best counts)")
    args = ap.parse_args()
    from core.config import CrawlConfig, FilterConfig
    from core.dask_runner import dask_cluster
    from crawl.extract import run_extract
    from crawl_extract import build_corpus
    from filter.pipeline import run_filter

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        warcs = build_corpus(os.path.join(tmp, "warc"), args.copies, args.files)
        photo_downloads(os.path.join(tmp, "download"), args.repeat, args.files)
        stages = {
            "crawl extract": lambda out, beam_args: run_extract(os.path.join(tmp, "warc", "*.warc.gz"), out, CrawlConfig(), beam_args),
            "filter (no encoder)": lambda out, beam_args: run_filter(os.path.join(tmp, "download"), out, FilterConfig(encoder="none"), beam_args),
        }
        seconds: dict = {name: {} for name in stages}
        # best of --runs: the first run on a fresh cluster also pays each worker's imports (a
        # long-lived cluster pays them once)
        for name, run in stages.items():
            seconds[name]["in-process"] = min(timed(run, os.path.join(tmp, f"{name}-local-{i}"), None)[1] for i in range(args.runs))
        for workers in (1, 2):
            start = time.perf_counter()
            with dask_cluster(None, workers) as address:
                print(f"LocalCluster of {workers} worker process(es) started in {time.perf_counter() - start:.1f} s")
                for name, run in stages.items():
                    times = []
                    for i in range(args.runs):
                        stats, t = timed(run, os.path.join(tmp, f"{name}-{workers}-{i}"), ["--runner", "dask", "--dask-address", address])
                        times.append(t)
                    print(f"{name}, {workers} worker(s): " + ", ".join(f"{t:.1f} s" for t in times))
                    seconds[name][workers], seconds[name]["n"] = min(times), stats["input"]
        for name, s in seconds.items():
            n = s["n"]
            rows = [("records", n, "records"), ("in-process (FnApiRunner)", n / s["in-process"], "records/s"), ("Dask, 1 worker process", n / s[1], "records/s"), ("Dask, 2 worker processes", n / s[2], "records/s")]
            results.append(report(f"{name} on Dask: 2 workers / 1 worker", rows, s[1] / s[2], 1.6))
            results.append(report(f"{name} on Dask: 1 worker / in-process", rows[:3], s["in-process"] / s[1], 0.7))
    return results


if __name__ == "__main__":  # LocalCluster spawns worker processes: the guard is required
    main()
