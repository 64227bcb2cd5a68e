"""URL resolution, normalisation and the fetch policy (which URLs the pipeline may request).

Security: a crawled page must not make the pipeline fetch internal resources. Only http/https
URLs without userinfo may be fetched, and never a literal loopback, private, link-local (cloud
metadata at 169.254.169.254), multicast, reserved or unspecified address or `localhost` — unless
the host is on an explicit allow list (hosts, IPs or CIDRs), as the loopback test web needs.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Iterable, Optional
from urllib.parse import quote, urljoin, urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
_SAFE_URL = re.compile(r"[A-Za-z0-9/%:@!$&'()*+,;=\-._~?]*\Z")  # nothing to percent-encode
_SAFE_OR_SPACE = re.compile(r"[A-Za-z0-9/%:@!$&'()*+,;=\-._~? ]*\Z")
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"  # characters quote() leaves alone in a path
_QUERY_SAFE = "=&%:@!$'()*+,;/?-._~"  # ... and in a query
# Closed set of reasons this module gives (the extract stage adds its own).
REASON_DATA_URI = "data_uri"
REASON_BAD_SCHEME = "bad_scheme"
REASON_BAD_URL = "bad_url"
REASON_USERINFO = "userinfo"
REASON_PRIVATE = "private_address"


class AllowList:
    """Hosts, IP addresses and networks exempt from the private-address rule."""

    def __init__(self, entries: Iterable[str] = ()):
        self.hosts: set[str] = set()
        self.networks: list = []
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.hosts.add(entry)

    def allows(self, host: str) -> bool:
        host = host.lower().strip("[]")
        if host in self.hosts:
            return True
        if not self.networks or not host[:1].isdigit() and ":" not in host:
            return False
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def __bool__(self) -> bool:
        return bool(self.hosts or self.networks)


def normalize_url(raw: str, base: str, allow: Optional[AllowList] = None) -> tuple[Optional[str], Optional[str]]:
    """Resolve `raw` against `base` and normalise it; returns (url, None) or (None, reason).

    Normalisation: scheme and host lower-cased, default port dropped, fragment removed, empty
    path becomes "/", unsafe characters percent-encoded (existing escapes kept). With `allow`, the
    fetch policy is applied too (private addresses refused unless allowed), in the same URL split.

    Most links on real pages are plain (an http(s) URL, or a path relative to the page, made of
    URL-safe characters without dot segments): those take a regex fast path that gives the same
    result as the general path below (a test compares the two on real and generated links); the
    rest go through urllib (urljoin + urlsplit).
    """
    raw = (raw or "").strip()
    absolute = _resolve_plain(raw, base)
    if absolute is not None:
        m = _PLAIN_ABSOLUTE.match(absolute)
        if m is not None:
            result = _finish_plain(m, allow)
            if result is not None:
                return result
    return _normalize_general(raw, base, allow)


def normal_url(raw: str, base: str) -> Optional[str]:
    """normalize_url(raw, base)[0] (no fetch policy): a URL that is normal already (lower-case
    http(s), a lower-case plain host, no port, a path and query of URL-safe characters: what
    normalize_url makes of it is itself, as `_normalize_one` uses for links) is taken as it is,
    without resolving and splitting it (extract: each page's URL and <base href>, issue 34)."""
    if _NORMAL_ABSOLUTE.match(raw) is not None:
        return raw
    return normalize_url(raw, base)[0]


# An absolute http(s) URL with a plain host and port and no tab or newline (urlsplit deletes those).
# (Character classes are spelled out: with re.I, [a-z] would also match the Kelvin sign.)
_PLAIN_ABSOLUTE = re.compile(
    r"(?P<scheme>[Hh][Tt][Tt][Pp][Ss]?)://(?P<host>[A-Za-z0-9\-_]+(?:\.[A-Za-z0-9\-_]+)*)(?::(?P<port>[0-9]{1,5}))?"
    r"(?P<path>/[^?#\t\r\n]*)?(?:\?(?P<query>[^#\t\r\n]*))?(?:#.*)?\Z",
    re.S,
)
_DOT_SEGMENT = re.compile(r"(?:^|/)\.\.?(?:/|\Z)")
_SCHEME_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")


@functools.lru_cache(maxsize=1024)
def _split_base(base: str) -> Optional[tuple[str, str, str]]:
    """(scheme, "scheme://netloc", directory path) of a plain base URL, else None. Cached: a
    page's links are all resolved against the same base."""
    m = _PLAIN_ABSOLUTE.match(base)
    if m is None:
        return None
    path = m["path"] or ""
    if "//" in path or ";" in path or _DOT_SEGMENT.search(path):
        return None
    origin = base[: m.end("port") if m["port"] is not None else m.end("host")]
    return m["scheme"], origin, path[: path.rfind("/") + 1] or "/"


def _resolve_plain(raw: str, base: str) -> Optional[str]:
    """`raw` made absolute the way urljoin would, for the plain cases only; None otherwise."""
    head = raw[:8].lower()
    if head.startswith(("http://", "https://")):
        return raw
    if raw.startswith("./"):  # "./x" is "x" (common on generated galleries)
        while raw.startswith("./"):
            raw = raw[2:]
        if raw[:1] == "/":  # ".//x": urljoin keeps it relative to the directory
            return None
    if not raw or raw[0] in "?#." or raw[0] <= " " or _SCHEME_PREFIX.match(raw):  # urlsplit strips leading C0
        return None
    split = _split_base(base)
    if split is None:
        return None
    scheme, origin, directory = split
    path = raw.split("?", 1)[0].split("#", 1)[0]
    if ";" in path:  # urljoin splits off and may drop ";params"
        return None
    if raw.startswith("//"):
        return f"{scheme}:{raw}"
    if _DOT_SEGMENT.search(path):
        return None
    if raw[0] == "/":
        return origin + raw
    if "//" in path:  # urljoin drops empty segments of relative paths
        return None
    return origin + directory + raw


# Plain references, resolved by concatenation (issue 34: one regex per link instead of a resolution).
# A relative one: path segments of URL-safe ASCII characters or spaces, none starting with "." (so
# no dot segment and no empty segment), no ":" or ";" in the path, then an optional non-empty query
# of the same characters (and ":;?"); no fragment. It starts with "/" (appended to the base's
# origin) or not (to the base's directory). Spaces become %20, as quote_unsafe writes them; nothing
# else in it is encoded, so its normalised URL is a prefix that depends only on the base, plus the
# reference. An absolute one: http(s) in lower case, a lower-case host of the characters
# _PLAIN_ABSOLUTE allows, no port, a path and an optional non-empty query of URL-safe characters:
# normalised, it is itself. Everything else goes through normalize_url.
# (Possessive repeats: no character a repeat takes could start what follows it, so backtracking
# into one never finds a match; sre then keeps no backtracking state, ~30 % faster.)
_REL_SEGMENT = r"[A-Za-z0-9_\-~!$&'()*+,=@% ][A-Za-z0-9_\-~!$&'()*+,=@% .]*+"
_REL_PATH = rf"{_REL_SEGMENT}(?:/{_REL_SEGMENT})*+/?"
_PLAIN_QUERY = r"(?:\?[A-Za-z0-9/%:@!$&'()*+,;=\-._~? ]++)?"
_PLAIN_RELATIVE = re.compile(rf"(?:(/)(?:{_REL_PATH})?|(?:\./)*+({_REL_PATH})){_PLAIN_QUERY}\Z")
_AUTHORITY_PATH = r"//([a-z0-9\-_]+(?:\.[a-z0-9\-_]+)*+)/[A-Za-z0-9/%:@!$&'()*+,=\-._~]*+(?:\?[A-Za-z0-9/%:@!$&'()*+,;=\-._~?]++)?"
_ABSOLUTE_BODY = rf"https?:{_AUTHORITY_PATH}"
_NORMAL_ABSOLUTE = re.compile(rf"{_ABSOLUTE_BODY}\Z")


def base_prefixes(base: str, allow: Optional[AllowList] = None) -> Optional[tuple[str, str]]:
    """(directory prefix, origin prefix) of a base URL for the references _PLAIN_RELATIVE matches.
    None when the base is not plain (normalize_url's fast path would not take it) or its host is
    refused: those links go through normalize_url."""
    m = _NORMAL_ABSOLUTE.match(base)
    if m is not None:  # normal already (most bases: the page's URL): its origin and directory as they are
        host = m.group(1)
        if allow is not None and _host_reason(host) is not None and not allow.allows(host):
            return None
        origin = base.index("/", base.index("//") + 2)
        end = base.find("?", origin)
        path = base[origin:] if end < 0 else base[origin:end]
        if "//" in path or _DOT_SEGMENT.search(path):  # (a normal path holds no ";")
            return None
        return base[: origin + path.rfind("/") + 1], base[:origin]
    m = _PLAIN_ABSOLUTE.match(base)  # what _split_base checks, without its cache (a base a page)
    if m is None:
        return None
    path = m["path"] or ""
    if "//" in path or ";" in path or _DOT_SEGMENT.search(path):
        return None
    port = int(m["port"]) if m["port"] is not None else None
    if port is not None and port > 65535:
        return None  # the general path rejects it as bad_url
    directory = path[: path.rfind("/") + 1] or "/"
    url, reason = _assemble(m["scheme"].lower(), m["host"].lower(), port, directory + "a", "", allow)  # normalize_url(origin + directory + "a")
    if reason is not None:
        return None
    return url[:-1], url[: url.index("/", url.index("//") + 2)]


# The same references, recognised a whole page at a time: the page's references joined by "\n"
# (when none holds one), one findall gives a tuple per line: (root-relative reference, relative
# reference without its "./", already-normal absolute URL or protocol-relative one (normal once
# the base's scheme is put before it, as normalize_url does), its host, the line), the first four
# empty unless the line is one of those. sre jumps from "\n" to "\n" and each line is matched
# once, in C, with no match object made for it.
_PAGE_LINES = re.compile(rf"\n(?:(/(?:{_REL_PATH})?{_PLAIN_QUERY})|(?:\./)*+({_REL_PATH}{_PLAIN_QUERY})|((?:https?:)?{_AUTHORITY_PATH}))(?=\n|\Z)|\n([^\n]*+)")
# The same without the "./" prefixes, for a page where no reference starts with one (most): sre
# tries the empty repeat at every line otherwise (~20 % of the findall, issue 34).
_PAGE_LINES_NO_DOT = re.compile(rf"\n(?:(/(?:{_REL_PATH})?{_PLAIN_QUERY})|({_REL_PATH}{_PLAIN_QUERY})|((?:https?:)?{_AUTHORITY_PATH}))(?=\n|\Z)|\n([^\n]*+)")


def normalize_link_columns(raws: list, base: str, allow: Optional[AllowList] = None, stripped: bool = False) -> tuple[list, Optional[list]]:
    """normalize_links as two columns: ([url or None], [reason or None], or None when every link is
    accepted). The page's plain references and normal absolute URLs are recognised together
    (`_PAGE_LINES`, one findall over the joined references: issue 34); the others go one by one,
    as in normalize_links (tests/test_crawl_extract.py compares them with normalize_url).
    `stripped`: the references have no leading or trailing whitespace (extract_page's)."""
    n = len(raws)
    refs = raws if stripped else [r.strip() for r in raws]
    prefixes = base_prefixes(base, allow) if n else None
    joined = "\n" + "\n".join(refs)
    if prefixes is None or joined.count("\n") != n:
        found = None
    else:
        # Spaces become %20 before the match, in the whole page at once: a plain reference
        # matches the same way with either (both are in its characters), and its URL is the
        # prefix (which has none) + the reference, as quote_unsafe writes it; an absolute URL
        # that matches only with %20 is what normalize_url makes of it (its space-only path or
        # query quoted the same way: tests/test_crawl_extract.py compares them).
        lines = _PAGE_LINES if "\n./" in joined else _PAGE_LINES_NO_DOT
        found = lines.findall(joined.replace(" ", "%20") if " " in joined else joined)
    if found is None or len(found) != n:
        pairs = _normalize_each(raws, refs, base, prefixes, allow)
        urls, reasons = [u for u, _ in pairs], [r for _, r in pairs]
        return urls, (reasons if reasons.count(None) != n else None)
    directory, origin = prefixes
    refused = _host_reason
    scheme = base[: base.index(":")].lower()
    relative_scheme = scheme + ":"  # "//host/x" is the base's scheme + ":" + it
    urls = [
        origin + root if root else directory + rel if rel else (absolute if absolute[1] != "/" else relative_scheme + absolute) if absolute and refused(host) is None else None
        for root, rel, absolute, host, _ in found
    ]
    reasons = None
    if None in urls:
        for i, url in enumerate(urls):
            if url is None:
                urls[i], reason = _normalize_one(raws[i], refs[i], base, scheme, allow)
                if reason is not None:
                    if reasons is None:
                        reasons = [None] * n
                    reasons[i] = reason
    return urls, reasons


def normalize_links(raws: Iterable[str], base: str, allow: Optional[AllowList] = None) -> list[tuple[Optional[str], Optional[str]]]:
    """[normalize_url(raw, base, allow) for raw in raws], with the base looked at once: plain
    references (most links of real pages) are a regex match and a concatenation each
    (tests/test_crawl_extract.py compares the two on real and generated links)."""
    raws = list(raws)
    return _normalize_each(raws, [r.strip() for r in raws], base, base_prefixes(base, allow), allow)


def _normalize_each(raws: list, refs: list, base: str, prefixes, allow: Optional[AllowList]) -> list[tuple[Optional[str], Optional[str]]]:
    scheme = base[: base.index(":")].lower() if prefixes is not None else ""
    relative = _PLAIN_RELATIVE.match
    out = []
    for raw, ref in zip(raws, refs):
        if prefixes is not None:
            m = relative(ref)
            if m is not None:
                if m.group(1) is None and m.start(2) > 0:  # "./x" is "x"
                    ref = ref[m.start(2) :]
                url = (prefixes[0] if m.group(1) is None else prefixes[1]) + ref
                out.append((url.replace(" ", "%20") if " " in ref else url, None))
                continue
        out.append(_normalize_one(raw, ref, base, scheme, allow))
    return out


def _normalize_one(raw: str, ref: str, base: str, scheme: str, allow: Optional[AllowList]) -> tuple[Optional[str], Optional[str]]:
    """normalize_url(raw, base, allow) for a reference that is not plain relative (`ref` is raw
    stripped; `scheme` the base's, or "" when the base is not plain)."""
    if scheme and ref[:2] == "//":
        ref = f"{scheme}:{ref}"
    m = _NORMAL_ABSOLUTE.match(ref)
    if m is not None and _host_reason(m.group(1)) is None:
        return ref, None
    return normalize_url(raw, base, allow)


def _finish_plain(m: re.Match, allow: Optional[AllowList]) -> Optional[tuple[Optional[str], Optional[str]]]:
    """Normalise a URL matched by _PLAIN_ABSOLUTE; None when it needs the general path."""
    port = int(m["port"]) if m["port"] is not None else None
    if port is not None and port > 65535:
        return None  # the general path rejects it as bad_url
    return _assemble(m["scheme"].lower(), m["host"].lower(), port, m["path"], m["query"] or "", allow)


def _normalize_general(raw: str, base: str, allow: Optional[AllowList] = None) -> tuple[Optional[str], Optional[str]]:
    """normalize_url for every URL (urllib's urljoin + urlsplit); the reference for the fast path."""
    raw = (raw or "").strip()
    if not raw:
        return None, REASON_BAD_URL
    if raw[:5].lower() == "data:":
        return None, REASON_DATA_URI
    try:
        absolute = raw if raw[:8].lower().startswith(("http://", "https://")) else urljoin(base, raw)
        parts = urlsplit(absolute)
        port = parts.port
    except ValueError:
        return None, REASON_BAD_URL
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        return None, REASON_BAD_SCHEME
    host = (parts.hostname or "").rstrip(".")
    if not host:
        return None, REASON_BAD_URL
    if parts.username is not None or parts.password is not None:
        return None, REASON_USERINFO
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host.lower()
    except UnicodeError:
        return None, REASON_BAD_URL
    return _assemble(scheme, host, port, parts.path, parts.query, allow)


def _assemble(scheme: str, host: str, port: Optional[int], path: Optional[str], query: str, allow: Optional[AllowList]) -> tuple[Optional[str], Optional[str]]:
    """The fetch policy on a split URL (scheme and host lower-case), then the normalised URL:
    default port dropped, empty path "/", unsafe characters percent-encoded, no fragment."""
    if allow is not None:  # the host's verdict is cached; the allow list is read only for a refused host
        reason = _host_reason(host)
        if reason is not None and not allow.allows(host):
            return None, reason
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path, query = quote_unsafe(path or "/", _PATH_SAFE), quote_unsafe(query, _QUERY_SAFE)
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else ""), None


