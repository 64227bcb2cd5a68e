"""Which site a page belongs to: its registered domain under the Public Suffix List.

`site_of("https://news.example.co.uk/a")` is "example.co.uk"; private suffixes count as suffixes
(every "*.github.io" or "*.blogspot.com" blog is a site of its own). tldextract reads the list
bundled in its wheel: it never fetches the live list (no network, same answer on every worker).
An address or a name without a public suffix (127.0.0.1, localhost, an intranet host) is its own
site: its lower-cased host name.
"""

from __future__ import annotations

import functools
from urllib.parse import urlsplit


@functools.lru_cache(maxsize=1)
def _extractor():
    import tldextract

    # suffix_list_urls=() and no cache dir: the bundled snapshot only, nothing written or fetched
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, include_psl_private_domains=True)


@functools.lru_cache(maxsize=65536)
def _site_of_host(host: str) -> str:
    parts = _extractor().extract_str(host)
    return parts.top_domain_under_public_suffix or host


def site_of(url: str) -> str:
    """The registered domain of a URL's host (or the host itself when it has none); "" if no host."""
    try:
        host = (urlsplit(url).hostname or "").rstrip(".")
    except ValueError:
        return ""
    return _site_of_host(host) if host else ""
