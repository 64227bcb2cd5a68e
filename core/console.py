"""The console of long commands (`run`, `demo`, `train`): our own progress lines and one-line
warnings on the terminal; everything else in RUN_DIR/webpairs.log.

"Everything else" is what libraries print (img2dataset's banner and progress, Ray's start-up
warnings and its workers' logs, Beam's and our INFO logs). It is caught at the file-descriptor
level, so it includes child processes (img2dataset's workers, Ray's log monitor) and C++ log lines.
Our code writes progress to `console()`, which is the real terminal while quiet and stderr
otherwise. `webpairs -v` turns the whole thing off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import IO, Iterator, Optional

LOG_FILE = "webpairs.log"
OUR_LOGGERS = ("webpairs", "core", "crawl", "filter", "pairing", "shards", "train", "browse")
_terminal: Optional[IO[str]] = None
_enabled = False  # the CLI turns it on (off again with -v); library callers (tests) stay as they are


def console() -> IO[str]:
    """Where progress lines and one-line messages go: the terminal, even while quiet."""
    return _terminal or sys.stderr


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = " ".join(record.getMessage().split())
        return f"{record.levelname.lower()}: {text[:300]}"


@contextlib.contextmanager
def quiet(run_dir: str) -> Iterator[Optional[str]]:
    """Send stdout, stderr and logging to RUN_DIR/webpairs.log while the block runs (yields the log
    path, or None when quiet mode is off or already on); warnings of our own loggers still reach
    the terminal, one line each."""
    global _terminal
    if not _enabled or _terminal is not None:
        yield None
        return
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOG_FILE)
    sys.stdout.flush()
    sys.stderr.flush()
    log = open(path, "ab", buffering=0)
    saved = os.dup(1), os.dup(2)
    _terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    warn = logging.StreamHandler(_terminal)
    warn.setLevel(logging.WARNING)
    warn.setFormatter(_OneLine())
    loggers = [logging.getLogger(name) for name in OUR_LOGGERS]
    for lg in loggers:
        lg.addHandler(warn)
    try:
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for lg in loggers:
            lg.removeHandler(warn)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _terminal.close()
        _terminal = None
        log.close()
