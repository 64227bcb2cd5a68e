"""Politeness: how `crawl download` spreads its requests over a site, across all its processes.

* **At most `per_host_connections` connections at once to one host** (default 4). Each host has
  that many slot files in the run; a request holds an exclusive `flock` on one of them while its
  connection is open. flock locks belong to an open file, so threads of one process and
  img2dataset's worker processes on one machine count against the same slots.
* **Crawl-delay and Retry-After**: each host has a "next request not before" time in a file, read
  and written under its own flock; a request waits for it (a 429/503 answer's `Retry-After` pushes
  it forward). A host whose robots.txt asks for `Crawl-delay: d` gets one connection at a time
  (one slot file), and each request sets the time to d after its end: the next request starts at
  least d after the previous one was answered (the interval between the end of one request and the
  start of the next, as Yandex defined the directive), which is what the site can see. With 4 slots
  the gate spaced only the moments requests left it: a request that reached the server late (its
  thread not yet scheduled on a loaded machine) arrived next to the one after it, 0.015 s apart in
  one full test suite. Only threads working on that host wait: the plan interleaves hosts in
  img2dataset's input shards, so the other threads keep fetching other hosts.

The gate holds plain data (a folder, a number, a dict) so it pickles into img2dataset's workers.
The folder must be on a file system every download process can lock (the run folder is local, as
img2dataset's resume needs; on a cluster distributor the limits hold per machine).
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import hashlib
import os
import random
import struct
import time
from typing import Iterator, Optional

POLL = 0.01  # seconds between tries for a free slot


def retry_after_seconds(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """A Retry-After header (delay-seconds or an HTTP date) as seconds from now; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def asked_pause(err: BaseException) -> Optional[float]:
    """The seconds a failed request's answer asked to wait (a 429/503 with a Retry-After, as
    crawl/fetch.FetchError carries them), or None."""
    if getattr(err, "reason", None) not in ("http_429", "http_503"):
        return None
    return retry_after_seconds(getattr(err, "retry_after", None))


class HostGate:
    """Per-host connection slots and request times, shared by every download process of a run."""

    def __init__(self, folder: str, per_host: int = 4, delays: Optional[dict] = None):
        self.folder, self.per_host, self.delays = folder, max(1, int(per_host)), dict(delays or {})
        os.makedirs(folder, exist_ok=True)
        self._ready = True

    def __getstate__(self):
        return {**self.__dict__, "_ready": False}  # a worker on another machine makes the folder itself

    def learn_delay(self, host: str, seconds: float) -> None:
        """A Crawl-delay learnt after the gate was built (a site reached only by a redirect, asked
        by a worker: crawl/consent.SiteConsent); each process learns it from the same answer."""
        if seconds > 0:
            host = host.lower()
            self.delays[host] = max(self.delays.get(host, 0.0), seconds)

    def _base(self, host: str) -> str:
        return os.path.join(self.folder, hashlib.sha1(host.lower().encode()).hexdigest()[:20])

    @contextlib.contextmanager
    def connection(self, host: str) -> Iterator[None]:
        """Hold one of the host's slots (waiting for a free one), after its next-request time."""
        if not self._ready:
            os.makedirs(self.folder, exist_ok=True)
            self._ready = True
        base = self._base(host)
        delay = self.delays.get(host.lower(), 0.0)
        fd = self._take_slot(base, 1 if delay > 0 else self.per_host)  # a Crawl-delay: one request at a time
        try:
            self._wait_turn(base, delay)
            yield
        except Exception as err:
            wait = asked_pause(err)
            if wait:  # a 429/503's Retry-After holds before the slot is free: no other request slips in first
                self._push(base, wait)
            raise
        finally:
            if delay > 0:  # the delay counts from the end of this request (the next one waits for this slot)
                self._push(base, delay)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _take_slot(self, base: str, slots: int) -> int:
        order = list(range(slots))
        while True:
            random.shuffle(order)  # spread the tries over the slots
            for k in order:
                fd = os.open(f"{base}.{k}", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    os.close(fd)
            time.sleep(POLL * (0.5 + random.random()))

    def _wait_turn(self, base: str, delay: float) -> None:
        """Wait for the host's next-request time; with a Crawl-delay, set the next one (the end of the
        request sets it again, later; this one holds if the process dies mid-request)."""
        path = f"{base}.time"
        if delay <= 0 and not os.path.exists(path):
            return  # no delay asked, no pause recorded: nothing to wait for
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one waiter at a time, in turn
            raw = os.pread(fd, 8, 0)
            not_before = struct.unpack("<d", raw)[0] if len(raw) == 8 else 0.0
            wait = not_before - time.time()
            if wait > 0:
                time.sleep(wait)
            if delay > 0:
                os.pwrite(fd, struct.pack("<d", time.time() + delay), 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _push(self, base: str, seconds: float) -> None:
        fd = os.open(f"{base}.time", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 8, 0)
            not_before = struct.unpack("<d", raw)[0] if len(raw) == 8 else 0.0
            os.pwrite(fd, struct.pack("<d", max(not_before, time.time() + seconds)), 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
