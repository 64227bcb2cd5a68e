"""The `webpairs` command line: one subcommand per stage plus tools around them.

Stage commands take an input path/glob, `--out DIR` and `--config FILE.yaml`; flags they do not
know are passed to Beam as pipeline options (`--runner`, `--direct_num_workers`, ...).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) phones home
os.environ.setdefault("WANDB_MODE", "disabled")  # wandb (via img2dataset) too

from webpairs.errors import UserError  # noqa: E402

log = logging.getLogger("webpairs")


class _DropBeamImportNoise(logging.Filter):
    """Beam logs a warning about optional GCP clients at import; it is not the user's concern."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("apitools not found")


logging.getLogger().addFilter(_DropBeamImportNoise())

def cmd_testweb(args, _beam_args) -> int:
    from webpairs.testweb import serve_test_web

    with serve_test_web(args.out, photos_dir=args.photos, port=args.port) as web:
        print(f"serving {len(web.pages)} pages and {len(web.routes)} files on {web.base_url}")
        print(f"WARC: {web.warc_path}")
        print("press Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_encoders(args, _beam_args) -> int:
    from core.encoders import LISTED, REGISTRY, EncoderUnavailable, describe, hub_offline, load_encoder

    print(f"{'encoder':40s} {'dim':>5s}  {'text tower':10s}  weights on this machine")
    for name in (args.names or LISTED):
        try:
            d = describe(name)
        except EncoderUnavailable as err:
            raise UserError(str(err)) from err
        print(f"{d['name']:40s} {d['dim'] or '?':>5}  {'yes' if d['text'] else 'no':10s}  {d['local']}")
    print("\nnames: " + "; ".join(f"{k}: {v}" for k, v in REGISTRY.items()))
    print("mode: " + ("offline (cache only)" if hub_offline() else "online (missing weights download on first use; --offline for cache only)"))
    if args.check:
        try:
            enc = load_encoder(args.check, args.weights or "")
        except EncoderUnavailable as err:
            raise UserError(str(err)) from err
        print(f"{enc.name}: dim={enc.dim} image_size={enc.image_size} text_tower={enc.has_text}")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    parser = argparse.ArgumentParser(
        prog="webpairs",
        description="Web image-pair dataset pipeline: crawl -> filter -> pair -> shards, plus tools.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="everything on the console: library output, Ray's worker logs, debug logging (run, demo and train otherwise write them to OUT/webpairs.log), and tracebacks of unexpected errors")
    parser.add_argument("--offline", action="store_true", help="never download model weights: hub caches only (same as HF_HUB_OFFLINE=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers: dict[str, Callable] = {}

    p = sub.add_parser("testweb", help="serve the loopback test web on 127.0.0.1 and write its WARC")
    p.add_argument("--out", required=True, help="directory for warc/testweb.warc.gz")
    p.add_argument("--photos", help="folder of photos (default: generated images)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    handlers["testweb"] = cmd_testweb

    p = sub.add_parser("encoders", help="list the frozen encoders: embedding size, text tower, weights present locally")
    p.add_argument("names", nargs="*", help="encoders to describe (default: the usual ones)")
    p.add_argument("--check", metavar="NAME", help="load this encoder (downloading its weights unless --offline) and print its size")
    p.add_argument("--weights", help="local weights file for --check")
    handlers["encoders"] = cmd_encoders

    for register in _stage_registrars():
        register(sub, handlers)
    return parser, handlers


def _stage_registrars() -> list[Callable]:
    """Stage command registrars (kept in webpairs.commands so this file stays the entry point)."""
    from webpairs import commands

    return commands.REGISTRARS


def _known_errors() -> tuple:
    """Errors a user can cause (bad input, config, a locked or incomplete folder, a bad checkpoint)."""
    from core.config import ConfigError
    from core.stageio import StageError

    return (UserError, ConfigError, StageError, FileNotFoundError, NotADirectoryError, PermissionError)


def _command_flags(parser: argparse.ArgumentParser, args) -> list[str]:
    """The flags of the command the user ran (its parser, its sub-command's, the global ones)."""
    names, current = [], parser
    chosen = [args.command, getattr(args, "crawl_command", None)]
    while current is not None:
        names += [s for action in current._actions for s in action.option_strings if s.startswith("--")]  # noqa: SLF001
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
        current = subs[0].choices.get(chosen.pop(0)) if subs and chosen and chosen[0] else None
    return names


def unknown_flag(extra: list[str], own: list[str], beam: bool) -> str | None:
    """The error for the first flag in `extra` (what the command's parser left) that neither the
    command nor (where it passes flags on) Beam's pipeline options know, naming the nearest known
    flag (difflib); None when all are known."""
    import difflib

    known = set()
    if beam:
        from core.stageio import beam_flag_names

        known = beam_flag_names()
    for token in extra:
        if token == "--":
            break
        if not token.startswith("-") or token.lstrip("-").replace(".", "", 1).isdigit():
            continue  # a value, or a negative number
        flag = token.split("=", 1)[0]
        if flag in known:
            continue
        candidates = list(dict.fromkeys(own + sorted(known)))
        near = difflib.get_close_matches(flag, candidates, n=1, cutoff=0.6) or difflib.get_close_matches(flag.replace("-", "_"), candidates, n=1, cutoff=0.6)
        where = "neither this command nor Beam's pipeline options know it" if beam else "this command does not know it"
        return f"unknown flag {flag} ({where})" + (f"; did you mean {near[0]}?" if near else "")
    return None


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "urllib3", "filelock", "ray", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command is None:
        parser.print_help()
        return 2
    from core.console import set_enabled

    set_enabled(not args.verbose)
    if args.offline:
        from core.encoders import set_offline

        set_offline()
    stage_cmds = getattr(handlers[args.command], "accepts_beam_args", False)
    name = args.command + (f" {args.crawl_command}" if getattr(args, "crawl_command", None) else "")
    if beam_args:  # a misspelt flag must never pass silently (Beam discards what it cannot parse)
        message = unknown_flag(beam_args, _command_flags(parser, args), beam=stage_cmds and name != "crawl download")
        if message:
            print(f"webpairs {name}: error: {message}", file=sys.stderr)
            return 2
        if not stage_cmds:
            parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    try:
        if stage_cmds and name != "crawl download":  # the config file's `beam:` section first: command-line flags win
            from core.config import beam_flags

            from core.stageio import check_runner_flags

            from_config = beam_flags(getattr(args, "config", None))
            message = unknown_flag(from_config, [], beam=True)
            if message:
                raise UserError(f"config file {args.config}, section beam: {message}")
            beam_args = from_config + beam_args
            check_runner_flags(beam_args)  # a wrong runner flag fails before any work
        return handlers[args.command](args, beam_args) or 0
    except KeyboardInterrupt:
        print(f"webpairs {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line on stderr, the traceback only with -v
        if args.verbose:
            raise
        known = isinstance(err, _known_errors()) or type(err).__name__ == "CheckpointError"
        text = " ".join(str(err).split("\n")[0].split()) or type(err).__name__
        if not known:
            text = f"{type(err).__name__}: {text} (rerun with -v for the traceback)"
        print(f"webpairs {name}: error: {text}", file=sys.stderr)
        return 2 if known else 1


if __name__ == "__main__":
    sys.exit(main())
