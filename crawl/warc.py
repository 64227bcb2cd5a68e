"""Stream pages out of WARC and WAT files (local paths or any fsspec URL) with fastwarc.

A file is read as a stream, record by record, through `core.remote.open_input` (ranged reads with
retries): a multi-GB WARC never sits in memory or on disk whole. What goes wrong with a file is
reported as a `Problem` (one per file or bad record) instead of failing the job or passing silently:

    failed_file     cannot be read (missing, access denied, still failing after the retries)
    not_a_warc      empty, random bytes, plain text: no WARC record at its start
    truncated_file  the last record is cut (a WARC cut inside a gzip member, a short download)
    bad_record      one record cannot be parsed (e.g. a 100 KB header line); reading goes on
                    with the next record (the next gzip member, or the next `WARC/1.` line)
    page_too_large  an HTML body over the limit, before or after its Content-Encoding is undone

A `*.paths` / `*.paths.gz` input is a Common Crawl manifest: one path per line, relative to the
snapshot's root (`crawl-data/CC-MAIN-.../x.warc.gz`), resolved against the manifest's own URL
prefix (what precedes `crawl-data/`) unless a prefix is given.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import re
import zlib
from typing import Iterator, Optional

from fastwarc.warc import ArchiveIterator, WarcRecordType

from core.remote import DEFAULT_RETRIES, InputError, filesystem, open_input, read_bytes
from crawl.html import CONSENT_METAS  # the <meta name> values consent reads, also in WAT records

log = logging.getLogger(__name__)

HTML_TYPES = ("text/html", "application/xhtml+xml")
MAX_HTML_BYTES = 20 * 1024 * 1024  # larger HTML bodies (before or after decoding) are rejected
GZIP_MAGIC = b"\x1f\x8b"
CC_ROOT = "crawl-data/"  # where paths in Common Crawl's *.paths manifests start


@dataclasses.dataclass(frozen=True)
class Page:
    """One HTML response from a WARC file."""

    url: str
    body: bytes
    charset: Optional[str]
    offset: int
    headers: tuple = ()  # the response headers consent reads (X-Robots-Tag, tdm-reservation): (name, value)


@dataclasses.dataclass(frozen=True)
class WatLinks:
    """The IMG@/src links that a WAT metadata record lists for one page."""

    url: str
    links: list  # [{"url": ..., "alt": ...}]
    base: Optional[str]
    offset: int
    headers: tuple = ()  # the response headers consent reads (X-Robots-Tag, tdm-reservation): (name, value)
    metas: tuple = ()  # the page's <meta name content> pairs consent reads (robots, webpairs, tdm-reservation)


@dataclasses.dataclass(frozen=True)
class Problem:
    """Something wrong with a file or one of its records (reasons: see the module docstring)."""

    reason: str
    file: str
    offset: int
    detail: str
    url: str = ""  # the page, for page-level problems


def is_manifest(path: str) -> bool:
    return os.path.basename(path.split("?", 1)[0]).endswith((".paths", ".paths.gz"))


def manifest_prefix(manifest: str) -> str:
    """The snapshot root a Common Crawl manifest's relative paths hang from: the part of its own
    URL before `crawl-data/`, else its folder."""
    i = manifest.find("/" + CC_ROOT)
    return manifest[: i + 1] if i >= 0 else manifest.rsplit("/", 1)[0] + "/"


def read_manifest(manifest: str, prefix: Optional[str] = None) -> list[str]:
    """The files a *.paths(.gz) manifest lists, as URLs (in its order)."""
    data = read_bytes(manifest)
    if data[:2] == GZIP_MAGIC:
        data = gzip.decompress(data)
    root = prefix or manifest_prefix(manifest)
    root = root if root.endswith("/") else root + "/"
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines()]
    return [line if "://" in line else root + line.lstrip("/") for line in lines if line and not line.startswith("#")]


def expand_inputs(pattern: str, paths_prefix: str = "", max_files: int = 0, files_from: int = 0) -> list[str]:
    """Files named by a path, folder, glob or *.paths manifest (local or fsspec URL), sorted
    (a manifest keeps its order); `files_from`/`max_files` take a slice of them."""
    globbing = any(ch in pattern for ch in "*?[")
    if is_manifest(pattern) and not globbing:
        files = read_manifest(pattern, paths_prefix or None)
    elif pattern.lower().startswith(("http://", "https://")) and not globbing:
        files = [pattern]  # HTTP has no folders: a URL names one file (no listing request)
    else:
        fs, path = filesystem(pattern)
        paths = fs.glob(path) if globbing else [path]
        if len(paths) == 1 and fs.isdir(paths[0]):
            paths = [p for p in fs.find(paths[0]) if any(x in os.path.basename(p) for x in (".warc", ".wat"))]
        elif len(paths) == 1 and not globbing and not fs.exists(paths[0]):
            paths = []
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        files = sorted(p if protocol in ("file", "local") or "://" in p else f"{protocol}://{p}" for p in paths if not fs.isdir(p))
    files = files[files_from:]
    return files[:max_files] if max_files else files


def _record_end(fh, pos: int, size: int, gz: bool) -> Optional[int]:
    """Offset just after the record that starts at `pos` (a gzip member, or a plain WARC record by
    its Content-Length), or None when it does not end cleanly (cut, corrupt)."""
    fh.seek(pos)
    if gz:
        d, consumed = zlib.decompressobj(31), 0
        while not d.eof:
            chunk = fh.read(1 << 20)
            if not chunk:
                return None
            try:
                d.decompress(chunk, 1)  # output is thrown away: only where the member ends matters
                while d.unconsumed_tail and not d.eof:
                    d.decompress(d.unconsumed_tail, 1 << 20)
            except zlib.error:
                return None
            consumed += len(chunk) - len(d.unused_data)
        return pos + consumed
    head = fh.read(1 << 20)
    end = head.find(b"\r\n\r\n")
    if not head.startswith(b"WARC/") or end < 0:
        return None
    length = None
    for line in head[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                return None
    if length is None:
        return None
    stop = pos + end + 4 + length + 4  # header, blank line, block, the record's closing CRLF CRLF
    return stop if stop <= size + 2 else None


def _ends_file(fh, last: int, size: int, gz: bool) -> bool:
    """True when the record at `last` ends cleanly and nothing but padding follows it."""
    end = _record_end(fh, last, size, gz)
    if end is None:
        return False
    if end >= size:
        return True
    fh.seek(end)
    return not fh.read(min(size - end, 4096)).strip(b"\r\n\x00 ")


def _next_start(fh, pos: int, size: int, gz: bool) -> Optional[int]:
    """Where the next record after a bad one at `pos` may start: its end, else the next gzip member
    header or `WARC/1.` line after `pos`."""
    end = _record_end(fh, pos, size, gz)
    if end is not None:
        return end
    marker = b"\x1f\x8b\x08" if gz else b"\nWARC/1."
    at, window = pos + 1, 1 << 20
    while at < size:
        fh.seek(at)
        chunk = fh.read(window + len(marker))
        i = chunk.find(marker)
        if i >= 0:
            return at + i + (0 if gz else 1)
        at += window
    return None


def iter_file(path: str, counters: Optional[dict] = None, retries: int = DEFAULT_RETRIES) -> Iterator[object]:
    """Yield Page (HTML responses), WatLinks (WAT metadata) and Problem records of one file.

    Non-HTML and empty responses are skipped and counted in `counters`; see the module docstring for
    the problems. A bad record is skipped and reading goes on after it."""
    counters = counters if counters is not None else {}

    def bump(key: str) -> None:
        counters[key] = counters.get(key, 0) + 1

    try:
        fh = open_input(path, retries)
        size = fh.size()
    except InputError as err:
        yield Problem("failed_file", path, 0, str(err)[:500])
        return
    with fh:
        try:
            if size == 0:
                yield Problem("not_a_warc", path, 0, "empty file")
                return
            gz = fh.read(2) == GZIP_MAGIC
            start, seen = 0, 0
            while start < size:
                fh.seek(start)
                last = None
                try:
                    for record in ArchiveIterator(fh, parse_http=False):
                        last = record.stream_pos  # absolute: fastwarc asks the stream where it is
                        seen += 1
                        yield from _read_record(record, path, last, bump)
                    error = None
                except InputError:
                    raise
                except Exception as err:  # noqa: BLE001 - fastwarc's parse errors are OSError/ValueError
                    error = err
                if error is None:
                    if seen == 0:
                        yield Problem("not_a_warc", path, 0, "no WARC record found")
                    elif not _ends_file(fh, last, size, gz):
                        yield Problem("truncated_file", path, last, "the last record is cut short")
                    return
                if seen == 0:
                    yield Problem("not_a_warc", path, 0, f"{type(error).__name__}: {error}"[:500])
                    return
                bad = start if last is None else _record_end(fh, last, size, gz)
                nxt = _next_start(fh, bad, size, gz) if bad is not None else None
                yield Problem("bad_record", path, bad if bad is not None else last, f"{type(error).__name__}: {error}"[:500])
                bump("bad_records")
                if nxt is None or nxt <= start:
                    return
                start = nxt
        except InputError as err:
            yield Problem("failed_file", path, fh.tell(), str(err)[:500])


def target_uri(value) -> str:
    """A WARC-Target-URI without its one `<...>` wrapper (WARC/1.0 writes `<http://...>`); a URL
    that merely ends in `>` (a page `...?q=<b>`) keeps it."""
    v = value.strip() if isinstance(value, str) else ""
    if len(v) >= 2 and v[0] == "<" and v[-1] == ">":
        v = v[1:-1].strip()
    return v


def _read_record(record, path: str, offset: int, bump) -> Iterator[object]:
    """Page / WatLinks / Problem for one WARC record (nothing for other record types)."""
    rtype = record.record_type
    if rtype not in (WarcRecordType.response, WarcRecordType.metadata):
        return
    bump("records")
    url = target_uri(record.headers.get("WARC-Target-URI"))
    if rtype == WarcRecordType.metadata:
        wat = _wat_links(record, url, offset)
        if wat is not None:
            bump("wat_pages")
            yield wat
        return
    if record.content_length > MAX_HTML_BYTES:
        yield Problem("page_too_large", path, offset, f"record of {record.content_length} bytes > {MAX_HTML_BYTES}", url)
        return
    record.parse_http()
    content_type = (record.http_content_type or "").lower()
    if not content_type.startswith(HTML_TYPES):
        bump("skipped_non_html")
        return
    body = decode_body(record.reader.read(), record.http_headers, MAX_HTML_BYTES)
    if body is None:
        yield Problem("page_too_large", path, offset, f"decodes to more than {MAX_HTML_BYTES} bytes", url)
        return
    if not body.strip():
        bump("skipped_empty")
        return
    bump("html_pages")
    yield Page(url, body, record.http_charset, offset, _consent_headers(record.http_headers.astuples() if record.http_headers is not None else ()))


CONSENT_HEADERS = ("x-robots-tag", "tdm-reservation")


def _consent_headers(pairs) -> tuple:
    """The (name, value) header pairs a page's consent is read from (crawl/consent.py)."""
    return tuple((_text(k), _text(v)) for k, v in pairs if str(k).strip().lower() in CONSENT_HEADERS)


