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


# Parsers spend time quadratic in the nesting depth (lexbor: 0.03 s at 4,000 nested <div>, 0.2 s at
# 10,000, 9 s at 50,000). A page with at most MAX_DEPTH tags cannot nest deeper than that, so it is
# parsed as it is (bounded work, no scan); a larger one gets a vectorised depth estimate and, only
# when that passes the limit, an exact scan. Pages over the limits are rejected.
MAX_DEPTH = 4096
MAX_ELEMENTS = 200_000
_VOID = {b"area", b"base", b"br", b"col", b"embed", b"hr", b"img", b"input", b"link", b"meta", b"param", b"source", b"track", b"wbr", b"keygen", b"frame", b"basefont", b"isindex", b"command"}
# closed implicitly by a sibling or the parent's end: never nest on their own
_AUTO_CLOSED = {b"p", b"li", b"dt", b"dd", b"tr", b"td", b"th", b"option", b"optgroup", b"rb", b"rt", b"rp", b"rtc", b"thead", b"tbody", b"tfoot", b"colgroup", b"caption", b"html", b"head", b"body"}
_RAW_TEXT = {b"script", b"style", b"textarea", b"title", b"xmp", b"iframe", b"noembed", b"noframes", b"plaintext", b"noscript"}
_TAG = re.compile(rb"<(/?)([a-zA-Z][a-zA-Z0-9:-]*)([^>]*)>")


def _prefix_code(name: bytes) -> int:
    b = (name + b"\0\0\0")[:3]
    return (b[0] << 16) | (b[1] << 8) | b[2]


# tag names (by their first three letters) that do not nest: void, implicitly closed, raw text
_NO_NEST_CODES = sorted({_prefix_code(n) for n in (_VOID | _AUTO_CLOSED | _RAW_TEXT)})


def _by_name(code):
    """The indices that sort 24-bit tag codes, ties in document order: np.lexsort((arange, code))'s
    order from two stable sorts of 16-bit keys, which NumPy radix-sorts (~6x faster on a page of
    7,500 tags: issue 34)."""
    import numpy as np

    low = np.argsort((code & 0xFFFF).astype(np.uint16), kind="stable")
    return low[np.argsort((code[low] >> 16).astype(np.uint16), kind="stable")]


def _depth_estimate(body: bytes, limit: Optional[int] = None) -> int:
    """An over-estimate of the nesting depth in a few vectorised passes: every start tag of a name
    that nests counts +1, its end tag -1, per name (a stray `</span>` does not cancel a `<div>`)
    and never below zero; self-closing and non-nesting tags do not count. With `limit`, the number
    of start tags that nest is returned as soon as it is at most `limit` (no name can be open more
    often than it was opened, so the estimate is at most that: the same verdict, without the
    per-name walk that costs most)."""
    import numpy as np

    a = np.frombuffer(body, np.uint8)
    lt, gt = np.flatnonzero(a == 60), np.flatnonzero(a == 62)
    if lt.size == 0 or gt.size == 0:
        return 0
    nearest_gt = gt[np.minimum(np.searchsorted(gt, lt), gt.size - 1)]
    lt = lt[a[np.maximum(nearest_gt - 1, 0)] != 47]  # `<x ... />`
    n = a.size

    def at(k):
        return a[np.minimum(lt + k, n - 1)] | 0x20  # ASCII letters lower-cased

    c1, c2, c3, c4 = at(1), at(2), at(3), at(4)
    close = c1 == (47 | 0x20)
    n1, n2, n3 = np.where(close, c2, c1), np.where(close, c3, c2), np.where(close, c4, c3)

    def alnum(x):
        return ((x >= 97) & (x <= 122)) | ((x >= 48) & (x <= 57))

    n2 = np.where(alnum(n2), n2, 0)
    n3 = np.where((n2 != 0) & alnum(n3), n3, 0)
    code = (n1.astype(np.int64) << 16) | (n2.astype(np.int64) << 8) | n3
    no_nest = np.asarray(_NO_NEST_CODES, dtype=np.int64)  # sorted: a binary search per tag (np.isin sorts both, 3x slower)
    listed = no_nest[np.minimum(np.searchsorted(no_nest, code), no_nest.size - 1)] == code
    keep = (n1 >= 97) & (n1 <= 122) & ~listed
    code, step = code[keep], np.where(close[keep], -1, 1)
    if code.size == 0:
        return 0
    if limit is not None:
        opened = int(np.count_nonzero(step > 0))
        if opened <= limit:
            return opened
    order = _by_name(code)  # grouped by name, in document order
    sc, ss = code[order], step[order]
    start = np.r_[True, sc[1:] != sc[:-1]]
    gid = np.cumsum(start) - 1
    first = np.flatnonzero(start)
    walk = np.cumsum(ss)
    walk = walk - (walk[first] - ss[first])[gid]  # each name's own running sum
    gap = gid.astype(np.int64) * (4 * code.size + 10)  # keeps the running minimum inside each name
    depth = walk - (np.minimum.accumulate(np.minimum(walk, 0) - gap) + gap)  # clamped at zero
    prev = np.r_[0, depth[:-1]]
    prev[start] = 0
    change = np.empty_like(depth)
    change[order] = depth - prev
    return int(np.cumsum(change).max())