def quote_unsafe(part: str, safe: str) -> str:
    """`quote(part, safe)`, skipped when nothing needs encoding; spaces, the usual unsafe
    character, are replaced directly when they are the only one (the result quote() gives)."""
    if _SAFE_URL.match(part):
        return part
    return part.replace(" ", "%20") if _SAFE_OR_SPACE.match(part) else quote(part, safe=safe)


def _is_internal_ip(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if getattr(ip, "ipv4_mapped", None):
        ip = ip.ipv4_mapped
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast or ip.is_unspecified


def policy_reason(url: str, allow: AllowList) -> Optional[str]:
    """None if `url` (absolute, e.g. a stored link or a redirect target) may be fetched, else the
    rejection reason: the same checks `normalize_url` applies at extract time."""
    return normalize_url(url, url, allow)[1]


@functools.lru_cache(maxsize=65536)
def _host_reason(host: str) -> Optional[str]:
    """Private-address verdict for one host (cached: a page's links mostly share a few hosts)."""
    if host == "localhost" or host.endswith(".localhost") or _is_internal_ip(host):
        return REASON_PRIVATE
    if all(c in "0123456789abcdefx." for c in host):  # decimal/hex/octal IPv4 spellings resolvers accept
        import socket

        try:
            if _is_internal_ip(socket.inet_ntoa(socket.inet_aton(host))):
                return REASON_PRIVATE
        except OSError:
            pass
    return None
