"""Stand-in for `webpairs` while tests/test_deploy.py runs the deploy/beam scripts: parses the
command line with the real parser and Beam's PipelineOptions and appends what it found as JSON."""

import json
import os
import sys


def main() -> None:
    from apache_beam.options.pipeline_options import PipelineOptions

    from webpairs.cli import build_parser

    parser, _ = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:])
    known = PipelineOptions([]).get_all_options()
    given = PipelineOptions(rest).get_all_options(retain_unknown_options=True) if rest else {}
    record = {"command": " ".join(c for c in (args.command, getattr(args, "crawl_command", None), getattr(args, "op", None)) if c), "unknown": sorted(k for k in given if k not in known), "options": {k: v for k, v in given.items() if k in known and v != known[k]}}
    with open(os.environ["CHECK_LOG"], "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


if __name__ == "__main__":
    main()