def _dechunk(body: bytes) -> bytes:
    """Undo HTTP chunked transfer encoding (wget-made WARCs keep it); tolerant of truncation."""
    out, i = bytearray(), 0
    while i < len(body):
        eol = body.find(b"\r\n", i)
        if eol < 0:
            break
        try:
            size = int(body[i:eol].split(b";")[0].strip() or b"0", 16)
        except ValueError:
            return body if not out else bytes(out)  # not chunked after all
        if size == 0:
            break
        out += body[eol + 2 : eol + 2 + size]
        i = eol + 2 + size + 2
    return bytes(out)


def decode_body(body: bytes, headers, limit: int = MAX_HTML_BYTES) -> Optional[bytes]:
    """The entity body as the server meant it: chunked and gzip/deflate/br encodings undone, never
    more than `limit` bytes of output (None when the body is, or decodes to, more than that)."""
    get = (lambda k: (headers.get(k) or "").lower()) if headers is not None else (lambda k: "")
    if "chunked" in get("Transfer-Encoding"):
        body = _dechunk(body)
    encoding = get("Content-Encoding").strip()
    try:
        if encoding in ("gzip", "x-gzip", "deflate"):
            d = zlib.decompressobj(47 if encoding != "deflate" else 15)
            out = d.decompress(body, limit + 1)
            if len(out) > limit:
                return None
            body = out
        elif encoding == "br":
            import brotli

            out = brotli.Decompressor().process(body, output_buffer_limit=limit + 1)
            if len(out) > limit:
                return None
            body = out
    except Exception:  # noqa: BLE001 - keep the raw bytes; the HTML parser copes with noise
        pass
    return body if len(body) <= limit else None


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value) -> str:
    """A WAT JSON value as text: JSON may escape a lone surrogate (`"\\ud800"`), which no UTF-8
    writer takes; it becomes U+FFFD, as the HTML parser makes of `&#xD800;`."""
    text = value if isinstance(value, str) else "" if value is None else str(value)
    return text if text.isascii() else _LONE_SURROGATE.sub("\ufffd", text)


