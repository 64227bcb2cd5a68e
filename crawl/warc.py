"""Stream pages out of WARC and WAT files (local paths or any fsspec URL) with fastwarc.

A file is read as a stream, record by record: a multi-GB WARC never sits in memory whole.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Iterator, Optional

import fsspec
from fastwarc.warc import ArchiveIterator, WarcRecordType

log = logging.getLogger(__name__)

HTML_TYPES = ("text/html", "application/xhtml+xml")
MAX_HTML_BYTES = 20 * 1024 * 1024  # larger HTML bodies are skipped (counted as oversized)


@dataclasses.dataclass(frozen=True)
class Page:
    """One HTML response from a WARC file."""

    url: str
    body: bytes
    charset: Optional[str]
    offset: int


@dataclasses.dataclass(frozen=True)
class WatLinks:
    """The IMG@/src links that a WAT metadata record lists for one page."""

    url: str
    links: list  # [{"url": ..., "alt": ...}]
    base: Optional[str]
    offset: int


def expand_inputs(pattern: str) -> list[str]:
    """Files named by a path, folder or glob (local or fsspec URL), in sorted order."""
    fs, _, paths = fsspec.get_fs_token_paths(pattern)
    if len(paths) == 1 and fs.isdir(paths[0]):
        paths = [p for p in fs.find(paths[0]) if any(x in os.path.basename(p) for x in (".warc", ".wat"))]
    files = sorted(p for p in paths if fs.exists(p) and not fs.isdir(p))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [p if protocol == "file" or "://" in p else f"{protocol}://{p}" for p in files]


def iter_file(path: str, counters: Optional[dict] = None) -> Iterator[object]:
    """Yield Page (HTML responses) and WatLinks (WAT metadata) records of one file.

    Non-HTML, empty and oversized responses are skipped and counted in `counters`; a truncated
    or corrupt file stops at the last good record with a warning instead of failing the job.
    """
    counters = counters if counters is not None else {}

    def bump(key: str) -> None:
        counters[key] = counters.get(key, 0) + 1

    try:
        with fsspec.open(path, "rb") as fh:
            for record in ArchiveIterator(fh, record_types=WarcRecordType.response | WarcRecordType.metadata):
                bump("records")
                url = (record.headers.get("WARC-Target-URI") or "").strip().strip("<>")  # WARC/1.0 wraps it
                if record.record_type == WarcRecordType.metadata:
                    wat = _wat_links(record, url)
                    if wat is not None:
                        bump("wat_pages")
                        yield wat
                    continue
                if record.content_length > MAX_HTML_BYTES:
                    bump("skipped_oversized")
                    continue
                record.parse_http()
                content_type = (record.http_content_type or "").lower()
                if not content_type.startswith(HTML_TYPES):
                    bump("skipped_non_html")
                    continue
                body = decode_body(record.reader.read(), record.http_headers)
                if not body.strip():
                    bump("skipped_empty")
                    continue
                bump("html_pages")
                yield Page(url, body, record.http_charset, record.stream_pos)
    except Exception as err:  # noqa: BLE001 - a broken archive must not kill the whole job
        bump("truncated_files")
        log.warning("%s: stopped reading at a broken record: %s", path, err)


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


def decode_body(body: bytes, headers) -> bytes:
    """The entity body as the server meant it: chunked and gzip/deflate/br encodings undone."""
    get = (lambda k: (headers.get(k) or "").lower()) if headers is not None else (lambda k: "")
    if "chunked" in get("Transfer-Encoding"):
        body = _dechunk(body)
    encoding = get("Content-Encoding")
    try:
        if encoding in ("gzip", "x-gzip", "deflate"):
            import zlib

            body = zlib.decompressobj(47 if encoding != "deflate" else 15).decompress(body)
        elif encoding == "br":
            import brotli

            body = brotli.decompress(body)
    except Exception:  # noqa: BLE001 - keep the raw bytes; the HTML parser copes with noise
        pass
    return body


def _wat_links(record, url: str) -> Optional[WatLinks]:
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
        {"url": link.get("url", ""), "alt": link.get("alt", "")}
        for link in html.get("Links", [])
        if link.get("path") == "IMG@/src"
    ]
    base = html.get("Head", {}).get("Base")
    return WatLinks(header.get("WARC-Target-URI") or url, links, base, record.stream_pos)
