"""pages/s of `crawl extract` (Beam, FnApiRunner) against a bare loop: fastwarc + selectolax on the same WARCs.

The shared WARCs hold ~60 HTML pages, too few to time anything but Beam's start-up; the benchmark
writes their real pages `--copies` times into `--files` WARC files (default 11,200 pages, about a
quarter of one Common Crawl WARC file), then times both on those, best of `--repeat` runs each.
Beam's fixed start-up (pipeline construction and runner set-up, measured on a one-page WARC) is
printed too: it is what a smaller corpus would mostly measure.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from _common import SMOKE_HELP, need_shared, report, timed


def build_corpus(out_dir: str, copies: int, files: int) -> list[str]:
    from crawl.warc import Page, iter_file
    from webpairs.testweb import write_warc

    pages = []
    for name in sorted(os.listdir(need_shared("warc"))):
        if ".warc" in name and not name.endswith(".wat"):
            pages += [(d.url, d.body) for d in iter_file(os.path.join(need_shared("warc"), name)) if isinstance(d, Page)]
    paths = []
    per_file = copies // files
    for f in range(files):
        html = {}
        for c in range(per_file):
            for url, body in pages:
                html[f"{url}?copy={f}-{c}"] = body.decode("utf-8", errors="replace")
        path = os.path.join(out_dir, f"corpus-{f:03d}.warc.gz")
        write_warc(path, html)
        paths.append(path)
    return paths


def bare_loop(paths: list[str]) -> int:
    """The same reader and parser, no Beam: count pages and links."""
    from crawl.html import decode_html, extract_image_links
    from crawl.warc import Page, iter_file

    n_pages = n_links = 0
    for p in paths:
        for doc in iter_file(p):
            if isinstance(doc, Page):
                links, _ = extract_image_links(decode_html(doc.body, doc.charset))
                n_pages += 1
                n_links += len(links)
    return n_pages


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--copies", type=int, default=200, help="copies of the shared pages (56 pages each)")
    ap.add_argument("--files", type=int, default=4, help="WARC files (Beam's unit of parallelism)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each; the fastest counts")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args, beam_args = ap.parse_known_args()
    if args.smoke:
        args.copies, args.files, args.repeat = 2, 1, 1
    from core.config import CrawlConfig
    from crawl.extract import run_extract
    from webpairs.testweb import write_warc

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_corpus(tmp, args.copies, args.files)
        one_page = os.path.join(tmp, "one", "page.warc.gz")
        os.makedirs(os.path.dirname(one_page))
        write_warc(one_page, {"http://example.com/": "<img src=a.jpg>"})
        _, startup_s = timed(run_extract, one_page, os.path.join(tmp, "out-one"), CrawlConfig(), beam_args)
        bare_runs, beam_runs = [], []
        for i in range(args.repeat):
            n_pages, seconds = timed(bare_loop, paths)
            bare_runs.append(seconds)
            stats, seconds = timed(run_extract, os.path.join(tmp, "*.warc.gz"), os.path.join(tmp, f"out-{i}"), CrawlConfig(), beam_args)
            beam_runs.append(seconds)
    bare, stage = n_pages / min(bare_runs), n_pages / min(beam_runs)
    return report(
        "crawl extract",
        [("pages", n_pages, "pages"), ("bare fastwarc+selectolax loop", bare, "pages/s"), ("webpairs crawl extract (Beam)", stage, "pages/s"), ("links written", stats["kept"], "links"), ("Beam start-up (one-page WARC)", startup_s, "s")],
        stage / bare,
        0.5,
    )


if __name__ == "__main__":
    main()
