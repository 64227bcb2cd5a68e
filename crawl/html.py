"""Image links from one HTML document: <img> (src/srcset), <picture><source srcset>, og:image.

Pure functions, no Beam: `decode_html` picks the charset, `extract_image_links` parses with
selectolax's Lexbor engine (a real HTML5 parser that survives broken markup).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from selectolax.lexbor import LexborHTMLParser

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([a-zA-Z0-9_\-:.]+)""", re.I)


@dataclasses.dataclass(frozen=True)
class RawLink:
    """An image reference as written in the page, before URL resolution."""

    url: str
    alt: str
    kind: str  # img | picture | og:image
    position: int
    width: Optional[int]
    height: Optional[int]


# Codec names pages declare that are not text encodings of a web page: Python's `undefined` raises on
# every byte, `punycode`/`idna` are for host names, the rest are transforms (zlib, base64, rot13, ...).
_NOT_PAGE_CODECS = {"undefined", "punycode", "idna", "raw_unicode_escape", "unicode_escape", "utf-7", "mbcs", "oem"}


def _codec(name: Optional[str]) -> Optional[str]:
    """Python's name for a declared page charset, or None when it is junk or not a page encoding."""
    import codecs

    if not name:
        return None
    try:
        info = codecs.lookup(name.strip().strip("\"'"))
    except (LookupError, ValueError, TypeError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_PAGE_CODECS:
        return None
    return info.name


def decode_html(body: bytes, http_charset: Optional[str] = None) -> str:
    """Decode page bytes: the HTTP header charset, then <meta charset> (either only when it is a real
    page encoding and decodes the bytes), then UTF-8, then a detected charset, else UTF-8 with
    replacement characters. Never raises."""
    if body.startswith(b"\xef\xbb\xbf"):
        return body[3:].decode("utf-8", errors="replace")
    candidates = [_codec(http_charset)]
    m = _META_CHARSET.search(body[:4096])
    candidates.append(_codec(m.group(1).decode("ascii", "ignore")) if m else None)
    for codec in [c for c in candidates if c] + ["utf-8"]:
        try:
            return body.decode(codec)
        except (UnicodeError, LookupError, ValueError):  # UnicodeError: e.g. a codec that refuses input
            continue
    try:
        from charset_normalizer import from_bytes

        best = from_bytes(body[:65536]).best()
        if best is not None and _codec(best.encoding):
            return body.decode(best.encoding, errors="replace")
    except Exception:  # noqa: BLE001 - detection is a best effort
        pass
    return body.decode("utf-8", errors="replace")


# Blink's HTML parser stops nesting at 512 levels; past that, parsers spend time quadratic in the
# depth (lexbor: 0.2 s at 10,000 nested <div>, 9 s at 50,000). Pages over these limits are rejected.
MAX_DEPTH = 512
MAX_ELEMENTS = 200_000
_VOID = {b"area", b"base", b"br", b"col", b"embed", b"hr", b"img", b"input", b"link", b"meta", b"param", b"source", b"track", b"wbr", b"keygen", b"frame", b"basefont", b"isindex", b"command"}
# closed implicitly by a sibling or the parent's end: never nest on their own
_AUTO_CLOSED = {b"p", b"li", b"dt", b"dd", b"tr", b"td", b"th", b"option", b"optgroup", b"rb", b"rt", b"rp", b"rtc", b"thead", b"tbody", b"tfoot", b"colgroup", b"caption", b"html", b"head", b"body"}
_RAW_TEXT = {b"script", b"style", b"textarea", b"title", b"xmp", b"iframe", b"noembed", b"noframes", b"plaintext", b"noscript"}
_TAG = re.compile(rb"<(/?)([a-zA-Z][a-zA-Z0-9:-]*)([^>]*)>")


def page_complexity(body: bytes, max_depth: int = MAX_DEPTH, max_elements: int = MAX_ELEMENTS) -> Optional[str]:
    """None when the page is safe to parse, else why not ("N elements > limit", "nesting depth ...").

    Cheap first: a page with few `<` cannot nest deeply; only pages with more tags than
    `max_depth` get a scan of their start and end tags (void, raw-text and implicitly closed
    elements do not nest), stopping as soon as the depth passes the limit."""
    tags = body.count(b"<")
    if tags <= max_depth:
        return None
    if tags > max_elements:
        return f"{tags} tags > {max_elements}"
    depth, i, n = 0, 0, len(body)
    while i < n:
        m = _TAG.search(body, i)
        if m is None:
            break
        i = m.end()
        name = m.group(2).lower()
        if m.group(1):  # an end tag
            if name not in _VOID and name not in _AUTO_CLOSED and depth:
                depth -= 1
            continue
        if name in _RAW_TEXT:  # skip to its end tag: '<' inside a script is not markup
            close = body.lower().find(b"</" + name, i) if n < 1 << 16 else _find_ci(body, b"</" + name, i)
            i = n if close < 0 else close
            continue
        if name in _VOID or name in _AUTO_CLOSED or m.group(3).rstrip().endswith(b"/"):
            continue
        depth += 1
        if depth > max_depth:
            return f"nesting depth over {max_depth}"
    return None


def _find_ci(data: bytes, needle: bytes, start: int) -> int:
    """Case-insensitive find of an ASCII `needle` (an end tag) without lower-casing all of `data`."""
    pattern = re.compile(re.escape(needle), re.I)
    m = pattern.search(data, start)
    return m.start() if m else -1


def parse_srcset(srcset: str) -> list[tuple[str, float, str]]:
    """Candidates of a srcset attribute as (url, value, unit) with unit 'w' or 'x' (HTML spec parsing)."""
    out: list[tuple[str, float, str]] = []
    s, i, n = srcset, 0, len(srcset)
    while i < n:
        while i < n and (s[i].isspace() or s[i] == ","):
            i += 1
        start = i
        while i < n and not s[i].isspace():
            i += 1
        url = s[start:i]
        descriptor = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            start = i
            depth = 0
            while i < n and (s[i] != "," or depth):
                depth += {"(": 1, ")": -1}.get(s[i], 0)
                i += 1
            descriptor = s[start:i].strip()
        if not url:
            continue
        value, unit = 1.0, "x"
        for token in descriptor.split():
            try:
                if token[-1] in "wx":
                    value, unit = float(token[:-1]), token[-1]
            except ValueError:
                pass
        out.append((url, value, unit))
    return out


def largest_candidate(srcset: str) -> Optional[str]:
    """The srcset candidate with the largest width (w) or, failing that, density (x)."""
    cands = parse_srcset(srcset)
    if not cands:
        return None
    widths = [c for c in cands if c[2] == "w"]
    return max(widths or cands, key=lambda c: c[1])[0]


def _int(value: Optional[str]) -> Optional[int]:
    m = re.match(r"\s*(\d+)", value or "")
    return int(m.group(1)) if m and int(m.group(1)) < 2**31 else None


def extract_image_links(html: str, include_srcset: bool = True, include_og_image: bool = True) -> tuple[list[RawLink], Optional[str]]:
    """All image references of a page in document order, and its <base href> if any."""
    tree = LexborHTMLParser(html)
    base = tree.css_first("base[href]")
    base_href = (base.attributes.get("href") or "").strip() if base else None
    selector = "img, picture source" + (', meta[property="og:image"]' if include_og_image else "")
    links: list[RawLink] = []
    for node in tree.css(selector):
        attrs = node.attributes
        if node.tag == "meta":
            url, kind, alt = attrs.get("content") or "", "og:image", ""
        elif node.tag == "source":
            if not include_srcset or node.parent is None or node.parent.tag != "picture":
                continue
            url, kind, alt = largest_candidate(attrs.get("srcset") or "") or "", "picture", ""
        else:
            srcset = (attrs.get("srcset") or "") if include_srcset else ""
            url = largest_candidate(srcset) or attrs.get("src") or ""
            kind, alt = "img", attrs.get("alt") or ""
        url = url.strip()
        if not url:
            continue
        links.append(RawLink(url, " ".join(alt.split()), kind, len(links), _int(attrs.get("width")), _int(attrs.get("height"))))
    return links, base_href or None
