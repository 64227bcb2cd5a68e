"""pages/s of `crawl extract` (Beam, FnApiRunner) against a bare loop: fastwarc + selectolax on the same WARCs.

The shared WARCs hold ~60 HTML pages, too few to time anything but Beam's start-up; the benchmark
writes their real pages `--copies` times into `--files` WARC files, then times both on those.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from _common import need_shared, report, timed


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
    ap.add_argument("--copies", type=int, default=40, help="copies of the shared pages")
    ap.add_argument("--files", type=int, default=4, help="WARC files (Beam's unit of parallelism)")
    args, beam_args = ap.parse_known_args()
    from core.config import CrawlConfig
    from crawl.extract import run_extract

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_corpus(tmp, args.copies, args.files)
        n_pages, bare_s = timed(bare_loop, paths)
        stats, beam_s = timed(run_extract, os.path.join(tmp, "*.warc.gz"), os.path.join(tmp, "out"), CrawlConfig(), beam_args)
    bare, stage = n_pages / bare_s, n_pages / beam_s
    return report(
        "crawl extract",
        [("pages", n_pages, "pages"), ("bare fastwarc+selectolax loop", bare, "pages/s"), ("webpairs crawl extract (Beam)", stage, "pages/s"), ("links written", stats["kept"], "links")],
        stage / bare,
        0.5,
    )


if __name__ == "__main__":
    main()