def _wat_links(record, url: str, offset: int) -> Optional[WatLinks]:
    """Parse one WAT JSON metadata record; None when it is not a response's HTML metadata."""
    try:
        doc = json.loads(record.reader.read())
    except ValueError:
        return None
    env = doc.get("Envelope", {})
    header = env.get("WARC-Header-Metadata", {})
    if header.get("WARC-Type") != "response":
        return None
    html = env.get("Payload-Metadata", {}).get("HTTP-Response-Metadata", {}).get("HTML-Metadata", {})
    links = [
        {"url": _text(link.get("url")), "alt": _text(link.get("alt"))}
        for link in html.get("Links", [])
        if link.get("path") == "IMG@/src"
    ]
    head = html.get("Head", {})
    base = _text(head.get("Base")) or None
    http_headers = env.get("Payload-Metadata", {}).get("HTTP-Response-Metadata", {}).get("Headers", {})
    headers = _consent_headers(http_headers.items() if isinstance(http_headers, dict) else ())
    metas = tuple((_text(m.get("name", "")), _text(m.get("content", ""))) for m in head.get("Metas", []) if isinstance(m, dict) and str(m.get("name", "")).strip().lower() in CONSENT_METAS)
    return WatLinks(target_uri(header.get("WARC-Target-URI")) or url, links, base, offset, headers, metas)
