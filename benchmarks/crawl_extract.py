"""pages/s of `crawl extract` (Beam, FnApiRunner) against a bare loop: fastwarc + selectolax on the same WARCs.

The shared WARCs hold ~56 HTML pages, too few to time anything but Beam's start-up; the benchmark
writes their real pages `--copies` times into `--files` WARC files (default 35,000 pages, the size
of one Common Crawl WARC file, so that Beam's fixed cost weighs what it weighs in real use), then
times both on those in `--repeat` rounds (the bare loop, then the stage; the goal is judged on the
median of the rounds' ratios, the fastest of each printed too), in CPU seconds of this process (the in-process
runner's work is this process's; on a shared machine CPU time is what other tenants cannot
inflate; wall time is printed too). Beam's fixed cost (pipeline construction and runner set-up,
measured on a one-page WARC) is printed on its own.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from _common import SMOKE_HELP, need_shared, paired_median, report, timed_cpu


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
    ap.add_argument("--copies", type=int, default=625, help="copies of the shared pages (56 pages each; 625: one Common Crawl file's 35,000 pages)")
    ap.add_argument("--files", type=int, default=4, help="WARC files (Beam's unit of parallelism)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds, each the bare loop then the stage; the goal is judged on the median of the rounds' ratios (the fastest of each is printed too)")
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
        run_extract(one_page, os.path.join(tmp, "out-warm"), CrawlConfig(), beam_args)  # imports, first-run caches
        _, fixed_wall, fixed_cpu = timed_cpu(run_extract, one_page, os.path.join(tmp, "out-one"), CrawlConfig(), beam_args)
        bare_runs, beam_runs = [], []
        for i in range(args.repeat):
            n_pages, wall, cpu = timed_cpu(bare_loop, paths)
            bare_runs.append((cpu, wall))
            stats, wall, cpu = timed_cpu(run_extract, os.path.join(tmp, "*.warc.gz"), os.path.join(tmp, f"out-{i}"), CrawlConfig(), beam_args)
            beam_runs.append((cpu, wall))
    bare, stage = n_pages / min(bare_runs)[0], n_pages / min(beam_runs)[0]
    paired, rounds = paired_median([b[0] / s[0] for b, s in zip(bare_runs, beam_runs)])  # (cpu, wall) each: stage pages/s over the loop's
    notes = (rounds, f"the fastest of each over {len(bare_runs)} rounds: {stage / bare:.2f} (CPU), {min(r[1] for r in bare_runs) / min(r[1] for r in beam_runs):.2f} (wall time)")
    return report(
        "crawl extract (CPU time, median of paired rounds)",
        [("pages", n_pages, "pages"), ("bare fastwarc+selectolax loop (best)", bare, "pages/s"), ("webpairs crawl extract (Beam, best)", stage, "pages/s"), ("links written", stats["kept"], "links"), ("Beam's fixed cost (one-page WARC, CPU)", fixed_cpu, "s"), ("Beam's fixed cost (one-page WARC, wall)", fixed_wall, "s")],
        paired,
        0.8,
        notes,
    )


if __name__ == "__main__":
    main()
