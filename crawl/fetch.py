"""One image fetch for `crawl download`, used by img2dataset's workers in place of its urllib call.

What the real web needs that a plain `urlopen(url, timeout).read()` does not give:

* **The URL policy on the address actually connected to.** A host name is resolved once (or
  pinned with `--resolve HOST:ADDR`, as curl does), every address is checked against the policy
  (loopback, private, link-local, reserved: refused unless allowed), and the connection goes to
  that checked address (TLS still verifies the host name): no DNS-rebinding window. Every redirect
  hop is resolved and checked the same way.
* **A total deadline and a byte cap per image.** A server that drips one byte every few seconds,
  or never ends its body, is cut off at `deadline` seconds or `max_bytes` bytes (reasons
  `timeout`, `too_large`); the socket timeout still bounds each read.
* **Only the bytes the image needs.** Trailing data after the image's end (a JPEG's EOI, a PNG's
  IEND, a GIF's trailer, a WebP's RIFF size) is cut off (crawl/imagebytes.py).

Errors are returned as messages that start with `webpairs:<reason>:`, which the download stage
maps back to its closed set of reasons.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import socket
import ssl
import time
from typing import Optional
from urllib.parse import urljoin, urlsplit

from crawl.imagebytes import trim_trailing
from crawl.urls import REASON_PRIVATE, AllowList, _is_internal_ip, policy_reason

MAX_REDIRECTS = 5
CHUNK = 64 * 1024


class FetchError(Exception):
    """A fetch that ends without an image; `reason` is one of the download stage's reasons."""

    def __init__(self, reason: str, message: str, retry_after: Optional[str] = None, host: Optional[str] = None):
        super().__init__(f"webpairs:{reason}: {message}")
        self.reason = reason
        self.retry_after = retry_after  # a 429/503 answer's Retry-After header, as sent
        self.host = host  # the host that answered with it (after redirects: not always the URL's)


def parse_pins(entries) -> dict[str, str]:
    """`HOST:ADDR` entries (curl's --resolve without the port) -> {host: addr}."""
    pins = {}
    for entry in entries or ():
        host, sep, addr = entry.strip().partition(":")  # the address may be IPv6, the name has no colon
        if not sep or not host or not addr:
            raise ValueError(f"--resolve entry {entry!r} is not HOST:ADDR")
        pins[host.lower()] = addr.strip("[]")
    return pins


def resolve(host: str, port: int, allow: AllowList, pins: dict) -> str:
    """The one address to connect to for `host`, after the policy: raises FetchError when the host
    resolves only to refused addresses (or not at all)."""
    if host.lower() in pins:
        addresses = [pins[host.lower()]]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as err:
            raise FetchError("dns_error", f"cannot resolve {host}: {err}") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
    allowed_name = allow.allows(host)
    for address in addresses:
        if allowed_name or allow.allows(address) or not _is_internal_ip(address):
            return address
    raise FetchError(REASON_PRIVATE, f"url policy: {host} resolves to {addresses[0]} ({REASON_PRIVATE})")


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to a fixed address; Host header and URL keep the name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed address; SNI and certificate checks use the host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch(url: str, allow: AllowList, timeout: float = 10.0, deadline: float = 30.0, max_bytes: int = 20 * 1024 * 1024, user_agent: str = "webpairs", pins: Optional[dict] = None, judge=None, accept: str = "image/*,*/*;q=0.8", trim: bool = True, slot=None) -> bytes:
    """The image bytes at `url` (trimmed), or FetchError. `judge` (crawl/judge.py's ResponseJudge)
    is asked before each request, on the headers before the body is read, and on the bytes before
    they are returned: any refusal raises FetchError with its reason. `slot(host)`, a context
    manager (crawl/polite.py's HostGate.connection), is held around each request of each hop, so a
    redirect to another host (a CDN) counts against that host's connections and Crawl-delay."""
    pins = pins or {}
    end = time.monotonic() + deadline
    for hop in range(MAX_REDIRECTS + 1):
        reason = policy_reason(url, allow)
        if reason is not None:
            raise FetchError("redirect_refused" if hop else reason, f"url policy: {'redirect to ' if hop else ''}{url[:200]} refused ({reason})")
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            address = resolve(parts.hostname or "", port, allow, pins)
        except FetchError as err:
            if hop and err.reason == REASON_PRIVATE:
                raise FetchError("redirect_refused", f"url policy: redirect to {url[:200]} refused ({REASON_PRIVATE})") from None
            raise
        if judge is not None:  # after the URL policy (its reason comes first), before the request
            judge.before_request(url)
        queued = time.monotonic()
        with slot(parts.hostname or "") if slot is not None else contextlib.nullcontext():
            end += time.monotonic() - queued  # the wait for the host's slot and Crawl-delay is politeness, not this fetch's time
            left = end - time.monotonic()
            if left <= 0:
                raise FetchError("timeout", f"deadline of {deadline:g}s passed")
            sock_timeout = min(timeout, left)
            if parts.scheme == "https":
                conn = _PinnedHTTPSConnection(parts.hostname, port, address, sock_timeout, ssl.create_default_context())
            else:
                conn = _PinnedHTTPConnection(parts.hostname, port, address, sock_timeout)
            try:
                path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                conn.request("GET", path, headers={"User-Agent": user_agent, "Accept": accept, "Accept-Encoding": "identity"})
                resp = conn.getresponse()
                if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                    url = urljoin(url, resp.getheader("Location").strip())
                    continue
                if resp.status >= 400:
                    raise FetchError(f"http_{resp.status}", f"HTTP Error {resp.status}: {resp.reason}", resp.getheader("Retry-After") if resp.status in (429, 503) else None, parts.hostname)
                if judge is not None:
                    judge.on_headers(url, resp.headers)  # before a byte of the body is read
                declared = resp.getheader("Content-Length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise FetchError("too_large", f"Content-Length {declared} > {max_bytes} bytes")
                data = _read_capped(resp, conn, end, timeout, deadline, max_bytes)
                data = trim_trailing(data) if trim else data
                if judge is not None:
                    judge.on_body(url, data)  # before the bytes are returned to be written anywhere
                return data
            except FetchError:
                raise
            except (socket.timeout, TimeoutError) as err:
                raise FetchError("timeout", f"timed out: {err}") from None
            except (OSError, http.client.HTTPException, ssl.SSLError) as err:
                raise FetchError("download_error", f"{type(err).__name__}: {err}") from None
            finally:
                conn.close()
    raise FetchError("download_error", f"more than {MAX_REDIRECTS} redirects")


def _read_capped(resp, conn, end: float, timeout: float, deadline: float, max_bytes: int) -> bytes:
    """The body, read in chunks under the total deadline and the byte cap."""
    buf = io.BytesIO()
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise FetchError("timeout", f"deadline of {deadline:g}s passed after {buf.tell()} bytes")
        if conn.sock is not None:
            conn.sock.settimeout(min(timeout, left))
        chunk = resp.read1(CHUNK) if hasattr(resp, "read1") else resp.read(CHUNK)
        if not chunk:
            return buf.getvalue()
        buf.write(chunk)
        if buf.tell() > max_bytes:
            raise FetchError("too_large", f"body over {max_bytes} bytes")
