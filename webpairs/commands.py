"""Stage subcommands of the `webpairs` command line (each registrar adds one working command)."""

from __future__ import annotations

import time

from core import config
from core.stageio import StageError


def _run_stage(fn, stage_name: str, *args, **kwargs) -> int:
    """Run a stage function, print its reconciled counts; turn known failures into one-line errors."""
    from webpairs.cli import _print_stats
    from webpairs.errors import UserError

    start = time.time()
    try:
        stats = fn(*args, **kwargs)
    except (StageError, config.ConfigError, FileNotFoundError) as err:
        raise UserError(str(err)) from err
    _print_stats(stats, time.time() - start)
    return 0


def _allow_hosts_arg(p) -> None:
    p.add_argument(
        "--allow-hosts",
        metavar="HOST,IP,CIDR",
        help="hosts exempt from the private-address rule of the URL policy (e.g. 127.0.0.1 for the loopback test web); default: none",
    )


def register_crawl(sub, handlers) -> None:
    from webpairs.cli import _stage_parser

    crawl = sub.add_parser("crawl", help="crawl stage: extract image links from WARC/WAT, download the images")
    crawl_sub = crawl.add_subparsers(dest="crawl_command", metavar="STEP", required=True)
    p = _stage_parser(
        crawl_sub,
        "extract",
        "Extract one link record per <img> (src/srcset), <picture><source> and og:image from WARC/WAT files.",
        "WARC/WAT file, folder or glob; local or any fsspec URL (gzip or plain)",
    )
    _allow_hosts_arg(p)
    p.set_defaults(crawl_handler=cmd_crawl_extract)

    def dispatch(args, beam_args):
        return args.crawl_handler(args, beam_args)

    dispatch.accepts_beam_args = True
    handlers["crawl"] = dispatch
    register_crawl.subparsers = crawl_sub


def cmd_crawl_extract(args, beam_args) -> int:
    from crawl.extract import run_extract

    cfg = config.load(config.CrawlConfig, args.config, section="crawl", allow_hosts=args.allow_hosts)
    return _run_stage(run_extract, "crawl extract", args.input, args.out, cfg, beam_args)


REGISTRARS = [register_crawl]
