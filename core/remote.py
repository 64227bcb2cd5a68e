"""Reading inputs where they live: local paths or any fsspec URL (https://, s3://, gs://, ...).

* `storage_options(url)`: per-scheme defaults. s3:// is anonymous unless AWS credentials are
  configured (Common Crawl's bucket `s3://commoncrawl/` is public); `WEBPAIRS_S3_ENDPOINT` (or
  botocore's own `AWS_ENDPOINT_URL`) points s3fs at another S3 API (MinIO, moto, a mirror).
* `open_input(url)`: a read-only, seekable stream that fetches ranges as it is read (never the
  whole file in memory or on disk) and survives transient failures: a connection reset, a timeout,
  an HTTP 5xx or S3 "SlowDown" reopens the file at the same offset after an exponential backoff,
  up to `retries` times; anything else (404, access denied) fails at once with `InputError`.
"""

from __future__ import annotations

import io
import logging
import os
import random
import time
from typing import Optional

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 5
DEFAULT_BACKOFF = 0.5  # seconds before the first retry, doubled each time (with jitter)
BLOCK_SIZE = 8 * 1024 * 1024  # bytes per ranged read of a remote file


class InputError(OSError):
    """An input file that cannot be read (after retries, or a permanent error); says which and why."""


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def _has_aws_credentials() -> bool:
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_PROFILE") or env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        return True
    return os.path.exists(os.path.expanduser(env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")))


def export_s3_endpoint() -> None:
    """Make WEBPAIRS_S3_ENDPOINT the endpoint of every S3 client the run starts, not only of
    `storage_options`' readers: a stage's writes go through Beam's S3 filesystem (boto3) and s3fs,
    which both read AWS_ENDPOINT_URL_S3."""
    endpoint = os.environ.get("WEBPAIRS_S3_ENDPOINT")
    if endpoint:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint


def storage_options(url: str) -> dict:
    """fsspec options for `url`'s scheme (see the module docstring)."""
    proto = protocol(url)
    if proto in ("s3", "s3a"):
        opts: dict = {"anon": not _has_aws_credentials()}
        endpoint = os.environ.get("WEBPAIRS_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    if proto in ("http", "https"):
        # a session per file and no whole-file caching: ranged reads as the stream is consumed
        return {"block_size": BLOCK_SIZE}
    return {}


def filesystem(url: str):
    """(fsspec filesystem, path) for a local path or URL, with `storage_options`."""
    import fsspec

    return fsspec.core.url_to_fs(url, **storage_options(url))


def is_transient(err: BaseException) -> bool:
    """True for errors worth a retry: resets, timeouts, HTTP 5xx/429, S3 SlowDown/throttling."""
    if isinstance(err, FileNotFoundError) and err.__cause__ is not None and err.__cause__ is not err:
        return is_transient(err.__cause__)  # fsspec's http info() wraps a 503 in FileNotFoundError
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    try:
        import aiohttp  # fsspec's http backend
    except ImportError:  # pragma: no cover - a pinned dependency
        aiohttp = None
    if aiohttp is not None:
        if isinstance(err, aiohttp.ClientResponseError):
            return err.status >= 500 or err.status == 429
        if isinstance(err, (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
            return True  # a body cut short, a reset or refused connection
    status = getattr(err, "status", None) or getattr(err, "code", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    response = getattr(err, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        http = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in ("SlowDown", "Throttling", "RequestTimeout", "InternalError", "ServiceUnavailable") or http >= 500
    text = f"{type(err).__name__} {err}".lower()
    if any(s in text for s in ("slowdown", "503", "502", "500 internal", "504", "throttl")):
        return True
    if any(s in text for s in ("404", "not found", "nosuchkey", "access denied", "forbidden", "403")):
        return False
    return isinstance(err, (ConnectionError, TimeoutError, OSError, EOFError)) or "clienterror" in text or "disconnect" in text or "timeout" in text


class RetryingFile(io.RawIOBase):
    """A seekable read-only stream over `url` that reopens at its offset after transient errors."""

    def __init__(self, url: str, retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF):
        super().__init__()
        self.url, self.retries, self.backoff = url, retries, backoff
        self.pos, self._fh, self._size = 0, None, None
        self.retried = 0  # how many transient failures were survived (for stats and tests)
        self._call(lambda fh: None)  # open now: a missing file fails here, in one sentence

    def _open(self):
        fs, path = filesystem(self.url)
        fh = fs.open(path, "rb", block_size=BLOCK_SIZE)  # s3fs would read ahead 50 MiB otherwise
        if self.pos:
            fh.seek(self.pos)
        return fh

    def _call(self, action):
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                if self._fh is None:
                    self._fh = self._open()
                return action(self._fh)
            except Exception as err:  # noqa: BLE001 - classified below
                self._drop()
                if not is_transient(err) or attempt == self.retries:
                    why = "not found" if isinstance(err, FileNotFoundError) else f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
                    raise InputError(f"{self.url}: {why}" + (f" (after {attempt} retries)" if attempt else "")) from None
                self.retried += 1
                log.warning("%s: %s at byte %d; retrying in %.1fs", self.url, type(err).__name__, self.pos, delay)
                time.sleep(delay * (1 + 0.25 * random.random()))
                delay *= 2
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close too
                pass
            self._fh = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._call(lambda fh: fh.read(len(buffer)))
        n = len(data)
        buffer[:n] = data
        self.pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        data = self._call(lambda fh: fh.read(size))
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self.pos
        elif whence == io.SEEK_END:
            offset += self.size()
        self.pos = max(0, offset)
        if self._fh is not None:
            self._call(lambda fh: fh.seek(self.pos))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def size(self) -> int:
        if self._size is None:
            self._size = int(self._call(lambda fh: getattr(fh, "size", None) or fh.seek(0, io.SEEK_END)))
            if self._fh is not None:
                self._fh.seek(self.pos)
        return self._size

    def close(self) -> None:
        self._drop()
        super().close()


def open_input(url: str, retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF) -> RetryingFile:
    """Open a local path or URL for streaming reads with retries (see the module docstring)."""
    return RetryingFile(url, retries, backoff)


def read_bytes(url: str, retries: int = DEFAULT_RETRIES, limit: Optional[int] = None) -> bytes:
    """A small file whole (a manifest, a paths list), with the same retries."""
    with open_input(url, retries) as fh:
        return fh.read(limit if limit is not None else -1)