def page_complexity(body: bytes, max_depth: int = MAX_DEPTH, max_elements: int = MAX_ELEMENTS) -> Optional[str]:
    """None when the page is safe to parse, else why not ("N tags > limit", "nesting depth ...")."""
    if len(body) <= max_depth:  # fewer bytes than the limit: fewer tags too
        return None
    import numpy as np

    a = np.frombuffer(body, np.uint8)
    lt = a == 60
    tags = int(np.count_nonzero(lt))  # body.count(b"<"), 3x faster (SIMD)
    if tags <= max_depth:
        return None
    if tags > max_elements:
        return f"{tags} tags > {max_elements}"
    # No name can be open more often than it was opened, and a start tag is a '<' not followed by
    # '/': when those are within the limit, so is the estimate (the same verdict without it: most
    # long pages close about half their tags; 0.17 s a Common Crawl file of the estimate, issue 34)
    at = np.flatnonzero(lt)
    if tags - int(np.count_nonzero(a[np.minimum(at + 1, a.size - 1)] == 47)) <= max_depth:
        return None
    if _depth_estimate(body, max_depth) <= max_depth:
        return None
    # the exact scan, for the rare page the estimate flags: a stack of open elements where an end
    # tag closes up to the nearest open element of its name and is ignored when there is none
    stack: list = []
    open_count: dict = {}
    i, n = 0, len(body)
    while i < n:
        m = _TAG.search(body, i)
        if m is None:
            break
        i = m.end()
        name = m.group(2).lower()
        if m.group(1):  # an end tag
            if open_count.get(name):
                while stack:
                    top = stack.pop()
                    open_count[top] -= 1
                    if top == name:
                        break
            continue
        if name in _RAW_TEXT:  # skip to its end tag: '<' inside a script is not markup
            close = _find_ci(body, b"</" + name, i)
            i = n if close < 0 else close
            continue
        if name in _VOID or name in _AUTO_CLOSED or m.group(3).rstrip().endswith(b"/"):
            continue
        stack.append(name)
        open_count[name] = open_count.get(name, 0) + 1
        if len(stack) > max_depth:
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


_LEADING_INT = re.compile(r"\s*(\d+)")


def _int(value: Optional[str]) -> Optional[int]:
    if value and value.isascii() and value.isdigit():  # the common case (width="300"): no regex
        return int(value) if int(value) < 2**31 else None
    m = _LEADING_INT.match(value or "")
    return int(m.group(1)) if m and int(m.group(1)) < 2**31 else None


def extract_image_links(html: str, include_srcset: bool = True, include_og_image: bool = True) -> tuple[list[RawLink], Optional[str]]:
    """All image references of a page in document order, and its <base href> if any."""
    links, base, _ = extract_page(html, include_srcset, include_og_image)
    return links, base


CONSENT_METAS = ("robots", "webpairs", "tdm-reservation")  # <meta name> values consent reads


def extract_page(html: str, include_srcset: bool = True, include_og_image: bool = True) -> tuple[list[RawLink], Optional[str], list[tuple[str, str]]]:
    """`extract_image_links`, plus the page's consent metas: [(name, content)] of
    <meta name="robots|webpairs|tdm-reservation">."""
    tree = LexborHTMLParser(html)
    metas = []
    for node in tree.css("meta[name]"):
        name = (node.attributes.get("name") or "").strip().lower()
        if name in CONSENT_METAS:
            metas.append((name, node.attributes.get("content") or ""))
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
    return links, base_href or None, metas
