"""The one place in crawl/ that judges a response before its bytes are kept.

Every image fetch of `crawl download` (the planned fetch and the boilerplate evidence fetch, both
through `crawl.fetch.fetch` inside img2dataset's workers) asks a `ResponseJudge` three questions,
in this order, and stops at the first refusal:

1. `before_request(url)`: may this URL be asked for at all? (the host's robots.txt and TDMRep,
   read once per host by the plan and kept in the run: issue 31)
2. `on_headers(url, headers)`: do the response headers refuse the use? (`X-Robots-Tag`,
   `tdm-reservation`): judged before one byte of the body is read, so the connection closes
   without reading it (issue 31)
3. `on_body(url, data)`: do the bytes themselves refuse? (the hash blocklist, exact and PDQ:
   issue 32). The bytes are still only in this process's memory: a refusal here means they are
   never written to any file of the run.

A refusal raises `crawl.fetch.FetchError(reason, message)`; the reason is one of download's closed
set of rejected reasons, and the message's detail lands in the rejected row.

The judge is built once per download in the driver and pickled into img2dataset's worker
processes, so it holds only plain data (rules, parsed lists) and rebuilds any heavy index lazily.
Each rule is a small object with any of the three methods; the judge calls them in order.
"""

from __future__ import annotations

from typing import Iterable, Mapping


class ResponseJudge:
    """Calls each rule's `before_request`, `on_headers` and `on_body` (where it has one)."""

    def __init__(self, rules: Iterable = ()):
        self.rules = list(rules)

    def before_request(self, url: str) -> None:
        for rule in self.rules:
            if hasattr(rule, "before_request"):
                rule.before_request(url)

    def on_headers(self, url: str, headers: Mapping[str, str]) -> None:
        for rule in self.rules:
            if hasattr(rule, "on_headers"):
                rule.on_headers(url, headers)

    def on_body(self, url: str, data: bytes) -> None:
        for rule in self.rules:
            if hasattr(rule, "on_body"):
                rule.on_body(url, data)


class HeaderOptOut:
    """img2dataset's own X-Robots-Tag check (`is_disallowed`), judged on the headers alone."""

    def __init__(self, user_agent_token: str, directives):
        self.user_agent_token, self.directives = user_agent_token, list(directives or ())

    def on_headers(self, url: str, headers) -> None:
        from img2dataset.downloader import is_disallowed

        from crawl.fetch import FetchError

        if self.directives and is_disallowed(headers, self.user_agent_token, self.directives):
            raise FetchError("opt_out", "Use of image disallowed by X-Robots-Tag directive")
