"""URLs/s of `crawl download` against a bare img2dataset call on the URLs the stage really fetched.

The stage plans first (crawl/plan.py) and hands img2dataset only the distinct URLs it selected:
its input shards stay under the download folder's `_plan/urls/`. The bare baseline downloads
exactly those shards from the loopback test web (127.0.0.1, real photos when ../shared is present)
with the same processes, threads and timeout. The stage adds the link checks and the plan, the
policy downloader in img2dataset's workers and the resolution to downloads/ + occurrences/ +
rejected/ parquet. `--smoke`: the smallest size, one repeat (checks that it runs).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from _common import SMOKE_HELP, SHARED, report, timed


def bare_img2dataset(url_list: str, out: str, processes: int, threads: int) -> None:
    import img2dataset

    img2dataset.download(
        url_list=url_list, input_format="parquet", url_col="image_url", output_format="parquet",
        output_folder=out, processes_count=processes, thread_count=threads, resize_mode="no", disable_all_reencoding=True,
        timeout=3, number_sample_per_shard=1000, enable_wandb=False, compute_hash="sha256",
    )


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pages", type=int, default=60, help="pages of the test web (more pages, more links)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    if args.smoke:
        args.pages, args.repeats, args.processes, args.threads = 12, 1, 1, 4
    from core.config import CrawlConfig, DownloadConfig
    from crawl.download import PLAN_DIR, run_download
    from crawl.extract import run_extract
    from webpairs.testweb import serve_test_web

    photos = os.path.join(SHARED, "photos-imagenet-sample")
    with tempfile.TemporaryDirectory() as tmp, serve_test_web(tmp, photos_dir=photos if os.path.isdir(photos) else None, n_pages=args.pages, n_topics=6, slow_delay=0.0) as web:
        run_extract(web.warc_path, os.path.join(tmp, "links"), CrawlConfig(allow_hosts=("127.0.0.1",)))
        cfg = DownloadConfig(allow_hosts=("127.0.0.1",), processes=args.processes, threads=args.threads, timeout=3)
        stage_s = bare_s = float("inf")
        for rep in range(args.repeats):  # alternate, keep each one's best: no cold-start bias
            stats, t = timed(run_download, os.path.join(tmp, "links"), os.path.join(tmp, f"stage{rep}"), cfg)
            stage_s = min(stage_s, t)
            url_list = os.path.join(tmp, f"stage{rep}", PLAN_DIR, "urls")  # the distinct URLs the stage fetched
            _, t = timed(bare_img2dataset, url_list, os.path.join(tmp, f"bare{rep}"), args.processes, args.threads)
            bare_s = min(bare_s, t)
    n = stats["urls_selected"] + stats["urls_evidence"]  # the URLs img2dataset got, in both runs
    return report(
        "crawl download",
        [("links", stats["input"], "links"), ("URLs fetched (the plan's img2dataset input)", n, "URLs"), ("bare img2dataset", n / bare_s, "URLs/s"), ("webpairs crawl download", n / stage_s, "URLs/s"), ("links kept", stats["kept"], "links")],
        bare_s / stage_s,
        0.8,
    )


if __name__ == "__main__":  # img2dataset spawns workers: the guard is required
    main()
