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
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
_SAFE_URL = re.compile(r"[A-Za-z0-9/%:@!$&'()*+,;=\-._~?]*\Z")  # nothing to percent-encode
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
    """
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
    if allow is not None and not allow.allows(host):
        reason = _host_reason(host)
        if reason is not None:
            return None, reason
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path, query = parts.path or "/", parts.query
    if not _SAFE_URL.match(path):
        path = quote(path, safe="/%:@!$&'()*+,;=-._~")
    if not _SAFE_URL.match(query):
        query = quote(query, safe="=&%:@!$'()*+,;/?-._~")
    return urlunsplit((scheme, netloc, path, query, "")), None


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
