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


def _codec(name: Optional[str]) -> Optional[str]:
    import codecs

    if not name:
        return None
    try:
        return codecs.lookup(name.strip().strip("\"'")).name
    except LookupError:
        return None


def decode_html(body: bytes, http_charset: Optional[str] = None) -> str:
    """Decode page bytes: HTTP header charset, then <meta charset>, then UTF-8, then cp1252."""
    if body.startswith(b"\xef\xbb\xbf"):
        return body[3:].decode("utf-8", errors="replace")
    candidates = [_codec(http_charset)]
    m = _META_CHARSET.search(body[:4096])
    candidates.append(_codec(m.group(1).decode("ascii", "ignore")) if m else None)
    for codec in [c for c in candidates if c] + ["utf-8"]:
        try:
            return body.decode(codec)
        except (UnicodeDecodeError, LookupError):
            continue
    return body.decode("cp1252", errors="replace")


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
